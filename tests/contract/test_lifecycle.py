"""Every store, of every tier, refuses use after ``aclose`` and refuses to reopen.

A caller still holding a closed store must fail loudly with ``LifecycleError``, not
quietly reconnect behind the back of whoever closed it (see ``tierstore.lifecycle``).
"""

from __future__ import annotations

from typing import Any

import pytest

from tierstore.errors import LifecycleError


async def _closed_twice(store: Any) -> None:
    await store.aclose()
    await store.aclose()  # idempotent


async def test_a_closed_warm_store_refuses_use_and_reopening(warm: Any) -> None:
    await _closed_twice(warm)
    with pytest.raises(LifecycleError):
        await warm.head("t", "")
    with pytest.raises(LifecycleError):
        await warm.next_fence("t")
    with pytest.raises(LifecycleError):
        await warm.setup()


async def test_a_closed_hot_store_refuses_use_and_reopening(hot: Any) -> None:
    await _closed_twice(hot)
    with pytest.raises(LifecycleError):
        await hot.get("t", "")
    with pytest.raises(LifecycleError):
        await hot.acquire_lease("t", "me", 5.0)
    with pytest.raises(LifecycleError):
        await hot.setup()


async def test_a_closed_object_store_refuses_use_and_reopening(objects: Any) -> None:
    await _closed_twice(objects)
    with pytest.raises(LifecycleError):
        await objects.get("k")
    with pytest.raises(LifecycleError):
        await objects.put("k", b"v")
    with pytest.raises(LifecycleError):
        await objects.setup()
