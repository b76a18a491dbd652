"""Thread administration: delete, delete by run, copy, publish, prune; usage; the
conversion of the tables to hash partitions.

Each change is one transaction that takes the head rows it changes first (a put in
flight commits before it goes on, a later put waits for it; several heads are
locked in ``sid`` order, so two of them cannot deadlock), then changes rows and
recomputes the heads (``sql.refresh``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from tierstore.errors import ConfigurationError, InvalidInput, TierstoreError
from tierstore.records import TierUsage
from tierstore.tiers.base import WarmAdmin
from tierstore.tiers.postgres.connect import resolve
from tierstore.tiers.postgres.migrations import abandon_conversion, convert_layout
from tierstore.tiers.postgres.partitions import Conversion, Phase, Progress, Tuning
from tierstore.tiers.postgres.pool import PostgresPool
from tierstore.tiers.postgres.sql import (
    DELETE_STREAMS,
    DELETE_THREADS,
    DELETE_WRITES_OF,
    THREADS,
    Conn,
    quote_ident,
    refresh,
)

T = TypeVar("T")

_LOCK_STREAMS = (
    "SELECT sid FROM tierstore_heads WHERE sid = ANY($1::bigint[]) ORDER BY sid "
    "FOR NO KEY UPDATE"
)

_COPY_CHECKPOINTS = """
INSERT INTO tierstore_checkpoints AS t
SELECT m.dst, c.created_at, c.accessed_at, c.size_bytes, c.checkpoint_id, c.parent_id,
       c.run_id, c.checkpoint_tag, c.checkpoint, c.metadata_tag, c.metadata,
       c.channel_versions, c.filter_doc, c.archive_key
  FROM tierstore_checkpoints AS c
  JOIN unnest($1::bigint[], $2::bigint[]) AS m(src, dst) ON c.sid = m.src
ON CONFLICT (sid, checkpoint_id) DO UPDATE SET
    created_at = excluded.created_at, accessed_at = excluded.accessed_at,
    size_bytes = excluded.size_bytes, parent_id = excluded.parent_id, run_id = excluded.run_id,
    checkpoint_tag = excluded.checkpoint_tag, checkpoint = excluded.checkpoint,
    metadata_tag = excluded.metadata_tag, metadata = excluded.metadata,
    channel_versions = excluded.channel_versions, filter_doc = excluded.filter_doc,
    archive_key = excluded.archive_key
"""
_COPY_BLOBS = """
INSERT INTO tierstore_blobs
SELECT m.dst, b.channel, b.version, b.tag, b.data
  FROM tierstore_blobs AS b
  JOIN unnest($1::bigint[], $2::bigint[]) AS m(src, dst) ON b.sid = m.src
ON CONFLICT DO NOTHING
"""
_COPY_WRITES = """
INSERT INTO tierstore_writes
SELECT m.dst, w.idx, w.checkpoint_id, w.task_id, w.channel, w.tag, w.data, w.task_path
  FROM tierstore_writes AS w
  JOIN unnest($1::bigint[], $2::bigint[]) AS m(src, dst) ON w.sid = m.src
ON CONFLICT (sid, checkpoint_id, task_id, idx) DO UPDATE SET
    channel = excluded.channel, tag = excluded.tag, data = excluded.data,
    task_path = excluded.task_path
"""

_USAGE = """
SELECT (SELECT count(DISTINCT thread_id) FROM tierstore_heads WHERE head_id IS NOT NULL),
       count(*) FILTER (WHERE archive_key IS NULL),
       count(*) FILTER (WHERE archive_key IS NOT NULL),
       coalesce(sum(size_bytes) FILTER (WHERE archive_key IS NULL), 0)
       + (SELECT coalesce(sum(octet_length(data)), 0) FROM tierstore_blobs)
       + (SELECT coalesce(sum(octet_length(data)), 0) FROM tierstore_writes)
  FROM tierstore_checkpoints
"""


async def _target_streams(conn: Conn, thread_id: str, namespaces: Sequence[str]
                          ) -> dict[str, int]:
    """Namespace -> head row id of ``thread_id``, creating the rows ``namespaces`` lack."""
    await conn.execute(
        "INSERT INTO tierstore_heads (thread_id, checkpoint_ns) "
        "SELECT $1, ns FROM unnest($2::text[]) AS ns ON CONFLICT DO NOTHING",
        thread_id, list(namespaces),
    )
    rows = await conn.fetch(
        f"SELECT h.sid, h.checkpoint_ns FROM tierstore_heads AS h WHERE {THREADS}",
        [thread_id],
    )
    return {r[1]: r[0] for r in rows}


async def _copy_streams(conn: Conn, src: Sequence[int], dst: Sequence[int]) -> None:
    """Copy checkpoints, blobs and writes of each source stream into its target stream."""
    await conn.execute(_COPY_CHECKPOINTS, list(src), list(dst))
    await conn.execute(_COPY_BLOBS, list(src), list(dst))
    await conn.execute(_COPY_WRITES, list(src), list(dst))


class PostgresAdmin(PostgresPool, WarmAdmin):
    """Whole-thread changes and usage: callers outside the request path."""

    async def delete_thread(self, thread_id: str) -> None:
        await self._delete_threads([thread_id], "delete_thread")

    async def _delete_threads(self, thread_ids: Sequence[str], action: str) -> None:
        async def body(conn: Conn) -> None:
            async with conn.transaction():
                # Deleting the head rows first waits for puts in flight and makes
                # later puts start new namespaces, so the next statement sees all.
                sids = [r[0] for r in await conn.fetch(DELETE_THREADS, list(thread_ids))]
                if sids:
                    await conn.execute(DELETE_STREAMS, sids)

        await self._run(action, body)

    async def delete_for_runs(self, run_ids: Sequence[str]) -> Sequence[str]:
        if not run_ids:
            return []

        async def body(conn: Conn) -> list[str]:
            async with conn.transaction():
                rows = await conn.fetch(
                    "SELECT DISTINCT sid FROM tierstore_checkpoints WHERE run_id = ANY($1)",
                    list(run_ids),
                )
                if not rows:
                    return []
                sids = [r[0] for r in await conn.fetch(_LOCK_STREAMS, [r[0] for r in rows])]
                doomed = await conn.fetch(
                    "DELETE FROM tierstore_checkpoints WHERE sid = ANY($1::bigint[]) "
                    "AND run_id = ANY($2::text[]) RETURNING sid, checkpoint_id",
                    sids, list(run_ids),
                )
                if not doomed:
                    return []
                touched = sorted({r[0] for r in doomed})
                await conn.execute(DELETE_WRITES_OF, [r[0] for r in doomed],
                                   [r[1] for r in doomed])
                threads = await conn.fetch(
                    "SELECT DISTINCT thread_id FROM tierstore_heads WHERE sid = ANY($1)", touched
                )
                await refresh(conn, touched)
                return sorted(r[0] for r in threads)

        return await self._run("delete_for_runs", body)

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        async def body(conn: Conn) -> None:
            async with conn.transaction():
                source = await conn.fetch(
                    f"SELECT h.sid, h.checkpoint_ns FROM tierstore_heads AS h WHERE {THREADS}",
                    [source_thread_id],
                )
                if not source:
                    return
                namespaces = [r[1] for r in source]
                by_ns = await _target_streams(conn, target_thread_id, namespaces)
                src = [r[0] for r in source]
                dst = [by_ns[ns] for ns in namespaces]
                # Source and target heads together, in one order: no put sneaks in
                # between, and two copies in opposite directions cannot deadlock.
                await conn.execute(_LOCK_STREAMS, src + dst)
                await _copy_streams(conn, src, dst)
                await refresh(conn, dst)

        await self._run("copy_thread", body)

    async def publish_thread(self, source_thread_id: str, target_thread_id: str, *,
                             replace: bool) -> None:
        async def body(conn: Conn) -> None:
            async with conn.transaction():
                src = [r[0] for r in await conn.fetch(
                    f"SELECT h.sid FROM tierstore_heads AS h WHERE {THREADS}",
                    [source_thread_id])]
                namespaces = [r[0] for r in await conn.fetch(
                    "SELECT checkpoint_ns FROM tierstore_heads WHERE sid = ANY($1::bigint[])",
                    src)]
                # Claim the target's heads first: a put in flight commits before this
                # goes on (the insert waits on its row), a later one waits for this.
                by_ns = await _target_streams(conn, target_thread_id, namespaces)
                target = list(by_ns.values())
                await conn.execute(_LOCK_STREAMS, src + target)
                taken = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM tierstore_checkpoints "
                    "WHERE sid = ANY($1::bigint[]))", target)
                if taken and not replace:
                    raise InvalidInput(
                        f"thread {target_thread_id[:200]!r} already exists; import it under "
                        "another id (--as-thread) or replace it (--replace)")
                # nothing of the target stays: leftovers (rows no checkpoint names) included
                await conn.execute(DELETE_STREAMS, target)
                await _copy_streams(conn, src, [by_ns[ns] for ns in namespaces])
                await refresh(conn, target)

        await self._run("publish_thread", body)

    async def prune(self, thread_ids: Sequence[str], *, keep_latest: bool) -> None:
        if not thread_ids:
            return
        if not keep_latest:
            await self._delete_threads(thread_ids, "prune")
            return

        async def body(conn: Conn) -> None:
            async with conn.transaction():
                rows = await conn.fetch(
                    f"SELECT h.sid FROM tierstore_heads AS h WHERE {THREADS}", list(thread_ids)
                )
                if not rows:
                    return
                sids = [r[0] for r in await conn.fetch(_LOCK_STREAMS, [r[0] for r in rows])]
                doomed = await conn.fetch(
                    "DELETE FROM tierstore_checkpoints AS c WHERE c.sid = ANY($1::bigint[]) "
                    "AND c.checkpoint_id < (SELECT max(l.checkpoint_id) FROM "
                    "tierstore_checkpoints AS l WHERE l.sid = c.sid) "
                    "RETURNING c.sid, c.checkpoint_id",
                    sids,
                )
                if doomed:
                    await conn.execute(DELETE_WRITES_OF, [r[0] for r in doomed],
                                       [r[1] for r in doomed])
                    await refresh(conn, sorted({r[0] for r in doomed}))

        await self._run("prune", body)

    async def usage(self) -> TierUsage:
        async def body(conn: Conn) -> asyncpg.Record:
            row = await conn.fetchrow(_USAGE)
            assert row is not None
            return row

        threads, live, archived, size = await self._run("usage", body, read=True)
        return TierUsage(threads=threads, checkpoints=live, archived=archived, bytes=int(size))

    # -- the layout -------------------------------------------------------------------------

    async def partition(self, partitions: int, *, tuning: Tuning | None = None,
                        progress: Progress | None = None,
                        phase: Phase | None = None) -> Conversion:
        """Hash-partition the tables into ``partitions`` by thread while the store stays in
        use: copy in batches, catch up what changed meanwhile, swap under a brief lock
        (``partitions.py``). Resumes a conversion that stopped; a store already laid out
        so is left alone, one partitioned into another count refused.

        Runs on a connection of its own, so the store need not be open: a store whose URL
        asks for ``partitions`` refuses to open until its data is converted.
        """

        async def body(conn: Conn) -> Conversion:
            return await convert_layout(conn, url=self.url, schema=self.schema,
                                        setup_timeout=self.setup_timeout,
                                        partitions=partitions, tuning=tuning,
                                        progress=progress, phase=phase)

        return await self._on_own_connection("partition", body)

    async def abandon_partitioning(self) -> bool:
        """Remove what an unfinished conversion made (its triggers note every change until
        then); the tables stay plain. Returns whether there was one."""

        async def body(conn: Conn) -> bool:
            return await abandon_conversion(conn, url=self.url, schema=self.schema,
                                            setup_timeout=self.setup_timeout)

        return await self._on_own_connection("abandon_partitioning", body)

    async def _on_own_connection(self, action: str, body: Callable[[Conn], Awaitable[T]]) -> T:
        """``body`` on a one-connection pool of its own, with no statement timeout (index
        builds take what they take; the conversion bounds its waits for locks)."""
        if self._given is not None:
            raise ConfigurationError(
                f"postgres warm tier {self.url}: {action} opens a connection of its own and "
                "needs the database URL; run it on a store built from the URL (or "
                "`tierstore migrate`), not on one given a pool"
            )
        if self.pooler is not None:
            raise ConfigurationError(
                f"postgres warm tier {self.url}: {action} holds the migration lock across "
                f"transactions, which a pooler in transaction mode (pooler={self.pooler}) "
                "cannot keep on one server connection; run `tierstore migrate` with the "
                "server's own URL (without pooler) instead")
        settings = {"jit": "off", "application_name": f"tierstore {action}"}
        if self.schema is not None:
            settings["search_path"] = quote_ident(self.schema)
        try:
            connector = await asyncio.to_thread(resolve, self._dsn, settings)
            hook: dict[str, Any] = {} if connector is None else {"connect": connector}
            async with asyncpg.create_pool(
                self._dsn, **hook, min_size=1, max_size=1, command_timeout=None,
                timeout=self.connect_timeout, statement_cache_size=0,
                server_settings=settings,
            ) as pool, pool.acquire(timeout=self.connect_timeout) as conn:
                return await body(conn)
        except TierstoreError:
            raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                OSError, TimeoutError) as exc:
            raise self._translate(exc, action) from exc
