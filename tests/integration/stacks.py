"""Saver stacks the integration suites run on. A stack is a name and a URL builder.

Server-backed stacks ask pytest for their server fixture, so they run wherever the
server fixtures can provide one (a server named by TIERSTORE_TEST_*, the local
default, or a private instance the fixture starts).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

Urls = dict[str, str | None]
StackBuilder = Callable[[pytest.FixtureRequest, Path], Urls]


def embedded(request: pytest.FixtureRequest, tmp: Path) -> Urls:
    return {"hot": "memory://", "warm": f"sqlite:///{tmp}/warm.db", "cold": f"file://{tmp}/cold"}


STACKS: dict[str, StackBuilder] = {"embedded": embedded}
TIERED_STACKS = {"embedded"}
"""Stacks with a cold tier, where the tiering jobs run."""
