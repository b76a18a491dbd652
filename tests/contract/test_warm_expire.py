"""Retention's conditional delete: a thread changed after its claim is never expired."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from tests.builders import cid, record
from tierstore.records import Payload, WriteRecord

from .test_warm import chain, collect


async def claimed(warm: Any, thread: str, now: float) -> list[Any]:
    claims = await warm.claim(owner="ret", now=now, lease_seconds=60, limit=10,
                              idle_before=now + 1, require_live=False, thread_id=thread)
    assert {c.thread_id for c in claims} == {thread}
    return list(claims)


@pytest.mark.parametrize("keep_latest", [False, True])
async def test_a_checkpoint_committed_after_the_claim_keeps_the_thread(
    warm: Any, keep_latest: bool
) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 2)
    now = time.time()
    claims = await claimed(warm, t, now)
    # the user comes back between the claim and the delete
    await warm.put_checkpoint(record(t, 2, parent=1), [], strict=False)
    assert not await warm.expire_thread(t, claims, owner="ret", now=now,
                                        keep_latest=keep_latest)
    assert [r.checkpoint_id for r in await collect(warm, thread_id=t)] == [cid(2), cid(1),
                                                                          cid(0)]


async def test_a_pending_write_stored_after_the_claim_keeps_the_thread(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 1)
    now = time.time()
    claims = await claimed(warm, t, now)
    await warm.put_writes(t, "", cid(0), [WriteRecord("task", 0, "ch", Payload("m", b"w"))])
    assert not await warm.expire_thread(t, claims, owner="ret", now=now, keep_latest=False)
    got = await warm.get(t, "", None)
    assert got is not None and [w.payload.data for w in got.writes] == [b"w"]


async def test_a_namespace_not_claimed_keeps_the_thread(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 1)
    now = time.time()
    claims = await claimed(warm, t, now)
    await chain(warm, t, 1, ns="sub")  # a namespace written after the claim
    assert not await warm.expire_thread(t, claims, owner="ret", now=now, keep_latest=False)
    assert len(await collect(warm, thread_id=t)) == 2


async def test_a_lease_not_held_keeps_the_thread(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 1)
    now = time.time()
    claims = await claimed(warm, t, now)
    assert not await warm.expire_thread(t, claims, owner="other", now=now, keep_latest=False)
    assert not await warm.expire_thread(t, claims, owner="ret", now=now + 61,
                                        keep_latest=False)  # the lease ran out
    assert len(await collect(warm, thread_id=t)) == 1


async def test_an_unchanged_thread_is_deleted_or_pruned(warm: Any) -> None:
    gone, pruned = f"t-{uuid.uuid4()}", f"t-{uuid.uuid4()}"
    await chain(warm, gone, 2)
    await chain(warm, pruned, 3)
    now = time.time()
    assert await warm.expire_thread(gone, await claimed(warm, gone, now), owner="ret",
                                    now=now, keep_latest=False)
    assert await collect(warm, thread_id=gone) == []
    assert await warm.head(gone, "") is None
    assert await warm.expire_thread(pruned, await claimed(warm, pruned, now), owner="ret",
                                    now=now, keep_latest=True)
    assert [r.checkpoint_id for r in await collect(warm, thread_id=pruned)] == [cid(2)]
