"""LangGraph's strict msgpack mode (``LANGGRAPH_STRICT_MSGPACK=true``).

In strict mode LangGraph compiles every graph with ``checkpointer.with_allowlist(...)``,
naming the types its state schema declares. Each case runs in a fresh interpreter (the
variable is read at import) and compares tierstore with ``InMemorySaver`` turn by turn.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = '''
import asyncio, dataclasses, datetime, json, sys
from typing import Annotated, Any, TypedDict
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from tierstore import TieredSaver

@dataclasses.dataclass
class Ticket:
    n: int

class State(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    when: datetime.datetime
    ticket: TICKET_TYPE

def step(state: State) -> dict:
    return {"messages": [AIMessage("noted")], "when": datetime.datetime(2026, 1, 2, 3, 4, 5),
            "ticket": Ticket(len(state["messages"]))}

builder = StateGraph(State)
builder.add_node("step", step)
builder.add_edge(START, "step")
builder.add_edge("step", END)

async def turns(saver):
    app = builder.compile(checkpointer=saver)
    cfg = {"configurable": {"thread_id": "t"}}
    try:
        for text in ("hello", "again"):
            await app.ainvoke({"messages": [HumanMessage(text)]}, cfg)
        state = (await app.aget_state(cfg)).values
        history = [s.values async for s in app.aget_state_history(cfg)]
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"state": repr(state), "history": repr(history),
            "ticket": type(state["ticket"]).__name__}

async def main():
    directory = sys.argv[1]
    out = {"memory": await turns(InMemorySaver())}
    async with TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{directory}/warm.db",
                                     cold=f"file://{directory}/cold") as saver:
        out["tierstore"] = await turns(saver)
    # the same store, reopened with the type allowed: what was refused reads back
    async with TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{directory}/warm.db",
                                     cold=f"file://{directory}/cold",
                                     allowed_msgpack_modules=[("__main__", "Ticket")]) as saver:
        app = builder.compile(checkpointer=saver)
        state = (await app.aget_state({"configurable": {"thread_id": "t"}})).values
        out["allowed"] = {"ticket": type(state["ticket"]).__name__, "state": repr(state)}
    print(json.dumps(out))

asyncio.run(main())
'''


def run_strict(tmp_path: Path, ticket_type: str) -> dict[str, dict[str, str]]:
    script = tmp_path / "strict.py"
    script.write_text(SCRIPT.replace("TICKET_TYPE", ticket_type))
    env = {**os.environ, "LANGGRAPH_STRICT_MSGPACK": "true",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, dict[str, str]] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def without_ids(text: str) -> str:
    return re.sub(r"id='[^']*'", "id=…", text)


def test_types_the_state_declares_read_back_as_in_memory(tmp_path: Path) -> None:
    out = run_strict(tmp_path, "Ticket")
    memory, tier = out["memory"], out["tierstore"]
    assert "error" not in memory and "error" not in tier, out
    assert tier["ticket"] == memory["ticket"] == "Ticket"
    assert without_ids(tier["state"]) == without_ids(memory["state"])
    assert without_ids(tier["history"]) == without_ids(memory["history"])
    assert "HumanMessage(content='again'" in tier["state"]


@pytest.mark.parametrize("ticket_type", ["Any", "object"])
def test_a_type_the_state_does_not_declare_is_refused_not_turned_into_a_dict(
        tmp_path: Path, ticket_type: str) -> None:
    """LangGraph's savers log a warning and hand back the value's fields as a dict;
    tierstore refuses the read with ``UnsafePayload`` naming the type and the fix."""
    out = run_strict(tmp_path, ticket_type)
    assert out["memory"].get("ticket") == "dict", out["memory"]
    tier = out["tierstore"]
    assert tier.get("error") == "UnsafePayload", tier
    assert "Ticket" in tier["message"] and "allowed_msgpack_modules" in tier["message"]
    # nothing was lost: allowed, the type reads back (the first turn's ticket: the second
    # turn was refused when it read the thread, before it wrote anything)
    assert out["allowed"]["ticket"] == "Ticket"
    assert "Ticket(n=1)" in out["allowed"]["state"]
