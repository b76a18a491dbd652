"""Per-thread call latency against the PostgreSQL partition count.

::

    one schema per layout (default: plain, 16, 64 partitions), each holding --threads
    other threads of 3 checkpoints and one thread of 20          ── written, not timed
    rounds (--rounds): in each, every layout in turn, alternating, runs
        get:   aget_tuple(latest) of the 20-checkpoint thread, --calls times
        put:   aput on that thread, --calls times
    each figure: the median over rounds of the mean per call; ratios to the plain layout

Calls go through ``TieredSaver`` with no hot tier, so every call reaches PostgreSQL.
Alternating the layouts in every round spreads a shared machine's load over all of them.

Run:  .venv/bin/python loadtest/partitioncost.py [--layouts 0,16,64] [--rounds 7]
      [--calls 100] [--threads 200] [--postgres URL] [--json PATH]
Only the given server is contacted; the schemas are dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tierstore import TieredSaver


def _url(base: str, schema: str, partitions: int) -> str:
    sep = "&" if "?" in base else "?"
    extra = f"&partitions={partitions}" if partitions else ""
    return f"{base}{sep}schema={schema}&setup_timeout=600{extra}"


async def _fill(saver: TieredSaver, thread: str, count: int) -> Any:
    cfg: Any = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    cp = empty_checkpoint()
    for i in range(count):
        cp = create_checkpoint(cp, None, i)
        cp["channel_values"] = {"a": i}
        cp["channel_versions"] = {"a": str(i + 1)}
        cfg = await saver.aput(cfg, cp, {"step": i}, {"a": str(i + 1)})
    return cfg, cp


async def main(args: argparse.Namespace) -> dict[str, Any]:
    layouts = [int(x) for x in args.layouts.split(",")]
    run = uuid.uuid4().hex[:8]
    schemas = {n: f"pcost_{run}_{n}" for n in layouts}
    conn = await asyncpg.connect(args.postgres)
    try:
        for schema in schemas.values():
            await conn.execute(f"CREATE SCHEMA {schema}")
        savers = {n: TieredSaver.from_urls(hot=None, cold=None,
                                           warm=_url(args.postgres, schemas[n], n))
                  for n in layouts}
        state: dict[int, Any] = {}
        for n, saver in savers.items():
            started = time.perf_counter()
            await saver.__aenter__()
            for t in range(args.threads):
                await _fill(saver, f"other-{t}", 3)
            state[n] = await _fill(saver, "x", 20)
            print(f"layout {n or 'plain'}: set up and filled in "
                  f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
        get: dict[int, list[float]] = {n: [] for n in layouts}
        put: dict[int, list[float]] = {n: [] for n in layouts}
        latest: Any = {"configurable": {"thread_id": "x", "checkpoint_ns": ""}}
        for r in range(args.rounds):
            for n in (layouts if r % 2 == 0 else layouts[::-1]):
                saver = savers[n]
                started = time.perf_counter()
                for _ in range(args.calls):
                    await saver.aget_tuple(latest)
                get[n].append((time.perf_counter() - started) / args.calls * 1000)
                cfg, cp = state[n]
                started = time.perf_counter()
                for i in range(args.calls):
                    step = 1000 + r * args.calls + i
                    cp = create_checkpoint(cp, None, step)
                    cp["channel_values"] = {"a": step}
                    cp["channel_versions"] = {"a": str(step + 1)}
                    cfg = await saver.aput(cfg, cp, {"step": step}, {"a": str(step + 1)})
                put[n].append((time.perf_counter() - started) / args.calls * 1000)
                state[n] = (cfg, cp)
        for saver in savers.values():
            await saver.__aexit__(None, None, None)
    finally:
        for schema in schemas.values():
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()
    first = layouts[0]
    out: dict[str, Any] = {"rounds": args.rounds, "calls": args.calls,
                           "other_threads": args.threads, "layouts": {}}
    for n in layouts:
        g, p = statistics.median(get[n]), statistics.median(put[n])
        out["layouts"][str(n or "plain")] = {
            "get_ms": round(g, 2), "put_ms": round(p, 2),
            "get_ratio": round(g / statistics.median(get[first]), 2),
            "put_ratio": round(p / statistics.median(put[first]), 2)}
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layouts", default="0,16,64",
                        help="partition counts, 0 for plain tables (the ratios' base first)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--threads", type=int, default=200)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--json", type=Path)
    parsed = parser.parse_args()
    result = asyncio.run(main(parsed))
    text = json.dumps(result, indent=2)
    print(text)
    if parsed.json is not None:
        parsed.json.write_text(text + "\n")
