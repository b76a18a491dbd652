"""Optimistic locking under real races, on every stack."""

from __future__ import annotations

import asyncio
import json
import operator
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, interrupt

from tests.stacks import MULTIPROCESS_STACKS, STACKS, Urls
from tierstore import (
    ConfigurationError,
    Keyring,
    TieredSaver,
    TurnInProgress,
    VersionConflict,
)
from tierstore.concurrency import TURN_KEY, retry_on_conflict, retry_on_conflict_sync
from tierstore.demo import build_agent


@pytest.fixture(params=sorted(STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


def open_saver(urls: Urls, **options: Any) -> TieredSaver:
    return urls.open(**options)


def ask(text: str) -> dict[str, Any]:
    return {"messages": [HumanMessage(text)]}


def cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


async def single_chain(saver: TieredSaver, thread: str) -> bool:
    """True when no checkpoint of the thread has two children (no silent fork)."""
    parents = Counter([
        t.parent_config["configurable"]["checkpoint_id"]
        async for t in saver.alist(cfg(thread)) if t.parent_config is not None
    ])
    return all(n == 1 for n in parents.values())


async def one_chain(saver: TieredSaver, thread: str) -> bool:
    """True when the history is one line: each checkpoint's parent is the next one listed."""
    history = [t async for t in saver.alist(cfg(thread))]
    ids = [t.config["configurable"]["checkpoint_id"] for t in history]
    parents = [t.parent_config["configurable"]["checkpoint_id"] if t.parent_config else None
               for t in history]
    return parents == [*ids[1:], None]


def human_texts(values: dict[str, Any]) -> Counter[str]:
    return Counter(str(m.content) for m in values["messages"] if isinstance(m, HumanMessage))


async def test_strict_race_with_retry_keeps_every_input_exactly_once(urls: Urls) -> None:
    async with open_saver(urls, concurrency="strict") as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke(ask("hello"), cfg("race"))
        await asyncio.gather(*(retry_on_conflict(app.ainvoke, ask(f"remember item {i}"),
                                                 cfg("race")) for i in range(20)))
        values = (await app.aget_state(cfg("race"))).values
        # every input landed once, and every turn ran to its end once
        assert human_texts(values) == Counter(
            ["hello", *(f"remember item {i}" for i in range(20))])
        assert Counter(values["notes"]) == Counter(f"item {i}" for i in range(20))
        assert values["turns"] == 21
        assert await one_chain(saver, "race")


def test_strict_race_with_sync_retry_keeps_every_input_exactly_once(urls: Urls) -> None:
    with open_saver(urls, concurrency="strict") as saver:
        app = build_agent().compile(checkpointer=saver)
        app.invoke(ask("hello"), cfg("sync-race"))
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda i: retry_on_conflict_sync(
                app.invoke, ask(f"remember item {i}"), cfg("sync-race")), range(16)))
        values = app.get_state(cfg("sync-race")).values
        assert human_texts(values) == Counter(
            ["hello", *(f"remember item {i}" for i in range(16))])
        assert Counter(values["notes"]) == Counter(f"item {i}" for i in range(16))
        history = list(saver.list(cfg("sync-race")))
        assert [t.parent_config["configurable"]["checkpoint_id"] if t.parent_config else None
                for t in history] == [
            t.config["configurable"]["checkpoint_id"] for t in history[1:]] + [None]


class Steps(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    log: Annotated[list[str], operator.add]


def interrupted_turn_graph(saver: TieredSaver, thread: str) -> Any:
    """A turn whose first step lets another writer (``update_state``) move the head.

    The turn's input is stored, then its next write finds a new head and is refused:
    the case a retry must finish without sending the input again.
    """
    cut = asyncio.Event()

    async def first(state: Steps) -> dict[str, Any]:
        if not cut.is_set():
            cut.set()
            await app.aupdate_state(cfg(thread), {"log": ["side write"]})
        return {"log": ["first"]}

    def second(state: Steps) -> dict[str, Any]:
        return {"log": ["second"]}

    builder: StateGraph[Steps] = StateGraph(Steps)
    builder.add_node("first", first)
    builder.add_node("second", second)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", END)
    app = builder.compile(checkpointer=saver)
    return app


async def test_strict_retry_continues_a_turn_whose_input_landed(urls: Urls) -> None:
    async with open_saver(urls, concurrency="strict") as saver:
        app = interrupted_turn_graph(saver, "cut")
        with pytest.raises(VersionConflict):  # without the helper the turn is cut off
            await app.ainvoke(ask("once"), cfg("cut"), durability="sync")
        app = interrupted_turn_graph(saver, "cut2")
        # durability="sync": the turn's first step is stored before the side write lands
        await retry_on_conflict(app.ainvoke, ask("once"), cfg("cut2"), durability="sync")
        values = (await app.aget_state(cfg("cut2"))).values
        assert human_texts(values) == Counter(["once"])
        assert Counter(values["log"]) == Counter(["side write", "first", "second"])
        assert not (await app.aget_state(cfg("cut2"))).next
        assert await one_chain(saver, "cut2")


async def test_strict_retry_with_a_caller_turn_id_is_idempotent(urls: Urls) -> None:
    """A client that re-submits a request under the same turn id does not apply it twice."""
    async with open_saver(urls, concurrency="strict") as saver:
        app = build_agent().compile(checkpointer=saver)
        config = {**cfg("idem"), "metadata": {TURN_KEY: "request-42"}}
        await retry_on_conflict(app.ainvoke, ask("remember once"), config)
        await retry_on_conflict(app.ainvoke, ask("remember once"), config)
        values = (await app.aget_state(cfg("idem"))).values
        assert human_texts(values) == Counter(["remember once"])
        assert values["notes"] == ["once"]


async def test_turns_are_recognised_under_encryption(urls: Urls) -> None:
    """The turn id stays filterable in clear when metadata is encrypted (it is a random id)."""
    keyring = Keyring(current="k1", keys={"k1": Keyring.generate_key()})
    async with open_saver(urls, concurrency="strict", encryption=keyring) as saver:
        assert saver.filter_doc({TURN_KEY: "t-1", "user": "secret"}) == {TURN_KEY: "t-1"}
        app = interrupted_turn_graph(saver, "enc")
        await retry_on_conflict(app.ainvoke, ask("once"), cfg("enc"), durability="sync")
        values = (await app.aget_state(cfg("enc"))).values
        assert human_texts(values) == Counter(["once"])
        assert Counter(values["log"]) == Counter(["side write", "first", "second"])
        app = build_agent().compile(checkpointer=saver)
        config = {**cfg("enc-idem"), "metadata": {TURN_KEY: "request-7"}}
        for _ in range(2):
            await retry_on_conflict(app.ainvoke, ask("remember once"), config)
        assert human_texts((await app.aget_state(cfg("enc-idem"))).values) == Counter(
            ["remember once"])


async def test_strict_refuses_an_input_that_would_discard_a_turn_in_progress(
        urls: Urls) -> None:
    async with open_saver(urls, concurrency="strict") as saver:
        started, release = asyncio.Event(), asyncio.Event()

        async def slow(state: Steps) -> dict[str, Any]:
            if not started.is_set():
                started.set()
                await release.wait()
            return {"log": ["slow"]}

        builder: StateGraph[Steps] = StateGraph(Steps)
        builder.add_node("slow", slow)
        builder.add_edge(START, "slow")
        builder.add_edge("slow", END)
        app = builder.compile(checkpointer=saver)
        # durability="sync": the turn's input is stored before its node runs (LangGraph's
        # default stores it in the background, and a second input racing it on a new
        # thread, with no head to name, is a plain VersionConflict)
        first = asyncio.create_task(app.ainvoke(ask("first"), cfg("busy"), durability="sync"))
        await started.wait()
        with pytest.raises(TurnInProgress) as refused:
            await app.ainvoke(ask("second"), cfg("busy"))
        assert refused.value.thread_id == "busy" and refused.value.head_id
        release.set()
        await first
        await app.ainvoke(ask("second"), cfg("busy"))
        values = (await app.aget_state(cfg("busy"))).values
        assert human_texts(values) == Counter(["first", "second"])
        assert values["log"] == ["slow", "slow"]
        assert await one_chain(saver, "busy")


async def test_strict_thread_held_by_a_cancelled_turn_is_freed_by_finishing_it(
        urls: Urls) -> None:
    """A turn that stopped without a trace keeps its input; finishing it frees the thread."""
    async with open_saver(urls, concurrency="strict") as saver:
        started, blocked = asyncio.Event(), True

        async def slow(state: Steps) -> dict[str, Any]:
            started.set()
            if blocked:
                await asyncio.Event().wait()
            return {"log": ["slow"]}

        builder: StateGraph[Steps] = StateGraph(Steps)
        builder.add_node("slow", slow)
        builder.add_edge(START, "slow")
        builder.add_edge("slow", END)
        app = builder.compile(checkpointer=saver)
        turn = asyncio.create_task(app.ainvoke(ask("first"), cfg("stuck"), durability="sync"))
        await started.wait()
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
        with pytest.raises(TurnInProgress):  # sync: refused before its own steps would run
            await app.ainvoke(ask("second"), cfg("stuck"), durability="sync")
        blocked = False
        await app.ainvoke(None, cfg("stuck"))  # finish the stopped turn
        await app.ainvoke(ask("second"), cfg("stuck"))
        values = (await app.aget_state(cfg("stuck"))).values
        assert human_texts(values) == Counter(["first", "second"])
        assert values["log"] == ["slow", "slow"]
        assert await one_chain(saver, "stuck")


async def test_strict_input_may_abandon_an_interrupt(urls: Urls) -> None:
    """A thread paused on ``interrupt()`` waits for a human: new input moves on, as in LangGraph."""
    async with open_saver(urls, concurrency="strict") as saver:
        def gate(state: Steps) -> dict[str, Any]:
            answer = interrupt("approve?")
            return {"log": [str(answer)]}

        builder: StateGraph[Steps] = StateGraph(Steps)
        builder.add_node("gate", gate)
        builder.add_edge(START, "gate")
        builder.add_edge("gate", END)
        app = builder.compile(checkpointer=saver)
        await app.ainvoke(ask("one"), cfg("hitl"))
        assert (await app.aget_state(cfg("hitl"))).next == ("gate",)
        await app.ainvoke(ask("two"), cfg("hitl"))
        await app.ainvoke(Command(resume="yes"), cfg("hitl"))
        values = (await app.aget_state(cfg("hitl"))).values
        assert human_texts(values) == Counter(["one", "two"])
        assert values["log"] == ["yes"]


@pytest.mark.parametrize("stack", sorted(MULTIPROCESS_STACKS | {"redis+postgres"}))
def test_strict_retry_across_processes_keeps_every_input_exactly_once(
        stack: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    target = STACKS[stack](request, tmp_path)
    if not isinstance(target.warm, str):
        pytest.skip("the worker processes open the stack from its URLs")
    processes, turns = 4, 5
    with target.open(concurrency="strict") as saver:
        app = build_agent().compile(checkpointer=saver)
        app.invoke(ask("hello"), cfg("procs"))
    spec = json.dumps({"hot": target.hot, "warm": target.warm, "cold": target.cold,
                       "thread": "procs", "turns": turns})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    workers = [subprocess.Popen([sys.executable, "-m", "tests.integration.turn_worker", spec,
                                 str(n)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
               for n in range(processes)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    with target.open(concurrency="strict") as saver:
        app = build_agent().compile(checkpointer=saver)
        values = app.get_state(cfg("procs")).values
        items = [f"p{n} item {i}" for n in range(processes) for i in range(turns)]
        assert human_texts(values) == Counter(["hello", *(f"remember {x}" for x in items)])
        assert Counter(values["notes"]) == Counter(items)
        history = list(saver.list(cfg("procs")))
        assert [t.parent_config["configurable"]["checkpoint_id"] if t.parent_config else None
                for t in history] == [
            t.config["configurable"]["checkpoint_id"] for t in history[1:]] + [None]


async def test_strict_race_without_retry_refuses_the_losers(urls: Urls) -> None:
    async with open_saver(urls, concurrency="strict") as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke(ask("hello"), cfg("losers"))
        results = await asyncio.gather(
            *(app.ainvoke(ask(f"remember item {i}"), cfg("losers")) for i in range(10)),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, dict)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert len(winners) >= 1 and len(winners) + len(losers) == 10
        assert all(isinstance(e, VersionConflict) for e in losers)
        assert all(e.thread_id == "losers" and e.head_id for e in losers)  # type: ignore[attr-defined]
        notes = (await app.aget_state(cfg("losers"))).values["notes"]
        assert len(notes) == len(winners)  # a refused turn left nothing behind
        assert await single_chain(saver, "losers")


async def test_permissive_race_is_counted_as_conflicts(urls: Urls) -> None:
    async with open_saver(urls) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke(ask("hello"), cfg("perm"))
        results = await asyncio.gather(
            *(app.ainvoke(ask(f"remember item {i}"), cfg("perm")) for i in range(10)))
        assert len(results) == 10  # LangGraph semantics: nobody is refused
        assert saver.stats.conflicts >= 1
        assert not await single_chain(saver, "perm")  # the history forked, and we said so


async def test_strict_mode_allows_explicit_forks(urls: Urls) -> None:
    async with open_saver(urls, concurrency="strict") as saver:
        app = build_agent().compile(checkpointer=saver)
        for text in ("what is 1 + 1", "remember blue", "what is 2 + 2"):
            await app.ainvoke(ask(text), cfg("fork"))
        history = [s async for s in app.aget_state_history(cfg("fork"))]
        first = next(s for s in reversed(history) if s.values.get("turns") == 1 and not s.next)
        forked = await app.ainvoke(ask("what do you remember"), first.config)  # time travel
        assert forked["messages"][-1].content == "I remember: nothing yet."
        updated = await app.aupdate_state(history[3].config, {"notes": ["edited"]})
        assert updated["configurable"]["checkpoint_id"]
        with pytest.raises(ConfigurationError):
            await retry_on_conflict(app.ainvoke, ask("x"), first.config)
