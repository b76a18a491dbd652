"""The PostgreSQL tier behind PgBouncer in transaction mode (``pooler=transaction``).

PgBouncer (``tests/servers/pgbouncer.py``) runs with ``pool_mode = transaction``, three
server connections per database and no ``ignore_startup_parameters``, so that every
transaction may land on another server connection than the one before it. LangGraph's
conformance suite, turns racing on several threads, migrations started together, and
the misconfigurations a team meets first all run through it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from langchain_core.runnables import RunnableConfig

from tests.builders import record
from tests.integration.test_concurrency import ask, human_texts, single_chain
from tests.integration.test_conformance import TieringEverywhere, run_conformance
from tests.servers.pgbouncer import POOL_SIZE, Bouncer
from tests.servers.postgres import run_sql, with_database, with_query
from tests.stacks import Stack
from tierstore import TieredSaver, VersionConflict
from tierstore.concurrency import retry_on_conflict_sync
from tierstore.demo import build_agent
from tierstore.errors import ConfigurationError
from tierstore.migrate import Migration
from tierstore.settings import StoreUrl
from tierstore.tiers.postgres import PostgresWarm


def cfg(thread: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread}}


CLIENTS = 8
"""The store's own pool: more connections than PgBouncer has server connections."""


def pooled_url(bouncer: Bouncer, postgres_url: str, **options: str) -> str:
    """A schema of its own in the session database, through PgBouncer."""
    options = {"schema": f"pgb_{uuid.uuid4().hex[:12]}", "max_size": str(CLIENTS), **options}
    return with_query(bouncer.through(postgres_url), **options)


@pytest.fixture
def warm_url(pgbouncer: Bouncer, postgres_url: str) -> str:
    return pooled_url(pgbouncer, postgres_url, pooler="transaction")


@asynccontextmanager
async def opened(url: str, **kw: Any) -> AsyncIterator[PostgresWarm]:
    store = PostgresWarm.from_url(StoreUrl.parse(url), **kw)
    await store.setup()
    try:
        yield store
    finally:
        await store.aclose()


async def server_settings(url: str) -> list[tuple[Any, ...]]:
    """What the server connections behind the pooler run with, outside the store's
    transactions: one short transaction per server connection at once."""
    conns = [await asyncpg.connect(url, statement_cache_size=0) for _ in range(POOL_SIZE)]
    try:
        rows = []
        for conn in conns:
            await conn.execute("BEGIN")
            row = await conn.fetchrow(
                "SELECT current_setting('search_path'), current_setting('enable_seqscan'), "
                "current_setting('jit'), current_setting('jit_above_cost')")
            assert row is not None
            rows.append(tuple(row))
        return rows
    finally:
        for conn in conns:
            await conn.close()


# -- LangGraph's conformance suite, and tiering, through the pooler ------------------------


async def test_conformance_through_pgbouncer(warm_url: str) -> None:
    await run_conformance("postgres-pgbouncer", Stack("postgres-pgbouncer", None, warm_url,
                                                      None), TieredSaver)


async def test_conformance_with_tiering_after_every_write_through_pgbouncer(
    warm_url: str, tmp_path: Path
) -> None:
    before = TieringEverywhere.moved
    stack = Stack("postgres-pgbouncer+file", None, warm_url, f"file://{tmp_path}/cold")
    await run_conformance("postgres-pgbouncer+file+archiving", stack, TieringEverywhere)
    assert TieringEverywhere.moved - before > 50  # claims, leases and moves went through


# -- settings per transaction, nothing left on the server connections ----------------------


async def test_every_call_runs_with_the_store_settings_and_leaves_none_behind(
    warm_url: str, pgbouncer: Bouncer, postgres_url: str
) -> None:
    async with opened(warm_url) as store:
        assert store.statement_cache_size == 0
        schema = store.schema
        assert schema is not None

        async def probe(conn: Any) -> tuple[Any, ...]:
            return tuple(await conn.fetchrow(
                "SELECT current_schema(), current_setting('enable_seqscan'), "
                "current_setting('jit_above_cost'), current_setting('application_name')"))

        seen = await asyncio.gather(*(store._run("probe", probe, read=True)
                                      for _ in range(3 * CLIENTS)))
        assert set(seen) == {(schema, "off", "-1", "tierstore")}
        await store.put_checkpoint(record("t", 1), [], strict=True)
        assert (await store.head("t", "")) is not None
        for row in await server_settings(pgbouncer.through(postgres_url)):
            assert row[1:] == ("on", "on", "100000") and schema not in row[0]


# -- many turns at once, on several threads, sharing three server connections -------------


def test_turns_racing_on_several_threads_keep_every_input_once(
    warm_url: str, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tierstore")
    threads, inputs = 4, 12
    with Stack("pgbouncer", None, warm_url, None).open(concurrency="strict") as saver:
        app: Any = build_agent().compile(checkpointer=saver)
        for t in range(threads):
            app.invoke(ask("hello"), cfg(f"t{t}"))

        def turn(i: int) -> None:
            retry_on_conflict_sync(app.invoke, ask(f"remember item {i}"), cfg(f"t{i % threads}"))

        with ThreadPoolExecutor(max_workers=2 * threads) as pool:
            list(pool.map(turn, range(threads * inputs)))
        for t in range(threads):
            values = app.get_state(cfg(f"t{t}")).values
            mine = [i for i in range(threads * inputs) if i % threads == t]
            assert human_texts(values) == Counter(
                ["hello", *(f"remember item {i}" for i in mine)])
            assert Counter(values["notes"]) == Counter(f"item {i}" for i in mine)
            assert values["turns"] == inputs + 1
            history = list(saver.list(cfg(f"t{t}")))
            assert [h.parent_config["configurable"]["checkpoint_id"] if h.parent_config
                    else None for h in history] == [
                h.config["configurable"]["checkpoint_id"] for h in history[1:]] + [None]
        assert 0 < asyncio.run(_server_connections(postgres_url)) <= POOL_SIZE
    retried = [r for r in caplog.records if r.getMessage().startswith("version conflict")]
    assert retried  # the optimistic lock refused turns, and they were sent again


async def _server_connections(postgres_url: str) -> int:
    """Backends of the session database other than this one: PgBouncer's (the other
    tests of the module run one at a time and close what they open)."""
    conn = await asyncpg.connect(postgres_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        return count
    finally:
        await conn.close()


async def test_racing_turns_without_retry_refuse_the_losers(warm_url: str) -> None:
    async with Stack("pgbouncer", None, warm_url, None).open(concurrency="strict") as saver:
        app: Any = build_agent().compile(checkpointer=saver)
        await app.ainvoke(ask("hello"), cfg("losers"))
        results = await asyncio.gather(
            *(app.ainvoke(ask(f"remember item {i}"), cfg("losers")) for i in range(12)),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, dict)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert winners and losers and len(winners) + len(losers) == 12
        assert all(isinstance(e, VersionConflict) for e in losers), losers
        notes = (await app.aget_state(cfg("losers"))).values["notes"]
        assert len(notes) == len(winners)
        assert await single_chain(saver, "losers")


# -- migrations through the pooler ---------------------------------------------------------


async def test_stores_starting_together_migrate_once_and_leave_no_lock(
    warm_url: str, pgbouncer: Bouncer, postgres_url: str
) -> None:
    stores = [PostgresWarm.from_url(StoreUrl.parse(warm_url), max_size=2) for _ in range(6)]
    try:
        await asyncio.gather(*(s.setup() for s in stores))
        assert [await s.head("t", "") for s in stores] == [None] * len(stores)
    finally:
        for s in stores:
            await s.aclose()
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())") == 0
        versions = await conn.fetch(f'SELECT version FROM "{stores[0].schema}".'
                                    "tierstore_migrations ORDER BY 1")
    finally:
        await conn.close()
    assert [v[0] for v in versions] == list(range(1, len(versions) + 1))


async def test_partitions_given_at_creation_are_laid_out_through_the_pooler(
    pgbouncer: Bouncer, postgres_url: str
) -> None:
    url = pooled_url(pgbouncer, postgres_url, pooler="transaction", partitions="4")
    async with opened(url) as store:
        await store.put_checkpoint(record("t", 1), [], strict=True)
        assert (await store.head("t", "")) is not None
        got = await store._run("layout", lambda conn: conn.fetchval(
            "SELECT count(*) FROM pg_inherits "
            "WHERE inhparent = to_regclass('tierstore_checkpoints')"), read=True)
        assert got == 4


async def test_what_must_hold_the_lock_across_transactions_is_refused(
    warm_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with opened(warm_url) as store:
        with pytest.raises(ConfigurationError, match="server's own URL"):
            await store.partition(4)
        with pytest.raises(ConfigurationError, match="server's own URL"):
            await store.abandon_partitioning()

    import tierstore.migrate

    shipped = tierstore.migrate.migrations_for("postgres")
    concurrently = Migration(len(shipped) + 1, "by_channel",
                             "-- tierstore:no-transaction\n"
                             "CREATE INDEX CONCURRENTLY IF NOT EXISTS tierstore_test_by_channel"
                             "\n    ON tierstore_writes (channel);\n")

    def with_one_more(backend: str) -> list[Migration]:
        return [*shipped, concurrently]

    monkeypatch.setattr(tierstore.migrate, "migrations_for", with_one_more)
    store = PostgresWarm.from_url(StoreUrl.parse(warm_url))
    with pytest.raises(ConfigurationError, match="without pooler=transaction"):
        await store.setup()
    await store.aclose()


# -- the settings as the server's defaults (pooler_settings=server) ------------------------


async def test_settings_the_server_applies_are_checked_and_then_cost_nothing(
    postgres_server: str, pgbouncer: Bouncer
) -> None:
    database = f"tierstore_{uuid.uuid4().hex[:12]}"
    run_sql(postgres_server, f'CREATE DATABASE "{database}"')
    try:
        url = with_query(pgbouncer.through(with_database(postgres_server, database)),
                         pooler="transaction", pooler_settings="server", schema="agents")
        store = PostgresWarm.from_url(StoreUrl.parse(url))
        with pytest.raises(ConfigurationError, match="ALTER ROLE") as info:
            await store.setup()
        await store.aclose()
        assert "SET enable_seqscan = off" in str(info.value)
        run_sql(with_database(postgres_server, database),
                *(f'ALTER ROLE CURRENT_USER IN DATABASE "{database}" SET {item}'
                  for item in ("search_path = agents", "enable_seqscan = off", "jit = off")))
        # the pooler's server connections opened before keep the old settings
        await _close_server_connections(with_database(postgres_server, database))
        async with opened(url) as store:
            await store.put_checkpoint(record("t", 1), [], strict=True)
            assert (await store.head("t", "")) is not None

            async def probe(conn: Any) -> tuple[Any, ...]:
                row = await conn.fetchrow(
                    "SELECT current_schema(), current_setting('enable_seqscan'), "
                    "current_setting('jit'), current_setting('jit_above_cost')")
                return tuple(row)

            # the server's settings, and none set by the store (jit_above_cost as it was)
            assert await store._run("probe", probe, read=True) == ("agents", "off", "off",
                                                                   "100000")
        other = with_query(url.replace("schema=agents", "schema=other"))
        store = PostgresWarm.from_url(StoreUrl.parse(other))
        with pytest.raises(ConfigurationError, match='SET search_path = "other"'):
            await store.setup()
        await store.aclose()
    finally:
        run_sql(postgres_server, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


async def _close_server_connections(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    finally:
        await conn.close()


# -- the misconfigurations a team meets first ----------------------------------------------


async def test_a_store_without_the_option_is_told_to_add_it(
    pgbouncer: Bouncer, postgres_url: str
) -> None:
    store = PostgresWarm.from_url(StoreUrl.parse(pooled_url(pgbouncer, postgres_url)))
    with pytest.raises(ConfigurationError, match="add pooler=transaction") as info:
        await store.setup()
    assert "unsupported startup parameter" in str(info.value)
    await store.aclose()


async def test_named_statements_through_a_pooler_are_told_to_add_the_option(
    postgres_server: str
) -> None:
    """A PgBouncer told to ignore the startup parameters lets the store connect; its named
    statements then live on whichever server connection prepared them. Here another
    client's ``DEALLOCATE ALL`` on the one server connection drops them, as a server
    connection replaced by the pooler (``server_lifetime``) or handed to another client
    would."""
    database = f"tierstore_{uuid.uuid4().hex[:12]}"
    run_sql(postgres_server, f'CREATE DATABASE "{database}"')
    bouncer = Bouncer(postgres_server, pool_size=1,
                      ignore_startup_parameters="jit,enable_seqscan")
    try:
        url = with_query(bouncer.through(with_database(postgres_server, database)),
                         max_size="2")
        async with opened(url) as store:
            assert await store.head("t", "") is None  # prepared, on the one server
            other = await asyncpg.connect(url.split("?")[0], statement_cache_size=0)
            try:
                await other.execute("DEALLOCATE ALL")
            finally:
                await other.close()
            with pytest.raises(ConfigurationError, match="add pooler=transaction") as info:
                await store.head("t", "")
            assert "prepared statement" in str(info.value)
    finally:
        bouncer.stop()
        run_sql(postgres_server, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("pooler=session", "pooler must be one of transaction"),
        ("pooler=transaction&statement_cache_size=100", "leave statement_cache_size out"),
        ("pooler_settings=server", "give pooler=transaction too"),
        ("pooler=transaction&pooler_settings=role", "pooler_settings must be one of"),
    ],
)
def test_bad_pooler_options_are_configuration_errors(query: str, message: str) -> None:
    url = StoreUrl.parse(f"postgresql://u:secret@127.0.0.1/db?{query}")
    with pytest.raises(ConfigurationError, match=message):
        PostgresWarm.from_url(url)


def test_the_option_turns_the_statement_cache_off() -> None:
    url = "postgresql://u@127.0.0.1/db?pooler=transaction&statement_cache_size=0"
    assert PostgresWarm.from_url(StoreUrl.parse(url)).statement_cache_size == 0
    plain = PostgresWarm.from_url(StoreUrl.parse("postgresql://u@127.0.0.1/db"))
    assert (plain.statement_cache_size, plain.pooler) == (100, None)
