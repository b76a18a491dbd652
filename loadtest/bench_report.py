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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_phases import Result
from bench_stores import BASELINE, EMBEDDED, TIERED, Settings

import tierstore

# -- ratios and targets --------------------------------------------------------------------

# the savers every other one is compared with: LangGraph's AsyncPostgresSaver as shipped, as
# teams run it (a pool, no lock), and its SQLite saver, the anchor of tierstore-embedded
ANCHORS = (BASELINE, "postgres-nolock", "sqlite")
RATIO_METRICS = ("turns_per_s", "read_p50_ms", "list_p50_ms", "bytes_per_checkpoint",
                 "client_cpu_ms_per_turn", "total_cpu_ms_per_turn")
RATIO_HEADS = ("turns/s", "read p50", "list p50", "B/ckpt", "client cpu", "total cpu")
# psycopg's builds on libpq; its pure-Python one makes AsyncPostgresSaver several ms slower
PSYCOPG_C_BUILDS = ("c", "binary")


@dataclass(frozen=True, slots=True)
class Target:
    """A ratio a saver must reach against an anchor; ``strict``: strictly below the bound."""

    saver: str
    anchor: str
    metric: str
    bound: float
    higher: bool
    strict: bool = False
    note: str = ""

    def text(self) -> str:
        sign = ">=" if self.higher else "<" if self.strict else "<="
        return f"{self.saver} {self.metric} {sign} {self.bound}x {self.anchor}"

    def met(self, ratio: float) -> bool:
        if self.higher:
            return ratio >= self.bound
        return ratio < self.bound if self.strict else ratio <= self.bound


TARGETS = (
    Target(TIERED, "postgres-nolock", "turns_per_s", 1.3, higher=True),
    Target(TIERED, BASELINE, "read_p50_ms", 0.5, higher=False),
    Target(TIERED, BASELINE, "bytes_per_checkpoint", 0.2, higher=False,
           note="set for the 20-turn workload"),
    Target(TIERED, BASELINE, "total_cpu_ms_per_turn", 1.0, higher=False, strict=True),
    Target(EMBEDDED, "sqlite", "turns_per_s", 1.5, higher=True),
    Target(EMBEDDED, "sqlite", "bytes_per_checkpoint", 0.2, higher=False),
)

Ratios = dict[str, dict[str, dict[str, float | None]]]  # anchor -> saver -> metric -> ratio


def ratios_withheld(info: dict[str, Any]) -> str | None:
    """Why no ratio may be printed, or None: only psycopg's C builds make a fair baseline."""
    if info["psycopg"] in PSYCOPG_C_BUILDS:
        return None
    return (f"psycopg.pq.__impl__ is {info['psycopg']!r}, not one of "
            f"{', '.join(PSYCOPG_C_BUILDS)}: AsyncPostgresSaver would be measured on the "
            "pure-Python libpq wrapper; install psycopg[binary] (or psycopg[c])")


def ratios(results: Sequence[Result]) -> Ratios:
    """Every saver against every anchor that ran (higher turns/s, lower rest is better)."""
    out: Ratios = {}
    for anchor in ANCHORS:
        base = next((r for r in results if r.saver == anchor), None)
        if base is None:
            continue
        table: dict[str, dict[str, float | None]] = {}
        for r in results:
            row: dict[str, float | None] = {}
            for metric in RATIO_METRICS:
                mine, theirs = getattr(r, metric), getattr(base, metric)
                row[metric] = mine / theirs if mine is not None and theirs else None
            table[r.saver] = row
        out[anchor] = table
    return out


def targets(table: Ratios, settings: Settings) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for goal in TARGETS:
        ratio = table.get(goal.anchor, {}).get(goal.saver, {}).get(goal.metric)
        note = goal.note
        if goal.metric == "bytes_per_checkpoint" and settings.turns != 20:
            note = f"{note}; this run has {settings.turns} turns".lstrip("; ")
        out.append({"target": goal.text(), "saver": goal.saver, "anchor": goal.anchor,
                    "metric": goal.metric, "ratio": ratio,
                    "met": None if ratio is None else goal.met(ratio), "note": note})
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
        "langgraph-checkpoint-sqlite": version("langgraph-checkpoint-sqlite"),
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
      f"langgraph-checkpoint-sqlite={info['langgraph-checkpoint-sqlite']} "
      f"psycopg={info['psycopg']}\n")
    w(f"tierstore: git {info['tierstore_git']}, sources sha256 "
      f"{info['tierstore_sources_sha256']}\n")
    w(f"workload: {settings.workload}, {settings.threads} threads x {settings.turns} turns, "
      f"{settings.concurrency} concurrent, {settings.message_bytes}-byte messages; "
      f"{settings.read_samples} latest reads, {settings.list_samples} lists (sequential); "
      f"postgres-nolock pool {settings.pool}; {settings.repeat} round(s), saver order "
      f"{'alternating' if settings.repeat > 1 else 'as given'}; loadavg at the end "
      f"{info.get('loadavg_end')}\n\n")
    delta = settings.workload == "delta"
    head = ["saver", "turns/s", "turn p50", "turn p99", "read p50", "read p99", "list p50"]
    units = ["", "", "ms", "ms", "ms", "ms", "ms"]
    if delta:
        head.append("state p50")
        units.append("ms")
    head += ["B/ckpt", "ckpts", "cpu/turn", "cpu/turn", "cpu/turn", "cpu/turn"]
    units += ["warm", "", "client ms", "postgres ms", "redis ms", "total ms"]
    rows: list[Sequence[str]] = [head, units]
    for r in results:
        row = [r.saver, _fmt(r.turns_per_s, 1), _fmt(r.turn_p50_ms), _fmt(r.turn_p99_ms),
               _fmt(r.read_p50_ms, 3), _fmt(r.read_p99_ms, 3), _fmt(r.list_p50_ms, 3)]
        if delta:
            row.append(_fmt(r.state_p50_ms, 3))
        row += [_fmt(r.bytes_per_checkpoint, 0), str(r.checkpoints),
                _fmt(r.client_cpu_ms_per_turn), _fmt(r.server_cpu_split.get("postgres")),
                _fmt(r.server_cpu_split.get("redis")), _fmt(r.total_cpu_ms_per_turn)]
        rows.append(row)
    w(table(rows))
    for r in results:
        if r.warm_detail:
            parts = ", ".join(f"{k}={v:,}" for k, v in r.warm_detail.items())
            w(f"  {r.saver} warm bytes {r.warm_bytes:,}: {parts}\n")
        if r.hot_bytes is not None:
            w(f"  {r.saver} hot bytes (redis MEMORY USAGE of its keys): {r.hot_bytes:,}\n")
        if r.rounds:
            parts = "; ".join(f"{x['turns_per_s']:.1f} turns/s, read {x['read_p50_ms']:.3f} ms"
                              for x in r.rounds)
            w(f"  {r.saver} rounds: {parts}\n")
    for name, why in skipped.items():
        w(f"  {name}: skipped ({why})\n")
    by_name = {r.saver: r for r in results}
    mine, theirs = by_name.get(TIERED), by_name.get(BASELINE)
    if mine and theirs and mine.total_cpu_ms_per_turn and theirs.total_cpu_ms_per_turn:
        w(f"\nCPU per turn, client + postgres + redis: {TIERED} "
          f"{mine.total_cpu_ms_per_turn:.2f} ms, AsyncPostgresSaver ({BASELINE}) "
          f"{theirs.total_cpu_ms_per_turn:.2f} ms\n")
    withheld = ratios_withheld(info)
    if withheld is not None:
        w(f"\nno ratios and no targets: {withheld}\n")
        return out.getvalue()
    table_r = ratios(results)
    for anchor, by_saver in table_r.items():
        w(f"\nratio to {anchor}; turns/s: higher is better, the rest: lower is better\n")
        rows = [("saver", *RATIO_HEADS)]
        for name, ratio_row in by_saver.items():
            rows.append((name, *(_fmt(ratio_row[m]) + ("x" if ratio_row[m] is not None else "")
                                 for m in RATIO_METRICS)))
        w(table(rows))
    w(f"\ntargets ({settings.workload} workload):\n")
    for goal in targets(table_r, settings):
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[goal["met"]]
        ratio = "not measured" if goal["ratio"] is None else f"{goal['ratio']:.2f}x"
        note = f"  ({goal['note']})" if goal["note"] else ""
        w(f"  {verdict}  {goal['target']:<58} {ratio}{note}\n")
    return out.getvalue()


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"
