"""Tiering runs end, are fair, and report failure and foreign claims honestly."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint

from tests.stacks import STACKS, TIERED_STACKS, Urls
from tierstore import TieredSaver
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, Retention

ROOT = Path(__file__).resolve().parents[2]
FUTURE = 10 * 365 * 86400.0


@pytest.fixture(params=sorted(TIERED_STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


async def thread(saver: TieredSaver, thread_id: str, checkpoints: int, *,
                 protected: bool) -> None:
    """A chain of checkpoints; ``protected``: the head's DeltaChannel needs all of them."""
    config: Any = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    for step in range(checkpoints):
        metadata: dict[str, Any] = {"step": step, "source": "loop"}
        if protected:
            metadata["counters_since_delta_snapshot"] = {"messages": [step, step]}
        config = await saver.aput(config, empty_checkpoint(), metadata, {})  # type: ignore[arg-type]


async def live_ids(saver: TieredSaver, thread_id: str) -> list[str]:
    stack = saver.regions.for_thread(thread_id)
    return [m.checkpoint_id for m in await stack.warm.index(thread_id, "")
            if m.location == "warm"]


async def test_a_run_visits_every_thread_once_behind_unmovable_ones(urls: Urls) -> None:
    policy = TieringPolicy(archive_after=60, archive_idle_after=None, batch=5)
    async with urls.open() as saver:
        stuck = [f"stuck-{i}" for i in range(5)]
        movable = [f"movable-{i}" for i in range(13)]
        for t in stuck:  # written first: the oldest heads, so claimed first
            await thread(saver, t, 3, protected=True)
        for t in movable:
            await thread(saver, t, 3, protected=False)
        now = time.time() + FUTURE
        report = await HistoryDemotion(saver, policy).run_once(now)
        assert report.failed == 0 and report.errors == []
        assert report.claimed == 18  # every eligible head, each once
        assert (report.threads, report.checkpoints) == (13, 26)
        for t in movable:
            assert len(await live_ids(saver, t)) == 1
        for t in stuck:
            assert len(await live_ids(saver, t)) == 3
        again = await HistoryDemotion(saver, policy).run_once(now + 1)
        assert again.claimed == 0  # nothing changed: nothing is claimed again
        await thread(saver, stuck[0], 1, protected=False)  # a new head changes things
        third = await HistoryDemotion(saver, policy).run_once(time.time() + FUTURE)
        assert third.claimed == 1 and third.checkpoints == 3


async def test_failed_threads_are_counted_once_and_the_run_ends(urls: Urls,
                                                                tmp_path: Path) -> None:
    policy = TieringPolicy(archive_after=60, archive_idle_after=None, batch=2)
    async with urls.open() as saver:
        names = [f"doomed-{i}" for i in range(5)]
        for t in names:
            await thread(saver, t, 3, protected=False)
        stack = saver.regions.for_thread(names[0])
        assert stack.cold is not None
        failing = FailingCold(stack.cold)
        stack.cold = failing
        try:
            report = await HistoryDemotion(saver, policy).run_once(time.time() + FUTURE)
        finally:
            stack.cold = failing.inner
        assert failing.puts == 5  # one attempt per thread, none twice
        assert (report.claimed, report.failed, report.threads) == (5, 5, 0)
        assert report.error_types == {"TierUnavailable": 5}
        assert len(report.errors) == 5
        for t in names:
            assert len(await live_ids(saver, t)) == 3  # nothing lost, nothing moved
        held = await stack.warm.held_claims(now=time.time())
        assert held.count == 0  # a failed head is released when the run ends
        retry = await HistoryDemotion(saver, policy).run_once(time.time() + FUTURE)
        assert (retry.claimed, retry.failed, retry.threads) == (5, 0, 5)


class FailingCold:
    """A cold store whose writes fail the way an unreachable one does."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.puts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put(self, key: str, data: bytes, *, storage_class: str | None = None) -> None:
        from tierstore.errors import TierUnavailable

        self.puts += 1
        raise TierUnavailable("cold store refused the write", tier="cold", backend="test")


@pytest.mark.parametrize("strategy", ["delete", "keep_latest"])
async def test_retention_visits_every_expired_thread_once(urls: Urls, strategy: str) -> None:
    policy = TieringPolicy(archive_after=None, archive_idle_after=None, expire_after=60,
                           expire_strategy=strategy, batch=3)  # type: ignore[arg-type]
    async with urls.open() as saver:
        names = [f"expired-{strategy}-{i}" for i in range(8)]
        for t in names:
            await thread(saver, t, 3, protected=False)
        now = time.time() + FUTURE
        report = await Retention(saver, policy).run_once(now)
        assert report.failed == 0
        assert (report.claimed, report.threads) == (8, 8)
        left = {t: len(await live_ids(saver, t)) for t in names}
        assert left == {t: 0 if strategy == "delete" else 1 for t in names}
        stack = saver.regions.for_thread(names[0])
        assert (await stack.warm.held_claims(now=now)).count == 0


# -- the command line -------------------------------------------------------------------


def cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "tierstore", *args], capture_output=True,
                              text=True, timeout=timeout, env=env, check=False, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`tierstore {' '.join(args)}` did not end within {timeout}s: {exc}")


def embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERSTORE_")}
    return {**env, "TIERSTORE_HOT_URL": "none",
            "TIERSTORE_WARM_URL": f"sqlite:///{tmp_path}/warm.db",
            "TIERSTORE_COLD_URL": f"file://{tmp_path}/cold", "PYTHONPATH": str(ROOT)}


def populate(tmp_path: Path, *, protected: int = 0, movable: int = 0) -> None:
    async def go() -> None:
        async with TieredSaver.from_urls(hot=None, warm=f"sqlite:///{tmp_path}/warm.db",
                                         cold=f"file://{tmp_path}/cold") as saver:
            for i in range(protected):
                await thread(saver, f"protected-{i}", 2, protected=True)
            for i in range(movable):
                await thread(saver, f"movable-{i}", 3, protected=False)

    asyncio.run(go())


def break_cold(tmp_path: Path) -> None:
    """Make every segment write fail for real: the segments folder is a regular file."""
    cold = tmp_path / "cold"
    cold.mkdir(exist_ok=True)
    (cold / "segments").write_bytes(b"not a directory")


def test_archive_ends_when_every_old_checkpoint_is_protected(tmp_path: Path) -> None:
    populate(tmp_path, protected=120)
    env = embedded_env(tmp_path)
    result = cli("archive", "--older-than", "0s", "--json", env=env)
    assert result.returncode == 0, result.stderr
    [report] = json.loads(result.stdout)
    assert report["claimed"] == 120 and report["checkpoints"] == 0
    again = cli("archive", "--older-than", "0s", "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)[0]["claimed"] == 0


def test_archive_with_an_unwritable_cold_tier_exits_1(tmp_path: Path) -> None:
    populate(tmp_path, movable=3)
    break_cold(tmp_path)
    result = cli("archive", "--older-than", "0s", "--json", env=embedded_env(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    [report] = json.loads(result.stdout)
    assert (report["failed"], report["checkpoints"]) == (3, 0)
    assert report["error_types"] == {"TierUnavailable": 3}


def test_worker_once_with_an_unwritable_cold_tier_is_unhealthy(tmp_path: Path) -> None:
    populate(tmp_path, movable=3)
    break_cold(tmp_path)
    health = tmp_path / "health.json"
    result = cli("worker", "--once", "--archive-after", "0s", "--archive-idle-after", "3650d",
                 "--health-file", str(health), env=embedded_env(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(health.read_text())
    assert data["healthy"] is False
    job = data["jobs"]["history-demotion"]
    assert job["failures"] == 1 and job["last_report"]["failed"] == 3
    assert "TierUnavailable" in job["last_error"]
    assert json.loads(result.stdout)["healthy"] is False


def test_claims_left_by_a_dead_worker_are_reported(tmp_path: Path) -> None:
    populate(tmp_path, movable=4)
    until = time.time() + 3600

    async def die_holding_claims() -> None:
        async with TieredSaver.from_urls(hot=None, warm=f"sqlite:///{tmp_path}/warm.db",
                                         cold=f"file://{tmp_path}/cold") as saver:
            warm = saver.regions.for_thread("movable-0").warm
            claims = await warm.claim(owner="dead-worker", now=until - 3600,
                                      lease_seconds=3600, limit=2, warm_before=until)
            assert len(claims) == 2

    asyncio.run(die_holding_claims())
    env = embedded_env(tmp_path)
    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    claims = json.loads(status.stdout)["regions"]["default"]["warm"]["claims"]
    assert claims["count"] == 2
    assert abs(claims["earliest_until"] - until) < 5
    plain = cli("status", env=env)
    assert "2 threads claimed" in plain.stdout
    archived = cli("archive", "--older-than", "0s", env=env)
    assert archived.returncode == 0, archived.stderr
    assert "2 threads are claimed by another worker until" in archived.stderr
    assert "skipped" in archived.stderr
    report = json.loads(cli("archive", "--older-than", "0s", "--json", env=env).stdout)[0]
    assert report["busy"] == 2 and report["threads"] == 0


async def test_a_run_longer_than_the_lease_still_moves_its_later_batches(urls: Urls) -> None:
    """A lease runs from when its batch is claimed, not from when the run began: a run of
    a large store outlasts ``lease_seconds``, and its later moves must not be refused."""
    policy = TieringPolicy(archive_after=60, archive_idle_after=None, batch=1,
                           lease_seconds=60)
    clock = [time.time() + FUTURE]

    def slow_moves(step: str) -> None:
        if step == "marked":
            clock[0] += 1000  # each batch takes longer than the lease

    async with urls.open() as saver:
        names = [f"long-run-{i}" for i in range(3)]
        for t in names:
            await thread(saver, t, 3, protected=False)
        report = await HistoryDemotion(saver, policy, clock=lambda: clock[0],
                                       on_step=slow_moves).run_once()
        assert report.failed == 0 and report.errors == [], report.errors
        assert (report.threads, report.checkpoints) == (3, 6)
        for t in names:
            assert len(await live_ids(saver, t)) == 1
