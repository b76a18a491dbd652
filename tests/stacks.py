"""Saver stacks the integration suites run on.

A stack is built per test from pytest fixtures, so server-backed stacks run wherever
the server fixtures can provide one (a server named by TIERSTORE_TEST_*, the local
default, or a private instance the fixture starts). MongoDB runs on the in-memory
emulation unless TIERSTORE_TEST_MONGO_URL names a real server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tierstore import TieredSaver


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


def redis_hot(request: pytest.FixtureRequest) -> str:
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
    return with_query(base, prefix=prefix, timeout="5", socket_timeout="2",
                      connect_timeout="2")


def s3_cold(request: pytest.FixtureRequest, storage_class: str = "STANDARD_IA") -> str:
    from tests.servers.s3 import s3_url

    return s3_url(request.getfixturevalue("moto_endpoint"), storage_class=storage_class)


def postgres_warm(request: pytest.FixtureRequest) -> str:
    """The session's test database, with a schema of this test's own."""
    base: str = request.getfixturevalue("postgres_url")
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}schema=t_{uuid.uuid4().hex[:16]}&max_size=5"


def postgres_only(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    return Stack("postgres", None, postgres_warm(request), None)


def redis_postgres(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    return Stack("redis+postgres", redis_hot(request), postgres_warm(request), None)


def redis_postgres_s3(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    return Stack("redis+postgres+s3", redis_hot(request), postgres_warm(request),
                 s3_cold(request))


def redis_mongo_s3(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    target = request.getfixturevalue("mongo_db")
    return Stack("redis+mongo+s3", redis_hot(request), target.store, s3_cold(request),
                 shared_across_processes=target.real)


def postgres_file(request: pytest.FixtureRequest, tmp: Path) -> Stack:
    return Stack("postgres+file", None, postgres_warm(request), f"file://{tmp}/cold")


STACKS: dict[str, StackBuilder] = {
    "embedded": embedded,
    "postgres": postgres_only,
    "redis+postgres": redis_postgres,
    "redis+postgres+s3": redis_postgres_s3,
    "redis+mongo+s3": redis_mongo_s3,
}
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
