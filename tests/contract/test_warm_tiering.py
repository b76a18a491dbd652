"""The tiering half of the WarmStore contract: leases, stubs, rehydration, usage."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from tests.builders import cid, record
from tierstore.errors import InvalidInput, MissingBlobs
from tierstore.records import BlobRecord, ListQuery, Payload, WriteRecord

from .test_warm import chain
from .test_warm_missing_blob import drop_any_blob


async def test_claim_leases_each_head_to_one_owner(warm: Any) -> None:
    threads = [f"t-{uuid.uuid4()}" for _ in range(6)]
    for t in threads:
        await chain(warm, t, 3)
    now = time.time() + 1000  # every checkpoint is "old"
    results = await asyncio.gather(*(
        warm.claim(owner=f"w{i}", now=now, lease_seconds=60, limit=100, warm_before=now)
        for i in range(4)
    ))
    claimed = [(c.thread_id, c.checkpoint_ns) for batch in results for c in batch
               if c.thread_id in threads]
    assert sorted(claimed) == sorted((t, "") for t in threads)  # all claimed, none twice
    again = await warm.claim(owner="late", now=now, lease_seconds=60, limit=100,
                             warm_before=now)
    assert not [c for c in again if c.thread_id in threads]
    expired = await warm.claim(owner="later", now=now + 61, lease_seconds=60, limit=100,
                               warm_before=now)
    assert {c.thread_id for c in expired} >= set(threads)


async def test_release_owned_gives_back_every_claim_of_one_owner_only(warm: Any) -> None:
    threads = [f"t-{uuid.uuid4()}" for _ in range(4)]
    for t in threads:
        await chain(warm, t, 2)
    now = time.time() + 1000
    lost = f"lost-{uuid.uuid4().hex[:8]}"
    mine = await warm.claim(owner=lost, now=now, lease_seconds=600, limit=100, warm_before=now,
                            thread_id=threads[0])
    mine += await warm.claim(owner=lost, now=now, lease_seconds=600, limit=100,
                             warm_before=now, thread_id=threads[1])
    other = await warm.claim(owner="other", now=now, lease_seconds=600, limit=100,
                             warm_before=now, thread_id=threads[2])
    assert len(mine) == 2 and len(other) == 1
    assert await warm.release_owned(owner=lost) == 2
    assert await warm.release_owned(owner=lost) == 0  # nothing left: idempotent
    again = await warm.claim(owner="next", now=now, lease_seconds=600, limit=100,
                             warm_before=now)
    assert {c.thread_id for c in again} & set(threads) == {threads[0], threads[1], threads[3]}


async def test_claim_filters_by_age_and_idleness(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 1)  # only the head: nothing to demote
    now = time.time() + 1000
    mine = [c for c in await warm.claim(owner="a", now=now, lease_seconds=1, limit=1000,
                                        warm_before=now) if c.thread_id == t]
    assert mine == []
    idle = [c for c in await warm.claim(owner="a", now=now, lease_seconds=1, limit=1000,
                                        idle_before=now) if c.thread_id == t]
    assert [c.head_id for c in idle] == [cid(0)]
    fresh = [c for c in await warm.claim(owner="b", now=now + 5, lease_seconds=1, limit=1000,
                                         idle_before=time.time() - 1000) if c.thread_id == t]
    assert fresh == []


async def test_mark_archived_needs_the_lease_and_keeps_stubs_listable(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    for i in range(3):
        await warm.put_checkpoint(
            record(t, i, parent=i - 1 if i else None, versions={"a": str(i), "keep": "0"},
                   run_id=f"run-{i}"),
            [BlobRecord("a", str(i), Payload("msgpack", f"a{i}".encode())),
             *([BlobRecord("keep", "0", Payload("msgpack", b"shared"))] if i == 0 else [])],
            strict=False,
        )
        await warm.put_writes(t, "", cid(i), [WriteRecord("task", 0, "ch", Payload("m", b"w"))])
    now = time.time()
    assert await warm.mark_archived(t, "", [cid(0)], archive_key="k0", owner="nobody",
                                    now=now) == 0
    [claim] = [c for c in await warm.claim(owner="me", now=now, lease_seconds=60, limit=1000,
                                           warm_before=now + 1) if c.thread_id == t]
    assert claim.head_id == cid(2)
    assert await warm.mark_archived(t, "", [cid(0), cid(1)], archive_key="seg-1", owner="me",
                                    now=now) == 2
    assert await warm.mark_archived(t, "", [cid(0)], archive_key="seg-x", owner="me",
                                    now=now) == 0  # already a stub
    stub = await warm.get(t, "", cid(0))
    assert stub is not None and stub.location == "archived" and stub.archive_key == "seg-1"
    assert stub.writes == ()
    live = await warm.get(t, "", cid(2))
    assert live is not None and live.location == "warm"
    assert live.blobs["keep"].data == b"shared"  # still needed by the live head
    listed = [r async for r in warm.list(ListQuery(thread_id=t))]
    assert [(r.checkpoint_id, r.location) for r in listed] == [
        (cid(2), "warm"), (cid(1), "archived"), (cid(0), "archived")]
    filtered = [r async for r in warm.list(ListQuery(thread_id=t, filter={"step": 1}))]
    assert [r.checkpoint_id for r in filtered] == [cid(1)]
    index = await warm.index(t, "")
    assert [(m.checkpoint_id, m.location, m.archive_key) for m in index] == [
        (cid(2), "warm", None), (cid(1), "archived", "seg-1"), (cid(0), "archived", "seg-1")]
    assert (await warm.archive_refs(t)) == {"seg-1": 2}
    await warm.release(t, "", owner="me")


async def test_rehydrate_restores_payload_blobs_and_writes(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    blob = BlobRecord("a", "1", Payload("msgpack", b"value"))
    await warm.put_checkpoint(record(t, 1, versions={"a": "1"}), [blob], strict=False)
    await warm.put_writes(t, "", cid(1), [WriteRecord("task", 0, "ch", Payload("m", b"w"))])
    full = await warm.get(t, "", cid(1))
    assert full is not None
    now = time.time()
    await warm.claim(owner="me", now=now, lease_seconds=60, limit=1000, idle_before=now + 1)
    assert await warm.mark_archived(t, "", [cid(1)], archive_key="seg", owner="me",
                                    now=now) == 1
    stub = await warm.get(t, "", None)
    assert stub is not None and stub.location == "archived" and stub.blobs == {}
    assert await warm.rehydrate([full]) == 1
    back = await warm.get(t, "", None)
    assert back is not None and back.location == "warm" and back.archive_key is None
    assert back.checkpoint == full.checkpoint and back.blobs == full.blobs
    assert back.writes == full.writes
    head = await warm.head(t, "")
    assert head is not None and head.n_writes == 1
    assert await warm.rehydrate([full]) == 0  # already live
    assert await warm.archive_refs(t) == {}


async def test_usage_counts_threads_live_and_archived(warm: Any) -> None:
    before = await warm.usage()
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 3)
    after = await warm.usage()
    assert after.threads == before.threads + 1
    assert after.checkpoints == before.checkpoints + 3
    assert after.bytes > before.bytes


async def test_stubs_are_found_by_key_and_run_and_repointed(warm: Any) -> None:
    t, other = f"t-{uuid.uuid4()}", f"t-{uuid.uuid4()}"
    for thread, key in ((t, "seg-a"), (other, "seg-b")):
        for i in range(3):
            await warm.put_checkpoint(
                record(thread, i, parent=i - 1 if i else None, run_id=f"run-{i % 2}"), [],
                strict=False)
        now = time.time()
        await warm.claim(owner="me", now=now, lease_seconds=60, limit=1000,
                         idle_before=now + 1, thread_id=thread)
        assert await warm.mark_archived(thread, "", [cid(0), cid(1), cid(2)], archive_key=key,
                                        owner="me", now=now) == 3
        await warm.release(thread, "", owner="me")
    # scoped lookups: by key (of any thread), by thread and key, never more than asked
    assert await warm.archive_refs(keys=["seg-a", "nowhere"]) == {"seg-a": 3}
    assert await warm.archive_refs(other, keys=["seg-a", "seg-b"]) == {"seg-b": 3}
    assert await warm.archive_refs(keys=[]) == {}
    by_run = await warm.archive_stubs(run_ids=["run-1"])
    assert {k: v for k, v in by_run.items() if k in ("seg-a", "seg-b")} == {
        "seg-a": {cid(1)}, "seg-b": {cid(1)}}
    assert await warm.archive_stubs(run_ids=[]) == {}
    assert await warm.archive_stubs(keys=["seg-b", "nowhere"]) == {
        "seg-b": {cid(0), cid(1), cid(2)}}
    assert await warm.archive_stubs(keys=["seg-a", "seg-b"], run_ids=["run-0"]) == {
        "seg-a": {cid(0), cid(2)}, "seg-b": {cid(0), cid(2)}}
    with pytest.raises(InvalidInput):
        await warm.archive_stubs()
    # only the listed checkpoints move; the others keep naming the old segment
    assert await warm.repoint_archive("seg-a", "seg-a2", [cid(0), cid(2)]) == 2
    assert await warm.archive_refs(t) == {"seg-a": 1, "seg-a2": 2}
    assert await warm.archive_refs(other) == {"seg-b": 3}
    stub = await warm.get(t, "", cid(2))
    assert stub is not None and stub.location == "archived" and stub.archive_key == "seg-a2"


async def test_a_write_stored_after_the_segment_was_packed_stays_on_the_stub(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1), [], strict=False)
    await warm.put_writes(t, "", cid(1), [WriteRecord("task", 0, "ch", Payload("m", b"old")),
                                          WriteRecord("task", -3, "ch", Payload("m", b"i1"))])
    packed = await warm.get(t, "", cid(1))
    assert packed is not None and len(packed.writes) == 2
    # the app's next writes land between the job's read and its mark
    await warm.put_writes(t, "", cid(1), [WriteRecord("late", 0, "ch", Payload("m", b"new")),
                                          WriteRecord("task", -3, "ch", Payload("m", b"i2"))])
    now = time.time()
    await warm.claim(owner="me", now=now, lease_seconds=60, limit=1000, idle_before=now + 1)
    assert await warm.mark_archived(t, "", [cid(1)], archive_key="seg", owner="me", now=now,
                                    writes={cid(1): packed.writes}) == 1
    stub = await warm.get(t, "", cid(1))
    assert stub is not None and stub.location == "archived"
    assert sorted((w.task_id, w.idx, w.payload.data) for w in stub.writes) == [
        ("late", 0, b"new"), ("task", -3, b"i2")]  # what the segment lacks stays in warm


async def test_a_put_naming_a_version_warm_dropped_is_refused_whole(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    blobs = [BlobRecord("a", "1", Payload("msgpack", b"a1")),
             BlobRecord("e", "1", Payload("empty", b""))]
    await warm.put_checkpoint(record(t, 1, versions={"a": "1", "e": "1"}), blobs, strict=False)
    now = time.time()
    await warm.claim(owner="me", now=now, lease_seconds=60, limit=1000, idle_before=now + 1)
    assert await warm.mark_archived(t, "", [cid(1)], archive_key="seg", owner="me",
                                    now=now) == 1
    await warm.release(t, "", owner="me")
    child = record(t, 2, parent=1, versions={"a": "1", "e": "1", "b": "2"})
    new = [BlobRecord("b", "2", Payload("msgpack", b"b2"))]
    refused: MissingBlobs | None = None
    try:
        await warm.put_checkpoint(child, new, strict=False)
    except MissingBlobs as exc:
        refused = exc
    if refused is not None:
        assert sorted(refused.missing) == [("a", "1"), ("e", "1")]
        assert await warm.get(t, "", cid(2)) is None  # nothing of it was written
        head = await warm.head(t, "")
        assert head is not None and head.checkpoint_id == cid(1)
        await warm.put_checkpoint(child, [*new, *blobs], strict=False)  # supplied: stored
    # else: the store still held them (Mongo collects blobs after a grace period
    # only); the check then keeps them from being collected under the child
    got = await warm.get(t, "", cid(2))
    assert got is not None and got.blobs["a"].data == b"a1" and got.blobs["b"].data == b"b2"
    assert got.location == "warm"
    # the empty channel still counts, on the common path too (a live parent names it)
    grandchild = record(t, 3, parent=2, versions={"a": "1", "e": "1", "b": "2"})
    await warm.put_checkpoint(grandchild, [], strict=False)


async def test_mark_archived_is_all_or_nothing_when_a_packed_checkpoint_was_deleted(
    warm: Any,
) -> None:
    """A delete that lands between packing and marking must not leave its checkpoint in a
    segment that stubs name: the mark moves nothing and the job drops its segment."""
    t = f"t-{uuid.uuid4()}"
    for i in range(3):
        await warm.put_checkpoint(record(t, i, parent=i - 1 if i else None, run_id=f"run-{i}"),
                                  [], strict=False)
    now = time.time()
    await warm.claim(owner="me", now=now, lease_seconds=60, limit=1000,
                     idle_before=now + 1, thread_id=t)
    # the worker packed cid(0) and cid(1); then the app deletes run-0
    await warm.delete_for_runs(["run-0"])
    assert await warm.mark_archived(t, "", [cid(0), cid(1)], archive_key="seg", owner="me",
                                    now=now) == 0
    assert await warm.archive_refs(t) == {}
    kept = await warm.get(t, "", cid(1))
    assert kept is not None and kept.location == "warm"
    assert await warm.get(t, "", cid(0)) is None


async def test_get_live_reads_a_segment_as_get_reads_each_of_its_checkpoints(warm: Any) -> None:
    """What an archive move packs: every live checkpoint asked for, with the channel
    values it names (one value named by several checkpoints, an empty channel) and its
    pending writes, exactly as ``get`` returns it; stubs and unknown ids left out."""
    t = f"t-{uuid.uuid4()}"
    values = {"shared": BlobRecord("shared", "1", Payload("msgpack", b"named by all")),
              "empty": BlobRecord("empty", "1", Payload("empty", b""))}
    for i in range(5):
        own = BlobRecord("own", str(i), Payload("msgpack", f"own-{i}".encode()))
        await warm.put_checkpoint(
            record(t, i, parent=i - 1 if i else None,
                   versions={"shared": "1", "empty": "1", "own": str(i)}),
            [own, *values.values()] if i == 0 else [own], strict=False)
        await warm.put_writes(t, "", cid(i), [
            WriteRecord("task", 0, "ch", Payload("m", f"w{i}".encode())),
            WriteRecord("task", 1, "ch", Payload("m", f"x{i}".encode()), "path")])
    await warm.put_checkpoint(record(f"other-{t}", 1, versions={"own": "1"}), [
        BlobRecord("own", "1", Payload("msgpack", b"not this thread's"))], strict=False)
    now = time.time()
    await warm.claim(owner="me", now=now, lease_seconds=60, limit=1000, idle_before=now + 1,
                     thread_id=t)
    assert await warm.mark_archived(t, "", [cid(1)], archive_key="seg", owner="me",
                                    now=now) == 1

    def plain(r: Any) -> Any:
        return (r.checkpoint_id, r.parent_id, r.checkpoint, r.metadata, dict(r.blobs),
                sorted(r.writes, key=lambda w: (w.task_id, w.idx)), r.location, r.missing)

    asked = [cid(4), cid(0), cid(1), cid(3), cid(9)]
    got = await warm.get_live(t, "", asked)
    expected = [await warm.get(t, "", c) for c in (cid(0), cid(3), cid(4))]
    assert [plain(r) for r in got] == [plain(r) for r in expected]
    assert {r.blobs["shared"].data for r in got} == {b"named by all"}
    assert [r.blobs["own"].data for r in got] == [b"own-0", b"own-3", b"own-4"]
    assert [len(r.writes) for r in got] == [2, 2, 2]
    assert all(r.thread_id == t and r.checkpoint_ns == "" for r in got)
    assert await warm.get_live(t, "", []) == []
    assert await warm.get_live(t, "", [cid(1)]) == []
    assert await warm.get_live(f"nobody-{t}", "", [cid(0)]) == []


async def test_index_brings_the_metadata_of_the_checkpoint_asked_for(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 3)
    plain = await warm.index(t, "")
    assert [m.metadata for m in plain] == [None, None, None]
    index = await warm.index(t, "", metadata_of=cid(2))
    assert [(m.checkpoint_id, m.metadata) for m in index] == [
        (cid(2), Payload("msgpack", b"md-2")), (cid(1), None), (cid(0), None)]
    assert [m.metadata for m in await warm.index(t, "", metadata_of=cid(7))] == [None] * 3


async def test_get_live_names_a_lost_value_as_get_does(warm: Any) -> None:
    """A segment must never be packed from a checkpoint that lost a value (it would read
    back from cold without it, and no error): ``get_live`` flags it as ``get`` does, on
    every backend for a delta chain's link, which is never empty."""
    t = f"t-{uuid.uuid4()}"
    versions = {"log": "1", "~0~items": "4"}
    await warm.put_checkpoint(record(t, 1, versions=versions), [
        BlobRecord("log", "1", Payload("msgpack", b"hi")),
        BlobRecord("~0~items", "4", Payload("msgpack+delta", b"snapshot"))], strict=False)
    await warm.put_checkpoint(record(t, 2, parent=1, versions=versions), [], strict=False)
    await drop_any_blob(warm, t, "~0~items")
    got = await warm.get_live(t, "", [cid(1), cid(2)])
    assert [(r.checkpoint_id, r.missing) for r in got] == [
        (cid(1), ("~0~items",)), (cid(2), ("~0~items",))]
    read = [await warm.get(t, "", c) for c in (cid(1), cid(2))]
    assert [r.missing for r in got] == [r.missing for r in read if r is not None]
