"""The PostgreSQL warm tier beyond the shared contract: round trips, parallelism,
URL options, data PostgreSQL cannot hold, migrations, and a LangGraph graph on top.

Each test works in a schema of its own inside the session database, so it can
count rows without seeing other tests' data.
"""

from __future__ import annotations

import asyncio
import math
import operator
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, TypedDict

import asyncpg
import pytest
from langgraph.graph import END, START, StateGraph

from tests.builders import cid, record, write
from tests.servers.postgres import with_query
from tierstore import TieredSaver
from tierstore.codec.pipeline import EMPTY
from tierstore.errors import (
    ConfigurationError,
    InvalidInput,
    LifecycleError,
    VersionConflict,
)
from tierstore.migrate import Migration, migrations_for, sql_statements
from tierstore.records import BlobRecord, ListQuery, Payload
from tierstore.settings import StoreUrl
from tierstore.tiers.postgres import PostgresWarm
from tierstore.tiers.postgres.migrations import apply_migration

DEADLINE = 30.0


@pytest.fixture
def schema_url(postgres_url: str) -> str:
    return with_query(postgres_url, schema=f"t_{uuid.uuid4().hex[:10]}")


@pytest.fixture
async def warm(schema_url: str) -> AsyncIterator[PostgresWarm]:
    store = PostgresWarm.from_url(StoreUrl.parse(schema_url))
    await store.setup()
    try:
        yield store
    finally:
        await store.aclose()


async def sql(warm: PostgresWarm, query: str, *args: Any) -> list[asyncpg.Record]:
    """Read the store's tables directly, in its schema."""
    assert warm._pool is not None
    async with warm._pool.acquire() as conn:
        return list(await conn.fetch(query, *args))


# -- round trips ------------------------------------------------------------------------


@pytest.fixture
async def counted(schema_url: str) -> AsyncIterator[tuple[PostgresWarm, list[str]]]:
    """A one-connection store whose every statement is recorded."""
    store = PostgresWarm.from_url(StoreUrl.parse(schema_url), min_size="1", max_size="1")
    await store.setup()
    statements: list[str] = []
    assert store._pool is not None
    async with store._pool.acquire() as conn:
        conn.add_query_logger(lambda q: statements.append(q.query))
    try:
        yield store, statements
    finally:
        await store.aclose()


async def test_each_operation_is_one_statement(
    counted: tuple[PostgresWarm, list[str]],
) -> None:
    warm, statements = counted
    # The first use of each statement on a connection also prepares it and looks up
    # its array types; count the steady state.
    w = f"warm-up-{uuid.uuid4()}"
    await warm.put_checkpoint(record(w, 1), [BlobRecord("c", "1", Payload("m", b""))],
                              strict=True)
    await warm.put_writes(w, "", cid(1), [write("a", 0)])
    await warm.head(w, "")
    await warm.get(w, "", None)
    await warm.get(w, "", cid(1))
    _ = [r async for r in warm.list(ListQuery(thread_id=w, checkpoint_ns=""))]
    t = f"t-{uuid.uuid4()}"

    async def count(call: Any) -> int:
        statements.clear()
        await call
        return len(statements)

    blob = BlobRecord("messages", "v1", Payload("msgpack", b"hello"))
    assert await count(warm.put_checkpoint(record(t, 1, versions={"messages": "v1"}),
                                           [blob], strict=True)) == 1
    assert await count(warm.put_writes(t, "", cid(1), [write("a", 0), write("a", -1)])) == 1
    assert await count(warm.head(t, "")) == 1
    assert await count(warm.get(t, "", None)) == 1
    assert await count(warm.get(t, "", cid(1))) == 1
    for n in range(2, 30):
        await warm.put_checkpoint(record(t, n, parent=n - 1, versions={"messages": "v1"}), [],
                                  strict=True)
    statements.clear()
    history = [r async for r in warm.list(ListQuery(thread_id=t, checkpoint_ns=""))]
    assert len(history) == 29 and len(statements) == 1
    assert all(r.blobs["messages"].data == b"hello" for r in history)
    assert [len(r.writes) for r in history][-1] == 2


async def test_a_blocked_thread_does_not_hold_up_the_others(
    warm: PostgresWarm, schema_url: str, postgres_url: str,
) -> None:
    """No lock in Python: a put waiting on one thread's head row leaves others running."""
    stuck, free = f"stuck-{uuid.uuid4()}", f"free-{uuid.uuid4()}"
    await warm.put_checkpoint(record(stuck, 1), [], strict=False)
    await warm.put_checkpoint(record(free, 1), [], strict=False)
    schema = StoreUrl.parse(schema_url).query["schema"]
    blocker = await asyncpg.connect(postgres_url, server_settings={"search_path": schema})
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM tierstore_heads WHERE thread_id = $1 FOR UPDATE",
                              stuck)
        waiting = asyncio.ensure_future(
            warm.put_checkpoint(record(stuck, 2, parent=1), [], strict=True))
        for n in range(2, 12):
            await asyncio.wait_for(
                warm.put_checkpoint(record(free, n, parent=n - 1), [], strict=True), DEADLINE)
        assert await asyncio.wait_for(warm.get(free, "", None), DEADLINE) is not None
        assert not waiting.done()
        await tx.rollback()
        result = await asyncio.wait_for(waiting, DEADLINE)
        assert result.head.checkpoint_id == cid(2)
    finally:
        await blocker.close()


async def test_concurrent_put_writes_count_each_row_once(warm: PostgresWarm) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1), [], strict=False)
    batches = [[write(f"task-{i % 5}", j) for j in range(4)] + [write(f"task-{i % 5}", -3)]
               for i in range(20)]
    await asyncio.gather(*(warm.put_writes(t, "", cid(1), b) for b in batches))
    head = await warm.head(t, "")
    got = await warm.get(t, "", None)
    assert got is not None and head is not None
    assert len(got.writes) == 5 * 5
    assert head.n_writes == 25


# -- URL options --------------------------------------------------------------------------


async def test_url_options_configure_the_pool_and_never_reach_the_server(
    postgres_url: str,
) -> None:
    schema = f"opt_{uuid.uuid4().hex[:8]}"
    url = with_query(postgres_url, min_size="2", max_size="3", command_timeout="7",
                     connect_timeout="4", setup_timeout="60", statement_cache_size="0",
                     schema=schema, application_name="my-app", sslmode="disable")
    store = PostgresWarm.from_url(StoreUrl.parse(url))
    assert (store.min_size, store.max_size, store.command_timeout, store.schema) == (
        2, 3, 7.0, schema)
    await store.setup()
    try:
        row = (await sql(store, "SELECT current_setting('application_name'), current_schema(),"
                                " current_setting('jit')"))[0]
        assert tuple(row) == ("my-app", schema, "off")
        assert store._pool is not None and store._pool.get_size() == 2
    finally:
        await store.aclose()
        await store.aclose()  # idempotent
    with pytest.raises(LifecycleError):
        await store.setup()
    with pytest.raises(LifecycleError):
        await store.head("t", "")


@pytest.mark.parametrize(
    ("query", "kwargs", "message"),
    [
        ("max_size=lots", {}, "bad pool option"),
        ("min_size=5&max_size=2", {}, "min_size <= max_size"),
        ("command_timeout=0", {}, "command_timeout must be a positive number"),
        ("", {"pool": 3}, "unknown postgres option"),
    ],
)
def test_bad_options_are_configuration_errors(
    query: str, kwargs: dict[str, Any], message: str
) -> None:
    url = StoreUrl.parse(f"postgresql://u:secret@127.0.0.1/db?{query}")
    with pytest.raises(ConfigurationError, match=message) as info:
        PostgresWarm.from_url(url, **kwargs)
    assert "secret" not in str(info.value)


async def test_an_unknown_server_setting_is_a_configuration_error(postgres_url: str) -> None:
    store = PostgresWarm.from_url(StoreUrl.parse(with_query(postgres_url, no_such_setting="1")))
    with pytest.raises(ConfigurationError, match="setup refused"):
        await store.setup()


async def test_operations_before_setup_are_refused(postgres_url: str) -> None:
    store = PostgresWarm.from_url(StoreUrl.parse(postgres_url))
    with pytest.raises(LifecycleError):
        await store.get("t", "", None)
    await store.aclose()


# -- data ---------------------------------------------------------------------------------


async def test_versions_that_differ_only_in_zeros_stay_apart(warm: PostgresWarm) -> None:
    t = f"t-{uuid.uuid4()}"
    versions = ["", "0", "00", "1", "01", "001", "10", "0~1", "1~", "0" * 32 + "1.0.5"]
    for n, version in enumerate(versions):
        await warm.put_checkpoint(
            record(t, n, versions={"c": version}),
            [BlobRecord("c", version, Payload("msgpack", version.encode() or b"-"))],
            strict=False,
        )
    for n, version in enumerate(versions):
        got = await warm.get(t, "", cid(n))
        assert got is not None and got.blobs["c"].data == (version.encode() or b"-")
    rows = await sql(warm, "SELECT count(*) FROM tierstore_blobs")
    assert rows[0][0] == len(versions)


async def test_empty_channels_take_no_blob_row(warm: PostgresWarm) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(
        record(t, 1, versions={"full": "1", "empty": "1"}),
        [BlobRecord("full", "1", Payload("msgpack", b"x")), BlobRecord("empty", "1", EMPTY)],
        strict=False,
    )
    got = await warm.get(t, "", None)
    assert got is not None and got.blobs == {"full": Payload("msgpack", b"x")}
    assert (await sql(warm, "SELECT count(*) FROM tierstore_blobs"))[0][0] == 1


async def test_values_postgres_cannot_hold(warm: PostgresWarm) -> None:
    t = f"t-{uuid.uuid4()}"
    doc = {"nan": math.nan, "inf": math.inf, "nul": "a\x00b", "ok": "yes", "n\x00k": 1}
    await warm.put_checkpoint(record(t, 1, doc=doc), [], strict=False)
    assert [r.checkpoint_id async for r in warm.list(
        ListQuery(thread_id=t, filter={"ok": "yes"}))] == [cid(1)]
    for flt in ({"nan": math.nan}, {"nul": "a\x00b"}, {"inf": math.inf}):
        assert [r async for r in warm.list(ListQuery(thread_id=t, filter=flt))] == []
    with pytest.raises(InvalidInput):
        await warm.put_writes(t, "", cid(1), [write("task", 0, channel="bad\x00channel")])
    assert (await warm.get(t, "", None)) is not None  # the store is still fine
    head = await warm.head(t, "")
    assert head is not None and head.n_writes == 0


async def test_large_payloads_round_trip(warm: PostgresWarm) -> None:
    t = f"t-{uuid.uuid4()}"
    big = bytes(range(256)) * (20 * 1024 * 4)  # 20 MiB, incompressible enough
    await warm.put_checkpoint(record(t, 1, versions={"big": "1"}),
                              [BlobRecord("big", "1", Payload("bytes", big))], strict=False)
    got = await warm.get(t, "", None)
    assert got is not None and got.blobs["big"].data == big


async def test_removed_checkpoints_take_their_orphaned_blobs_along(warm: PostgresWarm) -> None:
    t = f"t-{uuid.uuid4()}"
    for n in range(4):
        await warm.put_checkpoint(
            record(t, n, parent=n - 1 if n else None, versions={"a": str(n), "keep": "0"},
                   run_id=f"run-{n}"),
            [BlobRecord("a", str(n), Payload("msgpack", b"a")),
             *([BlobRecord("keep", "0", Payload("msgpack", b"k"))] if n == 0 else [])],
            strict=False,
        )
    before = await warm.head(t, "")
    assert before is not None
    assert await warm.delete_for_runs(["run-3"]) == [t]
    blobs = await sql(warm, "SELECT channel, version FROM tierstore_blobs ORDER BY 1, 2")
    assert [tuple(b) for b in blobs] == [("a", "0~1"), ("a", "0~2"), ("a", "1~"), ("keep", "1~")]
    head = await warm.head(t, "")
    assert head is not None and head.checkpoint_id == cid(2) and head.version > before.version
    await warm.prune([t], keep_latest=True)
    blobs = await sql(warm, "SELECT channel FROM tierstore_blobs ORDER BY 1")
    assert [b[0] for b in blobs] == ["a", "keep"]
    await warm.delete_for_runs(["run-2"])
    assert await warm.head(t, "") is None
    assert (await sql(warm, "SELECT count(*) FROM tierstore_blobs"))[0][0] == 0
    assert (await sql(warm, "SELECT count(*) FROM tierstore_heads"))[0][0] == 0


# -- migrations ---------------------------------------------------------------------------


def test_scripts_split_at_statement_ends_but_not_inside_dollar_quotes() -> None:
    script = (
        "-- tierstore:no-transaction\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x);\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\n"
        "BEGIN\n  RETURN 1;\nEND\n$body$;\n"
        "-- a comment;\n"
        "SELECT 1"
    )
    assert sql_statements(script) == [
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x);",
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\n"
        "BEGIN\n  RETURN 1;\nEND\n$body$;",
        "SELECT 1",
    ]


async def test_a_migration_marked_no_transaction_runs_outside_one(warm: PostgresWarm) -> None:
    next_version = len(migrations_for("postgres")) + 1
    migration = Migration(
        next_version, "writes_by_channel",
        "-- tierstore:no-transaction\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS tierstore_test_concurrently\n"
        "    ON tierstore_writes (channel);\n",
    )
    assert warm._pool is not None
    async with warm._pool.acquire() as conn:
        await apply_migration(conn, migration, setup_timeout=warm.setup_timeout)
    rows = await sql(warm, "SELECT indisvalid FROM pg_index WHERE indexrelid = "
                           "'tierstore_test_concurrently'::regclass")
    assert [r[0] for r in rows] == [True]
    versions = await sql(warm, "SELECT version FROM tierstore_migrations ORDER BY 1")
    assert [v[0] for v in versions] == list(range(1, next_version + 1))


# -- a LangGraph graph on top ---------------------------------------------------------------


class State(TypedDict):
    items: Annotated[list[str], operator.add]


def graph(saver: TieredSaver) -> Any:
    builder = StateGraph(State)
    builder.add_node("step", lambda s: {"items": [f"out-{len(s['items'])}"]})
    builder.add_edge(START, "step")
    builder.add_edge("step", END)
    return builder.compile(checkpointer=saver)


async def test_a_graph_runs_on_the_postgres_warm_tier(schema_url: str) -> None:
    async with TieredSaver.from_urls(hot=None, warm=schema_url, cold=None) as saver:
        app = graph(saver)
        config = {"configurable": {"thread_id": f"'; DROP TABLE x; -- {uuid.uuid4()}"}}
        for turn in range(3):
            await app.ainvoke({"items": [f"in-{turn}"]}, config)
        state = await app.aget_state(config)
        assert state.values["items"] == ["in-0", "out-1", "in-1", "out-3", "in-2", "out-5"]
        history = [s async for s in app.aget_state_history(config)]
        assert len(history) == 9
        await app.aupdate_state(config, {"items": ["edited"]})
        assert (await app.aget_state(config)).values["items"][-1] == "edited"


def test_the_sync_api_and_strict_concurrency(schema_url: str) -> None:
    with TieredSaver.from_urls(hot=None, warm=schema_url, cold=None,
                               concurrency="strict") as saver:
        app = graph(saver)
        config = {"configurable": {"thread_id": f"t-{uuid.uuid4()}"}}
        app.invoke({"items": ["a"]}, config)
        stale = saver.get_tuple(config)
        assert stale is not None
        app.invoke({"items": ["b"]}, config)
        with pytest.raises(VersionConflict) as info:
            saver.put(stale.config, stale.checkpoint, stale.metadata, {})
        assert info.value.head_id == saver.get_tuple(config).config["configurable"][
            "checkpoint_id"]


@pytest.fixture
def other_database(postgres_server: str) -> Iterator[str]:
    from tests.servers.postgres import scratch_database

    with scratch_database(postgres_server, "tierstore_x") as url:
        yield url


async def test_default_schema_and_postgres_scheme(other_database: str) -> None:
    url = other_database.replace("postgresql://", "postgres://", 1)
    async with TieredSaver.from_urls(hot=None, warm=url, cold=None) as saver:
        app = graph(saver)
        config = {"configurable": {"thread_id": "plain"}}
        await app.ainvoke({"items": ["x"]}, config)
    conn = await asyncpg.connect(other_database)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
        assert [t[0] for t in tables] == [
            "tierstore_blobs", "tierstore_checkpoints", "tierstore_fences",
            "tierstore_heads", "tierstore_migrations", "tierstore_writes"]
    finally:
        await conn.close()
