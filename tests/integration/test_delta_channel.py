"""LangGraph's ``DeltaChannel`` on every stack: states and histories as on InMemorySaver,
archived ancestors included, and its history in a bounded number of warm calls."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from tests.calls import count_calls
from tests.stacks import ARCHIVING_STACKS, STACKS, Urls
from tierstore import TieredSaver
from tierstore.history import PAGE
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, IdleArchival

FUTURE = 10 * 365 * 86400.0  # "now" for the jobs: everything written in the test is old
ARCHIVE_ALL = TieringPolicy(archive_after=0, archive_idle_after=0, segment_size=4)


def extend(state: list[str], batches: Sequence[list[str]]) -> list[str]:
    """Order-sensitive on purpose: parallel writers must be replayed in live order."""
    out = list(state)
    for batch in batches:
        out.extend(batch)
    return out


class State(TypedDict):
    items: Annotated[list[str], DeltaChannel(extend, snapshot_frequency=3)]
    n: int


class Sparse(TypedDict):
    items: Annotated[list[str], DeltaChannel(extend, snapshot_frequency=1000)]
    n: int


def fan_out_graph() -> Any:
    """Two nodes write the delta channel in the same step; a third asks the user."""

    def ask(state: State) -> dict[str, Any]:
        if state["n"] % 3 != 2:
            return {}
        answer = interrupt(f"confirm {state['n']}?")
        return {"items": [f"answer:{answer}"]}

    g = StateGraph(State)
    g.add_node("a", lambda s: {"items": [f"a{s['n']}"], "n": s["n"] + 1})
    g.add_node("b", lambda s: {"items": [f"b{s['n']}"]})
    g.add_node("ask", ask)
    g.add_edge(START, "a")
    g.add_edge(START, "b")
    g.add_edge("a", "ask")
    g.add_edge("b", "ask")
    g.add_edge("ask", END)
    return g


def chain_graph(steps: int) -> Any:
    g = StateGraph(Sparse)
    g.add_node("step", lambda s: {"items": [f"s{s['n']}"], "n": s["n"] + 1})
    g.add_edge(START, "step")
    g.add_conditional_edges("step", lambda s: END if s["n"] >= steps else "step")
    return g


def seen_by_user(out: dict[str, Any]) -> dict[str, Any]:
    """A run's output without interrupt ids (they derive from checkpoint ids)."""
    return {k: [i.value for i in v] if k == "__interrupt__" else v for k, v in out.items()}


def cfg(thread: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    configurable: dict[str, Any] = {"thread_id": thread}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


async def scenario(saver: BaseCheckpointSaver[Any]) -> list[Any]:
    """Turns with parallel writers and interrupts, update_state, and a fork off history.

    Returns what a user sees of the thread: every state of its history (checkpoint
    ids differ between savers; values, next nodes and metadata do not) and the final
    states of the main line and the fork.
    """
    app = fan_out_graph().compile(checkpointer=saver)
    seen: list[Any] = []
    for turn in range(4):
        out = await app.ainvoke({"items": [f"in{turn}"], "n": turn * 2}, cfg("t"))
        seen.append(seen_by_user(out))
        if "__interrupt__" in out:
            seen.append(seen_by_user(await app.ainvoke(Command(resume=f"yes{turn}"),
                                                       cfg("t"))))
    await app.aupdate_state(cfg("t"), {"items": ["patched"]})
    seen.append((await app.aget_state(cfg("t"))).values)
    history = [s async for s in app.aget_state_history(cfg("t"))]
    # fork: change an old state, then run on from it
    old = history[len(history) // 2].config
    forked = await app.aupdate_state(old, {"items": ["forked"]})
    seen.append(seen_by_user(await app.ainvoke({"items": ["after-fork"], "n": 5}, forked)))
    seen.append((await app.aget_state(forked)).values)
    seen.extend([(s.values, s.next, s.metadata.get("step") if s.metadata else None)
                 async for s in app.aget_state_history(cfg("t"))])
    return seen


async def assert_fast_walk_matches_base(saver: TieredSaver, thread: str) -> int:
    """Every checkpoint's DeltaChannel history, fast walk against LangGraph's own walk
    (``get_tuple`` per ancestor) on the very same stored checkpoints.

    The fast walks go first: the default walk rehydrates the archived ancestors it reads.
    """
    configs = [tup.config async for tup in saver.alist(cfg(thread))]
    fast = [await saver.aget_delta_channel_history(config=c, channels=["items"])
            for c in configs]
    base = [await BaseCheckpointSaver.aget_delta_channel_history(saver, config=c,
                                                                 channels=["items"])
            for c in configs]
    assert fast == base
    return len(configs)


@pytest.fixture(params=sorted(STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


@pytest.fixture
async def saver(urls: Urls) -> AsyncIterator[TieredSaver]:
    async with urls.open() as s:
        yield s


async def test_delta_channel_graph_reads_as_on_in_memory(saver: TieredSaver) -> None:
    expected = await scenario(InMemorySaver())
    assert await scenario(saver) == expected
    assert await assert_fast_walk_matches_base(saver, "t") > 10


async def test_history_edge_cases_match_base(saver: TieredSaver) -> None:
    app = chain_graph(3).compile(checkpointer=saver)
    await app.ainvoke({"items": ["x"], "n": 0}, cfg("edge"))
    latest = await saver.aget_tuple(cfg("edge"))
    assert latest is not None
    root = [t async for t in saver.alist(cfg("edge"))][-1]
    for config, channels in [
        (cfg("edge"), ["items"]),                   # the latest, found as get finds it
        (cfg("edge"), ["items", "n", "nope"]),      # a plain channel, an unknown one
        (root.config, ["items"]),                   # no parent: nothing to replay
        (cfg("edge", "1ef00000-0000-6000-8000-000000000000"), ["items"]),  # not stored
        (cfg("no-such-thread"), ["items"]),
        (latest.config, []),
    ]:
        fast = await saver.aget_delta_channel_history(config=config, channels=channels)
        base = await BaseCheckpointSaver.aget_delta_channel_history(
            saver, config=config, channels=channels)
        assert fast == base, (config, channels)


def test_sync_delta_channel_graph(urls: Urls) -> None:
    with urls.open() as saver:
        app = chain_graph(4).compile(checkpointer=saver)
        app.invoke({"items": ["x"], "n": 0}, cfg("sync"))
        app.invoke({"items": ["y"], "n": 0}, cfg("sync"))
        mem = chain_graph(4).compile(checkpointer=InMemorySaver())
        mem.invoke({"items": ["x"], "n": 0}, cfg("sync"))
        mem.invoke({"items": ["y"], "n": 0}, cfg("sync"))
        assert [s.values for s in app.get_state_history(cfg("sync"))] == \
            [s.values for s in mem.get_state_history(cfg("sync"))]
        latest = saver.get_tuple(cfg("sync"))
        assert latest is not None
        assert saver.get_delta_channel_history(config=latest.config, channels=["items"]) == \
            BaseCheckpointSaver.get_delta_channel_history(saver, config=latest.config,
                                                          channels=["items"])


# -- archived ancestors ---------------------------------------------------------------


@pytest.fixture(params=sorted(ARCHIVING_STACKS))
def archiving_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return ARCHIVING_STACKS[request.param](request, tmp_path)


@pytest.mark.parametrize("job", [HistoryDemotion, IdleArchival])
async def test_archived_ancestors_read_from_their_segments(archiving_urls: Urls,
                                                           job: type[Any]) -> None:
    expected = await scenario(InMemorySaver())
    async with archiving_urls.open() as saver:
        assert await scenario(saver) == expected
        app = fan_out_graph().compile(checkpointer=saver)
        before = [(s.values, s.next) async for s in app.aget_state_history(cfg("t"))]
        report = await job(saver, ARCHIVE_ALL).run_once(now=time.time() + FUTURE)
        assert report.errors == []
        assert report.checkpoints > 0
        warm = saver.regions.by_name["default"].warm
        assert (await warm.usage()).archived > 0
        assert [(s.values, s.next) async for s in app.aget_state_history(cfg("t"))] == before
        assert await assert_fast_walk_matches_base(saver, "t") == len(before)
        # the thread goes on from its archived history, as it would have
        mem = fan_out_graph().compile(checkpointer=InMemorySaver())
        await scenario(mem.checkpointer)
        more = {"items": ["later"], "n": 1}
        assert seen_by_user(await app.ainvoke(more, cfg("t"))) == \
            seen_by_user(await mem.ainvoke(more, cfg("t")))


async def test_offloaded_writes_and_seeds_are_read_back(archiving_urls: Urls) -> None:
    """Writes and snapshots over the offload threshold live in the object store."""
    big = [secrets.token_hex(2048) for _ in range(4)]

    def graph() -> Any:
        g = StateGraph(State)
        g.add_node("step", lambda s: {"items": [big[s["n"]]], "n": s["n"] + 1})
        g.add_edge(START, "step")
        g.add_conditional_edges("step", lambda s: END if s["n"] >= len(big) else "step")
        return g

    mem = graph().compile(checkpointer=InMemorySaver())
    await mem.ainvoke({"items": [big[0]], "n": 0}, cfg("big"))
    expected = [s.values async for s in mem.aget_state_history(cfg("big"))]
    async with archiving_urls.open(offload_threshold=1024) as saver:
        app = graph().compile(checkpointer=saver)
        await app.ainvoke({"items": [big[0]], "n": 0}, cfg("big"))
        assert [s.values async for s in app.aget_state_history(cfg("big"))] == expected
        if saver.regions.by_name["default"].offloader is not None:  # MongoDB: GridFS's own
            assert saver.stats.offloaded > 0
        await HistoryDemotion(saver, ARCHIVE_ALL).run_once(now=time.time() + FUTURE)
        assert [s.values async for s in app.aget_state_history(cfg("big"))] == expected
        assert await assert_fast_walk_matches_base(saver, "big") == len(expected)


# -- round trips --------------------------------------------------------------------------


async def test_history_of_a_long_chain_costs_a_bounded_number_of_warm_calls(
        saver: TieredSaver) -> None:
    steps = 50
    app = chain_graph(steps).compile(checkpointer=saver)
    await app.ainvoke({"items": ["x"], "n": 0}, cfg("long"))
    latest = await saver.aget_tuple(cfg("long"))
    assert latest is not None
    warm = saver.regions.by_name["default"].warm
    counts = count_calls(warm, ["get", "list", "head", "ancestors"])
    fast = await saver.aget_delta_channel_history(config=latest.config, channels=["items"])
    assert "seed" not in fast["items"]  # no snapshot in 50 updates: back to the root
    assert len(fast["items"]["writes"]) == steps + 1
    assert sum(counts.values()) == counts["ancestors"] == 1
    base = await BaseCheckpointSaver.aget_delta_channel_history(
        saver, config=latest.config, channels=["items"])
    assert base == fast
    assert counts["get"] > steps  # the default walk: one read per ancestor
    # loading the thread reads the history once, whatever its length
    for name in counts:
        counts[name] = 0
    state = await app.aget_state(cfg("long"))
    assert len(state.values["items"]) == steps + 1
    assert counts["ancestors"] == 1
    assert counts["get"] <= 1


async def test_history_longer_than_a_page(saver: TieredSaver) -> None:
    steps = PAGE + 20
    app = chain_graph(steps).compile(checkpointer=saver)
    await app.ainvoke({"items": ["x"], "n": 0}, {**cfg("paged"), "recursion_limit": 1000})
    latest = await saver.aget_tuple(cfg("paged"))
    assert latest is not None
    warm = saver.regions.by_name["default"].warm
    counts = count_calls(warm, ["get", "ancestors"])
    fast = await saver.aget_delta_channel_history(config=latest.config, channels=["items"])
    assert counts == {"get": 0, "ancestors": 2}
    assert fast == await BaseCheckpointSaver.aget_delta_channel_history(
        saver, config=latest.config, channels=["items"])
