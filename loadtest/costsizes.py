"""The bytes ``tierstore plan`` starts from, measured on the chat workload.

::

    migrate an empty database                             ── baseline: tables and indexes, empty
    T threads x N turns of workload.build_chat_agent      ── redis + postgres + file cold
      warm:  tables + TOAST + indexes after VACUUM FULL   ── bytes per checkpoint (all live)
      hot:   Redis MEMORY USAGE of the saver's keys       ── bytes per cached thread
    HistoryDemotion (archive_after=0, keep_latest=1)      ── history to cold, heads stay
      cold:  segment bytes / archived checkpoints          ── cold bytes per checkpoint
      warm:  what is left                                  ── a head with its values, + stubs
    IdleArchival (archive_idle_after=0)                    ── every thread to cold
      warm:  what is left / checkpoints                    ── bytes of one stub

Every figure is the database's size on disk less the empty schema's, after ``VACUUM
FULL`` (space freed by a move is reused by later writes, so the compacted size is what a
store in steady state needs), the median of ``--repeat`` runs: a run now and then finds
dead rows another session still sees and reports a far larger warm size. Sizes do not
depend on the machine's load.

Run:  .venv/bin/python loadtest/costsizes.py [--threads 20] [--turns 20] [--repeat 5]
      [--json PATH]
Only 127.0.0.1 is contacted; the database, the keys and the directory are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis
from workload import build_chat_agent, thread_config, turn_input

from tierstore import TieredSaver
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, IdleArchival

PG = "postgresql://postgres@127.0.0.1:5432"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


async def disk_bytes(database: str) -> int:
    """Tables + TOAST + indexes of every user table, compacted."""
    conn = await asyncpg.connect(f"{PG}/{database}")
    try:
        await conn.execute("VACUUM FULL ANALYZE")
        size = await conn.fetchval(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%'")
    finally:
        await conn.close()
    return int(size)


async def redis_bytes(prefix: str) -> int:
    client = Redis(host=REDIS_HOST, port=REDIS_PORT)
    total = 0
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            total += int(await client.memory_usage(key) or 0)
    finally:
        await client.aclose()
    return total


async def drop_redis(prefix: str) -> None:
    client = Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


def dir_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


async def measure(threads: int, turns: int, message_bytes: int, concurrency: int
                  ) -> dict[str, Any]:
    tag = secrets.token_hex(4)
    database, prefix = f"tierstore_costsizes_{tag}", f"costsizes:{tag}:"
    admin = await asyncpg.connect(f"{PG}/postgres")
    await admin.execute(f'CREATE DATABASE "{database}"')
    cold = Path(tempfile.mkdtemp(prefix="tierstore-costsizes-"))
    try:
        async with TieredSaver.from_urls(
                hot=f"redis://{REDIS_HOST}:{REDIS_PORT}/0?prefix={prefix}",
                warm=f"{PG}/{database}", cold=f"file://{cold}") as saver:
            empty = await disk_bytes(database)
            app = build_chat_agent(message_bytes).compile(checkpointer=saver)
            gate = asyncio.Semaphore(concurrency)

            async def conversation(thread_id: str) -> None:
                async with gate:
                    for turn in range(turns):
                        await app.ainvoke(turn_input(thread_id, turn, message_bytes),
                                          thread_config(thread_id))

            await asyncio.gather(*(conversation(f"t{i}") for i in range(threads)))
            await asyncio.sleep(1.0)  # the hot tier's write-behind
            usage = await saver.regions.by_name["default"].warm.usage()
            checkpoints = usage.checkpoints
            all_live = await disk_bytes(database) - empty
            hot = await redis_bytes(prefix)

            report = await HistoryDemotion(
                saver, TieringPolicy(archive_after=0, keep_latest=1)).run_once()
            heads_left = await disk_bytes(database) - empty
            segments, segment_bytes = dir_bytes(cold)
            archived = report.checkpoints

            await IdleArchival(saver, TieringPolicy(archive_after=0,
                                                    archive_idle_after=0)).run_once()
            stubs_only = await disk_bytes(database) - empty
            segments_all, cold_all = dir_bytes(cold)
    finally:
        await drop_redis(prefix)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(cold)
    stub = stubs_only / checkpoints
    return {
        "threads": threads, "turns": turns, "message_bytes": message_bytes,
        "checkpoints": checkpoints,
        "warm_payload_bytes_per_checkpoint": round(usage.bytes / checkpoints),
        "warm_bytes_per_checkpoint": round(all_live / checkpoints),
        "hot_bytes_per_thread": round(hot / threads),
        "cold_bytes_per_checkpoint": round(cold_all / checkpoints),
        "history_segment_bytes_per_checkpoint": round(segment_bytes / max(archived, 1)),
        "segments_per_thread_history": segments / threads,
        "segments_per_thread_all": segments_all / threads,
        "stub_bytes_per_checkpoint": round(stub),
        "head_bytes_per_thread": round((heads_left - archived * stub) / threads),
        "raw": {"empty_schema": empty, "all_live": all_live, "heads_left": heads_left,
                "stubs_only": stubs_only, "hot": hot, "cold_history": segment_bytes,
                "cold_all": cold_all, "archived_history": archived},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=20)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--message-bytes", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5, help="runs; each figure is their median")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    if min(args.threads, args.turns, args.message_bytes, args.concurrency, args.repeat) < 1:
        p.error("every count must be positive")
    runs = [asyncio.run(measure(args.threads, args.turns, args.message_bytes,
                                args.concurrency)) for _ in range(args.repeat)]
    figures = {key: (statistics.median(run[key] for run in runs)
                     if isinstance(value, int | float) else value)
               for key, value in runs[0].items() if key != "raw"}
    figures["runs"] = [run["raw"] for run in runs]
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
