"""The Redis hot tier failing under load: sixteen chat conversations keep turning.

Sixteen LangGraph conversations (``loadtest.workload``'s chat agent) run turns at once
through one ``TieredSaver`` (hot = a private Redis, warm = SQLite) while Redis is
SIGKILLed and restarted, has its connections reset through a proxy, or stalls past
its socket timeout. Every turn is recorded in a ``loadtest.ledger.Ledger``.

Promised, and checked after each fault:

- no turn fails: the hot tier is an accelerator, its failures are absorbed (were one
  to escape, it would have to be ``TierUnavailable``, and the test lists its type);
- every acknowledged turn is in its thread's latest state with its reply, read back
  through the saver and through warm alone;
- the saver serves hot hits again by itself once Redis is back;
- the write-behind queue drains: with ``hot_check="trusted"``, once every thread has
  turned again after the fault, what Redis serves for each thread is warm's latest
  (README: a trusted entry is stale only until a newer write replaces it or its TTL
  runs out; the TTL here is far longer than the test, so only replacement can pass).

Waits poll a condition under a generous deadline; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loadtest.workload import build_chat_agent, thread_config
from tests.faults.conversations import Conversations, until, untranslated
from tests.servers.proxy import TcpProxy
from tests.servers.redis import RedisServer, unique_prefix, with_query
from tierstore import TieredSaver
from tierstore.settings import SaverOptions

CONVERSATIONS = 16
MESSAGE_BYTES = 300
# timeouts a loaded 2-core machine may hit now and then (absorbed like any fault), and
# a quick breaker so recovery is seen within the test
HOT_OPTIONS = {"timeout": "1", "socket_timeout": "0.5", "connect_timeout": "0.5",
               "backoff": "0.05", "backoff_max": "0.3", "ttl": "3600"}
LEASE_TTL = 2.0
STALL_SECONDS = 1.5  # past socket_timeout and timeout


async def latest_id(saver: TieredSaver, thread: str) -> str | None:
    found = await saver.aget_tuple(thread_config(thread))
    return None if found is None else str(found.config["configurable"]["checkpoint_id"])


@dataclass
class Stack:
    server: RedisServer
    proxy: TcpProxy
    warm: str
    prefix: str

    def hot_url(self, *, proxied: bool) -> str:
        port = self.proxy.port if proxied else self.server.port
        return with_query(f"redis://127.0.0.1:{port}/0", prefix=self.prefix, **HOT_OPTIONS)


@pytest.fixture
async def stack(redis_servers: Callable[[], RedisServer],
                tmp_path: Path) -> AsyncIterator[Stack]:
    server = redis_servers()
    async with TcpProxy("127.0.0.1", server.port) as proxy:
        yield Stack(server, proxy, f"sqlite:///{tmp_path}/warm.db", unique_prefix())


async def kill_and_restart(stack: Stack, load: Conversations) -> None:
    stack.server.kill()
    before = dict(load.ended)
    await until(lambda: load.all_ended_since(before), "every thread turning without Redis")
    await asyncio.sleep(WRITE_BEHIND_SECONDS)  # the hot updates of those turns are sent now
    stack.server.start()  # same port, empty, scripts forgotten


async def cut_connections(stack: Stack, load: Conversations) -> None:
    for _ in range(5):
        done = sum(load.ended.values())
        await until(lambda: stack.proxy.open > 0, "connections to cut")
        assert stack.proxy.cut() > 0
        await until(lambda: sum(load.ended.values()) > done,  # noqa: B023 (awaited here)
                    "a turn after the cut")
    stack.proxy.refuse()  # and a window where Redis cannot be reached at all
    await asyncio.sleep(WRITE_BEHIND_SECONDS)
    before = dict(load.ended)
    stack.proxy.cut()
    await until(lambda: load.all_ended_since(before), "every thread turning while refused")
    stack.proxy.accept()


async def stall_past_timeout(stack: Stack, load: Conversations) -> None:
    stack.proxy.stall()
    await asyncio.sleep(STALL_SECONDS)
    stack.proxy.resume()


WRITE_BEHIND_SECONDS = 3 * SaverOptions().hot_write_delay
"""Long enough for the write-behind queue to send (and fail) the hot updates of a turn:
with ``hot_check="verify"`` a turn makes no other hot call."""


def leases(saver: TieredSaver) -> Callable[[str], Any]:
    """Per-turn leases. A lease whose release failed (Redis cut off from this saver but
    alive) keeps its thread until its TTL: a short TTL and a longer wait let the thread's
    next turn take it over instead of failing with ``LeaseBusy``."""
    return lambda thread: saver.lease(thread, ttl=LEASE_TTL, wait=3 * LEASE_TTL)


FAULTS: dict[str, tuple[Callable[[Stack, Conversations], Awaitable[None]], bool]] = {
    # name: (fault, whether the saver reaches Redis through the proxy)
    "sigkill-restart": (kill_and_restart, False),
    "connections-cut": (cut_connections, True),
    "stalled": (stall_past_timeout, True),
}


@pytest.mark.parametrize(("hot_check", "leased"),
                         [("trusted", False), ("verify", False), ("verify", True)])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_conversations_ride_through_redis_faults(
    stack: Stack, fault: str, hot_check: str, leased: bool,
) -> None:
    inject, proxied = FAULTS[fault]
    hot = stack.hot_url(proxied=proxied)
    threads = [f"load-{fault}-{i}-{uuid.uuid4().hex[:8]}" for i in range(CONVERSATIONS)]
    async with TieredSaver.from_urls(hot=hot, warm=stack.warm, cold=None,
                                     hot_check=hot_check) as saver:
        load = Conversations(build_chat_agent(MESSAGE_BYTES).compile(checkpointer=saver), threads,
                             message_bytes=MESSAGE_BYTES,
                             lease=leases(saver) if leased else None)
        load.start()
        try:
            await until(lambda: load.all_turned_since({}, 2), "every thread's first turns")
            await inject(stack, load)
            errors_at_fault = saver.stats.hot_errors
            # recovery: every thread turns twice more (its write-behind update is sent
            # after the first), and Redis serves hits again
            before, hits = load.snapshot(), saver.stats.hot_hits
            await until(lambda: load.all_turned_since(before, 2) and saver.stats.hot_hits > hits,
                        "every thread turning again and hot hits coming back")
        finally:
            await load.finish()
        assert untranslated(load.errors) == [], "driver errors escaped"
        if not leased:  # the hot tier is absorbed; a lease needs it, so it fails typed
            assert load.errors == [], f"{len(load.errors)} turns failed: {load.errors[:3]}"
        assert errors_at_fault > 0, "the fault never met a hot call"
        verdict = await load.ledger.verify(saver)
        assert verdict.ok, verdict.summary()
    # the saver is closed: its write-behind queue is drained
    async with (
        TieredSaver.from_urls(hot=None, warm=stack.warm, cold=None) as warm_only,
        TieredSaver.from_urls(hot=stack.hot_url(proxied=False), warm=stack.warm, cold=None,
                              hot_check="trusted", hot_write_delay=0) as trusting,
    ):
        verdict = await load.ledger.verify(warm_only)
        assert verdict.ok, verdict.summary()
        hits = trusting.stats.hot_hits
        stale = [t for t in threads
                 if await latest_id(trusting, t) != await latest_id(warm_only, t)]
        assert stale == [], f"Redis serves a state older than warm for {len(stale)} threads"
        assert trusting.stats.hot_hits > hits, "Redis holds no entry for any thread"
