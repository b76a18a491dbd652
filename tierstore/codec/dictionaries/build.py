"""How the pinned zstd dictionary ``d1`` was made.

::

    python -m tierstore.codec.dictionaries.build             # size, sha256, same as d1.bin?
    python -m tierstore.codec.dictionaries.build --out PATH  # write the bytes to PATH

zstd without a dictionary cannot compress what a small payload repeats from every
other payload: a chat message of a few hundred bytes carries ``langchain_core.messages.ai``,
``additional_kwargs``, ``response_metadata``, ``tool_calls`` ...; a checkpoint body
carries ``channel_versions``, ``versions_seen``, ``branch:to:``, 32-digit versions. A
raw-content dictionary is bytes that every frame may copy from, so d1 is those repeated
parts and nothing else, serialised as LangGraph's serde writes them:

    1. empty messages of each common kind: system, tool, AI with a tool call, AI with the
       usage and response metadata chat models attach (all ids the nil UUID)
    2. checkpoint metadata of each source
    3. a delta link envelope (``tierstore.codec.chain``) and common channel names
    4. a checkpoint body skeleton (no channel values: they are stored apart)
    5. an empty human and an empty AI message: the most common, so last (nearest)

No prose: every content is empty, and no word of any workload is in it (a dictionary
fitted to a benchmark's text would only flatter the benchmark).

The committed ``d1.bin`` is the dictionary; its sha256 is pinned and nothing builds it
at import time. Stored bytes mean what they meant when written only if ``d1`` never
changes, and a later langchain-core may serialise these messages differently. So this
recipe documents d1 (it reproduces it under the versions named in ``BUILT_WITH``); it
does not define it. A better dictionary is a new file with a new id (``d2``), never new
bytes for ``d1``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

__all__ = ["BUILT_WITH", "build_d1", "main"]

BUILT_WITH = {"langchain-core": "1.8.3", "langgraph-checkpoint": "4.3.2"}
"""The versions under which ``build_d1()`` returns d1.bin byte for byte."""

NIL = "00000000-0000-0000-0000-000000000000"
VERSION = "00000000000000000000000000000001.0.5"  # LangGraph's: a 32-digit counter, a fraction
CHANNELS = ["__start__", "__end__", "__input__", "__interrupt__", "__resume__", "__error__",
            "__pregel_tasks", "__pregel_pull", "__pregel_push", "messages", "remaining_steps"]


def build_d1() -> bytes:
    """The raw content of d1 (see the module docstring for what and why)."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    from tierstore.codec.chain import ChainLink

    serde = JsonPlusSerializer()

    def dumps(value: Any) -> bytes:
        return bytes(serde.dumps_typed(value)[1])

    usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
             "input_token_details": {"cache_read": 0}, "output_token_details": {"reasoning": 0}}
    response = {"token_usage": {"completion_tokens": 0, "prompt_tokens": 0, "total_tokens": 0},
                "model_name": "", "finish_reason": "stop"}
    parts: list[Any] = [
        SystemMessage("", id=NIL),
        ToolMessage("", tool_call_id=NIL, id=NIL),
        AIMessage("", id=NIL, tool_calls=[{"name": "", "args": {}, "id": NIL}]),
        AIMessage("", id=NIL, response_metadata=response, usage_metadata=usage),
        *({"source": source, "step": 1, "parents": {}}
          for source in ("fork", "update", "input", "loop")),
        ChainLink(VERSION, VERSION, 1, []).body(),
        CHANNELS,
        {"v": 4, "ts": "2025-01-01T00:00:00.000000+00:00", "id": NIL,
         "channel_versions": {"__start__": VERSION, "messages": VERSION,
                              "branch:to:agent": VERSION, "branch:to:tools": VERSION},
         "versions_seen": {"__input__": {}, "__start__": {"__start__": VERSION},
                           "agent": {"branch:to:agent": VERSION},
                           "tools": {"branch:to:tools": VERSION}},
         "updated_channels": ["messages"]},
        HumanMessage("", id=NIL),
        AIMessage("", id=NIL),
    ]
    return b"".join(dumps(part) for part in parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the zstd dictionary d1 from structure.")
    parser.add_argument("--out", type=Path, help="write the dictionary's bytes here")
    args = parser.parse_args(argv)
    built = build_d1()
    committed = files("tierstore.codec.dictionaries").joinpath("d1.bin").read_bytes()
    same = "the same as" if built == committed else "NOT the same as"
    print(f"{len(built)} bytes, sha256 {hashlib.sha256(built).hexdigest()}, "
          f"{same} the committed d1.bin")
    if args.out is not None:
        args.out.write_bytes(built)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
