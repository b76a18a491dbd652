"""The scheduler: survives failed runs, backs off, stops on its event, reports health."""

from __future__ import annotations

import asyncio

from tierstore.jobs.scheduler import Scheduler
from tierstore.jobs.tiering import JobReport


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Flaky:
    """Fails on the runs listed in ``fail_on`` (1-based), succeeds otherwise."""

    def __init__(self, name: str, fail_on: set[int]) -> None:
        self.name = name
        self.fail_on = fail_on
        self.runs = 0

    async def run_once(self, now: float | None = None) -> JobReport:
        self.runs += 1
        if self.runs in self.fail_on:
            raise RuntimeError(f"{self.name} broke on run {self.runs}")
        return JobReport(self.name, checkpoints=self.runs)


async def test_a_failed_run_is_retried_with_backoff_and_health_tells() -> None:
    clock = FakeClock()
    flaky, steady = Flaky("flaky", {1, 2}), Flaky("steady", set())
    scheduler = Scheduler([(flaky, 10.0), (steady, 10.0)], clock=clock)
    delay = await scheduler.tick()
    assert (flaky.runs, steady.runs) == (1, 1)
    health = scheduler.health()
    assert health["healthy"] is False
    assert health["jobs"]["flaky"]["failures"] == 1
    assert "broke on run 1" in health["jobs"]["flaky"]["last_error"]
    assert health["jobs"]["steady"]["last_report"]["checkpoints"] == 1
    assert delay == 10.0  # steady is next; flaky waits 2 x interval
    clock.now += 10
    await scheduler.tick()
    assert (flaky.runs, steady.runs) == (1, 2)
    clock.now += 10
    await scheduler.tick()
    assert flaky.runs == 2 and scheduler.health()["jobs"]["flaky"]["failures"] == 2
    clock.now += 40  # 2nd failure: 4 x interval
    await scheduler.tick()
    assert flaky.runs == 3
    assert scheduler.health()["healthy"] is True
    assert scheduler.health()["jobs"]["flaky"]["last_report"]["checkpoints"] == 3


async def test_run_returns_when_stopped() -> None:
    job = Flaky("job", set())
    three_runs = asyncio.Event()
    scheduler = Scheduler([(job, 0.01)],
                          on_report=lambda r: three_runs.set() if job.runs >= 3 else None)
    stop = asyncio.Event()
    task = asyncio.create_task(scheduler.run(stop))
    await asyncio.wait_for(three_runs.wait(), timeout=5)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert task.done() and task.exception() is None


class PartlyFailing:
    """Finishes its run but reports threads it could not move."""

    name = "mover"

    async def run_once(self, now: float | None = None) -> JobReport:
        report = JobReport(self.name, claimed=3, threads=1)
        report.fail("'t1'/''", OSError("cold is read-only"))
        report.fail("'t2'/''", OSError("cold is read-only"))
        return report


async def test_a_run_with_failed_threads_makes_the_worker_unhealthy() -> None:
    clock = FakeClock()
    scheduler = Scheduler([(PartlyFailing(), 10.0)], clock=clock)
    await scheduler.tick()
    health = scheduler.health()
    assert health["healthy"] is False
    job = health["jobs"]["mover"]
    assert job["failures"] == 1
    assert "OSError" in job["last_error"] and "read-only" in job["last_error"]
    assert job["last_report"]["failed"] == 2
    assert job["last_report"]["error_types"] == {"OSError": 2}
