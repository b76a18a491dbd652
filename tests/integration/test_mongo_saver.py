"""``TieredSaver`` over the MongoDB warm tier: big states, hostile ids, filters, real graphs.

The saver is assembled by hand (``Router`` → ``Regions`` → ``Region``) so that the
warm store can be the test's ``MongoWarm`` on the mock or on a real server.
"""

from __future__ import annotations

import operator
import os
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypedDict, cast

import bson
import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import ChannelVersions, CheckpointMetadata, empty_checkpoint
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from tests.servers.mongo import MongoTarget
from tierstore import InvalidInput, TieredSaver
from tierstore.region import Region, Regions
from tierstore.router import Router
from tierstore.tiers.memory import MemoryHot
from tierstore.tiers.mongo import COLLECTIONS, MongoWarm

MIB = 1024 * 1024


@pytest.fixture
async def parts(mongo_db: MongoTarget) -> AsyncIterator[tuple[TieredSaver, MongoWarm, MemoryHot]]:
    warm = mongo_db.store()
    hot = MemoryHot(ttl=60)
    saver = TieredSaver(Router(Regions({"default": Region(warm=warm, hot=hot)})))
    async with saver:
        yield saver, warm, hot


@pytest.fixture
def saver(parts: tuple[TieredSaver, MongoWarm, MemoryHot]) -> TieredSaver:
    return parts[0]


def cfg(thread: str, checkpoint_id: str | None = None, ns: str = "") -> RunnableConfig:
    configurable: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


async def put(saver: TieredSaver, thread: str, values: dict[str, Any],
              metadata: dict[str, Any] | None = None, parent: str | None = None) -> str:
    checkpoint = empty_checkpoint()
    versions: ChannelVersions = {ch: saver.get_next_version(None, None) for ch in values}
    checkpoint["channel_values"] = dict(values)
    checkpoint["channel_versions"] = dict(versions)
    md = cast(CheckpointMetadata, metadata or {"source": "input", "step": -1})
    stored = await saver.aput(cfg(thread, parent), checkpoint, md, versions)
    return str(stored["configurable"]["checkpoint_id"])


async def test_a_20_mb_state_round_trips_through_gridfs(
    parts: tuple[TieredSaver, MongoWarm, MemoryHot], mongo_db: MongoTarget
) -> None:
    saver, _warm, hot = parts
    thread = f"big-{uuid.uuid4()}"
    state = os.urandom(20 * MIB)  # incompressible: stays 20 MB after zstd
    pending = os.urandom(3 * MIB)
    checkpoint_id = await put(saver, thread, {"state": state, "small": "hello"})
    await saver.aput_writes(cfg(thread, checkpoint_id), [("state", pending)], "task-1")

    hit = await saver.aget_tuple(cfg(thread))
    assert hit is not None and hit.checkpoint["channel_values"]["state"] == state
    await hot.invalidate(thread)
    reads = saver.stats.warm_reads
    tup = await saver.aget_tuple(cfg(thread))
    assert saver.stats.warm_reads == reads + 1
    assert tup is not None
    assert tup.checkpoint["channel_values"] == {"state": state, "small": "hello"}
    assert tup.pending_writes == [("task-1", "state", pending)]
    [listed] = [t async for t in saver.alist(cfg(thread))]
    assert listed.checkpoint["channel_values"]["state"] == state

    async with mongo_db.inspect() as raw:
        for name in ("checkpoints", "blobs", "writes"):
            async for doc in raw[COLLECTIONS[name]].find({"thread_id": thread}):
                assert len(bson.encode(doc)) < 2 * MIB  # large payloads live in GridFS
        [big] = await raw[COLLECTIONS["blobs"]].find(
            {"thread_id": thread, "channel": "state"}).to_list(None)
        assert big["payload"]["size"] > 20 * MIB - MIB
        files = raw[COLLECTIONS["gridfs_files"]]
        assert await files.count_documents({"_id": big["payload"]["gridfs"]}) == 1
    await saver.adelete_thread(thread)
    assert await saver.aget_tuple(cfg(thread)) is None
    async with mongo_db.inspect() as raw:
        assert await raw[COLLECTIONS["gridfs_files"]].count_documents(
            {"_id": big["payload"]["gridfs"]}) == 0


HOSTILE = ["{$ne: 1}", "$where", ".", "a.b.c", "*", "$", "\\", "线程/🧵", "x" * 10_000,
           '{"$gt": ""}', "this.thread_id == this.thread_id"]


@pytest.mark.parametrize("thread", HOSTILE)
async def test_hostile_thread_ids_are_data(saver: TieredSaver, thread: str) -> None:
    neighbour = f"neighbour-{uuid.uuid4()}"
    await put(saver, neighbour, {"v": "neighbour"})
    first = await put(saver, thread, {"v": 1})
    await put(saver, thread, {"v": 2}, parent=first)
    tup = await saver.aget_tuple(cfg(thread))
    assert tup is not None and tup.config["configurable"]["thread_id"] == thread
    assert tup.checkpoint["channel_values"] == {"v": 2}
    history = [t async for t in saver.alist(cfg(thread))]
    assert [t.config["configurable"]["thread_id"] for t in history] == [thread, thread]
    await saver.adelete_thread(thread)
    assert await saver.aget_tuple(cfg(thread)) is None
    kept = await saver.aget_tuple(cfg(neighbour))
    assert kept is not None and kept.checkpoint["channel_values"] == {"v": "neighbour"}


async def test_operator_documents_as_ids_are_refused(saver: TieredSaver) -> None:
    for bad in ({"$ne": 1}, {"$gt": ""}, ["x"]):
        with pytest.raises(InvalidInput):
            await saver.aget_tuple({"configurable": {"thread_id": bad}})
        with pytest.raises(InvalidInput):
            await saver.adelete_thread(bad)  # type: ignore[arg-type]


async def test_filter_injection_attempts_match_nothing_they_should_not(
    saver: TieredSaver,
) -> None:
    thread = f"f-{uuid.uuid4()}"
    await put(saver, thread, {"v": 1}, {"source": "input", "step": 1, "$where": "x",
                                        "a.b": "dotted", "user": "alice"})
    await put(saver, thread, {"v": 2}, {"source": "loop", "step": 2, "a": {"b": "dotted"},
                                        "user": "bob"})

    async def steps(flt: dict[str, Any]) -> list[int]:
        return [t.metadata["step"] async for t in saver.alist(cfg(thread), filter=flt)]

    assert await steps({"user": "alice"}) == [1]
    assert await steps({"user": {"$ne": "alice"}}) == []
    assert await steps({"user": {"$regex": ".*"}}) == []
    assert await steps({"$where": "x"}) == [1]
    assert await steps({"$where": "1 == 1"}) == []
    assert await steps({"$or": [{"user": "alice"}, {"user": "bob"}]}) == []
    assert await steps({"a.b": "dotted"}) == [1]
    assert await steps({"a": {"b": "dotted"}}) == [2]
    assert await steps({"step": True}) == []
    assert await steps({"step": "1"}) == []
    assert await steps({"step": 1.0}) == [1]
    everyone = [t async for t in saver.alist(None, filter={"user": {"$exists": True}})]
    assert everyone == []


class State(TypedDict):
    log: Annotated[list[str], operator.add]


def build_graph() -> StateGraph[State]:
    def first(state: State) -> dict[str, Any]:
        return {"log": ["first"]}

    def ask(state: State) -> dict[str, Any]:
        answer = interrupt("continue?")
        return {"log": [f"answer:{answer}"]}

    graph = StateGraph(State)
    graph.add_node("first", first)
    graph.add_node("ask", ask)
    graph.add_edge(START, "first")
    graph.add_edge("first", "ask")
    graph.add_edge("ask", END)
    return graph


async def test_a_graph_with_an_interrupt_resumes_from_mongo(
    parts: tuple[TieredSaver, MongoWarm, MemoryHot],
) -> None:
    saver, _warm, hot = parts
    app = build_graph().compile(checkpointer=saver)
    config = cfg(f"g-{uuid.uuid4()}")
    paused = await app.ainvoke({"log": ["start"]}, config)
    assert "__interrupt__" in paused
    await hot.invalidate(str(config["configurable"]["thread_id"]))  # resume from warm alone
    done = await app.ainvoke(Command(resume="yes"), config)
    assert done["log"] == ["start", "first", "answer:yes"]
    history = [s async for s in app.aget_state_history(config)]
    assert len(history) == len([t async for t in saver.alist(config)]) >= 4
