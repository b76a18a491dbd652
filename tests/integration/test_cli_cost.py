"""``tierstore status --cost`` and ``tierstore plan`` as a user runs them: a subprocess on
the embedded stack, round prices from a file of the test's own, figures checked by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_cli import ROOT, cli, js
from tierstore.cost import STUB_BYTES_PER_CHECKPOINT, WARM_DISK_PER_PAYLOAD
from tierstore.demo import run_demo

GiB = 1 << 30
MONTH = 730 * 3600

PRICES = """
[source]
taken = "2026-01-01"
region = "test"

[warm.sqlite]
storage_gb_month = 1.0

[cold.FILE]
storage_gb_month = 2.0
get_per_1000 = 0.5
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    run_demo(tmp_path, out=lambda line: None, tiering=False)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TIERSTORE_")}
    return {**clean, "TIERSTORE_HOT_URL": "none",
            "TIERSTORE_WARM_URL": f"sqlite:///{tmp_path}/warm.db",
            "TIERSTORE_COLD_URL": f"file://{tmp_path}/cold", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(PRICES)
    return path


def items(bill: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {line["item"]: line for line in bill["lines"]}


def test_status_cost_prices_each_tier_at_its_size(env: dict[str, str], prices: Path) -> None:
    js("archive", "--older-than", "0s", env=env)
    data = js("status", "--cost", "--prices", str(prices), env=env)
    region = data["regions"]["default"]
    warm_bytes = region["warm"]["bytes"]
    cold = region["cold"]
    cold_bytes = cold["segments_bytes"] + cold["offload_bytes"] + cold["restores_bytes"]
    assert cold["by_class"] == {"FILE": {
        "objects": cold["segments_objects"] + cold["offload_objects"]
        + cold["restores_objects"], "bytes": cold_bytes, "floored_bytes": cold_bytes}}
    assert warm_bytes > 0 and cold_bytes > 0
    bill = data["cost"]["regions"]["default"]
    got = items(bill)
    stubs = region["warm"]["archived"] * STUB_BYTES_PER_CHECKPOINT
    assert stubs > 0
    assert got["sqlite storage"]["monthly"] == pytest.approx(
        (warm_bytes * WARM_DISK_PER_PAYLOAD["sqlite"] + stubs) / GiB * 1.0)
    assert got["FILE storage"]["monthly"] == pytest.approx(cold_bytes / GiB * 2.0)
    assert data["cost"]["total"] == pytest.approx(
        got["sqlite storage"]["monthly"] + got["FILE storage"]["monthly"])
    assert data["cost"]["requests"] == "storage only"
    assert data["cost"]["prices"]["taken"] == "2026-01-01"
    table = cli("status", "--cost", "--prices", str(prices), env=env).stdout
    assert "storage only" in table and "taken 2026-01-01" in table


def test_cold_reads_are_priced_from_the_savers_metrics(env: dict[str, str], prices: Path,
                                                       tmp_path: Path) -> None:
    js("archive", "--older-than", "0s", env=env)
    metrics = tmp_path / "metrics.txt"
    metrics.write_text(
        'tierstore_store_calls_total{tier="cold",backend="file",op="get_segment",'
        'outcome="ok"} 12\n'
        'tierstore_store_calls_total{tier="cold",backend="file",op="get_segment",'
        'outcome="CheckpointArchived"} 5\n')
    data = js("status", "--cost", "--prices", str(prices), "--metrics", str(metrics),
              "--metrics-period", "1d", env=env)
    reads = items(data["cost"]["regions"]["default"])["segment reads"]
    # 12 reads in a day: 12 x 730 / 24 a month, $0.5 per 1,000
    assert reads["quantity"] == pytest.approx(12 * 730 / 24)
    assert reads["monthly"] == pytest.approx(12 * 730 / 24 / 1000 * 0.5)
    assert data["cost"]["requests"] == "storage and cold reads"


def test_prices_come_from_file_then_environment_then_flags(
        env: dict[str, str], prices: Path) -> None:
    def warm_price(extra_env: dict[str, str], *flags: str) -> float:
        data = js("status", "--cost", *flags, env={**env, **extra_env})
        line = items(data["cost"]["regions"]["default"])["sqlite storage"]
        return float(line["monthly"] / line["quantity"])

    assert warm_price({}) == pytest.approx(0.08)  # the shipped EBS gp3 price
    assert warm_price({"TIERSTORE_PRICES_FILE": str(prices)}) == pytest.approx(1.0)
    over = {"TIERSTORE_PRICES_FILE": str(prices),
            "TIERSTORE_PRICES": "warm.sqlite.storage_gb_month=3, cold.FILE.get_per_1000=1"}
    assert warm_price(over) == pytest.approx(3.0)
    assert warm_price(over, "--price", "warm.sqlite.storage_gb_month=4") == pytest.approx(4.0)


@pytest.mark.parametrize(("args", "extra_env", "named"), [
    (("--price", "warm.sqlite.storage_gb_month=-1"), {}, "warm.sqlite.storage_gb_month"),
    (("--price", "warm.sqlite.storage_gb_month=cheap"), {}, "warm.sqlite.storage_gb_month"),
    (("--price", "warm.sqlite.price=1"), {}, "warm.sqlite.price"),
    ((), {"TIERSTORE_PRICES": "cold.FILE.storage_gb_month=x"}, "TIERSTORE_PRICES"),
    ((), {"TIERSTORE_PRICES_FILE": "/nonexistent/prices.toml"}, "TIERSTORE_PRICES_FILE"),
    (("--metrics", "/nonexistent/metrics.txt", "--metrics-period", "1d"), {}, "--metrics"),
    (("--metrics-period", "1d"), {}, "--metrics"),
])
def test_bad_prices_exit_2_with_one_line_naming_the_key(
        env: dict[str, str], args: tuple[str, ...], extra_env: dict[str, str],
        named: str) -> None:
    result = cli("status", "--cost", *args, env={**env, **extra_env}, check=2)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


def test_a_price_file_with_an_unknown_key_is_refused(env: dict[str, str],
                                                     tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[cold.GLACIER_IR]\nstorage_per_gb = 0.004\n")
    result = cli("status", "--cost", "--prices", str(bad), env=env, check=2)
    assert "cold.GLACIER_IR.storage_per_gb" in result.stderr
    assert str(bad) in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "--cost" in cli("status", "--prices", str(bad), env=env, check=2).stderr


def test_plan_by_hand(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "round.toml"
    path.write_text("[warm.postgres]\nstorage_gb_month = 0.10\n"
                    "[hot.redis]\nnode_hourly = 1.0\nnode_memory_gb = 73\n"
                    "usable_fraction = 1.0\n")
    data = js("plan", "--threads", "1k", "--checkpoints", "10k",
              "--checkpoints-per-month", "2000", "--bytes-per-checkpoint", "1048576",
              "--baseline-bytes", "none", "--hot-bytes", "1048576",
              "--archive-after", "none", "--archive-idle-after", "none", "--months", "2",
              "--prices", str(path), env=env)
    assert [m["checkpoints"] for m in data["months"]] == [12_000, 14_000]
    final = data["final"]
    assert set(final) == {"tiered", "all-in-warm", "all-in-hot"}
    # 14,000 checkpoints of 1 MiB at $0.10/GB-month; in Redis at $1 x 730 h / 73 GB
    assert final["all-in-warm"]["total"] == pytest.approx(14_000 / 1024 * 0.10)
    assert final["all-in-hot"]["total"] == pytest.approx(14_000 / 1024 * 10)
    tiered = items(final["tiered"])
    assert tiered["recent history"]["monthly"] == pytest.approx(14_000 / 1024 * 0.10)
    # 200 threads a month (2,000 x 1,000 / 10,000), each cached an hour: 200 / 730 of them
    assert tiered["Redis memory"]["monthly"] == pytest.approx(200 / 730 / 1024 * 10)
    assert data["prices"]["region"] == "us-east-1"  # a partial file keeps the rest
    table = cli("plan", "--prices", str(path), env=env).stdout
    assert "tiered / all-in-warm" in table and "once:" in table


@pytest.mark.parametrize(("args", "named"), [
    (("--threads", "-5"), "--threads"),
    (("--checkpoints", "lots"), "--checkpoints"),
    (("--latest-read-share", "2"), "latest_read_share"),
    (("--storage-class", "TAPE"), "TAPE"),
    (("--archive-after", "soon"), "--archive-after"),
    (("--warm-backend", "oracle"), "warm.oracle"),
    (("--months", "0"), "months"),
])
def test_plan_refuses_bad_input_in_one_line(env: dict[str, str], args: tuple[str, ...],
                                            named: str) -> None:
    result = cli("plan", *args, env=env, check=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


READ = 'tierstore_store_calls_total{tier="cold",backend="file",op="get_segment",outcome="ok"}'


@pytest.mark.parametrize(("metrics", "period", "named"), [
    (f"# a comment\n{READ} -5\n", "1d", "line 2"),
    (f"{READ} NaN\n", "1d", "line 1"),
    (f"{READ} +Inf\n", "1d", "line 1"),
    (f"{READ} 1e308\n{READ} 1e308\n", "1d", "line 2"),  # the sum overflows
    (f"{READ} 12\n", "nan", "--metrics-period"),
    (f"{READ} 12\n", "inf", "--metrics-period"),
    (f"{READ} 12\n", "0s", "--metrics-period"),
    (f"{READ} 1e307\n", "1s", "more reads a month than a number holds"),
])
def test_status_cost_refuses_counters_that_make_no_bill(
        env: dict[str, str], prices: Path, metrics: str, period: str, named: str) -> None:
    file = prices.parent / "metrics.txt"
    file.write_text(metrics)
    result = cli("status", "--cost", "--prices", str(prices), "--metrics", str(file),
                 "--metrics-period", period, "--json", env=env, check=2)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


def strict_json(text: str) -> Any:
    """JSON as RFC 8259 has it: NaN and Infinity are not numbers there."""
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(("args", "named"), [
    (("--threads", "1e308", "--checkpoints", "1e308"), "threads=1e+308"),
    (("--checkpoints-per-month", "1e308"), "checkpoints_per_month=1e+308"),
    (("--bytes-per-checkpoint", "1e308"), "bytes_per_checkpoint=1e+308"),
    (("--price", "cold.STANDARD_IA.storage_gb_month=1e308"),
     "prices.cold.STANDARD_IA.storage_gb_month=1e+308"),
])
def test_plan_refuses_inputs_too_large_to_price(env: dict[str, str], args: tuple[str, ...],
                                                named: str) -> None:
    result = cli("plan", *args, "--json", env=env, check=2)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "too large to price" in lines[0] and named in lines[0], \
        result.stderr
    # large inputs that do fit still print JSON any parser reads
    strict_json(cli("plan", "--threads", "1e15", "--checkpoints", "1e16", "--json",
                    env=env).stdout)
