"""``sqlite:///path.db`` — the embedded warm tier, and the reference ``WarmStore``.

Four modules, by concern::

    tiers/sqlite_base.py       one connection on one thread, schema, lifecycle, row upkeep
    tiers/sqlite_tiering.py    WarmTiering: claims, expiry, archive stubs (the jobs)
    tiers/sqlite.py            SqliteWarm: URL options, the request path, admin, usage
    tiers/sqlite_ancestors.py  ``ancestors``: the parent chain a DeltaChannel rebuild reads

Every operation is one function run on the store's single worker thread inside one
transaction (see ``sqlite_base``): that is what makes the head compare-and-set and
the lease fence check atomic without a lock in Python.

URL options: ``?synchronous=full`` (default: a commit survives power loss) or
``normal`` (survives a process crash; faster), ``?timeout=30`` (seconds to wait
for another process's write lock). Any other option is refused by name, so a typo
(``?synchronus=normal``) cannot silently leave the default in force.

Reads cost what they return: a checkpoint's blobs are found by primary key from its
own ``channel_versions`` (never by scanning the thread's blobs), and a page of a
listing is one index range, so listing a thread is linear in its length.
"""

from __future__ import annotations

import builtins
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from tierstore.errors import (
    ConfigurationError,
    InvalidInput,
    LeaseLost,
    MissingBlobs,
    VersionConflict,
)
from tierstore.policy import fence_key, fenced_out, first_version
from tierstore.records import (
    BlobRecord,
    ChainLink,
    CheckpointRecord,
    Head,
    ListQuery,
    Payload,
    PutResult,
    StoredCheckpoint,
    TierUsage,
    WriteRecord,
)
from tierstore.settings import StoreUrl
from tierstore.tiers.base import WarmStore
from tierstore.tiers.sqlite_ancestors import walk_ancestors
from tierstore.tiers.sqlite_tiering import SqliteTiering

__all__ = ["SqliteWarm"]

T = TypeVar("T")

_PAGE = 200
_OPTIONS = frozenset({"synchronous", "timeout"})
_COLUMNS = (
    "thread_id, checkpoint_ns, checkpoint_id, parent_id, checkpoint_tag, checkpoint, "
    "metadata_tag, metadata, channel_versions, location, archive_key"
)


def _json_type(value: Any) -> tuple[str, ...]:
    """The ``json_each.type`` values that a scalar filter value may match."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("true",) if value else ("false",)
    if isinstance(value, float):
        return ("real", "integer")
    if isinstance(value, int):
        return ("integer", "real")
    return ("text",)


class SqliteWarm(SqliteTiering, WarmStore):
    """Warm tier on one SQLite file."""

    backend = "sqlite"

    @classmethod
    def from_url(cls, url: StoreUrl) -> SqliteWarm:
        unknown = sorted(set(url.query) - _OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"{url.masked!r}: unknown sqlite option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(_OPTIONS))}")
        try:
            timeout = float(url.option("timeout", "30") or 30)
        except ValueError as exc:
            raise ConfigurationError(f"{url.masked!r}: timeout must be a number") from exc
        if not (math.isfinite(timeout) and timeout >= 0):
            raise ConfigurationError(
                f"{url.masked!r}: timeout must be a finite number of seconds >= 0")
        return cls(
            url.local_path(),
            synchronous=(url.option("synchronous", "full") or "full").lower(),
            timeout=timeout,
        )

    # -- reads ------------------------------------------------------------------------

    async def head(self, thread_id: str, checkpoint_ns: str) -> Head | None:
        def fn(conn: sqlite3.Connection) -> Head | None:
            row = conn.execute(
                "SELECT head_id, version, n_writes FROM heads "
                "WHERE thread_id = ? AND checkpoint_ns = ?",
                (thread_id, checkpoint_ns),
            ).fetchone()
            return Head(row[0], row[1], row[2]) if row else None

        return await self._run(fn)

    async def get(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> StoredCheckpoint | None:
        def fn(conn: sqlite3.Connection) -> StoredCheckpoint | None:
            if checkpoint_id is None:
                return self._read_tx(conn, latest)
            else:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM checkpoints WHERE thread_id = ? AND "
                    "checkpoint_ns = ? AND checkpoint_id = ?",
                    (thread_id, checkpoint_ns, checkpoint_id),
                ).fetchone()
            return self._assemble(conn, row) if row else None

        def latest(conn: sqlite3.Connection) -> StoredCheckpoint | None:
            # One read transaction: the head version comes from the same snapshot as
            # the checkpoint, so a hot fill never puts an old state under a new version.
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM checkpoints WHERE thread_id = ? AND "
                "checkpoint_ns = ? ORDER BY checkpoint_id DESC LIMIT 1",
                (thread_id, checkpoint_ns),
            ).fetchone()
            if not row:
                return None
            record = self._assemble(conn, row)
            head = conn.execute(
                "SELECT version FROM heads WHERE thread_id = ? AND checkpoint_ns = ? "
                "AND head_id = ?",
                (thread_id, checkpoint_ns, record.checkpoint_id),
            ).fetchone()
            return replace(record, version=int(head[0])) if head else record

        return await self._run(fn)

    @staticmethod
    def _read_tx(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one deferred (read) transaction: one snapshot of the file."""
        conn.execute("BEGIN")
        try:
            return body(conn)
        finally:
            conn.execute("COMMIT")

    @staticmethod
    def _assemble(conn: sqlite3.Connection, row: Sequence[Any]) -> StoredCheckpoint:
        (thread_id, ns, cid, parent_id, cp_tag, cp, md_tag, md, versions, location,
         archive_key) = row
        # CROSS JOIN fixes the loop order (SQLite never reorders it): one primary-key
        # lookup per channel the checkpoint names. With a plain JOIN the planner put
        # the thread's blobs outside and re-scanned json_each for each, so a read cost
        # grew with the thread's whole history (quadratic over a listing).
        blobs = {
            channel: Payload(tag, bytes(data))
            for channel, tag, data in conn.execute(
                "SELECT b.channel, b.tag, b.data FROM json_each(?) AS cv CROSS JOIN blobs AS b "
                "ON b.thread_id = ? AND b.checkpoint_ns = ? AND b.channel = cv.key "
                "AND b.version = cv.value",
                (versions, thread_id, ns),
            )
        }
        # Every version a live checkpoint names has a blob here (``EMPTY`` included),
        # so a channel without one was lost: say so rather than return a partial state.
        named = json.loads(versions or "{}") if location == "warm" else {}
        missing = tuple(sorted(ch for ch in named if ch not in blobs)) \
            if len(named) > len(blobs) else ()
        writes = tuple(
            WriteRecord(task_id, idx, channel, Payload(tag, bytes(data)), task_path)
            for task_id, idx, channel, tag, data, task_path in conn.execute(
                "SELECT task_id, idx, channel, tag, data, task_path FROM writes "
                "WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ? "
                "ORDER BY task_path, task_id, idx",
                (thread_id, ns, cid),
            )
        )
        return StoredCheckpoint(
            thread_id=thread_id,
            checkpoint_ns=ns,
            checkpoint_id=cid,
            parent_id=parent_id,
            checkpoint=Payload(cp_tag or "", bytes(cp or b"")),
            metadata=Payload(md_tag, bytes(md)),
            blobs=blobs,
            writes=writes,
            location=location,
            archive_key=archive_key,
            missing=missing,
        )

    async def list(self, query: ListQuery) -> AsyncIterator[StoredCheckpoint]:
        where: list[str] = []
        params: list[Any] = []
        if query.thread_id is not None:
            where.append("thread_id = ?")
            params.append(query.thread_id)
        if query.checkpoint_ns is not None:
            where.append("checkpoint_ns = ?")
            params.append(query.checkpoint_ns)
        if query.checkpoint_id is not None:
            where.append("checkpoint_id = ?")
            params.append(query.checkpoint_id)
        if query.before_id is not None:
            where.append("checkpoint_id < ?")
            params.append(query.before_id)
        for key, value in query.filter.items():
            types = _json_type(value)
            clause = (
                "EXISTS (SELECT 1 FROM json_each(filter_doc) AS f WHERE f.key = ? AND f.type IN "
                f"({', '.join('?' for _ in types)})"
            )
            params.extend([key, *types])
            if value is not None and not isinstance(value, bool):
                clause += " AND f.atom = ?"
                params.append(value)
            where.append(clause + ")")
        remaining = query.limit
        cursor: tuple[str, str, str] | None = None
        while remaining is None or remaining > 0:
            page = _PAGE if remaining is None else min(_PAGE, remaining)
            conds = list(where)
            page_params = list(params)
            if cursor is not None and query.thread_id is not None:
                # Within one thread the order is (checkpoint_id, checkpoint_ns): a range
                # of the checkpoints_thread_order index, so each page costs its own rows.
                conds.append("(checkpoint_id, checkpoint_ns) < (?, ?)")
                page_params.extend((cursor[0], cursor[2]))
            elif cursor is not None:
                conds.append("(checkpoint_id, thread_id, checkpoint_ns) < (?, ?, ?)")
                page_params.extend(cursor)
            sql = (
                f"SELECT {_COLUMNS} FROM checkpoints"
                + (f" WHERE {' AND '.join(conds)}" if conds else "")
                + " ORDER BY checkpoint_id DESC, thread_id DESC, checkpoint_ns DESC LIMIT ?"
            )

            def fn(conn: sqlite3.Connection, sql: str = sql,
                   p: builtins.list[Any] = page_params,
                   n: int = page) -> builtins.list[StoredCheckpoint]:
                rows = conn.execute(sql, [*p, n]).fetchall()
                return [self._assemble(conn, row) for row in rows]

            records = await self._run(fn)
            for record in records:
                yield record
            if len(records) < page:
                return
            last = records[-1]
            cursor = (last.checkpoint_id, last.thread_id, last.checkpoint_ns)
            if remaining is not None:
                remaining -= len(records)

    async def ancestors(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        channels: Sequence[str],
        *,
        limit: int,
    ) -> builtins.list[ChainLink]:
        """One call on the store's thread, in one read transaction: a statement for the
        walk and one for the writes (``tiers/sqlite_ancestors.py``)."""
        asked = list(dict.fromkeys(channels))
        if not asked or limit <= 0:
            return []
        return await self._run(lambda conn: self._read_tx(conn, lambda c: walk_ancestors(
            c, thread_id, checkpoint_ns, checkpoint_id, asked, limit=limit)))

    # -- writes -----------------------------------------------------------------------

    @staticmethod
    def _check_fence(conn: sqlite3.Connection, thread_id: str, token: int | None) -> None:
        """Inside the write's transaction: refuse a token older than the thread's fence."""
        if token is None:
            return
        row = conn.execute("SELECT fence FROM fences WHERE thread_key = ?",
                           (fence_key(thread_id),)).fetchone()
        if fenced_out(row[0] if row else None, token):
            raise LeaseLost.superseded(thread_id, token, int(row[0]))

    async def next_fence(self, thread_id: str) -> int:
        key = fence_key(thread_id)

        def body(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "INSERT INTO fences VALUES (?, 1) ON CONFLICT (thread_key) DO UPDATE SET "
                "fence = fence + 1 RETURNING fence",
                (key,),
            ).fetchone()
            return int(row[0])

        return await self._run(lambda conn: self._tx(conn, body))

    async def put_checkpoint(
        self,
        record: CheckpointRecord,
        blobs: Sequence[BlobRecord],
        *,
        strict: bool,
        fence: int | None = None,
    ) -> PutResult:
        now = time.time()
        versions = json.dumps(dict(record.channel_versions), separators=(",", ":"))
        doc = json.dumps(dict(record.filter_doc), separators=(",", ":"))
        size = record.checkpoint.size + record.metadata.size

        def body(conn: sqlite3.Connection) -> PutResult:
            t, ns, cid = record.thread_id, record.checkpoint_ns, record.checkpoint_id
            self._check_fence(conn, t, fence)
            row = conn.execute(
                "SELECT head_id, version, n_writes FROM heads "
                "WHERE thread_id = ? AND checkpoint_ns = ?",
                (t, ns),
            ).fetchone()
            head_id, version, n_writes = row if row else (None, 0, 0)
            conflict = record.parent_id != head_id
            if strict and conflict:
                raise VersionConflict(
                    f"thread {t!r} ns {ns!r}: parent {record.parent_id!r} is not the head "
                    f"{head_id!r} (version {version})",
                    thread_id=t, checkpoint_ns=ns, head_id=head_id, version=version,
                )
            if row is None:  # a new head row: its versions never repeat an earlier one's
                version = first_version(now) - 1
            self._check_blobs(conn, record, blobs)
            conn.executemany(
                "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?, ?)",
                [(t, ns, b.channel, b.version, b.payload.tag, b.payload.data) for b in blobs],
            )
            conn.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'warm', NULL, ?, ?, ?)",
                (t, ns, cid, record.parent_id, record.run_id, record.checkpoint.tag,
                 record.checkpoint.data, record.metadata.tag, record.metadata.data, versions,
                 doc, now, now, size),
            )
            if head_id is None or cid >= head_id:
                head_id = cid
                n_writes = conn.execute(
                    "SELECT count(*) FROM writes WHERE thread_id = ? AND checkpoint_ns = ? "
                    "AND checkpoint_id = ?",
                    (t, ns, cid),
                ).fetchone()[0]
            version += 1
            conn.execute(
                "INSERT INTO heads (thread_id, checkpoint_ns, head_id, version, n_writes, "
                "conflicts, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT "
                "(thread_id, checkpoint_ns) DO UPDATE SET head_id = excluded.head_id, "
                "version = excluded.version, n_writes = excluded.n_writes, "
                "conflicts = heads.conflicts + excluded.conflicts, "
                "updated_at = excluded.updated_at",
                (t, ns, head_id, version, n_writes, int(conflict), now),
            )
            return PutResult(Head(head_id, version, n_writes), conflict)

        return await self._run(lambda conn: self._tx(conn, body))

    @staticmethod
    def _check_blobs(conn: sqlite3.Connection, record: CheckpointRecord,
                     blobs: Sequence[BlobRecord]) -> None:
        """Inside the put's transaction: every channel version the record names that
        is not among its new blobs must be in warm, or ``MissingBlobs`` (nothing written).

        An archive move drops values only archived checkpoints name; a writer that
        read the parent before the move would otherwise store a child naming them.
        This store keeps a row for empty channels too, so a row is the whole test.
        """
        new = {(b.channel, b.version) for b in blobs}
        wanted = [(ch, v) for ch, v in record.channel_versions.items() if (ch, v) not in new]
        if not wanted:
            return
        missing = [
            (ch, v) for ch, v in wanted
            if conn.execute(
                "SELECT 1 FROM blobs WHERE thread_id = ? AND checkpoint_ns = ? AND channel = ? "
                "AND version = ?",
                (record.thread_id, record.checkpoint_ns, ch, v),
            ).fetchone() is None
        ]
        if missing:
            raise MissingBlobs.of(record.thread_id, record.checkpoint_ns, missing)

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[WriteRecord],
        *,
        fence: int | None = None,
    ) -> int | None:
        if not writes:
            return None
        rows = [
            (thread_id, checkpoint_ns, checkpoint_id, w.task_id, w.idx, w.channel,
             w.payload.tag, w.payload.data, w.task_path)
            for w in writes
        ]

        def body(conn: sqlite3.Connection) -> int | None:
            self._check_fence(conn, thread_id, fence)
            conn.executemany(
                "INSERT OR IGNORE INTO writes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [r for r in rows if r[4] >= 0],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO writes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [r for r in rows if r[4] < 0],
            )
            # Every call moves the version, even one that only replaced a write.
            row = conn.execute(
                "UPDATE heads SET n_writes = (SELECT count(*) FROM writes WHERE thread_id = ? "
                "AND checkpoint_ns = ? AND checkpoint_id = ?), version = version + 1 "
                "WHERE thread_id = ? AND checkpoint_ns = ? AND head_id = ? RETURNING version",
                (thread_id, checkpoint_ns, checkpoint_id) * 2,
            ).fetchone()
            return int(row[0]) if row else None

        return await self._run(lambda conn: self._tx(conn, body))

    # -- maintenance ------------------------------------------------------------------

    async def delete_thread(self, thread_id: str) -> None:
        def body(conn: sqlite3.Connection) -> None:
            for table in ("checkpoints", "blobs", "writes", "heads"):
                conn.execute(f"DELETE FROM {table} WHERE thread_id = ?", (thread_id,))

        await self._run(lambda conn: self._erasing(conn, body))

    async def delete_for_runs(self, run_ids: Sequence[str]) -> builtins.list[str]:
        if not run_ids:
            return []

        def body(conn: sqlite3.Connection) -> builtins.list[str]:
            marks = ", ".join("?" for _ in run_ids)
            doomed = conn.execute(
                f"SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints "
                f"WHERE run_id IN ({marks})",
                list(run_ids),
            ).fetchall()
            self._delete_checkpoints(conn, doomed)
            return sorted({t for t, _, _ in doomed})

        return await self._run(lambda conn: self._erasing(conn, body))

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._run(lambda conn: self._tx(
            conn, lambda c: self._copy_rows(c, source_thread_id, target_thread_id)))

    async def publish_thread(self, source_thread_id: str, target_thread_id: str, *,
                             replace: bool) -> None:
        def body(conn: sqlite3.Connection) -> None:
            dst = target_thread_id
            taken = conn.execute("SELECT 1 FROM checkpoints WHERE thread_id = ? LIMIT 1",
                                 (dst,)).fetchone()
            if taken is not None and not replace:
                raise InvalidInput(f"thread {dst[:200]!r} already exists; import it under "
                                   "another id (--as-thread) or replace it (--replace)")
            # nothing of the target stays: leftovers (rows no checkpoint names) included
            for table in ("checkpoints", "blobs", "writes", "heads"):
                conn.execute(f"DELETE FROM {table} WHERE thread_id = ?", (dst,))
            self._copy_rows(conn, source_thread_id, dst)

        await self._run(lambda conn: self._erasing(conn, body))

    def _copy_rows(self, conn: sqlite3.Connection, src: str, dst: str) -> None:
        """Copy one thread's rows onto another id inside the caller's transaction."""
        conn.execute(
            "INSERT OR REPLACE INTO checkpoints SELECT ?, checkpoint_ns, checkpoint_id, "
            "parent_id, run_id, checkpoint_tag, checkpoint, metadata_tag, metadata, "
            "channel_versions, filter_doc, location, archive_key, created_at, accessed_at, "
            "size_bytes FROM checkpoints WHERE thread_id = ?",
            (dst, src),
        )
        conn.execute(
            "INSERT OR IGNORE INTO blobs SELECT ?, checkpoint_ns, channel, version, tag, data "
            "FROM blobs WHERE thread_id = ?",
            (dst, src),
        )
        conn.execute(
            "INSERT OR REPLACE INTO writes SELECT ?, checkpoint_ns, checkpoint_id, task_id, "
            "idx, channel, tag, data, task_path FROM writes WHERE thread_id = ?",
            (dst, src),
        )
        namespaces = conn.execute(
            "SELECT DISTINCT checkpoint_ns FROM checkpoints WHERE thread_id = ?", (dst,)
        ).fetchall()
        self._refresh_heads(conn, ((dst, ns) for (ns,) in namespaces))

    async def prune(self, thread_ids: Sequence[str], *, keep_latest: bool) -> None:
        if not keep_latest:
            for thread_id in thread_ids:
                await self.delete_thread(thread_id)
            return

        def body(conn: sqlite3.Connection) -> None:
            for thread_id in thread_ids:
                self._prune_to_latest(conn, thread_id)

        await self._run(lambda conn: self._erasing(conn, body))

    async def usage(self) -> TierUsage:
        def fn(conn: sqlite3.Connection) -> TierUsage:
            threads, = conn.execute("SELECT count(DISTINCT thread_id) FROM heads").fetchone()
            live, archived, size = conn.execute(
                "SELECT count(*) FILTER (WHERE location = 'warm'), "
                "count(*) FILTER (WHERE location = 'archived'), "
                "coalesce(sum(size_bytes) FILTER (WHERE location = 'warm'), 0) FROM checkpoints"
            ).fetchone()
            blob_bytes, = conn.execute("SELECT coalesce(sum(length(data)), 0) FROM blobs"
                                       ).fetchone()
            write_bytes, = conn.execute("SELECT coalesce(sum(length(data)), 0) FROM writes"
                                        ).fetchone()
            return TierUsage(threads=threads, checkpoints=live, archived=archived,
                             bytes=size + blob_bytes + write_bytes)

        return await self._run(fn)

