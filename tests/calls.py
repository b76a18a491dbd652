"""Counting the calls a saver makes on one of its stores (round trips per operation)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any


def count_calls(store: Any, names: Sequence[str]) -> dict[str, int]:
    """Wrap the store's methods on the instance and count each call."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(store, name)

        def counted(*args: Any, _name: str = name,
                    _original: Callable[..., Awaitable[Any]] = original, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(store, name, counted)
    return counts
