"""Savers built on clients the application already holds, and ``from_conn_string``.

Each test runs a real LangGraph turn through a saver on injected clients (the real
PostgreSQL, Redis and moto S3; mongomock-motor, or a real MongoDB when
``TIERSTORE_TEST_MONGO_URL`` is set), reads it back, closes the saver, and then uses
the client again: tierstore never closes what it did not open, and closes what it did.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aioboto3
import asyncpg
import boto3
import pytest
import redis
import redis.asyncio as aioredis
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig

from tests.servers.mongo import MONGO_URL_VAR
from tests.servers.postgres import with_query
from tests.servers.redis import unique_prefix
from tierstore import ConfigurationError, TieredSaver
from tierstore.demo import build_agent
from tierstore.tiers.mongo import COLLECTIONS
from tierstore.tiers.postgres import PostgresWarm, server_settings
from tierstore.tiers.redis import RedisHot
from tierstore.tiers.s3 import S3Store

BIG = 4096  # bytes of incompressible text in a message: above the offload threshold


def cfg(thread: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread}}


async def one_turn(saver: TieredSaver, thread: str, *, big: bool = False) -> None:
    """A real graph turn, then the same state read back through the saver."""
    words = os.urandom(BIG).hex() if big else "hello"
    app = build_agent().compile(checkpointer=saver)
    out = await app.ainvoke({"messages": [HumanMessage(f"remember {words}")]}, cfg(thread))
    assert out["turns"] == 1
    state = await app.aget_state(cfg(thread))
    assert state.values["turns"] == 1
    assert words in str(state.values["messages"][0].content)
    tup = await saver.aget_tuple(cfg(thread))
    assert tup is not None and tup.checkpoint["channel_values"]["turns"] == 1


@pytest.fixture
def schema() -> str:
    return f"own_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def pool(postgres_url: str, schema: str) -> AsyncIterator[asyncpg.Pool[asyncpg.Record]]:
    """The application's pool, made for the store's schema and session settings."""
    async with asyncpg.create_pool(postgres_url, min_size=1, max_size=3,
                                   server_settings=server_settings(schema)) as made:
        yield made


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The application's client, named so that its connections can be counted."""
    client = aioredis.Redis.from_url(redis_url, client_name=f"app-{uuid.uuid4().hex[:8]}")
    yield client
    await client.aclose()


async def connections_of(client: aioredis.Redis, redis_url: str) -> int:
    """How many connections ``client`` holds open, counted by another client: a closed
    redis-py client reconnects at its next command, so only the server can tell."""
    name = client.connection_pool.connection_kwargs["client_name"]
    watcher = aioredis.Redis.from_url(redis_url)
    try:
        return sum(c.get("name") == name for c in await watcher.client_list())
    finally:
        await watcher.aclose()


def open_http_sessions(s3: Any) -> list[Any]:
    """The open HTTP sessions of an aioboto3 client. A closed client opens new ones at its
    next call, so whether anybody closed it shows only here (aiobotocore's own state)."""
    sessions = s3._endpoint.http_session._sessions.values()
    return [session for session in sessions if not session.closed]


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    made = unique_prefix()
    yield made
    sync = redis.Redis.from_url(redis_url)
    try:
        for key in sync.scan_iter(match=f"{made}*", count=500):
            sync.delete(key)
    finally:
        sync.close()


@pytest.fixture
async def s3(moto_endpoint: str) -> AsyncIterator[Any]:
    """The application's S3 client, opened and entered by the application."""
    session = aioboto3.Session()
    async with session.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1") as c:
        yield c


def bucket() -> str:
    return f"own-{uuid.uuid4().hex[:16]}"


async def test_a_turn_on_the_applications_pool_redis_and_s3_client_leaves_them_open(
    *, pool: asyncpg.Pool[asyncpg.Record], redis_client: aioredis.Redis, redis_url: str,
    prefix: str, s3: Any, schema: str,
) -> None:
    name = bucket()
    saver = TieredSaver.from_clients(
        warm=pool, warm_options={"schema": schema},
        hot=redis_client, hot_options={"prefix": prefix, "ttl": 120},
        cold=s3, cold_options={"bucket": name, "prefix": "cp/"},
        offload_threshold=1024, hot_write_delay=0,
    )
    async with saver:
        await one_turn(saver, "t-own", big=True)
        # every tier holds the turn: warm rows in the schema, the hot entry under the
        # prefix with its TTL, the offloaded message in the bucket under the prefix
        async with pool.acquire() as conn:
            rows = await conn.fetchval("SELECT count(*) FROM tierstore_checkpoints")
            in_schema = await conn.fetchval(
                f'SELECT count(*) FROM "{schema}".tierstore_checkpoints')
        assert rows >= 2 and in_schema == rows  # the pool's search_path put them there
        keys = [k async for k in redis_client.scan_iter(match=f"{prefix}*")]
        ttls = {k: await redis_client.ttl(k) for k in keys}
        # every key under the prefix carries the TTL given (-2: gone since the scan)
        assert any(0 < t <= 120 for t in ttls.values()), ttls
        assert all(0 < t <= 120 or t == -2 for t in ttls.values()), ttls
        listed = await s3.list_objects_v2(Bucket=name, Prefix="cp/offload/")
        assert listed.get("KeyCount", 0) >= 1
        # the store took one connection per call and kept none between calls
        assert pool.get_idle_size() == pool.get_size()
        redis_links = await connections_of(redis_client, redis_url)
        http = open_http_sessions(s3)
        assert redis_links >= 1 and http
    assert saver.state == "closed"
    # the saver closed, the clients did not: their connections are still the same ones
    assert await connections_of(redis_client, redis_url) == redis_links
    assert open_http_sessions(s3) == http
    assert await pool.fetchval("SELECT 41 + 1") == 42
    assert await redis_client.ping()
    assert (await s3.list_objects_v2(Bucket=name))["KeyCount"] >= 1


async def test_stores_on_clients_close_what_they_opened_and_leave_the_rest(
    pool: asyncpg.Pool[asyncpg.Record], redis_url: str, schema: str, prefix: str,
    moto_endpoint: str,
) -> None:
    """Mixed: the application's pool for warm, a URL for hot (tierstore's own client),
    an aioboto3 session for cold (tierstore opens the S3 client from it)."""
    name = f"owned-{uuid.uuid4().hex[:8]}"
    session = aioboto3.Session()
    saver = TieredSaver.from_clients(
        warm=pool, warm_options={"schema": schema},
        hot=f"{redis_url.split('?', maxsplit=1)[0]}?prefix={prefix}&client_name={name}",
        cold=session, cold_options={"bucket": bucket(), "endpoint_url": moto_endpoint,
                                    "region": "us-east-1", "storage_class": "STANDARD"},
    )
    watcher = aioredis.Redis.from_url(redis_url)
    try:
        async with saver:
            await one_turn(saver, "t-mixed")
            clients = await watcher.client_list()
            assert any(c.get("name") == name for c in clients)
            cold = saver.regions.by_name["default"].cold
            assert isinstance(cold, S3Store) and cold.owns_client
        # the Redis connections tierstore opened from the URL are gone
        clients = await watcher.client_list()
        assert not any(c.get("name") == name for c in clients)
        assert cold._client is None and cold.state == "closed"
        # the pool it was given still serves the application
        assert await pool.fetchval("SELECT count(*) FROM tierstore_checkpoints") >= 2
    finally:
        await watcher.aclose()


async def test_an_own_pool_beside_a_url_the_store_opened_itself(
    pool: asyncpg.Pool[asyncpg.Record], postgres_url: str, schema: str, tmp_path: Any,
) -> None:
    """A warm store opened from a URL closes its pool; one given a pool does not."""
    app_name = f"ts-{uuid.uuid4().hex[:8]}"
    url = with_query(postgres_url, schema=schema, application_name=app_name)
    async with TieredSaver.from_conn_string(url) as saver:
        await one_turn(saver, "t-url")
        count = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name)
        assert count >= 1
    count = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name)
    assert count == 0
    # the same tables, now through the application's pool
    async with TieredSaver.from_clients(warm=pool, warm_options={"schema": schema}) as again:
        tup = await again.aget_tuple(cfg("t-url"))
        assert tup is not None and tup.checkpoint["channel_values"]["turns"] == 1
    assert await pool.fetchval("SELECT 1") == 1


async def test_from_conn_string_is_an_async_context_manager_with_optional_tiers(
    postgres_url: str, schema: str, redis_client: aioredis.Redis, prefix: str,
) -> None:
    url = with_query(postgres_url, schema=schema)
    saver = TieredSaver.from_conn_string(url, hot=redis_client, hot_options={"prefix": prefix},
                                         hot_write_delay=0)
    assert saver.state == "unopened"
    async with saver as opened:
        assert opened is saver
        assert isinstance(saver.regions.by_name["default"].hot, RedisHot)
        assert saver.regions.by_name["default"].cold is None
        await one_turn(saver, "t-conn")
        assert [k async for k in redis_client.scan_iter(match=f"{prefix}*")]
    assert await redis_client.ping()


def test_from_conn_string_works_in_sync_apps(postgres_url: str, schema: str) -> None:
    with TieredSaver.from_conn_string(with_query(postgres_url, schema=schema)) as saver:
        app = build_agent().compile(checkpointer=saver)
        out = app.invoke({"messages": [HumanMessage("what is 2 + 3")]}, cfg("t-sync"))
        assert "5" in str(out["messages"][-1].content)
        assert saver.get_tuple(cfg("t-sync")) is not None


async def test_a_redis_cluster_client(redis_cluster_url: str, tmp_path: Any,
                                      ) -> None:
    host_port = redis_cluster_url.split("://", 1)[1].split("?", 1)[0]
    host, port = host_port.rsplit(":", 1)
    client = aioredis.RedisCluster(host=host, port=int(port))
    prefix = unique_prefix()
    try:
        saver = TieredSaver.from_clients(warm=f"sqlite:///{tmp_path}/warm.db", hot=client,
                                         hot_options={"prefix": prefix}, hot_write_delay=0)
        async with saver:
            await one_turn(saver, "t-cluster")
            hot = saver.regions.by_name["default"].hot
            assert isinstance(hot, RedisHot) and hot.settings.cluster
            assert saver.stats.hot_errors == 0
        assert await client.ping()
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        assert keys
        for key in keys:
            await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture
async def mongo_client() -> AsyncIterator[tuple[Any, str]]:
    """The application's MongoDB client: a real one when a server is named, else the mock."""
    name = f"tierstore_{uuid.uuid4().hex[:12]}"
    url = os.environ.get(MONGO_URL_VAR)
    if url:
        from pymongo import AsyncMongoClient

        client: Any = AsyncMongoClient(url)
        try:
            yield client, name
        finally:
            await client.drop_database(name)
            await client.close()
        return
    from mongomock_motor import AsyncMongoMockClient, enabled_gridfs_integration

    with enabled_gridfs_integration():
        yield AsyncMongoMockClient(), name


async def test_a_turn_on_the_applications_mongo_client(
    mongo_client: tuple[Any, str], tmp_path: Any,
) -> None:
    client, name = mongo_client
    saver = TieredSaver.from_clients(
        warm=client, warm_options={"database": name, "offload_threshold": 1024},
        hot="memory://",
    )
    async with saver:
        await one_turn(saver, "t-mongo", big=True)
        # the message went to GridFS (the driver's own bucket for the client's flavour)
        assert await client[name][COLLECTIONS["gridfs_files"]].count_documents({}) >= 1
    await client[name]["after"].insert_one({"still": "open"})
    assert await client[name]["after"].count_documents({}) == 1
    # a database object works as well, and names its database itself
    async with TieredSaver.from_clients(warm=client[name]) as again:
        tup = await again.aget_tuple(cfg("t-mongo"))
        assert tup is not None and tup.checkpoint["channel_values"]["turns"] == 1


# -- refusals --------------------------------------------------------------------------


async def test_wrong_clients_are_refused_with_what_the_tier_takes(
    redis_url: str, pool: asyncpg.Pool[asyncpg.Record], tmp_path: Any,
) -> None:
    warm = f"sqlite:///{tmp_path}/warm.db"
    client = aioredis.Redis.from_url(redis_url)
    sync = redis.Redis.from_url(redis_url)
    try:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"warm": warm, "hot": sync}, "redis.asyncio.Redis"),
            ({"warm": client}, "serves the hot tier"),
            ({"warm": warm, "hot": pool}, "serves the warm tier"),
            ({"warm": warm, "cold": boto3.Session()}, "aioboto3.Session"),
            ({"warm": warm, "cold": client}, "serves the hot tier"),
            ({"warm": object()}, "asyncpg.Pool"),
            ({"warm": 42}, "cannot use a builtins.int"),
            ({"warm": warm, "hot": client, "hot_options": {"socket_timeout": 1}},
             "connection settings belong to the client"),
            ({"warm": pool, "warm_options": {"max_size": 5}}, "belong to the pool"),
            ({"warm": warm, "cold": aioboto3.Session()}, "bucket"),
            ({"warm": warm, "hot": "memory://", "hot_options": {"prefix": "x"}},
             "go in the URL's query"),
            ({"warm": warm, "cold_options": {"bucket": "b"}}, "without a cold tier"),
        ]
        for kwargs, expected in cases:
            with pytest.raises(ConfigurationError, match=re.escape(expected)):
                TieredSaver.from_clients(**kwargs)
        async with pool.acquire() as conn:
            with pytest.raises(ConfigurationError, match=r"asyncpg\.Pool"):
                TieredSaver.from_clients(warm=conn)
    finally:
        await client.aclose()
        sync.close()


async def test_an_s3_client_of_another_service_is_refused(moto_endpoint: str) -> None:
    session = aioboto3.Session()
    async with session.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1") as c:
        with pytest.raises(ConfigurationError, match="'sqs' client"):
            TieredSaver.from_clients(warm="sqlite:///:memory:", cold=c,
                                     cold_options={"bucket": "b"})


async def test_a_redis_client_that_decodes_responses_is_refused(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ConfigurationError, match="decode_responses"):
            TieredSaver.from_clients(warm="sqlite:///:memory:", hot=client)
    finally:
        await client.aclose()


async def test_a_pool_on_another_search_path_is_refused_at_open_and_left_open(
    postgres_url: str, schema: str,
) -> None:
    async with asyncpg.create_pool(postgres_url, min_size=1, max_size=2) as plain:
        saver = TieredSaver.from_clients(warm=plain, warm_options={"schema": schema})
        with pytest.raises(ConfigurationError, match="search_path"):
            await saver.open()
        assert await plain.fetchval(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1",
            schema) == 0
        assert await plain.fetchval("SELECT 1") == 1


async def test_a_pool_with_its_own_jsonb_codec_is_refused(postgres_url: str, schema: str,
                                                         ) -> None:
    async def init(conn: asyncpg.Connection[asyncpg.Record]) -> None:
        await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                                  schema="pg_catalog")

    async with asyncpg.create_pool(postgres_url, min_size=1, max_size=2, init=init,
                                   server_settings=server_settings(schema)) as coded:
        with pytest.raises(ConfigurationError, match="jsonb"):
            async with TieredSaver.from_clients(warm=coded, warm_options={"schema": schema}):
                pass
        assert await coded.fetchval("SELECT 1") == 1


async def test_partitioning_a_store_on_a_pool_asks_for_the_url(
    pool: asyncpg.Pool[asyncpg.Record], schema: str,
) -> None:
    store = PostgresWarm.from_pool(pool, schema=schema)
    with pytest.raises(ConfigurationError, match="needs the database URL"):
        await store.partition(4)


def test_a_pool_of_another_event_loop_is_refused_by_a_sync_saver(postgres_url: str,
                                                                 schema: str) -> None:
    """A sync app's saver runs on a loop of its own, where an asyncpg pool made on the
    app's loop cannot run; a Redis client, which connects on first use, can."""
    async def make() -> asyncpg.Pool[asyncpg.Record]:
        return await asyncpg.create_pool(postgres_url, min_size=1, max_size=2)

    loop = asyncio.new_event_loop()
    made = loop.run_until_complete(make())
    try:
        with pytest.raises(ConfigurationError, match="another event loop"), \
                TieredSaver.from_clients(warm=made, warm_options={"schema": schema}):
            pass
        assert loop.run_until_complete(made.fetchval("SELECT 1")) == 1
    finally:
        loop.run_until_complete(made.close())
        loop.close()


def test_a_redis_client_and_an_s3_session_serve_a_sync_saver(
    redis_url: str, prefix: str, moto_endpoint: str, tmp_path: Any,
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    with TieredSaver.from_clients(
        warm=f"sqlite:///{tmp_path}/warm.db", hot=client, hot_options={"prefix": prefix},
        cold=aioboto3.Session(), cold_options={"bucket": bucket(), "endpoint_url": moto_endpoint,
                                               "region": "us-east-1"},
        hot_write_delay=0,
    ) as saver:
        app = build_agent().compile(checkpointer=saver)
        app.invoke({"messages": [HumanMessage("what is 2 + 3")]}, cfg("t-sync-redis"))
        assert saver.stats.hot_errors == 0
        assert saver.get_tuple(cfg("t-sync-redis")) is not None
