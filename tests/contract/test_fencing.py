"""Lease fencing in the WarmStore contract and leases in the hot tiers, on every backend."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.builders import cid, record, write
from tests.contract.test_warm import HOSTILE_IDS
from tierstore.errors import LeaseLost
from tierstore.records import ListQuery


async def test_next_fence_counts_up_per_thread(warm: Any) -> None:
    a, b = f"t-{uuid.uuid4()}", f"t-{uuid.uuid4()}"
    assert [await warm.next_fence(a) for _ in range(3)] == [1, 2, 3]
    assert await warm.next_fence(b) == 1


async def test_a_superseded_token_writes_nothing(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    old = await warm.next_fence(t)
    first = (await warm.put_checkpoint(record(t, 1), [], strict=False, fence=old)).head.version
    new = await warm.next_fence(t)
    with pytest.raises(LeaseLost) as info:
        await warm.put_checkpoint(record(t, 2, parent=1), [], strict=False, fence=old)
    assert (info.value.token, info.value.fence, info.value.thread_id) == (old, new, t)
    with pytest.raises(LeaseLost):
        await warm.put_writes(t, "", cid(1), [write("task", 0, "stale")], fence=old)
    stored = await warm.get(t, "", None)
    assert stored is not None and stored.checkpoint_id == cid(1) and stored.writes == ()
    head = await warm.head(t, "")
    assert head is not None and (head.checkpoint_id, head.version) == (cid(1), first)
    # the holder of the newest token writes on
    await warm.put_checkpoint(record(t, 2, parent=1), [], strict=False, fence=new)
    await warm.put_writes(t, "", cid(2), [write("task", 0, "fresh")], fence=new)
    stored = await warm.get(t, "", None)
    assert stored is not None and stored.checkpoint_id == cid(2) and len(stored.writes) == 1


async def test_a_stale_token_cannot_open_a_new_namespace(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    old = await warm.next_fence(t)
    await warm.next_fence(t)
    with pytest.raises(LeaseLost):
        await warm.put_checkpoint(record(t, 1, ns="child:1"), [], strict=False, fence=old)
    assert await warm.head(t, "child:1") is None
    assert [r async for r in warm.list(ListQuery(thread_id=t))] == []


async def test_unfenced_writes_are_not_checked(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.next_fence(t)
    await warm.put_checkpoint(record(t, 1), [], strict=False)
    await warm.put_writes(t, "", cid(1), [write("task", 0, "v")])
    assert (await warm.head(t, "")) is not None


async def test_the_fence_outlives_delete_thread(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    old = await warm.next_fence(t)
    await warm.put_checkpoint(record(t, 1), [], strict=False, fence=old)
    new = await warm.next_fence(t)
    await warm.delete_thread(t)
    with pytest.raises(LeaseLost):
        await warm.put_checkpoint(record(t, 2), [], strict=False, fence=old)
    assert await warm.next_fence(t) == new + 1


async def test_fencing_races_with_a_new_lease(warm: Any) -> None:
    """Writes racing a takeover either land before it or are refused; none after."""
    t = f"t-{uuid.uuid4()}"
    old = await warm.next_fence(t)
    await warm.put_checkpoint(record(t, 0), [], strict=False, fence=old)
    outcomes: list[str] = []

    async def stale(n: int) -> None:
        try:
            await warm.put_checkpoint(record(t, n, parent=0, ns=f"ns{n % 3}"), [],
                                      strict=False, fence=old)
            outcomes.append("stored")
        except LeaseLost:
            outcomes.append("refused")

    tasks = [asyncio.create_task(stale(n)) for n in range(1, 21)]
    new = await warm.next_fence(t)
    await asyncio.gather(*tasks)
    assert len(outcomes) == 20
    # after the takeover returned, the old token is refused everywhere
    for ns in ("", "ns0", "ns1", "ns2", "ns-new"):
        with pytest.raises(LeaseLost):
            await warm.put_checkpoint(record(t, 99, ns=ns), [], strict=False, fence=old)
    await warm.put_checkpoint(record(t, 100, ns="ns-new"), [], strict=False, fence=new)
    stored = {r.checkpoint_id async for r in warm.list(ListQuery(thread_id=t))}
    assert cid(99) not in stored and cid(100) in stored
    assert len(stored) == 2 + outcomes.count("stored")
    for ns in ("", "ns0", "ns1", "ns2", "ns-new"):  # no head names a refused checkpoint
        head = await warm.head(t, ns)
        assert head is None or await warm.get(t, ns, head.checkpoint_id) is not None, ns


@pytest.mark.parametrize("thread", HOSTILE_IDS[:5], ids=range(5))
async def test_fences_of_hostile_ids_are_separate(warm: Any, thread: str) -> None:
    other = f"{thread}-{uuid.uuid4()}"
    thread = f"{thread}-{uuid.uuid4()}"
    await warm.next_fence(thread)
    await warm.next_fence(thread)
    assert await warm.next_fence(other) == 1


async def test_leases_exclude_and_expire(hot: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    assert await hot.acquire_lease(t, "a", 0.3)
    assert not await hot.acquire_lease(t, "b", 0.3)
    assert await hot.renew_lease(t, "a", 0.3)
    assert not await hot.renew_lease(t, "b", 0.3)
    assert not await hot.release_lease(t, "b")
    await asyncio.sleep(0.45)
    assert not await hot.renew_lease(t, "a", 0.3)  # expired
    assert await hot.acquire_lease(t, "b", 5)
    assert not await hot.release_lease(t, "a")
    assert await hot.release_lease(t, "b")
    assert await hot.acquire_lease(t, "c", 5)
    assert await hot.release_lease(t, "c")


async def test_leases_survive_invalidation_and_are_per_thread(hot: Any) -> None:
    t, u = f"t-{uuid.uuid4()}", f"t-{uuid.uuid4()}"
    assert await hot.acquire_lease(t, "a", 5)
    assert await hot.acquire_lease(u, "a", 5)
    await hot.invalidate(t)
    assert not await hot.acquire_lease(t, "b", 5)
    assert await hot.release_lease(t, "a") and await hot.release_lease(u, "a")
