"""Real LangGraph graphs on a TieredSaver, on every stack of ``tests/stacks.py``."""

from __future__ import annotations

import asyncio
import operator
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import CheckpointMetadata
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from tests.stacks import STACKS, Urls
from tierstore import TieredSaver
from tierstore.demo import build_agent


@pytest.fixture(params=sorted(STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


def open_saver(urls: Urls, **options: Any) -> TieredSaver:
    return urls.open(**options)


@pytest.fixture
async def saver(urls: Urls) -> AsyncIterator[TieredSaver]:
    async with open_saver(urls) as s:
        yield s


def cfg(thread: str, **extra: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread, **extra}}


def text(result: dict[str, Any]) -> str:
    return str(result["messages"][-1].content)


async def test_multi_turn_memory_async(saver: TieredSaver) -> None:
    app = build_agent().compile(checkpointer=saver)
    await app.ainvoke({"messages": [HumanMessage("remember the code is 1234")]}, cfg("t1"))
    await app.ainvoke({"messages": [HumanMessage("what is 2 + 3")]}, cfg("t1"))
    out = await app.ainvoke({"messages": [HumanMessage("what do you remember")]}, cfg("t1"))
    assert text(out) == "I remember: the code is 1234."
    assert out["turns"] == 3
    assert len(out["messages"]) == 3 * 2 + 2 * 2  # 3 human+ai pairs, 2 tool round trips
    other = await app.ainvoke({"messages": [HumanMessage("what do you remember")]}, cfg("t2"))
    assert text(other) == "I remember: nothing yet."


def test_multi_turn_memory_sync(urls: Urls) -> None:
    with open_saver(urls) as saver:
        app = build_agent().compile(checkpointer=saver)
        app.invoke({"messages": [HumanMessage("remember sync works")]}, cfg("sync"))
        out = app.invoke({"messages": [HumanMessage("what do you remember")]}, cfg("sync"))
        assert text(out) == "I remember: sync works."
        assert saver.stats.hot_hits + saver.stats.warm_reads > 0
        states = list(app.get_state_history(cfg("sync")))
        assert len(states) == len(list(saver.list(cfg("sync"))))


def test_sync_methods_work_from_other_threads(urls: Urls) -> None:
    with open_saver(urls) as saver:
        app = build_agent().compile(checkpointer=saver)
        errors: list[BaseException] = []

        def converse(i: int) -> None:
            try:
                for turn in range(3):
                    app.invoke({"messages": [HumanMessage(f"what is {i} + {turn}")]},
                               cfg(f"thr-{i}"))
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=converse, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for i in range(4):
            assert app.get_state(cfg(f"thr-{i}")).values["turns"] == 3


class Approval(TypedDict, total=False):
    request: str
    decision: str
    log: Annotated[list[str], operator.add]


def approval_graph() -> StateGraph[Approval]:
    def ask(state: Approval) -> dict[str, Any]:
        decision = interrupt({"question": f"approve {state['request']}?"})
        return {"decision": decision, "log": [f"human said {decision}"]}

    def act(state: Approval) -> dict[str, Any]:
        return {"log": [f"acted on {state['decision']}"]}

    g: StateGraph[Approval] = StateGraph(Approval)
    g.add_node("ask", ask)
    g.add_node("act", act)
    g.add_edge(START, "ask")
    g.add_edge("ask", "act")
    g.add_edge("act", END)
    return g


async def test_interrupt_and_resume(saver: TieredSaver) -> None:
    app = approval_graph().compile(checkpointer=saver)
    first = await app.ainvoke({"request": "refund", "log": []}, cfg("approve"))
    assert first["__interrupt__"][0].value == {"question": "approve refund?"}
    state = await app.aget_state(cfg("approve"))
    assert state.next == ("ask",)
    assert state.tasks[0].interrupts[0].value == {"question": "approve refund?"}
    done = await app.ainvoke(Command(resume="yes"), cfg("approve"))
    assert done["log"] == ["human said yes", "acted on yes"]
    assert (await app.aget_state(cfg("approve"))).next == ()


async def test_interrupt_survives_reopen(urls: Urls) -> None:
    async with open_saver(urls) as saver:
        app = approval_graph().compile(checkpointer=saver)
        await app.ainvoke({"request": "deploy", "log": []}, cfg("reopen-int"))
    async with open_saver(urls) as saver:
        app = approval_graph().compile(checkpointer=saver)
        done = await app.ainvoke(Command(resume="no"), cfg("reopen-int"))
        assert done["log"] == ["human said no", "acted on no"]


async def test_time_travel_and_fork(saver: TieredSaver) -> None:
    app = build_agent().compile(checkpointer=saver)
    for msg in ("what is 1 + 1", "remember blue", "what is 5 x 5"):
        await app.ainvoke({"messages": [HumanMessage(msg)]}, cfg("tt"))
    history = [s async for s in app.aget_state_history(cfg("tt"))]
    ids = [s.config["configurable"]["checkpoint_id"] for s in history]
    assert ids == sorted(ids, reverse=True)
    # the state just after the first turn finished
    after_first = next(s for s in reversed(history) if s.values.get("turns") == 1 and not s.next)
    assert text(after_first.values) == "The answer is 2."
    forked = await app.ainvoke({"messages": [HumanMessage("what do you remember")]},
                               after_first.config)
    assert text(forked) == "I remember: nothing yet."  # the fork never saw "remember blue"
    latest = await app.aget_state(cfg("tt"))
    assert latest.values["turns"] == 2  # the newest checkpoint is the fork's
    assert text(latest.values) == "I remember: nothing yet."
    # the original branch is intact and readable by id
    original = await app.aget_state(history[0].config)
    assert text(original.values) == "The answer is 25."
    assert original.values["notes"] == ["blue"]


async def test_update_state(saver: TieredSaver) -> None:
    app = build_agent().compile(checkpointer=saver)
    await app.ainvoke({"messages": [HumanMessage("hello")]}, cfg("upd"))
    new_config = await app.aupdate_state(cfg("upd"), {"notes": ["injected by an operator"]})
    assert new_config["configurable"]["checkpoint_id"]
    out = await app.ainvoke({"messages": [HumanMessage("what do you remember")]}, cfg("upd"))
    assert text(out) == "I remember: injected by an operator."
    tup = await saver.aget_tuple(new_config)
    assert tup is not None and tup.metadata["source"] == "update"


class Outer(TypedDict, total=False):
    topic: str
    trail: Annotated[list[str], operator.add]


def subgraph_app(saver: Any) -> Any:
    def inner_a(state: Outer) -> dict[str, Any]:
        return {"trail": [f"inner-a:{state['topic']}"]}

    def inner_b(state: Outer) -> dict[str, Any]:
        answer = interrupt("inner needs input")
        return {"trail": [f"inner-b:{answer}"]}

    inner: StateGraph[Outer] = StateGraph(Outer)
    inner.add_node("a", inner_a)
    inner.add_node("b", inner_b)
    inner.add_edge(START, "a")
    inner.add_edge("a", "b")
    inner.add_edge("b", END)

    outer: StateGraph[Outer] = StateGraph(Outer)
    outer.add_node("start", lambda s: {"trail": ["outer-start"]})
    outer.add_node("sub", inner.compile())
    outer.add_node("finish", lambda s: {"trail": ["outer-finish"]})
    outer.add_edge(START, "start")
    outer.add_edge("start", "sub")
    outer.add_edge("sub", "finish")
    outer.add_edge("finish", END)
    return outer.compile(checkpointer=saver)


async def test_subgraph_uses_a_checkpoint_namespace(saver: TieredSaver) -> None:
    app = subgraph_app(saver)
    await app.ainvoke({"topic": "x", "trail": []}, cfg("sub"))
    namespaces = {t.config["configurable"]["checkpoint_ns"] async for t in saver.alist(cfg("sub"))}
    assert "" in namespaces
    assert any(ns.startswith("sub:") for ns in namespaces)
    state = await app.aget_state(cfg("sub"), subgraphs=True)
    assert state.tasks[0].state is not None  # the paused subgraph's own state
    done = await app.ainvoke(Command(resume="ok"), cfg("sub"))
    # LangGraph's reference saver, same graph, same inputs: the results must agree
    reference = subgraph_app(InMemorySaver())
    await reference.ainvoke({"topic": "x", "trail": []}, cfg("sub"))
    expected = await reference.ainvoke(Command(resume="ok"), cfg("sub"))
    assert done == expected
    assert "inner-b:ok" in done["trail"] and done["trail"][-1] == "outer-finish"


async def test_state_survives_close_and_reopen(urls: Urls) -> None:
    async with open_saver(urls) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember persistence")]}, cfg("durable"))
        before = [t.checkpoint["id"] async for t in saver.alist(cfg("durable"))]
    async with open_saver(urls) as saver:
        app = build_agent().compile(checkpointer=saver)
        after = [t.checkpoint["id"] async for t in saver.alist(cfg("durable"))]
        assert after == before
        out = await app.ainvoke({"messages": [HumanMessage("what do you remember")]},
                                cfg("durable"))
        assert text(out) == "I remember: persistence."


async def test_concurrent_conversations(saver: TieredSaver) -> None:
    app = build_agent().compile(checkpointer=saver)

    async def converse(i: int) -> int:
        for turn in range(4):
            out = await app.ainvoke({"messages": [HumanMessage(f"what is {i} x {turn}")]},
                                    cfg(f"conc-{i}"))
            assert text(out) == f"The answer is {i * turn}."
        return int((await app.aget_state(cfg(f"conc-{i}"))).values["turns"])

    turns = await asyncio.gather(*(converse(i) for i in range(10)))
    assert turns == [4] * 10


async def test_messages_round_trip_exactly(saver: TieredSaver) -> None:
    app = build_agent().compile(checkpointer=saver)
    out = await app.ainvoke({"messages": [HumanMessage("what is 7 - 9", id="h1")]}, cfg("msg"))
    state = await app.aget_state(cfg("msg"))
    assert state.values["messages"] == out["messages"]
    assert isinstance(state.values["messages"][1], AIMessage)
    assert state.values["messages"][1].tool_calls[0]["args"] == {"expr": "7 - 9"}


async def test_two_savers_on_one_thread_never_read_stale_state(urls: Urls) -> None:
    # two processes' worth of savers on the same stores; each keeps local copies and
    # write-behind hot updates, and must still see the other's newest turn
    async with open_saver(urls) as one, open_saver(urls) as two:
        app_one = build_agent().compile(checkpointer=one)
        app_two = build_agent().compile(checkpointer=two)
        for i in range(3):
            await app_one.ainvoke({"messages": [HumanMessage(f"remember one-{i}")]}, cfg("shared"))
            await app_two.ainvoke({"messages": [HumanMessage(f"remember two-{i}")]},
                                  cfg("shared"))
        expected = [f"{who}-{i}" for i in range(3) for who in ("one", "two")]
        for app in (app_one, app_two):
            assert (await app.aget_state(cfg("shared"))).values["notes"] == expected


def thread(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id}}


# What LangGraph's Agent Server puts in ``configurable`` for one request (its
# ``_TRANSIENT_CONFIGURABLE_KEYS``), beside the keys every run carries.
REQUEST_KEYS = {
    "langgraph_request_id": "req-1",
    "langgraph_auth_user_id": "user-1",
    "langgraph_auth_permissions": ["threads:write"],
    "langgraph_auth_user": object(),
}


async def test_metadata_is_what_langgraph_savers_store(saver: TieredSaver) -> None:
    """Checkpoint metadata as LangGraph's own savers store it (``get_checkpoint_metadata``:
    InMemorySaver, AsyncPostgresSaver), request-scoped keys of the Agent Server included:
    a run's config, and a put whose metadata the server's adapter stripped of them."""
    reference = InMemorySaver()
    config: RunnableConfig = {
        "configurable": {"thread_id": "md", "graph_id": "agent", **REQUEST_KEYS},
        "metadata": {"assistant_id": "a-1", "langgraph_request_id": "req-1"}}
    runs: list[list[dict[str, Any]]] = []
    for checkpointer in (saver, reference):
        app: Any = build_agent().compile(checkpointer=checkpointer)
        await app.ainvoke({"messages": [HumanMessage("remember md")]}, config)
        runs.append([dict(t.metadata) async for t in checkpointer.alist(thread("md"))])
    assert runs[0] == runs[1]
    assert runs[0][0]["langgraph_request_id"] == "req-1"  # as LangGraph's savers keep it
    stripped: CheckpointMetadata = {"source": "update", "step": 5, "parents": {}}
    latest = await reference.aget_tuple(thread("md"))
    assert latest is not None
    put_config: RunnableConfig = {"configurable": {"thread_id": "md-put", "checkpoint_ns": "",
                                                   **REQUEST_KEYS}}
    stored = []
    for checkpointer in (saver, reference):  # the adapter's aput: metadata stripped
        await checkpointer.aput(put_config, latest.checkpoint, stripped, {})
        got = await checkpointer.aget_tuple(thread("md-put"))
        assert got is not None
        stored.append(got.metadata)
    assert stored[0] == stored[1]
