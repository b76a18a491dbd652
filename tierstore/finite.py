"""Figures computed from user input that must stay finite: the cost model's (``plan``,
``status --cost``) multiply counts, sizes and prices, and inputs that are each a valid
float can still overflow to infinity (or NaN) together."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tierstore.errors import InvalidInput


def numbers(prefix: str, data: Any) -> dict[str, float | None]:
    """Every number in ``data`` (nested mappings), by dotted name."""
    if isinstance(data, Mapping):
        out: dict[str, float | None] = {}
        for key, value in data.items():
            out.update(numbers(f"{prefix}.{key}" if prefix else str(key), value))
        return out
    if isinstance(data, int | float) and not isinstance(data, bool):
        return {prefix: float(data)}
    return {}


def check_finite(data: Any, what: str, inputs: Mapping[str, float | None],
                 path: str = "") -> None:
    """``InvalidInput`` if a number in ``data`` is infinite or NaN: ``inputs`` too large
    for a float to price (negative or NaN inputs are refused before)."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            check_finite(value, what, inputs, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            check_finite(value, what, inputs, f"{path}[{i}]")
    elif isinstance(data, float) and not math.isfinite(data):
        raise overflowed(f"{what}: {path} comes out {data}", inputs)


def overflowed(what: str, inputs: Mapping[str, float | None]) -> InvalidInput:
    """The error for ``what`` overflowing, naming the two largest ``inputs``."""
    given = [(abs(v), k, v) for k, v in inputs.items() if v is not None]
    largest = ", ".join(f"{k}={v:g}" for _, k, v in sorted(given, reverse=True)[:2])
    return InvalidInput(f"{what}: the inputs are too large to price (the largest: "
                        f"{largest})")
