"""The Redis hot tier under faults, with real LangGraph graphs over a TieredSaver.

1. Redis is killed in the middle of a conversation and restarted: every turn still
   succeeds with complete state, and the saver serves hot hits again by itself.
2. One saver reaches Redis through a TCP proxy that is cut and healed while a second
   saver talks to Redis directly, both on one warm SQLite file: with the default
   ``hot_check="verify"`` neither ever returns a latest state other than warm's;
   with ``hot_check="trusted"`` the writer reads a thread whose hot write failed from
   warm and repairs Redis once it answers; only if the writer ends while Redis is
   unreachable is the stale entry served to others, until its TTL runs out (the
   documented staleness bound).

Waits poll a condition under a generous deadline; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import operator
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph
from redis.asyncio import Redis

from tests.servers.proxy import TcpProxy
from tests.servers.redis import RedisServer, unique_prefix, with_query
from tierstore import TieredSaver, hotcache
from tierstore.tiers.redis import entry_key

DEADLINE = 20.0
# fast recovery, and timeouts a loaded machine cannot hit: the faults below are dead
# servers and reset connections, which fail at once (silent servers and timeouts are
# tested in tests/contract/test_redis_hot.py)
FAST_BACKOFF = {"backoff": "0.05", "backoff_max": "0.2", "timeout": "5",
                "socket_timeout": "2", "connect_timeout": "2"}


async def past_backoff() -> None:
    """Let a breaker that opened during a cut admit its next call (``backoff_max`` is 0.2 s).

    Without this, the first call to reach Redis after a heal may be a refill rather
    than a read, repairing the stale entry before anyone looks at it.
    """
    await asyncio.sleep(0.3)


class State(TypedDict):
    items: Annotated[list[str], operator.add]


def step(state: State) -> dict[str, list[str]]:
    return {"items": [f"out-{len(state['items'])}"]}


def graph(saver: TieredSaver) -> Any:
    builder = StateGraph(State)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_edge("step", END)
    return builder.compile(checkpointer=saver)


def config(thread: str) -> Any:
    return {"configurable": {"thread_id": thread}}


async def turn(app: Any, thread: str, n: int, expected: list[str]) -> None:
    """One conversation turn; ``expected`` is the state every turn so far must leave."""
    result = await app.ainvoke({"items": [f"in-{n}"]}, config(thread))
    expected += [f"in-{n}", f"out-{len(expected) + 1}"]
    assert result["items"] == expected
    state = await app.aget_state(config(thread))
    assert state.values["items"] == expected


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting: {what}")
        await asyncio.sleep(0.02)


# -- 1. kill and restart ------------------------------------------------------------------


async def test_turns_survive_redis_dying_and_hot_hits_come_back(
    redis_servers: Callable[[], RedisServer], tmp_path: Path,
) -> None:
    server = redis_servers()
    hot = with_query(server.url, prefix=unique_prefix(), **FAST_BACKOFF)
    thread, expected = f"conv-{uuid.uuid4()}", list[str]()
    async with TieredSaver.from_urls(hot=hot, warm=f"sqlite:///{tmp_path}/w.db",
                                     cold=None) as saver:
        app = graph(saver)
        for n in range(3):
            await turn(app, thread, n, expected)
        assert saver.stats.hot_hits > 0 and saver.stats.hot_errors == 0

        server.kill()
        for n in range(3, 8):
            await turn(app, thread, n, expected)
        cache = saver.regions.for_thread(thread).cache
        assert cache is not None
        await cache.drain()  # hot updates are sent behind the turns
        assert saver.stats.hot_errors > 0  # every failure was logged, counted and survived

        server.start()  # same port, empty, scripts forgotten
        hits = saver.stats.hot_hits
        n = 8

        async def hits_again() -> bool:
            nonlocal n
            await turn(app, thread, n, expected)
            n += 1
            return saver.stats.hot_hits > hits

        await until(hits_again, "the saver serving hot hits after Redis came back")
        assert len(expected) == 2 * n


# -- 2. a partition between one saver and Redis ----------------------------------------------


@pytest.fixture
async def proxied_redis(
    redis_servers: Callable[[], RedisServer],
) -> AsyncIterator[tuple[RedisServer, TcpProxy]]:
    server = redis_servers()
    async with TcpProxy("127.0.0.1", server.port) as proxy:
        yield server, proxy


def partition(proxy: TcpProxy) -> None:
    """The saver behind ``proxy`` loses Redis (open and new connections) while others keep it."""
    proxy.cut()
    proxy.refuse()


def heal(proxy: TcpProxy) -> None:
    proxy.accept()


async def latest(saver: TieredSaver, thread: str) -> Any:
    found = await saver.aget_tuple(config(thread))
    if found is None:
        return None
    return (found.config["configurable"]["checkpoint_id"], found.checkpoint["channel_values"],
            sorted(map(repr, found.pending_writes or [])))


async def test_a_partitioned_saver_never_serves_stale_latest_state(
    proxied_redis: tuple[RedisServer, TcpProxy], tmp_path: Path,
) -> None:
    server, proxy = proxied_redis
    prefix = unique_prefix()
    warm = f"sqlite:///{tmp_path}/shared.db"
    via_proxy = with_query(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix, **FAST_BACKOFF)
    direct = with_query(server.url, prefix=prefix, **FAST_BACKOFF)
    thread, gone, expected = f"conv-{uuid.uuid4()}", f"gone-{uuid.uuid4()}", list[str]()
    async with (
        # write-through and no process-local copy: every hot write and read of `a` meets
        # the partition
        TieredSaver.from_urls(hot=via_proxy, warm=warm, cold=None, hot_write_delay=0,
                              hot_local_entries=0) as a,
        TieredSaver.from_urls(hot=direct, warm=warm, cold=None, hot_write_delay=0,
                              hot_local_entries=0) as b,
        TieredSaver.from_urls(hot=None, warm=warm, cold=None) as truth,
    ):
        app_a, app_b = graph(a), graph(b)

        async def fresh(saver: TieredSaver, t: str = thread) -> bool:
            return bool(await latest(saver, t) == await latest(truth, t))

        for n in range(2):
            await turn(app_a, thread, n, expected)
        await turn(app_a, gone, 0, [])
        assert await fresh(a) and await fresh(b)

        partition(proxy)
        for n in range(2, 4):  # b moves the thread on; Redis follows b
            await turn(app_b, thread, n, expected)
        await turn(app_a, thread, 4, expected)  # a's hot write fails: Redis lags warm
        await a.adelete_thread(gone)  # a's invalidation fails: Redis keeps a dead thread
        assert await fresh(a)
        assert await latest(a, gone) is None

        heal(proxy)
        await past_backoff()
        stale = a.stats.hot_stale
        assert await fresh(a)
        assert a.stats.hot_stale == stale + 1  # a read Redis, saw the lagging entry, refused it
        assert await fresh(b)
        assert await latest(a, gone) is None and await latest(b, gone) is None

        # a pending write that reaches warm but not Redis
        head = await a.aget_tuple(config(thread))
        assert head is not None and await fresh(b)  # both now cache the head
        partition(proxy)
        await a.aput_writes(head.config, [("items", ["pending"])], task_id="task-1")
        heal(proxy)
        await past_backoff()
        stale = a.stats.hot_stale
        assert (await latest(a, thread))[2] == [repr(("task-1", "items", ["pending"]))]
        assert a.stats.hot_stale == stale + 1  # the cached head lacked the write
        assert await fresh(a)
        assert await fresh(b)


@pytest.mark.parametrize("delay", [0.0, 0.05])
async def test_a_trusted_writer_never_resumes_from_an_entry_its_failed_hot_write_left(
    proxied_redis: tuple[RedisServer, TcpProxy], tmp_path: Path, delay: float,
) -> None:
    """``trusted`` serves hot entries unchecked; a hot write that failed leaves one behind
    warm. The process that wrote must not resume its next turn from it (LangGraph would
    fork the thread and drop the turn), and once Redis answers it must repair the entry
    for the other processes that trust it."""
    server, proxy = proxied_redis
    prefix = unique_prefix()
    warm = f"sqlite:///{tmp_path}/shared.db"
    via_proxy = with_query(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix, **FAST_BACKOFF)
    direct = with_query(server.url, prefix=prefix, **FAST_BACKOFF)
    thread, other, expected = f"conv-{uuid.uuid4()}", f"other-{uuid.uuid4()}", list[str]()
    async with (
        TieredSaver.from_urls(hot=via_proxy, warm=warm, cold=None, hot_check="trusted",
                              hot_write_delay=delay) as writer,
        TieredSaver.from_urls(hot=direct, warm=warm, cold=None, hot_check="trusted",
                              hot_write_delay=0) as elsewhere,
        TieredSaver.from_urls(hot=None, warm=warm, cold=None) as truth,
    ):
        app = graph(writer)

        async def fresh(saver: TieredSaver, t: str = thread) -> bool:
            return bool(await latest(saver, t) == await latest(truth, t))

        await turn(app, thread, 0, expected)
        await turn(app, other, 0, [])
        await until(lambda: fresh(elsewhere), "the first turn reaching Redis")

        partition(proxy)
        await turn(app, thread, 1, expected)  # warm moves on, the hot write fails
        await asyncio.sleep(3 * delay)  # the write-behind sends (and fails) it
        heal(proxy)
        await past_backoff()
        assert await fresh(writer)  # from warm, not Redis's older entry
        await turn(app, other, 1, ["in-0", "out-1"])  # an answered hot call starts the repair
        await until(lambda: fresh(elsewhere), "the writer repairing Redis for other processes")
        await turn(app, thread, 2, expected)  # resumed from warm's head: nothing forked

        # a pending write that reaches warm but not Redis
        head = await writer.aget_tuple(config(thread))
        assert head is not None
        partition(proxy)
        await writer.aput_writes(head.config, [("items", ["pending"])], task_id="task-1")
        await asyncio.sleep(3 * delay)
        heal(proxy)
        await past_backoff()
        assert (await latest(writer, thread))[2] == [repr(("task-1", "items", ["pending"]))]
        assert await fresh(writer)
        await turn(app, other, 2, ["in-0", "out-1", "in-1", "out-3"])
        await until(lambda: fresh(elsewhere), "the pending write repaired in Redis")
        assert writer.stats.conflicts == 0


async def test_trusted_reads_are_stale_at_most_until_the_ttl(
    proxied_redis: tuple[RedisServer, TcpProxy], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bound when nothing can repair the entry: the writer ends while Redis is
    unreachable (it retries on close, then warns), and another process trusts Redis."""
    # each saver as if in a process of its own: no shared floors or head versions
    monkeypatch.setattr(hotcache, "peers_of", lambda hot, warm: hotcache.HotPeers())
    server, proxy = proxied_redis
    prefix = unique_prefix()
    warm = f"sqlite:///{tmp_path}/shared.db"
    # a short TTL, so that the test can watch it run out
    via_proxy = with_query(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix, ttl="2",
                           **FAST_BACKOFF)
    direct = with_query(server.url, prefix=prefix, ttl="2", **FAST_BACKOFF)
    thread, expected = f"conv-{uuid.uuid4()}", list[str]()
    async with (
        TieredSaver.from_urls(hot=direct, warm=warm, cold=None,
                              hot_check="trusted", hot_write_delay=0) as elsewhere,
        TieredSaver.from_urls(hot=None, warm=warm, cold=None) as truth,
    ):
        async with TieredSaver.from_urls(hot=via_proxy, warm=warm, cold=None,
                                         hot_check="trusted", hot_write_delay=0) as writer:
            app = graph(writer)
            await turn(app, thread, 0, expected)
            cached = await latest(elsewhere, thread)
            assert cached == await latest(truth, thread)
            partition(proxy)
            await turn(app, thread, 1, expected)  # warm moves on, the hot write fails
        heal(proxy)
        hits = elsewhere.stats.hot_hits
        # the bound, observed: the stale entry is served, and it dies with its TTL
        assert await latest(elsewhere, thread) == cached != await latest(truth, thread)
        assert elsewhere.stats.hot_hits == hits + 1
        redis = Redis(port=server.port)
        try:
            key = entry_key(prefix, thread, "")
            assert 0 < await redis.pttl(key) <= 2000

            async def expired() -> bool:
                return bool(await redis.pttl(key) == -2)

            await until(expired, "the stale entry's TTL running out")
        finally:
            await redis.aclose()
        assert await latest(elsewhere, thread) == await latest(truth, thread)
