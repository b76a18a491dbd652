"""PostgreSQL's ancestor walk stays a chain of key probes however small the tables were
when it was planned (0008; 0009 keeps it so while it reports a delta chain's lost links).

A plan made while a table holds a page or two prefers reading it whole to probing its
index, and a prepared plan keeps that choice as the table grows: each link of a walk
would then read every namespace's rows. The plan is read back with ``auto_explain``
from a walk planned on the smallest tables there are.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.builders import cid, record, write
from tests.servers.postgres import with_query
from tierstore.records import BlobRecord, Payload
from tierstore.settings import StoreUrl
from tierstore.tiers.postgres import PostgresWarm


@pytest.fixture
async def schema(postgres_url: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    store = PostgresWarm.from_url(StoreUrl.parse(with_query(postgres_url, schema=name)))
    await store.setup()
    try:
        for i in range(3):
            await store.put_checkpoint(
                record("t", i, parent=i - 1 if i else None, versions={"d": f"{i}"}),
                [BlobRecord("d", f"{i}", Payload("msgpack", b"v"))], strict=False)
            await store.put_writes("t", "", cid(i), [write("task", 0, channel="d")])
        yield name
    finally:
        await store.aclose()


async def test_the_walk_is_planned_as_probes_on_small_tables(postgres_url: str,
                                                             schema: str) -> None:
    conn = await asyncpg.connect(postgres_url, server_settings={"search_path": schema})
    try:
        try:
            await conn.execute("LOAD 'auto_explain'")
        except asyncpg.PostgresError as exc:
            pytest.skip(f"auto_explain is not available: {exc}")
        await conn.execute("SET auto_explain.log_min_duration = 0; "
                           "SET auto_explain.log_nested_statements = on; "
                           "SET client_min_messages = log")
        # what autovacuum records of young tables: a page or so each
        await conn.execute("VACUUM ANALYZE tierstore_checkpoints, tierstore_blobs, "
                           "tierstore_writes, tierstore_heads")
        logged: list[str] = []
        conn.add_log_listener(lambda _conn, message: logged.append(message.message))
        rows = await conn.fetch("SELECT * FROM tierstore_ancestors($1, $2, $3, $4, $5)",
                                "t", "", cid(2), 100, ["d"])
        assert len(rows) > 2  # links, their values and writes
        [plan] = [m for m in logged if "WITH RECURSIVE chain" in m]
        assert "Index Scan using tierstore_checkpoints_pkey" in plan
        assert "Index Scan using tierstore_writes_pkey" in plan
        assert "Index Scan using tierstore_blobs_pkey" in plan
        for whole in ("Seq Scan", "Hash Join", "Merge Join", "Materialize"):
            assert whole not in plan, plan
    finally:
        await conn.close()
