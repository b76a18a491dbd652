"""With ``hot_check="trusted"`` a hot update that failed leaves an entry that may be
behind warm (``hotcache`` calls it doubtful): this process must read the thread from
warm until an update that proves the entry current has landed, and must invalidate the
entry as soon as the hot tier answers again, or on close.

The hot tier here is a real in-memory store behind a switch that makes its calls fail
or hold them, to schedule interleavings a network only produces now and then.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.builders import entry
from tierstore.errors import TierUnavailable
from tierstore.hotcache import HotCache, HotGuard
from tierstore.metrics import Metrics
from tierstore.stats import Stats
from tierstore.tiers.memory import MemoryHot


class Switched:
    """``MemoryHot`` whose calls fail while ``down`` (invalidations alone while
    ``invalidations_down``), and whose puts wait for ``gate`` while it is set (to land
    after a later call)."""

    backend = "switched"

    def __init__(self, inner: MemoryHot) -> None:
        self.inner = inner
        self.down = False
        self.invalidations_down = False
        self.gate: asyncio.Event | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _check(self) -> None:
        if self.down:
            raise TierUnavailable("hot tier down", tier="hot", backend=self.backend)

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return await self.inner.get(*args, **kwargs)

    async def put(self, *args: Any, **kwargs: Any) -> Any:
        gate = self.gate
        if gate is not None:
            await gate.wait()
        self._check()
        return await self.inner.put(*args, **kwargs)

    async def add_writes(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return await self.inner.add_writes(*args, **kwargs)

    async def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        if self.invalidations_down:
            raise TierUnavailable("invalidation lost", tier="hot", backend=self.backend)
        return await self.inner.invalidate(*args, **kwargs)


async def trusted_cache() -> tuple[HotCache, Switched]:
    inner = MemoryHot()
    await inner.setup()
    hot = Switched(inner)
    cache = HotCache(hot, None, guard=HotGuard(Stats(), Metrics()),  # type: ignore[arg-type]
                     verify=False)
    return cache, hot


async def served(cache: HotCache, thread: str = "t") -> str | None:
    found = await cache.latest(thread, "")
    return None if found is None else found.checkpoint_id


async def test_a_failed_put_is_read_from_warm_until_a_newer_put_lands() -> None:
    cache, hot = await trusted_cache()
    await cache.put(entry("t", "0001"))
    assert await served(cache) == "0001"
    hot.down = True
    await cache.put(entry("t", "0002"))  # warm moved to 0002; the hot entry stayed at 0001
    hot.down = False
    assert await hot.inner.get("t", "") is not None  # the older entry is there...
    assert await served(cache) is None  # ...and not served: the caller reads warm
    await cache.put(entry("t", "0003"))
    assert await served(cache) == "0003"


async def test_an_older_put_landing_after_the_failure_proves_nothing() -> None:
    cache, hot = await trusted_cache()
    gate = hot.gate = asyncio.Event()
    older = asyncio.ensure_future(cache.put(entry("t", "0001")))
    await asyncio.sleep(0)  # sent, not landed
    hot.gate = None
    hot.down = True
    await cache.put(entry("t", "0002"))
    hot.down = False
    hot.invalidations_down = True  # the repair cannot hide what the put proves
    gate.set()
    await older  # 0001 lands after 0002 failed
    assert (await hot.inner.get("t", "")).checkpoint_id == "0001"  # type: ignore[union-attr]
    assert await served(cache) is None


async def test_the_entry_is_invalidated_once_the_hot_tier_answers_again() -> None:
    cache, hot = await trusted_cache()
    await cache.put(entry("t", "0001"))
    hot.down = True
    await cache.add_writes("t", "", "0001", [], version=3)  # warm at 3, hot stays at 2
    hot.down = False
    await cache.put(entry("u", "0001"))  # any answered update starts the repair
    await cache.drain()
    assert await hot.inner.get("t", "") is None  # other processes read warm now
    assert await hot.inner.get("u", "") is not None
    await cache.fill(entry("t", "0001", version=3))
    assert await served(cache) == "0001"


async def test_close_retries_the_repair_and_a_delete_while_down_is_repaired_with_its_floor(
) -> None:
    cache, hot = await trusted_cache()
    await cache.put(entry("t", "0001"))
    hot.down = True
    await cache.invalidate(["t"], floor=10)  # a delete while the hot tier is down
    assert await served(cache) is None

    async def back_soon() -> None:
        await asyncio.sleep(0.2)
        hot.down = False

    await asyncio.gather(cache.drain(), back_soon())  # the first tries on close fail
    assert await hot.inner.get("t", "") is None
    assert not await hot.inner.put(entry("t", "0005"))  # at or below the tombstone's floor
