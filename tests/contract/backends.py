"""Every backend of every tier kind, as async context-manager factories.

A factory takes the pytest ``request`` (to reach server fixtures) and yields an
opened, empty store. The contract suites are parametrized over these tables, so a
new backend is tested by adding one row here.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tierstore.tiers.file import FileStore
from tierstore.tiers.memory import MemoryHot
from tierstore.tiers.sqlite import SqliteWarm

Factory = Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[Any]]


@asynccontextmanager
async def _opened(store: Any) -> AsyncIterator[Any]:
    await store.setup()
    try:
        yield store
    finally:
        await store.aclose()


def _tmp(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue("tmp_path")
    return path


def sqlite_warm(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Any]:
    return _opened(SqliteWarm(str(_tmp(request) / f"{uuid.uuid4().hex}.db")))


def mongo_warm(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Any]:
    return _opened(request.getfixturevalue("mongo_db").store())


def postgres_warm(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Any]:
    """A schema of its own in the session database, dropped afterwards.

    Claims scan every head of a store, so a store shared with other tests would see
    their threads too.
    """

    @asynccontextmanager
    async def opened(url: str) -> AsyncIterator[Any]:
        import asyncpg

        from tierstore.settings import StoreUrl
        from tierstore.tiers.postgres import PostgresWarm

        schema = f"contract_{uuid.uuid4().hex[:12]}"
        try:
            async with _opened(PostgresWarm.from_url(StoreUrl.parse(url), schema=schema)) as s:
                yield s
        finally:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

    return opened(request.getfixturevalue("postgres_url"))


def memory_hot(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Any]:
    return _opened(MemoryHot(ttl=60))


def file_objects(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Any]:
    return _opened(FileStore(_tmp(request) / "objects"))


def s3_objects(storage_class: str) -> Factory:
    """Objects on the moto server: one bucket per storage class, one prefix per test."""

    def factory(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Any]:
        from tests.servers.s3 import s3_url
        from tierstore.settings import StoreUrl
        from tierstore.tiers.s3 import S3Store

        endpoint: str = request.getfixturevalue("moto_endpoint")
        bucket = f"tierstore-contract-{storage_class.lower().replace('_', '-')}"
        url = s3_url(endpoint, bucket=bucket, prefix=f"{uuid.uuid4().hex}/",
                     storage_class=storage_class)
        return _opened(S3Store.from_url(StoreUrl.parse(url)))

    return factory


def redis_hot(fixture: str) -> Factory:
    """A ``RedisHot`` with a key prefix of its own, whose keys are deleted afterwards."""

    @asynccontextmanager
    async def opened(url: str) -> AsyncIterator[Any]:
        from tests.servers.redis import purge, unique_prefix, with_query
        from tierstore.settings import StoreUrl
        from tierstore.tiers.redis import RedisHot

        prefix = unique_prefix()
        # generous timeouts: the contract is about semantics, not about a loaded machine
        options = {"prefix": prefix, "timeout": "5", "socket_timeout": "2",
                   "connect_timeout": "2"}
        store = RedisHot.from_url(StoreUrl.parse(with_query(url, **options)), ttl=60)
        try:
            async with _opened(store):
                yield store
        finally:
            await purge(url, prefix)

    def factory(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Any]:
        return opened(request.getfixturevalue(fixture))

    return factory


WARM: dict[str, Factory] = {"mongo": mongo_warm, "postgres": postgres_warm,
                           "sqlite": sqlite_warm}
HOT: dict[str, Factory] = {"memory": memory_hot,
                          "redis": redis_hot("redis_url"),
                          "redis-cluster": redis_hot("redis_cluster_url")}
OBJECTS: dict[str, Factory] = {"file": file_objects,
                              "s3": s3_objects("STANDARD_IA"),
                              "s3-glacier-ir": s3_objects("GLACIER_IR")}
