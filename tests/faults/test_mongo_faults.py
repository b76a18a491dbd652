"""The MongoDB warm tier behind a TCP proxy that cuts, refuses and stalls, under load.

Runs only against a real server: set ``TIERSTORE_TEST_MONGO_URL`` (for example
``mongodb://127.0.0.1:27017`` from docker-compose). The saver reaches the server
through ``tests.servers.proxy.TcpProxy`` with ``directConnection=true`` (so the driver
does not discover the server's own address and bypass the proxy) and short timeouts.

Eight conversations turn at once while the proxy resets every connection (five times),
refuses new ones for a while, then stalls past the socket timeout. Promised:

- a failed turn failed with ``TierUnavailable``: no driver error escaped;
- later turns succeed without help, on every thread;
- every acknowledged turn is in its thread's latest state, read back through a saver
  that talks to the server directly.

Error translation itself is checked on every call without a server in
``test_mongo_errors.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from loadtest.workload import build_chat_agent
from tests.faults.conversations import Conversations, until, untranslated
from tests.servers.proxy import TcpProxy
from tierstore import TieredSaver
from tierstore.tiers.mongo import MongoWarm

CONVERSATIONS = 8
MESSAGE_BYTES = 300
STALL_SECONDS = 3.0  # past socketTimeoutMS
DRIVER_OPTIONS = {"directConnection": "true", "serverSelectionTimeoutMS": "2000",
                  "connectTimeoutMS": "1000", "socketTimeoutMS": "1500"}


def via(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host replaced by the proxy's address and short timeouts."""
    parts = urlsplit(url)
    netloc = proxy.address
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    query = dict(parse_qsl(parts.query))
    query.update(DRIVER_OPTIONS)
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


@pytest.fixture
async def proxy(mongo_server_url: str | None) -> AsyncIterator[TcpProxy]:
    if mongo_server_url is None:
        pytest.skip("needs a real MongoDB server: set TIERSTORE_TEST_MONGO_URL")
    parts = urlsplit(mongo_server_url)
    if parts.scheme != "mongodb" or "," in parts.netloc:
        pytest.skip("the proxy fronts one host: give a mongodb:// URL of a single server")
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 27017) as started:
        yield started


async def test_turns_ride_through_cut_refused_and_stalled_connections(
    mongo_server_url: str, proxy: TcpProxy,
) -> None:
    threads = [f"mongo-load-{i}-{uuid.uuid4().hex[:8]}" for i in range(CONVERSATIONS)]
    warm = MongoWarm(via(mongo_server_url, proxy))
    async with TieredSaver.from_stores(warm=warm, hot=None, cold=None) as saver:
        load = Conversations(build_chat_agent(MESSAGE_BYTES).compile(checkpointer=saver),
                             threads, message_bytes=MESSAGE_BYTES)
        load.start()
        try:
            await until(lambda: load.all_turned_since({}, 2), "every thread's first turns")
            for _ in range(5):
                done = load.total()
                await until(lambda: proxy.open > 0, "connections to cut")
                proxy.cut()
                await until(lambda: load.total() > done,  # noqa: B023 (awaited here)
                            "a turn after the cut")
            proxy.refuse()
            proxy.cut()
            failed = len(load.errors)
            await until(lambda: len(load.errors) > failed, "a turn meeting the refused server")
            proxy.accept()
            proxy.stall()
            await until(lambda: len(load.errors) > failed + 1, "a turn timing out on the stall")
            proxy.resume()
            before = load.snapshot()
            await until(lambda: load.all_turned_since(before, 2), "every thread turning again")
        finally:
            await load.finish()
        assert untranslated(load.errors) == [], "driver errors escaped"
        assert proxy.resets > 0 and proxy.refused > 0
    async with TieredSaver.from_stores(warm=MongoWarm(mongo_server_url), hot=None,
                                       cold=None) as direct:
        verdict = await load.ledger.verify(direct)
        assert verdict.ok, verdict.summary()
