"""The demo is the README's main job: it must run, tell the truth, and finish quickly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tierstore.demo import CONVERSATIONS, run_demo


def test_demo_facts(tmp_path: Path) -> None:
    lines: list[str] = []
    facts = run_demo(tmp_path / "demo", out=lines.append)
    assert facts["resumed_answer"] == "I remember: my dog is called rex."
    assert facts["forked_answer"] == "The answer is 42."
    assert facts["hot_hits"] == len(CONVERSATIONS)
    assert facts["checkpoints"] > 3 * len(CONVERSATIONS)
    assert (tmp_path / "demo" / "warm.db").exists()
    assert facts["archived_checkpoints"] > facts["checkpoints"] // 2
    assert facts["history_intact"] is True
    assert facts["archived_resume_answer"] == "I remember: tea not coffee."
    assert facts["verify_ok"] is True
    text = "\n".join(lines)
    for heading in ("where the data sits", "time travel", "reopen", "tiering"):
        assert heading in text


def test_demo_runs_as_a_command(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([sys.executable, "-m", "tierstore", "demo"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "I remember: my dog is called rex." in result.stdout
    assert not (tmp_path / ".tierstore").exists()  # the default demo cleans up after itself


def test_cli_reports_bad_urls_as_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tierstore", "migrate", "--warm", "nosuch://x"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown warm tier scheme 'nosuch'" in result.stderr
    assert "Traceback" not in result.stderr
