"""One scheduler drives every job on its own interval, for ``tierstore worker``.

::

    loop: for each job whose time has come ─► run_once() ─► record health
          a failed run (one that raised, or whose report counts failed threads)
          is logged, makes the worker unhealthy and is retried after
          backoff(interval, failures)
          stop event set (SIGINT/SIGTERM) ─► finish the running job, return

Nothing starts in ``__init__``; ``run`` returns when ``stop`` is set. Health is a
plain dict (last run, last success, consecutive failures, last report per job) that
the CLI writes to a file and turns into an exit code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tierstore.jobs.plan import backoff
from tierstore.jobs.tiering import JobReport

__all__ = ["Job", "Scheduled", "Scheduler"]

log = logging.getLogger("tierstore.worker")


class Job(Protocol):
    name: str

    async def run_once(self, now: float | None = None) -> JobReport: ...


@dataclass
class Scheduled:
    job: Job
    interval: float
    next_at: float = 0.0
    failures: int = 0
    runs: int = 0
    last_ok: float | None = None
    last_error: str | None = None
    last_report: dict[str, Any] = field(default_factory=dict)


def _summary(report: JobReport) -> str:
    """One line for the health file: how many failed, of which kinds, and the first."""
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(report.error_types.items()))
    first = report.errors[0] if report.errors else ""
    return f"{report.failed} failed ({kinds}); first: {first}"


class Scheduler:
    def __init__(
        self,
        jobs: Sequence[tuple[Job, float]],
        *,
        clock: Callable[[], float] = time.time,
        on_report: Callable[[JobReport], None] | None = None,
    ) -> None:
        self.entries = [Scheduled(job, interval) for job, interval in jobs]
        self.clock = clock
        self.on_report = on_report

    async def tick(self) -> float:
        """Run every due job once; returns seconds until the next one is due."""
        for entry in self.entries:
            now = self.clock()
            if entry.next_at > now:
                continue
            entry.runs += 1
            try:
                report = await entry.job.run_once()
            except Exception as exc:  # a failed iteration never kills the worker
                entry.failures += 1
                entry.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("job %s failed (%d in a row)", entry.job.name, entry.failures)
            else:
                entry.last_report = report.as_dict()
                if report.failed:  # the run ended, but some of its work did not get done
                    entry.failures += 1
                    entry.last_error = _summary(report)
                    log.warning("job %s: %s", entry.job.name, entry.last_error)
                else:
                    entry.failures = 0
                    entry.last_ok = self.clock()
                    entry.last_error = None
                if self.on_report is not None:
                    self.on_report(report)
            entry.next_at = self.clock() + backoff(entry.interval, entry.failures)
        soonest = min((e.next_at for e in self.entries), default=self.clock() + 60)
        return max(0.0, soonest - self.clock())

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            delay = await self.tick()
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                continue

    def health(self) -> dict[str, Any]:
        return {
            "time": self.clock(),
            "healthy": all(e.failures == 0 for e in self.entries),
            "jobs": {
                e.job.name: {
                    "interval": e.interval,
                    "runs": e.runs,
                    "failures": e.failures,
                    "last_ok": e.last_ok,
                    "last_error": e.last_error,
                    "last_report": e.last_report,
                }
                for e in self.entries
            },
        }
