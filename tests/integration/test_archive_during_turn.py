"""An idle archival that runs inside a LangGraph turn (the node is the slow model call)
loses nothing: the turn's checkpoint keeps every channel, and its writes survive.

Deterministic: the node itself runs the worker's pass, between the turn's first
checkpoint (the input) and its last, with a second saver standing for another process.
"""

from __future__ import annotations

import operator
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.checkpoint.base import copy_checkpoint, empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from tests.stacks import ARCHIVING_STACKS, Urls
from tierstore.errors import CorruptPayload
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import IdleArchival

IDLE_NOW = TieringPolicy(archive_after=None, archive_idle_after=0)


class State(TypedDict):
    profile: str
    log: Annotated[list[str], operator.add]


@pytest.fixture(params=sorted(ARCHIVING_STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return ARCHIVING_STACKS[request.param](request, tmp_path)


async def test_archiving_during_a_turn_keeps_every_channel(urls: Urls) -> None:
    archived: list[int] = []

    async def node(state: State) -> dict[str, Any]:
        # the second turn: a worker archives the idle thread now
        if len(state["log"]) > 1 and not archived:
            async with urls.open() as worker:
                report = await IdleArchival(worker, IDLE_NOW).run_once(time.time() + 1)
                assert report.failed == 0, report.errors
                archived.append(report.checkpoints)
        return {"log": [f"turn{len(state['log'])}"]}

    builder = StateGraph(State)
    builder.add_node("n", node)
    builder.add_edge(START, "n")
    builder.add_edge("n", END)
    cfg: Any = {"configurable": {"thread_id": "vip"}}
    async with urls.open() as saver:
        app = builder.compile(checkpointer=saver)
        # durability="sync": the input checkpoint is stored before the node runs (by
        # default LangGraph stores it in the background, racing the worker's pass)
        await app.ainvoke({"profile": "VIP customer #42", "log": []}, cfg, durability="sync")
        await app.ainvoke({"log": ["hi again"]}, cfg, durability="sync")
        assert archived and archived[0] > 0  # the turn's own input checkpoint went too
        live = (await app.aget_state(cfg)).values
        history = [s.values async for s in app.aget_state_history(cfg)]
    expected = {"profile": "VIP customer #42", "log": ["turn0", "hi again", "turn2"]}
    assert live == expected
    async with urls.open() as fresh:  # nothing cached anywhere
        app = builder.compile(checkpointer=fresh)
        assert (await app.aget_state(cfg)).values == expected
        assert [s.values async for s in app.aget_state_history(cfg)] == history
    reference = builder.compile(checkpointer=InMemorySaver())  # no tiering at all
    await reference.ainvoke({"profile": "VIP customer #42", "log": []}, cfg)
    await reference.ainvoke({"log": ["hi again"]}, cfg)
    assert history == [s.values async for s in reference.aget_state_history(cfg)]


@pytest.mark.parametrize("step", ["written", "verified"])
async def test_a_pending_write_stored_during_the_move_survives(urls: Urls, step: str) -> None:
    """The app stores a task's result while the worker uploads the segment (the app's
    sync API runs on its own loop, as in another process)."""
    cfg: Any = {"configurable": {"thread_id": f"w-{step}", "checkpoint_ns": ""}}
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"a": 1}
    checkpoint["channel_versions"] = {"a": "1"}
    with urls.open(hot_write_delay=0) as app:
        head = app.put(cfg, checkpoint, {"source": "loop", "step": 1}, {"a": "1"})
        app.put_writes(head, [("a", 41)], "task-0")

        def during(name: str) -> None:
            if name == step:
                app.put_writes(head, [("a", 42)], "task-1")

        async with urls.open() as worker:
            job = IdleArchival(worker, IDLE_NOW, thread_id=f"w-{step}", on_step=during)
            report = await job.run_once(time.time() + 1)
        assert report.checkpoints == 1 and report.failed == 0
        got = app.get_tuple(cfg)
        assert got is not None
        assert sorted((w[0], w[2]) for w in got.pending_writes or []) == [
            ("task-0", 41), ("task-1", 42)]
    async with urls.open() as fresh:
        got = await fresh.aget_tuple(cfg)
        assert got is not None and got.checkpoint["channel_values"] == {"a": 1}
        assert sorted((w[0], w[2]) for w in got.pending_writes or []) == [
            ("task-0", 41), ("task-1", 42)]


async def test_a_channel_value_lost_from_warm_raises_naming_it(urls: Urls) -> None:
    """Whatever lost it, a live checkpoint missing a channel value is never returned
    as a state without that channel (LangGraph would resume from it)."""
    cfg: Any = {"configurable": {"thread_id": "lost", "checkpoint_ns": ""}}
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"profile": "VIP", "log": ["hi"]}
    checkpoint["channel_versions"] = {"profile": "1", "log": "1"}
    async with urls.open(hot_write_delay=0) as saver:
        await saver.aput(cfg, checkpoint, {"source": "loop", "step": 1},
                         {"profile": "1", "log": "1"})
        stack = saver.regions.for_thread("lost")
        await stack.invalidate_hot(["lost"])  # the hot copy still has it all
        warm = stack.warm
        if warm.backend == "sqlite":
            await warm._run(lambda conn: conn.execute(  # type: ignore[attr-defined]
                "DELETE FROM blobs WHERE thread_id = 'lost' AND channel = 'profile'"))
        elif warm.backend == "mongodb":
            await warm._c("blobs").delete_many(  # type: ignore[attr-defined]
                {"thread_id": "lost", "channel": "profile"})
        else:
            pytest.skip("PostgreSQL stores no row for an empty channel")
    async with urls.open() as fresh:
        with pytest.raises(CorruptPayload, match="'profile'"):
            await fresh.aget_tuple(cfg)
        with pytest.raises(CorruptPayload, match="'profile'"):
            [t async for t in fresh.alist(cfg)]


async def test_a_child_written_from_a_head_archived_under_the_app_keeps_its_channels(
    urls: Urls,
) -> None:
    """The app read the head, a worker archived the idle thread, and the app's next
    checkpoint names the unchanged channel by its old version."""
    cfg: Any = {"configurable": {"thread_id": "under", "checkpoint_ns": ""}}
    first = empty_checkpoint()
    first["channel_values"] = {"messages": ["hello", "world"], "counter": 1}
    first["channel_versions"] = {"messages": "1", "counter": "1"}
    async with urls.open() as app:
        head = await app.aput(cfg, first, {"source": "loop", "step": 1},
                              {"messages": "1", "counter": "1"})
        read = await app.aget_tuple(cfg)  # the turn starts
        assert read is not None
        async with urls.open() as worker:
            report = await IdleArchival(worker, IDLE_NOW, thread_id="under").run_once(
                time.time() + 1)
            assert report.checkpoints == 1 and report.failed == 0
        child = copy_checkpoint(read.checkpoint)
        child["id"] = str(uuid6())
        child["channel_values"] = {"messages": ["hello", "world"], "counter": 2}
        child["channel_versions"] = {"messages": "1", "counter": "2"}
        await app.aput(head, child, {"source": "loop", "step": 2}, {"counter": "2"})
        latest = await app.aget_tuple(cfg)
        assert latest is not None
        assert latest.checkpoint["channel_values"] == child["channel_values"]
    async with urls.open() as fresh:
        latest = await fresh.aget_tuple(cfg)
        assert latest is not None
        assert latest.checkpoint["channel_values"] == {"messages": ["hello", "world"],
                                                       "counter": 2}
        assert [t.checkpoint["channel_values"] async for t in fresh.alist(cfg)] == [
            {"messages": ["hello", "world"], "counter": 2},
            {"messages": ["hello", "world"], "counter": 1}]
