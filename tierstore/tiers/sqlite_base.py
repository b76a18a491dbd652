"""The SQLite warm tier's connection: one thread, one connection, one lifecycle.

::

    event loop ──run_in_executor──► one worker thread ──► one sqlite3 connection (WAL)

SQLite has one writer at a time, so the store owns a single connection on a single
worker thread: every operation is one function, run there inside one transaction
(``BEGIN IMMEDIATE`` for writes), which is what makes the head compare-and-set
and the lease fence check atomic without a lock in Python. Readers in other
processes are not blocked (WAL).

Also here: the row maintenance that both the request path (``tiers/sqlite.py``)
and tiering (``tiers/sqlite_tiering.py``) run inside their transactions.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from tierstore.errors import ConfigurationError, LifecycleError, TierUnavailable
from tierstore.lifecycle import Lifecycle
from tierstore.migrate import pending, sql_statements
from tierstore.policy import first_version

__all__ = ["PAGE_SIZE", "SqliteBase"]

T = TypeVar("T")

PAGE_SIZE = 8192
"""Page size of a new database file (SQLite's default is 4,096).

``checkpoints`` is a ``WITHOUT ROWID`` table, an index b-tree, which keeps at most
about a quarter of a page of a row on the page (1,002 bytes of a 4 KiB page) and puts
the rest on an overflow page of its own. Chat checkpoint rows are 800-1,300 bytes, so
with 4 KiB pages about a fifth of them took a mostly empty extra page: 100 threads x 20
turns of the chat workload made 3,690 bytes of file per checkpoint with 4 KiB pages,
2,780 with 8 KiB (and 3,130 with 16 KiB, where the blobs waste more), at the same
turns/s. Set only on an empty file: an existing store keeps its page size (changing it
on a WAL file needs a VACUUM, which is never run for it).
"""

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


class SqliteBase:
    """Connection, schema and lifecycle of one SQLite file, and shared row upkeep.

    A store is opened once: after ``aclose`` its thread is gone, and ``setup`` raises
    ``LifecycleError`` rather than quietly open a second connection.
    """

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
        self._life = Lifecycle(f"sqlite warm tier {path}")

    @property
    def identity(self) -> tuple[str, str] | None:
        """The database file (None in memory: each connection has its own), as named: no
        file system call (this runs on the event loop), so two names of one file through
        a link are two identities (their savers then share less, never more)."""
        if self.path == ":memory:" or self.path.startswith("file:"):
            return None
        return ("sqlite", os.path.normpath(self.path))

    # -- plumbing ---------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._life.require()
        return await self._call(fn)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the store's thread, driver errors leaving as ``TierUnavailable``."""
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:  # only while setup runs: aclose won the race
            raise LifecycleError(f"{self._life.what} was closed during setup")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, fn, conn)
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
        """Open the file and bring the schema up to date. Idempotent while open; a
        failed setup can be retried, a closed store cannot be reopened."""
        if not self._life.begin():
            return
        if self.path != ":memory:":
            try:
                await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True,
                                        exist_ok=True)
            except OSError as exc:
                self._life.failed()
                raise ConfigurationError(f"cannot create directory for {self.path}: {exc}") from exc
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierstore-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._connect)
            await self._call(self._migrate)
        except BaseException:
            await self._release()
            self._life.failed()
            raise
        self._life.opened()

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            if conn.execute("PRAGMA page_count").fetchone()[0] == 0:  # a new file
                conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            conn.execute("PRAGMA foreign_keys=OFF")
            # deleted rows are overwritten with zeros, not left in free pages of the file
            conn.execute("PRAGMA secure_delete=ON")
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open sqlite database {self.path!r}: {exc}") from exc
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Apply the pending migrations in one write transaction: a second process
        starting at the same time waits for the lock, then finds nothing to do."""
        def body(c: sqlite3.Connection) -> None:
            c.execute(
                "CREATE TABLE IF NOT EXISTS tierstore_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            done = {row[0] for row in c.execute("SELECT version FROM tierstore_migrations")}
            for migration in pending("sqlite", done):
                for statement in sql_statements(migration.text):
                    c.execute(statement)
                c.execute(
                    "INSERT INTO tierstore_migrations VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )

        self._tx(conn, body)

    async def aclose(self) -> None:
        """Close the connection and stop its thread. Idempotent."""
        if self._life.close():
            await self._release()

    async def _release(self) -> None:
        conn, executor = self._conn, self._executor
        self._conn = None
        self._executor = None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        await asyncio.to_thread(executor.shutdown, wait=True)  # joins its thread

    # -- row upkeep shared by the request path and tiering -------------------------------

    @staticmethod
    def _collect_blobs(conn: sqlite3.Connection, thread_id: str, checkpoint_ns: str) -> None:
        """Drop blobs that no live checkpoint of the (thread, ns) names any more."""
        conn.execute(_COLLECT_BLOBS, (thread_id, checkpoint_ns) * 2)

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
