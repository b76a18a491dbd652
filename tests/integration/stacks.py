"""Saver stacks the integration suites run on.

A stack is built per test from pytest fixtures, so server-backed stacks run wherever
the server fixtures can provide one (a server named by TIERSTORE_TEST_*, the local
default, or a private instance the fixture starts). MongoDB runs on the in-memory
emulation unless TIERSTORE_TEST_MONGO_URL names a real server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tierstore import TieredSaver


@dataclass(frozen=True)
class Stack:
    """How to open a saver on one stack; ``warm`` is a URL or a store factory."""

    name: str
    hot: str | None
    warm: str | Callable[[], Any]
    cold: str | None
    shared_across_processes: bool = True

    def open(self, saver_class: type[TieredSaver] = TieredSaver, **options: Any) -> TieredSaver:
        if isinstance(self.warm, str):
            return saver_class.from_urls(hot=self.hot, warm=self.warm, cold=self.cold,
                                         **options)
        from tierstore.tiers import open_store

        hot = open_store("hot", self.hot, ttl=3600.0) if self.hot else None
        cold = open_store("cold", self.cold) if self.cold else None
        return saver_class.from_stores(warm=self.warm(), hot=hot, cold=cold, **options)


StackBuilder = Callable[[pytest.FixtureRequest, Path], Stack]
Urls = Stack  # what the suites receive


def embedded(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    return Stack("embedded", "memory://", f"sqlite:///{tmp}/warm.db", f"file://{tmp}/cold")


STACKS: dict[str, StackBuilder] = {"embedded": embedded}
TIERED_STACKS = {"embedded"}
"""Stacks with a cold tier, where the tiering jobs run."""


def stack_params() -> list[Any]:
    return sorted(STACKS)
