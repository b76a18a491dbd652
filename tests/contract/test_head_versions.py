"""Every change to a head advances its version in warm, on every warm backend.

A cached copy of the latest checkpoint is served only while it carries the head's
current version, so any change that a count of writes or the checkpoint id cannot
see (a negative-index write replacing another, an archive move) must move it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from tests.builders import cid, record, write
from tierstore.records import BlobRecord, Payload

from .test_warm import chain


async def version(warm: Any, t: str, ns: str = "") -> int:
    head = await warm.head(t, ns)
    assert head is not None
    return int(head.version)


async def test_put_writes_returns_and_advances_the_version(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 2)
    before = await version(warm, t)
    got = await warm.put_writes(t, "", cid(1), [write("node", 0, "a")])
    assert got == before + 1 == await version(warm, t)
    # the same (task, idx >= 0) again stores nothing new, yet the version never goes back
    again = await warm.put_writes(t, "", cid(1), [write("node", 0, "a")])
    assert again is not None and again >= got
    assert await version(warm, t) == again


async def test_a_replacing_interrupt_write_advances_the_version(warm: Any) -> None:
    """Interrupt/resume writes (idx < 0) replace each other: same count, new content."""
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 1)
    first = await warm.put_writes(t, "", cid(0), [write("node", -3, "answer-1", "__interrupt__")])
    head = await warm.head(t, "")
    assert head is not None and (head.version, head.n_writes) == (first, 1)
    cached = await warm.get(t, "", None)
    assert cached is not None and cached.version == first

    second = await warm.put_writes(t, "", cid(0),
                                   [write("node", -3, "answer-2", "__interrupt__")])
    head = await warm.head(t, "")
    assert head is not None and head.n_writes == 1  # the count cannot tell
    assert second is not None and first is not None and second > first
    assert head.version == second != cached.version
    latest = await warm.get(t, "", None)
    assert latest is not None and latest.version == second
    assert [w.payload.data for w in latest.writes] == [b"answer-2"]


async def test_writes_against_an_older_checkpoint_leave_the_head_version(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 2)
    before = await version(warm, t)
    assert await warm.put_writes(t, "", cid(0), [write("late", 0, "x")]) is None
    assert await version(warm, t) == before


async def test_the_latest_checkpoint_carries_the_version_it_was_read_at(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    result = await warm.put_checkpoint(record(t, 1), [], strict=False)
    latest = await warm.get(t, "", None)
    assert latest is not None and latest.version == result.head.version > 0
    await warm.put_writes(t, "", cid(1), [write("a", 0, "v")])
    latest = await warm.get(t, "", None)
    assert latest is not None and latest.version == await version(warm, t)
    assert len(latest.writes) == 1


async def test_moving_a_heads_data_to_cold_advances_the_version(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1, versions={"a": "1"}),
                              [BlobRecord("a", "1", Payload("msgpack", b"v"))], strict=False)
    await warm.put_writes(t, "", cid(1), [write("task", 0, "w")])
    full = await warm.get(t, "", None)
    assert full is not None
    before = await version(warm, t)
    now = time.time()
    await warm.claim(owner="me", now=now, lease_seconds=60, limit=1000, idle_before=now + 1,
                     thread_id=t)
    assert await warm.mark_archived(t, "", [cid(1)], archive_key="seg", owner="me",
                                    now=now) == 1
    archived = await version(warm, t)
    assert archived > before
    # a lost lease moves nothing, so it changes nothing either
    assert await warm.mark_archived(t, "", [cid(1)], archive_key="seg", owner="other",
                                    now=now) == 0
    assert await version(warm, t) == archived
    assert await warm.rehydrate([full]) == 1
    assert await version(warm, t) > archived


async def test_delete_prune_and_copy_advance_the_version(warm: Any) -> None:
    t, src = f"t-{uuid.uuid4()}", f"s-{uuid.uuid4()}"
    for i in range(3):
        await warm.put_checkpoint(record(t, i, parent=i - 1 if i else None, run_id=f"r{i}-{t}"),
                                  [], strict=False)
    v = await version(warm, t)
    await warm.delete_for_runs([f"r2-{t}"])
    head = await warm.head(t, "")
    assert head is not None and head.checkpoint_id == cid(1) and head.version > v
    v = head.version
    await warm.prune([t], keep_latest=True)
    assert await version(warm, t) > v
    v = await version(warm, t)
    await chain(warm, src, 3)
    await warm.copy_thread(src, t)
    head = await warm.head(t, "")
    assert head is not None and head.checkpoint_id == cid(2) and head.version > v


async def test_a_recreated_namespace_never_repeats_a_version(warm: Any) -> None:
    """Deleting drops the head; copying the thread back, or writing it again, makes a
    new one. Its versions must start above every version the old one had, or a copy
    cached before the delete could pass for the new head."""
    t, backup = f"t-{uuid.uuid4()}", f"b-{uuid.uuid4()}"
    await chain(warm, t, 2)
    await warm.put_writes(t, "", cid(1), [write("node", -3, "old")])
    seen = await version(warm, t)
    await warm.copy_thread(t, backup)
    await warm.delete_thread(t)
    assert await warm.head(t, "") is None
    await warm.copy_thread(backup, t)
    restored = await version(warm, t)
    assert restored > seen
    await warm.delete_thread(t)
    result = await warm.put_checkpoint(record(t, 1), [], strict=False)
    assert result.head.checkpoint_id == cid(1) and result.head.version > restored
    await warm.prune([t], keep_latest=False)
    await warm.put_writes(t, "", cid(1), [write("node", -3, "new")])
    await warm.put_checkpoint(record(t, 1), [], strict=False)
    assert await version(warm, t) > result.head.version
