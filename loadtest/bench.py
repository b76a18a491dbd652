"""Side-by-side benchmark: tierstore against LangGraph's own checkpointers, in one process.

::

    for each round (--repeat), savers in the order given, then reversed, alternately:
      for each saver:
        setup (create database / key prefix / directory, open, compile)  ── not timed
        warm-up turns, reads and lists on their own threads      ── not timed
        write:  T threads x N turns, C threads at a time         ── turns/s, turn p50/p99,
                (a semaphore), one ainvoke per turn                 CPU: client, postgres, redis
        read:   aget_tuple(latest) on random threads, one at a time  ── p50 / p99
        list:   alist(thread, limit=10), one at a time            ── p50
        state:  graph.aget_state(thread), one at a time (delta)   ── p50
        size:   warm store bytes / checkpoints                    ── not timed
        teardown (drop database, delete keys, remove directory)
    median of the rounds per saver
    ratios to each anchor (postgres, postgres-nolock, sqlite); targets as PASS / FAIL
    (no ratio at all unless psycopg runs its C build)

Every saver runs the same graph on byte-identical inputs at the same concurrency:
``workload.build_chat_agent`` (``--workload chat``) or ``workload.build_delta_agent``
(``--workload delta``: the messages in LangGraph's DeltaChannel). Savers:

    tierstore-redis-pg   TieredSaver  hot redis://  warm postgresql://  (own database)
    tierstore-embedded   TieredSaver  hot memory:// warm sqlite:///     (temp directory)
    postgres             AsyncPostgresSaver.from_conn_string            (own database)
    postgres-nolock      AsyncPostgresSaver on a psycopg AsyncConnectionPool, its lock
                         replaced by a semaphore of the pool's size     (own database)
    sqlite               AsyncSqliteSaver.from_conn_string              (temp directory)
    memory               InMemorySaver

and, on request (``--savers``), variants that locate costs: tierstore-redis-pg-trusted
(``hot_check="trusted"``), tierstore-pg (no hot tier), and the price of each guarantee:
tierstore-redis-pg-strict (``concurrency="strict"``), tierstore-redis-pg-encrypted
(AES-256-GCM on every payload) and tierstore-redis-pg-leased (every turn inside
``saver.lease(thread)``).

The code: ``bench_stores`` (settings, private storage, server CPU), ``bench_phases``
(the measured phases of one saver), ``bench_report`` (ratios, targets, the table),
``bench_profile`` (the ``--profile`` passes), this module (the rounds).

``--profile`` adds three passes that are never mixed with the measured one: saver
calls and their latency per turn (every saver), network round trips per turn through
a counting TCP relay (savers with servers), and cProfile of tierstore-redis-pg and of
AsyncPostgresSaver (write and read phases).

Run:  .venv/bin/python loadtest/bench.py [--workload chat|delta] [--repeat 3] [--json [PATH]]
      [--profile]
Only 127.0.0.1 is contacted; every database and key created here is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from bench_phases import Result, combine, run_saver
from bench_profile import CallProfile, CpuProfile, profile_calls, profile_cpu, render_profile
from bench_report import machine, ratios, ratios_withheld, render, targets
from bench_stores import (
    ALL_SAVERS,
    BASELINE,
    NETWORKED,
    TIERED,
    WORKLOADS,
    Admin,
    Settings,
    servers_from,
    tiered_unavailable,
)

# -- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    d = Settings()
    p = argparse.ArgumentParser(
        description="tierstore vs LangGraph's Postgres, SQLite and in-memory savers on one "
                    "LangGraph workload",
    )
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--turns", type=int, default=d.turns)
    p.add_argument("--concurrency", type=int, default=d.concurrency,
                   help="threads in flight at once (a semaphore)")
    p.add_argument("--message-bytes", type=int, default=d.message_bytes)
    p.add_argument("--workload", choices=WORKLOADS, default=d.workload,
                   help="chat: messages in add_messages' channel; delta: in a DeltaChannel")
    p.add_argument("--pool-size", type=int, default=d.pool_size,
                   help="postgres-nolock's pool and semaphore (default: --concurrency), "
                        "and tierstore's PostgreSQL pool (default: its own, 10)")
    p.add_argument("--savers", default=",".join(d.savers),
                   help=f"comma-separated, run in the order given; any of "
                        f"{', '.join(ALL_SAVERS)}")
    p.add_argument("--read-samples", type=int, default=d.read_samples)
    p.add_argument("--list-samples", type=int, default=d.list_samples)
    p.add_argument("--warmup-threads", type=int, default=d.warmup_threads)
    p.add_argument("--postgres", default=d.postgres,
                   help="server for the databases this run creates (and drops)")
    p.add_argument("--redis", default=d.redis)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--repeat", type=int, default=d.repeat,
                   help="rounds over all savers (the order given, then reversed, "
                        "alternately); timings are the median of the rounds")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="also write JSON to PATH; without PATH to stdout (the table then "
                        "goes to stderr)")
    p.add_argument("--profile", action="store_true",
                   help="after the measured run: saver calls and round trips per turn, and "
                        "cProfile of tierstore-redis-pg")
    p.add_argument("--profile-dir", default=None,
                   help="where .pstats files go (default: a new temporary directory)")
    args = p.parse_args(argv)
    savers = tuple(s.strip() for s in args.savers.split(",") if s.strip())
    unknown = [s for s in savers if s not in ALL_SAVERS]
    if unknown:
        p.error(f"unknown saver(s) {', '.join(unknown)}; choose from {', '.join(ALL_SAVERS)}")
    if args.pool_size < 0:
        p.error("--pool-size must not be negative")
    if min(args.threads, args.turns, args.concurrency, args.message_bytes) < 1:
        p.error("--threads, --turns, --concurrency and --message-bytes must be positive")
    settings = Settings(
        threads=args.threads, turns=args.turns, concurrency=args.concurrency,
        message_bytes=args.message_bytes, savers=savers, read_samples=args.read_samples,
        list_samples=args.list_samples, warmup_threads=args.warmup_threads,
        postgres=args.postgres, redis=args.redis, seed=args.seed, repeat=max(1, args.repeat),
        workload=args.workload, pool_size=args.pool_size,
    )
    return settings, args


async def main_async(settings: Settings, args: argparse.Namespace, report: TextIO,
                     profile_dir: Path | None) -> dict[str, Any]:
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # a run stopped by SIGTERM / SIGHUP (e.g. `timeout`) still drops what it created
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGTERM, signal.SIGHUP):
        asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
    servers = servers_from(settings)
    admin = Admin(servers, secrets.token_hex(4))
    info = machine()
    results: list[Result] = []
    skipped: dict[str, str] = {}
    calls: list[CallProfile] = []
    cpus: list[CpuProfile] = []
    savers = list(settings.savers)
    networked = [n for n in savers if n.startswith("tierstore-") and n != "tierstore-embedded"]
    if networked and (why := tiered_unavailable(servers)) is not None:
        for name in networked:
            skipped[name] = why
            savers.remove(name)
    try:
        runs: dict[str, list[Result]] = {name: [] for name in savers}
        for round_no in range(settings.repeat):
            if settings.repeat > 1:
                log(f"round {round_no + 1} of {settings.repeat}")
            # alternating the order spreads the drift of a shared machine (and the state
            # the previous saver leaves in the servers) over every saver alike
            for name in savers if round_no % 2 == 0 else savers[::-1]:
                gc.collect()
                runs[name].append(await run_saver(name, settings, servers, admin, log))
        results.extend(combine(runs[name]) for name in savers)
        info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        print(render(results, settings, info, skipped), file=report, end="", flush=True)
        if profile_dir is not None:
            for name in savers:
                log(f"[{name}] profile: saver calls")
                calls.append(await profile_calls(name, settings, servers, admin, proxied=False))
            for name in savers:
                if name in NETWORKED:
                    log(f"[{name}] profile: round trips")
                    proxied = await profile_calls(name, settings, servers, admin, proxied=True)
                    plain = next(c for c in calls if c.saver == name)
                    plain.round_trips_per_turn = proxied.round_trips_per_turn
                    plain.round_trips_per_read = proxied.round_trips_per_read
                    plain.round_trips_per_list = proxied.round_trips_per_list
            for name in (TIERED, BASELINE):
                if name in savers:
                    log(f"[{name}] profile: cProfile")
                    cpus.append(await profile_cpu(name, settings, servers, admin,
                                                  out_dir=profile_dir))
            print(render_profile(calls, cpus), file=report, end="", flush=True)
    finally:
        await admin.drop_all()
    withheld = ratios_withheld(info)
    table_r = ratios(results) if withheld is None else {}
    return {
        "machine": info,
        "settings": {k: v for k, v in asdict(settings).items()
                     if k not in ("postgres", "redis")},
        "results": [asdict(r) for r in results],
        "ratios": table_r,
        "ratios_withheld": withheld,
        "targets": targets(table_r, settings) if withheld is None else [],
        "skipped": skipped,
        "profile": {"calls": [asdict(c) for c in calls],
                    "cpu": [asdict(c) for c in cpus]},
    }


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse_args(argv)
    report = sys.stderr if args.json == "-" else sys.stdout
    profile_dir: Path | None = None
    if args.profile:
        profile_dir = Path(args.profile_dir or tempfile.mkdtemp(prefix="tierstore-profile-"))
        profile_dir.mkdir(parents=True, exist_ok=True)
    try:
        doc = asyncio.run(main_async(settings, args, report, profile_dir))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("stopped; the databases and keys of this run were removed", file=sys.stderr)
        return 130
    if args.json is not None:
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text, flush=True)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
