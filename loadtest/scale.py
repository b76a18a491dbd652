"""The store at 10^4 … 10^7 checkpoints: request latency, bytes and archiving against store size.

::

    for each warm backend (postgres: databases of its own; sqlite: files in a temp directory):
      templates  the chat workload (workload.py) runs T threads through a real TieredSaver,
                 a run id per turn; their stored rows (heads, checkpoints, blobs, writes:
                 delta chains, pending writes, metadata) are read back as the saver wrote them
      control    a second store of the smallest size, loaded the same way, that never grows
      for each size N (--sizes, ascending; the same store grows from one to the next):
        load     replicas of the templates until the store holds N checkpoints: new thread
                 ids, new checkpoint ids (time-ordered, as LangGraph's), new run ids, the
                 checkpoint bodies and metadata encoded again by the saver's codec, ages
                 spread over --max-age-days; PostgreSQL: COPY, SQLite: executemany in big
                 transactions                                   ── rows/s, checkpoints/s
        settle   PostgreSQL: VACUUM ANALYZE (what autovacuum keeps up in a live store)
        verify   random loaded threads read back through the saver (aget_tuple, alist) as
                 their template does (checkpoints, messages, writes, metadata, parents)
        measure  on random threads of the whole store (not the newest), one call at a time,
                 each call followed by the same call on the control store (then the other
                 way round), so that what the shared machine does meanwhile hits both:
                   read      aget_tuple(latest)                       ── p50 / p99
                   list      alist(thread, limit=10), consumed
                   turn      one graph turn (ainvoke, durability="sync"), and inside it
                   put       each aput
                   writes    each aput_writes
                   copy      acopy_thread(random thread, new id)
                   delete    adelete_thread           ┐ on threads reserved for them,
                   runs      adelete_for_runs(1 run)  │ never read again
                   prune     aprune(keep_latest)      ┘
        size     warm bytes (tables + TOAST + indexes; SQLite: file + WAL) / checkpoints
        archive  --workers K processes run tierstore's history demotion, then its idle
                 archival (tierstore/jobs/tiering.py, as `tierstore worker` runs them),
                 cold = a file store, each job for at most --archive-seconds
                                                                ── checkpoints/s moved
        after    read / list again; read of a demoted checkpoint and of an idle-archived
                 thread's latest (both from cold)
      jobs       (--jobs-at SIZE, the largest size) the tiering jobs run to completion
                 with the policy, a plain VACUUM after them (not FULL: what autovacuum
                 runs), then as much history again (new threads, the same ages spread)
                 and the jobs and VACUUM again; at each step warm bytes, the free space
                 in them (PostgreSQL: pg_freespacemap; SQLite: the freelist), dead rows,
                 live checkpoints and stubs         ── bytes before / after, space reused
      flatness   per operation: p50 at the largest size / p50 at the smallest (target
                 <= 1.2), and the same of p50 / the control's p50 (the machine's drift
                 divided out)

The saver under test has no hot tier (``hot=None``): every call reaches the warm store,
which is what grows. Thread ages: a thread's head is between 0 and --max-age-days old
(spread evenly over the store); history demotion moves what is older than
--archive-after-days, idle archival whole threads idle past --idle-after-days.
Request-path samples come from threads younger than that (idle ones are archival's).

Disk: the warm store takes about 2.3 KB per checkpoint on PostgreSQL and 4.0 KB on
SQLite with this workload (3 to 5 turns a thread, ~17 checkpoints; more turns per thread
store fewer bytes per checkpoint), so 1e6 needs ~2.3 GB (PostgreSQL) / ~4 GB (SQLite)
and 1e7 ~23 GB / ~40 GB, plus PostgreSQL's WAL while loading; the cold file store holds
the archived segments on top (the temp directory). Time: loading runs at ~15,000 to
25,000 checkpoints/s here (2 cores shared with PostgreSQL), about a minute per 1e6 and
10 minutes for 1e7 (PostgreSQL's VACUUM ANALYZE after it, a few seconds per 1e6); the
measured part adds one to two minutes per size. Every run prints the bytes per checkpoint it
measured and what each size needs at that rate.

Run:  .venv/bin/python loadtest/scale.py [--sizes 1e4,1e5] [--backends postgres,sqlite]
      [--workers 1] [--archive-seconds 20] [--jobs-at SIZE] [--json PATH] [--png PATH]
Only 127.0.0.1 is contacted; the databases (tierstore_scale_<run>_store, _ctl) and the
temporary directory (tierstore-scale-*) are removed at the end, also when the run is
stopped (Ctrl-C, SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import queue
import random
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: loadtest/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from langchain_core.runnables import RunnableConfig  # noqa: E402
from langgraph.checkpoint.base import (  # noqa: E402
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)
from langgraph.checkpoint.base.id import UUID as LangGraphUUID  # noqa: E402

from loadtest.workload import build_chat_agent, thread_config, turn_input  # noqa: E402
from tierstore import TieredSaver  # noqa: E402
from tierstore.records import Payload  # noqa: E402

__all__ = [
    "OPERATIONS",
    "Layout",
    "Template",
    "drift_corrected",
    "flatness",
    "main",
    "parse_sizes",
    "percentile",
    "replica_rows",
    "thread_age",
]

DAY = 86400.0
GOLDEN = 0.6180339887498949
TABLES = ("heads", "checkpoints", "blobs", "writes")
# the request path, then what archiving leaves behind; the order of the table
OPERATIONS = ("read", "list", "turn", "put", "writes", "copy", "delete", "runs", "prune")
AFTER = ("read", "list", "read_archived", "read_idle")
ARCHIVE_JOBS = ("history-demotion", "idle-archival")
LABELS = {
    "read": "aget_tuple(latest)", "list": "alist(limit=10)", "turn": "graph turn",
    "put": "aput", "writes": "aput_writes", "copy": "acopy_thread",
    "delete": "adelete_thread", "runs": "adelete_for_runs", "prune": "aprune(keep_latest)",
    "read_archived": "aget_tuple(demoted id)", "read_idle": "aget_tuple(idle-archived)",
}
FLAT_TARGET = 1.2
RATIO_TICKS = (0.5, 0.8, 1.0, 1.2, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500)


# -- pure parts ----------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """``"1e4,1e5"`` → ``[10000, 100000]``: ascending, distinct, each a whole number >= 1."""
    sizes: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"not a size: {part!r} (write 10000 or 1e4)") from None
        if not math.isfinite(value) or value < 1 or value != int(value):
            raise ValueError(f"not a whole number of checkpoints: {part!r}")
        sizes.add(int(value))
    if not sizes:
        raise ValueError("no sizes given")
    return sorted(sizes)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sample."""
    if not values:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def flatness(p50_by_size: Mapping[int, float | None]) -> float | None:
    """p50 at the largest size / p50 at the smallest (None without both, or with one size)."""
    known = {size: v for size, v in p50_by_size.items() if v is not None}
    if len(known) < 2:
        return None
    first, last = known[min(known)], known[max(known)]
    return last / first if first > 0 else None


def drift_corrected(store: Mapping[int, float | None], control: Mapping[int, float | None]
                    ) -> float | None:
    """``flatness`` of the store's p50 over the control store's p50 at each size.

    The control stays at the smallest size and is measured call for call alongside the
    store, so what slows the machine at one size (other work, a busy server) slows both,
    and the ratio keeps what the store's size itself costs.
    """
    ratios: dict[int, float | None] = {}
    for size, mine in store.items():
        theirs = control.get(size)
        ratios[size] = mine / theirs if mine is not None and theirs else None
    return flatness(ratios)


def thread_age(index: int, max_age: float, *, offset: float = 0.0) -> float:
    """Seconds since replica ``index`` was last written: spread evenly over 0..max_age
    whatever the order threads are loaded in (a low-discrepancy sequence), so every
    load step adds threads of every age."""
    return max_age * ((offset + index * GOLDEN) % 1.0)


def thread_name(index: int) -> str:
    """Replica ``index``'s thread id: UUID-shaped like a server's, spread over the key space."""
    return str(uuid.UUID(bytes=hashlib.blake2b(b"%d" % index, digest_size=16).digest()))


def extrapolate(bytes_per_checkpoint: float, sizes: Sequence[int]) -> dict[int, float]:
    """Warm bytes each size needs at the measured rate."""
    return {size: bytes_per_checkpoint * size for size in sizes}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_size(n: int) -> str:
    exp = int(math.log10(n)) if n > 0 else 0
    return f"1e{exp}" if n == 10 ** exp else f"{n:,}"


@dataclass(frozen=True, slots=True)
class Rows:
    """Rows of one table as stored: column names and value tuples."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True, slots=True)
class Template:
    """One template thread's stored rows, as the saver wrote them.

    ``bodies[k]`` / ``metadata[k]`` are checkpoint row k's decoded checkpoint (without
    channel values: those are blobs) and metadata; ``runs`` the run ids its checkpoints
    name, in the order they were made; ``turns`` how many turns made the thread.
    """

    thread_id: str
    tables: Mapping[str, Rows]
    bodies: tuple[Mapping[str, Any] | None, ...]
    metadata: tuple[Mapping[str, Any] | None, ...]
    runs: tuple[str, ...]
    turns: int

    @property
    def checkpoints(self) -> int:
        return len(self.tables["checkpoints"].rows)

    @property
    def rows(self) -> int:
        return sum(len(t.rows) for t in self.tables.values())


@dataclass(frozen=True, slots=True)
class Layout:
    """How one backend's tables name a thread and a time.

    ``tables``: the stored name of each table. ``keys``: per table, the columns that
    name the thread (``sid``, a per-(thread, ns) key, or ``thread_id``). ``stamp`` turns
    epoch seconds into a stored time; with ``accessed``, ``accessed_at`` is set to the
    creation time too (SQLite: NOT NULL; PostgreSQL leaves it NULL until a read).
    """

    tables: Mapping[str, str]
    keys: Mapping[str, tuple[str, ...]]
    stamp: Callable[[float], Any]
    accessed: bool


def _pg_stamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _sqlite_stamp(seconds: float) -> float:
    return seconds


POSTGRES_LAYOUT = Layout(
    tables={t: f"tierstore_{t}" for t in TABLES},
    keys={"heads": ("sid", "thread_id"), "checkpoints": ("sid",), "blobs": ("sid",),
          "writes": ("sid",)},
    stamp=_pg_stamp, accessed=False)
SQLITE_LAYOUT = Layout(
    tables={t: t for t in TABLES},
    keys={t: ("thread_id",) for t in TABLES},
    stamp=_sqlite_stamp, accessed=True)

Encode = Callable[[Mapping[str, Any]], tuple[str, bytes]]
UUID_EPOCH = 0x01B21DD213814000  # 100-ns intervals from 1582-10-15 to 1970-01-01


def checkpoint_id_at(seconds: float, *, clock_seq: int, node: int) -> str:
    """A checkpoint id as LangGraph makes one (a version 6 UUID), stamped ``seconds``."""
    stamp = int(seconds * 10_000_000) + UUID_EPOCH
    value = ((stamp >> 12) & 0xFFFF_FFFF_FFFF) << 80 | (stamp & 0x0FFF) << 64
    value |= (clock_seq & 0x3FFF) << 48 | (node & 0xFFFF_FFFF_FFFF)
    return str(LangGraphUUID(int=value, version=6))


def replica_rows(
    tpl: Template, layout: Layout, *, thread_id: str, sid: int | None, head_at: float,
    spacing: float, runs: Sequence[str], node: int, encode: Encode,
) -> dict[str, list[tuple[Any, ...]]]:
    """Template ``tpl``'s rows for a new thread: its id (and ``sid``), times, ids, runs.

    The k-th checkpoint (by creation) is made ``head_at - (n-1-k) * spacing``: its
    created_at, its id (a version 6 UUID of that time, ``node`` in the node field, so
    ids differ between replicas as between real threads) and the ``id`` / ``ts`` of
    its body, encoded again by ``encode`` (the saver's codec); parent ids, the head's
    id and the writes follow the new ids. Each template run id becomes ``runs[i]`` in
    the run_id column, the metadata (encoded again) and the filter document. Leases
    and settled marks are cleared. Everything else — channel versions, blobs, write
    payloads, the head's write count and version — is the template's, byte for byte.
    """
    if len(runs) != len(tpl.runs):
        raise ValueError(f"template has {len(tpl.runs)} runs, {len(runs)} given")
    run_map = dict(zip(tpl.runs, runs, strict=True))
    key_values = {"sid": sid, "thread_id": thread_id}
    ckpts = tpl.tables["checkpoints"]
    c = {name: i for i, name in enumerate(ckpts.columns)}
    order = sorted(range(len(ckpts.rows)), key=lambda k: ckpts.rows[k][c["created_at"]])
    n = len(order)
    times = [0.0] * n
    ids: dict[str, str] = {}
    for rank, k in enumerate(order):
        times[k] = head_at - (n - 1 - rank) * spacing
        ids[ckpts.rows[k][c["checkpoint_id"]]] = checkpoint_id_at(times[k], clock_seq=rank,
                                                                   node=node)
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in TABLES:
        rows = tpl.tables[table]
        index = {name: i for i, name in enumerate(rows.columns)}
        keys = [(index[name], key_values[name]) for name in layout.keys[table]]
        new: list[tuple[Any, ...]] = []
        for k, row in enumerate(rows.rows):
            values = list(row)
            for i, value in keys:
                values[i] = value
            if table == "heads":
                values[index["updated_at"]] = layout.stamp(head_at)
                if row[index["head_id"]] is not None:
                    values[index["head_id"]] = ids[row[index["head_id"]]]
                for name in ("lease_owner", "lease_until", "settled_head", "settled_until"):
                    if name in index:
                        values[index[name]] = None
            elif table == "writes":
                values[index["checkpoint_id"]] = ids[row[index["checkpoint_id"]]]
            elif table == "checkpoints":
                _replica_checkpoint(tpl, layout, k, row, values, index=index, ids=ids,
                                    made=times[k], run_map=run_map, encode=encode)
            new.append(tuple(values))
        out[table] = new
    return out


def _replica_checkpoint(
    tpl: Template, layout: Layout, k: int, row: tuple[Any, ...], values: list[Any], *,
    index: Mapping[str, int], ids: Mapping[str, str], made: float,
    run_map: Mapping[str, str], encode: Encode,
) -> None:
    """Checkpoint row k of ``tpl`` for a replica (see ``replica_rows``), in ``values``."""
    new_id = ids[row[index["checkpoint_id"]]]
    stamp = layout.stamp(made)
    values[index["checkpoint_id"]] = new_id
    values[index["created_at"]] = stamp
    if layout.accessed:
        values[index["accessed_at"]] = stamp
    parent = row[index["parent_id"]]
    if parent is not None:
        values[index["parent_id"]] = ids.get(parent, parent)
    size = row[index["size_bytes"]]
    body = tpl.bodies[k]
    if body is not None:
        tag, data = encode({**body, "id": new_id,
                            "ts": datetime.fromtimestamp(made, UTC).isoformat()})
        size += len(data) - len(row[index["checkpoint"]])
        values[index["checkpoint_tag"]], values[index["checkpoint"]] = tag, data
    old_run = row[index["run_id"]]
    if old_run is not None:
        new_run = run_map[old_run]
        values[index["run_id"]] = new_run
        values[index["filter_doc"]] = row[index["filter_doc"]].replace(old_run, new_run)
        md = tpl.metadata[k]
        if md is not None and md.get("run_id") == old_run:
            tag, data = encode({**md, "run_id": new_run})
            size += len(data) - len(row[index["metadata"]])
            values[index["metadata_tag"]], values[index["metadata"]] = tag, data
    values[index["size_bytes"]] = size


def threads_for(templates: Sequence[Template], start: int, checkpoints: int) -> int:
    """How many replicas from index ``start`` on hold at least ``checkpoints``."""
    count, held = 0, 0
    while held < checkpoints:
        held += templates[(start + count) % len(templates)].checkpoints
        count += 1
    return count


def series_row(samples: Sequence[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"p50": None, "p99": None, "n": 0}
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99), "n": len(samples)}


# -- settings ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    sizes: tuple[int, ...] = (10_000, 100_000)
    backends: tuple[str, ...] = ("postgres", "sqlite")
    templates: int = 6
    message_bytes: int = 500
    samples: int = 200  # latest reads and lists at each size
    write_samples: int = 40  # turns, copies, deletes, prunes at each size
    verify: int = 20
    workers: int = 1
    archive_seconds: float = 20.0
    max_age_days: float = 120.0
    archive_after_days: float = 30.0
    idle_after_days: float = 90.0
    spacing: float = 60.0  # seconds between a thread's checkpoints
    chunk: int = 2000  # threads per COPY / transaction
    load_connections: int = 2
    control: bool = True
    postgres: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    seed: int = 7
    jobs_at: int | None = None  # the size at which the jobs run to completion, twice
    jobs_seconds: float = 3600.0  # at most, per job and round


    @property
    def idle_age(self) -> float:
        return self.idle_after_days * DAY


def loopback(url: str) -> str:
    host = urlsplit(url).hostname or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to contact {host}: this tool only talks to 127.0.0.1")
    return url


# -- backends ------------------------------------------------------------------------------


@dataclass(slots=True)
class LoadStats:
    threads: int = 0
    checkpoints: int = 0
    rows: int = 0
    seconds: float = 0.0
    making: float = 0.0  # of which making the rows (the rest: COPY / INSERT)


@dataclass(frozen=True, slots=True)
class StoreSize:
    bytes: int
    checkpoints: int
    archived: int
    threads: int
    detail: dict[str, int]


class Backend(Protocol):
    name: str
    layout: Layout
    warm_url: str

    async def create(self) -> None: ...
    async def drop(self) -> None: ...
    async def read_templates(self, thread_ids: Sequence[str]) -> dict[str, dict[str, Rows]]: ...
    async def load(self, jobs: Sequence[Chunk]) -> int: ...
    async def settle(self) -> float: ...
    async def size(self) -> StoreSize: ...
    async def archived(self) -> tuple[int, int]: ...
    async def archived_sample(self, n: int, *, heads: bool) -> list[tuple[str, str]]: ...
    async def vacuum(self) -> float: ...
    async def space(self) -> Space: ...


@dataclass(frozen=True, slots=True)
class Space:
    """What the warm store's files hold, for the jobs phase.

    ``bytes``: tables + TOAST + indexes (SQLite: file + WAL); ``free``: of which space
    free for new rows (PostgreSQL: the free space map, which VACUUM fills; SQLite: the
    freelist); ``dead``: dead row versions (PostgreSQL's statistics; SQLite: 0);
    ``live``: checkpoints whose body is in warm; ``stubs``: archived ones.
    """

    bytes: int
    free: int
    dead: int
    live: int
    stubs: int
    threads: int

    @property
    def used(self) -> int:
        return self.bytes - self.free


class Postgres:
    """A database of its own on the shared server; rows go in with COPY."""

    name = "postgres"
    layout = POSTGRES_LAYOUT

    def __init__(self, server: str, token: str, connections: int) -> None:
        self.server = loopback(server)
        parts = urlsplit(server)
        self.database = f"tierstore_scale_{token}"
        self.warm_url = parts._replace(path=f"/{self.database}").geturl()
        self.connections = connections
        self.created = False
        self.columns: dict[str, tuple[str, ...]] = {}

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create(self) -> None:
        await self._admin(f'CREATE DATABASE "{self.database}"')
        self.created = True

    async def drop(self) -> None:
        if self.created:
            await self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            self.created = False

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await asyncpg.connect(self.warm_url)
        try:
            yield conn
        finally:
            await conn.close()

    async def read_templates(self, thread_ids: Sequence[str]) -> dict[str, dict[str, Rows]]:
        out: dict[str, dict[str, Rows]] = {}
        async with self.connect() as conn:
            for thread_id in thread_ids:
                heads = await conn.fetch(
                    "SELECT * FROM tierstore_heads WHERE thread_id = $1 ORDER BY sid", thread_id)
                if len(heads) != 1:
                    raise RuntimeError(f"template {thread_id!r}: {len(heads)} head rows, not 1")
                sid = heads[0]["sid"]
                tables = {"heads": heads}
                for table in TABLES[1:]:
                    tables[table] = await conn.fetch(
                        f"SELECT * FROM {self.layout.tables[table]} WHERE sid = $1", sid)
                out[thread_id] = {t: _rows(r, self.columns.setdefault(t, _names(r)))
                                  for t, r in tables.items()}
        return out

    async def load(self, jobs: Sequence[Chunk]) -> int:
        """Run each job (rows of a chunk of replicas, given the first sid of its block)
        and COPY its rows, ``connections`` chunks at a time; returns the rows copied."""
        if not jobs:
            return 0
        first = await self._reserve(sum(job.threads for job in jobs))
        pending = list(jobs)
        copied = 0

        async def worker() -> None:
            nonlocal copied
            async with self.connect() as conn:
                await conn.execute("SET synchronous_commit = off")
                while pending:
                    job = pending.pop(0)
                    rows = job(first + job.start - jobs[0].start)
                    async with conn.transaction():
                        for table in TABLES:
                            await conn.copy_records_to_table(
                                self.layout.tables[table], records=rows[table],
                                columns=list(self.columns[table]))
                    copied += sum(len(r) for r in rows.values())

        await asyncio.gather(*(worker() for _ in range(max(1, self.connections))))
        return copied

    async def _reserve(self, count: int) -> int:
        """The first of ``count`` consecutive sids nobody else will be given (the loaders
        share one block, taken before they start: two sessions' nextval / setval pairs
        could interleave)."""
        async with self.connect() as conn, conn.transaction():
            seq = await conn.fetchval("SELECT pg_get_serial_sequence('tierstore_heads', 'sid')")
            if seq is None:
                raise RuntimeError("tierstore_heads.sid has no sequence")
            await conn.execute("LOCK TABLE tierstore_heads IN SHARE ROW EXCLUSIVE MODE")
            first = int(await conn.fetchval("SELECT nextval($1::regclass)", seq))
            await conn.execute("SELECT setval($1::regclass, $2)", seq, first + count - 1)
        return first

    async def settle(self) -> float:
        start = time.perf_counter()
        async with self.connect() as conn:
            for table in TABLES:
                await conn.execute(f"VACUUM ANALYZE {self.layout.tables[table]}")
        return time.perf_counter() - start

    async def size(self) -> StoreSize:
        async with self.connect() as conn:
            rows = await conn.fetch(
                "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema()")
            total = await conn.fetchval("SELECT count(*) FROM tierstore_checkpoints")
            archived = await self._archived(conn)
            threads = await conn.fetchval("SELECT count(*) FROM tierstore_heads")
        detail = {str(r[0]): int(r[1]) for r in rows}
        return StoreSize(sum(detail.values()), int(total), archived, int(threads), detail)

    @staticmethod
    async def _archived(conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval(
            "SELECT count(*) FROM tierstore_checkpoints WHERE archive_key IS NOT NULL"))

    async def archived(self) -> tuple[int, int]:
        """Stubs, and how many of them are heads (threads archived whole)."""
        async with self.connect() as conn:
            row = await conn.fetchrow(
                "SELECT count(*), count(*) FILTER (WHERE c.checkpoint_id = h.head_id) "
                "FROM tierstore_checkpoints AS c JOIN tierstore_heads AS h ON h.sid = c.sid "
                "WHERE c.archive_key IS NOT NULL")
        assert row is not None
        return int(row[0]), int(row[1])

    async def archived_sample(self, n: int, *, heads: bool) -> list[tuple[str, str]]:
        """Random stubs: (thread, checkpoint id) of heads (whole threads archived) or not."""
        async with self.connect() as conn:
            rows = await conn.fetch(
                "SELECT h.thread_id, c.checkpoint_id "
                "FROM tierstore_checkpoints AS c JOIN tierstore_heads AS h ON h.sid = c.sid "
                "WHERE c.archive_key IS NOT NULL AND (c.checkpoint_id = h.head_id) = $2 "
                "ORDER BY random() LIMIT $1", n, heads)
        return [(r[0], r[1]) for r in rows]

    async def vacuum(self) -> float:
        """A plain VACUUM of every table (not FULL: what autovacuum runs), then ANALYZE."""
        start = time.perf_counter()
        async with self.connect() as conn:
            for table in TABLES:
                await conn.execute(f"VACUUM (ANALYZE) {self.layout.tables[table]}")
        return time.perf_counter() - start

    async def space(self) -> Space:
        async with self.connect() as conn:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_freespacemap")
            # every relation of the four tables: the table, its TOAST table, their indexes
            rels = (
                "WITH t AS (SELECT c.oid, c.reltoastrelid FROM pg_class AS c "
                "           WHERE c.oid = ANY($1::regclass[])), "
                "heaps AS (SELECT oid FROM t UNION ALL "
                "          SELECT reltoastrelid FROM t WHERE reltoastrelid <> 0), "
                "rels AS (SELECT oid FROM heaps UNION ALL "
                "         SELECT i.indexrelid FROM pg_index AS i JOIN heaps AS h "
                "             ON i.indrelid = h.oid) ")
            names = [self.layout.tables[t] for t in TABLES]
            total = await conn.fetchval(
                "SELECT sum(pg_total_relation_size(t)) FROM unnest($1::regclass[]) AS t",
                names)
            free = await conn.fetchval(
                rels + "SELECT sum((SELECT coalesce(sum(f.avail), 0) "
                "FROM pg_freespace(r.oid) AS f)) FROM rels AS r", names)
            dead = await conn.fetchval(
                rels + "SELECT coalesce(sum(s.n_dead_tup), 0) FROM pg_stat_all_tables AS s "
                "JOIN rels AS r ON r.oid = s.relid", names)
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE archive_key IS NULL), "
                "count(*) FILTER (WHERE archive_key IS NOT NULL) FROM tierstore_checkpoints")
            threads = await conn.fetchval("SELECT count(*) FROM tierstore_heads")
        assert row is not None
        return Space(int(total), int(free), int(dead), int(row[0]), int(row[1]), int(threads))


class Sqlite:
    """A database file in a temporary directory; rows go in with executemany."""

    name = "sqlite"
    layout = SQLITE_LAYOUT

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "warm.db"
        self.warm_url = f"sqlite:///{self.path}"
        self.columns: dict[str, tuple[str, ...]] = {}

    async def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def drop(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 60000")
        return conn

    async def read_templates(self, thread_ids: Sequence[str]) -> dict[str, dict[str, Rows]]:
        def body() -> dict[str, dict[str, Rows]]:
            out: dict[str, dict[str, Rows]] = {}
            with contextlib.closing(self._connect()) as conn:
                for thread_id in thread_ids:
                    tables: dict[str, Rows] = {}
                    for table in TABLES:
                        cur = conn.execute(f"SELECT * FROM {self.layout.tables[table]} "
                                           "WHERE thread_id = ?",
                                           (thread_id,))
                        names = tuple(d[0] for d in cur.description)
                        self.columns.setdefault(table, names)
                        tables[table] = Rows(names, tuple(tuple(r) for r in cur.fetchall()))
                    if len(tables["heads"].rows) != 1:
                        raise RuntimeError(f"template {thread_id!r}: not one head row")
                    out[thread_id] = tables
            return out

        return await asyncio.to_thread(body)

    async def load(self, jobs: Sequence[Chunk]) -> int:
        def body() -> int:
            copied = 0
            with contextlib.closing(self._connect()) as conn:
                # this connection's own settings (the saver's are its own): no fsync per
                # transaction, and a page cache that holds the B-trees it inserts into
                conn.execute("PRAGMA synchronous = OFF")
                conn.execute("PRAGMA cache_size = -1048576")  # KiB: 1 GiB
                for job in jobs:
                    rows = job(None)
                    conn.execute("BEGIN IMMEDIATE")
                    for table in TABLES:
                        cols = self.columns[table]
                        conn.executemany(
                            f"INSERT INTO {self.layout.tables[table]} ({', '.join(cols)}) "
                            f"VALUES ({', '.join('?' * len(cols))})", rows[table])
                        copied += len(rows[table])
                    conn.execute("COMMIT")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return copied

        return await asyncio.to_thread(body)

    async def settle(self) -> float:
        return 0.0  # the embedded store runs no ANALYZE of its own: neither does this

    async def size(self) -> StoreSize:
        def body() -> StoreSize:
            with contextlib.closing(self._connect()) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                total = conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
                archived = conn.execute("SELECT count(*) FROM checkpoints "
                                        "WHERE location = 'archived'").fetchone()[0]
                threads = conn.execute("SELECT count(*) FROM heads").fetchone()[0]
            detail = {}
            for suffix in ("", "-wal"):
                file = Path(f"{self.path}{suffix}")
                if file.exists():
                    detail[file.name] = file.stat().st_size
            return StoreSize(sum(detail.values()), int(total), int(archived), int(threads),
                             detail)

        return await asyncio.to_thread(body)

    async def archived(self) -> tuple[int, int]:
        def body() -> tuple[int, int]:
            with contextlib.closing(self._connect()) as conn:
                row = conn.execute(
                    "SELECT count(*), coalesce(sum(c.checkpoint_id = h.head_id), 0) "
                    "FROM checkpoints AS c JOIN heads AS h ON h.thread_id = c.thread_id "
                    "AND h.checkpoint_ns = c.checkpoint_ns "
                    "WHERE c.location = 'archived'").fetchone()
            return int(row[0]), int(row[1])

        return await asyncio.to_thread(body)

    async def archived_sample(self, n: int, *, heads: bool) -> list[tuple[str, str]]:
        def body() -> list[tuple[str, str]]:
            with contextlib.closing(self._connect()) as conn:
                rows = conn.execute(
                    "SELECT c.thread_id, c.checkpoint_id "
                    "FROM checkpoints AS c JOIN heads AS h ON h.thread_id = c.thread_id "
                    "AND h.checkpoint_ns = c.checkpoint_ns WHERE c.location = 'archived' "
                    "AND (c.checkpoint_id = h.head_id) = ? ORDER BY random() LIMIT ?",
                    (heads, n)).fetchall()
            return [(r[0], r[1]) for r in rows]

        return await asyncio.to_thread(body)

    async def vacuum(self) -> float:
        return 0.0  # freed pages go to the file's freelist as they are freed

    async def space(self) -> Space:
        def body() -> Space:
            with contextlib.closing(self._connect()) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                page = conn.execute("PRAGMA page_size").fetchone()[0]
                free = conn.execute("PRAGMA freelist_count").fetchone()[0] * page
                live, stubs = conn.execute(
                    "SELECT coalesce(sum(location = 'warm'), 0), "
                    "coalesce(sum(location = 'archived'), 0) FROM checkpoints").fetchone()
                threads = conn.execute("SELECT count(*) FROM heads").fetchone()[0]
            total = sum(Path(f"{self.path}{suffix}").stat().st_size
                        for suffix in ("", "-wal") if Path(f"{self.path}{suffix}").exists())
            return Space(total, int(free), 0, int(live), int(stubs), int(threads))

        return await asyncio.to_thread(body)


def _names(records: Sequence[asyncpg.Record]) -> tuple[str, ...]:
    return tuple(records[0].keys()) if records else ()


def _rows(records: Sequence[asyncpg.Record], columns: tuple[str, ...]) -> Rows:
    return Rows(columns, tuple(tuple(r[c] for c in columns) for r in records))


# -- the saver under test -----------------------------------------------------------------


class TimedSaver(TieredSaver):
    """TieredSaver that records how long each ``aput`` / ``aput_writes`` took."""

    timing = False
    puts: list[float]
    writes: list[float]

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions
                   ) -> RunnableConfig:
        start = time.perf_counter()
        try:
            return await super().aput(config, checkpoint, metadata, new_versions)
        finally:
            if self.timing:
                self.puts.append(ms(time.perf_counter() - start))

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        start = time.perf_counter()
        try:
            await super().aput_writes(config, writes, task_id, task_path)
        finally:
            if self.timing:
                self.writes.append(ms(time.perf_counter() - start))


def ms(seconds: float) -> float:
    return seconds * 1000.0


@contextlib.asynccontextmanager
async def open_saver(backend: Backend, cold: Path | None) -> AsyncIterator[TimedSaver]:
    saver = TimedSaver.from_urls(hot=None, warm=backend.warm_url,
                                 cold=None if cold is None else f"file://{cold}")
    assert isinstance(saver, TimedSaver)  # from_urls builds the class it is called on
    saver.puts, saver.writes = [], []
    async with saver:
        yield saver


def run_config(thread_id: str) -> RunnableConfig:
    """A turn's config as a server gives it: the thread, and a run id in the metadata."""
    return {"configurable": {"thread_id": thread_id},
            "metadata": {"run_id": str(uuid.uuid4())}}


async def make_templates(saver: TieredSaver, backend: Backend, settings: Settings
                         ) -> list[Template]:
    """Run the chat graph on a few threads (3..5 turns each) and read their rows back."""
    graph = build_chat_agent(settings.message_bytes).compile(checkpointer=saver)
    turns = {f"template-{k}": 3 + k % 3 for k in range(settings.templates)}
    for thread_id, count in turns.items():
        for turn in range(count):
            await graph.ainvoke(turn_input(thread_id, turn, settings.message_bytes),
                                run_config(thread_id), durability="sync")
    stored = await backend.read_templates(list(turns))
    templates = []
    for thread_id, tables in stored.items():
        ckpts = tables["checkpoints"]
        index = {c: i for i, c in enumerate(ckpts.columns)}
        metadata: list[Mapping[str, Any] | None] = []
        bodies: list[Mapping[str, Any] | None] = []
        runs: list[str] = []
        for row in ckpts.rows:
            md = saver.codec.decode(Payload(row[index["metadata_tag"]], row[index["metadata"]]),
                                    where="template metadata")
            metadata.append(md if isinstance(md, Mapping) else None)
            body = (None if row[index["checkpoint"]] is None else saver.codec.decode(
                Payload(row[index["checkpoint_tag"]], row[index["checkpoint"]]),
                where="template checkpoint"))
            bodies.append(body if isinstance(body, Mapping) else None)
        for row in sorted(ckpts.rows, key=lambda r: r[index["created_at"]]):
            run = row[index["run_id"]]
            if run is not None and run not in runs:
                runs.append(run)
        templates.append(Template(thread_id, tables, tuple(bodies), tuple(metadata),
                                  tuple(runs), turns[thread_id]))
    return templates


# -- loading -------------------------------------------------------------------------------


@dataclass(slots=True)
class Chunk:
    """The rows of replicas ``start`` .. ``start + threads - 1``, made when called."""

    templates: Sequence[Template]
    layout: Layout
    start: int
    threads: int
    now: float
    settings: Settings
    encode: Encode
    offset: float
    seconds: float = 0.0  # spent making the rows

    def __call__(self, first_sid: int | None) -> dict[str, list[tuple[Any, ...]]]:
        began = time.perf_counter()
        out: dict[str, list[tuple[Any, ...]]] = {t: [] for t in TABLES}
        max_age = self.settings.max_age_days * DAY
        for j in range(self.threads):
            i = self.start + j
            tpl = self.templates[i % len(self.templates)]
            rows = replica_rows(
                tpl, self.layout, thread_id=thread_name(i),
                sid=None if first_sid is None else first_sid + j,
                head_at=self.now - thread_age(i, max_age, offset=self.offset),
                spacing=self.settings.spacing,
                runs=[str(uuid.uuid4()) for _ in tpl.runs], node=secrets.randbits(48),
                encode=self.encode)
            for table in TABLES:
                out[table].extend(rows[table])
        self.seconds = time.perf_counter() - began
        return out


async def grow(backend: Backend, templates: Sequence[Template], *, start: int, target: int,
               settings: Settings, encode: Encode, offset: float) -> LoadStats:
    """Load replicas from index ``start`` until they add ``target`` checkpoints."""
    count = threads_for(templates, start, target) if target > 0 else 0
    stats = LoadStats(threads=count)
    if not count:
        return stats
    stats.checkpoints = sum(templates[(start + j) % len(templates)].checkpoints
                            for j in range(count))
    now = time.time()
    jobs = [Chunk(templates, backend.layout, start + a, min(settings.chunk, count - a), now,
                  settings, encode, offset)
            for a in range(0, count, settings.chunk)]
    began = time.perf_counter()
    stats.rows = await backend.load(jobs)
    stats.seconds = time.perf_counter() - began
    stats.making = sum(j.seconds for j in jobs)
    return stats


# -- verifying and measuring ---------------------------------------------------------------


def _without(mapping: Mapping[str, Any] | None, *keys: str) -> dict[str, Any]:
    return {k: v for k, v in (mapping or {}).items() if k not in keys}


def _id(config: RunnableConfig | None) -> str | None:
    return None if config is None else config.get("configurable", {}).get("checkpoint_id")


def compare(tpl: CheckpointTuple, got: CheckpointTuple | None, ids: Mapping[str, str],
            template_runs: set[str]) -> list[str]:
    """What differs between a template's tuple and its replica's, where ``ids`` maps
    the template's checkpoint ids to the replica's (run ids and times aside)."""
    if got is None:
        return ["missing"]
    problems = []
    mine = _id(got.config)
    if mine != ids.get(_id(tpl.config) or ""):
        problems.append("checkpoint id")
    if got.checkpoint.get("id") != mine:
        problems.append("the checkpoint's own id")
    if _without(got.checkpoint, "id", "ts") != _without(tpl.checkpoint, "id", "ts"):
        problems.append("checkpoint (channel values, versions)")
    if _without(got.metadata, "run_id") != _without(tpl.metadata, "run_id"):
        problems.append("metadata")
    run = (got.metadata or {}).get("run_id")
    if (tpl.metadata or {}).get("run_id") is not None and (run is None or run in template_runs):
        problems.append(f"run id {run!r} is not the replica's own")
    if list(got.pending_writes or []) != list(tpl.pending_writes or []):
        problems.append("pending writes")
    parent = _id(tpl.parent_config)
    if _id(got.parent_config) != (None if parent is None else ids.get(parent)):
        problems.append("parent")
    return problems


async def verify(saver: TieredSaver, templates: Sequence[Template], indices: Sequence[int]
                 ) -> list[str]:
    """Replicas read back through the saver as their templates do; a list of problems."""
    problems: list[str] = []
    runs = {r for t in templates for r in t.runs}
    for i in indices:
        tpl = templates[i % len(templates)]
        thread = thread_name(i)
        want = [t async for t in saver.alist(thread_config(tpl.thread_id))]
        got = [t async for t in saver.alist(thread_config(thread))]
        if len(got) != len(want):
            problems.append(f"{thread} list: {len(got)} checkpoints, template {len(want)}")
            continue
        ids = {_id(w.config) or "": _id(g.config) or "" for w, g in zip(want, got, strict=True)}
        for w, g in zip(want, got, strict=True):
            problems += [f"{thread} list {_id(g.config)}: {p}" for p in compare(w, g, ids, runs)]
        latest = await saver.aget_tuple(thread_config(tpl.thread_id))
        assert latest is not None
        problems += [f"{thread} latest: {p}" for p in compare(
            latest, await saver.aget_tuple(thread_config(thread)), ids, runs)]
    return problems


class Sampler:
    """Random replicas of the whole store for the request path: never idle ones (those
    are archival's), never ones an operation destroyed."""

    def __init__(self, settings: Settings, offset: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.max_age = settings.max_age_days * DAY
        self.idle_age = settings.idle_age
        self.offset = offset
        self.loaded = 0
        self.gone: set[int] = set()
        self.changed: set[int] = set()

    def eligible(self, i: int) -> bool:
        return (i not in self.gone
                and thread_age(i, self.max_age, offset=self.offset) < self.idle_age)

    def take(self, n: int, *, reserve: bool = False, change: bool = False,
             unchanged: bool = False) -> list[int]:
        """``n`` distinct replicas (fewer if the store has not that many). ``reserve``:
        they are destroyed, never drawn again; ``change``: they get a new turn, so they
        no longer match their template; ``unchanged``: only ones that still do."""
        picked: set[int] = set()
        tries = 0
        while len(picked) < n and tries < 100 * n + 1000:
            tries += 1
            i = self.rng.randrange(self.loaded)
            if self.eligible(i) and not (unchanged and i in self.changed):
                picked.add(i)
        out = sorted(picked)
        self.rng.shuffle(out)
        if reserve:
            self.gone.update(out)
        if change:
            self.changed.update(out)
        return out


@dataclass(slots=True, eq=False)
class Arena:
    """One store of a run: the one that grows, or the control that stays at the smallest
    size and is measured alongside it, call for call, so that what the shared machine
    does meanwhile falls on both alike."""

    label: str
    backend: Backend
    cold: Path
    sampler: Sampler
    templates: list[Template] = field(default_factory=list)
    encode: Encode | None = None
    held: int = 0
    saver: TimedSaver | None = None
    replaced: int = 0  # destroyed replicas already made up for (the control's)

    @property
    def live(self) -> TimedSaver:
        assert self.saver is not None, "the arena's saver is not open"
        return self.saver

    async def setup(self, settings: Settings, log: Callable[[str], None]) -> None:
        await self.backend.create()
        async with open_saver(self.backend, self.cold) as saver:
            log(f"[{self.label}] templates: {settings.templates} threads through the chat "
                "graph")
            self.templates = await make_templates(saver, self.backend, settings)
            codec = saver.codec

        def encode(value: Mapping[str, Any]) -> tuple[str, bytes]:
            payload = codec.encode(value)
            return payload.tag, payload.data

        self.encode = encode
        self.held = sum(t.checkpoints for t in self.templates)

    async def grow(self, checkpoints: int, settings: Settings) -> LoadStats:
        assert self.encode is not None
        stats = await grow(self.backend, self.templates, start=self.sampler.loaded,
                           target=checkpoints, settings=settings, encode=self.encode,
                           offset=self.sampler.offset)
        self.sampler.loaded += stats.threads
        self.held += stats.checkpoints
        return stats


async def timed(samples: list[float], call: Awaitable[Any]) -> Any:
    start = time.perf_counter()
    result = await call
    samples.append(ms(time.perf_counter() - start))
    return result


Samples = dict[str, dict[str, list[float]]]  # arena label -> operation -> ms


async def alternate(arenas: Sequence[Arena], picks: Mapping[str, Sequence[Any]],
                    call: Callable[[Arena, Any], Awaitable[Any]], out: list[list[float]]
                    ) -> None:
    """Call k on every arena, then call k+1 in the other order, ...: one at a time."""
    for k in range(max((len(p) for p in picks.values()), default=0)):
        order = list(zip(arenas, out, strict=True))
        for arena, samples in order if k % 2 == 0 else order[::-1]:
            mine = picks[arena.label]
            if k < len(mine):
                await timed(samples, call(arena, mine[k]))


async def measure(arenas: Sequence[Arena], settings: Settings, log: Callable[[str], None]
                  ) -> Samples:
    """Every operation of the request path, one call at a time, on random replicas of
    each arena, alternating between them."""
    out: Samples = {a.label: {op: [] for op in OPERATIONS} for a in arenas}

    def take(n: int, **how: bool) -> dict[str, list[int]]:
        return {a.label: a.sampler.take(n, **how) for a in arenas}

    def slot(op: str) -> list[list[float]]:
        return [out[a.label][op] for a in arenas]

    async def read(a: Arena, i: int) -> None:
        if await a.live.aget_tuple(thread_config(thread_name(i))) is None:
            raise RuntimeError(f"{a.label}: replica {i} has no checkpoint")

    async def listed(a: Arena, i: int) -> None:
        n = await _consume(a.live.alist(thread_config(thread_name(i)), limit=10))
        if n != 10:
            raise RuntimeError(f"{a.label}: replica {i}: list(limit=10) returned {n}")

    await alternate(arenas, take(settings.samples), read, slot("read"))
    await alternate(arenas, take(settings.samples), listed, slot("list"))
    log("    read and list done")
    graphs = {a.label: build_chat_agent(settings.message_bytes).compile(checkpointer=a.live)
              for a in arenas}
    for a in arenas:
        a.live.puts, a.live.writes = out[a.label]["put"], out[a.label]["writes"]

    async def turn(a: Arena, i: int) -> None:
        thread = thread_name(i)
        number = a.templates[i % len(a.templates)].turns + 100 + len(out[a.label]["turn"])
        a.live.timing = True
        try:
            await graphs[a.label].ainvoke(turn_input(thread, number, settings.message_bytes),
                                          run_config(thread), durability="sync")
        finally:
            a.live.timing = False

    async def copy(a: Arena, i: int) -> None:
        await a.live.acopy_thread(thread_name(i), f"copy-{uuid.uuid4()}")

    await alternate(arenas, take(settings.write_samples, change=True), turn, slot("turn"))
    await alternate(arenas, take(settings.write_samples), copy, slot("copy"))
    log("    turns and copies done")

    async def delete(a: Arena, i: int) -> None:
        await a.live.adelete_thread(thread_name(i))

    async def prune(a: Arena, i: int) -> None:
        await a.live.aprune([thread_name(i)], strategy="keep_latest")

    # delete_for_runs: the run of each thread's latest checkpoint, read beforehand
    runs: dict[str, list[tuple[int, str]]] = {}
    for label, picks in take(settings.write_samples, reserve=True).items():
        arena = next(a for a in arenas if a.label == label)
        runs[label] = []
        for i in picks:
            latest = await arena.live.aget_tuple(thread_config(thread_name(i)))
            run = None if latest is None else (latest.metadata or {}).get("run_id")
            if run is None:
                raise RuntimeError(f"{label}: replica {i}: its latest checkpoint names no run")
            runs[label].append((i, run))
    first = {a.label: True for a in arenas}

    async def delete_runs(a: Arena, pick: tuple[int, str]) -> None:
        i, run = pick
        config = thread_config(thread_name(i))
        before = [t async for t in a.live.alist(config)] if first[a.label] else []
        await timed(out[a.label]["runs"], a.live.adelete_for_runs([run]))
        if first[a.label]:  # the run's checkpoints are gone, the others stay
            first[a.label] = False
            after = [t.config async for t in a.live.alist(config)]
            kept = [t.config for t in before if (t.metadata or {}).get("run_id") != run]
            if after != kept or len(kept) == len(before):
                raise RuntimeError(f"{a.label}: replica {i}: delete_for_runs left "
                                   f"{len(after)} of {len(before)} checkpoints, expected "
                                   f"{len(kept)}")

    await alternate(arenas, take(settings.write_samples, reserve=True), delete, slot("delete"))
    await alternate(arenas, runs, delete_runs, [[] for _ in arenas])
    await alternate(arenas, take(settings.write_samples, reserve=True), prune, slot("prune"))
    log("    deletes, runs and prunes done")
    return out


async def _consume(it: AsyncIterator[CheckpointTuple]) -> int:
    return sum([1 async for _ in it])


async def measure_after(arenas: Sequence[Arena], settings: Settings) -> Samples:
    """Reads once archiving ran (on the first arena): the request path, alternating with
    the others, and reads that reach cold."""
    out: Samples = {a.label: {op: [] for op in AFTER} for a in arenas}
    main = arenas[0]

    def take(n: int) -> dict[str, list[int]]:
        return {a.label: a.sampler.take(n) for a in arenas}

    async def read(a: Arena, i: int) -> None:
        await a.live.aget_tuple(thread_config(thread_name(i)))

    async def listed(a: Arena, i: int) -> None:
        await _consume(a.live.alist(thread_config(thread_name(i)), limit=10))

    await alternate(arenas, take(settings.samples), read, [out[a.label]["read"] for a in arenas])
    await alternate(arenas, take(settings.samples), listed,
                    [out[a.label]["list"] for a in arenas])
    mine = out[main.label]
    for thread, checkpoint_id in await main.backend.archived_sample(settings.samples,
                                                                     heads=False):
        config: RunnableConfig = {"configurable": {"thread_id": thread,
                                                   "checkpoint_id": checkpoint_id}}
        if await timed(mine["read_archived"], main.live.aget_tuple(config)) is None:
            raise RuntimeError(f"demoted checkpoint {checkpoint_id} of {thread} is gone")
    for thread, _ in await main.backend.archived_sample(settings.samples, heads=True):
        if await timed(mine["read_idle"], main.live.aget_tuple(thread_config(thread))) is None:
            raise RuntimeError(f"idle-archived thread {thread} reads nothing")
    return out


# -- archiving: separate worker processes ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    warm_url: str
    cold_url: str
    job: str
    seconds: float
    archive_after: float
    idle_after: float


def _archive_worker(spec: WorkerSpec, ready: Any, go: Any, results: Any) -> None:
    """One tiering worker (a process of its own): run ``spec.job`` until done or out of time."""
    with contextlib.suppress(KeyboardInterrupt):
        results.put(asyncio.run(_archive_worker_async(spec, ready, go)))


async def _archive_worker_async(spec: WorkerSpec, ready: Any, go: Any) -> dict[str, Any]:
    from tierstore.jobs.plan import TieringPolicy
    from tierstore.jobs.tiering import HistoryDemotion, IdleArchival

    policy = TieringPolicy(archive_after=spec.archive_after,
                           archive_idle_after=spec.idle_after)
    out: dict[str, Any] = {"pid": os.getpid(), "runs": 0, "checkpoints": 0, "segments": 0,
                           "failed": 0, "cut": False, "errors": []}
    async with TieredSaver.from_urls(hot=None, warm=spec.warm_url, cold=spec.cold_url) as saver:
        job = (HistoryDemotion if spec.job == "history-demotion" else IdleArchival)(saver, policy)
        ready.put(os.getpid())
        if not await asyncio.to_thread(go.wait, 600):
            return out  # the run that started this worker is gone
        deadline = time.monotonic() + spec.seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            task = asyncio.ensure_future(job.run_once())
            done, _ = await asyncio.wait({task}, timeout=left)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                out["cut"] = True
                break
            report = task.result()
            out["runs"] += 1
            out["checkpoints"] += report.checkpoints
            out["segments"] += report.segments
            out["failed"] += report.failed
            out["errors"] += report.errors[:3]
            if report.claimed == 0:
                break  # nothing left to move
        out["ended"] = time.time()
    return out


async def archive(backend: Backend, cold: Path, settings: Settings,
                  log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Each archiving job in turn, ``settings.workers`` processes at once."""
    ctx = multiprocessing.get_context("spawn")
    out: dict[str, dict[str, Any]] = {}
    for job in ARCHIVE_JOBS:
        spec = WorkerSpec(backend.warm_url, f"file://{cold}", job, settings.archive_seconds,
                          settings.archive_after_days * DAY, settings.idle_after_days * DAY)
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_archive_worker, args=(spec, ready, go, results),
                             daemon=True) for _ in range(settings.workers)]
        try:
            for p in procs:
                p.start()
            for _ in procs:
                await _get(ready, 120.0)
            before, heads_before = await backend.archived()
            started = time.time()
            go.set()
            reports = [await _get(results, settings.archive_seconds + 300) for _ in procs]
            ended = max([started, *(r.get("ended", started) for r in reports)])
            after, heads_after = await backend.archived()
            moved, whole = after - before, heads_after - heads_before
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join(10)
        # a worker stopped at the deadline moves nothing while it winds down (the move in
        # flight is cancelled): the rate is over the time it had
        seconds = min(ended - started, settings.archive_seconds)
        out[job] = {"moved": moved, "seconds": seconds, "stopped_after": ended - started,
                    "threads_whole": whole,
                    "per_s": moved / seconds if seconds > 0 else None,
                    "threads_whole_per_s": whole / seconds if seconds > 0 else None,
                    "cut": any(r["cut"] for r in reports),
                    "failed": sum(r["failed"] for r in reports),
                    "errors": [e for r in reports for e in r["errors"]][:5]}
        log(f"    {job}: {moved} checkpoints ({whole} threads whole) in {seconds:.1f} s by "
            f"{len(procs)} worker(s){' (time up)' if out[job]['cut'] else ' (all done)'}"
            + (f"; {out[job]['failed']} failed: {out[job]['errors'][:2]}"
               if out[job]["failed"] else ""))
    return out


async def _get(q: Any, within: float) -> Any:
    """The next item of a process queue, waiting at most ``within`` seconds; polled, so
    a cancelled run does not wait for a blocked thread at exit."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await asyncio.to_thread(q.get, True, 0.5)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise RuntimeError("an archive worker did not answer in time") from None


# -- the jobs to completion: warm bytes before and after, and space reused ----------------


JOB_STEPS = ("before", "after the jobs", "after VACUUM", "after as much new history",
             "after the jobs again", "after VACUUM again")


def space_row(step: str, space: Space, seconds: float | None = None) -> dict[str, Any]:
    return {"step": step, "bytes": space.bytes, "free": space.free, "used": space.used,
            "dead_rows": space.dead, "live_checkpoints": space.live, "stubs": space.stubs,
            "threads": space.threads, "seconds": seconds}


def reuse_summary(steps: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The figures the jobs phase is for, from its six steps (``JOB_STEPS``).

    ``after_jobs`` / ``after_vacuum``: warm bytes over the bytes before the jobs.
    ``new_history_growth``: how much the files grew while as much history again was
    written, over what that history took in the files the first time (before) — 0 is
    all of it in freed space, 1 none of it. ``second_round``: warm bytes after the
    second round over after the first, beside ``threads_ratio`` (live threads) and
    ``history_ratio`` (checkpoints written, live or archived).
    """
    by = {s["step"]: s for s in steps}
    if not all(name in by for name in JOB_STEPS):
        return {}
    before, jobs, vac = by[JOB_STEPS[0]], by[JOB_STEPS[1]], by[JOB_STEPS[2]]
    grown, last = by[JOB_STEPS[3]], by[JOB_STEPS[5]]

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    def history(s: Mapping[str, Any]) -> int:
        return int(s["live_checkpoints"]) + int(s["stubs"])

    return {
        "after_jobs": ratio(jobs["bytes"], before["bytes"]),
        "after_vacuum": ratio(vac["bytes"], before["bytes"]),
        "used_after_vacuum": ratio(vac["used"], before["bytes"]),
        "new_history_growth": ratio(grown["bytes"] - vac["bytes"], before["bytes"]),
        "second_round": ratio(last["bytes"], vac["bytes"]),
        "threads_ratio": ratio(last["threads"], vac["threads"]),
        "history_ratio": ratio(history(last), history(vac)),
        "live_ratio": ratio(last["live_checkpoints"], vac["live_checkpoints"]),
    }


async def jobs_phase(arena: Arena, settings: Settings, log: Callable[[str], None]
                     ) -> dict[str, Any]:
    """The tiering jobs run to completion with the policy, twice, and the warm store's
    bytes around them: before (vacuumed), right after the jobs, after a plain VACUUM;
    then as much new history as the store held is written (new threads, the same ages
    spread), and the jobs and VACUUM again. Space the first round freed is what the
    second round's rows fill, so the files grow with what stays live, not with history.
    """
    backend = arena.backend
    steps: list[dict[str, Any]] = []
    runs: list[dict[str, dict[str, Any]]] = []
    until_done = dataclasses.replace(settings, archive_seconds=settings.jobs_seconds)

    async def note(step: str, seconds: float | None = None) -> None:
        found = await backend.space()
        steps.append(space_row(step, found, seconds))
        log(f"    jobs phase, {step}: {human_bytes(found.bytes)} warm "
            f"({human_bytes(found.free)} free, {found.dead:,} dead rows; {found.live:,} "
            f"live checkpoints, {found.stubs:,} stubs, {found.threads:,} threads)")

    async def round_of_jobs(after_jobs: str, after_vacuum: str) -> None:
        began = time.perf_counter()
        done = await archive(backend, arena.cold, until_done, log)
        runs.append(done)
        if any(job.get("cut") for job in done.values()):
            log(f"    jobs phase: a job ran out of its {settings.jobs_seconds:g} s")
        await note(after_jobs, time.perf_counter() - began)
        await note(after_vacuum, await backend.vacuum())

    await note(JOB_STEPS[0], await backend.vacuum())
    await round_of_jobs(JOB_STEPS[1], JOB_STEPS[2])
    held = steps[0]["live_checkpoints"] + steps[0]["stubs"]
    stats = await arena.grow(held, settings)
    await note(JOB_STEPS[3], stats.seconds)
    await round_of_jobs(JOB_STEPS[4], JOB_STEPS[5])
    summary = reuse_summary(steps)
    log("    jobs phase: " + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()
                                      if v is not None))
    return {"steps": steps, "jobs": runs, "summary": summary,
            "loaded": dataclasses.asdict(stats)}


# -- one backend, every size ---------------------------------------------------------------


@dataclass(slots=True)
class SizeResult:
    size: int
    checkpoints: int
    archived: int
    threads: int
    load: dict[str, float]
    warm_bytes: int
    bytes_per_checkpoint: float
    warm_detail: dict[str, int]
    ops: dict[str, dict[str, float | int | None]]
    archive: dict[str, dict[str, Any]]
    after: dict[str, dict[str, float | int | None]]
    verified: int
    control_ops: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    control_after: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    loadavg: list[float] = field(default_factory=list)
    jobs: dict[str, Any] = field(default_factory=dict)


def backend_for(name: str, settings: Settings, tmp: Path, token: str, label: str) -> Backend:
    if name == "postgres":
        return Postgres(settings.postgres, f"{token}_{label}", settings.load_connections)
    return Sqlite(tmp / f"sqlite-{label}")


async def run_backend(name: str, settings: Settings, tmp: Path, token: str, *,
                      log: Callable[[str], None], made: list[Backend]) -> list[SizeResult]:
    """Every size on one backend; ``made`` collects the backends created (to drop them)."""
    offset = random.Random(settings.seed).random()
    arenas = [Arena(f"{name}", backend_for(name, settings, tmp, token, "store"),
                    tmp / f"{name}-cold", Sampler(settings, offset, settings.seed))]
    if settings.control:
        arenas.append(Arena(f"{name}-control", backend_for(name, settings, tmp, token, "ctl"),
                            tmp / f"{name}-control-cold",
                            Sampler(settings, offset, settings.seed + 1)))
    main = arenas[0]
    for arena in arenas:
        arena.cold.mkdir(parents=True, exist_ok=True)
        made.append(arena.backend)
        await arena.setup(settings, log)
    per = sum(t.checkpoints for t in main.templates) / len(main.templates)
    log(f"[{name}] {per:.1f} checkpoints and "
        f"{sum(t.rows for t in main.templates) / len(main.templates):.1f} rows per thread")
    if settings.control:
        control = arenas[1]
        await control.grow(settings.sizes[0] - control.held, settings)
        await control.backend.settle()
        log(f"[{name}] control store: {control.held:,} checkpoints, measured alongside")
    results: list[SizeResult] = []
    for size in settings.sizes:
        if settings.control:  # make up for the control's destroyed threads
            control = arenas[1]
            lost = len(control.sampler.gone) - control.replaced
            if lost:
                await control.grow(int(lost * per), settings)
                control.replaced = len(control.sampler.gone)
        stats = await main.grow(size - main.held, settings)
        settle = await main.backend.settle()
        rate = stats.rows / stats.seconds if stats.seconds else 0.0
        log(f"[{name}] {human_size(size)}: loaded {stats.threads:,} threads, "
            f"{stats.checkpoints:,} checkpoints, {stats.rows:,} rows in {stats.seconds:.1f} s "
            f"({rate:,.0f} rows/s, {stats.checkpoints / max(stats.seconds, 1e-9):,.0f} "
            f"checkpoints/s; {stats.making:.1f} s of it making rows); settle {settle:.1f} s")
        async with contextlib.AsyncExitStack() as stack:
            for arena in arenas:
                arena.saver = await stack.enter_async_context(open_saver(arena.backend,
                                                                         arena.cold))
            picks = main.sampler.take(settings.verify, unchanged=True)
            problems = await verify(main.live, main.templates, picks)
            if size == settings.sizes[0]:
                for arena in arenas[1:]:
                    problems += await verify(arena.live, arena.templates, arena.sampler.take(
                        settings.verify, unchanged=True))
            if problems:
                raise RuntimeError("loaded threads do not read back as their templates: "
                                   + "; ".join(problems[:5]))
            log(f"    verified {len(picks)} loaded threads against their templates")
            found = await main.backend.size()
            samples = await measure(arenas, settings, log)
            sized = await main.backend.size()
            archived: dict[str, dict[str, Any]] = {}
            after: Samples = {a.label: {} for a in arenas}
            if settings.archive_seconds > 0:
                archived = await archive(main.backend, main.cold, settings, log)
                after = await measure_after(arenas, settings)
            for arena in arenas:
                arena.saver = None
        control_label = arenas[1].label if settings.control else None
        results.append(SizeResult(
            size=size, checkpoints=found.checkpoints, archived=found.archived,
            threads=found.threads,
            load={"threads": stats.threads, "checkpoints": stats.checkpoints, "rows": stats.rows,
                  "seconds": stats.seconds, "making_rows_seconds": stats.making,
                  "rows_per_s": rate,
                  "checkpoints_per_s": stats.checkpoints / stats.seconds if stats.seconds else 0,
                  "settle_seconds": settle},
            warm_bytes=found.bytes, bytes_per_checkpoint=found.bytes / found.checkpoints,
            warm_detail=found.detail,
            ops={op: series_row(v) for op, v in samples[main.label].items()},
            archive=archived,
            after={op: series_row(v) for op, v in after[main.label].items()},
            verified=len(picks),
            control_ops=({op: series_row(v) for op, v in samples[control_label].items()}
                         if control_label else {}),
            control_after=({op: series_row(v) for op, v in after[control_label].items()
                            if v} if control_label else {}),
            loadavg=[round(x, 2) for x in os.getloadavg()]))
        row = results[-1]
        log(f"    {human_bytes(row.warm_bytes)} warm, {row.bytes_per_checkpoint:.0f} B/ckpt "
            f"({sized.checkpoints:,} checkpoints after the operations)")
        if size == settings.jobs_at:
            row.jobs = await jobs_phase(main, settings, log)
    return results


# -- report --------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _p50s(rows: Sequence[SizeResult], section: str, op: str) -> dict[int, float | None]:
    out: dict[int, float | None] = {}
    for r in rows:
        value = getattr(r, section).get(op, {}).get("p50")
        out[r.size] = None if value is None else float(value)
    return out


def _judge(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x" + (" ok" if ratio <= FLAT_TARGET
                                                       else " OVER")


def render(results: Mapping[str, Sequence[SizeResult]], info: Mapping[str, Any],
           settings: Settings) -> str:
    lines = [
        f"machine: nproc={info.get('nproc')} cpu={info.get('cpu')!r} "
        f"loadavg={info.get('loadavg')} python={info.get('python')} "
        f"langgraph={info.get('langgraph')}",
        f"tierstore: git {info.get('tierstore_git')}, sources sha256 "
        f"{info.get('tierstore_sources_sha256')}",
        f"workload: chat, {settings.templates} template threads, "
        f"{settings.message_bytes}-byte messages; {settings.samples} reads and lists, "
        f"{settings.write_samples} of each other operation per size"
        + (", each call alternating with the same call on the control store"
           if settings.control else "")
        + f"; {settings.workers} archive worker(s), {settings.archive_seconds:g} s per job",
        "",
    ]
    for backend, rows in results.items():
        if not rows:
            continue
        sizes = [r.size for r in rows]
        small, large = human_size(sizes[0]), human_size(sizes[-1])
        lines += [f"## {backend}", "",
                  "| | " + " | ".join(human_size(s) for s in sizes) + " |",
                  "|---|" + "---:|" * len(sizes)]

        def line(name: str, values: Sequence[Any], digits: int = 0,
                 lines: list[str] = lines) -> None:
            lines.append(f"| {name} | " + " | ".join(_fmt(v, digits) for v in values) + " |")

        line("checkpoints", [r.checkpoints for r in rows])
        line("threads", [r.threads for r in rows])
        line("load seconds", [r.load["seconds"] for r in rows], 1)
        line("load rows/s", [r.load["rows_per_s"] for r in rows])
        line("load checkpoints/s", [r.load["checkpoints_per_s"] for r in rows])
        line("warm bytes", [human_bytes(r.warm_bytes) for r in rows])
        line("B/ckpt", [r.bytes_per_checkpoint for r in rows])
        for job in ARCHIVE_JOBS:
            line(f"{job} checkpoints/s", [r.archive.get(job, {}).get("per_s") for r in rows])
        line("idle-archival threads/s",
             [r.archive.get("idle-archival", {}).get("threads_whole_per_s") for r in rows], 1)
        line("loadavg (1 min) after", [r.loadavg[0] if r.loadavg else None for r in rows], 2)
        lines += ["", "| operation (ms) | "
                  + " | ".join(f"{human_size(s)} p50 / p99" for s in sizes)
                  + f" | p50 {large} / {small} | same, over the control's |",
                  "|---|" + "---:|" * (len(sizes) + 2)]
        for section, ops in (("ops", OPERATIONS), ("after", AFTER)):
            for op in ops:
                cells = [getattr(r, section).get(op, {}) for r in rows]
                if not any(cells):
                    continue
                label = LABELS[op] + (" after archiving" if section == "after" and op in
                                      ("read", "list") else "")
                corrected = drift_corrected(_p50s(rows, section, op),
                                            _p50s(rows, f"control_{section}", op))
                lines.append(f"| {label} | " + " | ".join(
                    f"{_fmt(c.get('p50'), 2)} / {_fmt(c.get('p99'), 2)}" for c in cells)
                    + f" | {_judge(flatness(_p50s(rows, section, op)))}"
                    + f" | {_judge(corrected)} |")
        if any(r.control_ops for r in rows):
            lines += ["", f"control store ({small} checkpoints throughout), p50 ms: "
                      + "; ".join(f"{LABELS[op]} " + " / ".join(
                          _fmt(v, 2) for v in _p50s(rows, "control_ops", op).values())
                          for op in OPERATIONS)]
        lines.append("")
        for r in rows:
            if r.jobs:
                lines += render_jobs(r.size, r.jobs)
        per = rows[-1].bytes_per_checkpoint
        need = extrapolate(per, [10**4, 10**5, 10**6, 10**7])
        rate = statistics_mean([r.load["checkpoints_per_s"] for r in rows])
        lines.append(f"at {per:.0f} B/ckpt: " + ", ".join(
            f"{human_size(s)} {human_bytes(b)}" for s, b in need.items())
            + (f"; loading 1e7 at {rate:,.0f} checkpoints/s: {1e7 / rate / 60:.0f} min"
               if rate else ""))
        lines.append("")
    return "\n".join(lines) + "\n"


def render_jobs(size: int, jobs: Mapping[str, Any]) -> list[str]:
    """The jobs phase at ``size``: warm bytes at each step, then the ratios."""
    lines = [f"tiering jobs to completion at {human_size(size)} (then as much history "
             "again): warm bytes (tables + TOAST + indexes), free space in them",
             "",
             "| step | warm bytes | / before | free | used | dead rows | live checkpoints "
             "| stubs | threads | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    steps = jobs.get("steps", [])
    first = steps[0]["bytes"] if steps else 0
    for s in steps:
        lines.append(
            f"| {s['step']} | {human_bytes(s['bytes'])} | "
            f"{_fmt(s['bytes'] / first if first else None)}x | {human_bytes(s['free'])} | "
            f"{human_bytes(s['used'])} | {s['dead_rows']:,} | {s['live_checkpoints']:,} | "
            f"{s['stubs']:,} | {s['threads']:,} | {_fmt(s['seconds'], 1)} |")
    for n, run in enumerate(jobs.get("jobs", []), 1):
        lines.append("")
        lines.append(f"round {n}: " + "; ".join(
            f"{job} {r['moved']:,} checkpoints in {r['stopped_after']:.0f} s"
            + (" (time up)" if r.get("cut") else "")
            + (f", {r['failed']} failed" if r.get("failed") else "")
            for job, r in run.items()))
    summary = jobs.get("summary", {})
    if summary:
        lines += ["", "ratios: " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary.items())]
    return [*lines, ""]


def statistics_mean(values: Sequence[float]) -> float:
    values = [v for v in values if v]
    return sum(values) / len(values) if values else 0.0


def flatness_table(rows: Sequence[SizeResult]) -> dict[str, dict[str, float | None]]:
    """Per operation: p50 ratio largest / smallest size, raw and over the control's."""
    out: dict[str, dict[str, float | None]] = {}
    for section, ops in (("ops", OPERATIONS), ("after", AFTER)):
        for op in ops:
            name = op if section == "ops" else f"after_{op}"
            out[name] = {
                "raw": flatness(_p50s(rows, section, op)),
                "over_control": drift_corrected(_p50s(rows, section, op),
                                                _p50s(rows, f"control_{section}", op)),
            }
    return out


def plot(results: Mapping[str, Sequence[SizeResult]], path: Path) -> None:
    """Per backend: p50 (solid) and p99 (dotted) of each operation against store size,
    log-log; below, each p50 over the control store's p50 in the same moment, divided by
    that ratio at the smallest size (1 = flat; the target band up to 1.2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    shown = {b: rows for b, rows in results.items() if rows}
    cols = max(1, len(shown))
    fig, axes = plt.subplots(2, cols, figsize=(7.5 * cols, 10), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    colors = plt.get_cmap("tab20")
    series = [("ops", o) for o in OPERATIONS] + [("after", o) for o in AFTER[2:]]
    for col, (backend, rows) in enumerate(shown.items()):
        top, bottom = axes[0][col], axes[1][col]
        sizes = [r.size for r in rows]
        for n, (section, op) in enumerate(series):
            p50 = _p50s(rows, section, op)
            if all(v is None for v in p50.values()):
                continue
            color = colors(n % 20)
            top.plot(sizes, [math.nan if v is None else v for v in p50.values()], "o-",
                     color=color, label=LABELS[op])
            top.plot(sizes, [math.nan if (v := getattr(r, section).get(op, {}).get("p99"))
                             is None else v for r in rows], ":", color=color, alpha=0.5)
            control = _p50s(rows, f"control_{section}", op)
            ratios = [drift_corrected({sizes[0]: p50[sizes[0]], s: p50[s]},
                                      {sizes[0]: control.get(sizes[0]), s: control.get(s)})
                      for s in sizes[1:]]
            if any(v is not None for v in ratios):
                bottom.plot(sizes, [1.0, *(math.nan if v is None else v for v in ratios)],
                            "o-", color=color, label=LABELS[op])
        top.set_title(f"tierstore {backend} warm tier: latency vs store size")
        top.set_ylabel("ms (p50 solid, p99 dotted)")
        top.set_yscale("log")
        top.legend(fontsize=7, loc="upper left")
        bottom.axhspan(0, FLAT_TARGET, color="green", alpha=0.07)
        bottom.axhline(1.0, color="grey", linewidth=0.8)
        bottom.set_ylabel("p50 / control p50, relative to the smallest size")
        bottom.set_yscale("log")
        bottom.yaxis.set_major_locator(FixedLocator(RATIO_TICKS))
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        bottom.yaxis.set_minor_formatter(NullFormatter())
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_xlabel("checkpoints in the store")
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    d = Settings()
    p = argparse.ArgumentParser(
        description="tierstore at 10^4 .. 10^7 checkpoints: latency of every saver call, "
                    "warm bytes and archive throughput against store size",
        epilog="Disk: about 2.3 KB (PostgreSQL) / 4.0 KB (SQLite) of warm store per "
               "checkpoint: 1e6 ~2.3 / ~4 GB, 1e7 ~23 / ~40 GB. Loading: ~15,000-25,000 "
               "checkpoints/s on 2 cores (a minute per 1e6). See the module docstring "
               "and loadtest/README.md.")
    p.add_argument("--sizes", default=",".join(str(s) for s in d.sizes),
                   help="store sizes in checkpoints, ascending, grown in one store "
                        "(e.g. 1e4,1e5,1e6,1e7)")
    p.add_argument("--backends", default=",".join(d.backends), help="postgres,sqlite")
    p.add_argument("--templates", type=int, default=d.templates,
                   help="template threads run through the graph (3..5 turns each)")
    p.add_argument("--message-bytes", type=int, default=d.message_bytes)
    p.add_argument("--samples", type=int, default=d.samples,
                   help="latest reads and lists at each size")
    p.add_argument("--write-samples", type=int, default=d.write_samples,
                   help="turns, copies, deletes, delete_for_runs and prunes at each size")
    p.add_argument("--verify", type=int, default=d.verify,
                   help="loaded threads read back and compared with their template per size")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="archive worker processes running at once")
    p.add_argument("--archive-seconds", type=float, default=d.archive_seconds,
                   help="time each archiving job gets at each size (0: no archiving)")
    p.add_argument("--max-age-days", type=float, default=d.max_age_days)
    p.add_argument("--archive-after-days", type=float, default=d.archive_after_days)
    p.add_argument("--idle-after-days", type=float, default=d.idle_after_days)
    p.add_argument("--chunk", type=int, default=d.chunk, help="threads per COPY / transaction")
    p.add_argument("--load-connections", type=int, default=d.load_connections,
                   help="PostgreSQL connections loading at once")
    p.add_argument("--postgres", default=d.postgres,
                   help="server for the database this run creates (and drops)")
    p.add_argument("--no-control", action="store_true",
                   help="no control store (one of the smallest size, measured alongside the "
                        "growing one to divide out what the machine does meanwhile)")
    p.add_argument("--jobs-at", default=None, metavar="SIZE",
                   help="at this size (the largest of --sizes) run the tiering jobs to "
                        "completion, VACUUM, write as much history again and repeat, "
                        "measuring warm bytes and free space at each step")
    p.add_argument("--jobs-seconds", type=float, default=d.jobs_seconds,
                   help="time each job gets per round of the jobs phase")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--png", default=None, metavar="PATH")
    args = p.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        p.error(str(exc))
    jobs_at = None
    if args.jobs_at is not None:
        try:
            (jobs_at,) = parse_sizes(args.jobs_at)
        except ValueError as exc:
            p.error(f"--jobs-at: {exc}")
        if jobs_at != sizes[-1]:
            p.error("--jobs-at must be the largest of --sizes (the jobs archive the store)")
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if not backends or any(b not in ("postgres", "sqlite") for b in backends):
        p.error("--backends takes postgres and/or sqlite")
    if min(args.templates, args.samples, args.write_samples, args.workers, args.chunk,
           args.load_connections) < 1:
        p.error("--templates, --samples, --write-samples, --workers, --chunk and "
                "--load-connections must be positive")
    if not 0 < args.archive_after_days < args.idle_after_days < args.max_age_days:
        p.error("need 0 < --archive-after-days < --idle-after-days < --max-age-days")
    settings = Settings(
        sizes=tuple(sizes), backends=backends, templates=args.templates,
        message_bytes=args.message_bytes, samples=args.samples,
        write_samples=args.write_samples, verify=args.verify, workers=args.workers,
        archive_seconds=args.archive_seconds, max_age_days=args.max_age_days,
        archive_after_days=args.archive_after_days, idle_after_days=args.idle_after_days,
        chunk=args.chunk, load_connections=args.load_connections,
        postgres=loopback(args.postgres), seed=args.seed, control=not args.no_control,
        jobs_at=jobs_at, jobs_seconds=args.jobs_seconds)
    return settings, args


async def main_async(settings: Settings, tmp: Path) -> dict[str, Any]:
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # a run stopped by SIGTERM / SIGHUP (e.g. `timeout`) still drops what it created
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGTERM, signal.SIGHUP):
        asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
    # the benchmark's machine line (loadtest/ is on the path when run as a script; a
    # static import would bring bench_phases' top-level `workload` into the type check)
    info: dict[str, Any] = importlib.import_module("bench_report").machine()
    results: dict[str, list[SizeResult]] = {}
    token = secrets.token_hex(4)
    for name in settings.backends:
        made: list[Backend] = []
        try:
            results[name] = await run_backend(name, settings, tmp, token, log=log, made=made)
        finally:
            for backend in made:
                await backend.drop()
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "machine": info,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "postgres"},
        "results": {b: [dataclasses.asdict(r) for r in rows] for b, rows in results.items()},
        "flatness": {b: flatness_table(rows) for b, rows in results.items()},
        "flat_target": FLAT_TARGET,
        "_rows": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="tierstore-scale-"))
    try:
        doc = asyncio.run(main_async(settings, tmp))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("stopped; the database and files of this run were removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows: dict[str, list[SizeResult]] = doc.pop("_rows")
    print(render(rows, doc["machine"], settings), end="", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if args.png:
        plot(rows, Path(args.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
