"""Connections the PostgreSQL warm tier keeps between calls stay the pool's.

A call that ends cleanly keeps its connection for the next call instead of a pool
round (``pool._keep``). These tests hold the promises that come with it: one
connection of the pool is never kept, the store closes promptly, and a kept
connection the server dropped is never handed to a call.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

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
                            "WHERE application_name = $1 AND pid <> $2 "
                            "AND datname = current_database()", name, mine)
    finally:
        await admin.close()
    await asyncio.sleep(0.2)
    head = await warm.head(t, "")
    assert head is not None
    result = await warm.put_checkpoint(record(t, 2, parent=1), [], strict=False)
    assert result.head.checkpoint_id == record(t, 2).checkpoint_id


async def test_a_call_waiting_for_the_pool_gets_the_next_connection_that_ends_a_call(
    postgres_url: str,
) -> None:
    """Kept, the connection would go to whichever call comes next; the waiting one
    could wait for as long as calls keep coming."""
    url = with_query(postgres_url, schema=f"t_{uuid.uuid4().hex[:10]}", max_size="2")
    warm = PostgresWarm.from_url(StoreUrl.parse(url))
    await warm.setup()
    try:
        gates = [asyncio.Event(), asyncio.Event()]
        holding = [asyncio.Event(), asyncio.Event()]

        def holder(n: int) -> Callable[[Any], Awaitable[int]]:
            async def body(conn: Any) -> int:
                holding[n].set()
                await gates[n].wait()
                return int(await conn.fetchval("SELECT 1"))
            return body

        async def quick(conn: Any) -> int:
            return int(await conn.fetchval("SELECT 2"))

        held = [asyncio.create_task(warm._run("hold", holder(n))) for n in (0, 1)]
        await asyncio.gather(*(h.wait() for h in holding))  # the whole pool is in use
        waiting = asyncio.create_task(warm._run("wait", quick))
        await asyncio.sleep(0.05)
        assert warm._waiting == 1
        gates[0].set()
        assert await held[0] == 1
        assert await asyncio.wait_for(waiting, timeout=5) == 2
        gates[1].set()
        assert await held[1] == 1
    finally:
        await warm.aclose()
