"""Connections the PostgreSQL warm tier keeps between calls stay the pool's.

A call that ends cleanly keeps its connection for the next call instead of a pool
round (``pool._keep``). These tests hold the promises that come with it: one
connection of the pool is never kept, the store closes promptly, and a kept
connection the server dropped is never handed to a call.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.builders import record
from tests.servers.postgres import with_query
from tierstore.settings import StoreUrl
from tierstore.tiers.postgres import PostgresWarm


@pytest.fixture
async def warm(postgres_url: str) -> AsyncIterator[PostgresWarm]:
    url = with_query(postgres_url, schema=f"t_{uuid.uuid4().hex[:10]}", max_size="4",
                     application_name=f"kept-{uuid.uuid4().hex[:8]}")
    store = PostgresWarm.from_url(StoreUrl.parse(url))
    await store.setup()
    try:
        yield store
    finally:
        await store.aclose()


async def test_one_connection_is_never_kept_and_the_store_closes_promptly(
    warm: PostgresWarm,
) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1), [], strict=False)
    await asyncio.gather(*(warm.head(t, "") for _ in range(12)))
    assert 1 <= len(warm._kept) <= 3  # of max_size=4
    assert warm._pool is not None
    async with warm._pool.acquire(timeout=5) as conn:  # others still find connections
        assert await conn.fetchval("SELECT 1") == 1
    await asyncio.wait_for(warm.aclose(), timeout=10)
    assert warm._kept == []


async def test_a_kept_connection_the_server_dropped_is_not_used(
    warm: PostgresWarm, postgres_url: str,
) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1), [], strict=False)
    await asyncio.gather(*(warm.head(t, "") for _ in range(4)))
    assert warm._kept
    assert warm._pool is not None
    async with warm._pool.acquire() as conn:
        name = await conn.fetchval("SHOW application_name")
        mine = await conn.fetchval("SELECT pg_backend_pid()")
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = $1 AND pid <> $2", name, mine)
    finally:
        await admin.close()
    await asyncio.sleep(0.2)
    head = await warm.head(t, "")
    assert head is not None
    result = await warm.put_checkpoint(record(t, 2, parent=1), [], strict=False)
    assert result.head.checkpoint_id == record(t, 2).checkpoint_id
