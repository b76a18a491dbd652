"""Where the suites run: every store backend of every tier kind, and every saver stack.

Both are built per test from pytest fixtures, so server-backed ones run wherever the
server fixtures can provide one (a server named by TIERSTORE_TEST_*, the local
default, or a private instance the fixture starts). MongoDB runs on the in-memory
emulation unless TIERSTORE_TEST_MONGO_URL names a real server.

The contract suites (``tests/contract``) are parametrized over ``WARM``, ``HOT`` and
``OBJECTS``; the integration suites over ``STACKS`` and its subsets. A new backend or
stack is tested by adding one row here; the row's key is the test id.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tierstore import TieredSaver
from tierstore.tiers.file import FileStore
from tierstore.tiers.memory import MemoryHot
from tierstore.tiers.sqlite import SqliteWarm

REDIS_TIMEOUTS = {"timeout": "5", "socket_timeout": "2", "connect_timeout": "2"}
"""Generous: the suites are about semantics, not about a loaded machine."""

# -- store backends (contract suites) -------------------------------------------------

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


PARTITIONS = 16
"""The partitioned PostgreSQL variants hash-partition the tables into this many."""


def postgres_warm(request: pytest.FixtureRequest, partitions: int | None = None
                  ) -> AbstractAsyncContextManager[Any]:
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
            async with _opened(PostgresWarm.from_url(StoreUrl.parse(url), schema=schema,
                                                     partitions=partitions)) as s:
                yield s
        finally:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

    return opened(request.getfixturevalue("postgres_url"))


def postgres_partitioned_warm(request: pytest.FixtureRequest
                              ) -> AbstractAsyncContextManager[Any]:
    """PostgreSQL with the checkpoint tables hash-partitioned by thread."""
    return postgres_warm(request, PARTITIONS)


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
        store = RedisHot.from_url(
            StoreUrl.parse(with_query(url, prefix=prefix, **REDIS_TIMEOUTS)), ttl=60)
        try:
            async with _opened(store):
                yield store
        finally:
            await purge(url, prefix)

    def factory(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Any]:
        return opened(request.getfixturevalue(fixture))

    return factory


WARM: dict[str, Factory] = {"mongo": mongo_warm, "postgres": postgres_warm,
                           "postgres-partitioned": postgres_partitioned_warm,
                           "sqlite": sqlite_warm}
HOT: dict[str, Factory] = {"memory": memory_hot,
                          "redis": redis_hot("redis_url"),
                          "redis-cluster": redis_hot("redis_cluster_url")}
OBJECTS: dict[str, Factory] = {"file": file_objects,
                              "s3": s3_objects("STANDARD_IA"),
                              "s3-glacier-ir": s3_objects("GLACIER_IR")}


# -- saver stacks (integration suites) ------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """How to open a saver on one stack; ``warm`` is a URL or a store factory."""

    name: str
    hot: str | None
    warm: str | Callable[[], Any]
    cold: str | None
    shared_across_processes: bool = True

    def open(self, saver_class: type[TieredSaver] = TieredSaver, **options: Any) -> TieredSaver:
        if isinstance(self.warm, str):
            return saver_class.from_urls(hot=self.hot, warm=self.warm, cold=self.cold,
                                         **options)
        from tierstore.tiers import open_store

        hot = open_store("hot", self.hot, ttl=3600.0) if self.hot else None
        cold = open_store("cold", self.cold) if self.cold else None
        return saver_class.from_stores(warm=self.warm(), hot=hot, cold=cold, **options)


StackBuilder = Callable[[pytest.FixtureRequest, Path], Stack]
Urls = Stack  # what the suites receive


def embedded(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    return Stack("embedded", "memory://", f"sqlite:///{tmp}/warm.db", f"file://{tmp}/cold")


def redis_hot_url(request: pytest.FixtureRequest) -> str:
    """The test Redis with a key prefix of this test's own, purged when the test ends."""
    from tests.servers.redis import unique_prefix, with_query

    base: str = request.getfixturevalue("redis_url")
    prefix = unique_prefix()

    def purge() -> None:
        import redis

        client = redis.Redis.from_url(base.split("?", maxsplit=1)[0])
        try:
            for key in client.scan_iter(match=f"{prefix}*", count=500):
                client.delete(key)
        finally:
            client.close()

    request.addfinalizer(purge)
    return with_query(base, prefix=prefix, **REDIS_TIMEOUTS)


def s3_cold(request: pytest.FixtureRequest, storage_class: str = "STANDARD_IA") -> str:
    from tests.servers.s3 import s3_url

    return s3_url(request.getfixturevalue("moto_endpoint"), storage_class=storage_class)


def postgres_warm_url(request: pytest.FixtureRequest, partitions: int | None = None) -> str:
    """The session's test database, with a schema of this test's own."""
    base: str = request.getfixturevalue("postgres_url")
    sep = "&" if "?" in base else "?"
    layout = "" if partitions is None else f"&partitions={partitions}"
    return f"{base}{sep}schema=t_{uuid.uuid4().hex[:16]}&max_size=5{layout}"


def postgres_only(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    return Stack("postgres", None, postgres_warm_url(request), None)


def redis_postgres(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    return Stack("redis+postgres", redis_hot_url(request), postgres_warm_url(request), None)


def redis_postgres_s3(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    return Stack("redis+postgres+s3", redis_hot_url(request), postgres_warm_url(request),
                 s3_cold(request))


def redis_mongo_s3(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    target = request.getfixturevalue("mongo_db")
    return Stack("redis+mongo+s3", redis_hot_url(request), target.store, s3_cold(request),
                 shared_across_processes=target.real)


def postgres_partitioned(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    return Stack("postgres-partitioned", None, postgres_warm_url(request, PARTITIONS), None)


def postgres_file(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    return Stack("postgres+file", None, postgres_warm_url(request), f"file://{tmp}/cold")


STACKS: dict[str, StackBuilder] = {
    "embedded": embedded,
    "postgres": postgres_only,
    "redis+postgres": redis_postgres,
    "redis+postgres+s3": redis_postgres_s3,
    "redis+mongo+s3": redis_mongo_s3,
}
CONFORMANCE_ONLY_STACKS: dict[str, StackBuilder] = {
    "postgres-partitioned": postgres_partitioned,
}
"""Variants LangGraph's conformance suite also runs on, kept out of the other integration
suites: a layout of a backend whose behaviour the contract suite checks store by store
(``WARM``) needs the saver's end-to-end check once, not every integration suite again."""
TIERED_STACKS = {"embedded", "redis+postgres+s3", "redis+mongo+s3"}
"""Stacks with a cold tier, where the tiering jobs run."""
MULTIPROCESS_STACKS = {"embedded", "redis+postgres+s3"} | (
    {"redis+mongo+s3"} if os.environ.get("TIERSTORE_TEST_MONGO_URL") else set())
"""Stacks several OS processes can share (the in-memory Mongo emulation cannot)."""
ARCHIVING_STACKS: dict[str, StackBuilder] = {
    **{name: STACKS[name] for name in sorted(TIERED_STACKS)},
    "postgres+file": postgres_file,
}
"""Every stack with a cold tier, and one with no hot tier at all (PostgreSQL + files):
the suites that prove tiering invisible run on these."""
MULTIPROCESS_ARCHIVING_STACKS = {
    name for name in ARCHIVING_STACKS if name in MULTIPROCESS_STACKS or name == "postgres+file"}


def stack_params() -> list[Any]:
    return sorted(STACKS)
