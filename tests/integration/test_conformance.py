"""LangGraph's own conformance suite (langgraph-checkpoint-conformance), on every stack.

Each stack must detect all 8 capabilities and pass every test (81 in the pinned
version); the per-stack tally is printed at the end of the pytest run.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES

from tests.integration.stacks import STACKS
from tierstore import TieredSaver

CONFORMANCE_TESTS = 81
REPORTS: dict[str, tuple[int, int]] = {}


@pytest.mark.parametrize("stack", sorted(STACKS))
async def test_conformance(stack: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    urls = STACKS[stack](request, tmp_path)

    @checkpointer_test(name=f"tierstore-{stack}-{uuid.uuid4().hex[:6]}")
    async def factory() -> AsyncIterator[TieredSaver]:
        async with TieredSaver.from_urls(
            hot=urls["hot"], warm=urls["warm"] or "", cold=urls["cold"]
        ) as saver:
            yield saver

    report = await validate(factory)
    passed = sum(r.tests_passed for r in report.results.values())
    failed = sum(r.tests_failed for r in report.results.values())
    REPORTS[stack] = (passed, failed)
    detected = {name for name, r in report.results.items() if r.detected}
    assert detected == {c.value for c in ALL_CAPABILITIES}
    failures = [f for r in report.results.values() for f in r.failures]
    assert failures == []
    assert (passed, failed) == (CONFORMANCE_TESTS, 0)
