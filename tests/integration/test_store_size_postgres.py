"""PostgreSQL: every request-path operation costs the same in a store of a dozen other
threads as in one of three thousand (``store_size`` describes the thread and the ops).

The cost is the shared buffers the operation's statements touched (hits plus reads,
summed by ``pg_stat_statements`` over every statement it ran, functions included),
on a private server started with the extension preloaded and autovacuum off, so
nothing else runs and statistics change only when the test runs ``ANALYZE``. One
connection serves the saver (``max_size=1``): every statement is prepared and every
function compiled in the warm-up, not in the measured call. The cold tier is a
directory, whose listings are counted as well, and so are the lines of tierstore's
Python each operation runs.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.integration.store_size import (
    FEW,
    MANY,
    OPERATIONS,
    OPTIONS,
    Figures,
    assert_flat,
    build_thread,
    fill_object_dirs,
    measure_operation,
    report,
    run_operation,
)
from tests.servers.postgres import PrivateCluster
from tierstore import TieredSaver

TEMPLATES = 4
"""Threads written through the saver; the other threads are copies of them."""

WARM_UP = 6
"""Runs of each operation before any is counted: every statement prepared, every
function compiled, and past the five executions after which PostgreSQL may keep one
generic plan for a prepared statement (made while the tables are small)."""

_COPY_HEADS = """
INSERT INTO tierstore_heads (version, conflicts, updated_at, n_writes, thread_id,
                             checkpoint_ns, head_id)
SELECT h.version, 0, h.updated_at, h.n_writes, 'other-' || n.i || '/' || h.thread_id,
       h.checkpoint_ns, h.head_id
  FROM generate_series($1::int, $2::int) AS n(i)
  JOIN tierstore_heads AS h ON h.thread_id = 'tpl-' || (n.i % $3)
"""
_MAP = """
CREATE TEMP TABLE copies ON COMMIT DROP AS
SELECT d.sid AS dst, s.sid AS src, split_part(d.thread_id, '/', 1) AS tag
  FROM tierstore_heads AS d
  JOIN tierstore_heads AS s
    ON s.thread_id = substr(d.thread_id, strpos(d.thread_id, '/') + 1)
   AND s.checkpoint_ns = d.checkpoint_ns
 WHERE d.thread_id LIKE 'other-%' AND d.sid > {top:d}
"""
_COPY_ROWS = ["""
INSERT INTO tierstore_checkpoints (sid, created_at, accessed_at, size_bytes, checkpoint_id,
       parent_id, run_id, checkpoint_tag, checkpoint, metadata_tag, metadata,
       channel_versions, filter_doc, archive_key)
SELECT m.dst, c.created_at, c.accessed_at, c.size_bytes, c.checkpoint_id, c.parent_id,
       m.tag || '/' || c.run_id, c.checkpoint_tag, c.checkpoint, c.metadata_tag, c.metadata,
       c.channel_versions, c.filter_doc, c.archive_key || '.' || m.tag
  FROM tierstore_checkpoints AS c JOIN copies AS m ON c.sid = m.src
""", """
INSERT INTO tierstore_blobs (sid, channel, version, tag, data)
SELECT m.dst, b.channel, b.version, b.tag, b.data
  FROM tierstore_blobs AS b JOIN copies AS m ON b.sid = m.src
""", """
INSERT INTO tierstore_writes (sid, idx, checkpoint_id, task_id, channel, tag, data, task_path)
SELECT m.dst, w.idx, w.checkpoint_id, w.task_id, w.channel, w.tag, w.data, w.task_path
  FROM tierstore_writes AS w JOIN copies AS m ON w.sid = m.src
"""]


async def _fill(conn: asyncpg.Connection[Any], first: int, last: int) -> list[str]:
    """Copies ``first``..``last`` of the template threads; returns their thread ids."""
    top = await conn.fetchval("SELECT coalesce(max(sid), 0) FROM tierstore_heads")
    async with conn.transaction():
        await conn.execute(_COPY_HEADS, first, last, TEMPLATES)
        await conn.execute(_MAP.format(top=int(top)))  # no parameters in DDL
        for statement in _COPY_ROWS:
            await conn.execute(statement)
    rows = await conn.fetch("SELECT DISTINCT thread_id FROM tierstore_heads WHERE sid > $1",
                            top)
    return [r[0] for r in rows]


class Buffers:
    """Shared buffers touched by the statements of the test database, per measured call."""

    def __init__(self, conn: asyncpg.Connection[Any]) -> None:
        self.conn = conn

    async def __call__(self, call: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
        await self.conn.execute("SELECT pg_stat_statements_reset()")
        result = await call()
        rows = await self.conn.fetch(
            "SELECT query, shared_blks_hit + shared_blks_read FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND query NOT LIKE '%pg_stat_statements%'")
        return result, sum(int(r[1]) for r in rows)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    server = PrivateCluster()
    try:
        server.start(shared_preload_libraries="pg_stat_statements", autovacuum="off",
                     **{"pg_stat_statements.track": "top"})
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
async def figures(cluster: PrivateCluster, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[Figures]:
    """Each operation's cost per phase: ``few`` (a small store), ``grown`` (thousands of
    threads more, plans still those made on the small store: no ``ANALYZE`` since),
    ``many`` (the same store analyzed, plans made anew)."""
    tmp: Path = tmp_path_factory.mktemp("store-size-postgres")
    admin = await asyncpg.connect(cluster.url)
    await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    warm = f"{cluster.url}?min_size=1&max_size=1"
    out: Figures = {name: {} for name in OPERATIONS}
    meter = Buffers(admin)
    try:
        async with TieredSaver.from_urls(hot=None, warm=warm, cold=f"file://{tmp}/cold",
                                         **OPTIONS) as saver:
            for i in range(TEMPLATES):
                await build_thread(saver, f"tpl-{i}")
            fill_object_dirs(tmp / "cold", await _fill(admin, 1, FEW))
            await admin.execute("ANALYZE")
            await _warm_up(saver, "few")
            await _measure(saver, meter, "few", out)
            fill_object_dirs(tmp / "cold", await _fill(admin, FEW + 1, MANY))
            await _measure(saver, meter, "grown", out)
            await admin.execute("ANALYZE")
            await _warm_up(saver, "many")
            await _measure(saver, meter, "many", out)
        report(out, "buffers")
        yield out
    finally:
        await admin.close()


async def _warm_up(saver: TieredSaver, phase: str) -> None:
    for name in OPERATIONS:
        for i in range(WARM_UP):
            t = await build_thread(saver, f"warm-{phase}-{name}-{i}")
            await run_operation(saver, name, t, lambda call: call())


async def _measure(saver: TieredSaver, meter: Buffers, phase: str, out: Figures) -> None:
    for name in OPERATIONS:
        t = await build_thread(saver, f"{phase}-{name}-{uuid.uuid4().hex[:6]}")
        out[name][phase] = await measure_operation(saver, name, t, meter)


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_cost_follows_the_thread_not_the_store(figures: Figures, name: str) -> None:
    assert_flat(figures, name, unit="buffers", sizes={"few": FEW, "grown": MANY, "many": MANY})
