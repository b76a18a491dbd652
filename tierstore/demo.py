"""``tierstore demo``: a deterministic agent on the embedded stack, in a few seconds.

The agent is a real LangGraph ``StateGraph`` (plan → tool? → respond) with no LLM
and no network: a tiny rule-based planner calls a calculator or a notebook tool.
The demo runs several conversations, shows what sits in each tier, time-travels
one conversation to an earlier checkpoint and forks it, then closes the saver,
reopens it on the same files and resumes a conversation where it stopped.
"""

from __future__ import annotations

import asyncio
import operator
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from tierstore.saver import TieredSaver

__all__ = ["AgentState", "build_agent", "run_demo"]


class AgentState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    notes: Annotated[list[str], operator.add]
    turns: int


_ARITH = re.compile(r"(-?\d+)\s*([+\-*x])\s*(-?\d+)")


def _plan(state: AgentState) -> dict[str, Any]:
    last = state["messages"][-1]
    text = str(last.content)
    turn = state.get("turns", 0) + 1
    if match := _ARITH.search(text):
        call = {"name": "calculator", "args": {"expr": match.group(0)}, "id": f"call-{turn}"}
        return {"messages": [AIMessage("", tool_calls=[call])], "turns": turn}
    if text.lower().startswith("remember "):
        note = text[len("remember "):].strip()
        call = {"name": "notebook", "args": {"note": note}, "id": f"call-{turn}"}
        return {"messages": [AIMessage("", tool_calls=[call])], "turns": turn}
    return {"turns": turn}


def _tool(state: AgentState) -> dict[str, Any]:
    last = state["messages"][-1]
    if not isinstance(last, AIMessage) or not last.tool_calls:
        raise ValueError("the tool node runs only after a tool call")
    call = last.tool_calls[0]
    if call["name"] == "calculator":
        a, op, b = _ARITH.search(call["args"]["expr"]).groups()  # type: ignore[union-attr]
        x, y = int(a), int(b)
        result = {"+": x + y, "-": x - y, "*": x * y, "x": x * y}[op]
        return {"messages": [ToolMessage(str(result), tool_call_id=call["id"])]}
    note = call["args"]["note"]
    return {
        "messages": [ToolMessage(f"noted: {note}", tool_call_id=call["id"])],
        "notes": [note],
    }


def _respond(state: AgentState) -> dict[str, Any]:
    last = state["messages"][-1]
    if isinstance(last, ToolMessage):
        if str(last.content).startswith("noted: "):
            return {"messages": [AIMessage("Got it, I will remember that.")]}
        return {"messages": [AIMessage(f"The answer is {last.content}.")]}
    notes = state.get("notes", [])
    if "what do you remember" in str(last.content).lower():
        said = "; ".join(notes) if notes else "nothing yet"
        return {"messages": [AIMessage(f"I remember: {said}.")]}
    return {"messages": [AIMessage(f"(turn {state.get('turns', 0)}) you said: {last.content}")]}


def _route(state: AgentState) -> str:
    last = state["messages"][-1]
    return "tool" if isinstance(last, AIMessage) and last.tool_calls else "respond"


def build_agent() -> StateGraph[AgentState]:
    """The demo agent: plan → (tool →) respond. Deterministic, no I/O."""
    builder: StateGraph[AgentState] = StateGraph(AgentState)
    builder.add_node("plan", _plan)
    builder.add_node("tool", _tool)
    builder.add_node("respond", _respond)
    builder.add_edge(START, "plan")
    builder.add_conditional_edges("plan", _route, {"tool": "tool", "respond": "respond"})
    builder.add_edge("tool", "respond")
    builder.add_edge("respond", END)
    return builder


CONVERSATIONS: dict[str, list[str]] = {
    "alice": ["hello", "what is 6 x 7", "remember the launch is on friday", "thanks"],
    "bob": ["remember my dog is called rex", "what is 120 - 78", "hi again"],
    "carol": ["what is 3 + 4", "remember tea not coffee", "what do you remember",
              "bye"],
}


@dataclass
class _Printer:
    out: Callable[[str], None]

    def step(self, title: str) -> None:
        self.out(f"\n== {title}")

    def line(self, text: str) -> None:
        self.out(f"   {text}")


def _say(message: AnyMessage) -> str:
    return str(message.content)


def _ask(text: str) -> AgentState:
    return {"messages": [HumanMessage(text)]}


def _thread(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id}}


def _open(urls: dict[str, str]) -> TieredSaver:
    return TieredSaver.from_urls(hot=urls["hot"], warm=urls["warm"], cold=urls["cold"])


def run_demo(directory: str | Path | None = None, *, out: Callable[[str], None] = print,
             tiering: bool = True) -> dict[str, Any]:
    """Run the demo; returns the facts it printed (tests check them).

    ``tiering=False`` stops before step 5 and leaves every checkpoint warm.
    """
    keep = directory is not None
    root = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="tierstore-"))
    if keep and root.exists():
        shutil.rmtree(root / "warm.db", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    urls = {"hot": "memory://", "warm": f"sqlite:///{root}/warm.db", "cold": f"file://{root}/cold"}
    p = _Printer(out)
    facts: dict[str, Any] = {"directory": str(root)}
    started = time.perf_counter()
    out(f"tierstore demo: embedded stack under {root}")
    out(f"   hot={urls['hot']}  warm={urls['warm']}  cold={urls['cold']}")
    try:
        facts.update(_run(urls, p, tiering=tiering))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    facts["seconds"] = time.perf_counter() - started
    out(f"\ndone in {facts['seconds']:.2f}s")
    return facts


def _run(urls: dict[str, str], p: _Printer, *, tiering: bool) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    agent = build_agent()

    p.step(f"1. {len(CONVERSATIONS)} conversations through a LangGraph agent")
    with _open(urls) as saver:
        app = agent.compile(checkpointer=saver)
        for thread, turns in CONVERSATIONS.items():
            config = _thread(thread)
            for text in turns[:-1]:
                result = app.invoke(_ask(text), config)
            p.line(f"{thread:>6}: {len(turns) - 1} turns, last answer: "
                   f"{_say(result['messages'][-1])!r}")

        p.step("2. where the data sits")
        history = {t: list(saver.list(_thread(t))) for t in CONVERSATIONS}
        total = sum(len(h) for h in history.values())
        facts["checkpoints"] = total
        p.line(f"warm (sqlite): {total} checkpoints over {len(history)} threads, durable")
        before = saver.stats.hot_hits
        for thread in CONVERSATIONS:
            saver.get_tuple(_thread(thread))
        facts["hot_hits"] = saver.stats.hot_hits - before
        p.line(f"hot (memory):  latest checkpoint of each thread cached: "
               f"{facts['hot_hits']}/{len(CONVERSATIONS)} reads served from hot")
        p.line("cold (files):  empty until history ages out (archive jobs move it there)")

        p.step("3. time travel: fork alice's conversation before the launch note")
        alice = _thread("alice")
        snapshots = list(app.get_state_history(alice))
        target = next(s for s in snapshots if s.next == ("plan",) and
                      _say(s.values["messages"][-1]) == "what is 6 x 7")
        forked = app.invoke(None, target.config)
        p.line(f"replayed from checkpoint {target.config['configurable']['checkpoint_id'][:13]}…"
               f": {_say(forked['messages'][-1])!r}")
        branch = app.invoke(_ask("what is 2 + 2"), alice)
        p.line(f"the fork continues on its own branch: {_say(branch['messages'][-1])!r}")
        facts["forked_answer"] = _say(forked["messages"][-1])
        facts["history_length"] = len(snapshots)

    p.step("4. close the saver, reopen it on the same files, resume bob")
    with _open(urls) as saver:
        app = agent.compile(checkpointer=saver)
        bob = _thread("bob")
        state = app.get_state(bob)
        p.line(f"bob has {len(state.values['messages'])} messages and notes "
               f"{state.values.get('notes')}")
        result = app.invoke(_ask("what do you remember"), bob)
        facts["resumed_answer"] = _say(result["messages"][-1])
        p.line(f"bob: 'what do you remember' -> {facts['resumed_answer']!r}")
        facts["stats"] = saver.stats.as_dict()
        p.line("saver stats: " + ", ".join(f"{k}={v}" for k, v in facts["stats"].items() if v))

    if tiering:
        facts.update(asyncio.run(_tiering(urls, p)))
    return facts


def _tiers_line(report: dict[str, Any]) -> str:
    region = report["regions"]["default"]
    warm, cold = region["warm"], region["cold"]
    return (f"warm: {warm['checkpoints']} live checkpoints ({warm['bytes'] // 1024} KiB)"
            f" + {warm['archived']} stubs | cold: {cold['segments_objects']} segments "
            f"({cold['segments_bytes'] // 1024} KiB)")


async def _tiering(urls: dict[str, str], p: _Printer) -> dict[str, Any]:
    """Step 5: history and an idle thread move to cold, read back, and resume."""
    from tierstore.jobs.plan import TieringPolicy
    from tierstore.jobs.tiering import HistoryDemotion, IdleArchival
    from tierstore.ops import status, verify

    facts: dict[str, Any] = {}
    later = time.time() + 120 * 86400  # the jobs run as if four months had passed
    async with _open(urls) as saver:
        app = build_agent().compile(checkpointer=saver)
        p.step("5. tiering: four months later, history and idle threads move to cold")
        p.line("before:  " + _tiers_line(await status(saver)))
        alice_before = [s.values async for s in app.aget_state_history(_thread("alice"))]
        policy = TieringPolicy(archive_after=30 * 86400, archive_idle_after=None, segment_size=8)
        moved = await HistoryDemotion(saver, policy).run_once(now=later)
        p.line(f"history demotion: {moved.checkpoints} checkpoints of {moved.threads} threads "
               f"-> {moved.segments} verified segments")
        p.line("after:   " + _tiers_line(await status(saver)))
        idle = TieringPolicy(archive_after=None, archive_idle_after=90 * 86400)
        archived = await IdleArchival(saver, idle, thread_id="carol").run_once(now=later)
        p.line(f"idle archival: carol's last {archived.checkpoints} live checkpoint(s) -> cold")
        p.line("after:   " + _tiers_line(await status(saver)))
        facts["archived_checkpoints"] = moved.checkpoints + archived.checkpoints

        alice_after = [s.values async for s in app.aget_state_history(_thread("alice"))]
        facts["history_intact"] = alice_after == alice_before
        p.line(f"alice's history read back from cold: {len(alice_after)} checkpoints, "
               f"identical: {facts['history_intact']}")
        result = await app.ainvoke(_ask("what do you remember"), _thread("carol"))
        facts["archived_resume_answer"] = _say(result["messages"][-1])
        p.line(f"carol (archived) resumes: {facts['archived_resume_answer']!r} "
               f"(rehydrated {saver.stats.rehydrated} checkpoint from cold)")
        p.line("now:     " + _tiers_line(await status(saver)))
        checked = await verify(saver)
        facts["verify_ok"] = checked["ok"]
        p.line(f"verify: {checked['checked']} checkpoints, "
               + ("every checksum matches" if checked["ok"] else f"{checked['problems']}"))
    return facts
