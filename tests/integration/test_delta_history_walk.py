"""``aget_delta_channel_history`` where the parent chain is not a plain line: branches
written in between, a parent missing, a parent stored after its child, a chain that
loops. Built with ``aput``/``aput_writes`` as LangGraph calls them, on every stack.

LangGraph's own walk (``BaseCheckpointSaver.aget_delta_channel_history``, a ``get_tuple``
per ancestor) is the reference wherever it ends; a chain that loops it would walk
forever, and there the walk ends at the first checkpoint it comes back to.
"""

from __future__ import annotations

import asyncio
import operator
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.graph import END, START, StateGraph

from tests.calls import count_calls
from tests.stacks import ARCHIVING_STACKS, STACKS, Urls
from tierstore import TieredSaver
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion


@pytest.fixture(params=sorted(STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


@pytest.fixture
async def saver(urls: Urls) -> AsyncIterator[TieredSaver]:
    async with urls.open() as s:
        yield s


def new_id() -> str:
    return str(uuid6())


def cfg(thread: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    configurable: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ""}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


async def put(saver: TieredSaver, thread: str, checkpoint_id: str, parent: str | None, *,
              snapshot: str | None = None) -> str:
    """A checkpoint whose ``items`` channel has a new version, stored as a value only
    when ``snapshot`` is given, with one write to ``items`` (and one elsewhere)."""
    checkpoint: dict[str, Any] = dict(empty_checkpoint())
    checkpoint["id"] = checkpoint_id
    version = f"{checkpoint_id}.v"
    checkpoint["channel_versions"] = {"items": version}
    checkpoint["channel_values"] = {} if snapshot is None else {"items": snapshot}
    await saver.aput(cfg(thread, parent), checkpoint,  # type: ignore[arg-type]
                     {"source": "loop", "step": 0, "parents": {}}, {"items": version})
    await saver.aput_writes(cfg(thread, checkpoint_id),
                            [("items", f"w-{checkpoint_id}"), ("other", "x")], task_id="task")
    return checkpoint_id


async def history(saver: TieredSaver, thread: str, checkpoint_id: str) -> Any:
    return await asyncio.wait_for(saver.aget_delta_channel_history(
        config=cfg(thread, checkpoint_id), channels=["items"]), timeout=30)


async def base_history(saver: TieredSaver, thread: str, checkpoint_id: str) -> Any:
    return await BaseCheckpointSaver.aget_delta_channel_history(
        saver, config=cfg(thread, checkpoint_id), channels=["items"])


async def test_a_branch_written_in_between_is_not_walked(saver: TieredSaver) -> None:
    t = "branches"
    a = await put(saver, t, new_id(), None, snapshot="seed")
    b = await put(saver, t, new_id(), a)
    # another branch off b, written before the start; its snapshot must not seed the walk
    c = await put(saver, t, new_id(), b)
    await put(saver, t, new_id(), c, snapshot="wrong")
    start = await put(saver, t, new_id(), b)
    fast = await history(saver, t, start)
    assert fast == await base_history(saver, t, start)
    # the seed's own writes count: they were made after its value was stored
    assert fast["items"] == {"seed": "seed", "writes": [("task", "items", f"w-{a}"),
                                                        ("task", "items", f"w-{b}")]}


async def test_a_parent_not_stored_ends_the_walk(saver: TieredSaver) -> None:
    t = "missing"
    a = await put(saver, t, new_id(), None, snapshot="seed")
    await put(saver, t, new_id(), a)
    gone = new_id()  # an older checkpoint id that nothing stored
    d = await put(saver, t, new_id(), gone)
    start = await put(saver, t, new_id(), d)
    fast = await history(saver, t, start)
    assert fast == await base_history(saver, t, start)
    assert fast["items"] == {"writes": [("task", "items", f"w-{d}")]}


async def test_a_parent_whose_id_sorts_above_its_child_is_followed(
        saver: TieredSaver) -> None:
    """Ids are time-ordered only within one writer: a writer whose clock runs behind
    stores a child whose id sorts below its parent's."""
    t = "late-parent"
    low, high = new_id(), new_id()
    a = await put(saver, t, new_id(), None, snapshot="seed")
    parent = await put(saver, t, high, a)
    child = await put(saver, t, low, parent)
    start = await put(saver, t, new_id(), child)
    fast = await history(saver, t, start)
    assert fast == await base_history(saver, t, start)
    assert [w[2] for w in fast["items"]["writes"]] == [f"w-{x}" for x in (a, parent, child)]
    assert fast["items"]["seed"] == "seed"


async def test_a_chain_that_loops_ends_where_it_comes_back(saver: TieredSaver) -> None:
    """Storing a checkpoint again under one of its descendants makes the chain a loop;
    LangGraph's own walk would go round forever."""
    t = "loop"
    a, b = new_id(), new_id()
    await put(saver, t, a, None)
    await put(saver, t, b, a)
    await put(saver, t, a, b)  # a again, now a child of b
    start = await put(saver, t, new_id(), b)
    fast = await history(saver, t, start)
    assert fast["items"] == {"writes": [("task", "items", f"w-{a}"),
                                        ("task", "items", f"w-{b}")]}


# -- loading a thread ---------------------------------------------------------------------


class Snapshots(TypedDict):
    items: Annotated[list[str], DeltaChannel(extend, snapshot_frequency=1)]
    n: int


def extend(state: list[str], batches: Sequence[list[str]]) -> list[str]:
    return [*state, *(item for batch in batches for item in batch)]


def write_then_count() -> Any:
    """``write`` updates the delta channel (a snapshot at every update), ``count`` does not:
    the head names the channel at the snapshot's version and stores no value of its own."""
    g = StateGraph(Snapshots)
    g.add_node("write", lambda s: {"items": [f"i{s['n']}"]})
    g.add_node("count", lambda s: {"n": s["n"] + 1})
    g.add_edge(START, "write")
    g.add_edge("write", "count")
    g.add_edge("count", END)
    return g


async def test_a_head_after_a_snapshot_loads_without_a_walk(saver: TieredSaver) -> None:
    """Read from warm, a head whose channel is unchanged since a snapshot carries the
    snapshot (its blob is named at that version); read from the hot tier it must too,
    or LangGraph walks the ancestors for what the read could have handed over."""
    app = write_then_count().compile(checkpointer=saver)
    await app.ainvoke({"items": ["a"], "n": 0}, cfg("snap"))
    warm = saver.regions.by_name["default"].warm
    counts = count_calls(warm, ["get", "ancestors"])
    out = await app.ainvoke({"items": ["b"], "n": 5}, cfg("snap"))
    assert out["items"] == ["a", "i0", "b", "i5"]
    assert counts["ancestors"] == 0
    latest = await saver.aget_tuple(cfg("snap"))
    assert latest is not None
    assert latest.checkpoint["channel_values"]["items"].value == ["a", "i0", "b", "i5"]


class Plain(TypedDict):
    items: Annotated[list[str], operator.add]
    n: int


def appender(schema: Any) -> Any:
    g = StateGraph(schema)
    g.add_node("step", lambda s: {"items": [f"s{s['n']}"], "n": s["n"] + 1})
    g.add_edge(START, "step")
    g.add_edge("step", END)
    return g


MIGRATED = ["in0", "s0", "in1", "s10", "in2", "s20", "in3", "s30", "in4", "s40"]


async def migrate_a_thread(saver: TieredSaver) -> Any:
    """Turns while ``items`` was a plain list channel (this saver stores it as a delta
    chain of its own), then turns with ``items`` a DeltaChannel."""
    before = appender(Plain).compile(checkpointer=saver)
    for turn in range(3):
        await before.ainvoke({"items": [f"in{turn}"], "n": turn * 10}, cfg("migrated"))
    after = appender(Sparse).compile(checkpointer=saver)
    for turn in range(3, 5):
        await after.ainvoke({"items": [f"in{turn}"], "n": turn * 10}, cfg("migrated"))
    return after


async def assert_every_history_as_base(saver: TieredSaver, thread: str) -> None:
    configs = [t.config async for t in saver.alist(cfg(thread))]
    fast = [await saver.aget_delta_channel_history(config=c, channels=["items"])
            for c in configs]
    base = [await BaseCheckpointSaver.aget_delta_channel_history(saver, config=c,
                                                                 channels=["items"])
            for c in configs]
    assert fast == base
    assert any("seed" in h["items"] for h in fast)


async def test_a_list_stored_before_the_channel_became_a_delta_channel_seeds_it(
        saver: TieredSaver) -> None:
    """The last plain value is the seed, as LangGraph's walk finds it, and the writes
    before it do not count."""
    after = await migrate_a_thread(saver)
    await assert_every_history_as_base(saver, "migrated")
    assert (await after.aget_state(cfg("migrated"))).values["items"] == MIGRATED


@pytest.fixture(params=sorted(ARCHIVING_STACKS))
def archiving_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return ARCHIVING_STACKS[request.param](request, tmp_path)


async def test_an_archived_list_seeds_it_from_its_segment(archiving_urls: Urls) -> None:
    async with archiving_urls.open() as saver:
        after = await migrate_a_thread(saver)
        report = await HistoryDemotion(saver, TieringPolicy(
            archive_after=0, archive_idle_after=0, segment_size=4)).run_once(
                now=time.time() + 10 * 365 * 86400.0)
        assert report.errors == [] and report.checkpoints > 0
        await assert_every_history_as_base(saver, "migrated")
        assert (await after.aget_state(cfg("migrated"))).values["items"] == MIGRATED


class Sparse(TypedDict):
    items: Annotated[list[str], DeltaChannel(extend, snapshot_frequency=1000)]
    n: int
