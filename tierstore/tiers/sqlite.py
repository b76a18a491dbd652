"""``sqlite:///path.db`` — the embedded warm tier, and the reference ``WarmStore``.

::

    event loop ──run_in_executor──► one worker thread ──► one sqlite3 connection (WAL)

SQLite has one writer at a time, so the store owns a single connection on a single
worker thread: every operation is one function, run there inside one transaction
(``BEGIN IMMEDIATE`` for writes), which is what makes the head compare-and-set
and the lease fence check atomic without a lock in Python. Readers in other
processes are not blocked (WAL).

URL options: ``?synchronous=full`` (default: a commit survives power loss) or
``normal`` (survives a process crash; faster), ``?timeout=30`` (seconds to wait
for another process's write lock). Any other option is refused by name, so a typo
(``?synchronus=normal``) cannot silently leave the default in force.

Reads cost what they return: a checkpoint's blobs are found by primary key from its
own ``channel_versions`` (never by scanning the thread's blobs), and a page of a
listing is one index range, so listing a thread is linear in its length.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from tierstore.errors import (
    ConfigurationError,
    InvalidInput,
    LeaseLost,
    LifecycleError,
    MissingBlobs,
    TierUnavailable,
    VersionConflict,
)
from tierstore.migrate import migrations_for
from tierstore.policy import fence_key, fenced_out, first_version
from tierstore.records import (
    BlobRecord,
    CheckpointMeta,
    CheckpointRecord,
    Claim,
    ClaimsHeld,
    Head,
    ListQuery,
    Payload,
    PutResult,
    StoredCheckpoint,
    TierUsage,
    WriteRecord,
)
from tierstore.settings import StoreUrl

__all__ = ["SqliteWarm"]

T = TypeVar("T")

_PAGE = 200
_OPTIONS = frozenset({"synchronous", "timeout"})
_COLUMNS = (
    "thread_id, checkpoint_ns, checkpoint_id, parent_id, checkpoint_tag, checkpoint, "
    "metadata_tag, metadata, channel_versions, location, archive_key"
)

_COLLECT_BLOBS = (
    "DELETE FROM blobs WHERE thread_id = ? AND checkpoint_ns = ? AND (channel, version) "
    "NOT IN (SELECT cv.key, cv.value FROM checkpoints AS c, json_each(c.channel_versions) "
    "AS cv WHERE c.thread_id = ? AND c.checkpoint_ns = ? AND c.location = 'warm' "
    "AND cv.value IS NOT NULL)"
)
"""Drop the blobs of a (thread, ns) that no live checkpoint names.

The uncorrelated ``NOT IN`` list is built once per statement (one pass over the live
checkpoints' versions) and probed once per blob, so collection is linear in the
thread; the correlated ``NOT EXISTS`` it replaces re-scanned every live checkpoint
for every blob.
"""


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


class SqliteWarm:
    """Warm tier on one SQLite file."""

    backend = "sqlite"

    def __init__(self, path: str, *, synchronous: str = "full", timeout: float = 30.0) -> None:
        if synchronous not in ("full", "normal"):
            raise ConfigurationError(
                f"sqlite synchronous must be 'full' or 'normal', got {synchronous!r}"
            )
        self.path = path
        self.synchronous = synchronous
        self.timeout = timeout
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

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

    # -- plumbing ---------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None or self._conn is None:
            raise LifecycleError("sqlite warm tier is not open")
        conn = self._conn
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, conn)
        except sqlite3.OperationalError as exc:
            raise TierUnavailable(f"sqlite {self.path}: {exc}", tier="warm",
                                  backend="sqlite") from exc
        except sqlite3.DatabaseError as exc:
            raise TierUnavailable(f"sqlite {self.path} is damaged: {exc}", tier="warm",
                                  backend="sqlite") from exc

    @staticmethod
    def _tx(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    @classmethod
    def _erasing(cls, conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
        """``_tx`` for deletes: afterwards the WAL, which still holds the old pages, is
        folded into the (zeroed) database file and truncated, so deleted bytes leave
        the disk now. Best effort: a reader in another process can postpone it."""
        result = cls._tx(conn, body)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return result

    async def setup(self) -> None:
        if self._conn is not None:
            return
        if self.path != ":memory:":
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(f"cannot create directory for {self.path}: {exc}") from exc
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierstore-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._connect)
            await self._run(self._migrate)
        except BaseException:
            await self.aclose()
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            conn.execute("PRAGMA foreign_keys=OFF")
            # deleted rows are overwritten with zeros, not left in free pages of the file
            conn.execute("PRAGMA secure_delete=ON")
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open sqlite database {self.path!r}: {exc}") from exc
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        def body(c: sqlite3.Connection) -> None:
            c.execute(
                "CREATE TABLE IF NOT EXISTS tierstore_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            done = {row[0] for row in c.execute("SELECT version FROM tierstore_migrations")}
            for migration in migrations_for("sqlite"):
                if migration.version in done:
                    continue
                for statement in _statements(migration.text):
                    c.execute(statement)
                c.execute(
                    "INSERT INTO tierstore_migrations VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )

        self._tx(conn, body)

    async def aclose(self) -> None:
        conn, executor = self._conn, self._executor
        self._conn = None
        self._executor = None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)

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

    @staticmethod
    def _refresh_heads(conn: sqlite3.Connection, keys: Iterable[tuple[str, str]]) -> None:
        """Recompute heads and drop orphaned blobs after checkpoints were removed/added.

        The version moves to at least the clock in microseconds: above the tombstone
        the router leaves in the hot tier, taken before the change."""
        now = time.time()
        for t, ns in set(keys):
            row = conn.execute(
                "SELECT max(checkpoint_id) FROM checkpoints WHERE thread_id = ? "
                "AND checkpoint_ns = ?",
                (t, ns),
            ).fetchone()
            conn.execute(_COLLECT_BLOBS, (t, ns) * 2)
            if row[0] is None:
                conn.execute("DELETE FROM heads WHERE thread_id = ? AND checkpoint_ns = ?",
                             (t, ns))
                continue
            n_writes = conn.execute(
                "SELECT count(*) FROM writes WHERE thread_id = ? AND checkpoint_ns = ? "
                "AND checkpoint_id = ?",
                (t, ns, row[0]),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO heads (thread_id, checkpoint_ns, head_id, version, n_writes, "
                "conflicts, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?) ON CONFLICT "
                "(thread_id, checkpoint_ns) DO UPDATE SET head_id = excluded.head_id, "
                "version = max(heads.version + 1, excluded.version), "
                "n_writes = excluded.n_writes, updated_at = excluded.updated_at",
                (t, ns, row[0], first_version(now), n_writes, now),
            )

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

    def _prune_to_latest(self, conn: sqlite3.Connection, thread_id: str) -> None:
        """Delete every checkpoint of a thread but the newest of each namespace."""
        doomed = conn.execute(
            "SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints AS c "
            "WHERE thread_id = ? AND checkpoint_id < (SELECT max(checkpoint_id) FROM "
            "checkpoints WHERE thread_id = c.thread_id AND checkpoint_ns = c.checkpoint_ns)",
            (thread_id,),
        ).fetchall()
        self._delete_checkpoints(conn, doomed)

    def _delete_checkpoints(
        self, conn: sqlite3.Connection, keys: Sequence[tuple[str, str, str]]
    ) -> None:
        conn.executemany(
            "DELETE FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ? "
            "AND checkpoint_id = ?",
            keys,
        )
        conn.executemany(
            "DELETE FROM writes WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ?",
            keys,
        )
        self._refresh_heads(conn, ((t, ns) for t, ns, _ in keys))

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

    # -- tiering ----------------------------------------------------------------------

    async def claim(
        self,
        *,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        warm_before: float | None = None,
        idle_before: float | None = None,
        require_live: bool = True,
        thread_id: str | None = None,
    ) -> builtins.list[Claim]:
        conds = ["(h.lease_until IS NULL OR h.lease_until < ?)"]
        params: builtins.list[Any] = [now]
        if thread_id is not None:
            conds.append("h.thread_id = ?")
            params.append(thread_id)
        if warm_before is not None:
            conds.append(
                "EXISTS (SELECT 1 FROM checkpoints AS c WHERE c.thread_id = h.thread_id AND "
                "c.checkpoint_ns = h.checkpoint_ns AND c.location = 'warm' AND "
                "c.checkpoint_id <> h.head_id AND c.created_at < ?)"
            )
            params.append(warm_before)
            conds.append("(h.settled_head IS NULL OR h.settled_head <> h.head_id OR "
                         "h.settled_until < ?)")
            params.append(warm_before)
        if idle_before is not None:
            conds.append("h.updated_at < ?")
            params.append(idle_before)
            if require_live:
                conds.append(
                    "EXISTS (SELECT 1 FROM checkpoints AS c WHERE c.thread_id = h.thread_id "
                    "AND c.checkpoint_ns = h.checkpoint_ns AND c.location = 'warm')"
                )

        def body(conn: sqlite3.Connection) -> builtins.list[Claim]:
            rows = conn.execute(
                "SELECT h.thread_id, h.checkpoint_ns, h.head_id, h.updated_at, h.version "
                "FROM heads AS h "
                f"WHERE {' AND '.join(conds)} ORDER BY h.updated_at LIMIT ?",
                [*params, limit],
            ).fetchall()
            conn.executemany(
                "UPDATE heads SET lease_owner = ?, lease_until = ? "
                "WHERE thread_id = ? AND checkpoint_ns = ?",
                [(owner, now + lease_seconds, t, ns) for t, ns, _, _, _ in rows],
            )
            return [Claim(t, ns, head, updated, version)
                    for t, ns, head, updated, version in rows]

        return await self._run(lambda conn: self._tx(conn, body))

    async def release(
        self,
        thread_id: str,
        checkpoint_ns: str,
        *,
        owner: str,
        settled_head: str | None = None,
        settled_until: float | None = None,
    ) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE heads SET lease_owner = NULL, lease_until = NULL, settled_head = ?, "
                "settled_until = ? WHERE thread_id = ? AND checkpoint_ns = ? AND lease_owner = ?",
                (settled_head, settled_until, thread_id, checkpoint_ns, owner),
            )

        await self._run(lambda conn: self._tx(conn, body))

    async def release_owned(self, *, owner: str) -> int:
        def body(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE heads SET lease_owner = NULL, lease_until = NULL "
                "WHERE lease_owner = ?", (owner,)).rowcount

        return await self._run(lambda conn: self._tx(conn, body))

    async def expire_thread(
        self,
        thread_id: str,
        heads: Sequence[Claim],
        *,
        owner: str,
        now: float,
        keep_latest: bool,
    ) -> bool:
        expected = {(c.checkpoint_ns, c.head_id, c.version) for c in heads
                    if c.thread_id == thread_id}

        def body(conn: sqlite3.Connection) -> bool:
            current = conn.execute(
                "SELECT checkpoint_ns, head_id, version, lease_owner, lease_until FROM heads "
                "WHERE thread_id = ?",
                (thread_id,),
            ).fetchall()
            if not current or any(o != owner or u is None or u < now
                                  for _, _, _, o, u in current):
                return False
            if {(ns, h, int(v)) for ns, h, v, _, _ in current} != expected:
                return False
            if keep_latest:
                self._prune_to_latest(conn, thread_id)
            else:
                for table in ("checkpoints", "blobs", "writes", "heads"):
                    conn.execute(f"DELETE FROM {table} WHERE thread_id = ?", (thread_id,))
            return True

        return await self._run(lambda conn: self._erasing(conn, body))

    async def held_claims(
        self, *, now: float, thread_id: str | None = None, exclude_owner: str | None = None
    ) -> ClaimsHeld:
        conds = ["lease_owner IS NOT NULL", "lease_until >= ?"]
        params: builtins.list[Any] = [now]
        if thread_id is not None:
            conds.append("thread_id = ?")
            params.append(thread_id)
        if exclude_owner is not None:
            conds.append("lease_owner <> ?")
            params.append(exclude_owner)

        def fn(conn: sqlite3.Connection) -> ClaimsHeld:
            count, first, last = conn.execute(
                "SELECT count(*), min(lease_until), max(lease_until) FROM heads "
                f"WHERE {' AND '.join(conds)}", params,
            ).fetchone()
            return ClaimsHeld(count, first, last)

        return await self._run(fn)

    async def index(self, thread_id: str, checkpoint_ns: str) -> builtins.list[CheckpointMeta]:
        def fn(conn: sqlite3.Connection) -> builtins.list[CheckpointMeta]:
            return [
                CheckpointMeta(thread_id, checkpoint_ns, cid, parent, created, location, key,
                               size)
                for cid, parent, created, location, key, size in conn.execute(
                    "SELECT checkpoint_id, parent_id, created_at, location, archive_key, "
                    "size_bytes FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ? "
                    "ORDER BY checkpoint_id DESC",
                    (thread_id, checkpoint_ns),
                )
            ]

        return await self._run(fn)

    async def mark_archived(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_ids: Sequence[str],
        *,
        archive_key: str,
        owner: str,
        now: float,
        writes: Mapping[str, Sequence[WriteRecord]] | None = None,
    ) -> int:
        def body(conn: sqlite3.Connection) -> int:
            held = conn.execute(
                "SELECT 1 FROM heads WHERE thread_id = ? AND checkpoint_ns = ? AND "
                "lease_owner = ? AND lease_until >= ?",
                (thread_id, checkpoint_ns, owner, now),
            ).fetchone()
            if held is None:
                return 0
            keys = [(thread_id, checkpoint_ns, cid) for cid in checkpoint_ids]
            wanted = set(checkpoint_ids)
            live = sum(conn.execute(
                "SELECT count(*) FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ? "
                "AND checkpoint_id = ? AND location = 'warm'", (thread_id, checkpoint_ns, cid),
            ).fetchone()[0] for cid in wanted)
            if live != len(wanted):
                return 0  # some were deleted (or moved) since they were packed: all or nothing
            changed = 0
            for key in keys:
                changed += conn.execute(
                    "UPDATE checkpoints SET location = 'archived', archive_key = ?, "
                    "checkpoint = NULL, checkpoint_tag = NULL WHERE thread_id = ? AND "
                    "checkpoint_ns = ? AND checkpoint_id = ? AND location = 'warm'",
                    (archive_key, *key),
                ).rowcount
            if changed:  # every cached copy of the head must fail the freshness check
                conn.execute(
                    "UPDATE heads SET version = version + 1 WHERE thread_id = ? "
                    "AND checkpoint_ns = ?",
                    (thread_id, checkpoint_ns),
                )
            if writes is None:
                conn.executemany(
                    "DELETE FROM writes WHERE thread_id = ? AND checkpoint_ns = ? "
                    "AND checkpoint_id = ?",
                    keys,
                )
            else:  # only what the segment holds: a later write stays on the stub
                conn.executemany(
                    "DELETE FROM writes WHERE thread_id = ? AND checkpoint_ns = ? "
                    "AND checkpoint_id = ? AND task_id = ? AND idx = ? AND tag = ? AND data = ?",
                    [(thread_id, checkpoint_ns, cid, w.task_id, w.idx, w.payload.tag,
                      w.payload.data)
                     for cid in checkpoint_ids for w in writes.get(cid, ())],
                )
            self._collect_blobs(conn, thread_id, checkpoint_ns)
            return changed

        return await self._run(lambda conn: self._tx(conn, body))

    @staticmethod
    def _collect_blobs(conn: sqlite3.Connection, thread_id: str, checkpoint_ns: str) -> None:
        """Drop blobs that no live checkpoint of the (thread, ns) names any more."""
        conn.execute(_COLLECT_BLOBS, (thread_id, checkpoint_ns) * 2)

    async def rehydrate(self, records: Sequence[StoredCheckpoint]) -> int:
        def body(conn: sqlite3.Connection) -> int:
            restored = 0
            for r in records:
                key = (r.thread_id, r.checkpoint_ns, r.checkpoint_id)
                row = conn.execute(
                    "UPDATE checkpoints SET location = 'warm', archive_key = NULL, "
                    "checkpoint_tag = ?, checkpoint = ? WHERE thread_id = ? AND "
                    "checkpoint_ns = ? AND checkpoint_id = ? AND location = 'archived' "
                    "RETURNING channel_versions",
                    (r.checkpoint.tag, r.checkpoint.data, *key),
                ).fetchone()
                if row is None:
                    continue  # not a stub (already live, or gone)
                restored += 1
                versions = json.loads(row[0] or "{}")
                conn.executemany(
                    "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?, ?)",
                    [(r.thread_id, r.checkpoint_ns, ch, versions[ch], p.tag, p.data)
                     for ch, p in r.blobs.items() if ch in versions],
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO writes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(*key, w.task_id, w.idx, w.channel, w.payload.tag, w.payload.data,
                      w.task_path) for w in r.writes],
                )
            self._refresh_writes_count(conn, {(r.thread_id, r.checkpoint_ns) for r in records})
            return restored

        return await self._run(lambda conn: self._tx(conn, body))

    @staticmethod
    def _refresh_writes_count(conn: sqlite3.Connection, keys: set[tuple[str, str]]) -> None:
        for t, ns in keys:
            conn.execute(
                "UPDATE heads SET n_writes = (SELECT count(*) FROM writes AS w WHERE "
                "w.thread_id = heads.thread_id AND w.checkpoint_ns = heads.checkpoint_ns AND "
                "w.checkpoint_id = heads.head_id), version = version + 1 "
                "WHERE thread_id = ? AND checkpoint_ns = ?",
                (t, ns),
            )

    async def archive_refs(
        self, thread_id: str | None = None, *, keys: Sequence[str] | None = None
    ) -> dict[str, int]:
        def fn(conn: sqlite3.Connection) -> dict[str, int]:
            where, args = ["archive_key IS NOT NULL"], []
            if thread_id is not None:
                where.append("thread_id = ?")
                args.append(thread_id)
            if keys is not None:
                where.append("archive_key IN (SELECT value FROM json_each(?))")
                args.append(json.dumps(sorted(set(keys))))
            sql = (f"SELECT archive_key, count(*) FROM checkpoints WHERE {' AND '.join(where)}"
                   " GROUP BY archive_key")
            return {key: n for key, n in conn.execute(sql, args)}

        if keys is not None and not keys:
            return {}
        return await self._run(fn)

    async def archive_stubs(
        self, *, keys: Sequence[str] | None = None, run_ids: Sequence[str] | None = None
    ) -> dict[str, builtins.set[str]]:
        if keys is None and run_ids is None:
            raise InvalidInput("archive_stubs needs keys or run_ids")
        where, args = ["archive_key IS NOT NULL"], []
        for column, values in (("archive_key", keys), ("run_id", run_ids)):
            if values is not None:
                where.append(f"{column} IN (SELECT value FROM json_each(?))")
                args.append(json.dumps(builtins.list(values)))

        def fn(conn: sqlite3.Connection) -> dict[str, builtins.set[str]]:
            out: dict[str, builtins.set[str]] = {}
            for key, checkpoint_id in conn.execute(
                f"SELECT archive_key, checkpoint_id FROM checkpoints WHERE {' AND '.join(where)}",
                args,
            ):
                out.setdefault(key, set()).add(checkpoint_id)
            return out

        if (keys is not None and not keys) or (run_ids is not None and not run_ids):
            return {}
        return await self._run(fn)

    async def repoint_archive(
        self, old_key: str, new_key: str, checkpoint_ids: Sequence[str]
    ) -> int:
        def body(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE checkpoints SET archive_key = ? WHERE archive_key = ? AND checkpoint_id "
                "IN (SELECT value FROM json_each(?))",
                (new_key, old_key, json.dumps(builtins.list(checkpoint_ids))),
            ).rowcount

        return await self._run(lambda conn: self._tx(conn, body))

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


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (our files keep one per ``;`` line end)."""
    out: list[str] = []
    buf: list[str] = []
    for line in script.splitlines():
        if line.strip().startswith("--"):
            continue
        buf.append(line)
        if line.rstrip().endswith(";"):
            statement = "\n".join(buf).strip()
            if statement.strip(";").strip():
                out.append(statement)
            buf = []
    if "\n".join(buf).strip():
        out.append("\n".join(buf).strip())
    return out

