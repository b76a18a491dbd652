"""Side-by-side benchmark: tierstore against LangGraph's own checkpointers, in one process.

::

    for each saver, in a fixed order:
        setup (create database / key prefix, open, compile)     ── not timed
        warm-up turns, reads and lists on their own threads     ── not timed
        write:  T threads x N turns, C threads at a time         ── turns/s, turn p50/p99,
                (a semaphore), one ainvoke per turn                 client and server CPU
        read:   aget_tuple(latest) on random threads, one at a time  ── p50 / p99
        list:   alist(thread, limit=10), one at a time            ── p50
        size:   warm store bytes / checkpoints                    ── not timed
        teardown (drop database, delete keys)
    ratios of every saver to AsyncPostgresSaver

Every saver runs the same graph (``workload.build_chat_agent``) on byte-identical
inputs at the same concurrency. Savers:

    tierstore-redis-pg   TieredSaver  hot redis://  warm postgresql://  (own database)
    tierstore-embedded   TieredSaver  hot memory:// warm sqlite:///     (temp directory)
    postgres             AsyncPostgresSaver.from_conn_string            (own database)
    memory               InMemorySaver

and, on request (``--savers``), variants that locate costs: tierstore-redis-pg-trusted
(``hot_check="trusted"``), tierstore-pg (no hot tier), and the price of each guarantee:
tierstore-redis-pg-strict (``concurrency="strict"``), tierstore-redis-pg-encrypted
(AES-256-GCM on every payload) and tierstore-redis-pg-leased (every turn inside
``saver.lease(thread)``).

``--profile`` adds three passes that are never mixed with the measured one: saver
calls and their latency per turn (every saver), network round trips per turn through
a counting TCP relay (savers with servers), and cProfile of tierstore-redis-pg and of
AsyncPostgresSaver (write and read phases).

Run:  .venv/bin/python loadtest/bench.py [--repeat 3] [--json [PATH]] [--profile]
Only 127.0.0.1 is contacted; every database and key created here is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import pstats
import random
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import asyncpg
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from redis.asyncio import Redis
from workload import build_chat_agent, thread_config, turn_input

import tierstore
from tierstore import TieredSaver

SAVERS = ("tierstore-redis-pg", "tierstore-embedded", "postgres", "memory")
# opt-in with --savers, to locate costs: tierstore-redis-pg with hot_check="trusted" (no
# warm head check on a hot hit), and tierstore on postgres alone (no hot tier at all)
EXTRA_SAVERS = ("tierstore-redis-pg-trusted", "tierstore-pg", "tierstore-redis-pg-strict",
                "tierstore-redis-pg-encrypted", "tierstore-redis-pg-leased")
REDIS_PG_VARIANTS: dict[str, dict[str, Any]] = {
    "tierstore-redis-pg": {},
    "tierstore-redis-pg-trusted": {"hot_check": "trusted"},
    "tierstore-redis-pg-strict": {"concurrency": "strict"},
    "tierstore-redis-pg-encrypted": {
        "encryption": tierstore.Keyring(current="bench", keys={"bench": bytes(range(32))})},
    "tierstore-redis-pg-leased": {},
}
ALL_SAVERS = SAVERS + EXTRA_SAVERS
NETWORKED = ("tierstore-redis-pg", "postgres", *EXTRA_SAVERS)
BASELINE = "postgres"
TIERED = "tierstore-redis-pg"
# (metric, ratio that meets the target, True when higher is better)
TARGETS: dict[str, tuple[float, bool]] = {
    "turns_per_s": (2.0, True),
    "read_p50_ms": (0.5, False),
    "bytes_per_checkpoint": (0.5, False),
}
PROFILED_METHODS = ("aget_tuple", "aput", "aput_writes", "alist")

Saver = BaseCheckpointSaver[Any]


# -- settings ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    threads: int = 100
    turns: int = 20
    concurrency: int = 10
    message_bytes: int = 500
    savers: tuple[str, ...] = SAVERS
    read_samples: int = 2000
    list_samples: int = 300
    warmup_threads: int = 10
    warmup_turns: int = 3
    postgres: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    redis: str = "redis://127.0.0.1:6379/0"
    seed: int = 7
    repeat: int = 1


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int


def endpoint(url: str, default_port: int) -> Endpoint:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to contact {host}: this benchmark only talks to 127.0.0.1")
    return Endpoint("127.0.0.1" if host == "localhost" else host, parts.port or default_port)


@dataclass(slots=True)
class Servers:
    """Where the savers connect; the round-trip pass points these at counting proxies."""

    postgres: Endpoint
    redis: Endpoint
    pg_user: str = "postgres"
    redis_db: int = 0

    def pg_url(self, database: str) -> str:
        return (f"postgresql://{self.pg_user}@{self.postgres.host}:{self.postgres.port}/"
                f"{database}")

    def redis_url(self, prefix: str = "") -> str:
        base = f"redis://{self.redis.host}:{self.redis.port}/{self.redis_db}"
        return f"{base}?prefix={prefix}" if prefix else base


def servers_from(settings: Settings) -> Servers:
    pg = urlsplit(settings.postgres)
    db = urlsplit(settings.redis).path.strip("/") or "0"
    return Servers(
        postgres=endpoint(settings.postgres, 5432),
        redis=endpoint(settings.redis, 6379),
        pg_user=pg.username or "postgres",
        redis_db=int(db),
    )


# -- results -------------------------------------------------------------------------------


@dataclass(slots=True)
class WarmSize:
    bytes: int
    detail: dict[str, int]


@dataclass(slots=True)
class Result:
    saver: str
    turns: int
    seconds: float
    turns_per_s: float
    turn_p50_ms: float
    turn_p99_ms: float
    read_p50_ms: float
    read_p99_ms: float
    list_p50_ms: float
    list_p99_ms: float
    checkpoints: int
    warm_bytes: int | None
    bytes_per_checkpoint: float | None
    client_cpu_ms_per_turn: float
    server_cpu_ms_per_turn: float | None
    server_cpu_split: dict[str, float] = field(default_factory=dict)
    warm_detail: dict[str, int] = field(default_factory=dict)
    hot_bytes: int | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)


MEDIAN_FIELDS = ("seconds", "turns_per_s", "turn_p50_ms", "turn_p99_ms", "read_p50_ms",
                 "read_p99_ms", "list_p50_ms", "list_p99_ms", "client_cpu_ms_per_turn",
                 "server_cpu_ms_per_turn", "bytes_per_checkpoint")


def combine(runs: Sequence[Result]) -> Result:
    """One row from several rounds: the median of each timing; sizes of the median run."""
    middle = sorted(runs, key=lambda r: r.turns_per_s)[(len(runs) - 1) // 2]
    merged = replace(middle)
    for name in MEDIAN_FIELDS:
        values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        setattr(merged, name, statistics.median(values) if values else None)
    merged.server_cpu_split = {
        k: statistics.median(r.server_cpu_split.get(k, 0.0) for r in runs)
        for k in middle.server_cpu_split}
    merged.rounds = [{k: getattr(r, k) for k in ("turns_per_s", "read_p50_ms", "list_p50_ms")}
                     for r in runs] if len(runs) > 1 else []
    return merged


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def ms(seconds: float) -> float:
    return seconds * 1000.0


# -- server CPU (all postgres and redis processes on this machine) --------------------------


def server_cpu_ticks() -> dict[int, tuple[str, int]] | None:
    """pid → (server, utime+stime in ticks) of every postgres and redis-server process."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    out: dict[int, tuple[str, int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.find("(") + 1: raw.rfind(")")]
        server = ("postgres" if name.startswith("postgres")
                  else "redis" if name.startswith("redis-server") else None)
        if server is None:
            continue
        fields = raw[raw.rfind(")") + 2:].split()
        out[int(entry.name)] = (server, int(fields[11]) + int(fields[12]))
    return out


def server_cpu_ms(before: dict[int, tuple[str, int]] | None,
                  after: dict[int, tuple[str, int]] | None) -> dict[str, float]:
    """CPU ms each server used between two snapshots, over the processes alive at the end.

    Every process of those servers on the machine counts, so anything else they serve
    meanwhile is included: run on a quiet machine.
    """
    if before is None or after is None:
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    total = {"postgres": 0, "redis": 0}
    for pid, (server, used) in after.items():
        start = before.get(pid)
        total[server] += used - (start[1] if start is not None and start[0] == server else 0)
    return {k: v * 1000.0 / ticks for k, v in total.items()}


# -- stores: create, measure, remove -------------------------------------------------------


@dataclass(slots=True)
class Opened:
    saver: Saver
    warm_size: Callable[[], Awaitable[WarmSize | None]]
    hot_size: Callable[[], Awaitable[int | None]]


async def _none_size() -> None:
    return None


class Admin:
    """Create and drop the benchmark's databases; size their tables."""

    def __init__(self, servers: Servers, token: str) -> None:
        self.servers = servers
        self.token = token
        self.created: list[str] = []

    async def _connect(self, database: str) -> asyncpg.Connection:
        ep = self.servers.postgres
        return await asyncpg.connect(host=ep.host, port=ep.port, user=self.servers.pg_user,
                                     database=database)

    async def create_database(self, label: str) -> str:
        name = f"tierstore_bench_{self.token}_{label}"
        conn = await self._connect("postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.created.append(name)
        return name

    async def drop_database(self, name: str) -> None:
        conn = await self._connect("postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        if name in self.created:
            self.created.remove(name)

    async def drop_all(self) -> None:
        for name in list(self.created):
            await self.drop_database(name)

    async def checkpoint(self) -> None:
        """Flush dirty pages so one saver's writes are not paid for by the next one."""
        conn = await self._connect("postgres")
        try:
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    async def table_sizes(self, database: str) -> WarmSize:
        """Tables + TOAST + indexes of every user table, after VACUUM ANALYZE."""
        conn = await self._connect(database)
        try:
            await conn.execute("VACUUM ANALYZE")
            rows = await conn.fetch(
                """
                SELECT n.nspname || '.' || c.relname AS name,
                       pg_total_relation_size(c.oid) AS size
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p')
                  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname NOT LIKE 'pg_toast%'
                ORDER BY 2 DESC
                """
            )
        finally:
            await conn.close()
        detail = {str(r["name"]): int(r["size"]) for r in rows}
        return WarmSize(sum(detail.values()), detail)


async def delete_redis_prefix(servers: Servers, prefix: str) -> int:
    client = Redis(host=servers.redis.host, port=servers.redis.port, db=servers.redis_db)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await client.unlink(*batch)
    finally:
        await client.aclose()
    return deleted


async def redis_prefix_bytes(servers: Servers, prefix: str) -> int:
    client = Redis(host=servers.redis.host, port=servers.redis.port, db=servers.redis_db)
    total = 0
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            total += int(await client.memory_usage(key) or 0)
    finally:
        await client.aclose()
    return total


def sqlite_size(path: Path) -> WarmSize:
    """Database file + WAL after a WAL checkpoint (TRUNCATE when no reader is in the way)."""
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    detail = {}
    for suffix in ("", "-wal"):
        file = Path(f"{path}{suffix}")
        if file.exists():
            detail[file.name] = file.stat().st_size
    return WarmSize(sum(detail.values()), detail)


@contextlib.asynccontextmanager
async def open_saver(name: str, servers: Servers, admin: Admin) -> AsyncIterator[Opened]:
    """Open one saver on fresh, private storage; remove that storage on the way out."""
    if name in REDIS_PG_VARIANTS or name == "tierstore-pg":
        database = await admin.create_database("ts")
        prefix = f"bench-{admin.token}-{secrets.token_hex(3)}:"
        options = REDIS_PG_VARIANTS.get(name, {})
        hot = None if name == "tierstore-pg" else servers.redis_url(prefix)
        try:
            saver = TieredSaver.from_urls(hot=hot, warm=servers.pg_url(database), cold=None,
                                          **options)
            async with saver:
                yield Opened(
                    saver,
                    lambda: admin.table_sizes(database),
                    (lambda: redis_prefix_bytes(servers, prefix)) if hot else _none_size,
                )
        finally:
            await delete_redis_prefix(servers, prefix)
            await admin.drop_database(database)
    elif name == "tierstore-embedded":
        root = Path(tempfile.mkdtemp(prefix="tierstore-bench-"))
        path = root / "warm.db"
        try:
            saver = TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{path}", cold=None)
            async with saver:

                async def size() -> WarmSize:
                    return await asyncio.to_thread(sqlite_size, path)

                yield Opened(saver, size, _none_size)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    elif name == "postgres":
        database = await admin.create_database("lg")
        try:
            async with AsyncPostgresSaver.from_conn_string(servers.pg_url(database)) as pg:
                await pg.setup()
                yield Opened(pg, lambda: admin.table_sizes(database), _none_size)
        finally:
            await admin.drop_database(database)
    elif name == "memory":
        yield Opened(InMemorySaver(), _none_size, _none_size)
    else:
        raise SystemExit(f"unknown saver {name!r}; choose from {', '.join(ALL_SAVERS)}")


def tiered_unavailable(servers: Servers) -> str | None:
    """Why TieredSaver cannot be built on redis + postgres here, or None when it can."""
    try:
        TieredSaver.from_urls(hot=servers.redis_url("bench-probe:"),
                              warm=servers.pg_url("postgres"), cold=None)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# -- the phases ----------------------------------------------------------------------------


@dataclass(slots=True)
class Phase:
    seconds: float
    latencies: list[float]


async def write_phase(app: Any, thread_ids: Sequence[str], turns: int, concurrency: int,
                      message_bytes: int, *, lease: Callable[[str], Any] | None = None
                      ) -> Phase:
    """Every thread runs its turns in order; at most ``concurrency`` threads at a time.

    With ``lease``, each turn runs inside ``async with lease(thread_id)``.
    """
    inputs = {t: [turn_input(t, k, message_bytes) for k in range(turns)] for t in thread_ids}
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def conversation(thread_id: str) -> None:
        config = thread_config(thread_id)
        async with gate:
            for message in inputs[thread_id]:
                started = time.perf_counter()
                if lease is None:
                    await app.ainvoke(message, config)
                else:
                    async with lease(thread_id):
                        await app.ainvoke(message, config)
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(conversation(t) for t in thread_ids))
    return Phase(time.perf_counter() - started, latencies)


async def read_phase(saver: Saver, thread_ids: Sequence[str], samples: int,
                     rng: random.Random) -> list[float]:
    out: list[float] = []
    for _ in range(samples):
        config = thread_config(rng.choice(thread_ids))
        started = time.perf_counter()
        found = await saver.aget_tuple(config)
        out.append(time.perf_counter() - started)
        if found is None:
            raise RuntimeError(f"{type(saver).__name__} lost the latest checkpoint of {config}")
    return out


async def list_phase(saver: Saver, thread_ids: Sequence[str], samples: int,
                     rng: random.Random, expect: int) -> list[float]:
    out: list[float] = []
    for _ in range(samples):
        config = thread_config(rng.choice(thread_ids))
        started = time.perf_counter()
        got = [item async for item in saver.alist(config, limit=10)]
        out.append(time.perf_counter() - started)
        if len(got) != expect:
            raise RuntimeError(f"{type(saver).__name__} listed {len(got)} of {expect}")
    return out


async def count_checkpoints(saver: Saver) -> int:
    return sum([1 async for _ in saver.alist(None)])


def thread_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(count)]


async def warm_up(app: Any, saver: Saver, settings: Settings, rng: random.Random) -> None:
    ids = thread_ids("warmup", settings.warmup_threads)
    await write_phase(app, ids, settings.warmup_turns, settings.concurrency,
                      settings.message_bytes)
    await read_phase(saver, ids, 100, rng)
    await list_phase(saver, ids, 20, rng, min(10, 4 * settings.warmup_turns + 1))


async def run_saver(name: str, settings: Settings, servers: Servers, admin: Admin,
                    log: Callable[[str], None]) -> Result:
    rng = random.Random(settings.seed)
    log(f"[{name}] setup")
    async with open_saver(name, servers, admin) as opened:
        saver = opened.saver
        app = build_chat_agent(settings.message_bytes).compile(checkpointer=saver)
        log(f"[{name}] warm-up")
        await warm_up(app, saver, settings, rng)
        if name in NETWORKED:
            await admin.checkpoint()
        ids = thread_ids("chat", settings.threads)
        gc.collect()
        log(f"[{name}] write {settings.threads} threads x {settings.turns} turns, "
            f"{settings.concurrency} at a time")
        cpu0, srv0 = time.process_time(), server_cpu_ticks()
        lease = saver.lease if name.endswith("-leased") else None
        write = await write_phase(app, ids, settings.turns, settings.concurrency,
                                  settings.message_bytes, lease=lease)
        cpu1, srv1 = time.process_time(), server_cpu_ticks()
        log(f"[{name}] read latest x{settings.read_samples}, list x{settings.list_samples}")
        reads = await read_phase(saver, ids, settings.read_samples, rng)
        lists = await list_phase(saver, ids, settings.list_samples, rng,
                                 min(10, 4 * settings.turns + 1))
        log(f"[{name}] size")
        checkpoints = await count_checkpoints(saver)
        warm = await opened.warm_size()
        hot = await opened.hot_size()
    turns = settings.threads * settings.turns
    split = {k: v / turns for k, v in server_cpu_ms(srv0, srv1).items()}
    return Result(
        saver=name,
        turns=turns,
        seconds=write.seconds,
        turns_per_s=turns / write.seconds,
        turn_p50_ms=ms(percentile(write.latencies, 50)),
        turn_p99_ms=ms(percentile(write.latencies, 99)),
        read_p50_ms=ms(percentile(reads, 50)),
        read_p99_ms=ms(percentile(reads, 99)),
        list_p50_ms=ms(percentile(lists, 50)),
        list_p99_ms=ms(percentile(lists, 99)),
        checkpoints=checkpoints,
        warm_bytes=warm.bytes if warm else None,
        bytes_per_checkpoint=warm.bytes / checkpoints if warm and checkpoints else None,
        client_cpu_ms_per_turn=ms(cpu1 - cpu0) / turns,
        server_cpu_ms_per_turn=sum(split.values()) if split else None,
        server_cpu_split=split,
        warm_detail=warm.detail if warm else {},
        hot_bytes=hot,
    )


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


# -- profiling: calls per turn, round trips per turn, cProfile -----------------------------


class CallMeter:
    """Counts and times a saver's async methods (instance attributes shadow the class's)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.enabled = False

    def install(self, saver: Saver) -> None:
        for method in PROFILED_METHODS:
            original = getattr(saver, method)
            if method == "alist":
                setattr(saver, method, self._wrap_iter(method, original))
            else:
                setattr(saver, method, self._wrap(method, original))

    def _wrap(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                if self.enabled:
                    self.calls[name].append(time.perf_counter() - started)

        return timed

    def _wrap_iter(self, name: str, fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                async for item in fn(*args, **kwargs):
                    yield item
            finally:
                if self.enabled:
                    self.calls[name].append(time.perf_counter() - started)

        return timed

    def reset(self) -> None:
        self.calls.clear()


class RoundTripProxy:
    """A TCP relay that counts round trips: client bytes after server bytes start one."""

    def __init__(self, target: Endpoint) -> None:
        self.target = target
        self.trips = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Endpoint:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = int(self._server.sockets[0].getsockname()[1])
        return Endpoint("127.0.0.1", port)

    async def _relay(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.target.host, self.target.port)
        waiting = [False]  # True once the client spoke and the server has not answered

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       from_client: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if from_client and not waiting[0]:
                        self.trips += 1
                        waiting[0] = True
                    elif not from_client:
                        waiting[0] = False
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pump(client_r, server_w, True), pump(server_r, client_w, False))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


@dataclass(slots=True)
class CallProfile:
    saver: str
    turns: int
    calls_per_turn: dict[str, float]
    call_p50_ms: dict[str, float]
    round_trips_per_turn: dict[str, float] = field(default_factory=dict)
    round_trips_per_read: dict[str, float] = field(default_factory=dict)
    round_trips_per_list: dict[str, float] = field(default_factory=dict)


async def profile_calls(name: str, settings: Settings, servers: Servers, admin: Admin,
                        *, proxied: bool) -> CallProfile:
    """Saver calls (and, when ``proxied``, network round trips) of the write/read/list phases."""
    rng = random.Random(settings.seed)
    proxies: dict[str, RoundTripProxy] = {}
    if proxied:
        proxies = {"postgres": RoundTripProxy(servers.postgres),
                   "redis": RoundTripProxy(servers.redis)}
        servers = replace(servers, postgres=await proxies["postgres"].start(),
                          redis=await proxies["redis"].start())
        admin = Admin(servers, admin.token)
    meter = CallMeter()
    trips: dict[str, dict[str, int]] = {}

    def snapshot(label: str) -> None:
        trips[label] = {k: p.trips for k, p in proxies.items()}

    try:
        async with open_saver(name, servers, admin) as opened:
            saver = opened.saver
            meter.install(saver)
            app = build_chat_agent(settings.message_bytes).compile(checkpointer=saver)
            await warm_up(app, saver, settings, rng)
            ids = thread_ids("chat", settings.threads)
            meter.enabled = True
            snapshot("start")
            await write_phase(app, ids, settings.turns, settings.concurrency,
                              settings.message_bytes)
            snapshot("written")
            write_calls = {k: list(v) for k, v in meter.calls.items()}
            meter.reset()
            await read_phase(saver, ids, settings.read_samples, rng)
            snapshot("read")
            read_calls = list(meter.calls.get("aget_tuple", []))
            meter.reset()
            await list_phase(saver, ids, settings.list_samples, rng,
                             min(10, 4 * settings.turns + 1))
            snapshot("listed")
            list_calls = list(meter.calls.get("alist", []))
            meter.enabled = False
    finally:
        for proxy in proxies.values():
            await proxy.close()
    turns = settings.threads * settings.turns
    calls = {k: len(v) / turns for k, v in sorted(write_calls.items())}
    p50 = {k: ms(statistics.median(v)) for k, v in sorted(write_calls.items()) if v}
    if read_calls:
        p50["aget_tuple (read phase)"] = ms(statistics.median(read_calls))
    if list_calls:
        p50["alist (list phase)"] = ms(statistics.median(list_calls))
    prof = CallProfile(name, turns, calls, p50)
    if proxied:
        for backend in proxies:
            def delta(a: str, b: str, key: str = backend) -> int:
                return trips[b][key] - trips[a][key]

            prof.round_trips_per_turn[backend] = delta("start", "written") / turns
            prof.round_trips_per_read[backend] = delta("written", "read") / settings.read_samples
            prof.round_trips_per_list[backend] = delta("read", "listed") / settings.list_samples
    return prof


AREAS = (
    ("tierstore", ("/tierstore/",)),
    ("langgraph-checkpoint-postgres", ("/langgraph/checkpoint/postgres/",)),
    ("langgraph serde (msgpack)", ("/langgraph/checkpoint/serde/", "ormsgpack")),
    ("langgraph", ("/langgraph/",)),
    ("langchain_core + pydantic", ("/langchain_core/", "/pydantic/", "/pydantic_core/",
                                   "pydantic_core")),
    ("zstd / msgpack", ("zstandard", "zstd", "msgpack")),
    ("redis-py", ("/redis/",)),
    ("asyncpg", ("/asyncpg/",)),
    ("psycopg", ("/psycopg/", "/psycopg_pool/")),
    ("asyncio", ("/asyncio/",)),
    ("workload", ("/loadtest/",)),
)


IDLE = "idle: waiting in epoll (not CPU)"


def area_of(func: tuple[str, int, str]) -> str | None:
    filename, _, name = func
    if filename == "~" and "of 'select.epoll' objects" in name:
        return IDLE
    text = filename if filename != "~" else name
    for area, marks in AREAS:
        if any(mark in text for mark in marks):
            return area
    return None if filename == "~" else "other python"


def attribute(stats: pstats.Stats) -> dict[str, float]:
    """Self time per area; a C function's time goes to the areas of its callers."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    out: dict[str, float] = defaultdict(float)
    for func, (_, _, tottime, _, callers) in raw.items():
        area = area_of(func)
        if area is not None or not callers:
            out[area or "other C"] += tottime
            continue
        weights = {caller: value[2] + 1e-9 for caller, value in callers.items()}
        whole = sum(weights.values())
        for caller, weight in weights.items():
            out[area_of(caller) or "other C"] += tottime * weight / whole
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass(slots=True)
class CpuProfile:
    saver: str
    turns: int
    reads: int
    seconds: float
    cpu_ms_per_turn: float
    write_areas_ms_per_turn: dict[str, float]
    read_areas_us_per_read: dict[str, float]
    top_self: list[dict[str, Any]]
    top_tierstore: list[dict[str, Any]]
    top_tierstore_read: list[dict[str, Any]]
    pstats_paths: list[str]


def _label(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    parts = Path(filename).parts
    for anchor in ("tierstore", "site-packages", "lib"):
        if anchor in parts:
            idx = len(parts) - 1 - parts[::-1].index(anchor)
            short = "/".join(parts[idx + (0 if anchor == "tierstore" else 1):])
            return f"{short}:{line}({name})"
    return f"{Path(filename).name}:{line}({name})"


def _rows(stats: pstats.Stats, per: int, *, area: str | None, key: int,
          count: int) -> list[dict[str, Any]]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    items = [kv for kv in raw.items() if area is None or area_of(kv[0]) == area]
    items.sort(key=lambda kv: -kv[1][key])
    return [{"function": _label(func), "calls": round(entry[1] / per, 2),
             "self_ms": round(ms(entry[2]) / per, 4), "cum_ms": round(ms(entry[3]) / per, 4)}
            for func, entry in items[:count]]


async def profile_cpu(name: str, settings: Settings, servers: Servers, admin: Admin,
                      *, out_dir: Path) -> CpuProfile:
    """cProfile of the write phase and of the read phase, each on its own profiler."""
    rng = random.Random(settings.seed)
    writing, reading = cProfile.Profile(), cProfile.Profile()
    async with open_saver(name, servers, admin) as opened:
        saver = opened.saver
        app = build_chat_agent(settings.message_bytes).compile(checkpointer=saver)
        await warm_up(app, saver, settings, rng)
        ids = thread_ids("chat", settings.threads)
        gc.collect()
        cpu0 = time.process_time()
        writing.enable()
        write = await write_phase(app, ids, settings.turns, settings.concurrency,
                                  settings.message_bytes)
        writing.disable()
        cpu = time.process_time() - cpu0
        reading.enable()
        await read_phase(saver, ids, settings.read_samples, rng)
        reading.disable()
    paths = [out_dir / f"{name}-write.pstats", out_dir / f"{name}-read.pstats"]
    writing.dump_stats(paths[0])
    reading.dump_stats(paths[1])
    wstats, rstats = pstats.Stats(str(paths[0])), pstats.Stats(str(paths[1]))
    turns, reads = settings.threads * settings.turns, settings.read_samples
    return CpuProfile(
        saver=name,
        turns=turns,
        reads=reads,
        seconds=write.seconds,
        cpu_ms_per_turn=ms(cpu) / turns,
        write_areas_ms_per_turn={k: ms(v) / turns for k, v in attribute(wstats).items()},
        read_areas_us_per_read={k: ms(v) * 1000 / reads for k, v in attribute(rstats).items()},
        top_self=_rows(wstats, turns, area=None, key=2, count=25),
        top_tierstore=_rows(wstats, turns, area="tierstore", key=3, count=20),
        top_tierstore_read=_rows(rstats, reads, area="tierstore", key=3, count=10),
        pstats_paths=[str(p) for p in paths],
    )


def render_profile(calls: Sequence[CallProfile], cpus: Sequence[CpuProfile]) -> str:
    out = io.StringIO()
    w = out.write
    if calls:
        w("\nsaver calls per turn (write phase) and their p50 latency\n")
        names = sorted({k for c in calls for k in (*c.calls_per_turn, *c.call_p50_ms)})
        rows: list[Sequence[str]] = [("saver", *names)]
        for c in calls:
            rows.append((c.saver, *(
                (f"{c.calls_per_turn[k]:.2f}/turn " if k in c.calls_per_turn else "")
                + (f"{c.call_p50_ms[k]:.3f}ms" if k in c.call_p50_ms else "")
                for k in names)))
        w(table(rows))
        trips = [c for c in calls if c.round_trips_per_turn]
        if trips:
            w("\nnetwork round trips (counted by a TCP relay; its own latency is not reported)\n")
            rows = [("saver", "pg/turn", "redis/turn", "pg/read", "redis/read", "pg/list",
                     "redis/list")]
            for c in trips:
                rows.append((c.saver, *(
                    f"{d.get(k, 0.0):.2f}" for d in (c.round_trips_per_turn,
                                                     c.round_trips_per_read,
                                                     c.round_trips_per_list)
                    for k in ("postgres", "redis"))))
            w(table(rows))
    if cpus:
        w("\ncProfile, client process only: self time per area (C functions charged to "
          "their callers)\n")
        areas = list(dict.fromkeys(k for c in cpus for k in c.write_areas_ms_per_turn))
        head = [f"{c.saver} write ms/turn" for c in cpus]
        head += [f"{c.saver} read us/read" for c in cpus]
        rows = [("area", *head)]
        for area in areas:
            rows.append((area, *(f"{c.write_areas_ms_per_turn.get(area, 0.0):.3f}"
                                 for c in cpus),
                         *(f"{c.read_areas_us_per_read.get(area, 0.0):.1f}" for c in cpus)))
        def busy(areas: dict[str, float]) -> float:
            return sum(v for k, v in areas.items() if k != IDLE)

        rows.append(("total (without idle)",
                     *(f"{busy(c.write_areas_ms_per_turn):.3f}" for c in cpus),
                     *(f"{busy(c.read_areas_us_per_read):.1f}" for c in cpus)))
        w(table(rows))
        for prof in cpus:
            w(f"\n{prof.saver}: {prof.turns / prof.seconds:.0f} turns/s under the profiler; "
              f"top functions of the write phase by self time (per turn):\n")
            w(_table_of(prof.top_self))
            if prof.saver.startswith("tierstore"):
                w("tierstore functions by cumulative time, write phase (per turn; a coroutine "
                  "counts only while it runs):\n")
                w(_table_of(prof.top_tierstore))
                w("tierstore functions by cumulative time, read phase (per read):\n")
                w(_table_of(prof.top_tierstore_read))
            w(f"raw profiles: {', '.join(prof.pstats_paths)}\n")
    return out.getvalue()


def _table_of(rows: Sequence[dict[str, Any]]) -> str:
    out: list[Sequence[str]] = [("function", "calls", "self ms", "cum ms")]
    out += [(r["function"][:96], str(r["calls"]), f"{r['self_ms']:.3f}", f"{r['cum_ms']:.3f}")
            for r in rows]
    return table(out)


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    d = Settings()
    p = argparse.ArgumentParser(
        description="tierstore vs AsyncPostgresSaver vs InMemorySaver on one LangGraph workload",
    )
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--turns", type=int, default=d.turns)
    p.add_argument("--concurrency", type=int, default=d.concurrency,
                   help="threads in flight at once (a semaphore)")
    p.add_argument("--message-bytes", type=int, default=d.message_bytes)
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
                   help="rounds over all savers (same order each round); timings are the "
                        "median of the rounds")
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
    if min(args.threads, args.turns, args.concurrency, args.message_bytes) < 1:
        p.error("--threads, --turns, --concurrency and --message-bytes must be positive")
    settings = Settings(
        threads=args.threads, turns=args.turns, concurrency=args.concurrency,
        message_bytes=args.message_bytes, savers=savers, read_samples=args.read_samples,
        list_samples=args.list_samples, warmup_threads=args.warmup_threads,
        postgres=args.postgres, redis=args.redis, seed=args.seed, repeat=max(1, args.repeat),
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
            for name in savers:
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
    table_r = ratios(results)
    return {
        "machine": info,
        "settings": {k: v for k, v in asdict(settings).items()
                     if k not in ("postgres", "redis")},
        "results": [asdict(r) for r in results],
        "ratios_to_async_postgres_saver": table_r,
        "targets": targets(table_r),
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
