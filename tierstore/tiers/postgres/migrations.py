"""Bringing a database's schema up to date with the files of ``migrations/postgres``,
and its tables to the layout asked for (``partitions``).

``setup()`` runs ``migrate`` on one pooled connection before the store opens;
processes starting together agree on one migrator through an advisory lock. The
conversion of a store's tables to hash partitions (``convert_layout``) holds the
same lock from start to end, so no migration runs halfway through it.

Behind a pooler in transaction mode (``pooled``) a session-level lock
would stay with whichever server connection took it, and the next statement may run
on another: ``migrate`` then takes a transaction-level lock instead, and applies every
pending migration in that one transaction. What cannot run so (a no-transaction
migration, a conversion) is refused there with a ``ConfigurationError``.

Every migration applies to both layouts: plain tables and tables hash-partitioned by
``sid`` (``partitions``). What that asks of a new migration file:

- no storage parameters on the three partitioned tables (``ALTER TABLE … SET
  (fillfactor …)`` is refused for a partitioned table): set them on its partitions;
- a unique index or constraint on them includes ``sid``;
- no system column (``xmax``, ``ctid``) read from them: PostgreSQL refuses
  ``RETURNING xmax`` from an insert into a partitioned table;
- ``CREATE INDEX CONCURRENTLY`` (in a no-transaction migration) works: on a
  partitioned table the runner builds it partition by partition and attaches each.

``tests/contract/test_postgres_partitions.py`` applies every shipped migration to a
partitioned store and runs the warm contract on it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Final

from tierstore.errors import ConfigurationError, TierUnavailable
from tierstore.migrate import Migration, apply_pending, shipped, sql_statements
from tierstore.tiers.postgres import partitions as layouts
from tierstore.tiers.postgres.sql import Conn, quote_ident

_NO_TRANSACTION: Final = "-- tierstore:no-transaction"
"""A migration whose first lines carry this marker runs statement by statement,
outside a transaction (``CREATE INDEX CONCURRENTLY`` needs that); it must be
written so that running it again after a crash is harmless."""

_CONCURRENT_INDEX: Final = re.compile(
    r"\s*CREATE\s+(?P<unique>UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    r"(?P<name>\w+)\s+ON\s+(?P<table>\w+)\s+(?P<rest>.*?)\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)


async def migrate(conn: Conn, *, url: str, schema: str | None, setup_timeout: float,
                  partitions: int | None = None, pooled: bool = False,
                  local_settings: str | None = None) -> None:
    """Apply pending migrations, once, however many processes start together; with
    ``partitions``, create the tables partitioned or check that they are.

    An advisory lock (one per schema) elects one migrator. The others poll for
    it rather than block on it: a process blocked inside a statement holds a
    snapshot, which a ``CREATE INDEX CONCURRENTLY`` run by the migrator would
    wait for, forever. Each migration commits together with its version row,
    so a crash leaves the version table telling the truth.

    ``partitions`` applies when the schema is created, or to a store whose tables are
    still empty; a store holding rows in plain tables is refused (it is converted with
    ``convert_layout``, online), and so is one partitioned into another count.
    """

    async def up_to_date() -> bool:
        if await _applied(conn, setup_timeout) < (await shipped("postgres"))[-1].version:
            return False
        return partitions is None or await layouts.layout(conn) == partitions

    if pooled:
        await _migrate_in_transactions(conn, url=url, schema=schema,
                                       setup_timeout=setup_timeout, partitions=partitions,
                                       local_settings=local_settings, done=up_to_date)
        return
    if await up_to_date():
        return
    if not await _lock(conn, url=url, schema=schema, setup_timeout=setup_timeout, done=up_to_date):
        return
    try:
        await _apply_all(conn, schema=schema, setup_timeout=setup_timeout)
        if partitions is not None:
            await _ensure_layout(conn, partitions, url=url, setup_timeout=setup_timeout)
    finally:
        await _unlock(conn, schema=schema, setup_timeout=setup_timeout)


async def _migrate_in_transactions(
    conn: Conn, *, url: str, schema: str | None, setup_timeout: float,
    partitions: int | None, local_settings: str | None,
    done: Callable[[], Awaitable[bool]],
) -> None:
    """``migrate`` through a transaction pooler: each attempt is one transaction that
    checks, takes the lock with ``pg_try_advisory_xact_lock`` and migrates; one that
    finds the lock taken rolls back (holding no snapshot while it waits) and polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + setup_timeout
    while True:
        async with conn.transaction():
            if local_settings is not None:
                await conn.execute(local_settings, timeout=setup_timeout)
            if await done():
                return
            if await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
                                   _key(schema), timeout=setup_timeout):
                await _apply_all(conn, schema=schema, setup_timeout=setup_timeout,
                                 url=url, in_transaction=True)
                if partitions is not None:
                    await _ensure_layout(conn, partitions, url=url, setup_timeout=setup_timeout)
                return
        if loop.time() > deadline:
            raise TierUnavailable(
                f"postgres warm tier {url}: another process held the migration "
                f"lock for more than setup_timeout={setup_timeout:g}s",
                tier="warm", backend="postgres",
            )
        await asyncio.sleep(0.1)


def _key(schema: str | None) -> str:
    return f"tierstore.migrate:{schema or ''}"


async def convert_layout(
    conn: Conn, *, url: str, schema: str | None, setup_timeout: float, partitions: int,
    tuning: layouts.Tuning | None = None, progress: layouts.Progress | None = None,
    phase: layouts.Phase | None = None,
) -> layouts.Conversion:
    """Bring the schema up to date, then hash-partition the tables online
    (``partitions.convert``), all under the migration lock."""
    layouts.check_count(partitions)
    await _lock(conn, url=url, schema=schema, setup_timeout=setup_timeout, done=None)
    try:
        await _apply_all(conn, schema=schema, setup_timeout=setup_timeout)
        return await layouts.convert(conn, partitions, tuning=tuning, progress=progress,
                                     phase=phase, ddl_timeout=setup_timeout)
    finally:
        await _unlock(conn, schema=schema, setup_timeout=setup_timeout)


async def abandon_conversion(conn: Conn, *, url: str, schema: str | None,
                             setup_timeout: float) -> bool:
    """Remove what an unfinished conversion made, under the migration lock."""
    await _lock(conn, url=url, schema=schema, setup_timeout=setup_timeout, done=None)
    try:
        return await layouts.abandon(conn)
    finally:
        await _unlock(conn, schema=schema, setup_timeout=setup_timeout)


async def _ensure_layout(conn: Conn, partitions: int, *, url: str,
                         setup_timeout: float) -> None:
    current = await layouts.layout(conn)
    if current == partitions:
        return
    if current is not None:
        raise ConfigurationError(
            f"postgres warm tier {url}: its tables are hash-partitioned into {current} "
            f"partitions, not partitions={partitions}; a store keeps the count it was "
            f"created or converted with (set partitions={current} or leave it out)")
    if await layouts.conversion_underway(conn) is not None or await layouts.holds_rows(conn):
        raise ConfigurationError(
            f"postgres warm tier {url}: partitions={partitions} lays out a new store, and "
            "this one already holds data in plain tables; convert it online with "
            f"`tierstore migrate --partitions {partitions}` (README: Partitioning), or "
            "leave partitions out of the URL")
    await layouts.create(conn, partitions, ddl_timeout=setup_timeout)


async def _lock(conn: Conn, *, url: str, schema: str | None, setup_timeout: float,
                done: Callable[[], Awaitable[bool]] | None) -> bool:
    """Take the migration lock, polling; False (and no lock) once ``done()`` says
    another process did the work meanwhile."""
    key = _key(schema)
    timeout = setup_timeout
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                                  key, timeout=timeout):
        if loop.time() > deadline:
            raise TierUnavailable(
                f"postgres warm tier {url}: another process held the migration "
                f"lock for more than setup_timeout={timeout:g}s",
                tier="warm", backend="postgres",
            )
        await asyncio.sleep(0.1)
        if done is not None and await done():
            return False
    return True


async def _unlock(conn: Conn, *, schema: str | None, setup_timeout: float) -> None:
    key = _key(schema)
    try:
        await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key,
                           timeout=setup_timeout)
    except BaseException:
        conn.terminate()  # a session still holding the lock must not be reused
        raise


async def _apply_all(conn: Conn, *, schema: str | None, setup_timeout: float,
                     url: str = "", in_transaction: bool = False) -> None:
    """Apply what the version table lacks; ``in_transaction``: inside the caller's
    transaction, refusing a migration that must run outside one."""
    timeout = setup_timeout
    if schema is not None:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}",
                           timeout=timeout)
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS tierstore_migrations (version integer PRIMARY KEY, "
        "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
        timeout=timeout,
    )
    done = {r[0] for r in await conn.fetch("SELECT version FROM tierstore_migrations",
                                            timeout=timeout)}

    async def apply(migration: Migration) -> None:
        if in_transaction and no_transaction(migration):
            raise ConfigurationError(
                f"postgres warm tier {url}: migration {migration.version:04d} "
                f"({migration.name}) runs outside a transaction, which a pooler in "
                "transaction mode cannot keep on one server connection; run `tierstore "
                "migrate` with the server's own URL (without pooler=transaction) first")
        await apply_migration(conn, migration, setup_timeout=timeout)

    await apply_pending("postgres", applied=done, apply=apply)


async def _applied(conn: Conn, setup_timeout: float) -> int:
    timeout = setup_timeout
    exists = await conn.fetchval("SELECT to_regclass('tierstore_migrations') IS NOT NULL",
                                 timeout=timeout)
    if not exists:
        return 0
    value = await conn.fetchval("SELECT coalesce(max(version), 0) FROM tierstore_migrations",
                                timeout=timeout)
    return int(value)


async def apply_migration(conn: Conn, migration: Migration, *, setup_timeout: float) -> None:
    timeout = setup_timeout
    record = "INSERT INTO tierstore_migrations (version, name) VALUES ($1, $2)"
    if no_transaction(migration):
        for statement in sql_statements(migration.text):
            index = _CONCURRENT_INDEX.match(statement)
            if index is not None and await conn.fetchval(
                    "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)",
                    index["table"], timeout=timeout):
                await _index_partitions(conn, index, setup_timeout=timeout)
            else:
                await conn.execute(statement, timeout=timeout)
        await conn.execute(record, migration.version, migration.name, timeout=timeout)
        return
    async with conn.transaction():
        await conn.execute(migration.text, timeout=timeout)
        await conn.execute(record, migration.version, migration.name, timeout=timeout)


def no_transaction(migration: Migration) -> bool:
    """Whether ``migration`` carries the no-transaction marker in its first lines."""
    head = migration.text.lstrip().splitlines()[:3]
    return any(line.strip() == _NO_TRANSACTION for line in head)


async def _index_partitions(conn: Conn, index: re.Match[str], *, setup_timeout: float
                            ) -> None:
    """``CREATE INDEX CONCURRENTLY`` on a partitioned table, which PostgreSQL refuses: the
    index on the parent alone (not valid yet), then each partition's built concurrently
    and attached; the parent's is valid once all are. Running it again finishes the job:
    a partition's index left invalid by a crash is dropped and built again."""
    timeout = setup_timeout
    unique = "UNIQUE " if index["unique"] else ""
    name, table, rest = index["name"], index["table"], index["rest"]
    await conn.execute(f"CREATE {unique}INDEX IF NOT EXISTS {quote_ident(name)} "
                       f"ON ONLY {quote_ident(table)} {rest}", timeout=timeout)
    parts = [r[0] for r in await conn.fetch(
        "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass($1) ORDER BY c.relname", table, timeout=timeout)]
    for part in parts:
        suffix = part[len(table) + 1:] if part.startswith(table + "_") else part
        child = f"{name}_{suffix}"[:63]
        if await conn.fetchval("SELECT NOT indisvalid FROM pg_index "
                               "WHERE indexrelid = to_regclass($1)", child, timeout=timeout):
            await conn.execute(f"DROP INDEX CONCURRENTLY {quote_ident(child)}",
                               timeout=timeout)
        await conn.execute(f"CREATE {unique}INDEX CONCURRENTLY IF NOT EXISTS "
                           f"{quote_ident(child)} ON {quote_ident(part)} {rest}",
                           timeout=timeout)
        await conn.execute(f"ALTER INDEX {quote_ident(name)} ATTACH PARTITION "
                           f"{quote_ident(child)}", timeout=timeout)
