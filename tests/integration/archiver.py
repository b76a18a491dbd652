"""A tiering worker in another OS process, for the suites that race it with live turns.

``start_archiver`` spawns a process that opens its own saver on the same stack and
runs history demotion and idle archival with every threshold at zero, in a loop,
until told to stop: whatever the app is doing, its threads keep moving to cold
under it, heads included.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass
from typing import Any

from tests.stacks import Stack
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, IdleArchival

EVERYTHING = TieringPolicy(archive_after=0, archive_idle_after=0, keep_latest=1, segment_size=2)
"""Archive all history and every idle thread at once (the head included)."""


async def archive_everything(saver: Any) -> tuple[int, list[str]]:
    """One pass of both archiving jobs; returns checkpoints moved and error lines."""
    moved, errors = 0, []
    now = time.time() + 1
    for job in (HistoryDemotion(saver, EVERYTHING), IdleArchival(saver, EVERYTHING)):
        report = await job.run_once(now=now)
        moved += report.checkpoints
        errors.extend(report.errors)
    return moved, errors


def _loop(stack: Stack, stop: Any, ready: Any, moved: Any, errors: Any, *, passes: Any) -> None:
    async def main() -> None:
        async with stack.open() as saver:
            ready.set()
            while not stop.is_set():
                n, failed = await archive_everything(saver)
                with moved.get_lock():
                    moved.value += n
                if failed:
                    errors.put("\n".join(failed))
                with passes.get_lock():
                    passes.value += 1
                await asyncio.sleep(0.001)

    asyncio.run(main())


@dataclass
class Archiver:
    """Handle on the worker process: ``stop()`` ends it and reports what it did."""

    process: Any
    stop_event: Any
    moved_value: Any
    error_queue: Any
    passes: Any

    async def caught_up(self) -> None:
        """Wait until the worker finished a whole pass that started after this call.

        The writer waits for the worker instead of guessing how long a pass takes:
        two completed passes after now include one that began after now.
        """
        target = self.passes.value + 2
        async with asyncio.timeout(60):
            while self.passes.value < target:
                if not self.process.is_alive():
                    raise AssertionError(f"archiving worker died ({self.process.exitcode})")
                await asyncio.sleep(0.001)

    def stop(self, timeout: float = 120) -> tuple[int, list[str]]:
        self.stop_event.set()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            raise AssertionError("the archiving worker did not stop")
        assert self.process.exitcode == 0, f"archiving worker exited {self.process.exitcode}"
        errors = []
        while not self.error_queue.empty():
            errors.append(self.error_queue.get())
        return int(self.moved_value.value), errors


def start_archiver(stack: Stack, timeout: float = 120) -> Archiver:
    """Spawn the worker and wait until its saver is open."""
    ctx = multiprocessing.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Event()
    moved, passes = ctx.Value("q", 0), ctx.Value("q", 0)
    errors = ctx.Queue()
    process = ctx.Process(target=_loop, args=(stack, stop, ready, moved, errors),
                          kwargs={"passes": passes}, daemon=True)
    process.start()
    if not ready.wait(timeout):
        process.kill()
        raise AssertionError("the archiving worker did not start")
    return Archiver(process, stop, moved, errors, passes)
