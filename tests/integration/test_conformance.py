"""LangGraph's own conformance suite (langgraph-checkpoint-conformance), on every stack
(and on PostgreSQL with its tables hash-partitioned by thread).

Each stack must detect all 8 capabilities and pass every test (81 in the pinned
version); the per-stack tally is printed at the end of the pytest run. Stacks with
a cold tier (and PostgreSQL + files, with no hot tier) run it again with history
demotion and idle archival after every write, and again with a worker in another
OS process archiving everything in a loop while the suite runs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES

from tests.integration.archiver import Archiver, archive_everything, start_archiver
from tests.stacks import (
    ARCHIVING_STACKS,
    CONFORMANCE_ONLY_STACKS,
    MULTIPROCESS_ARCHIVING_STACKS,
    STACKS,
    Urls,
)
from tierstore import TieredSaver

CONFORMANCE_TESTS = 81
REPORTS: dict[str, tuple[int, int]] = {}


class TieringEverywhere(TieredSaver):
    """A saver that archives everything it can after every write.

    History demotion and idle archival both run (``archive_after=0``,
    ``archive_idle_after=0``, ``keep_latest=1``): after every ``aput`` /
    ``aput_writes`` whole threads, heads included, live in cold segments, and writes
    keep landing on archived checkpoints. Running the conformance suite through it
    shows that tiering is invisible to LangGraph: every read still agrees.
    """

    moved = 0

    async def _tier(self) -> None:
        moved, errors = await archive_everything(self)
        assert errors == []
        TieringEverywhere.moved += moved

    async def aput(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().aput(*args, **kwargs)
        await self._tier()
        return result

    async def aput_writes(self, *args: Any, **kwargs: Any) -> None:
        await super().aput_writes(*args, **kwargs)
        await self._tier()


class TieringInAnotherProcess(TieredSaver):
    """A saver whose every write is followed by a pass of an archiving worker that
    runs in another OS process (it also keeps running while the suite reads)."""

    worker: Archiver | None = None

    async def _tier(self) -> None:
        assert TieringInAnotherProcess.worker is not None
        await TieringInAnotherProcess.worker.caught_up()

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


CONFORMANCE_STACKS = {**STACKS, **CONFORMANCE_ONLY_STACKS}


@pytest.mark.parametrize("stack", sorted(CONFORMANCE_STACKS))
async def test_conformance(stack: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    await run_conformance(stack, CONFORMANCE_STACKS[stack](request, tmp_path), TieredSaver)


@pytest.mark.parametrize("stack", sorted(ARCHIVING_STACKS))
async def test_conformance_with_tiering_after_every_write(
    stack: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    before = TieringEverywhere.moved
    await run_conformance(f"{stack}+archiving", ARCHIVING_STACKS[stack](request, tmp_path),
                          TieringEverywhere)
    assert TieringEverywhere.moved - before > 50  # history really went to cold


@pytest.mark.parametrize("stack", sorted(MULTIPROCESS_ARCHIVING_STACKS))
async def test_conformance_with_an_archiving_worker_in_another_process(
    stack: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    urls = ARCHIVING_STACKS[stack](request, tmp_path)
    async with urls.open():
        pass  # migrate once, before two processes race to
    worker = await asyncio.to_thread(start_archiver, urls)
    TieringInAnotherProcess.worker = worker
    try:
        await run_conformance(f"{stack}+archiving-process", urls, TieringInAnotherProcess)
    finally:
        TieringInAnotherProcess.worker = None
        moved, errors = await asyncio.to_thread(worker.stop)
    # The suite deletes and prunes threads while the worker moves them: a segment
    # written for a thread being deleted is dropped with it, and the worker's
    # read-back refuses the move (nothing marked). Any other failure is a bug.
    refused = ("did not land intact", "reads back different bytes")
    assert [e for e in errors if not any(r in e for r in refused)] == []
    assert moved > 50  # the worker really moved checkpoints while the suite ran
