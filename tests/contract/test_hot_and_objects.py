"""The HotStore and ObjectStore contracts, run on every backend (see ``tests/stacks.py``)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from typing import Any

import pytest

from tests.builders import cached_write as w
from tests.builders import entry
from tierstore.tiers.memory import MemoryHot

from .test_warm import HOSTILE_IDS

# -- hot ------------------------------------------------------------------------------


async def test_hot_roundtrip_preserves_the_record(hot: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    original = entry(t, "0002", writes=(w("a", 0, b"x"),), version=7)
    assert await hot.put(original) is True
    got = await hot.get(t, "")
    assert got == original
    assert got is not None and got.version == 7
    assert await hot.get(t, "other-ns") is None
    assert await hot.get(f"other-{t}", "") is None


async def test_hot_is_replaced_only_by_newer_versions(hot: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    assert await hot.put(entry(t, "0005", body=b"five", version=5))
    assert await hot.put(entry(t, "0004", body=b"four", version=4)) is False
    got = await hot.get(t, "")
    assert got is not None and got.checkpoint.data == b"five"
    assert await hot.put(entry(t, "0006", body=b"six", version=6))
    got = await hot.get(t, "")
    assert got is not None and got.checkpoint.data == b"six"
    # a head recomputed to an older checkpoint (delete_for_runs, prune) has a newer version
    assert await hot.put(entry(t, "0003", body=b"three", version=7))
    got = await hot.get(t, "")
    assert got is not None and (got.checkpoint.data, got.version) == (b"three", 7)
    # a copy of unknown version never replaces anything
    assert await hot.put(entry(t, "0009", version=0)) is False


async def test_hot_older_version_never_replaces_same_id_and_count(hot: Any) -> None:
    """A late write-behind flush of an older state must not overwrite a newer entry,
    even with the same checkpoint id and the same number of writes (negative-index
    writes replace each other)."""
    t = f"t-{uuid.uuid4()}"
    newer = entry(t, "0002", writes=(w("node", -3, b"answer-2"),), version=8)
    older = entry(t, "0002", writes=(w("node", -3, b"answer-1"),), version=7)
    assert await hot.put(newer)
    assert await hot.put(older) is False
    got = await hot.get(t, "")
    assert got is not None and got.version == 8
    assert [x.payload.data for x in got.writes] == [b"answer-2"]
    assert await hot.put(newer) is False  # the same version is not newer either


async def test_hot_merges_writes_only_into_their_checkpoint_and_version(hot: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await hot.put(entry(t, "0002", version=2))
    assert await hot.add_writes(t, "", "0001", [w("a", 0, b"stale")], version=3) is False
    assert await hot.add_writes(t, "", "0002", [w("a", 0, b"first"), w("a", 1, b"y")],
                                version=3)
    assert await hot.add_writes(t, "", "0002", [w("a", 0, b"second")], version=4)
    assert await hot.add_writes(t, "", "0002", [w("a", -3, b"int-1")], version=5)
    assert await hot.add_writes(t, "", "0002", [w("a", -3, b"int-2")], version=6)
    got = await hot.get(t, "")
    assert got is not None and got.version == 6
    assert {(x.task_id, x.idx): x.payload.data for x in got.writes} == {
        ("a", 0): b"first", ("a", 1): b"y", ("a", -3): b"int-2"}
    assert await hot.add_writes(f"none-{t}", "", "0002", [w("a", 0, b"x")], version=1) is False


async def test_hot_writes_that_skip_a_version_are_not_merged(hot: Any) -> None:
    """Version 4 after 2 means a change the entry never saw: merging would make a
    copy that claims version 4 without it."""
    t = f"t-{uuid.uuid4()}"
    await hot.put(entry(t, "0002", version=2))
    assert await hot.add_writes(t, "", "0002", [w("a", -3, b"x")], version=4) is False
    assert await hot.add_writes(t, "", "0002", [w("a", -3, b"x")], version=2) is False
    got = await hot.get(t, "")
    assert got is not None and (got.version, got.writes) == (2, ())


async def test_hot_concurrent_puts_keep_the_newest_version(hot: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    versions = list(range(1, 26))
    random.Random(7).shuffle(versions)
    await asyncio.gather(*(hot.put(entry(t, "0002", writes=(w("a", -3, f"{v}".encode()),),
                                         version=v))
                           for v in versions))
    got = await hot.get(t, "")
    assert got is not None and got.version == 25
    assert [x.payload.data for x in got.writes] == [b"25"]


async def test_hot_same_checkpoint_newer_version_replaces(hot: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await hot.put(entry(t, "0002", version=1))
    assert await hot.put(entry(t, "0002", writes=(w("a", 0, b"x"),), version=2))
    got = await hot.get(t, "")
    assert got is not None and len(got.writes) == 1


async def test_hot_invalidate_one_namespace_or_all(hot: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await hot.put(entry(t, "0001", ns=""))
    await hot.put(entry(t, "0001", ns="child:1"))
    await hot.invalidate(t, "child:1")
    assert await hot.get(t, "child:1") is None
    assert await hot.get(t, "") is not None
    await hot.put(entry(t, "0001", ns="child:1"))
    await hot.invalidate(t)
    assert await hot.get(t, "") is None
    assert await hot.get(t, "child:1") is None


async def test_a_deleted_threads_tombstone_refuses_older_copies(hot: Any) -> None:
    """A delete leaves a version floor: a copy queued before it (any version up to the
    floor, or up to what was cached) is refused, in every namespace; a copy made after
    a recreation (above the floor) is stored. Dropping without a floor leaves none."""
    t = f"t-{uuid.uuid4()}"
    floor = 1_000_000
    assert await hot.put(entry(t, "0001", ns="child:1", version=floor + 5))
    await hot.invalidate(t, floor=floor)
    assert await hot.get(t, "child:1") is None
    for ns, version in (("", 3), ("", floor), ("child:1", floor + 5), ("other", floor)):
        assert await hot.put(entry(t, "0001", ns=ns, version=version)) is False
        assert await hot.get(t, ns) is None
    await hot.invalidate(t, floor=10)  # a lower floor never lowers the tombstone
    assert await hot.put(entry(t, "0001", version=floor + 5)) is False
    assert await hot.put(entry(t, "0002", version=floor + 6))
    got = await hot.get(t, "")
    assert got is not None and (got.checkpoint_id, got.version) == ("0002", floor + 6)
    other = f"o-{uuid.uuid4()}"
    await hot.put(entry(other, "0001", version=7))
    await hot.invalidate(other)
    assert await hot.put(entry(other, "0001", version=2))


@pytest.mark.parametrize("thread", HOSTILE_IDS)
async def test_hot_hostile_ids_are_data(hot: Any, thread: str) -> None:
    await hot.put(entry(thread, "0001"))
    await hot.put(entry(f"{thread}-neighbour", "0001", body=b"other"))
    got = await hot.get(thread, "")
    assert got is not None and got.thread_id == thread and got.checkpoint.data == b"cp"
    await hot.invalidate(thread)
    assert await hot.get(thread, "") is None
    assert await hot.get(f"{thread}-neighbour", "") is not None


async def test_memory_hot_drops_a_thread_by_its_own_entries() -> None:
    """The in-memory tier finds a thread's entries through an index of its namespaces
    (not a walk over every entry): entries the LRU evicted or that expired leave the
    index too, and dropping a thread leaves every other thread's entries."""
    now = [0.0]
    hot = MemoryHot(max_entries=3, ttl=10, clock=lambda: now[0])
    await hot.setup()
    for ns in ("a", "b", "c"):
        assert await hot.put(entry("t", "0001", ns=ns))
    assert await hot.put(entry("u", "0001"))  # evicts t/a, the oldest
    assert await hot.get("t", "a") is None
    await hot.invalidate("t")
    assert len(hot) == 1 and await hot.get("u", "") is not None
    assert await hot.put(entry("t", "0002", ns="a"))
    now[0] = 20.0
    assert await hot.get("u", "") is None  # expired on read
    assert hot.purge_expired() == 1
    assert await hot.put(entry("t", "0003", ns="b"))
    await hot.invalidate("t", "b")
    assert await hot.put(entry("t", "0004", ns="c"))
    await hot.invalidate("t", floor=100)
    assert len(hot) == 0
    assert await hot.put(entry("t", "0005", ns="c", version=50)) is False  # the tombstone


# -- objects ----------------------------------------------------------------------------


async def test_objects_roundtrip_info_delete(objects: Any) -> None:
    key = f"segments/{uuid.uuid4()}/part-0001.tsz"
    data = bytes(range(256)) * 100
    assert await objects.get(key) is None
    assert await objects.info(key) is None
    await objects.put(key, data)
    assert await objects.get(key) == data
    info = await objects.info(key)
    assert info is not None and info.size == len(data) and info.readable
    await objects.delete([key])
    assert await objects.get(key) is None
    await objects.delete([key])  # deleting twice is fine


async def test_objects_report_the_digest_of_exactly_the_bytes_stored_or_none(
    objects: Any,
) -> None:
    """A store that reports a SHA-256 reports the one of the bytes it holds: the archive
    trusts it instead of reading a new segment back."""
    key = f"segments/{uuid.uuid4()}/digest"
    data = bytes(range(256)) * 41
    await objects.put(key, data)
    info = await objects.info(key)
    assert info is not None
    assert info.sha256 in (None, hashlib.sha256(data).hexdigest())
    if objects.backend == "s3":
        assert info.sha256 is not None  # a one-request put: S3 keeps its checked digest


async def test_objects_overwrite_is_atomic_replace(objects: Any) -> None:
    key = f"k/{uuid.uuid4()}"
    await objects.put(key, b"one")
    await objects.put(key, b"two")
    assert await objects.get(key) == b"two"


async def test_objects_iter_keys_by_prefix(objects: Any) -> None:
    base = f"p-{uuid.uuid4()}"
    keys = [f"{base}/a/1", f"{base}/a/2", f"{base}/ab/1", f"{base}/b/1"]
    for key in keys:
        await objects.put(key, b"x")
    assert sorted([k async for k in objects.iter_keys(f"{base}/a/")]) == keys[:2]
    assert sorted([k async for k in objects.iter_keys(f"{base}/a")]) == keys[:3]
    assert sorted([k async for k in objects.iter_keys(f"{base}/")]) == keys
    assert sorted([k async for k in objects.iter_keys(f"{base}/a/1")]) == keys[:1]
    assert [k async for k in objects.iter_keys(f"{base}/c/")] == []
    assert [k async for k in objects.iter_keys(f"{base}//")] == []


@pytest.mark.parametrize("segment", ["..", ".", "a b", "%2e%2e", "线程", "'; DROP", "*"])
async def test_objects_keys_cannot_escape(objects: Any, segment: str) -> None:
    key = f"safe-{uuid.uuid4()}/{segment}/{segment}"
    await objects.put(key, b"payload")
    assert await objects.get(key) == b"payload"
    assert key in [k async for k in objects.iter_keys(key.split("/", maxsplit=1)[0] + "/")]
    assert [k async for k in objects.iter_keys(key.rsplit("/", maxsplit=1)[0] + "/")] == [key]
