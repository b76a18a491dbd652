"""PostgreSQL claims heads, reads and marks a segment by key probes, however large the
tables are.

An archive move reads the segment's checkpoints, the channel values they name and their
writes in one statement (``get_live``), then marks them (``mark_archived``). Joined
freely, the planner (which cannot tell how many values a segment names) hashed the
whole blob table for every segment: a move then cost every namespace's values. The
plans are read back for a store whose other namespaces hold many values, planned with
the statement's own parameters and as the generic plan a prepared statement keeps.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.builders import cid, record, write
from tests.servers.postgres import with_query
from tierstore.records import BlobRecord, Payload
from tierstore.settings import StoreUrl
from tierstore.tiers.postgres import PostgresWarm
from tierstore.tiers.postgres.tiering import (
    GET_LIVE,
    MARK_ALL_WRITES,
    MARK_PACKED_WRITES,
    claim_statement,
)

CHECKPOINTS, CHANNELS, COPIES = 64, 9, 600


@pytest.fixture
async def schema(postgres_url: str) -> AsyncIterator[str]:
    """A thread of 64 checkpoints naming 9 channels each (most values shared with the
    previous checkpoint, as a chat's are), with writes; then 600 more like it."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    store = PostgresWarm.from_url(StoreUrl.parse(with_query(postgres_url, schema=name)))
    await store.setup()
    try:
        for i in range(CHECKPOINTS):
            versions = {f"ch{k}": str(i // (k + 1)) for k in range(CHANNELS)}
            await store.put_checkpoint(
                record("t", i, parent=i - 1 if i else None, versions=versions),
                [BlobRecord(ch, v, Payload("msgpack", bytes(300))) for ch, v in versions.items()
                 if i == 0 or v != str((i - 1) // (int(ch[2:]) + 1))],
                strict=False)
            await store.put_writes("t", "", cid(i), [write("task", 0, channel="ch0")])
        conn = await asyncpg.connect(postgres_url, server_settings={"search_path": name})
        try:
            await conn.execute(
                "INSERT INTO tierstore_heads (thread_id, checkpoint_ns, head_id) "
                f"SELECT 'copy-' || g, '', 'x' FROM generate_series(1, {COPIES}) AS g")
            copies = ("FROM tierstore_heads AS h, {table} AS t WHERE h.thread_id LIKE 'copy-%' "
                      "AND t.sid = (SELECT sid FROM tierstore_heads WHERE thread_id = 't')")
            for table in ("tierstore_checkpoints", "tierstore_blobs", "tierstore_writes"):
                columns = [r[0] for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 "
                    "AND table_name = $2 AND column_name <> 'sid'", name, table)]
                await conn.execute(
                    f"INSERT INTO {table} (sid, {', '.join(columns)}) "
                    f"SELECT h.sid, {', '.join('t.' + c for c in columns)} "
                    + copies.format(table=table))
        finally:
            await conn.close()
        yield name
    finally:
        await store.aclose()


@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_segment_is_read_and_marked_by_key_probes(postgres_url: str, schema: str,
                                                          mode: str) -> None:
    conn = await asyncpg.connect(postgres_url, server_settings={"search_path": schema})
    try:
        await conn.execute("VACUUM ANALYZE tierstore_checkpoints, tierstore_blobs, "
                           "tierstore_writes, tierstore_heads")
        await conn.execute(f"SET plan_cache_mode = {mode}")
        ids = [cid(i) for i in range(CHECKPOINTS - 1)]
        sid = await conn.fetchval("SELECT sid FROM tierstore_heads WHERE thread_id = 't'")
        plans = {
            "get_live": await conn.fetch("EXPLAIN " + GET_LIVE, "t", "", ids),
            "mark (all writes)": await conn.fetch("EXPLAIN " + MARK_ALL_WRITES, sid, ids, "k"),
            "mark (packed writes)": await conn.fetch(
                "EXPLAIN " + MARK_PACKED_WRITES, sid, ids, "k", [cid(0)], ["task"], [0],
                ["msgpack"], [b"\x00" * 32]),
        }
        for name, rows in plans.items():
            plan = "\n".join(r[0] for r in rows)
            for table in ("tierstore_blobs", "tierstore_checkpoints", "tierstore_writes",
                          "tierstore_heads"):
                assert f"Seq Scan on {table}" not in plan, f"{name}:\n{plan}"
        read = "\n".join(r[0] for r in plans["get_live"])
        assert "Index Scan using tierstore_blobs_pkey" in read, read
        assert "Hash Join" not in read, read
    finally:
        await conn.close()


@pytest.mark.parametrize("job", ["history", "idle"])
async def test_a_claim_probes_the_checkpoints_of_the_heads_it_takes_only(
    postgres_url: str, schema: str, job: str
) -> None:
    """Every head is sorted by age first; only then are heads probed for work, in that
    order, until the batch is full: a claim of 5 on 601 eligible heads probes about 5,
    where filtering before the sort probed every head of the store for every batch."""
    conn = await asyncpg.connect(postgres_url, server_settings={"search_path": schema})
    try:
        await conn.execute("VACUUM ANALYZE tierstore_checkpoints, tierstore_heads")
        now = time.time() + 3600
        sql, params = claim_statement(
            owner="me", now=now, lease_seconds=60, limit=5,
            warm_before=now if job == "history" else None,
            idle_before=now if job == "idle" else None, require_live=True, thread_id=None)
        claiming = conn.transaction()
        await claiming.start()
        try:
            rows = await conn.fetch("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *params)
        finally:
            await claiming.rollback()  # nothing of the claim is kept
        probes = [n for n in _nodes(json.loads(rows[0][0])[0]["Plan"])
                  if n.get("Relation Name") == "tierstore_checkpoints"]
        assert probes, rows[0][0]
        assert sum(n["Actual Loops"] for n in probes) <= 10, rows[0][0]
        assert await conn.fetchval("SELECT count(*) FROM tierstore_heads "
                                   "WHERE lease_owner IS NOT NULL") == 0
    finally:
        await conn.close()


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found
