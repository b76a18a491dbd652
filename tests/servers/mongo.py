"""MongoDB for the tests: the server named by ``TIERSTORE_TEST_MONGO_URL``, else a mock.

No ``mongod`` can run on the build machines, so by default the tests talk to
mongomock-motor through a thin adapter; set ``TIERSTORE_TEST_MONGO_URL`` (for example
``mongodb://127.0.0.1:27017`` from docker-compose) and the very same tests run against a
real server through ``pymongo.AsyncMongoClient``, in a database created for the test run
and dropped at its end.

The ``mongo_db`` fixture yields a ``MongoTarget``: ``store()`` builds a ``MongoWarm``
on the test's database and ``inspect()`` gives the raw database to tests that read or
damage stored documents.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tierstore.tiers.mongo import BucketFactory, MongoWarm

MONGO_URL_VAR = "TIERSTORE_TEST_MONGO_URL"


class _Yielding:
    """A mock collection whose every operation first hands control to the event loop.

    mongomock answers synchronously, so an ``await`` on it never suspends and two
    coroutines could never interleave between a read and its compare-and-set. Yielding
    first gives the race tests the interleavings a real server allows.
    """

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        async def call(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            return await attr(*args, **kwargs)

        return call


class YieldingDatabase:
    """The adapter ``MongoWarm`` sees in mock mode: ``db[name]`` and ``db.name``."""

    def __init__(self, database: Any) -> None:
        self._database = database
        self.name: str = database.name

    def __getitem__(self, name: str) -> Any:
        return _Yielding(self._database[name])

    def get_collection(self, name: str) -> Any:
        return self[name]


@dataclass
class MongoTarget:
    """One test's MongoDB: how to build a store on it, and a way to look inside.

    On the mock, stores share one injected database (the caller-owned path). On a
    real server, each store is built from the URL and owns its client (the
    production path); ``inspect()`` opens a separate client for looking inside.
    """

    url: str | None
    database_name: str
    raw: Any = None
    database: Any = None
    gridfs: BucketFactory | None = None

    @property
    def real(self) -> bool:
        return self.url is not None

    def store(self, **options: Any) -> MongoWarm:
        if self.url is not None:
            return MongoWarm(self.url, **options)
        return MongoWarm(database=self.database, gridfs=self.gridfs, **options)

    @asynccontextmanager
    async def inspect(self) -> AsyncIterator[Any]:
        """The raw database, for tests that read or damage stored documents."""
        if self.url is None:
            yield self.raw
            return
        from pymongo import AsyncMongoClient

        client: Any = AsyncMongoClient(self.url)
        try:
            yield client[self.database_name]
        finally:
            await client.close()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def mongo_server_url() -> Iterator[str | None]:
    """A database URL on the real server for this test run (dropped at the end), or None."""
    url = os.environ.get(MONGO_URL_VAR)
    if not url:
        yield None
        return
    from pymongo import MongoClient

    name = f"tierstore_{uuid.uuid4().hex[:12]}"
    client: Any = MongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        client.admin.command("ping")
        yield _with_database(url, name)
    finally:
        try:
            client.drop_database(name)
        finally:
            client.close()


@pytest.fixture
def mongo_db(mongo_server_url: str | None) -> Iterator[MongoTarget]:
    if mongo_server_url is not None:
        name = urlsplit(mongo_server_url).path.lstrip("/")
        yield MongoTarget(url=mongo_server_url, database_name=name)
        return
    from mongomock_motor import AsyncMongoMockClient, enabled_gridfs_integration
    from motor.motor_asyncio import AsyncIOMotorGridFSBucket

    # The GridFS patches must stay active for the whole test, not only during setup.
    with enabled_gridfs_integration():
        name = f"tierstore_{uuid.uuid4().hex[:12]}"
        raw: Any = AsyncMongoMockClient()[name]

        def bucket(_database: Any, bucket_name: str) -> Any:
            return AsyncIOMotorGridFSBucket(raw, bucket_name=bucket_name)

        yield MongoTarget(url=None, database_name=name, raw=raw,
                          database=YieldingDatabase(raw), gridfs=bucket)
