"""The ops CLI as a user runs it: a subprocess, exit codes, --json, one-line errors."""

from __future__ import annotations

import json
import os
import pty
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tierstore.demo import run_demo

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str], check: int | None = 0,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "tierstore", *args], capture_output=True,
                            text=True, timeout=120, env=env, check=False, cwd=cwd)
    if check is not None:
        assert result.returncode == check, result.stdout + result.stderr
    return result


def js(*args: str, env: dict[str, str]) -> Any:
    return json.loads(cli(*args, "--json", env=env).stdout)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    run_demo(tmp_path, out=lambda line: None, tiering=False)
    return {**os.environ, "TIERSTORE_HOT_URL": "none",
            "TIERSTORE_WARM_URL": f"sqlite:///{tmp_path}/warm.db",
            "TIERSTORE_COLD_URL": f"file://{tmp_path}/cold", "PYTHONPATH": str(ROOT)}


def warm_counts(env: dict[str, str]) -> dict[str, int]:
    data = js("status", env=env)["regions"]["default"]
    return {"live": data["warm"]["checkpoints"], "archived": data["warm"]["archived"],
            "segments": data["cold"]["segments_objects"]}


def test_status_archive_verify_tell_the_truth(env: dict[str, str]) -> None:
    before = warm_counts(env)
    assert before["archived"] == 0 and before["segments"] == 0 and before["live"] > 3
    dry = js("archive", "--older-than", "0s", "--dry-run", env=env)
    assert dry[0]["checkpoints"] == before["live"] - 3  # every thread keeps its head
    assert warm_counts(env) == before  # a dry run moves nothing
    done = js("archive", "--older-than", "0s", env=env)
    assert done[0]["checkpoints"] == dry[0]["checkpoints"]
    after = warm_counts(env)
    assert after == {"live": 3, "archived": before["live"] - 3, "segments": done[0]["segments"]}
    assert js("verify", env=env)["ok"] is True
    tree = js("inspect", "bob", env=env)
    tiers = [row["tier"] for row in tree["namespaces"][""]]
    assert tiers[0] == "warm" and set(tiers[1:]) == {"cold"}


def test_idle_archive_then_restore_brings_a_thread_back(env: dict[str, str]) -> None:
    js("archive", "--older-than", "0s", "--idle-after", "0s", "--thread", "carol", env=env)
    tree = js("inspect", "carol", env=env)
    assert {row["tier"] for row in tree["namespaces"][""]} == {"cold"}
    restored = js("restore", "--thread", "carol", "--wait", env=env)
    assert restored["done"] is True and restored["rehydrated"] == len(tree["namespaces"][""])
    tree = js("inspect", "carol", env=env)
    assert {row["tier"] for row in tree["namespaces"][""]} == {"warm"}


def test_verify_finds_damage_and_exits_1(env: dict[str, str], tmp_path: Path) -> None:
    js("archive", "--older-than", "0s", env=env)
    segment = next((tmp_path / "cold").rglob("*.tseg"))
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    segment.write_bytes(bytes(data))
    result = cli("verify", "--json", env=env, check=1)
    report = json.loads(result.stdout)
    assert report["ok"] is False and "checksum" in report["problems"][0]
    conn = sqlite3.connect(tmp_path / "warm.db")
    with conn:
        conn.execute("UPDATE blobs SET data = X'00112233' WHERE length(data) > 64")
    conn.close()
    report = json.loads(cli("verify", "--json", env=env, check=1).stdout)
    assert len(report["problems"]) >= 2


def test_export_import_round_trip(env: dict[str, str], tmp_path: Path) -> None:
    js("archive", "--older-than", "0s", env=env)  # export includes archived history
    out = tmp_path / "bob.tsexport"
    exported = js("export", "bob", str(out), env=env)
    imported = js("import", str(out), "--as-thread", "bob-copy", env=env)
    assert imported["checkpoints"] == exported["checkpoints"] > 3
    original = js("inspect", "bob", env=env)["namespaces"][""]
    copy = js("inspect", "bob-copy", env=env)["namespaces"][""]
    assert [r["checkpoint_id"] for r in copy] == [r["checkpoint_id"] for r in original]
    taken = cli("import", str(out), "--as-thread", "bob-copy", env=env, check=2)
    assert "already exists" in taken.stderr  # never written into an existing thread
    again = js("import", str(out), "--as-thread", "bob-copy", "--replace", env=env)
    assert again["checkpoints"] == imported["checkpoints"] and again["replaced"] is True
    assert len(js("inspect", "bob-copy", env=env)["namespaces"][""]) == len(copy)
    out.write_bytes(out.read_bytes()[:-10])
    result = cli("import", str(out), env=env, check=3)
    assert "checksum" in result.stderr and result.stderr.count("\n") == 1


def test_an_import_bound_flag_keeps_the_other_bounds_from_the_environment(
        env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "bob.tsexport"
    js("export", "bob", str(out), env=env)
    tight = {**env, "TIERSTORE_MAX_PAYLOAD_BYTES": "64"}
    refused = cli("import", str(out), "--as-thread", "bob-2", "--max-bundle-bytes",
                  "100000000", env=tight, check=3)
    assert "max_payload_bytes" in refused.stderr
    assert "no checkpoints" in cli("inspect", "bob-2", env=env, check=2).stderr  # none written
    done = js("import", str(out), "--as-thread", "bob-2", "--max-payload-bytes", "10000000",
              env=tight)  # the flag wins over its own variable
    assert done["checkpoints"] > 3


def test_worker_once_runs_every_job_and_writes_health(env: dict[str, str],
                                                      tmp_path: Path) -> None:
    health = tmp_path / "health.json"
    result = cli("worker", "--once", "--archive-after", "0s", "--archive-idle-after", "3650d",
                 "--health-file", str(health), env=env)
    data = json.loads(health.read_text())
    assert data["healthy"] is True
    assert set(data["jobs"]) == {"hot-expiry", "history-demotion", "idle-archival",
                                 "retention", "rehydrate", "cold-gc"}
    assert data["jobs"]["history-demotion"]["last_report"]["checkpoints"] > 0
    assert json.loads(result.stdout)["healthy"] is True
    # cold-gc lists the whole cold store: once a day unless told otherwise
    assert {name: job["interval"] for name, job in data["jobs"].items()} == {
        "hot-expiry": 300.0, "history-demotion": 300.0, "idle-archival": 300.0,
        "retention": 300.0, "rehydrate": 300.0, "cold-gc": 86400.0}
    cli("worker", "--once", "--interval", "1m", "--gc-interval", "2h",
        "--health-file", str(health), env=env)
    intervals = {name: job["interval"]
                 for name, job in json.loads(health.read_text())["jobs"].items()}
    assert intervals.pop("cold-gc") == 7200.0 and set(intervals.values()) == {60.0}


@pytest.mark.parametrize("args", [
    ("--interval", "0s"), ("--interval", "nan"), ("--interval", "inf"),
    ("--gc-interval", "0"), ("--gc-interval", "NaN"), ("--gc-interval", "-inf"),
])
def test_the_worker_refuses_an_interval_that_is_not_finite_and_above_0(
        env: dict[str, str], tmp_path: Path, args: tuple[str, str]) -> None:
    health = tmp_path / "health.json"
    result = cli("worker", "--once", *args, "--health-file", str(health), env=env, check=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and args[0] in lines[0], result.stderr
    assert not health.exists()


def tty_cli(*args: str, env: dict[str, str]) -> str:
    """What a command writes to a terminal (stdout and stderr both on one pty)."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "tierstore", *args], stdin=subprocess.DEVNULL,
            stdout=follower, stderr=follower, cwd=ROOT,
            env={**env, "TERM": "xterm", "COLUMNS": "200"})
        os.close(follower)
        out = bytearray()
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the pty closed: every writer is gone
                break
            if not chunk:
                break
            out += chunk
        assert process.wait(timeout=120) == 0, out.decode(errors="replace")
    finally:
        os.close(leader)
    return out.decode(errors="replace")


def test_archive_and_status_cost_show_progress_on_a_terminal(env: dict[str, str]) -> None:
    shown = tty_cli("archive", "--older-than", "0s", "--idle-after", "3650d", env=env)
    assert "archiving: history-demotion, threads" in shown
    assert "archiving: idle-archival, threads" in shown
    assert "looking at cold objects" in tty_cli("status", "--cost", env=env)
    # piped, or with --json, nothing but the report
    assert cli("status", "--cost", "--json", env=env).stderr == ""


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["status", "--warm", "nosuch://x"], 2, "unknown warm tier scheme"),
        (["inspect", "no-such-thread"], 2, "has no checkpoints"),
        (["archive", "--older-than", "soon"], 2, "not a duration"),
        (["import"], 2, "either FILE or --from-langgraph-postgres"),
        (["import", "/nonexistent/file"], 2, "cannot read"),
        (["export", "bob", "/nonexistent/dir/bob.tsexport"], 2, "does not exist"),
        (["status", "--warm", "sqlite:///x.db?synchronus=normal"], 2, "synchronus"),
        (["status", "--warm", "sqlite:////proc/forbidden/x.db"], 2, "cannot create"),
    ],
)
def test_errors_are_one_line_with_meaningful_exit_codes(env: dict[str, str], args: list[str],
                                                        code: int, fragment: str) -> None:
    result = cli(*args, env=env, check=code)
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_worker_stops_cleanly_on_sigterm(env: dict[str, str], tmp_path: Path) -> None:
    import signal
    import time

    health = tmp_path / "worker-health.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierstore", "worker", "--interval", "0.2s",
         "--health-file", str(health)], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not health.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health.exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    data = json.loads(health.read_text())
    assert data["healthy"] is True
    assert data["jobs"]["history-demotion"]["runs"] >= 1


def test_the_cli_needs_no_click(env: dict[str, str], tmp_path: Path) -> None:
    # `pip install tierstore[cli]` brings typer and rich only; click must not be required
    code = ("import sys, runpy; sys.modules['click'] = None; "
            "sys.argv = ['tierstore', 'migrate', '--warm', 'nosuch://x']; "
            "runpy.run_module('tierstore', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=env, cwd=ROOT, check=False)
    assert result.returncode == 2, result.stderr
    assert "unknown warm tier scheme 'nosuch'" in result.stderr
    bad_flag = subprocess.run(
        [sys.executable, "-c", code.replace("'migrate', '--warm', 'nosuch://x'",
                                            "'status', '--no-such-flag'")],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT, check=False)
    assert bad_flag.returncode == 2
    assert "Traceback" not in bad_flag.stderr


REGIONS_TOML = """
default_region = "eu"

[[rules]]
match = "us-*"
region = "us"

[regions.eu]
warm = "sqlite:///{root}/eu/warm.db"
cold = "file://{root}/eu/cold"

[regions.us]
warm = "sqlite:///{root}/us/warm.db"
cold = "file://{root}/us/cold"
"""


@pytest.fixture
def regions_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    import asyncio

    from langchain_core.messages import HumanMessage

    from tierstore import TieredSaver
    from tierstore.demo import build_agent
    from tierstore.settings import RegionTable

    table_file = tmp_path / "regions.toml"
    table_file.write_text(REGIONS_TOML.format(root=tmp_path))

    async def converse() -> None:
        saver = TieredSaver.from_region_table(RegionTable.from_file(table_file))
        async with saver:
            app = build_agent().compile(checkpointer=saver)
            for thread in ("eu-alice", "us-carol", "anyone"):
                for text in ("hello", "remember tea", "what is 2 + 2"):
                    await app.ainvoke({"messages": [HumanMessage(text)]},
                                      {"configurable": {"thread_id": thread}})

    asyncio.run(converse())
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERSTORE_")}
    return {**env, "PYTHONPATH": str(ROOT)}, table_file


def test_the_cli_works_per_region(regions_env: tuple[dict[str, str], Path],
                                  tmp_path: Path) -> None:
    env, table = regions_env
    both = js("status", "--regions", str(table), env=env)["regions"]
    assert set(both) == {"eu", "us"}
    assert both["eu"]["warm"]["threads"] == 2 and both["us"]["warm"]["threads"] == 1
    only_us = js("status", "--regions", str(table), "--region", "us", env=env)["regions"]
    assert set(only_us) == {"us"}
    # archive the EU region only: US history stays where it was, untouched
    done = js("archive", "--regions", str(table), "--region", "eu", "--older-than", "0s",
              env=env)
    assert done[0]["checkpoints"] > 0
    after = js("status", "--regions", str(table), env=env)["regions"]
    assert after["eu"]["warm"]["archived"] == done[0]["checkpoints"]
    assert after["us"]["warm"]["archived"] == 0
    def cold_files(region: str) -> list[Path]:
        return [p for p in (tmp_path / region / "cold").rglob("*") if p.is_file()]

    assert cold_files("eu") and not cold_files("us")
    # another region's thread is refused by name, not looked up in the wrong stores
    refused = cli("inspect", "us-carol", "--regions", str(table), "--region", "eu", env=env,
                  check=3)
    assert "region 'us'" in refused.stderr and refused.stderr.count("\n") == 1
    tree = js("inspect", "us-carol", "--regions", str(table), "--region", "us", env=env)
    assert tree["thread_id"] == "us-carol"
    # the table can come from the environment, and a worker can serve one region
    env_file = {**env, "TIERSTORE_REGIONS_FILE": str(table)}
    health = tmp_path / "health.json"
    cli("worker", "--once", "--region", "us", "--archive-after", "0s",
        "--health-file", str(health), env=env_file)
    report = json.loads(health.read_text())["jobs"]["history-demotion"]["last_report"]
    assert report["checkpoints"] == after["us"]["warm"]["checkpoints"] - 1
    final = js("status", env=env_file)["regions"]
    assert final["us"]["warm"]["archived"] == report["checkpoints"]
    assert final["eu"]["warm"]["archived"] == after["eu"]["warm"]["archived"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["status", "--region", "eu"], "--region needs a region table"),
        (["status", "--regions", "{table}", "--region", "mars"], "unknown region 'mars'"),
        (["status", "--regions", "{table}", "--warm", "sqlite:///x.db"], "not both"),
        (["status", "--regions", "{missing}"], "cannot read it"),
    ],
)
def test_region_flags_are_checked(regions_env: tuple[dict[str, str], Path], tmp_path: Path,
                                  args: list[str], fragment: str) -> None:
    env, table = regions_env
    argv = [a.format(table=table, missing=tmp_path / "nope.toml") for a in args]
    result = cli(*argv, env=env, check=2)
    assert fragment in result.stderr and result.stderr.count("\n") == 1


def test_a_tier_flag_beside_a_region_table_needs_warm(
        regions_env: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    """--hot/--cold alone would open the default warm store, not the table's: refused."""
    env, table = regions_env
    env_file = {**env, "TIERSTORE_REGIONS_FILE": str(table)}
    for flag in ("--hot", "--cold"):
        result = cli("status", flag, "none", env=env_file, cwd=tmp_path, check=2)
        assert "give --warm too" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / ".tierstore").exists()  # no store was opened or created


def test_one_region_needs_only_its_own_secrets(regions_env: tuple[dict[str, str], Path],
                                               tmp_path: Path) -> None:
    env, table = regions_env
    secret = table.read_text().replace(f"sqlite:///{tmp_path}/us/", "sqlite:///${US_DIR}/")
    guarded = tmp_path / "guarded.toml"
    guarded.write_text(secret)
    eu = js("status", "--regions", str(guarded), "--region", "eu", env=env)["regions"]
    assert eu["eu"]["warm"]["threads"] == 2
    refused = cli("status", "--regions", str(guarded), env=env, check=2)
    assert "${US_DIR} is not set" in refused.stderr
    both = js("status", "--regions", str(guarded), env={**env, "US_DIR": str(tmp_path / "us")})
    assert both["regions"]["us"]["warm"]["threads"] == 1
    # a URL flag wins over a region table named only in the environment
    flagged = js("status", "--warm", f"sqlite:///{tmp_path}/us/warm.db", "--hot", "none",
                 "--cold", "none", env={**env, "TIERSTORE_REGIONS_FILE": str(guarded)})
    assert set(flagged["regions"]) == {"default"}
    assert flagged["regions"]["default"]["warm"]["threads"] == 1


def test_import_of_a_crafted_file_runs_nothing_and_writes_nothing(env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    from tests.bombs import bundle, chain, record, shell_payload
    from tierstore.codec import Codec
    from tierstore.records import Payload

    marker = tmp_path / "pwned"
    codec = Codec(JsonPlusSerializer())
    good = chain(codec, "mallory", 2)
    evil = record(codec, "mallory", parent_id=good[-1].checkpoint_id,
                  values={"a": Payload("msgpack", shell_payload(str(marker)))})
    path = tmp_path / "evil.tsexport"
    path.write_bytes(bundle("mallory", [*good, evil]))
    result = cli("import", str(path), env=env, check=3)
    assert "os.system" in result.stderr and result.stderr.count("\n") == 1
    assert not marker.exists()
    cli("inspect", "mallory", env=env, check=2)  # no such thread: nothing was written
    assert js("verify", env=env)["ok"] is True
    assert not marker.exists()
    # a type the operator vouches for goes through --allow-type; os.system never does here
    result = cli("import", str(path), "--allow-type", "os:getcwd", env=env, check=3)
    assert not marker.exists()


def test_commands_are_plain_functions(env: dict[str, str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tierstore import cli as commands

    for name in [n for n in os.environ if n.startswith("TIERSTORE_")]:
        monkeypatch.delenv(name)
    stores = {"hot": "none", "warm": env["TIERSTORE_WARM_URL"],
              "cold": env["TIERSTORE_COLD_URL"]}
    assert commands.status(**stores, as_json=True) == commands.EXIT_OK
    live = json.loads(capsys.readouterr().out)["regions"]["default"]["warm"]["checkpoints"]
    assert commands.archive(**stores, older_than="0s", as_json=True) == commands.EXIT_OK
    assert json.loads(capsys.readouterr().out)[0]["checkpoints"] == live - 3
    assert commands.verify(**stores, as_json=True) == commands.EXIT_OK
    assert json.loads(capsys.readouterr().out)["ok"] is True
    # the same names the environment gives work as well
    for tier, url in stores.items():
        monkeypatch.setenv(f"TIERSTORE_{tier.upper()}_URL", url)
    assert commands.inspect("bob", as_json=True) == commands.EXIT_OK
    assert json.loads(capsys.readouterr().out)["thread_id"] == "bob"
