"""`tierstore archive` when another worker holds every eligible thread: nothing failed,
so it exits 0, and both the message and the JSON report say the threads were busy."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tests.integration.test_tiering_runs_end import cli, embedded_env, populate
from tierstore import TieredSaver


def test_archive_with_every_thread_claimed_elsewhere_exits_0_and_reports_busy(
    tmp_path: Path,
) -> None:
    populate(tmp_path, movable=3)
    until = time.time() + 3600

    async def hold_every_claim() -> None:
        async with TieredSaver.from_urls(hot=None, warm=f"sqlite:///{tmp_path}/warm.db",
                                         cold=f"file://{tmp_path}/cold") as saver:
            warm = saver.regions.for_thread("movable-0").warm
            claims = await warm.claim(owner="other-worker", now=until - 3600,
                                      lease_seconds=3600, limit=100, idle_before=until,
                                      require_live=False)
            assert len(claims) == 3

    asyncio.run(hold_every_claim())
    env = embedded_env(tmp_path)
    result = cli("archive", "--older-than", "0s", "--idle-after", "0s", "--json", env=env)
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)
    assert [r["job"] for r in reports] == ["history-demotion", "idle-archival"]
    for report in reports:
        assert report["busy"] == 3 and report["claimed"] == 0 and report["threads"] == 0
        assert report["failed"] == 0 and abs(report["busy_until"] - until) < 5
    assert "3 threads are claimed by another worker until" in result.stderr
