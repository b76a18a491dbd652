"""LangGraph's own conformance suite (langgraph-checkpoint-conformance), on every stack.

Each stack must detect all 8 capabilities and pass every test (81 in the pinned
version); the per-stack tally is printed at the end of the pytest run. Stacks with
a cold tier run the suite a second time with history archived after every write.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES

from tests.integration.stacks import STACKS, TIERED_STACKS, Urls
from tierstore import TieredSaver
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, IdleArchival

CONFORMANCE_TESTS = 81
REPORTS: dict[str, tuple[int, int]] = {}


class TieringEverywhere(TieredSaver):
    """A saver that archives everything it can after every write.

    History demotion and idle archival both run (``archive_after=0``,
    ``archive_idle_after=0``): after every ``aput`` / ``aput_writes`` whole threads,
    heads included, live in cold segments, and writes keep landing on archived
    checkpoints. Running the conformance suite through it shows that tiering is
    invisible to LangGraph: every read still agrees.
    """

    moved = 0

    async def _tier(self) -> None:
        policy = TieringPolicy(archive_after=0, archive_idle_after=0, keep_latest=1,
                               segment_size=2)
        now = time.time() + 1
        for job in (HistoryDemotion(self, policy), IdleArchival(self, policy)):
            report = await job.run_once(now=now)
            assert report.errors == []
            TieringEverywhere.moved += report.checkpoints

    async def aput(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().aput(*args, **kwargs)
        await self._tier()
        return result

    async def aput_writes(self, *args: Any, **kwargs: Any) -> None:
        await super().aput_writes(*args, **kwargs)
        await self._tier()


async def run_conformance(stack: str, urls: Urls, saver_class: type[TieredSaver]) -> None:
    @checkpointer_test(name=f"tierstore-{stack}-{uuid.uuid4().hex[:6]}")
    async def factory() -> AsyncIterator[TieredSaver]:
        async with urls.open(saver_class) as saver:
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


@pytest.mark.parametrize("stack", sorted(STACKS))
async def test_conformance(stack: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    await run_conformance(stack, STACKS[stack](request, tmp_path), TieredSaver)


@pytest.mark.parametrize("stack", sorted(s for s in STACKS if s in TIERED_STACKS))
async def test_conformance_with_tiering_after_every_write(
    stack: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    before = TieringEverywhere.moved
    await run_conformance(f"{stack}+archiving", STACKS[stack](request, tmp_path),
                          TieringEverywhere)
    assert TieringEverywhere.moved - before > 50  # history really went to cold
