"""Several savers in one process over the same stores: a delete through one wins over
every other's cached copies of the thread.

LangGraph's Agent Server keeps one saver per event loop and never closes the extra
ones. Saver A writes a thread (its hot update queued behind, ``hot_write_delay``),
saver B deletes it (or prunes it, deletes its run, copies another thread onto it);
then reads through both savers, A's queued update sent, and the hot stores read
directly must show nothing of what was deleted: not A's queue, not A's own
``memory://`` entries (each saver has its own in-process hot tier), not Redis. Both
``hot_check`` modes, and A on the same event loop as B or on a loop of its own (a
sync saver's private loop thread).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.conformance.test_utils import (
    generate_checkpoint,
    generate_config,
    generate_metadata,
)
from redis.asyncio import Redis

from tests.integration.rawbytes import redis_bytes, unpacked
from tests.servers.redis import purge, with_query
from tierstore import TieredSaver
from tierstore.hotcache import HotCache
from tierstore.tiers.base import HotStore
from tierstore.tiers.clients import redis_hot

T = TypeVar("T")

OPS: dict[str, tuple[Callable[[TieredSaver], Awaitable[None]], str | None]] = {
    # what B does, and the note thread "t" holds afterwards (a copy adds the source's
    # checkpoints to the target's, as LangGraph's savers do; the source's are newer)
    "delete_thread": (lambda s: s.adelete_thread("t"), None),
    "prune_delete_all": (lambda s: s.aprune(["t"], strategy="delete_all"), None),
    "delete_for_runs": (lambda s: s.adelete_for_runs(["doomed-run"]), "kept"),
    "copy_onto": (lambda s: s.acopy_thread("source", "t"), "source-state"),
}


class Side:
    """Saver A, on the test's event loop or on a private loop of its own."""

    def __init__(self, saver: TieredSaver, threaded: bool) -> None:
        self.saver = saver
        self.threaded = threaded

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self.threaded:
            return await coro
        return await asyncio.to_thread(self.saver._bridge.run, coro)

    @property
    def cache(self) -> HotCache:
        cache = self.saver.regions.by_name["default"].cache
        assert cache is not None
        return cache

    @property
    def hot(self) -> HotStore:
        hot = self.saver.regions.by_name["default"].hot
        assert hot is not None
        return hot


@asynccontextmanager
async def side_a(options: dict[str, Any], loops: str) -> AsyncIterator[Side]:
    """Saver A: on the test's loop, or a sync saver on an event loop of its own."""
    threaded = loops == "two-loops"
    saver = TieredSaver.from_urls(**options)
    if threaded:
        saver.__enter__()  # a sync saver: its own event loop, on a thread of its own
    else:
        await saver.open()
    try:
        yield Side(saver, threaded)
    finally:
        if threaded:
            saver.__exit__(None, None, None)
        else:
            await saver.aclose()


async def write(saver: TieredSaver, thread: str, note: str, run_id: str, *,
                parent: RunnableConfig | None = None, step: int = 1) -> RunnableConfig:
    values = {"note": note}
    cp = generate_checkpoint(channel_values=values, channel_versions={"note": step})
    return await saver.aput(parent or generate_config(thread), cp,
                            generate_metadata(step=step, run_id=run_id), {"note": step})


async def note_of(saver: TieredSaver) -> str | None:
    got = await saver.aget_tuple(generate_config("t"))
    return None if got is None else str(got.checkpoint["channel_values"]["note"])


@pytest.fixture(params=["redis", "memory"])
async def hot_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "memory":
        yield "memory://"
        return
    url: str = request.getfixturevalue("redis_url")
    prefix = f"peers-{uuid.uuid4().hex[:10]}:"
    yield with_query(url, prefix=prefix)
    await purge(url, prefix)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("loops", ["one-loop", "two-loops"])
@pytest.mark.parametrize("hot_check", ["verify", "trusted"])
async def test_a_delete_through_one_saver_wins_over_another_savers_copies(
        hot_url: str, hot_check: str, loops: str, op: str, tmp_path: Path) -> None:
    action, expected = OPS[op]
    options: dict[str, Any] = dict(hot=hot_url, warm=f"sqlite:///{tmp_path}/warm.db", cold=None,
                                   hot_check=hot_check, hot_write_delay=60)
    secret = f"SECRET-{uuid.uuid4().hex}"
    async with side_a(options, loops) as a, TieredSaver.from_urls(**options) as b:
        kept = await a.run(write(a.saver, "t", "kept", "kept-run"))
        await a.run(a.cache.drain())  # A's hot store holds "kept"
        doomed = await a.run(write(a.saver, "t", secret, "doomed-run", parent=kept,
                                   step=2))
        gone = {kept["configurable"]["checkpoint_id"], doomed["configurable"]["checkpoint_id"]}
        if expected == "kept":
            gone.remove(kept["configurable"]["checkpoint_id"])
        assert a.cache.queued("t", "") is not None  # sent in 60 s
        assert await a.run(note_of(a.saver)) == secret
        # newer than A's checkpoints: copied onto "t", it is the head there
        await write(b, "source", "source-state", "other-run", step=3)

        await action(b)

        for when in ("queued", "sent"):
            assert await a.run(note_of(a.saver)) == expected, f"A, update {when}"
            assert await note_of(b) == expected, f"B, update {when}"
            # the hot stores read directly (A's on its own loop)
            b_hot = b.regions.by_name["default"].hot
            assert b_hot is not None
            for side, entry in (("A", await a.run(a.hot.get("t", ""))),
                                ("B", await b_hot.get("t", ""))):
                assert entry is None or entry.checkpoint_id not in gone, (
                    f"{side}'s hot store, update {when}")
            await a.run(a.cache.drain())  # A's queued update goes out now
        if not hot_url.startswith("memory"):
            prefix = hot_url.split("prefix=", 1)[1].split("&", 1)[0]
            raw = await redis_bytes(hot_url, prefix, delete=False)
            assert secret.encode() not in unpacked(raw)


@pytest.mark.parametrize("loops", ["one-loop", "two-loops"])
async def test_a_trusted_saver_reads_another_savers_write_not_the_older_hot_entry(
        hot_url: str, loops: str, tmp_path: Path) -> None:
    """The Agent Server with isolated loops: a run writes through one loop's saver (its hot
    update queued behind), the API reads through another's. With ``trusted`` the reader
    must not serve the older hot entry: LangGraph's next write (``update_state``) would
    fork the thread and drop the run's output."""
    options: dict[str, Any] = dict(hot=hot_url, warm=f"sqlite:///{tmp_path}/warm.db", cold=None,
                                   hot_check="trusted", hot_write_delay=60)
    async with side_a(options, loops) as a, TieredSaver.from_urls(**options) as b:
        first = await a.run(write(a.saver, "t", "first", "run-1"))
        await a.run(a.cache.drain())  # the hot entries hold "first"
        assert await note_of(b) == "first"  # and B has read it
        await a.run(write(a.saver, "t", "second", "run-2", parent=first, step=2))
        assert a.cache.queued("t", "") is not None  # sent in 60 s
        assert await note_of(b) == "second"
        await a.run(a.cache.drain())
        assert await note_of(b) == "second"


@pytest.mark.parametrize("spelling", ["as-the-url", "localhost"])
@pytest.mark.parametrize("injected", ["reader", "writer"])
async def test_a_saver_on_the_applications_redis_client_is_a_peer_of_its_url_twin(
        redis_url: str, tmp_path: Path, injected: str, spelling: str) -> None:
    """One saver on a Redis client the application made, one from the same server's URL:
    they share the same entries, so a trusted one must see the other's newer write,
    however the client names the server."""
    prefix = f"peers-{uuid.uuid4().hex[:10]}:"
    options: dict[str, Any] = dict(warm=f"sqlite:///{tmp_path}/warm.db", cold=None,
                                   hot_check="trusted", hot_write_delay=60)
    where = urlsplit(redis_url)
    assert where.hostname == "127.0.0.1", "the test spells the same server differently"
    client = (Redis.from_url(redis_url.split("?", 1)[0]) if spelling == "as-the-url"
              else Redis(host="localhost", port=where.port or 6379))
    on_client = TieredSaver.from_clients(hot=client, hot_options={"prefix": prefix}, **options)
    on_url = TieredSaver.from_urls(hot=with_query(redis_url, prefix=prefix), **options)
    a, b = (on_url, on_client) if injected == "reader" else (on_client, on_url)
    try:
        async with a, b:
            first = await write(a, "t", "first", "run-1")
            await a.regions.by_name["default"].cache.drain()  # type: ignore[union-attr]
            assert await note_of(b) == "first"
            await write(a, "t", "second", "run-2", parent=first, step=2)  # queued for 60 s
            assert await note_of(b) == "second"
            await b.adelete_thread("t")  # and a delete through one wins over the other's queue
            assert await note_of(a) is None and await note_of(b) is None
    finally:
        await client.aclose()
        await purge(redis_url, prefix)


def test_clients_of_two_servers_are_not_peers() -> None:
    one, two = Redis(host="10.0.0.1", port=6379), Redis(host="10.0.0.2", port=6380)
    assert redis_hot(one).identity != redis_hot(two).identity
    assert redis_hot(one).identity == redis_hot(Redis(host="10.0.0.1", port=6379)).identity
