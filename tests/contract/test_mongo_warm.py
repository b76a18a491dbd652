"""MongoDB warm tier: GridFS offload, document sizes, crash ordering, collection of leftovers.

Runs on mongomock-motor by default and on a real server when
``TIERSTORE_TEST_MONGO_URL`` is set (see ``tests/servers/mongo.py``). Assertions only
look at documents and files of the test's own threads, so a shared database is fine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import bson
import pytest
from bson.errors import InvalidDocument
from gridfs.errors import NoFile
from pymongo.errors import (
    ConfigurationError as MongoConfigurationError,
)
from pymongo.errors import (
    DocumentTooLarge,
    OperationFailure,
    ServerSelectionTimeoutError,
)

from tests.builders import blob, cid, write
from tests.builders import record as rec
from tests.servers.mongo import MongoTarget
from tierstore.errors import (
    ConfigurationError,
    CorruptPayload,
    InvalidInput,
    LeaseLost,
    LifecycleError,
    PayloadTooLarge,
    StorageError,
    TierUnavailable,
    VersionConflict,
)
from tierstore.migrate import Migration
from tierstore.records import CheckpointRecord, ListQuery, Payload
from tierstore.settings import StoreUrl
from tierstore.tiers import open_store
from tierstore.tiers.mongo import (
    COLLECTIONS,
    DOCUMENT_BUDGET,
    MAX_DOCUMENT,
    MongoWarm,
    filter_entry,
    fit_document,
)
from tierstore.tiers.mongo.connection import client_url, translate
from tierstore.tiers.mongo.migrations import index_specs

KIB = 1024
MIB = 1024 * 1024


@pytest.fixture
async def store(mongo_db: MongoTarget) -> AsyncIterator[MongoWarm]:
    warm = mongo_db.store(offload_threshold=4 * KIB)
    await warm.setup()
    try:
        yield warm
    finally:
        await warm.aclose()


async def docs_of(mongo_db: MongoTarget, collection: str, thread: str) -> list[dict[str, Any]]:
    async with mongo_db.inspect() as raw:
        found: list[dict[str, Any]] = await raw[COLLECTIONS[collection]].find(
            {"thread_id": thread}).to_list(None)
        return found


async def file_ids_of(mongo_db: MongoTarget, thread: str) -> set[Any]:
    """GridFS file ids referenced by any document of ``thread``."""
    out: set[Any] = set()
    for collection, fields in (("checkpoints", ("checkpoint", "metadata")),
                               ("blobs", ("payload",)), ("writes", ("payload",))):
        for doc in await docs_of(mongo_db, collection, thread):
            out.update(doc[f]["gridfs"] for f in fields
                       if isinstance(doc.get(f), dict) and "gridfs" in doc[f])
    return out


async def existing_files(mongo_db: MongoTarget, ids: set[Any]) -> set[Any]:
    async with mongo_db.inspect() as raw:
        found = await raw[COLLECTIONS["gridfs_files"]].find(
            {"_id": {"$in": list(ids)}}, {"_id": 1}).to_list(None)
    return {f["_id"] for f in found}


async def files_named(mongo_db: MongoTarget, data: bytes) -> int:
    async with mongo_db.inspect() as raw:
        digest = hashlib.sha256(data).hexdigest()
        count: int = await raw[COLLECTIONS["gridfs_files"]].count_documents(
            {"metadata.sha256": digest})
        return count


# -- offload --------------------------------------------------------------------------


async def test_large_payloads_go_to_gridfs_small_ones_stay_inline(
    store: MongoWarm, mongo_db: MongoTarget
) -> None:
    t = f"t-{uuid.uuid4()}"
    big_cp, big_blob, big_write = os.urandom(10 * KIB), os.urandom(9 * KIB), os.urandom(8 * KIB)
    await store.put_checkpoint(
        rec(t, 1, checkpoint=big_cp, versions={"big": "1", "small": "1"}),
        [blob("big", "1", big_blob), blob("small", "1", b"tiny")], strict=False,
    )
    await store.put_writes(t, "", cid(1), [write("task", 0, big_write), write("task", 1, b"w")])

    [cp] = await docs_of(mongo_db, "checkpoints", t)
    assert set(cp["checkpoint"]) == {"tag", "gridfs", "sha256", "size"}
    assert cp["checkpoint"]["sha256"] == hashlib.sha256(big_cp).hexdigest()
    assert cp["checkpoint"]["size"] == len(big_cp)
    assert bytes(cp["metadata"]["data"]) == b"md-1"
    blobs = {b["channel"]: b for b in await docs_of(mongo_db, "blobs", t)}
    assert "gridfs" in blobs["big"]["payload"] and "gridfs" not in blobs["small"]["payload"]
    writes = {w["idx"]: w for w in await docs_of(mongo_db, "writes", t)}
    assert "gridfs" in writes[0]["payload"] and bytes(writes[1]["payload"]["data"]) == b"w"
    assert len(await existing_files(mongo_db, await file_ids_of(mongo_db, t))) == 3

    got = await store.get(t, "", None)
    assert got is not None
    assert got.checkpoint == Payload("msgpack", big_cp)
    assert got.blobs == {"big": Payload("msgpack+zstd", big_blob),
                         "small": Payload("msgpack+zstd", b"tiny")}
    assert {w.idx: w.payload.data for w in got.writes} == {0: big_write, 1: b"w"}
    [listed] = [r async for r in store.list(ListQuery(thread_id=t))]
    assert listed.blobs["big"].data == big_blob


async def test_several_large_payloads_in_one_document_stay_under_16_mib(
    mongo_db: MongoTarget,
) -> None:
    # With the threshold at its maximum no payload is "large" on its own, yet the two
    # together would overflow one document: the larger must move to GridFS.
    warm = mongo_db.store(offload_threshold=DOCUMENT_BUDGET)
    await warm.setup()
    try:
        t = f"t-{uuid.uuid4()}"
        checkpoint, metadata = os.urandom(9 * MIB), os.urandom(8 * MIB)
        await warm.put_checkpoint(rec(t, 1, checkpoint=checkpoint, metadata=metadata), [],
                                  strict=False)
        [doc] = await docs_of(mongo_db, "checkpoints", t)
        assert len(bson.encode(doc)) < MAX_DOCUMENT
        assert "gridfs" in doc["checkpoint"] and "data" in doc["metadata"]
        # one payload bigger than a document goes out whatever the threshold
        huge = os.urandom(17 * MIB)
        await warm.put_writes(t, "", cid(1), [write("task", 0, huge)])
        [w] = await docs_of(mongo_db, "writes", t)
        assert "gridfs" in w["payload"] and len(bson.encode(w)) < MAX_DOCUMENT
        got = await warm.get(t, "", cid(1))
        assert got is not None
        assert (got.checkpoint.data, got.metadata.data) == (checkpoint, metadata)
        assert got.writes[0].payload.data == huge
    finally:
        await warm.aclose()


def test_fit_document_offloads_the_largest_until_it_fits() -> None:
    sizes = {"a": 600, "b": 500, "c": 100}
    assert fit_document(100, sizes, threshold=10_000, budget=2_000) == []
    assert fit_document(100, sizes, threshold=550, budget=2_000) == ["a"]
    # nothing over the threshold, but a + b + c + base exceeds the budget
    assert fit_document(100, sizes, threshold=10_000, budget=1_000) == ["a"]
    assert fit_document(100, sizes, threshold=10_000, budget=700) == ["a", "b"]
    with pytest.raises(PayloadTooLarge):
        fit_document(900, sizes, threshold=10_000, budget=1_000)


# -- checksums --------------------------------------------------------------------------


async def test_a_damaged_gridfs_file_is_corrupt_payload(
    store: MongoWarm, mongo_db: MongoTarget
) -> None:
    t = f"t-{uuid.uuid4()}"
    data = os.urandom(20 * KIB)
    await store.put_checkpoint(rec(t, 1, versions={"a": "1"}), [blob("a", "1", data)],
                               strict=False)
    [b] = await docs_of(mongo_db, "blobs", t)
    file_id = b["payload"]["gridfs"]
    async with mongo_db.inspect() as raw:
        chunks = raw[f"{COLLECTIONS['gridfs_files'].rsplit('.', 1)[0]}.chunks"]
        chunk = await chunks.find_one({"files_id": file_id, "n": 0})
        assert chunk is not None
        flipped = bytes([chunk["data"][0] ^ 0xFF]) + bytes(chunk["data"][1:])
        await chunks.update_one({"_id": chunk["_id"]}, {"$set": {"data": flipped}})
    with pytest.raises(CorruptPayload, match="checksum"):
        await store.get(t, "", None)
    with pytest.raises(CorruptPayload):
        [r async for r in store.list(ListQuery(thread_id=t))]


async def test_a_missing_gridfs_file_is_corrupt_payload(
    store: MongoWarm, mongo_db: MongoTarget
) -> None:
    t = f"t-{uuid.uuid4()}"
    await store.put_checkpoint(rec(t, 1, checkpoint=os.urandom(8 * KIB)), [], strict=False)
    [file_id] = await file_ids_of(mongo_db, t)
    async with mongo_db.inspect() as raw:
        await raw[COLLECTIONS["gridfs_files"]].delete_one({"_id": file_id})
    with pytest.raises(CorruptPayload) as info:
        await store.get(t, "", cid(1))
    assert isinstance(info.value.__cause__, NoFile)


# -- GridFS files follow their documents --------------------------------------------------


async def test_gridfs_files_are_deleted_with_their_documents(
    store: MongoWarm, mongo_db: MongoTarget
) -> None:
    t, other = f"t-{uuid.uuid4()}", f"o-{uuid.uuid4()}"

    def big() -> bytes:
        return os.urandom(6 * KIB)

    for thread in (t, other):
        await store.put_checkpoint(rec(thread, 1, checkpoint=big(), run_id=f"{thread}-1",
                                       versions={"a": "1"}), [blob("a", "1", big())],
                                   strict=False)
        await store.put_checkpoint(rec(thread, 2, parent=1, checkpoint=big(), run_id=f"{thread}-2",
                                       versions={"a": "2"}), [blob("a", "2", big())],
                                   strict=False)
        await store.put_writes(thread, "", cid(2), [write("task", 0, big())])
    kept = await file_ids_of(mongo_db, other)

    # a duplicate regular write keeps the first; the second's upload is removed
    second = big()
    await store.put_writes(t, "", cid(2), [write("task", 0, second)])
    assert await files_named(mongo_db, second) == 0
    # a special write replaces the previous one and its file
    first_interrupt = big()
    await store.put_writes(t, "", cid(2), [write("task", -3, first_interrupt, "__interrupt__")])
    await store.put_writes(t, "", cid(2), [write("task", -3, big(), "__interrupt__")])
    assert await files_named(mongo_db, first_interrupt) == 0
    # re-putting a checkpoint replaces its document and its file
    before = await file_ids_of(mongo_db, t)
    await store.put_checkpoint(rec(t, 2, parent=1, checkpoint=big(), run_id=f"{t}-2",
                                   versions={"a": "2"}), [], strict=False)
    after = await file_ids_of(mongo_db, t)
    assert len(after) == len(before)
    assert await existing_files(mongo_db, before | after) == after

    # delete_for_runs: the files of checkpoint 2 and of its writes go
    doomed = await file_ids_of(mongo_db, t)
    assert list(await store.delete_for_runs([f"{t}-2"])) == [t]
    remaining = await file_ids_of(mongo_db, t)
    assert remaining < doomed
    assert await existing_files(mongo_db, doomed) == remaining

    await store.delete_thread(t)
    assert await existing_files(mongo_db, doomed) == set()
    assert await existing_files(mongo_db, kept) == kept

    await store.prune([other], keep_latest=True)
    latest = await store.get(other, "", None)
    assert latest is not None and latest.checkpoint_id == cid(2)
    assert await existing_files(mongo_db, kept) == await file_ids_of(mongo_db, other)
    await store.prune([other], keep_latest=False)
    assert await existing_files(mongo_db, kept) == set()


async def test_copy_thread_copies_gridfs_bytes_rather_than_sharing_files(
    store: MongoWarm, mongo_db: MongoTarget
) -> None:
    src, dst = f"s-{uuid.uuid4()}", f"d-{uuid.uuid4()}"
    value, pending, body = os.urandom(7 * KIB), os.urandom(5 * KIB), os.urandom(9 * KIB)
    await store.put_checkpoint(rec(src, 1, checkpoint=body, versions={"a": "1"}),
                               [blob("a", "1", value)], strict=False)
    await store.put_writes(src, "", cid(1), [write("task", 0, pending)])
    await store.copy_thread(src, dst)
    assert not (await file_ids_of(mongo_db, src)) & (await file_ids_of(mongo_db, dst))
    await store.delete_thread(src)
    copied = await store.get(dst, "", None)
    assert copied is not None
    assert copied.checkpoint.data == body
    assert copied.blobs["a"].data == value
    assert [w.payload.data for w in copied.writes] == [pending]
    head = await store.head(dst, "")
    assert head is not None and (head.checkpoint_id, head.n_writes) == (cid(1), 1)


# -- leftovers are collectable --------------------------------------------------------


async def test_deleted_blobs_go_at_once_and_orphans_after_the_grace(
    mongo_db: MongoTarget,
) -> None:
    now = [1_000_000.0]
    warm = mongo_db.store(offload_threshold=4 * KIB, orphan_grace=100, clock=lambda: now[0])
    await warm.setup()
    try:
        t = f"t-{uuid.uuid4()}"
        old_value = os.urandom(5 * KIB)
        await warm.put_checkpoint(rec(t, 1, run_id="r1", versions={"a": "1", "b": "1"}),
                                  [blob("a", "1", old_value), blob("b", "1", b"kept")],
                                  strict=False)
        await warm.put_checkpoint(rec(t, 2, parent=1, run_id="r2", versions={"a": "2", "b": "1"}),
                                  [blob("a", "2", b"new")], strict=False)
        await warm.put_checkpoint(rec(t, 3, parent=2, run_id="r3", versions={"a": "2", "b": "1"}),
                                  [], strict=False)
        old_files = await file_ids_of(mongo_db, t)
        assert len(old_files) == 1

        # an orphan no checkpoint names (a put in flight, or one that crashed)
        await warm._insert_blobs([await warm._blob_doc(t, "", blob("c", "9", b"x"), now[0])],
                                 now[0])
        now[0] += 10  # within the grace
        await warm.delete_for_runs(["r1"])
        # what only the deleted checkpoint named goes at once, its GridFS file too;
        # the orphan waits for the grace, as a put in flight could still name it
        assert {(b["channel"], b["version"]) for b in await docs_of(mongo_db, "blobs", t)} == {
            ("a", "2"), ("b", "1"), ("c", "9")}
        assert await existing_files(mongo_db, old_files) == set()

        now[0] += 1000
        await warm.delete_for_runs(["r3"])
        assert {(b["channel"], b["version"]) for b in await docs_of(mongo_db, "blobs", t)} == {
            ("a", "2"), ("b", "1")}
        latest = await warm.get(t, "", None)
        assert latest is not None and latest.checkpoint_id == cid(2)
        assert {c: p.data for c, p in latest.blobs.items()} == {"a": b"new", "b": b"kept"}
    finally:
        await warm.aclose()


async def test_sweep_gridfs_removes_only_old_unreferenced_files(
    store: MongoWarm, mongo_db: MongoTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = f"t-{uuid.uuid4()}"
    kept_value = os.urandom(5 * KIB)
    await store.put_checkpoint(rec(t, 1, versions={"a": "1"}), [blob("a", "1", kept_value)],
                               strict=False)

    async def crash(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("process died")

    lost = os.urandom(6 * KIB)
    monkeypatch.setattr(store, "_insert_blobs", crash)
    with pytest.raises(RuntimeError):
        await store.put_checkpoint(rec(t, 2, parent=1, versions={"a": "2"}),
                                   [blob("a", "2", lost)], strict=False)
    monkeypatch.undo()
    assert await files_named(mongo_db, lost) == 1

    await store.sweep_gridfs(now=time.time())  # within the grace: an upload may be in flight
    assert await files_named(mongo_db, lost) == 1
    assert await store.sweep_gridfs(now=time.time() + store.orphan_grace + 60) >= 1
    assert await files_named(mongo_db, lost) == 0
    assert await files_named(mongo_db, kept_value) == 1
    got = await store.get(t, "", None)
    assert got is not None and got.blobs["a"].data == kept_value


# -- crash ordering and compare-and-set ---------------------------------------------------


async def test_a_crash_before_the_head_moves_leaves_a_whole_readable_checkpoint(
    store: MongoWarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = f"t-{uuid.uuid4()}"
    await store.put_checkpoint(rec(t, 1, versions={"a": "1"}), [blob("a", "1", b"one")],
                               strict=False)

    async def crash(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("process died")

    monkeypatch.setattr(store, "_replace", crash)  # after the blobs, before the checkpoint
    with pytest.raises(RuntimeError):
        await store.put_checkpoint(rec(t, 2, parent=1, versions={"a": "2"}),
                                   [blob("a", "2", b"two")], strict=False)
    monkeypatch.undo()
    latest = await store.get(t, "", None)
    assert latest is not None and latest.checkpoint_id == cid(1)
    assert latest.blobs["a"].data == b"one"

    monkeypatch.setattr(store, "_move_head", crash)  # after the checkpoint, before the head
    with pytest.raises(RuntimeError):
        await store.put_checkpoint(rec(t, 2, parent=1, versions={"a": "2"}),
                                   [blob("a", "2", b"two")], strict=False)
    monkeypatch.undo()
    latest = await store.get(t, "", None)
    assert latest is not None and latest.checkpoint_id == cid(2)
    assert latest.blobs["a"].data == b"two"
    head = await store.head(t, "")
    assert head is not None and head.checkpoint_id == cid(1)
    result = await store.put_checkpoint(rec(t, 3, parent=2, versions={"a": "2"}), [],
                                        strict=False)
    assert result.head.checkpoint_id == cid(3) and result.head.version == head.version + 1


async def test_strict_losers_leave_no_checkpoint_blob_or_file(
    store: MongoWarm, mongo_db: MongoTarget
) -> None:
    t = f"t-{uuid.uuid4()}"
    first = (await store.put_checkpoint(rec(t, 1), [], strict=True)).head.version
    values = {n: os.urandom(5 * KIB) for n in range(10, 16)}

    async def attempt(n: int) -> VersionConflict | None:
        try:
            await store.put_checkpoint(
                rec(t, n, parent=1, checkpoint=os.urandom(5 * KIB), versions={"a": f"v{n}"}),
                [blob("a", f"v{n}", values[n])], strict=True,
            )
        except VersionConflict as exc:
            return exc
        return None

    results = dict(zip(values, await asyncio.gather(*(attempt(n) for n in values)),
                       strict=True))
    [winner] = [n for n, refused in results.items() if refused is None]
    assert all(e.head_id == cid(winner) for e in results.values() if e is not None)
    ids = [r.checkpoint_id async for r in store.list(ListQuery(thread_id=t))]
    assert ids == [cid(winner), cid(1)]
    assert [(b["channel"], b["version"]) for b in await docs_of(mongo_db, "blobs", t)] == [
        ("a", f"v{winner}")]
    for n, value in values.items():
        assert await files_named(mongo_db, value) == (1 if n == winner else 0)
    head = await store.head(t, "")
    assert head is not None and (head.checkpoint_id, head.version) == (cid(winner), first + 1)


async def test_a_head_naming_a_missing_checkpoint_is_repaired_not_a_conflict(
    store: MongoWarm, mongo_db: MongoTarget
) -> None:
    t = f"t-{uuid.uuid4()}"
    await store.put_checkpoint(rec(t, 1), [], strict=True)
    await store.put_checkpoint(rec(t, 2, parent=1), [], strict=True)
    async with mongo_db.inspect() as raw:  # as if a delete stopped half way
        await raw[COLLECTIONS["checkpoints"]].delete_one(
            {"thread_id": t, "checkpoint_id": cid(2)})
    result = await store.put_checkpoint(rec(t, 3, parent=1), [], strict=True)
    assert result.head.checkpoint_id == cid(3)
    with pytest.raises(VersionConflict) as info:
        await store.put_checkpoint(rec(t, 4, parent=1), [], strict=True)
    assert info.value.head_id == cid(3)


async def test_concurrent_writes_and_puts_keep_n_writes_exact(store: MongoWarm) -> None:
    t = f"t-{uuid.uuid4()}"
    await store.put_checkpoint(rec(t, 1), [], strict=False)
    await asyncio.gather(*(
        store.put_writes(t, "", cid(1), [write(f"task-{i}", j, b"x") for j in range(2)])
        for i in range(8)
    ))
    head = await store.head(t, "")
    assert head is not None and head.n_writes == 16
    got = await store.get(t, "", None)
    assert got is not None and len(got.writes) == 16


# -- ids and filters are data -----------------------------------------------------------


async def test_hostile_ids_are_stored_verbatim_as_values(
    store: MongoWarm, mongo_db: MongoTarget
) -> None:
    suffix = uuid.uuid4().hex
    threads = ["{$ne: 1}", "$where", ".", "a.b", "*", "$", "x" * 10_000, "{'$gt': ''}"]
    threads = [f"{t}{suffix}" if i % 2 else f"{suffix}{t}" for i, t in enumerate(threads)]
    for thread in threads:
        await store.put_checkpoint(rec(thread, 1, ns="$ns.x"), [], strict=False)
    for thread in threads:
        [doc] = await docs_of(mongo_db, "checkpoints", thread)
        assert doc["thread_id"] == thread and doc["checkpoint_ns"] == "$ns.x"
        got = await store.get(thread, "$ns.x", None)
        assert got is not None and got.thread_id == thread
    await store.delete_thread(threads[0])
    assert await store.get(threads[0], "$ns.x", None) is None
    assert all([await store.get(t, "$ns.x", None) is not None for t in threads[1:]])


@pytest.mark.parametrize("bad", [{"$ne": 1}, {"$gt": ""}, ["a"], 1])
async def test_non_string_ids_are_refused_before_any_query(store: MongoWarm, bad: Any) -> None:
    with pytest.raises(InvalidInput):
        await store.get(bad, "", None)
    with pytest.raises(InvalidInput):
        await store.delete_thread(bad)
    with pytest.raises(InvalidInput):
        [r async for r in store.list(ListQuery(thread_id=bad))]
    with pytest.raises(InvalidInput):
        await store.delete_for_runs([bad])


async def test_filter_keys_and_values_are_matched_as_text(store: MongoWarm) -> None:
    t = f"t-{uuid.uuid4()}"
    long_key, long_value = "k" * 5000, "v" * 100_000
    docs: list[dict[str, Any]] = [
        {"$where": "1", "a.b": "dot", "": "empty", "$ne": None, long_key: long_value,
         "big": 2**70, "sha256:x": "y"},
        {"$where": "0", "a": {"b": "dot"}, "step": 1, "big": 2**70 + 1, "sha256:x": "z"},
        {"flag": True, "step": 1.0, "text": "sha256:" + "0" * 64},
    ]
    for n, doc in enumerate(docs):
        await store.put_checkpoint(rec(t, n, doc=doc), [], strict=False)

    async def ids(**flt: Any) -> list[str]:
        return [r.checkpoint_id async for r in
                store.list(ListQuery(thread_id=t, filter=flt))]

    assert await ids(**{"$where": "1"}) == [cid(0)]
    assert await ids(**{"a.b": "dot"}) == [cid(0)]
    assert await ids(**{"": "empty"}) == [cid(0)]
    assert await ids(**{"$ne": None}) == [cid(0)]
    assert await ids(**{long_key: long_value}) == [cid(0)]
    assert await ids(**{long_key: long_value[:-1]}) == []
    assert await ids(big=2**70) == [cid(0)]
    assert await ids(big=2**70 + 1) == [cid(1)]
    assert await ids(**{"sha256:x": "y"}) == [cid(0)]
    assert await ids(step=1) == [cid(2), cid(1)]
    assert await ids(step=True) == []
    assert await ids(flag=1) == []
    assert await ids(text="sha256:" + "0" * 64) == [cid(2)]
    with pytest.raises(InvalidInput):
        await ids(step={"$ne": 1})


def test_filter_entries_keep_json_types_apart() -> None:
    assert filter_entry("k", True) != filter_entry("k", 1)
    assert filter_entry("k", "1") != filter_entry("k", 1)
    assert filter_entry("k", 1)["t"] == filter_entry("k", 1.0)["t"] == "num"
    assert filter_entry("k", None) == {"k": "k", "t": "null", "v": None}
    digested = filter_entry("x" * 300, "y" * 300)
    assert digested["k"].startswith("sha256:") and len(digested["v"]) == len("sha256:") + 64


async def test_list_pages_across_threads_that_share_checkpoint_ids(store: MongoWarm) -> None:
    tag = uuid.uuid4().hex
    threads = [f"t-{tag}-{i}" for i in range(3)]
    for thread in threads:
        for n in range(90):
            await store.put_checkpoint(rec(thread, n, doc={"tag": tag}), [], strict=False)
        await store.put_checkpoint(rec(thread, 5, ns="child", doc={"tag": tag}), [], strict=False)
    seen = [(r.checkpoint_id, r.thread_id, r.checkpoint_ns)
            async for r in store.list(ListQuery(filter={"tag": tag}))]
    assert len(seen) == len(set(seen)) == 3 * 91
    assert seen == sorted(seen, reverse=True)
    within = [(r.checkpoint_id, r.checkpoint_ns)
              async for r in store.list(ListQuery(thread_id=threads[0], limit=250))]
    assert len(within) == 91 and within == sorted(within, reverse=True)


# -- configuration, lifecycle, errors -------------------------------------------------


def test_url_options_are_parsed_and_secrets_masked() -> None:
    url = ("mongodb://user:s3cret@db.example:27017/tier%5Fstore?offload_threshold=2048"
           "&orphan_grace=5&w=majority&authSource=admin")
    store = open_store("warm", url)
    assert isinstance(store, MongoWarm)
    assert (store.database_name, store.offload_threshold, store.orphan_grace) == (
        "tier_store", 2048, 5.0)
    assert "s3cret" not in repr(store) and "***" in repr(store)
    passed_on = client_url(StoreUrl.parse(url))
    assert "offload_threshold" not in passed_on and "orphan_grace" not in passed_on
    assert "w=majority" in passed_on and "user:s3cret@db.example:27017" in passed_on
    srv = open_store("warm", "mongodb+srv://cluster.example.net/app")
    assert isinstance(srv, MongoWarm) and srv.database_name == "app"


@pytest.mark.parametrize("url", [
    "mongodb://localhost",
    "mongodb://localhost/",
    "mongodb://localhost/db?offload_threshold=12",
    "mongodb://localhost/db?offload_threshold=lots",
    "mongodb://localhost/db?orphan_grace=-1",
])
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_store("warm", url)


def test_exactly_one_target_is_required(mongo_db: MongoTarget) -> None:
    with pytest.raises(ConfigurationError):
        MongoWarm()
    with pytest.raises(ConfigurationError):
        MongoWarm("mongodb://localhost/db", database=object())
    with pytest.raises(ConfigurationError):
        MongoWarm(client=object())


async def test_an_unreachable_server_is_tier_unavailable_and_leaves_nothing_open() -> None:
    store = MongoWarm("mongodb://127.0.0.1:1/db?serverSelectionTimeoutMS=50"
                      "&connectTimeoutMS=50")
    with pytest.raises(TierUnavailable) as info:
        await store.setup()
    assert isinstance(info.value.__cause__, ServerSelectionTimeoutError)
    assert store._owned_client is None
    with pytest.raises(LifecycleError):
        await store.head("t", "")
    await store.aclose()


async def test_lifecycle_close_is_idempotent_and_injected_databases_stay_open(
    mongo_db: MongoTarget,
) -> None:
    t = f"t-{uuid.uuid4()}"
    first = mongo_db.store()
    with pytest.raises(LifecycleError):
        await first.head(t, "")
    await first.setup()
    await first.setup()
    await first.put_checkpoint(rec(t, 1), [], strict=False)
    await first.aclose()
    await first.aclose()
    with pytest.raises(LifecycleError):
        await first.get(t, "", None)
    second = mongo_db.store()  # same database: it was not closed under us
    await second.setup()
    try:
        got = await second.get(t, "", None)
        assert got is not None and got.checkpoint_id == cid(1)
    finally:
        await second.aclose()
    with pytest.raises(LifecycleError, match="cannot be reopened"):
        await first.setup()  # a closed store stays closed: build a new one
    with pytest.raises(LifecycleError, match="closed"):
        await first.head(t, "")


async def test_concurrent_setups_open_the_store_once(mongo_db: MongoTarget) -> None:
    store = mongo_db.store()
    try:
        await asyncio.gather(store.setup(), store.setup())
        assert await store.head(f"t-{uuid.uuid4()}", "") is None
    finally:
        await store.aclose()


async def test_setup_applies_migrations_once(store: MongoWarm, mongo_db: MongoTarget) -> None:
    async with mongo_db.inspect() as raw:
        applied = await raw[COLLECTIONS["migrations"]].find({}).to_list(None)
        assert [(m["_id"], m["name"]) for m in applied] == [(1, "indexes")]
        names = set(await raw[COLLECTIONS["checkpoints"]].index_information())
        assert {"checkpoints_key", "checkpoints_filter", "checkpoints_run_id"} <= names
        info = await raw[COLLECTIONS["blobs"]].index_information()
        assert info["blobs_key"]["unique"] is True
    again = mongo_db.store()
    await again.setup()
    await again.aclose()
    async with mongo_db.inspect() as raw:
        assert await raw[COLLECTIONS["migrations"]].count_documents({}) == 1


def test_a_malformed_index_migration_is_a_configuration_error() -> None:
    for text in ("not json", json.dumps({"indexes": [{"collection": "nope", "name": "x",
                                                      "keys": [["a", 1]]}]}),
                 json.dumps({"indexes": [{"collection": "heads", "keys": [["a", 1]]}]})):
        with pytest.raises(ConfigurationError):
            index_specs(Migration(9, "bad", text))


@pytest.mark.parametrize(("exc", "expected"), [
    (NoFile("gone"), CorruptPayload),
    (ServerSelectionTimeoutError("no server"), TierUnavailable),
    (OperationFailure("auth", code=18), ConfigurationError),
    (OperationFailure("index", code=85), ConfigurationError),
    (OperationFailure("other", code=2), StorageError),
    (DocumentTooLarge("big"), PayloadTooLarge),
    (InvalidDocument("bad"), InvalidInput),
    (MongoConfigurationError("bad option"), ConfigurationError),
])
def test_driver_errors_become_tierstore_errors(exc: Exception, expected: type) -> None:
    translated = translate(exc, "mongodb test")
    assert type(translated) is expected
    assert "mongodb test" in str(translated)


# -- tiering: stubs and GridFS --------------------------------------------------------


async def test_archiving_drops_payload_files_and_rehydrating_restores_them(
    store: MongoWarm, mongo_db: MongoTarget
) -> None:
    t = f"t-{uuid.uuid4()}"
    body, shared, pending = os.urandom(9 * KIB), os.urandom(6 * KIB), os.urandom(7 * KIB)
    await store.put_checkpoint(rec(t, 1, checkpoint=body, versions={"a": "1"}),
                               [blob("a", "1", shared)], strict=False)
    await store.put_writes(t, "", cid(1), [write("task", 0, pending)])
    await store.put_checkpoint(rec(t, 2, parent=1, versions={"a": "1"}), [], strict=False)
    full = await store.get(t, "", cid(1))
    assert full is not None
    files_before = await file_ids_of(mongo_db, t)
    now = time.time()
    [claim] = [c for c in await store.claim(owner="me", now=now, lease_seconds=60, limit=100,
                                            warm_before=now + 1, thread_id=t)]
    assert claim.head_id == cid(2)
    assert await store.mark_archived(t, "", [cid(1)], archive_key="seg", owner="me",
                                     now=now) == 1
    # the body and the write went with the payload; the blob is still named by cid 2
    assert await files_named(mongo_db, body) == 0
    assert await files_named(mongo_db, pending) == 0
    assert await files_named(mongo_db, shared) == 1
    page = [r async for r in store.list(ListQuery(thread_id=t))]
    assert [(r.checkpoint_id, r.location, set(r.blobs)) for r in page] == [
        (cid(2), "warm", {"a"}), (cid(1), "archived", set())]  # a stub carries no values
    assert page[1].checkpoint == Payload("", b"") and page[1].writes == ()

    assert await store.rehydrate([full]) == 1
    back = await store.get(t, "", cid(1))
    assert back is not None and back.location == "warm"
    assert (back.checkpoint, back.blobs, back.writes) == (full.checkpoint, full.blobs,
                                                          full.writes)
    files_after = await file_ids_of(mongo_db, t)
    assert len(files_after) == len(files_before) == 3
    assert await existing_files(mongo_db, files_after) == files_after
    await store.release(t, "", owner="me")
    usage = await store.usage()
    assert usage.checkpoints >= 2 and usage.objects >= 3


async def test_a_takeover_during_a_first_head_leaves_no_dangling_head(
        store: MongoWarm, mongo_db: MongoTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stale writer's head insert lands, then the takeover raises every head's fence,
    then the writer's re-check refuses it: the head it created must go with its checkpoint."""
    t = f"t-{uuid.uuid4()}"
    old = await store.next_fence(t)
    check = store._check_fence
    calls = 0

    async def takeover_before_the_recheck(thread: str, token: int | None,
                                          fence: Any = None) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the re-check after the namespace's first head was inserted
            await store.next_fence(thread)
        await check(thread, token, fence)

    monkeypatch.setattr(store, "_check_fence", takeover_before_the_recheck)
    record = CheckpointRecord(t, "child", "1ef-1", None, Payload("msgpack", b"cp"),
                              Payload("msgpack", b"md"), {}, {})
    with pytest.raises(LeaseLost):
        await store.put_checkpoint(record, [], strict=False, fence=old)
    assert calls == 2
    assert await store.head(t, "child") is None
    assert await docs_of(mongo_db, "checkpoints", t) == []


@pytest.mark.parametrize("stale", [False, True], ids=["fresh-parent", "stale-parent"])
async def test_a_cancelled_put_still_finishes_its_head_step_or_undo(
        store: MongoWarm, monkeypatch: pytest.MonkeyPatch, stale: bool) -> None:
    """LangGraph cancels a run's pending writes when one of them fails. A put cancelled
    after its checkpoint was stored must still move the head or take the checkpoint back:
    a stored checkpoint with neither would be a fork nobody decided."""
    t = f"t-{uuid.uuid4()}"

    def rec(n: int, parent: int | None) -> CheckpointRecord:
        return CheckpointRecord(t, "", f"1ef-{n}", None if parent is None else f"1ef-{parent}",
                                Payload("msgpack", b"cp"), Payload("msgpack", b"md"), {}, {})

    await store.put_checkpoint(rec(1, None), [], strict=True)
    move = store._move_head
    stored = asyncio.Event()

    async def slow_move(*args: Any, **kwargs: Any) -> Any:
        stored.set()  # the checkpoint document is in; the head step is next
        await asyncio.sleep(0.2)
        if stale:  # meanwhile another writer took the head
            await move(t, "", "1ef-9", "1ef-1", strict=True, current=None, now=time.time())
            await store._c("checkpoints").insert_one({**(await store._c("checkpoints").find_one(
                {"thread_id": t, "checkpoint_id": "1ef-1"}, {"_id": 0})),
                "checkpoint_id": "1ef-9", "parent_id": "1ef-1", "token": "other"})
        return await move(*args, **kwargs)

    monkeypatch.setattr(store, "_move_head", slow_move)
    task = asyncio.create_task(store.put_checkpoint(rec(2, 1), [], strict=True))
    await stored.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.5)  # the shielded step finishes on its own
    head = await store.head(t, "")
    assert head is not None
    if stale:
        assert head.checkpoint_id == "1ef-9" and await store.get(t, "", "1ef-2") is None
    else:
        assert head.checkpoint_id == "1ef-2" and await store.get(t, "", "1ef-2") is not None
