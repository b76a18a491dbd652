"""PostgreSQL with the checkpoint tables hash-partitioned by thread (``partitions=N``).

The warm contract runs on a 16-partition store through ``tests/stacks.py`` (``WARM``),
and LangGraph's conformance suite too (``CONFORMANCE_ONLY_STACKS``). Here: the layout a
new store gets, what setup refuses, that every shipped migration applies to a partitioned
store, and the online conversion of a store in use (rows and reads equal before and after,
a conversion that stopped resumes, writers keep writing while it runs).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.builders import blob, cid, record, write
from tests.integration.test_cli import tty_cli
from tests.servers.postgres import PrivateCluster, run_sql, with_query
from tierstore.errors import ConfigurationError, MissingBlobs, VersionConflict
from tierstore.migrate import Migration, migrations_for
from tierstore.records import Head, ListQuery, StoredCheckpoint
from tierstore.settings import StoreUrl
from tierstore.tiers.postgres import PostgresWarm
from tierstore.tiers.postgres import partitions as layouts
from tierstore.tiers.postgres.migrations import apply_migration

N = 16
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def new_url(postgres_url: str) -> Callable[[], str]:
    """URLs of schemas of their own in the session database."""
    return lambda: with_query(postgres_url, schema=f"p_{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def stores() -> AsyncIterator[Callable[..., Awaitable[PostgresWarm]]]:
    """Open stores (``await stores(url, **options)``), all closed at the end."""
    opened: list[PostgresWarm] = []

    async def open_(url: str, **options: Any) -> PostgresWarm:
        store = PostgresWarm.from_url(StoreUrl.parse(url), **options)
        await store.setup()
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.aclose()


async def sql(store: PostgresWarm, query: str, *args: Any) -> list[asyncpg.Record]:
    assert store._pool is not None
    async with store._pool.acquire() as conn:
        return list(await conn.fetch(query, *args))


async def layout_of(store: PostgresWarm) -> int | None:
    assert store._pool is not None
    async with store._pool.acquire() as conn:
        return await layouts.layout(conn)


async def underway(store: PostgresWarm) -> int | None:
    assert store._pool is not None
    async with store._pool.acquire() as conn:
        return await layouts.conversion_underway(conn)


# -- what every thread holds ---------------------------------------------------------------


async def seed(store: PostgresWarm, threads: int, *, prefix: str = "t") -> list[str]:
    """Threads with history, blobs, pending writes (replacing ones too), run ids,
    metadata, and a second namespace on some."""
    names = [f"{prefix}{i}" for i in range(threads)]
    for i, thread in enumerate(names):
        for ns in ("", "sub") if i % 4 == 0 else ("",):
            for n in range(4):
                await store.put_checkpoint(
                    record(thread, n, parent=n - 1 if n else None, ns=ns,
                           run_id=f"run-{i % 3}", versions={"a": f"{n}", "b": "1"},
                           doc={"step": n, "kind": "even" if i % 2 == 0 else "odd"}),
                    [blob("a", f"{n}", f"a{n}-{thread}".encode())]
                    + ([blob("b", "1", b"b")] if n == 0 else []),
                    strict=False)
                await store.put_writes(thread, ns, cid(n), [
                    write("task", 0, f"w{n}", channel="a"), write("task", -1, "err")])
            await store.put_writes(thread, ns, cid(3), [write("task", -1, "replaced")])
    return names


async def reads(store: PostgresWarm, threads: list[str]) -> dict[str, Any]:
    """What the store answers for each thread: its history whole, its latest checkpoint,
    a filtered list and a DeltaChannel-style walk."""

    async def listed(query: ListQuery) -> list[StoredCheckpoint]:
        return [r async for r in store.list(query)]

    out: dict[str, Any] = {}
    for thread in threads:
        latest = await store.get(thread, "", None)
        out[thread] = (
            await listed(ListQuery(thread_id=thread)),
            latest,
            await listed(ListQuery(thread_id=thread, filter={"step": 2})),
            await store.ancestors(thread, "", cid(3), ["a"], limit=10),
            await store.head(thread, ""),
        )
    return out


async def dump(store: PostgresWarm) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in key order: a conversion must not change one."""
    keys = {"tierstore_heads": "sid", "tierstore_checkpoints": "sid, checkpoint_id",
            "tierstore_blobs": "sid, channel, version",
            "tierstore_writes": "sid, checkpoint_id, task_id, idx"}
    return {t: [tuple(r) for r in await sql(store, f"SELECT * FROM {t} ORDER BY {k}")]
            for t, k in keys.items()}


async def conversion_objects(store: PostgresWarm) -> set[str]:
    """Tables, indexes and functions a conversion makes and removes when it ends."""
    rows = await sql(store, "SELECT relname FROM pg_class "
                            "WHERE relnamespace = current_schema()::regnamespace "
                            "AND (relname LIKE 'tierstore\\_partitioning%' "
                            "OR relname LIKE '%\\_partitioned' OR relname LIKE '%\\_new') "
                            "UNION ALL SELECT proname FROM pg_proc "
                            "WHERE pronamespace = current_schema()::regnamespace "
                            "AND proname LIKE 'tierstore\\_partitioning%' "
                            "UNION ALL SELECT tgname FROM pg_trigger WHERE NOT tgisinternal "
                            "AND tgrelid::regclass::text LIKE 'tierstore%'")
    return {r[0] for r in rows}


class Stop(Exception):
    """Ends a conversion midway, as a crash or a Ctrl-C would."""


def stop_after(batches: int) -> Callable[[int, int | None], None]:
    calls = 0

    def progress(done: int, total: int | None) -> None:
        nonlocal calls
        calls += 1
        if calls >= batches:
            raise Stop

    return progress


# -- a new store ---------------------------------------------------------------------------


def _normalised(definition: str, schema: str) -> str:
    return definition.replace(" ONLY ", " ").replace(f"{schema}.", "")


async def schema_of(store: PostgresWarm) -> dict[str, Any]:
    """Columns, constraints and indexes of the three tables, as a plain store has them."""
    assert store.schema is not None
    out: dict[str, Any] = {}
    for table in layouts.TABLES:
        columns = await sql(
            store, "SELECT attname, format_type(atttypid, atttypmod), attcollation, attnotnull, "
                   "pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute AS a "
                   "LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
                   "WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped "
                   "ORDER BY a.attnum", table)
        constraints = await sql(
            store, "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                   "WHERE conrelid = $1::regclass ORDER BY conname", table)
        indexes = await sql(
            store, "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index AS i "
                   "JOIN pg_class AS c ON c.oid = i.indexrelid "
                   "WHERE i.indrelid = $1::regclass ORDER BY 1", table)
        out[table] = ([tuple(c) for c in columns], [tuple(c) for c in constraints],
                      [(i[0], _normalised(i[1], store.schema)) for i in indexes])
    return out


async def test_a_new_store_is_created_partitioned_with_the_plain_schema(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]]) -> None:
    plain = await stores(new_url())
    url = new_url()
    store = await stores(url, partitions=N)
    assert await layout_of(plain) is None
    assert await layout_of(store) == N
    # every column, constraint and index of the plain schema, by name, on the parents
    assert await schema_of(store) == await schema_of(plain)
    for table in layouts.TABLES:
        bounds = await sql(
            store, "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits AS i "
                   "JOIN pg_class AS c ON c.oid = i.inhrelid "
                   "WHERE i.inhparent = $1::regclass ORDER BY 1", table)
        assert [tuple(b) for b in bounds] == [
            (f"{table}_p{r:02d}", f"FOR VALUES WITH (modulus {N}, remainder {r})")
            for r in range(N)]
        # each partition carries every index of the parent
        per_partition = await sql(
            store, "SELECT count(*) FROM pg_index WHERE indrelid = $1::regclass",
            f"{table}_p07")
        assert per_partition[0][0] == len((await schema_of(plain))[table][2])
    # the count is checked on every open, the option may be left out
    assert await layout_of(await stores(url, partitions=N)) == N
    assert await layout_of(await stores(url)) == N
    with pytest.raises(ConfigurationError, match=f"hash-partitioned into {N} partitions, "
                                                 "not partitions=8"):
        await stores(url, partitions=8)


@pytest.mark.parametrize("value", ["1", "0", "-4", "65", "256", "1024", "x", "2.5"])
def test_a_partition_count_out_of_range_is_refused(postgres_url: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match="partitions"):
        PostgresWarm.from_url(StoreUrl.parse(with_query(postgres_url, partitions=value)))


async def test_the_largest_count_lays_out_on_a_default_server(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]]) -> None:
    """64 partitions of the three tables and their indexes, in one transaction, fit the
    lock table of a server with PostgreSQL's default max_locks_per_transaction."""
    store = await stores(new_url(), partitions=layouts.MAX_PARTITIONS)
    assert (await sql(store, "SHOW max_locks_per_transaction"))[0][0] == "64"
    assert await layout_of(store) == layouts.MAX_PARTITIONS


async def test_laying_out_waits_up_to_setup_timeout_not_command_timeout(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]],
        postgres_url: str) -> None:
    """The partitions are created under the setup timeout: a store whose statements may
    take 0.5 s still lays out its tables when their lock is held for longer than that."""
    url = new_url()
    await stores(url)  # plain and empty
    schema = url.rsplit("schema=", 1)[1]
    holder, watcher = await asyncpg.connect(postgres_url), await asyncpg.connect(postgres_url)
    try:
        blocker = holder.transaction()
        await blocker.start()
        await holder.execute(f"LOCK TABLE {schema}.tierstore_checkpoints IN ACCESS SHARE MODE")
        opening = asyncio.ensure_future(stores(with_query(url, partitions=str(N),
                                                          command_timeout="0.5")))
        # release once the lay-out has waited for the lock past command_timeout (or failed)
        while not opening.done() and not await watcher.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database() "
                "AND query LIKE 'LOCK TABLE tierstore_checkpoints%' "
                "AND clock_timestamp() - query_start > interval '1.5 seconds')"):
            await asyncio.wait({opening}, timeout=0.1)
        await blocker.rollback()
        store = await opening
    finally:
        await holder.close()
        await watcher.close()
    assert await layout_of(store) == N


async def test_a_lock_table_too_small_for_the_partitions_is_a_configuration_error(
        postgres_cluster: PrivateCluster) -> None:
    """A server whose lock table cannot hold the partitions' locks for one transaction:
    the error names max_locks_per_transaction, and the store stays plain."""
    postgres_cluster.stop()
    postgres_cluster.start(max_locks_per_transaction="10", max_connections="20")
    try:
        url = with_query(postgres_cluster.url, schema="small_lock_table")
        store = PostgresWarm.from_url(StoreUrl.parse(with_query(url, partitions="64")))
        with pytest.raises(ConfigurationError,
                           match=r"ran out of lock slots laying out 64 partitions.*"
                                 r"raise max_locks_per_transaction"):
            await store.setup()
        await store.aclose()
        plain = PostgresWarm.from_url(StoreUrl.parse(url))
        await plain.setup()
        try:
            assert await layout_of(plain) is None
        finally:
            await plain.aclose()
    finally:
        postgres_cluster.stop()
        del postgres_cluster.settings["max_locks_per_transaction"]
        del postgres_cluster.settings["max_connections"]
        postgres_cluster.start()


async def test_setup_lays_out_an_empty_store_and_refuses_one_holding_data(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]]) -> None:
    empty = new_url()
    await stores(empty)  # created plain, no rows yet: still laid out on request
    assert await layout_of(await stores(empty, partitions=N)) == N

    url = new_url()
    plain = await stores(url)
    await seed(plain, 2)
    before = await dump(plain)
    with pytest.raises(ConfigurationError,
                       match=f"already holds data in plain tables; convert it online with "
                             f"`tierstore migrate --partitions {N}`"):
        await stores(url, partitions=N)
    assert await layout_of(plain) is None and await dump(plain) == before


# -- migrations ------------------------------------------------------------------------------


async def exercise(store: PostgresWarm) -> list[Any]:
    """Every statement and function of the schema once: strict and permissive puts, the
    held-versions check, kept and replacing writes, reads, filters, the ancestor walk,
    copy, publish, prune, deletes by run and by thread, usage, claims and an archive move.
    Versions (the clock) are left out; everything else must match a plain store's."""
    out: list[Any] = []
    threads = await seed(store, 5)  # t0 has a second namespace
    out.append(await reads(store, threads))
    out.append(await store.put_writes("t1", "", cid(3), [write("task", -1, "again"),
                                                         write("new", 0, "n")]) is not None)
    with pytest.raises(VersionConflict):
        await store.put_checkpoint(record("t1", 9, parent=1, versions={"a": "3"}), [],
                                   strict=True)
    with pytest.raises(MissingBlobs):
        await store.put_checkpoint(record("t1", 9, parent=3, versions={"a": "gone"}), [],
                                   strict=False)
    await store.copy_thread("t2", "t2-copy")
    await store.publish_thread("t3", "t3-published", replace=False)
    await store.prune(["t4"], keep_latest=True)
    out.append(sorted(await store.delete_for_runs(["run-0"])))
    await store.delete_thread("t1")
    claims = await store.claim(owner="w", now=1e12, lease_seconds=60, limit=10, thread_id="t2")
    out.append(sorted((c.thread_id, c.checkpoint_ns, c.head_id) for c in claims))
    out.append(await store.mark_archived("t2", "", [cid(0), cid(1)], archive_key="seg-1",
                                         owner="w", now=1e12))
    out.append(await store.archive_refs("t2"))
    out.append([(m.checkpoint_id, m.location) for m in await store.index("t2", "")])
    usage = await store.usage()
    out.append((usage.threads, usage.checkpoints, usage.archived))
    out.append(await reads(store, [*threads, "t2-copy", "t3-published"]))
    return comparable(out, versions=False)


def comparable(value: Any, *, versions: bool = True) -> Any:
    """``value`` with each checkpoint's pending writes in the saver's order (a store hands
    them over in any order), and without head versions when ``versions`` is false (they
    come from the clock, so two stores given the same calls differ in them)."""
    if isinstance(value, StoredCheckpoint):
        writes = tuple(sorted(value.writes, key=lambda w: (w.task_path, w.task_id, w.idx)))
        return replace(value, writes=writes, version=value.version if versions else 0)
    if isinstance(value, Head) and not versions:
        return (value.checkpoint_id, value.n_writes)
    if isinstance(value, dict):
        return {k: comparable(v, versions=versions) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [comparable(v, versions=versions) for v in value]
    return value


SHIPPED = migrations_for("postgres")
_PLAIN: list[Any] = []


async def plain_exercise(url: str, stores: Callable[..., Awaitable[PostgresWarm]]) -> Any:
    """What ``exercise`` returns on a plain store (computed once)."""
    if not _PLAIN:
        _PLAIN.append(await exercise(await stores(url)))
    return _PLAIN[0]


@pytest.mark.parametrize("k", sorted({1, len(SHIPPED) // 2, len(SHIPPED)}))
async def test_every_migration_applies_to_a_partitioned_store(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]],
        k: int) -> None:
    """A store partitioned after migration k takes migrations k+1 … latest, then behaves
    as a plain store: after the first, every later migration meets partitioned tables."""
    expected = await plain_exercise(new_url(), stores)
    url = new_url()
    schema = StoreUrl.parse(url).query["schema"]
    conn = await asyncpg.connect(url.split("?")[0])
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"; SET search_path = "{schema}"; '
                           "CREATE TABLE tierstore_migrations (version integer PRIMARY KEY, "
                           "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        for migration in SHIPPED[:k]:
            await apply_migration(conn, migration, setup_timeout=60)
        await layouts.create(conn, N)
    finally:
        await conn.close()
    store = await stores(url, partitions=N)
    assert await layout_of(store) == N
    versions = await sql(store, "SELECT version FROM tierstore_migrations ORDER BY 1")
    assert [v[0] for v in versions] == [m.version for m in SHIPPED]
    assert await exercise(store) == expected


async def test_a_concurrent_index_migration_builds_on_every_partition(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]]) -> None:
    store = await stores(new_url(), partitions=N)
    await seed(store, 3)
    migration = Migration(
        len(SHIPPED) + 1, "writes_by_channel",
        "-- tierstore:no-transaction\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS tierstore_test_by_channel\n"
        "    ON tierstore_writes (channel) WHERE idx < 0;\n",
    )
    assert store._pool is not None
    async with store._pool.acquire() as conn:
        await apply_migration(conn, migration, setup_timeout=60)
    built = await sql(store, "SELECT indisvalid, pg_get_indexdef(indexrelid) FROM pg_index "
                             "WHERE indexrelid = 'tierstore_test_by_channel'::regclass")
    assert [tuple(b) for b in built] == [
        (True, f"CREATE INDEX tierstore_test_by_channel ON ONLY {store.schema}.tierstore_writes "
               "USING btree (channel) WHERE (idx < 0)")]
    children_sql = ("SELECT c.relname, x.indisvalid FROM pg_inherits AS i "
                    "JOIN pg_index AS x ON x.indexrelid = i.inhrelid "
                    "JOIN pg_class AS c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = 'tierstore_test_by_channel'::regclass ORDER BY 1")
    assert [tuple(c) for c in await sql(store, children_sql)] == [
        (f"tierstore_test_by_channel_p{r:02d}", True) for r in range(N)]
    # a crash midway: the parent's index not valid yet, a partition's build left invalid
    # and not attached, the others not built; the migration runs again and finishes
    for statement in (
            "DROP INDEX tierstore_test_by_channel",
            "CREATE INDEX tierstore_test_by_channel ON ONLY tierstore_writes (channel) "
            "WHERE idx < 0",
            "CREATE INDEX tierstore_test_by_channel_p03 ON tierstore_writes_p03 (channel) "
            "WHERE idx < 0",
            "UPDATE pg_index SET indisvalid = false "
            "WHERE indexrelid = 'tierstore_test_by_channel_p03'::regclass"):
        await sql(store, statement)
    async with store._pool.acquire() as conn:
        await apply_migration(conn, replace(migration, version=migration.version + 1),
                              setup_timeout=60)
    assert [tuple(c) for c in await sql(store, children_sql)] == [
        (f"tierstore_test_by_channel_p{r:02d}", True) for r in range(N)]
    valid = await sql(store, "SELECT indisvalid FROM pg_index "
                             "WHERE indexrelid = 'tierstore_test_by_channel'::regclass")
    assert [v[0] for v in valid] == [True]


# -- converting a store in use -----------------------------------------------------------------


async def change_everything(store: PostgresWarm, threads: list[str]) -> None:
    """Inserts, updates and deletes in rows already copied and rows not yet copied."""
    first, second, last = threads[0], threads[1], threads[-1]
    await store.put_checkpoint(record(first, 4, parent=3, versions={"a": "4", "b": "1"}),
                               [blob("a", "4", b"a4")], strict=False)
    await store.put_writes(first, "", cid(4), [write("late", 0, "x"), write("late", -2, "y")])
    await store.put_writes(second, "", cid(3), [write("task", -1, "replaced again")])
    await store.put_checkpoint(record(last, 1, parent=0, versions={"a": "rewritten", "b": "1"},
                                      checkpoint=b"rewritten"),
                               [blob("a", "rewritten", b"r")], strict=False)  # an upsert
    await store.delete_thread(threads[2])
    await store.prune([threads[3]], keep_latest=True)
    await store.copy_thread(threads[4], "copied-during-conversion")
    await store.delete_for_runs(["run-1"])
    await seed(store, 2, prefix="new-during-conversion-")


@pytest.mark.parametrize("swap_below", [0, 10**9],
                         ids=["caught-up-in-rounds", "caught-up-under-the-swap-lock"])
async def test_a_conversion_that_stopped_resumes_and_misses_no_change(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]],
        swap_below: int) -> None:
    url = new_url()
    store = await stores(url)  # the application's store: stays open throughout
    threads = await seed(store, 12)
    everyone = [*threads, "copied-during-conversion", "new-during-conversion-0",
                "new-during-conversion-1"]
    converter = PostgresWarm.from_url(StoreUrl.parse(url))
    tuning = layouts.Tuning(batch_rows=7, swap_below=swap_below)
    with pytest.raises(Stop):
        await converter.partition(N, tuning=tuning, progress=stop_after(12))
    assert await underway(store) == N and await layout_of(store) is None
    assert {"tierstore_partitioning", "tierstore_partitioning_log",
            "tierstore_checkpoints_partitioned"} <= await conversion_objects(store)

    await change_everything(store, threads)  # noted by the triggers
    rows, answers = await dump(store), comparable(await reads(store, everyone))

    report = await converter.partition(N, tuning=tuning)
    assert report.converted and report.resumed and report.threads_caught_up > 0
    assert (report.catch_up_rounds > 0) == (swap_below == 0)
    assert await layout_of(store) == N and await underway(store) is None
    assert await dump(store) == rows
    assert await schema_of(store) == await schema_of(await stores(new_url()))
    # read through the pool opened before the swap, by statements prepared on the old tables
    assert comparable(await reads(store, everyone)) == answers
    assert await conversion_objects(store) == set()
    again = await converter.partition(N)
    assert not again.converted


async def test_a_conversion_names_each_phase_as_it_starts(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]]) -> None:
    url = new_url()
    await seed(await stores(url), 3)
    phases: list[str] = []
    copied: list[int] = []
    report = await PostgresWarm.from_url(StoreUrl.parse(url)).partition(
        N, tuning=layouts.Tuning(batch_rows=5), phase=phases.append,
        progress=lambda done, total: copied.append(done))
    assert report.converted
    assert phases == ["prepare", "copy", "index", "analyse", "index", "catch up", "swap"]
    assert copied and copied[-1] == report.rows_copied


async def test_writers_keep_writing_while_the_store_is_converted(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]]) -> None:
    """Puts, writes, copies and deletes run while the conversion copies, catches up and
    swaps; afterwards every thread reads as on a plain store that got the same calls."""
    url = new_url()
    store = await stores(url, max_size=4)
    reference = await stores(new_url())
    threads = await seed(store, 10)
    await seed(reference, 10)

    def turn(k: int) -> Callable[[PostgresWarm], Awaitable[Any]]:
        thread = threads[k % len(threads)]
        n = 4 + k // len(threads)

        async def run(s: PostgresWarm) -> Any:
            if k % 17 == 16:
                return await s.copy_thread(thread, f"copy-{k}")
            await s.put_checkpoint(record(thread, n, parent=n - 1, versions={"a": f"{n}",
                                                                              "b": "1"}),
                                   [blob("a", f"{n}", f"{k}".encode())], strict=False)
            await s.put_writes(thread, "", cid(n), [write("task", 0, f"{k}"),
                                                    write("task", -1, f"e{k}")])
            return await s.get(thread, "", None)

        return run

    turns = [turn(k) for k in range(120)]
    converter = PostgresWarm.from_url(StoreUrl.parse(url))
    copying = asyncio.Event()  # the writes start once the triggers note them
    conversion = asyncio.ensure_future(converter.partition(
        N, tuning=layouts.Tuning(batch_rows=5, swap_below=3),
        phase=lambda name: copying.set() if name == "copy" else None))
    await asyncio.wait([conversion, asyncio.ensure_future(copying.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    assert copying.is_set(), conversion.exception()
    during = 0
    for run in turns:
        await run(store)
        during += not conversion.done()
    report = await conversion
    assert during > 10 and report.threads_caught_up > 0 and await layout_of(store) == N
    for run in turns:
        await run(reference)
    everyone = [*threads, *(f"copy-{k}" for k in range(120) if k % 17 == 16)]
    assert comparable(await reads(store, everyone), versions=False) \
        == comparable(await reads(reference, everyone), versions=False)


async def test_a_release_between_two_runs_is_carried_into_the_copies(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]]) -> None:
    """A migration applied while a conversion was stopped: an index is built on the copies
    when it resumes; a column makes it start over."""
    url = new_url()
    store = await stores(url)
    await seed(store, 4)
    converter = PostgresWarm.from_url(StoreUrl.parse(url))
    tuning = layouts.Tuning(batch_rows=3)
    with pytest.raises(Stop):
        await converter.partition(N, tuning=tuning, progress=stop_after(3))
    await sql(store, "CREATE INDEX tierstore_writes_by_channel ON tierstore_writes (channel)")
    report = await converter.partition(N, tuning=tuning)
    assert report.resumed and report.discarded is None
    built = await sql(store, "SELECT count(*) FROM pg_index WHERE indrelid IN (SELECT inhrelid "
                             "FROM pg_inherits WHERE inhparent = 'tierstore_writes'::regclass) "
                             "AND pg_get_indexdef(indexrelid) LIKE '%(channel)'")
    assert built[0][0] == N
    names = await sql(store, "SELECT relkind::text FROM pg_class WHERE oid = "
                             "'tierstore_writes_by_channel'::regclass")
    assert [n[0] for n in names] == ["I"]  # the partitioned table's index, by its name

    url = new_url()
    store = await stores(url)
    await seed(store, 4)
    converter = PostgresWarm.from_url(StoreUrl.parse(url))
    with pytest.raises(Stop):
        await converter.partition(N, tuning=tuning, progress=stop_after(3))
    await sql(store, "ALTER TABLE tierstore_checkpoints ADD COLUMN note text DEFAULT 'n'")
    rows = await dump(store)
    report = await converter.partition(N, tuning=tuning)
    assert report.discarded == N and not report.resumed
    assert await layout_of(store) == N and await dump(store) == rows


async def test_conversion_refusals_restarts_and_abandon(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]]) -> None:
    url = new_url()
    store = await stores(url)
    await seed(store, 4)
    rows = await dump(store)
    converter = PostgresWarm.from_url(StoreUrl.parse(url))
    # an unfinished conversion to another count starts over
    with pytest.raises(Stop):
        await converter.partition(N, tuning=layouts.Tuning(batch_rows=3),
                                  progress=stop_after(3))
    report = await converter.partition(8)
    assert report.discarded == N and not report.resumed and await layout_of(store) == 8
    assert await dump(store) == rows
    with pytest.raises(ConfigurationError, match="already hash-partitioned into 8 partitions"):
        await converter.partition(N)

    # abandoned: the triggers, the copies and the notes go, the tables stay plain
    other_url = new_url()
    other = await stores(other_url)
    await seed(other, 3)
    rows = await dump(other)
    converter = PostgresWarm.from_url(StoreUrl.parse(other_url))
    with pytest.raises(Stop):
        await converter.partition(N, tuning=layouts.Tuning(batch_rows=3),
                                  progress=stop_after(2))
    assert await converter.abandon_partitioning() is True
    assert await converter.abandon_partitioning() is False
    assert await underway(other) is None and await layout_of(other) is None
    triggers = await sql(other, "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
    assert triggers == []
    await seed(other, 1, prefix="after-")
    assert (await dump(other))["tierstore_checkpoints"][:len(rows["tierstore_checkpoints"])] \
        == rows["tierstore_checkpoints"]

    # what a swap could not carry along is named before anything is copied
    await sql(other, "CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql "
                     "AS $$ BEGIN RETURN NULL; END $$")
    for made, named, undone in (
            ("CREATE VIEW runs AS SELECT DISTINCT run_id FROM tierstore_checkpoints",
             "view or rule runs", "DROP VIEW runs"),
            ("CREATE TABLE marks (sid bigint, id text COLLATE \"C\", FOREIGN KEY (sid, id) "
             "REFERENCES tierstore_checkpoints)", "foreign key marks_sid_id_fkey",
             "DROP TABLE marks"),
            ("CREATE POLICY mine ON tierstore_blobs USING (true)", "policy mine",
             "DROP POLICY mine ON tierstore_blobs"),
            ("CREATE TRIGGER audit AFTER INSERT ON tierstore_writes "
             "FOR EACH ROW EXECUTE FUNCTION noop()", "trigger audit",
             "DROP TRIGGER audit ON tierstore_writes")):
        await sql(other, made)
        with pytest.raises(ConfigurationError, match=named):
            await converter.partition(N)
        assert await underway(other) is None
        await sql(other, undone)
    assert (await converter.partition(N)).converted


@pytest.fixture
def role(postgres_url: str) -> Iterator[str]:
    """A role of its own on the server (roles are not per database), dropped afterwards."""
    name = f"tierstore_owner_{uuid.uuid4().hex[:8]}"
    run_sql(postgres_url, f"CREATE ROLE {name}")
    try:
        yield name
    finally:
        run_sql(postgres_url, f"DROP OWNED BY {name}", f"DROP ROLE {name}")


async def test_owner_grants_and_storage_parameters_carry_over(
        new_url: Callable[[], str], stores: Callable[..., Awaitable[PostgresWarm]],
        role: str) -> None:
    url = new_url()
    store = await stores(url)
    await seed(store, 2)
    await sql(store, "GRANT SELECT, INSERT ON tierstore_checkpoints TO PUBLIC")
    await sql(store, "ALTER TABLE tierstore_writes SET (fillfactor = 90)")
    await sql(store, f"ALTER TABLE tierstore_blobs OWNER TO {role}")
    await PostgresWarm.from_url(StoreUrl.parse(url)).partition(N)
    owners = await sql(store, "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
                              "WHERE relname LIKE 'tierstore_blobs%' AND relkind IN ('r', 'p') "
                              "AND relnamespace = current_schema()::regnamespace")
    assert [o[0] for o in owners] == [role]
    granted = await sql(store, "SELECT privilege_type FROM pg_class AS c, aclexplode(c.relacl) "
                               "AS a WHERE c.oid = 'tierstore_checkpoints'::regclass "
                               "AND a.grantee = 0 ORDER BY 1")
    assert [g[0] for g in granted] == ["INSERT", "SELECT"]
    options = await sql(store, "SELECT DISTINCT reloptions FROM pg_class AS c "
                               "JOIN pg_inherits AS i ON i.inhrelid = c.oid "
                               "WHERE i.inhparent = 'tierstore_writes'::regclass")
    assert [o[0] for o in options] == [["fillfactor=90"]]


def seeded_for_the_cli(url: str) -> dict[str, str]:
    """Seed 3 threads at ``url`` (from a thread: the test's loop may be running); the
    environment that points the command line at that store alone."""

    async def fill() -> None:
        store = PostgresWarm.from_url(StoreUrl.parse(url))
        await store.setup()
        try:
            await seed(store, 3)
        finally:
            await store.aclose()

    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(asyncio.run, fill()).result(timeout=300)
    return {**os.environ, "PYTHONPATH": str(ROOT), "TIERSTORE_HOT_URL": "none",
            "TIERSTORE_COLD_URL": "none", "TIERSTORE_WARM_URL": url}


def test_the_command_line_converts_and_reports(new_url: Callable[[], str]) -> None:
    url = new_url()
    env = seeded_for_the_cli(url)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tierstore", *args], capture_output=True,
                              text=True, timeout=300, env=env, check=False, cwd=ROOT)

    # the URL asks for partitions: the store refuses to open until converted
    refused = cli("status", "--warm", with_query(url, partitions=str(N)))
    assert refused.returncode == 2
    assert f"tierstore migrate --partitions {N}" in refused.stderr
    done = cli("migrate", "--partitions", str(N), "--batch-rows", "10", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["partitioning"]["default"]
    assert report["converted"] is True and report["partitions"] == N
    assert report["rows_copied"] > 0
    opened = cli("status", "--warm", with_query(url, partitions=str(N)), "--json")
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["regions"]["default"]["warm"]["checkpoints"] == 3 * 4 + 4
    again = cli("migrate", "--partitions", str(N))
    assert again.returncode == 0 and f"already hash-partitioned into {N}" in again.stdout
    other = cli("migrate", "--partitions", "8")
    assert other.returncode == 2 and "already hash-partitioned into 16" in other.stderr


def test_the_command_line_labels_each_phase_on_a_terminal(new_url: Callable[[], str]) -> None:
    url = new_url()
    env = seeded_for_the_cli(url)
    shown = tty_cli("migrate", "--partitions", str(N), "--batch-rows", "10", env=env)
    for phase in ("prepare", "copy", "index", "analyse", "catch up", "swap"):
        assert f"partitioning default: {phase}" in shown, shown
    assert f"hash-partitioned into {N}" in shown
