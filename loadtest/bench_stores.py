"""The benchmark's savers on private storage, its settings, and what it measures outside the client.

Every saver is opened on storage created for the run (a database, a key prefix, a temporary
directory) and removed on the way out, even when the run is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

import tierstore
from tierstore import TieredSaver

SAVERS = ("tierstore-redis-pg", "tierstore-embedded", "postgres", "postgres-nolock", "sqlite",
          "memory")
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
NETWORKED = ("tierstore-redis-pg", "postgres", "postgres-nolock", *EXTRA_SAVERS)
BASELINE = "postgres"
TIERED = "tierstore-redis-pg"
EMBEDDED = "tierstore-embedded"
WORKLOADS = ("chat", "delta")


def servers_of(name: str) -> tuple[str, ...]:
    """The servers a saver talks to: only their CPU is charged to it."""
    if name in ("postgres", "postgres-nolock", "tierstore-pg"):
        return ("postgres",)
    if name in NETWORKED:
        return ("postgres", "redis")
    return ()
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
    workload: str = "chat"
    pool_size: int = 0  # postgres-nolock's pool and semaphore, and tierstore's pool
    # (max_size); 0: postgres-nolock as many as --concurrency, tierstore its default (10)

    @property
    def pool(self) -> int:
        return self.pool_size or self.concurrency


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


@dataclass(slots=True)
class WarmSize:
    bytes: int
    detail: dict[str, int]


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
async def open_saver(name: str, servers: Servers, admin: Admin,
                     settings: Settings) -> AsyncIterator[Opened]:
    """Open one saver on fresh, private storage; remove that storage on the way out."""
    if name in REDIS_PG_VARIANTS or name == "tierstore-pg":
        database = await admin.create_database("ts")
        prefix = f"bench-{admin.token}-{secrets.token_hex(3)}:"
        options = REDIS_PG_VARIANTS.get(name, {})
        hot = None if name == "tierstore-pg" else servers.redis_url(prefix)
        try:
            warm = servers.pg_url(database)
            if settings.pool_size:  # the same pool size as postgres-nolock's
                warm += f"?max_size={settings.pool_size}"
            saver = TieredSaver.from_urls(hot=hot, warm=warm, cold=None, **options)
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
    elif name == "postgres-nolock":
        database = await admin.create_database("lgpool")
        try:
            async with pooled_postgres_saver(servers.pg_url(database), settings.pool) as pg:
                yield Opened(pg, lambda: admin.table_sizes(database), _none_size)
        finally:
            await admin.drop_database(database)
    elif name == "sqlite":
        root = Path(tempfile.mkdtemp(prefix="tierstore-bench-sqlite-"))
        path = root / "checkpoints.db"
        try:
            async with AsyncSqliteSaver.from_conn_string(str(path)) as lite:
                await lite.setup()

                async def lite_size() -> WarmSize:
                    return await asyncio.to_thread(sqlite_size, path)

                yield Opened(lite, lite_size, _none_size)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    elif name == "memory":
        yield Opened(InMemorySaver(), _none_size, _none_size)
    else:
        raise SystemExit(f"unknown saver {name!r}; choose from {', '.join(ALL_SAVERS)}")


@contextlib.asynccontextmanager
async def pooled_postgres_saver(url: str, size: int) -> AsyncIterator[AsyncPostgresSaver]:
    """AsyncPostgresSaver as teams deploy it: a pool, and no lock serializing its calls.

    Its ``lock`` (an ``asyncio.Lock`` held around every query, even on a pool) becomes a
    semaphore of the pool's size, so up to ``size`` calls run at once, each on its own
    connection. The connections are configured as ``from_conn_string`` configures its own.
    """
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url, min_size=size, max_size=size, open=False,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row})
    await pool.open(wait=True)
    try:
        saver = AsyncPostgresSaver(pool)
        saver.lock = asyncio.Semaphore(size)  # type: ignore[assignment]
        await saver.setup()
        yield saver
    finally:
        await pool.close()


def tiered_unavailable(servers: Servers) -> str | None:
    """Why TieredSaver cannot be built on redis + postgres here, or None when it can."""
    try:
        TieredSaver.from_urls(hot=servers.redis_url("bench-probe:"),
                              warm=servers.pg_url("postgres"), cold=None)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
