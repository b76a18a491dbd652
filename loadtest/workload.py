"""The chat workload shared by the benchmark and the locust scenarios.

A real LangGraph ``StateGraph`` shaped like the demo agent (plan → tool? → respond),
adapted so that every reply is as long as a chat message: each turn appends a
``HumanMessage`` and an ``AIMessage`` of about ``message_bytes`` bytes, and every fourth
turn also takes a tool step (a tool call and its ``ToolMessage``). Text is drawn from a
fixed vocabulary with a seed derived from (thread, turn), so every checkpointer sees
byte-identical inputs and the payloads compress like real prose, not like noise.

No model, no network, no clock: the graph is deterministic.

``build_delta_agent`` is the same graph with ``messages`` in LangGraph's ``DeltaChannel``:
a checkpoint then stores no message list, only the writes of its step, and a read rebuilds
the list from the ancestors' writes (and the nearest snapshot, every ``snapshot_frequency``
updates). Its reducer is the one LangGraph's DeltaChannel documentation names for messages
(``langgraph.graph.message._messages_delta_reducer``); LangGraph gives the messages written
to it stable ids before they are stored.

This module must not import locust (locust monkey-patches the process).
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import _messages_delta_reducer, add_messages

__all__ = [
    "ChatState",
    "DeltaChatState",
    "TOOL_EVERY",
    "build_chat_agent",
    "build_delta_agent",
    "filler",
    "thread_config",
    "turn_input",
]

TOOL_EVERY = 4  # turn k (0-based) with k % TOOL_EVERY == 2 asks the calculator

_VOCABULARY = (
    "the a an and or but so because if when while then than as at by for from in into of "
    "on onto to with about after before between over under again also just only still very "
    "really maybe perhaps quite rather soon today tomorrow yesterday morning evening week "
    "month year time plan meeting project report draft email message call note list idea "
    "question answer problem reason detail example option choice budget price order ticket "
    "account password invoice delivery flight hotel train booking weather recipe dinner "
    "lunch coffee team manager client customer friend family doctor school office home city "
    "trip weekend holiday birthday party music movie book article code test release bug "
    "feature review design schedule deadline update change issue request support help "
    "please thanks sorry okay sure great good fine bad better best worse new old big small "
    "long short early late quick slow easy hard clear simple could would should might must "
    "can will shall need want like know think feel see look find give take make send share "
    "check confirm cancel move book pay ask tell explain remember forget start finish keep"
)
_WORDS = _VOCABULARY.split()

_ARITH = re.compile(r"(\d+) x (\d+)")


def filler(seed: int, nbytes: int) -> str:
    """About ``nbytes`` bytes of deterministic prose (letters and spaces only)."""
    rng = random.Random(seed)
    words: list[str] = []
    size = 0
    while size < nbytes:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    text = " ".join(words)
    return text[:nbytes].rstrip() or "ok"


def _seed(*parts: object) -> int:
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def turn_input(thread_id: str, turn: int, message_bytes: int) -> ChatState:
    """The human message of ``turn`` (0-based) in ``thread_id``: same bytes on every run."""
    seed = _seed(thread_id, turn)
    if turn % TOOL_EVERY == 2:
        a, b = 10 + seed % 90, 10 + (seed >> 8) % 90
        head = f"what is {a} x {b}? "
        text = head + filler(seed, max(message_bytes - len(head), 1))
    else:
        text = filler(seed, message_bytes)
    return {"messages": [HumanMessage(text)]}


def thread_config(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id}}


class ChatState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    turns: int


class DeltaChatState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], DeltaChannel(_messages_delta_reducer)]
    turns: int


def _plan(state: ChatState) -> dict[str, Any]:
    text = str(state["messages"][-1].content)
    turn = state.get("turns", 0) + 1
    if match := _ARITH.search(text):
        call = {"name": "calculator", "args": {"a": int(match[1]), "b": int(match[2])},
                "id": f"call-{turn}"}
        return {"messages": [AIMessage("", tool_calls=[call])], "turns": turn}
    return {"turns": turn}


def _tool(state: ChatState) -> dict[str, Any]:
    last = state["messages"][-1]
    if not isinstance(last, AIMessage) or not last.tool_calls:
        raise ValueError("the tool node runs only after a tool call")
    call = last.tool_calls[0]
    result = int(call["args"]["a"]) * int(call["args"]["b"])
    return {"messages": [ToolMessage(str(result), tool_call_id=call["id"])]}


def _reply(state: ChatState, size: int) -> dict[str, Any]:
    messages = state["messages"]
    last = messages[-1]
    head = f"The answer is {last.content}. " if isinstance(last, ToolMessage) else ""
    seed = _seed(len(messages), state.get("turns", 0), str(last.content)[:32])
    return {"messages": [AIMessage(head + filler(seed, max(size - len(head), 1)))]}


def _route(state: ChatState) -> str:
    last = state["messages"][-1]
    return "tool" if isinstance(last, AIMessage) and last.tool_calls else "respond"


def build_chat_agent(reply_bytes: int = 500) -> StateGraph[ChatState]:
    """plan → (tool →) respond, replies of ``reply_bytes``; compile with any checkpointer."""
    return _build(ChatState, reply_bytes)


def build_delta_agent(reply_bytes: int = 500) -> StateGraph[ChatState]:
    """The chat agent with its messages in a ``DeltaChannel`` (default snapshot frequency)."""
    return _build(DeltaChatState, reply_bytes)  # type: ignore[arg-type]


def _build(schema: type[ChatState], reply_bytes: int) -> StateGraph[ChatState]:
    def respond(state: ChatState) -> dict[str, Any]:
        return _reply(state, reply_bytes)

    builder: StateGraph[ChatState] = StateGraph(schema)
    # unannotated wrappers: LangGraph reads a node's annotation as its input schema, and
    # ChatState's messages channel would clash with DeltaChatState's
    builder.add_node("plan", lambda state: _plan(state))  # noqa: PLW0108
    builder.add_node("tool", lambda state: _tool(state))  # noqa: PLW0108
    builder.add_node("respond", lambda state: respond(state))  # noqa: PLW0108
    builder.add_edge(START, "plan")
    builder.add_conditional_edges("plan", lambda state: _route(state),  # noqa: PLW0108
                                  {"tool": "tool", "respond": "respond"})
    builder.add_edge("tool", "respond")
    builder.add_edge("respond", END)
    return builder
