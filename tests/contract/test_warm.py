"""The WarmStore contract, run on every warm backend (see ``tests/stacks.py``)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.builders import cid, record, write
from tierstore.errors import InvalidInput, VersionConflict
from tierstore.records import BlobRecord, ListQuery, Payload

HOSTILE_IDS = [
    "*",
    "../../etc/passwd",
    "{$ne: 1}",
    "%",
    "'; DROP TABLE checkpoints; --",
    "a:b:c",
    "线程/スレッド/🧵",
    "x" * 10_000,
]


async def chain(warm: Any, thread: str, n: int, ns: str = "") -> None:
    for i in range(n):
        await warm.put_checkpoint(
            record(thread, i, parent=i - 1 if i else None, ns=ns), [], strict=False
        )


async def collect(warm: Any, **kw: Any) -> list[Any]:
    return [r async for r in warm.list(ListQuery(**kw))]


async def test_put_then_get_roundtrips_every_field(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    blob = BlobRecord("messages", "v1", Payload("msgpack+zstd", b"\x00\x01binary"))
    rec = record(t, 1, versions={"messages": "v1"})
    result = await warm.put_checkpoint(rec, [blob], strict=False)
    assert result.head.checkpoint_id == cid(1)
    assert result.head.version > 0
    got = await warm.get(t, "", cid(1))
    assert got is not None
    assert got.checkpoint == rec.checkpoint
    assert got.metadata == rec.metadata
    assert got.parent_id is None
    assert got.blobs == {"messages": blob.payload}
    assert got.writes == ()
    assert got.location == "warm"
    assert await warm.get(t, "", cid(2)) is None
    assert await warm.get(f"other-{t}", "", cid(1)) is None


async def test_latest_is_the_greatest_checkpoint_id(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 1)
    first = await warm.head(t, "")
    assert first is not None
    for n in (1, 2):
        await warm.put_checkpoint(record(t, n, parent=n - 1), [], strict=False)
    latest = await warm.get(t, "", None)
    assert latest is not None and latest.checkpoint_id == cid(2)
    assert latest.parent_id == cid(1)
    head = await warm.head(t, "")
    assert head is not None
    assert (head.checkpoint_id, head.version, head.n_writes) == (cid(2), first.version + 2, 0)


async def test_blobs_are_stored_once_per_channel_version(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    first = BlobRecord("a", "1", Payload("msgpack", b"first"))
    await warm.put_checkpoint(record(t, 1, versions={"a": "1"}), [first], strict=False)
    # the same (channel, version) again with other bytes must not overwrite
    again = BlobRecord("a", "1", Payload("msgpack", b"other"))
    await warm.put_checkpoint(record(t, 2, parent=1, versions={"a": "1"}), [again], strict=False)
    got = await warm.get(t, "", cid(2))
    assert got is not None and got.blobs["a"].data == b"first"
    # a checkpoint only sees the blob versions it names
    newer = BlobRecord("a", "2", Payload("msgpack", b"second"))
    await warm.put_checkpoint(record(t, 3, parent=2, versions={"a": "2"}), [newer], strict=False)
    old = await warm.get(t, "", cid(1))
    new = await warm.get(t, "", cid(3))
    assert old is not None and old.blobs["a"].data == b"first"
    assert new is not None and new.blobs["a"].data == b"second"


async def test_writes_are_idempotent_and_special_writes_replace(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1), [], strict=False)
    await warm.put_writes(t, "", cid(1), [write("task", 0, "first"), write("task", 1, "x")])
    await warm.put_writes(t, "", cid(1), [write("task", 0, "second")])
    await warm.put_writes(t, "", cid(1), [write("task", -3, "interrupt-1", "__interrupt__")])
    await warm.put_writes(t, "", cid(1), [write("task", -3, "interrupt-2", "__interrupt__")])
    got = await warm.get(t, "", cid(1))
    assert got is not None
    by_key = {(w.task_id, w.idx): w.payload.data for w in got.writes}
    assert by_key == {("task", 0): b"first", ("task", 1): b"x", ("task", -3): b"interrupt-2"}
    head = await warm.head(t, "")
    assert head is not None and head.n_writes == 3


async def test_new_checkpoint_starts_with_no_writes(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1), [], strict=False)
    await warm.put_writes(t, "", cid(1), [write("a", 0, "v")])
    await warm.put_checkpoint(record(t, 2, parent=1), [], strict=False)
    head = await warm.head(t, "")
    assert head is not None and head.n_writes == 0
    latest = await warm.get(t, "", None)
    assert latest is not None and latest.writes == ()
    older = await warm.get(t, "", cid(1))
    assert older is not None and len(older.writes) == 1


async def test_writes_to_older_checkpoint_do_not_touch_head_count(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 2)
    await warm.put_writes(t, "", cid(0), [write("a", 0, "v")])
    head = await warm.head(t, "")
    assert head is not None and head.checkpoint_id == cid(1) and head.n_writes == 0


async def test_strict_put_refuses_a_stale_parent_and_writes_nothing(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    first = (await warm.put_checkpoint(record(t, 1), [], strict=True)).head.version
    await warm.put_checkpoint(record(t, 2, parent=1), [], strict=True)
    with pytest.raises(VersionConflict) as info:
        await warm.put_checkpoint(record(t, 3, parent=1), [], strict=True)
    assert info.value.head_id == cid(2)
    assert info.value.version == first + 1
    assert await warm.get(t, "", cid(3)) is None
    head = await warm.head(t, "")
    assert head is not None and (head.checkpoint_id, head.version) == (cid(2), first + 1)


async def test_strict_first_write_must_have_no_parent(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    with pytest.raises(VersionConflict):
        await warm.put_checkpoint(record(t, 2, parent=1), [], strict=True)
    assert await warm.head(t, "") is None


async def test_permissive_put_reports_a_conflict(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 2)
    result = await warm.put_checkpoint(record(t, 5, parent=0), [], strict=False)
    assert result.conflict is True
    assert result.head.checkpoint_id == cid(5)
    ok = await warm.put_checkpoint(record(t, 6, parent=5), [], strict=False)
    assert ok.conflict is False


async def test_strict_race_has_exactly_one_winner(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1), [], strict=True)

    async def attempt(n: int) -> bool:
        try:
            await warm.put_checkpoint(record(t, n, parent=1), [], strict=True)
        except VersionConflict:
            return False
        return True

    results = await asyncio.gather(*(attempt(n) for n in range(10, 20)))
    assert sum(results) == 1
    ids = [r.checkpoint_id async for r in warm.list(ListQuery(thread_id=t))]
    assert len(ids) == 2


async def test_concurrent_permissive_puts_count_every_version(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    first = (await warm.put_checkpoint(record(t, 0), [], strict=False)).head.version
    await asyncio.gather(*(
        warm.put_checkpoint(record(t, n), [], strict=False) for n in range(1, 21)
    ))
    head = await warm.head(t, "")
    assert head is not None and head.version == first + 20 and head.checkpoint_id == cid(20)


async def test_list_newest_first_with_before_limit_and_filters(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    for i in range(5):
        await warm.put_checkpoint(
            record(t, i, parent=i - 1 if i else None,
                   doc={"step": i, "source": "input" if i % 2 else "loop", "flag": i == 3,
                        "score": 1.5 if i == 4 else None}),
            [], strict=False,
        )
    ids = [r.checkpoint_id for r in await collect(warm, thread_id=t)]
    assert ids == [cid(i) for i in (4, 3, 2, 1, 0)]
    assert [r.checkpoint_id for r in await collect(warm, thread_id=t, before_id=cid(3))] == [
        cid(2), cid(1), cid(0)]
    assert [r.checkpoint_id for r in await collect(warm, thread_id=t, limit=2)] == [
        cid(4), cid(3)]
    assert await collect(warm, thread_id=t, limit=0) == []
    src = await collect(warm, thread_id=t, filter={"source": "input"})
    assert [r.checkpoint_id for r in src] == [cid(3), cid(1)]
    both = await collect(warm, thread_id=t, filter={"source": "input", "step": 3})
    assert [r.checkpoint_id for r in both] == [cid(3)]
    assert [r.checkpoint_id for r in await collect(warm, thread_id=t, filter={"flag": True})] == [
        cid(3)]
    # True is not 1 and "1" is not 1: filters compare JSON values with their types
    assert await collect(warm, thread_id=t, filter={"step": True}) == []
    assert await collect(warm, thread_id=t, filter={"step": "1"}) == []
    assert [r.checkpoint_id for r in await collect(warm, thread_id=t, filter={"score": 1.5})] == [
        cid(4)]
    assert [r.checkpoint_id for r in await collect(warm, thread_id=t, filter={"score": None})] == [
        cid(3), cid(2), cid(1), cid(0)]
    assert await collect(warm, thread_id=t, filter={"missing": "x"}) == []


async def test_list_pages_through_long_histories(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 450)
    ids = [r.checkpoint_id for r in await collect(warm, thread_id=t)]
    assert ids == [cid(i) for i in reversed(range(450))]
    assert len(await collect(warm, thread_id=t, limit=321)) == 321


async def test_list_by_namespace_and_across_threads(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 2, ns="")
    await chain(warm, t, 3, ns="child:1")
    assert len(await collect(warm, thread_id=t)) == 5
    assert len(await collect(warm, thread_id=t, checkpoint_ns="child:1")) == 3
    assert len(await collect(warm, thread_id=t, checkpoint_ns="")) == 2
    one = await collect(warm, thread_id=t, checkpoint_ns="", checkpoint_id=cid(1))
    assert [r.checkpoint_id for r in one] == [cid(1)]
    everyone = await collect(warm, filter={"step": 2})
    assert any(r.thread_id == t and r.checkpoint_ns == "child:1" for r in everyone)


@pytest.mark.parametrize("thread", HOSTILE_IDS)
async def test_hostile_thread_ids_are_data(warm: Any, thread: str) -> None:
    neighbour = f"neighbour-{uuid.uuid4()}"
    await chain(warm, neighbour, 1)
    await chain(warm, thread, 2)
    got = await warm.get(thread, "", None)
    assert got is not None and got.thread_id == thread
    assert [r.thread_id for r in await collect(warm, thread_id=thread)] == [thread, thread]
    await warm.delete_thread(thread)
    assert await warm.get(thread, "", None) is None
    assert await warm.get(neighbour, "", None) is not None


async def test_delete_thread_removes_everything_of_that_thread_only(warm: Any) -> None:
    t, other = f"t-{uuid.uuid4()}", f"o-{uuid.uuid4()}"
    for thread in (t, other):
        await warm.put_checkpoint(
            record(thread, 1, versions={"a": "1"}),
            [BlobRecord("a", "1", Payload("msgpack", b"v"))], strict=False,
        )
        await warm.put_writes(thread, "", cid(1), [write("x", 0, "w")])
    await warm.delete_thread(t)
    assert await warm.get(t, "", None) is None
    assert await warm.head(t, "") is None
    kept = await warm.get(other, "", None)
    assert kept is not None and kept.blobs and kept.writes


async def test_delete_for_runs_moves_the_head_back(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1, run_id="run-a"), [], strict=False)
    await warm.put_checkpoint(record(t, 2, parent=1, run_id="run-b"), [], strict=False)
    await warm.put_writes(t, "", cid(2), [write("x", 0, "w")])
    touched = await warm.delete_for_runs(["run-b", "run-unknown"])
    assert list(touched) == [t]
    assert await warm.get(t, "", cid(2)) is None
    head = await warm.head(t, "")
    assert head is not None and head.checkpoint_id == cid(1) and head.version >= 3
    assert list(await warm.delete_for_runs([])) == []


async def test_copy_thread_copies_history_blobs_and_writes(warm: Any) -> None:
    src, dst = f"s-{uuid.uuid4()}", f"d-{uuid.uuid4()}"
    await warm.put_checkpoint(
        record(src, 1, versions={"a": "1"}),
        [BlobRecord("a", "1", Payload("msgpack", b"value"))], strict=False,
    )
    await warm.put_checkpoint(record(src, 2, parent=1, versions={"a": "1"}, ns="sub"),
                              [BlobRecord("a", "1", Payload("msgpack", b"value"))], strict=False)
    await warm.put_writes(src, "", cid(1), [write("x", 0, "w")])
    await warm.copy_thread(src, dst)
    copied = await warm.get(dst, "", None)
    assert copied is not None
    assert copied.blobs["a"].data == b"value"
    assert [w.payload.data for w in copied.writes] == [b"w"]
    assert (await warm.head(dst, "")) == (await warm.head(src, "")).__class__(
        cid(1), (await warm.head(dst, "")).version, 1)
    assert await warm.get(dst, "sub", cid(2)) is not None
    assert len(await collect(warm, thread_id=src)) == 2


async def test_publish_thread_refuses_a_target_with_checkpoints_unless_replace(
        warm: Any) -> None:
    src, dst = f"s-{uuid.uuid4()}", f"d-{uuid.uuid4()}"
    await chain(warm, src, 2)
    await warm.put_writes(src, "", cid(1), [write("x", 0, "imported")])
    await warm.put_checkpoint(record(dst, 5, versions={"a": "9"}),
                              [BlobRecord("a", "9", Payload("msgpack", b"theirs"))], strict=False)
    await warm.put_writes(dst, "", cid(5), [write("y", 0, "theirs")])
    with pytest.raises(InvalidInput, match="already exists"):
        await warm.publish_thread(src, dst, replace=False)
    assert [r.checkpoint_id for r in await collect(warm, thread_id=dst)] == [cid(5)]
    await warm.publish_thread(src, dst, replace=True)
    assert [r.checkpoint_id for r in await collect(warm, thread_id=dst)] == [cid(1), cid(0)]
    got = await warm.get(dst, "", cid(1))
    assert got is not None and [w.payload.data for w in got.writes] == [b"imported"]
    head = await warm.head(dst, "")
    assert head is not None and head.checkpoint_id == cid(1)
    fresh = f"f-{uuid.uuid4()}"
    await warm.publish_thread(src, fresh, replace=False)
    assert len(await collect(warm, thread_id=fresh)) == 2


async def test_prune_keep_latest_and_delete(warm: Any) -> None:
    t, u = f"t-{uuid.uuid4()}", f"u-{uuid.uuid4()}"
    await chain(warm, t, 4)
    await chain(warm, t, 2, ns="child")
    await chain(warm, u, 3)
    await warm.put_writes(t, "", cid(3), [write("x", 0, "w")])
    await warm.prune([t], keep_latest=True)
    assert [r.checkpoint_id for r in await collect(warm, thread_id=t, checkpoint_ns="")] == [
        cid(3)]
    assert [r.checkpoint_id for r in await collect(warm, thread_id=t, checkpoint_ns="child")] == [
        cid(1)]
    latest = await warm.get(t, "", None)
    assert latest is not None and len(latest.writes) == 1
    assert len(await collect(warm, thread_id=u)) == 3
    await warm.prune([t, u], keep_latest=False)
    assert await collect(warm, thread_id=t) == []
    assert await collect(warm, thread_id=u) == []


async def test_setup_is_idempotent(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 1)
    await warm.setup()
    assert await warm.get(t, "", None) is not None
