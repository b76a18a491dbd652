"""Large states: offloaded to the object store behind checksummed references."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint

from tierstore import CorruptPayload, TieredSaver
from tierstore.demo import build_agent
from tierstore.jobs.tiering import ColdGC
from tierstore.offload import (
    OFFLOAD_PREFIX,
    Offloader,
    collectable_orphans,
    leftover_objects,
    ref_key,
    thread_space,
    unreferenced_objects,
)
from tierstore.tiers import open_store
from tierstore.tiers.file import FileStore


def saver_for(tmp_path: Path, cold: bool = True) -> TieredSaver:
    return TieredSaver.from_urls(
        hot="memory://", warm=f"sqlite:///{tmp_path}/warm.db",
        cold=f"file://{tmp_path}/cold" if cold else None, offload_threshold=64 * 1024,
    )


async def test_a_20mb_state_round_trips_through_the_object_store(tmp_path: Path) -> None:
    big = os.urandom(10 * 1024 * 1024).hex()  # 20 MB of text that does not compress
    cfg = {"configurable": {"thread_id": "big"}}
    async with saver_for(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage(big)]}, cfg)
        assert saver.stats.offloaded > 0
    db_size = (tmp_path / "warm.db").stat().st_size
    assert db_size < 2 * 1024 * 1024  # warm holds references, not the 20 MB
    objects = FileStore(tmp_path / "cold")
    keys = [k async for k in objects.iter_keys(OFFLOAD_PREFIX)]
    assert keys
    async with saver_for(tmp_path) as saver:  # cold start: no hot copy
        app = build_agent().compile(checkpointer=saver)
        state = await app.aget_state(cfg)
        assert state.values["messages"][0].content == big
        history = [s async for s in app.aget_state_history(cfg)]
        with_messages = [s for s in history if s.values.get("messages")]
        assert len(with_messages) >= 3
        assert all(s.values["messages"][0].content == big for s in with_messages)


async def test_same_large_value_is_stored_once_per_thread(tmp_path: Path) -> None:
    from langgraph.checkpoint.conformance.test_utils import (
        generate_checkpoint,
        generate_config,
        generate_metadata,
    )

    big = os.urandom(200 * 1024).hex()
    async with saver_for(tmp_path) as saver:
        for thread in ("a", "b", "c", "a"):
            cp = generate_checkpoint(channel_values={"doc": big})
            cp["channel_versions"] = {"doc": 1}
            await saver.aput(generate_config(thread), cp, generate_metadata(), {"doc": 1})
        got = await saver.aget_tuple(generate_config("b"))
        assert got is not None and got.checkpoint["channel_values"]["doc"] == big
    objects = FileStore(tmp_path / "cold")
    keys = [k async for k in objects.iter_keys(OFFLOAD_PREFIX)]
    conn = sqlite3.connect(tmp_path / "warm.db")
    refs = conn.execute("SELECT count(*) FROM blobs WHERE tag LIKE '%+ref'").fetchone()[0]
    conn.close()
    # one content-addressed object per thread: a thread's delete removes exactly its own
    assert (refs, len(keys)) == (3, 3)
    assert {k for t in "abc" async for k in objects.iter_keys(thread_space(t))} == set(keys)


async def test_references_written_before_thread_spaces_stay_readable(tmp_path: Path) -> None:
    import hashlib

    import msgpack

    from tierstore.records import Payload

    data = os.urandom(64)
    digest = hashlib.sha256(data).hexdigest()
    legacy = f"{OFFLOAD_PREFIX}{digest[:2]}/{digest}"
    objects = FileStore(tmp_path / "cold")
    await objects.put(legacy, data)
    offloader = Offloader(objects, threshold=1024)
    ref = Payload("msgpack+ref", msgpack.packb([legacy, digest, len(data)]))
    assert await offloader.expand(ref, "any-thread") == Payload("msgpack", data)
    assert ref_key(ref, "any-thread") == legacy


async def test_damaged_offloaded_object_is_a_typed_error(tmp_path: Path) -> None:
    big = os.urandom(100 * 1024).hex()
    cfg = {"configurable": {"thread_id": "victim"}}
    async with saver_for(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage(big)]}, cfg)
    objects = FileStore(tmp_path / "cold")
    keys = [k async for k in objects.iter_keys(OFFLOAD_PREFIX)]
    for key in keys:
        data = await objects.get(key)
        assert data is not None
        await objects.put(key, data[:-1] + bytes([data[-1] ^ 1]))
    async with saver_for(tmp_path) as saver:
        with pytest.raises(CorruptPayload, match="checksum"):
            await saver.aget_tuple(cfg)
    for key in keys:
        await objects.delete([key])
    async with saver_for(tmp_path) as saver:
        with pytest.raises(CorruptPayload, match="missing"):
            await saver.aget_tuple(cfg)


async def test_without_an_object_store_large_payloads_stay_inline(tmp_path: Path) -> None:
    big = os.urandom(100 * 1024).hex()
    cfg = {"configurable": {"thread_id": "inline"}}
    async with saver_for(tmp_path, cold=False) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage(big)]}, cfg)
        assert saver.stats.offloaded == 0
        state = await app.aget_state(cfg)
        assert state.values["messages"][0].content == big


def test_orphans_are_the_unreferenced_offload_objects() -> None:
    stored = ["offload/aa/1", "offload/bb/2", "segments/x", "offload/cc/3"]
    assert collectable_orphans(stored, ["offload/bb/2"]) == ["offload/aa/1", "offload/cc/3"]


def test_leftover_objects_of_an_interrupted_delete_or_copy() -> None:
    objects = {"o/old": 100.0, "o/fresh": 990.0, "o/ageless": 0.0}
    # a marker younger than the grace may belong to work still running
    assert leftover_objects(950.0, False, objects, now=1000.0, grace=60.0) is None
    assert leftover_objects(0.0, False, objects, now=1000.0, grace=60.0) is None
    # a thread with rows keeps everything; without, all but a put in flight go
    assert leftover_objects(500.0, True, objects, now=1000.0, grace=60.0) == []
    assert leftover_objects(500.0, False, objects, now=1000.0, grace=60.0) == ["o/old"]


def test_unreferenced_objects_spare_named_young_and_ageless_ones() -> None:
    objects = {"a": 10.0, "b": 10.0, "c": 30.0, "d": 0.0, "e": 17.0}
    assert unreferenced_objects(objects, {"b"}, started=20.0, grace=0) == (["a", "e"], ["c"])
    # written within the grace before the delete began: maybe a put in flight
    assert unreferenced_objects(objects, {"b"}, started=20.0, grace=5) == (["a"], ["c", "e"])


async def test_a_reference_resolves_in_the_reading_threads_space(tmp_path: Path) -> None:
    import msgpack

    from tierstore.records import Payload

    objects = FileStore(tmp_path / "cold")
    offloader = Offloader(objects, threshold=1024)
    value = Payload("msgpack", os.urandom(4096))
    [ref] = (await offloader.shrink({1: value}, thread_id="a")).values()
    key_a = ref_key(ref, "a")
    assert msgpack.unpackb(ref.data)[0] == key_a  # absolute: older versions read it too
    assert key_a.startswith(thread_space("a"))
    assert ref_key(ref, "b") == key_a.replace(thread_space("a"), thread_space("b"))
    # a copy whose objects were never copied (made by an older version) reads the source's
    assert await offloader.expand(ref, "b") == value
    await objects.put(ref_key(ref, "b"), value.data)
    await objects.delete([key_a])
    assert await offloader.expand(ref, "b") == value  # its own object from now on
    with pytest.raises(CorruptPayload, match="missing"):
        await offloader.expand(ref, "a")


class SlowCommit:
    """A warm store whose checkpoint writes sit in a slow link for ``delay`` seconds."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.delay = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(self.delay)
        return await self._inner.put_checkpoint(*args, **kwargs)


@pytest.mark.parametrize("sweep", ["prune", "delete_for_runs"])
async def test_a_sweep_never_deletes_the_object_of_a_put_still_in_flight(
    tmp_path: Path, sweep: str,
) -> None:
    """A put writes its offloaded object, then its warm row; a prune or run delete that
    sweeps the thread's unnamed objects in between must leave that object alone, or the
    acknowledged checkpoint would name an object that is gone."""
    warm = SlowCommit(open_store("warm", f"sqlite:///{tmp_path}/warm.db"))
    saver = TieredSaver.from_stores(warm=warm, cold=open_store("cold", f"file://{tmp_path}/cold"),
                                    offload_threshold=1024)

    def big(version: int) -> Checkpoint:
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"doc": os.urandom(8000).hex()}
        checkpoint["channel_versions"] = {"doc": version}
        return checkpoint

    async with saver:
        config: Any = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
        first = await saver.aput(config, big(1), {"step": 1, "run_id": "r1"}, {"doc": 1})
        await asyncio.sleep(1.1)  # object times have a one-second grain on some stores
        warm.delay = 1.0
        second = big(2)
        put = asyncio.create_task(
            saver.aput(first, second, {"step": 2, "run_id": "r2"}, {"doc": 2}))
        await asyncio.sleep(0.3)  # its object is written; its warm row is not yet
        if sweep == "prune":
            await saver.aprune(["t"])
        else:
            await saver.adelete_for_runs(["r1"])
        await put
        latest = await saver.aget_tuple(config)
        assert latest is not None
        assert latest.checkpoint["channel_values"]["doc"] == second["channel_values"]["doc"]
        # what the sweep spared for being young goes with ColdGC once it is old enough:
        # the run delete left checkpoint 1's object unnamed; the prune kept checkpoint 1
        # (the latest when it ran), so nothing of the thread is unnamed there
        def files(part: str) -> list[Path]:
            return [p for p in (tmp_path / "cold" / part).rglob("*") if p.is_file()]

        assert len(files("offload")) == 2 and files("offload-work")  # the sweep's note stays
        report = await ColdGC(saver).run_once(now=time.time() + 2 * 3600)
        unnamed = 1 if sweep == "delete_for_runs" else 0
        assert report.deleted == unnamed and not report.failed, report
        assert len(files("offload")) == 2 - unnamed and not files("offload-work")
        again = await saver.aget_tuple(config)
        assert again is not None
        assert again.checkpoint["channel_values"]["doc"] == second["channel_values"]["doc"]
