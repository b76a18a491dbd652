"""Read latency against history length: SQLite and PostgreSQL warm tiers.

::

    for each warm backend (sqlite:/// in a temp dir, postgresql:// in a schema of its own):
        for each length L (default 100, 500, 2000):
            one thread of L checkpoints, 5 channels, one channel bumped per checkpoint
                                                            ── written through aput, not timed
            list:   the whole thread (alist, no limit)       ── median of --repeat runs,
                                                                and SQLite VM steps
            get:    the latest and the oldest checkpoint     ── median of --repeat x 20 calls
        for each width W (default 1000, 5000, 20000):
            one checkpoint with W channels                   ── written once, not timed
            get:    aget_tuple(latest)                       ── median of --repeat runs
    growth: each figure divided by the one at the smallest size

Reads go through ``TieredSaver`` with no hot tier, so every call reaches the warm
store. Linear reads show ``list`` growing with L (it returns L tuples) and ``get``
staying flat in L and growing with W; a quadratic join shows ``list`` growing with L².

Run:  .venv/bin/python loadtest/readscale.py [--lengths 100,500,2000] [--widths ...]
      [--backends sqlite,postgres] [--repeat 3] [--postgres URL] [--json PATH]
Only 127.0.0.1 is contacted; the schema and the temp directory are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6

from tierstore import TieredSaver

CHANNELS = 5


@asynccontextmanager
async def open_saver(backend: str, postgres: str, tmp: Path) -> AsyncIterator[TieredSaver]:
    if backend == "sqlite":
        warm = f"sqlite:///{tmp}/{uuid.uuid4().hex}.db?synchronous=normal"
        async with TieredSaver.from_urls(hot=None, warm=warm, cold=None) as saver:
            yield saver
        return
    schema = f"readscale_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in postgres else "?"
    try:
        async with TieredSaver.from_urls(hot=None, warm=f"{postgres}{sep}schema={schema}",
                                         cold=None) as saver:
            yield saver
    finally:
        conn = await asyncpg.connect(postgres)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def write_thread(saver: TieredSaver, thread: str, length: int, channels: int) -> None:
    """``length`` checkpoints; the first sets every channel, each next one bumps one."""
    config: dict[str, Any] = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    checkpoint = empty_checkpoint()
    values = {f"ch{c}": f"value-{c}-0" for c in range(channels)}
    versions = {ch: saver.get_next_version(None, None) for ch in values}
    for i in range(length):
        if i == 0:
            new = dict(versions)
        else:
            ch = f"ch{i % channels}"
            versions[ch] = saver.get_next_version(versions[ch], None)
            values[ch] = f"value-{ch}-{i}"
            new = {ch: versions[ch]}
        checkpoint = {**checkpoint, "id": str(uuid6(clock_seq=i)),
                      "channel_values": dict(values), "channel_versions": dict(versions)}
        config = dict(await saver.aput(config, checkpoint,  # type: ignore[arg-type]
                                       {"source": "loop", "step": i}, new))


class VmSteps:
    """SQLite virtual-machine steps of the saver's warm connection (thousands).

    Unlike milliseconds this does not move with the machine's load, so its growth
    with the thread's length is exact: a linear read grows like the thread.
    """

    def __init__(self, saver: TieredSaver) -> None:
        warm = saver.regions.by_name["default"].warm
        self.conn: sqlite3.Connection | None = getattr(warm, "_conn", None)
        self.count = 0

    def _tick(self) -> int:
        self.count += 1
        return 0

    async def measure(self, op: Callable[[], Awaitable[Any]]) -> float | None:
        if self.conn is None:
            return None
        self.count = 0
        self.conn.set_progress_handler(self._tick, 1000)
        try:
            await op()
        finally:
            self.conn.set_progress_handler(None, 0)
        return float(self.count)


async def median_ms(op: Callable[[], Awaitable[Any]], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await op()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


async def measure(backend: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"length": {}, "width": {}}
    async with open_saver(backend, args.postgres, tmp) as saver:
        for length in args.lengths:
            thread = f"len-{length}"
            await write_thread(saver, thread, length, CHANNELS)
            cfg = {"configurable": {"thread_id": thread}}
            oldest = [t async for t in saver.alist(cfg)][-1].config

            async def list_all(cfg: Any = cfg, length: int = length) -> None:
                assert len([t async for t in saver.alist(cfg)]) == length

            steps = VmSteps(saver)
            out["length"][length] = {
                "list_ms": await median_ms(list_all, args.repeat),
                "list_ksteps": await steps.measure(list_all),
                "get_latest_ms": await median_ms(lambda cfg=cfg: saver.aget_tuple(cfg),
                                                 args.repeat * 20),
                "get_oldest_ms": await median_ms(lambda o=oldest: saver.aget_tuple(o),
                                                 args.repeat * 20),
            }
            print(f"  {backend} length {length}: {out['length'][length]}", file=sys.stderr)
        for width in args.widths:
            thread = f"width-{width}"
            await write_thread(saver, thread, 1, width)
            cfg = {"configurable": {"thread_id": thread}}
            out["width"][width] = {
                "get_ms": await median_ms(lambda cfg=cfg: saver.aget_tuple(cfg), args.repeat),
                "get_ksteps": await VmSteps(saver).measure(lambda cfg=cfg: saver.aget_tuple(cfg)),
            }
            print(f"  {backend} width {width}: {out['width'][width]}", file=sys.stderr)
    return out


def growth(series: dict[int, dict[str, float | None]]) -> dict[int, dict[str, float | None]]:
    first = series[min(series)]
    return {size: {k: None if v is None or not first[k] else v / first[k]  # type: ignore[operator]
                   for k, v in row.items()} for size, row in series.items()}


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| backend | checkpoints | list ms | x | list kSteps | x | get latest ms | x "
             "| get oldest ms | x |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backend, res in results.items():
        g = growth(res["length"])
        for size, row in res["length"].items():
            lines.append(
                f"| {backend} | {size} | {_f(row['list_ms'], 1)} | {_f(g[size]['list_ms'], 1)} "
                f"| {_f(row['list_ksteps'], 0)} | {_f(g[size]['list_ksteps'], 1)} "
                f"| {_f(row['get_latest_ms'], 2)} | {_f(g[size]['get_latest_ms'], 1)} "
                f"| {_f(row['get_oldest_ms'], 2)} | {_f(g[size]['get_oldest_ms'], 1)} |")
    lines += ["", "| backend | channels | get ms | x | get kSteps | x |",
              "|---|---:|---:|---:|---:|---:|"]
    for backend, res in results.items():
        g = growth(res["width"])
        for size, row in res["width"].items():
            lines.append(f"| {backend} | {size} | {_f(row['get_ms'], 1)} "
                         f"| {_f(g[size]['get_ms'], 1)} | {_f(row['get_ksteps'], 0)} "
                         f"| {_f(g[size]['get_ksteps'], 1)} |")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--lengths", type=ints, default=[100, 500, 2000])
    p.add_argument("--widths", type=ints, default=[1000, 5000, 20000])
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        results[backend] = await measure(backend, args, tmp)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="tierstore-readscale-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
