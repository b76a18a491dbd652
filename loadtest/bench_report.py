"""The report: the machine, the table of results, ratios and targets.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_phases import Result
from bench_stores import BASELINE, TARGETS, TIERED, Settings

import tierstore

# -- ratios and the report -----------------------------------------------------------------

RATIO_METRICS = ("turns_per_s", "read_p50_ms", "list_p50_ms", "bytes_per_checkpoint")


def ratios(results: Sequence[Result]) -> dict[str, dict[str, float | None]]:
    base = next((r for r in results if r.saver == BASELINE), None)
    if base is None:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for r in results:
        row: dict[str, float | None] = {}
        for metric in RATIO_METRICS:
            mine, theirs = getattr(r, metric), getattr(base, metric)
            row[metric] = mine / theirs if mine is not None and theirs else None
        out[r.saver] = row
    return out


def targets(table: dict[str, dict[str, float | None]]) -> dict[str, dict[str, Any]]:
    row = table.get(TIERED)
    if row is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for metric, (bound, higher) in TARGETS.items():
        value = row.get(metric)
        met = None if value is None else (value >= bound if higher else value <= bound)
        out[metric] = {"ratio": value, "target": f"{'>=' if higher else '<='} {bound}x",
                       "met": met}
    return out


def machine() -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    cpu = "-"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import psycopg

        psycopg_impl = str(psycopg.pq.__impl__)
    except ImportError:
        psycopg_impl = "-"
    package = Path(tierstore.__file__).parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    return {
        "tierstore_git": _git_state(package.parent),
        "tierstore_sources_sha256": digest.hexdigest()[:12],
        "psycopg": psycopg_impl,
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "langgraph": version("langgraph"),
        "langgraph-checkpoint-postgres": version("langgraph-checkpoint-postgres"),
        "tierstore": version("tierstore"),
    }


def _git_state(root: Path) -> str:
    """``<commit>`` of the checkout tierstore is imported from, ``+dirty`` with local edits."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "tierstore", "migrations"],
                               capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "-"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def render(results: Sequence[Result], settings: Settings, info: dict[str, Any],
           skipped: dict[str, str]) -> str:
    out = io.StringIO()
    w = out.write
    w(f"machine: nproc={info['nproc']} cpu={info['cpu']!r} loadavg={info['loadavg']} "
      f"python={info['python']} langgraph={info['langgraph']} "
      f"langgraph-checkpoint-postgres={info['langgraph-checkpoint-postgres']} "
      f"psycopg={info['psycopg']}\n")
    w(f"tierstore: git {info['tierstore_git']}, sources sha256 "
      f"{info['tierstore_sources_sha256']}\n")
    if info["psycopg"] == "python":
        w("warning: psycopg runs its pure-Python libpq wrapper here, which slows "
          "AsyncPostgresSaver down; install psycopg[binary] for the usual baseline\n")
    w(f"workload: {settings.threads} threads x {settings.turns} turns, "
      f"{settings.concurrency} concurrent, {settings.message_bytes}-byte messages; "
      f"{settings.read_samples} latest reads, {settings.list_samples} lists (sequential); "
      f"{settings.repeat} round(s), loadavg at the end {info.get('loadavg_end')}\n\n")
    head = ("saver", "turns/s", "turn p50", "turn p99", "read p50", "read p99", "list p50",
            "B/ckpt", "ckpts", "cpu/turn", "srv cpu/turn")
    rows: list[Sequence[str]] = [
        head, ("", "", "ms", "ms", "ms", "ms", "ms", "warm", "", "ms client", "ms pg+redis")]
    for r in results:
        rows.append((
            r.saver, _fmt(r.turns_per_s, 1), _fmt(r.turn_p50_ms), _fmt(r.turn_p99_ms),
            _fmt(r.read_p50_ms, 3), _fmt(r.read_p99_ms, 3), _fmt(r.list_p50_ms, 3),
            _fmt(r.bytes_per_checkpoint, 0), str(r.checkpoints),
            _fmt(r.client_cpu_ms_per_turn), _fmt(r.server_cpu_ms_per_turn),
        ))
    w(table(rows))
    for r in results:
        if r.warm_detail:
            parts = ", ".join(f"{k}={v:,}" for k, v in r.warm_detail.items())
            w(f"  {r.saver} warm bytes {r.warm_bytes:,}: {parts}\n")
        if r.hot_bytes is not None:
            w(f"  {r.saver} hot bytes (redis MEMORY USAGE of its keys): {r.hot_bytes:,}\n")
        if r.server_cpu_split:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in r.server_cpu_split.items())
            w(f"  {r.saver} server CPU ms/turn: {parts}\n")
        if r.rounds:
            parts = "; ".join(f"{x['turns_per_s']:.1f} turns/s, read {x['read_p50_ms']:.3f} ms"
                              for x in r.rounds)
            w(f"  {r.saver} rounds: {parts}\n")
    for name, why in skipped.items():
        w(f"  {name}: skipped ({why})\n")
    table_r = ratios(results)
    if table_r:
        w(f"\nratio to AsyncPostgresSaver ({BASELINE}); turns/s: higher is better, "
          "the rest: lower is better\n")
        rows = [("saver", "turns/s", "read p50", "list p50", "B/ckpt")]
        for name, row in table_r.items():
            rows.append((name, *(_fmt(row[m]) + ("x" if row[m] is not None else "")
                                 for m in RATIO_METRICS)))
        w(table(rows))
        goals = targets(table_r)
        if goals:
            w(f"\ntargets for {TIERED}:\n")
            for metric, goal in goals.items():
                verdict = {True: "met", False: "MISSED", None: "n/a"}[goal["met"]]
                w(f"  {metric:<22} {_fmt(goal['ratio'])}x  (target {goal['target']}): "
                  f"{verdict}\n")
    return out.getvalue()


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"
