"""Bringing a database's schema up to date with the files of ``migrations/postgres``.

``setup()`` runs ``migrate`` on one pooled connection before the store opens;
processes starting together agree on one migrator through an advisory lock.
"""

from __future__ import annotations

import asyncio
from typing import Final

from tierstore.errors import TierUnavailable
from tierstore.migrate import Migration, apply_pending, migrations_for, sql_statements
from tierstore.tiers.postgres.sql import Conn, quote_ident

_NO_TRANSACTION: Final = "-- tierstore:no-transaction"
"""A migration whose first lines carry this marker runs statement by statement,
outside a transaction (``CREATE INDEX CONCURRENTLY`` needs that); it must be
written so that running it again after a crash is harmless."""


async def migrate(conn: Conn, *, url: str, schema: str | None, setup_timeout: float) -> None:
    """Apply pending migrations, once, however many processes start together.

    An advisory lock (one per schema) elects one migrator. The others poll for
    it rather than block on it: a process blocked inside a statement holds a
    snapshot, which a ``CREATE INDEX CONCURRENTLY`` run by the migrator would
    wait for, forever. Each migration commits together with its version row,
    so a crash leaves the version table telling the truth.
    """
    latest = migrations_for("postgres")[-1].version
    timeout = setup_timeout
    if await _applied(conn, timeout) >= latest:
        return
    key = f"tierstore.migrate:{schema or ''}"
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
        if await _applied(conn, timeout) >= latest:
            return
    try:
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
            await apply_migration(conn, migration, setup_timeout=timeout)

        await apply_pending("postgres", applied=done, apply=apply)
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key,
                               timeout=timeout)
        except BaseException:
            conn.terminate()  # a session still holding the lock must not be reused
            raise


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
    head = migration.text.lstrip().splitlines()[:3]
    if any(line.strip() == _NO_TRANSACTION for line in head):
        for statement in sql_statements(migration.text):
            await conn.execute(statement, timeout=timeout)
        await conn.execute(record, migration.version, migration.name, timeout=timeout)
        return
    async with conn.transaction():
        await conn.execute(migration.text, timeout=timeout)
        await conn.execute(record, migration.version, migration.name, timeout=timeout)
