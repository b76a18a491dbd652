"""Values whose encodings are pinned in test_codec.py (import path must stay stable)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel


class Ticket(BaseModel):
    id: int
    title: str
    tags: list[str]


def golden_values() -> dict[str, Any]:
    return {
        "messages": [HumanMessage("hello", id="h1"),
                     AIMessage("hi there " * 40, id="a1")],
        "pydantic": Ticket(id=7, title="broken build", tags=["ci", "urgent"]),
        "bytes": b"\x00\x01\xfe\xff" * 100,
        "none": None,
        "set": {"a", "b", "c"},
        "datetime": dt.datetime(2026, 11, 22, 12, 30, 5, 123456, tzinfo=dt.UTC),
        "nested": {"n": 1, "f": 2.5, "s": "x" * 500, "l": [1, [2, [3]]], "t": True},
    }
