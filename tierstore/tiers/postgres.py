"""``postgresql://`` (or ``postgres://``) — the warm tier on PostgreSQL, through asyncpg.

::

    caller ──► PostgresWarm ──► asyncpg pool (min_size..max_size) ──► PostgreSQL
                  │  one pooled connection per call, no lock in Python:
                  │  calls on different threads run in parallel
                  │
                  ├─ head            1 statement  index lookup on tierstore_heads
                  ├─ get             1 statement  checkpoint + blobs + writes (lateral aggregates)
                  ├─ list            1 per page   keyset pages of 200, blobs and writes joined
                  ├─ put_checkpoint  1 statement  tierstore_put_checkpoint(): lock the head row,
                  │                                compare parent, insert, advance head
                  ├─ put_writes      1 statement  tierstore_put_writes(): insert, count new rows
                  │   (with a lease token: the *_fenced variants, the fence row FOR SHARE first)
                  ├─ next_fence      1 statement  tierstore_next_fence(): bump the thread's fence
                  ├─ delete / copy / prune        one transaction: lock heads, change, recompute
                  └─ claim           1 statement  FOR NO KEY UPDATE SKIP LOCKED; mark_archived
                                                  and rehydrate: one transaction under the lease

Tables (``migrations/postgres``)::

    tierstore_heads        sid ◄─┬─ one row per (thread_id, checkpoint_ns): head_id, version,
                                 │  n_writes, conflicts, lease; unique on SHA-224 of both ids
    tierstore_checkpoints  (sid, checkpoint_id) ─ payloads, channel_versions, filter_doc (GIN);
                                 │                  archive_key set = a stub
    tierstore_blobs        (sid, channel, version) ─ one channel value, stored once
    tierstore_writes       (sid, checkpoint_id, task_id, idx) ─ pending writes
    tierstore_fences       (thread_key) ─ newest lease token per thread, by SHA-224 digest

Bytes on disk per checkpoint are part of the design: the surrogate ``sid`` keeps
thread ids (any text up to 64 KiB) out of every other row and index entry;
channel versions are stored with their run of leading zeros as a count
(``_version_key``); a channel that has a version but no value gets no blob row.

The head moves only inside the database, under the head row's lock, so processes
sharing a database agree on it; ``strict`` writes compare the parent there and
write nothing when it is stale.

Limits: thread ids and namespaces may be as long as tierstore allows (64 KiB);
checkpoint ids, task ids, channel names and versions are btree keys and must fit
in about 2.6 KB (LangGraph's are a few dozen bytes); a longer one is refused with
``PayloadTooLarge``. A payload may be up to 1 GB (PostgreSQL's ``bytea`` limit).

URL options (removed before the URL reaches asyncpg; the rest, e.g. ``sslmode``,
is asyncpg's): ``min_size=1``, ``max_size=10`` (pool size), ``command_timeout=30``
(seconds a statement or a wait for a pooled connection may take),
``connect_timeout=10``, ``setup_timeout=300`` (migrations), ``schema=NAME`` (tables
live in this schema, created if missing), ``statement_cache_size=100`` (0 behind a
transaction-pooling PgBouncer; run ``setup()`` once against the server itself, as
migrations hold a session-level advisory lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from tierstore.codec.pipeline import EMPTY
from tierstore.errors import (
    ConfigurationError,
    InvalidInput,
    LeaseLost,
    LifecycleError,
    MissingBlobs,
    PayloadTooLarge,
    TierstoreError,
    TierUnavailable,
    VersionConflict,
)
from tierstore.migrate import Migration, migrations_for
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
    Scalar,
    StoredCheckpoint,
    TierUsage,
    WriteRecord,
)
from tierstore.settings import StoreUrl, mask

__all__ = ["PostgresWarm"]

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]

T = TypeVar("T")

_PAGE: Final = 200
_OPTIONS: Final = frozenset({
    "min_size", "max_size", "command_timeout", "connect_timeout", "setup_timeout", "schema",
    "statement_cache_size",
})
_NO_TRANSACTION: Final = "-- tierstore:no-transaction"
"""A migration whose first lines carry this marker runs statement by statement,
outside a transaction (``CREATE INDEX CONCURRENTLY`` needs that); it must be
written so that running it again after a crash is harmless."""

# -- SQL ------------------------------------------------------------------------------


def _key(value: str) -> str:
    """The digest ``tierstore_key()`` computes, spelled with built-in functions: the
    index is matched all the same, without the cost of calling an SQL function."""
    return f"sha224(convert_to({value}, 'UTF8'))"


def _stream(alias: str) -> str:
    """One (thread $1, ns $2) of ``tierstore_heads AS alias``, by its unique index."""
    return (
        f"tierstore_key({alias}.thread_id) = {_key('$1')} "
        f"AND tierstore_key({alias}.checkpoint_ns) = {_key('$2')} "
        f"AND {alias}.thread_id = $1 AND {alias}.checkpoint_ns = $2"
    )


# Every namespace of the threads in the text[] $1.
_THREADS = (
    f"tierstore_key(h.thread_id) = ANY(ARRAY(SELECT {_key('t')} FROM unnest($1::text[]) AS t)) "
    "AND h.thread_id = ANY($1::text[])"
)

_HEAD = (
    "SELECT h.head_id, h.version, h.n_writes FROM tierstore_heads AS h "
    f"WHERE {_stream('h')} AND h.head_id IS NOT NULL"
)

# A page of checkpoint rows ({page}: columns c.*, h.thread_id, h.checkpoint_ns), each
# with its blobs (named by channel_versions) and its writes as parallel arrays.
# LIMIT 1 keeps the blob lookup a primary-key probe per channel: joined freely, the
# planner would hash every blob version of the namespace to find a handful. The
# page comes back in any order and is sorted in Python: sorting here would copy
# every row with its payloads, and a large page would spill to disk.
_ASSEMBLE = """
SELECT c.thread_id, c.checkpoint_ns, c.checkpoint_id, c.parent_id, c.checkpoint_tag,
       c.checkpoint, c.metadata_tag, c.metadata, c.archive_key,
       b.channels AS blob_channels, b.tags AS blob_tags, b.data AS blob_data,
       w.task_ids, w.idxs, w.channels AS write_channels, w.tags AS write_tags,
       w.data AS write_data, w.paths AS write_paths
  FROM ({page}) AS c
 CROSS JOIN LATERAL (
       SELECT array_agg(b.channel) AS channels, array_agg(b.tag) AS tags,
              array_agg(b.data) AS data
         FROM jsonb_each_text(c.channel_versions) AS v(channel, version)
        CROSS JOIN LATERAL (
              SELECT b.channel, b.tag, b.data FROM tierstore_blobs AS b
               WHERE b.sid = c.sid AND b.channel = v.channel AND b.version = v.version
               LIMIT 1) AS b) AS b
 CROSS JOIN LATERAL (
       SELECT array_agg(w.task_id) AS task_ids, array_agg(w.idx) AS idxs,
              array_agg(w.channel) AS channels, array_agg(w.tag) AS tags,
              array_agg(w.data) AS data, array_agg(w.task_path) AS paths
         FROM tierstore_writes AS w
        WHERE w.sid = c.sid AND w.checkpoint_id = c.checkpoint_id) AS w
"""
_ROW = "SELECT c.*, h.thread_id, h.checkpoint_ns FROM tierstore_checkpoints AS c " \
       "JOIN tierstore_heads AS h ON h.sid = c.sid"
_SID = f"(SELECT s.sid FROM tierstore_heads AS s WHERE {_stream('s')})"
_GET_ONE = _ASSEMBLE.format(page=f"{_ROW} WHERE c.sid = {_SID} AND c.checkpoint_id = $3")
# The latest checkpoint carries the head version read by the same statement (one
# snapshot), so a hot fill can never put an old state under a new version.
_GET_LATEST = (
    "SELECT a.*, (SELECT h.version FROM tierstore_heads AS h WHERE h.sid = "
    f"{_SID} AND h.head_id = a.checkpoint_id) AS head_version FROM ("
    + _ASSEMBLE.format(
        page=f"{_ROW} WHERE c.sid = {_SID} ORDER BY c.checkpoint_id DESC LIMIT 1"
    )
    + ") AS a"
)

_PUT_CHECKPOINT = (
    "SELECT o_ok, o_head, o_version, o_n_writes, o_conflict FROM tierstore_put_checkpoint("
    + ", ".join(f"${i}" for i in range(1, 18))
    + ")"
)
_PUT_WRITES = "SELECT tierstore_put_writes($1, $2, $3, $4, $5, $6, $7, $8, $9)"
_PUT_CHECKPOINT_FENCED = (
    "SELECT o_ok, o_head, o_version, o_n_writes, o_conflict FROM "
    "tierstore_put_checkpoint_fenced(" + ", ".join(f"${i}" for i in range(1, 19)) + ")"
)
_PUT_WRITES_FENCED = "SELECT tierstore_put_writes_fenced($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
_NEXT_FENCE = "SELECT tierstore_next_fence($1)"
_FENCED_OUT = "TS409"  # SQLSTATE raised by tierstore_check_fence
_MISSING_BLOBS = "TS404"  # SQLSTATE raised by tierstore_put_checkpoint (0003)

_LOCK_STREAMS = (
    "SELECT sid FROM tierstore_heads WHERE sid = ANY($1::bigint[]) ORDER BY sid "
    "FOR NO KEY UPDATE"
)
_DELETE_THREADS = f"DELETE FROM tierstore_heads AS h WHERE {_THREADS} RETURNING h.sid"
_DELETE_STREAMS = """
WITH c AS (DELETE FROM tierstore_checkpoints WHERE sid = ANY($1::bigint[])),
     b AS (DELETE FROM tierstore_blobs WHERE sid = ANY($1::bigint[]))
DELETE FROM tierstore_writes WHERE sid = ANY($1::bigint[])
"""
_DELETE_WRITES_OF = """
DELETE FROM tierstore_writes AS w
 USING unnest($1::bigint[], $2::text[]) AS d(sid, checkpoint_id)
 WHERE w.sid = d.sid AND w.checkpoint_id = d.checkpoint_id
"""
# After checkpoints left a namespace: drop blobs no remaining live checkpoint names
# (a stub's values are in its cold segment),
# recompute head and n_writes (version still moves forward), and forget
# namespaces left with nothing at all.
_DROP_ORPHAN_BLOBS = """
WITH live AS (
    SELECT DISTINCT c.sid, v.key AS channel, v.value AS version
      FROM tierstore_checkpoints AS c, jsonb_each_text(c.channel_versions) AS v
     WHERE c.sid = ANY($1::bigint[]) AND c.archive_key IS NULL)
DELETE FROM tierstore_blobs AS b
 WHERE b.sid = ANY($1::bigint[])
   AND NOT EXISTS (SELECT 1 FROM live AS l
                    WHERE l.sid = b.sid AND l.channel = b.channel AND l.version = b.version)
"""
# The version moves to at least the clock in microseconds: above the tombstone the
# router leaves in the hot tier, taken before the change (policy.tombstone_version).
_RECOMPUTE_HEADS = """
UPDATE tierstore_heads AS h
   SET head_id = m.head_id, updated_at = now(),
       version = greatest(h.version + 1,
                          (floor(extract(epoch FROM clock_timestamp()) * 1000000))::bigint),
       n_writes = (SELECT count(*) FROM tierstore_writes AS w
                    WHERE w.sid = h.sid AND w.checkpoint_id = m.head_id)
  FROM (SELECT s.sid, (SELECT max(c.checkpoint_id) FROM tierstore_checkpoints AS c
                        WHERE c.sid = s.sid) AS head_id
          FROM unnest($1::bigint[]) AS s(sid)) AS m
 WHERE h.sid = m.sid
"""
_DROP_EMPTY_STREAMS = """
DELETE FROM tierstore_heads AS h
 WHERE h.sid = ANY($1::bigint[]) AND h.head_id IS NULL
   AND NOT EXISTS (SELECT 1 FROM tierstore_writes AS w WHERE w.sid = h.sid)
"""

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

# -- tiering ------------------------------------------------------------------------------

_CLAIM = """
WITH picked AS (
    SELECT h.sid FROM tierstore_heads AS h
     WHERE {conditions}
     ORDER BY h.updated_at
     LIMIT {limit}
       FOR NO KEY UPDATE OF h SKIP LOCKED)
UPDATE tierstore_heads AS h SET lease_owner = {owner}, lease_until = {until}
  FROM picked
 WHERE h.sid = picked.sid
RETURNING h.thread_id, h.checkpoint_ns, h.head_id, extract(epoch FROM h.updated_at)::float8,
          h.version
"""
# A claimed thread's heads, locked against puts until the expiring transaction ends.
_EXPIRE_LOCK = (
    "SELECT h.sid, h.checkpoint_ns, h.head_id, h.version, h.lease_owner, h.lease_until "
    f"FROM tierstore_heads AS h WHERE {_THREADS} ORDER BY h.sid FOR UPDATE"
)
_RELEASE = (
    "UPDATE tierstore_heads AS h SET lease_owner = NULL, lease_until = NULL, "
    "settled_head = $4, settled_until = $5 "
    f"WHERE {_stream('h')} AND h.lease_owner = $3"
)
_HELD_CLAIMS = (
    "SELECT count(*), min(h.lease_until), max(h.lease_until) FROM tierstore_heads AS h "
    "WHERE h.lease_owner IS NOT NULL AND h.lease_until >= $1 "
    "AND ($2::text IS NULL OR (tierstore_key(h.thread_id) = sha224(convert_to($2, 'UTF8')) "
    "AND h.thread_id = $2)) AND ($3::text IS NULL OR h.lease_owner <> $3)"
)
_INDEX = (
    "SELECT c.checkpoint_id, c.parent_id, extract(epoch FROM c.created_at)::float8, "
    "c.archive_key, c.size_bytes FROM tierstore_checkpoints AS c "
    f"WHERE c.sid = {_SID} ORDER BY c.checkpoint_id DESC"
)
_LEASED = (
    f"SELECT h.sid FROM tierstore_heads AS h WHERE {_stream('h')} "
    "AND h.lease_owner = $3 AND h.lease_until >= $4 FOR NO KEY UPDATE"
)
_LOCK_KEYS = f"""
SELECT h.sid, h.thread_id, h.checkpoint_ns
  FROM tierstore_heads AS h
  JOIN unnest($1::text[], $2::text[]) AS k(thread_id, checkpoint_ns)
    ON tierstore_key(h.thread_id) = {_key('k.thread_id')}
   AND tierstore_key(h.checkpoint_ns) = {_key('k.checkpoint_ns')}
   AND h.thread_id = k.thread_id AND h.checkpoint_ns = k.checkpoint_ns
 ORDER BY h.sid
   FOR NO KEY UPDATE OF h
"""
_COUNT_HEAD_WRITES = """
UPDATE tierstore_heads AS h
   SET n_writes = (SELECT count(*) FROM tierstore_writes AS w
                    WHERE w.sid = h.sid AND w.checkpoint_id = h.head_id),
       version = h.version + 1
 WHERE h.sid = ANY($1::bigint[])
"""
_BUMP_VERSION = "UPDATE tierstore_heads SET version = version + 1 WHERE sid = $1"
_USAGE = """
SELECT (SELECT count(DISTINCT thread_id) FROM tierstore_heads WHERE head_id IS NOT NULL),
       count(*) FILTER (WHERE archive_key IS NULL),
       count(*) FILTER (WHERE archive_key IS NOT NULL),
       coalesce(sum(size_bytes) FILTER (WHERE archive_key IS NULL), 0)
       + (SELECT coalesce(sum(octet_length(data)), 0) FROM tierstore_blobs)
       + (SELECT coalesce(sum(octet_length(data)), 0) FROM tierstore_writes)
  FROM tierstore_checkpoints
"""

_UNOPENED, _OPENED, _CLOSED = "unopened", "opened", "closed"




async def _target_streams(conn: Conn, thread_id: str, namespaces: Sequence[str]
                          ) -> dict[str, int]:
    """Namespace -> head row id of ``thread_id``, creating the rows ``namespaces`` lack."""
    await conn.execute(
        "INSERT INTO tierstore_heads (thread_id, checkpoint_ns) "
        "SELECT $1, ns FROM unnest($2::text[]) AS ns ON CONFLICT DO NOTHING",
        thread_id, list(namespaces),
    )
    rows = await conn.fetch(
        f"SELECT h.sid, h.checkpoint_ns FROM tierstore_heads AS h WHERE {_THREADS}",
        [thread_id],
    )
    return {r[1]: r[0] for r in rows}


async def _copy_streams(conn: Conn, src: Sequence[int], dst: Sequence[int]) -> None:
    """Copy checkpoints, blobs and writes of each source stream into its target stream."""
    await conn.execute(_COPY_CHECKPOINTS, list(src), list(dst))
    await conn.execute(_COPY_BLOBS, list(src), list(dst))
    await conn.execute(_COPY_WRITES, list(src), list(dst))

class _NothingMarked(Exception):
    """Rolls back a ``mark_archived`` transaction that could not move every packed id."""

class PostgresWarm:
    """Warm tier on PostgreSQL. Build with ``from_url``; ``setup()`` opens the pool."""

    backend = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        masked: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        setup_timeout: float = 300.0,
        schema: str | None = None,
        statement_cache_size: int = 100,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigurationError(
                f"postgres pool needs 0 <= min_size <= max_size and max_size >= 1, "
                f"got min_size={min_size} max_size={max_size}"
            )
        for name, value in (("command_timeout", command_timeout),
                            ("connect_timeout", connect_timeout),
                            ("setup_timeout", setup_timeout)):
            if not value > 0 or math.isinf(value):
                raise ConfigurationError(f"postgres {name} must be a positive number, "
                                         f"got {value!r}")
        if statement_cache_size < 0:
            raise ConfigurationError("postgres statement_cache_size cannot be negative")
        if schema is not None and not 0 < len(schema.encode("utf-8")) <= 63:
            raise ConfigurationError(f"postgres schema name must be 1..63 bytes, got {schema!r}")
        self._dsn = dsn
        self._secret = urlsplit(dsn).password
        self.url = masked if masked is not None else mask(dsn)
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.setup_timeout = setup_timeout
        self.schema = schema
        self.statement_cache_size = statement_cache_size
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._state = _UNOPENED
        self._releasing: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"PostgresWarm({self.url!r}, state={self._state!r})"

    @classmethod
    def from_url(cls, url: StoreUrl, **kw: Any) -> PostgresWarm:
        """Options come from the URL query; keyword arguments override them."""
        unknown = set(kw) - _OPTIONS
        if unknown:
            raise ConfigurationError(f"unknown postgres option(s): {', '.join(sorted(unknown))}")
        options: dict[str, Any] = {k: v for k, v in url.query.items() if k in _OPTIONS}
        options.update(kw)
        parsed: dict[str, Any] = {}
        try:
            for name in ("min_size", "max_size", "statement_cache_size"):
                if name in options:
                    parsed[name] = int(options[name])
            for name in ("command_timeout", "connect_timeout", "setup_timeout"):
                if name in options:
                    parsed[name] = float(options[name])
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{url.masked!r}: bad pool option: {exc}") from exc
        if options.get("schema"):
            parsed["schema"] = str(options["schema"])
        parts = urlsplit(url.raw)
        kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                if k not in _OPTIONS]
        dsn = urlunsplit(parts._replace(query=urlencode(kept)))
        return cls(dsn, masked=url.masked, **parsed)

    # -- lifecycle ----------------------------------------------------------------------

    async def setup(self) -> None:
        """Open the pool and bring the schema up to date. Idempotent while open."""
        if self._state == _OPENED:
            return
        if self._state == _CLOSED:
            raise LifecycleError(f"{self!r} is closed; build a new store")
        settings = {"jit": "off"}  # planning JIT costs more than these short statements
        if "application_name=" not in self._dsn:
            settings["application_name"] = "tierstore"
        if self.schema is not None:
            settings["search_path"] = _quote_ident(self.schema)
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                command_timeout=self.command_timeout,
                timeout=self.connect_timeout,
                statement_cache_size=self.statement_cache_size,
                server_settings=settings,
                reset=_keep_session,
            )
            async with self._pool.acquire(timeout=self.connect_timeout) as conn:
                await self._migrate(conn)
        except BaseException as exc:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.terminate()
            if isinstance(exc, Exception) and not isinstance(exc, TierstoreError):
                raise self._translate(exc, "setup") from exc
            raise
        self._state = _OPENED

    async def _migrate(self, conn: Conn) -> None:
        """Apply pending migrations, once, however many processes start together.

        An advisory lock (one per schema) elects one migrator. The others poll for
        it rather than block on it: a process blocked inside a statement holds a
        snapshot, which a ``CREATE INDEX CONCURRENTLY`` run by the migrator would
        wait for, forever. Each migration commits together with its version row,
        so a crash leaves the version table telling the truth.
        """
        migrations = migrations_for("postgres")
        latest = migrations[-1].version
        timeout = self.setup_timeout
        if await self._applied(conn) >= latest:
            return
        key = f"tierstore.migrate:{self.schema or ''}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                                      key, timeout=timeout):
            if loop.time() > deadline:
                raise TierUnavailable(
                    f"postgres warm tier {self.url}: another process held the migration "
                    f"lock for more than setup_timeout={timeout:g}s",
                    tier="warm", backend=self.backend,
                )
            await asyncio.sleep(0.1)
            if await self._applied(conn) >= latest:
                return
        try:
            if self.schema is not None:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(self.schema)}",
                                   timeout=timeout)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS tierstore_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
                timeout=timeout,
            )
            done = {r[0] for r in await conn.fetch("SELECT version FROM tierstore_migrations",
                                                    timeout=timeout)}
            for migration in migrations:
                if migration.version not in done:
                    await self._apply(conn, migration)
        finally:
            try:
                await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key,
                                   timeout=timeout)
            except BaseException:
                conn.terminate()  # a session still holding the lock must not be reused
                raise

    async def _applied(self, conn: Conn) -> int:
        timeout = self.setup_timeout
        exists = await conn.fetchval("SELECT to_regclass('tierstore_migrations') IS NOT NULL",
                                     timeout=timeout)
        if not exists:
            return 0
        value = await conn.fetchval("SELECT coalesce(max(version), 0) FROM tierstore_migrations",
                                    timeout=timeout)
        return int(value)

    async def _apply(self, conn: Conn, migration: Migration) -> None:
        timeout = self.setup_timeout
        record = "INSERT INTO tierstore_migrations (version, name) VALUES ($1, $2)"
        head = migration.text.lstrip().splitlines()[:3]
        if any(line.strip() == _NO_TRANSACTION for line in head):
            for statement in _statements(migration.text):
                await conn.execute(statement, timeout=timeout)
            await conn.execute(record, migration.version, migration.name, timeout=timeout)
            return
        async with conn.transaction():
            await conn.execute(migration.text, timeout=timeout)
            await conn.execute(record, migration.version, migration.name, timeout=timeout)

    async def aclose(self) -> None:
        """Close the pool: wait for calls in flight (bounded), then cut what is left."""
        pool, self._pool = self._pool, None
        self._state = _CLOSED
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self.command_timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            warnings.warn(f"{self!r} was never closed; call aclose()", ResourceWarning,
                          stacklevel=1)

    # -- the one place driver errors are translated ---------------------------------------

    def _translate(self, exc: BaseException, action: str) -> TierstoreError:
        where = f"postgres warm tier {self.url}"
        detail = _one_line(exc)
        if self._secret:
            detail = detail.replace(self._secret, "***")
        if action == "setup" and isinstance(exc, (asyncpg.SyntaxOrAccessError,
                                                  asyncpg.DataError,
                                                  asyncpg.FeatureNotSupportedError)):
            # A refused startup parameter, schema name or missing privilege: the
            # URL or the server's configuration must change, retrying will not help.
            return ConfigurationError(f"{where}: setup refused ({detail})")
        if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
            return ConfigurationError(f"{where}: authentication failed ({detail})")
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            return ConfigurationError(f"{where}: {detail}; create the database first")
        if isinstance(exc, asyncpg.InsufficientPrivilegeError):
            return ConfigurationError(f"{where}: {action} not permitted ({detail})")
        if isinstance(exc, (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError,
                            asyncpg.InvalidSchemaNameError)):
            return ConfigurationError(
                f"{where}: the tierstore schema is missing ({detail}); run setup() first"
            )
        if isinstance(exc, asyncpg.ClientConfigurationError):
            return ConfigurationError(f"{where}: {detail}")
        if isinstance(exc, asyncpg.ProgramLimitExceededError):
            return PayloadTooLarge(f"{where}: {action} exceeds a PostgreSQL limit ({detail})")
        if isinstance(exc, (asyncpg.DataError, UnicodeError)):
            return InvalidInput(f"{where}: {action} refused the data ({detail})")
        if isinstance(exc, (TimeoutError, asyncpg.QueryCanceledError)):
            return TierUnavailable(f"{where}: {action} timed out", tier="warm",
                                   backend=self.backend)
        if isinstance(exc, asyncpg.InterfaceError) and self._state == _CLOSED:
            return LifecycleError(f"{where}: the store was closed during {action}")
        return TierUnavailable(f"{where}: {action} failed ({detail})", tier="warm",
                               backend=self.backend)

    def _require_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None or self._state != _OPENED:
            raise LifecycleError(f"{self!r} is not open; call setup() first")
        return self._pool

    async def _run(self, action: str, body: Callable[[Conn], Awaitable[T]], *,
                   read: bool = False) -> T:
        """Run ``body`` on a pooled connection, translating every driver error.

        A connection that fails at the connection level (the server restarted, its
        backend was terminated, a failover cut the socket, or asyncpg found it still
        consuming a dead operation's error) is terminated rather than returned to the
        pool, and every other connection opened before the failure is expired: they
        point at the same server, so each is replaced at its next acquire instead of
        failing one call apiece. A read retries once on a fresh connection. A write
        retries once only when it never reached the server (no connection could be
        acquired, or the driver refused to start the statement), so a retry can never
        apply it twice; a write cut while it ran fails with ``TierUnavailable``, and
        whether it landed is for the caller to read back.
        """
        pool = self._require_pool()
        for attempt in range(2):
            acquired = False
            try:
                conn = await pool.acquire(timeout=self.command_timeout)
                acquired = True
                try:
                    result = await body(conn)
                except BaseException as exc:
                    if _broken(exc):
                        _discard(conn)  # never hand a half-dead session to the next call
                    if isinstance(exc, asyncio.CancelledError | TimeoutError):
                        # asyncpg's release waits (up to command_timeout) for the server
                        # to confirm the statement's cancel: the caller must not
                        self._release_later(pool, conn)
                    else:
                        await pool.release(conn)
                    raise
                await pool.release(conn)
                return result
            except TierstoreError:
                raise
            except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                    OSError, UnicodeError) as exc:
                if not _broken(exc):
                    raise self._translate(exc, action) from exc
                await pool.expire_connections()
                unsent = not acquired or _refused_before_sending(exc)
                if attempt == 0 and not isinstance(exc, TimeoutError) and (read or unsent):
                    continue
                raise self._translate(exc, action) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _release_later(self, pool: asyncpg.Pool[asyncpg.Record], conn: Conn) -> None:
        """Give ``conn`` back to the pool from a task of its own.

        The release of a connection whose statement was cancelled (or timed out) waits
        for the server to confirm the cancel, and terminates the connection when it does
        not within the pool's timeout; ``aclose`` waits for it like any other release.
        """
        task = asyncio.get_running_loop().create_task(_release_quietly(pool, conn))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    # -- reads --------------------------------------------------------------------------

    async def head(self, thread_id: str, checkpoint_ns: str) -> Head | None:
        async def body(conn: Conn) -> Head | None:
            row = await conn.fetchrow(_HEAD, thread_id, checkpoint_ns)
            return Head(row[0], row[1], row[2]) if row is not None else None

        return await self._run("head", body, read=True)

    async def get(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> StoredCheckpoint | None:
        async def body(conn: Conn) -> asyncpg.Record | None:
            if checkpoint_id is None:
                return await conn.fetchrow(_GET_LATEST, thread_id, checkpoint_ns)
            return await conn.fetchrow(_GET_ONE, thread_id, checkpoint_ns, checkpoint_id)

        row = await self._run("get", body, read=True)
        if row is None:
            return None
        record = _assemble(row)
        if checkpoint_id is None and row["head_version"] is not None:
            record = replace(record, version=int(row["head_version"]))
        return record

    async def list(self, query: ListQuery) -> AsyncIterator[StoredCheckpoint]:
        params: list[Any] = []

        def arg(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        where: list[str] = []
        if query.thread_id is not None and query.checkpoint_ns is not None:
            # One namespace: its rows come in key order straight off the primary key.
            arg(query.thread_id)
            arg(query.checkpoint_ns)
            where.append(f"c.sid = {_SID}")  # refers to $1 and $2
            order, cursor_cols = "c.checkpoint_id DESC", ["c.checkpoint_id"]
        else:
            order = "c.checkpoint_id DESC, h.thread_id DESC, h.checkpoint_ns DESC"
            cursor_cols = ["c.checkpoint_id", "h.thread_id", "h.checkpoint_ns"]
            if query.thread_id is not None:
                t = arg(query.thread_id)
                where.append(f"tierstore_key(h.thread_id) = {_key(t)} "
                             f"AND h.thread_id = {t}")
                order = "c.checkpoint_id DESC, h.checkpoint_ns DESC"
                cursor_cols = ["c.checkpoint_id", "h.checkpoint_ns"]
            if query.checkpoint_ns is not None:
                where.append(f"h.checkpoint_ns = {arg(query.checkpoint_ns)}")
        if query.checkpoint_id is not None:
            where.append(f"c.checkpoint_id = {arg(query.checkpoint_id)}")
        if query.before_id is not None:
            where.append(f"c.checkpoint_id < {arg(query.before_id)}")
        if query.filter:
            wanted = _filter_json(query.filter)
            if wanted is None:
                return  # a value no stored document can hold matches nothing
            where.append(f"c.filter_doc @> {arg(wanted)}::jsonb")

        remaining = query.limit
        cursor: tuple[str, ...] | None = None
        while remaining is None or remaining > 0:
            size = _PAGE if remaining is None else min(_PAGE, remaining)
            page_params = list(params)
            conds = list(where)
            if cursor is not None:
                marks = []
                for value in cursor:
                    page_params.append(value)
                    marks.append(f"${len(page_params)}")
                conds.append(f"({', '.join(cursor_cols)}) < ({', '.join(marks)})")
            page_params.append(size)
            page = (f"{_ROW} WHERE {' AND '.join(conds) or 'true'} "
                    f"ORDER BY {order} LIMIT ${len(page_params)}")
            sql = _ASSEMBLE.format(page=page)

            async def body(conn: Conn, sql: str = sql,
                           args: Sequence[Any] = page_params) -> list[asyncpg.Record]:
                return await conn.fetch(sql, *args)

            records = sorted(
                (_assemble(row) for row in await self._run("list", body, read=True)),
                key=lambda r: (r.checkpoint_id, r.thread_id, r.checkpoint_ns), reverse=True,
            )
            for record in records:
                yield record
            if len(records) < size:
                return
            last = records[-1]
            position = {"c.checkpoint_id": last.checkpoint_id, "h.thread_id": last.thread_id,
                        "h.checkpoint_ns": last.checkpoint_ns}
            cursor = tuple(position[col] for col in cursor_cols)
            if remaining is not None:
                remaining -= len(records)

    # -- writes -------------------------------------------------------------------------

    async def next_fence(self, thread_id: str) -> int:
        async def body(conn: Conn) -> int:
            return int(await conn.fetchval(_NEXT_FENCE, thread_id))

        return await self._run("next_fence", body)

    @staticmethod
    async def _fenced(thread_id: str, token: int, call: Awaitable[T]) -> T:
        """Await a fenced statement; the server's refusal becomes ``LeaseLost``."""
        try:
            return await call
        except asyncpg.PostgresError as exc:
            if exc.sqlstate != _FENCED_OUT:
                raise
            detail = getattr(exc, "detail", None) or "0"
            raise LeaseLost.superseded(thread_id, token, int(detail)) from exc

    async def put_checkpoint(
        self,
        record: CheckpointRecord,
        blobs: Sequence[BlobRecord],
        *,
        strict: bool,
        fence: int | None = None,
    ) -> PutResult:
        versions = {ch: _version_key(v) for ch, v in record.channel_versions.items()}
        # A channel with a version but no value reads back the same with no row: the
        # function stores no row for tag 'empty', but counts it among the new blobs
        # when it checks that every version the checkpoint names is held (0003).
        kept = list(blobs)
        args = (
            record.thread_id, record.checkpoint_ns, record.checkpoint_id, record.parent_id,
            strict, record.run_id, record.checkpoint.tag, record.checkpoint.data,
            record.metadata.tag, record.metadata.data,
            json.dumps(versions, separators=(",", ":")),
            _doc_json(record.filter_doc),
            record.checkpoint.size + record.metadata.size,
            [b.channel for b in kept], [_version_key(b.version) for b in kept],
            [b.payload.tag for b in kept], [b.payload.data for b in kept],
        )

        async def body(conn: Conn) -> asyncpg.Record:
            try:
                if fence is None:
                    row = await conn.fetchrow(_PUT_CHECKPOINT, *args)
                else:
                    row = await self._fenced(record.thread_id, fence,
                                             conn.fetchrow(_PUT_CHECKPOINT_FENCED, fence, *args))
            except asyncpg.PostgresError as exc:
                if exc.sqlstate != _MISSING_BLOBS:
                    raise
                channels = json.loads(getattr(exc, "detail", None) or "[]")
                raise MissingBlobs.of(
                    record.thread_id, record.checkpoint_ns,
                    [(ch, record.channel_versions[ch]) for ch in channels
                     if ch in record.channel_versions],
                ) from exc
            assert row is not None
            return row

        ok, head_id, version, n_writes, conflict = await self._run("put_checkpoint", body)
        if not ok:
            raise VersionConflict(
                f"thread {record.thread_id!r} ns {record.checkpoint_ns!r}: parent "
                f"{record.parent_id!r} is not the head {head_id!r} (version {version})",
                thread_id=record.thread_id, checkpoint_ns=record.checkpoint_ns,
                head_id=head_id, version=version,
            )
        return PutResult(Head(head_id, version, n_writes), conflict)

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
        # One row per (task_id, idx) per statement: the first for idx >= 0, the last
        # for idx < 0, as if the writes had been stored one by one.
        unique: dict[tuple[str, int], WriteRecord] = {}
        for w in writes:
            key = (w.task_id, w.idx)
            if w.idx < 0 or key not in unique:
                unique[key] = w
        rows = list(unique.values())
        args = (
            thread_id, checkpoint_ns, checkpoint_id,
            [w.task_id for w in rows], [w.idx for w in rows], [w.channel for w in rows],
            [w.payload.tag for w in rows], [w.payload.data for w in rows],
            [w.task_path for w in rows],
        )

        async def body(conn: Conn) -> int | None:
            if fence is None:
                version = await conn.fetchval(_PUT_WRITES, *args)
            else:
                version = await self._fenced(thread_id, fence,
                                             conn.fetchval(_PUT_WRITES_FENCED, fence, *args))
            return None if version is None else int(version)

        return await self._run("put_writes", body)

    # -- maintenance --------------------------------------------------------------------

    @staticmethod
    async def _refresh(conn: Conn, sids: Sequence[int]) -> None:
        """Blobs, head and n_writes after checkpoints left (or arrived in) namespaces."""
        await conn.execute(_DROP_ORPHAN_BLOBS, sids)
        await conn.execute(_RECOMPUTE_HEADS, sids)
        await conn.execute(_DROP_EMPTY_STREAMS, sids)

    async def delete_thread(self, thread_id: str) -> None:
        await self._delete_threads([thread_id], "delete_thread")

    async def _delete_threads(self, thread_ids: Sequence[str], action: str) -> None:
        async def body(conn: Conn) -> None:
            async with conn.transaction():
                # Deleting the head rows first waits for puts in flight and makes
                # later puts start new namespaces, so the next statement sees all.
                sids = [r[0] for r in await conn.fetch(_DELETE_THREADS, list(thread_ids))]
                if sids:
                    await conn.execute(_DELETE_STREAMS, sids)

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
                await conn.execute(_DELETE_WRITES_OF, [r[0] for r in doomed],
                                   [r[1] for r in doomed])
                threads = await conn.fetch(
                    "SELECT DISTINCT thread_id FROM tierstore_heads WHERE sid = ANY($1)", touched
                )
                await self._refresh(conn, touched)
                return sorted(r[0] for r in threads)

        return await self._run("delete_for_runs", body)

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        async def body(conn: Conn) -> None:
            async with conn.transaction():
                source = await conn.fetch(
                    f"SELECT h.sid, h.checkpoint_ns FROM tierstore_heads AS h WHERE {_THREADS}",
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
                await self._refresh(conn, dst)

        await self._run("copy_thread", body)

    async def publish_thread(self, source_thread_id: str, target_thread_id: str, *,
                             replace: bool) -> None:
        async def body(conn: Conn) -> None:
            async with conn.transaction():
                src = [r[0] for r in await conn.fetch(
                    f"SELECT h.sid FROM tierstore_heads AS h WHERE {_THREADS}",
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
                await conn.execute(_DELETE_STREAMS, target)
                await _copy_streams(conn, src, [by_ns[ns] for ns in namespaces])
                await self._refresh(conn, target)

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
                    f"SELECT h.sid FROM tierstore_heads AS h WHERE {_THREADS}", list(thread_ids)
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
                    await conn.execute(_DELETE_WRITES_OF, [r[0] for r in doomed],
                                       [r[1] for r in doomed])
                    await self._refresh(conn, sorted({r[0] for r in doomed}))

        await self._run("prune", body)


    # -- tiering: background jobs only ------------------------------------------------------

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
    ) -> Sequence[Claim]:
        """Lease heads with ``FOR NO KEY UPDATE SKIP LOCKED``: concurrent workers skip
        each other's rows (and heads a put holds) instead of queueing behind them."""
        params: list[Any] = []

        def arg(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        conds = ["h.head_id IS NOT NULL",
                 f"(h.lease_until IS NULL OR h.lease_until < {arg(now)})"]
        if thread_id is not None:
            t = arg(thread_id)
            conds.append(f"tierstore_key(h.thread_id) = {_key(t)} AND h.thread_id = {t}")
        if warm_before is not None:
            conds.append(
                "EXISTS (SELECT 1 FROM tierstore_checkpoints AS c WHERE c.sid = h.sid "
                f"AND c.archive_key IS NULL AND c.created_at < to_timestamp({arg(warm_before)}) "
                "AND c.checkpoint_id <> h.head_id)"
            )
            conds.append("(h.settled_head IS NULL OR h.settled_head <> h.head_id OR "
                         f"h.settled_until < {arg(warm_before)})")
        if idle_before is not None:
            conds.append(f"h.updated_at < to_timestamp({arg(idle_before)})")
            if require_live:
                conds.append("EXISTS (SELECT 1 FROM tierstore_checkpoints AS c "
                             "WHERE c.sid = h.sid AND c.archive_key IS NULL)")
        sql = _CLAIM.format(conditions=" AND ".join(conds), limit=arg(limit), owner=arg(owner),
                            until=arg(now + lease_seconds))

        async def body(conn: Conn) -> list[asyncpg.Record]:
            return await conn.fetch(sql, *params)

        rows = await self._run("claim", body)
        claims = [Claim(r[0], r[1], r[2], r[3], int(r[4])) for r in rows]
        return sorted(claims, key=lambda c: c.updated_at)

    async def release(
        self,
        thread_id: str,
        checkpoint_ns: str,
        *,
        owner: str,
        settled_head: str | None = None,
        settled_until: float | None = None,
    ) -> None:
        async def body(conn: Conn) -> None:
            await conn.execute(_RELEASE, thread_id, checkpoint_ns, owner, settled_head,
                               settled_until)

        await self._run("release", body)

    async def release_owned(self, *, owner: str) -> int:
        async def body(conn: Conn) -> str:
            return await conn.execute(
                "UPDATE tierstore_heads SET lease_owner = NULL, lease_until = NULL "
                "WHERE lease_owner = $1", owner)

        status = await self._run("release_owned", body)
        return int(status.rsplit(" ", 1)[-1])

    async def expire_thread(
        self,
        thread_id: str,
        heads: Sequence[Claim],
        *,
        owner: str,
        now: float,
        keep_latest: bool,
    ) -> bool:
        """The heads are locked (``FOR UPDATE``) and compared before anything is
        deleted: a put in flight finishes first and then fails the comparison."""
        expected = {(c.checkpoint_ns, c.head_id, c.version) for c in heads
                    if c.thread_id == thread_id}

        async def body(conn: Conn) -> bool:
            async with conn.transaction():
                rows = [r for r in await conn.fetch(_EXPIRE_LOCK, [thread_id])
                        if r[2] is not None]
                if not rows or any(r[4] != owner or r[5] is None or r[5] < now
                                   for r in rows):
                    return False
                if {(r[1], r[2], int(r[3])) for r in rows} != expected:
                    return False
                if not keep_latest:
                    sids = [r[0] for r in await conn.fetch(_DELETE_THREADS, [thread_id])]
                    if sids:
                        await conn.execute(_DELETE_STREAMS, sids)
                    return True
                doomed = await conn.fetch(
                    "DELETE FROM tierstore_checkpoints AS c WHERE c.sid = ANY($1::bigint[]) "
                    "AND c.checkpoint_id < (SELECT max(l.checkpoint_id) FROM "
                    "tierstore_checkpoints AS l WHERE l.sid = c.sid) "
                    "RETURNING c.sid, c.checkpoint_id",
                    [r[0] for r in rows],
                )
                if doomed:
                    await conn.execute(_DELETE_WRITES_OF, [r[0] for r in doomed],
                                       [r[1] for r in doomed])
                    await self._refresh(conn, sorted({r[0] for r in doomed}))
                return True

        return bool(await self._run("expire_thread", body))

    async def held_claims(
        self, *, now: float, thread_id: str | None = None, exclude_owner: str | None = None
    ) -> ClaimsHeld:
        async def body(conn: Conn) -> asyncpg.Record:
            row = await conn.fetchrow(_HELD_CLAIMS, now, thread_id, exclude_owner)
            assert row is not None
            return row

        count, first, last = await self._run("held_claims", body, read=True)
        return ClaimsHeld(count, first, last)

    async def index(self, thread_id: str, checkpoint_ns: str) -> Sequence[CheckpointMeta]:
        async def body(conn: Conn) -> list[asyncpg.Record]:
            return await conn.fetch(_INDEX, thread_id, checkpoint_ns)

        return [
            CheckpointMeta(thread_id, checkpoint_ns, cid, parent, created,
                           "warm" if key is None else "archived", key, size)
            for cid, parent, created, key, size in await self._run("index", body, read=True)
        ]

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
        ids = list(checkpoint_ids)
        packed = [(cid, w) for cid in ids for w in (writes or {}).get(cid, ())]

        async def body(conn: Conn) -> int:
            async with conn.transaction():
                # The lease is checked under the head row's lock: a worker whose lease
                # ran out cannot turn checkpoints into stubs another worker now owns.
                sid = await conn.fetchval(_LEASED, thread_id, checkpoint_ns, owner, now)
                if sid is None:
                    return 0
                changed = await conn.fetch(
                    "UPDATE tierstore_checkpoints SET archive_key = $3, checkpoint = NULL, "
                    "checkpoint_tag = NULL WHERE sid = $1 AND checkpoint_id = ANY($2::text[]) "
                    "AND archive_key IS NULL RETURNING checkpoint_id",
                    sid, ids, archive_key,
                )
                if len(changed) != len(set(ids)):
                    # some were deleted (or moved) since they were packed: all or nothing,
                    # so a segment never holds a checkpoint a concurrent delete removed
                    raise _NothingMarked
                if writes is None:
                    await conn.execute(
                        "DELETE FROM tierstore_writes WHERE sid = $1 "
                        "AND checkpoint_id = ANY($2::text[])", sid, ids,
                    )
                elif packed:  # only what the segment holds: a later write stays on the stub
                    await conn.execute(
                        "DELETE FROM tierstore_writes AS w USING unnest($2::text[], $3::text[], "
                        "$4::int[], $5::text[], $6::bytea[]) AS p(checkpoint_id, task_id, idx, "
                        "tag, data) WHERE w.sid = $1 AND w.checkpoint_id = p.checkpoint_id "
                        "AND w.task_id = p.task_id AND w.idx = p.idx AND w.tag = p.tag "
                        "AND w.data = p.data",
                        sid, [c for c, _ in packed], [w.task_id for _, w in packed],
                        [w.idx for _, w in packed], [w.payload.tag for _, w in packed],
                        [w.payload.data for _, w in packed],
                    )
                await conn.execute(_DROP_ORPHAN_BLOBS, [sid])
                if changed:  # every cached copy of the head must fail the freshness check
                    await conn.execute(_BUMP_VERSION, sid)
                return len(changed)

        try:
            return await self._run("mark_archived", body)
        except _NothingMarked:
            return 0

    async def rehydrate(self, records: Sequence[StoredCheckpoint]) -> int:
        if not records:
            return 0
        keys = sorted({(r.thread_id, r.checkpoint_ns) for r in records})

        async def body(conn: Conn) -> int:
            async with conn.transaction():
                locked = await conn.fetch(_LOCK_KEYS, [k[0] for k in keys], [k[1] for k in keys])
                sids = {(r[1], r[2]): r[0] for r in locked}
                restored = 0
                touched: set[int] = set()
                for r in records:
                    sid = sids.get((r.thread_id, r.checkpoint_ns))
                    if sid is None:
                        continue
                    row = await conn.fetchrow(
                        "UPDATE tierstore_checkpoints SET archive_key = NULL, "
                        "checkpoint_tag = $3, checkpoint = $4 WHERE sid = $1 "
                        "AND checkpoint_id = $2 AND archive_key IS NOT NULL "
                        "RETURNING channel_versions",
                        sid, r.checkpoint_id, r.checkpoint.tag, r.checkpoint.data,
                    )
                    if row is None:
                        continue  # already live, or deleted meanwhile
                    restored += 1
                    touched.add(sid)
                    stored = json.loads(row[0])
                    blobs = [(ch, stored[ch], p) for ch, p in r.blobs.items()
                             if ch in stored and p != EMPTY]
                    await conn.execute(
                        "INSERT INTO tierstore_blobs (sid, channel, version, tag, data) "
                        "SELECT $1, u.* FROM unnest($2::text[], $3::text[], $4::text[], "
                        "$5::bytea[]) AS u ON CONFLICT DO NOTHING",
                        sid, [b[0] for b in blobs], [b[1] for b in blobs],
                        [b[2].tag for b in blobs], [b[2].data for b in blobs],
                    )
                    await conn.execute(
                        "INSERT INTO tierstore_writes (sid, idx, checkpoint_id, task_id, channel, "
                        "tag, data, task_path) SELECT $1, u.idx, $2, u.task_id, u.channel, "
                        "u.tag, u.data, u.task_path FROM unnest($3::text[], $4::int[], "
                        "$5::text[], $6::text[], $7::bytea[], $8::text[]) "
                        "AS u(task_id, idx, channel, tag, data, task_path) ON CONFLICT DO NOTHING",
                        sid, r.checkpoint_id, [w.task_id for w in r.writes],
                        [w.idx for w in r.writes], [w.channel for w in r.writes],
                        [w.payload.tag for w in r.writes], [w.payload.data for w in r.writes],
                        [w.task_path for w in r.writes],
                    )
                if touched:
                    await conn.execute(_COUNT_HEAD_WRITES, sorted(touched))
                return restored

        return await self._run("rehydrate", body)

    async def archive_refs(
        self, thread_id: str | None = None, *, keys: Sequence[str] | None = None
    ) -> dict[str, int]:
        if keys is not None and not keys:
            return {}
        wanted = sorted(set(keys)) if keys is not None else None

        async def body(conn: Conn) -> list[asyncpg.Record]:
            if thread_id is None and wanted is None:
                return await conn.fetch(
                    "SELECT archive_key, count(*) FROM tierstore_checkpoints "
                    "WHERE archive_key IS NOT NULL GROUP BY archive_key"
                )
            if thread_id is None:  # the archive_key index: O(keys)
                return await conn.fetch(
                    "SELECT archive_key, count(*) FROM tierstore_checkpoints "
                    "WHERE archive_key = ANY($1::text[]) GROUP BY archive_key",
                    wanted,
                )
            return await conn.fetch(
                "SELECT c.archive_key, count(*) FROM tierstore_checkpoints AS c "
                f"JOIN tierstore_heads AS h ON h.sid = c.sid WHERE {_THREADS} "
                "AND c.archive_key IS NOT NULL "
                "AND ($2::text[] IS NULL OR c.archive_key = ANY($2::text[])) "
                "GROUP BY c.archive_key",
                [thread_id], wanted,
            )

        return {key: int(n) for key, n in await self._run("archive_refs", body, read=True)}

    async def archive_stubs(
        self, *, keys: Sequence[str] | None = None, run_ids: Sequence[str] | None = None
    ) -> dict[str, set[str]]:
        if keys is None and run_ids is None:
            raise InvalidInput("archive_stubs needs keys or run_ids")
        if (keys is not None and not keys) or (run_ids is not None and not run_ids):
            return {}

        async def body(conn: Conn) -> list[asyncpg.Record]:
            return await conn.fetch(
                "SELECT archive_key, checkpoint_id FROM tierstore_checkpoints "
                "WHERE archive_key IS NOT NULL "
                "AND ($1::text[] IS NULL OR archive_key = ANY($1::text[])) "
                "AND ($2::text[] IS NULL OR run_id = ANY($2::text[]))",
                list(keys) if keys is not None else None,
                list(run_ids) if run_ids is not None else None,
            )

        out: dict[str, set[str]] = {}
        for key, checkpoint_id in await self._run("archive_stubs", body, read=True):
            out.setdefault(key, set()).add(checkpoint_id)
        return out

    async def repoint_archive(
        self, old_key: str, new_key: str, checkpoint_ids: Sequence[str]
    ) -> int:
        async def body(conn: Conn) -> str:
            return await conn.execute(
                "UPDATE tierstore_checkpoints SET archive_key = $2 "
                "WHERE archive_key = $1 AND checkpoint_id = ANY($3::text[])",
                old_key, new_key, list(checkpoint_ids),
            )

        status = await self._run("repoint_archive", body)
        return int(status.rsplit(" ", 1)[-1])

    async def usage(self) -> TierUsage:
        async def body(conn: Conn) -> asyncpg.Record:
            row = await conn.fetchrow(_USAGE)
            assert row is not None
            return row

        threads, live, archived, size = await self._run("usage", body, read=True)
        return TierUsage(threads=threads, checkpoints=live, archived=archived, bytes=int(size))


# -- helpers --------------------------------------------------------------------------

# Server states that end every session of a server, not one statement: a shutdown,
# a crash restart, a server still starting up.
_SERVER_GONE = (asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
                asyncpg.CannotConnectNowError)


def _broken(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection (not the statement) is gone or unusable.

    A statement's own failure (a constraint, a timeout that cancelled the query)
    leaves the session usable and is not a broken connection.
    """
    if isinstance(exc, TimeoutError):
        return False
    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                            asyncpg.InternalClientError, OSError, *_SERVER_GONE))


async def _release_quietly(pool: asyncpg.Pool[asyncpg.Record], conn: Conn) -> None:
    """Release ``conn``; asyncpg terminates a connection it cannot reset, so a failure
    here has nothing left to clean up and no caller to tell."""
    with contextlib.suppress(Exception):
        await pool.release(conn)


def _discard(conn: Conn) -> None:
    """Terminate a pooled connection, unless its loss already gave it back to the pool."""
    with contextlib.suppress(asyncpg.InterfaceError):  # the proxy is detached once released
        if not conn.is_closed():
            conn.terminate()


def _refused_before_sending(exc: BaseException) -> bool:
    """Whether the driver refused to start a statement, so nothing of it reached the server.

    asyncpg raises ``InternalClientError("cannot switch to state …")`` before writing
    a byte when the connection is still consuming an earlier operation's error (the
    server's FATAL arrived while the connection sat idle in the pool, and the socket's
    close has not been processed yet). Every write body is one statement or one
    transaction, so a body refused at any statement has committed nothing.
    """
    return (isinstance(exc, asyncpg.InternalClientError)
            and str(exc).startswith("cannot switch to state"))



async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Return a connection to the pool as it is.

    asyncpg's default reset costs a round trip on every release (``RESET ALL``,
    ``UNLISTEN *``, …), doubling the round trips of a one-statement call. This
    store never changes session state (its transactions are rolled back by the
    pool when a call fails), so there is nothing to reset.
    """


def _assemble(row: asyncpg.Record) -> StoredCheckpoint:
    blobs = {
        channel: Payload(tag, data)
        for channel, tag, data in zip(row["blob_channels"] or (), row["blob_tags"] or (),
                                      row["blob_data"] or (), strict=True)
    }
    writes = tuple(
        WriteRecord(task_id, idx, channel, Payload(tag, data), path)
        for task_id, idx, channel, tag, data, path in zip(
            row["task_ids"] or (), row["idxs"] or (), row["write_channels"] or (),
            row["write_tags"] or (), row["write_data"] or (), row["write_paths"] or (),
            strict=True,
        )
    )
    archive_key = row["archive_key"]
    return StoredCheckpoint(
        thread_id=row["thread_id"],
        checkpoint_ns=row["checkpoint_ns"],
        checkpoint_id=row["checkpoint_id"],
        parent_id=row["parent_id"],
        checkpoint=Payload(row["checkpoint_tag"] or "", row["checkpoint"] or b""),
        metadata=Payload(row["metadata_tag"], row["metadata"]),
        blobs=blobs,
        writes=writes,
        location="warm" if archive_key is None else "archived",
        archive_key=archive_key,
    )


def _version_key(version: str) -> str:
    """The stored form of a channel version: its leading zeros as a count.

    LangGraph pads version counters to 32 digits so that they sort as text; the
    store only ever matches versions for equality and never returns them, so it
    keeps ``"31~1.0.97…"`` for ``"0000…0001.0.97…"`` (about 30 bytes less in
    every checkpoint's channel_versions, blob row and blob index entry). The
    count is explicit and the rest never starts with ``0``, so distinct versions
    never share a key.
    """
    digits = version.lstrip("0")
    return f"{len(version) - len(digits)}~{digits}"


def _storable(value: Any) -> bool:
    """Whether jsonb can hold ``value`` exactly (no NaN/Infinity, no NUL, valid text)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        if "\x00" in value:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def _doc_json(doc: Mapping[str, Scalar]) -> str:
    """The filter document as jsonb text; entries jsonb cannot hold are left out."""
    kept = {k: v for k, v in doc.items() if _storable(k) and _storable(v)}
    return json.dumps(kept, separators=(",", ":"), ensure_ascii=False)


def _filter_json(flt: Mapping[str, Scalar]) -> str | None:
    """The containment document for a filter, or None if no stored document can match."""
    if not all(_storable(k) and _storable(v) for k, v in flt.items()):
        return None
    return json.dumps(dict(flt), separators=(",", ":"), ensure_ascii=False)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_DOLLAR = re.compile(r"\$[A-Za-z_]*\$")


def _statements(script: str) -> list[str]:
    """Split a script at ``;`` line ends, keeping dollar-quoted bodies whole."""
    out: list[str] = []
    buf: list[str] = []
    quote: str | None = None
    for line in script.splitlines():
        if quote is None and line.strip().startswith("--"):
            continue
        buf.append(line)
        for tag in _DOLLAR.findall(line):
            if quote is None:
                quote = tag
            elif tag == quote:
                quote = None
        if quote is None and line.rstrip().endswith(";"):
            statement = "\n".join(buf).strip()
            if statement.rstrip(";").strip():
                out.append(statement)
            buf = []
    rest = "\n".join(buf).strip()
    if rest:
        out.append(rest)
    return out
