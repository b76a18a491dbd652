"""The Redis hot tier beyond the shared contract: keys, scripts, TTLs, errors, backoff.

The contract (``tests/contract``) proves that ``RedisHot`` behaves like ``MemoryHot``;
these tests pin what only Redis has: the key layout and hash tag, one round trip per
operation, TTL refresh, collision and corruption handling, driver error translation
and the circuit breaker (driven by a fake clock, so no test depends on timing).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from tests.builders import cached_write as w
from tests.builders import entry
from tests.servers.redis import RedisServer, plain_client, purge, unique_prefix, with_query
from tierstore.errors import ConfigurationError, CorruptPayload, LifecycleError, TierUnavailable
from tierstore.policy import should_replace_hot
from tierstore.records import Payload, StoredCheckpoint
from tierstore.settings import StoreUrl
from tierstore.tiers.memory import MemoryHot
from tierstore.tiers.redis import (
    Breaker,
    RedisHot,
    RedisHotSettings,
    backoff_delay,
    breaker_admit,
    breaker_failure,
    breaker_success,
    entry_key,
    namespaces_key,
)

GENEROUS = {"timeout": "5", "socket_timeout": "2", "connect_timeout": "2"}


def make(url: str, *, ttl: float = 60, clock: Callable[[], float] | None = None,
         **options: str) -> RedisHot:
    """A store with timeouts a loaded machine cannot hit, unless a test asks for others."""
    query = {**GENEROUS, **options}
    settings = RedisHotSettings.from_url(StoreUrl.parse(with_query(url, **query)), ttl=ttl)
    return RedisHot(settings) if clock is None else RedisHot(settings, clock=clock)


@contextlib.asynccontextmanager
async def opened(store: RedisHot) -> AsyncIterator[RedisHot]:
    await store.setup()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
async def hot(redis_url: str) -> AsyncIterator[RedisHot]:
    prefix = unique_prefix()
    try:
        async with opened(make(redis_url, prefix=prefix)) as store:
            yield store
    finally:
        await purge(redis_url, prefix)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client: Redis = plain_client(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- pure decisions --------------------------------------------------------------------


def test_backoff_doubles_from_base_up_to_the_cap() -> None:
    delays = [backoff_delay(n, base=0.1, cap=1.0) for n in range(7)]
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff_delay(10_000, base=0.1, cap=5.0) == 5.0


def test_breaker_admits_one_probe_when_the_backoff_is_over() -> None:
    closed = Breaker()
    assert breaker_admit(closed, 5.0, base=1, cap=8) == (True, closed)
    opened_ = breaker_failure(closed, 5.0, base=1, cap=8)
    assert (opened_.failures, opened_.open_until, opened_.probing) == (1, 6.0, False)
    assert breaker_admit(opened_, 5.9, base=1, cap=8) == (False, opened_)
    admitted, probing = breaker_admit(opened_, 6.0, base=1, cap=8)
    assert admitted and probing.probing and probing.open_until == 7.0
    # while the probe is out, everyone else fails fast
    assert breaker_admit(probing, 6.5, base=1, cap=8)[0] is False
    # the probe fails: the wait doubles
    again = breaker_failure(probing, 6.7, base=1, cap=8)
    assert (again.failures, again.open_until, again.probing) == (2, 8.7, False)
    assert breaker_success(again) == Breaker()


def test_breaker_ignores_failures_of_calls_that_started_before_it_opened() -> None:
    opened_ = breaker_failure(Breaker(), 1.0, base=1, cap=8)
    assert breaker_failure(opened_, 1.1, base=1, cap=8) is opened_


def test_a_probe_lost_to_cancellation_does_not_wedge_the_breaker() -> None:
    _, probing = breaker_admit(breaker_failure(Breaker(), 0.0, base=1, cap=8), 1.0, base=1,
                               cap=8)
    admitted, _ = breaker_admit(probing, probing.open_until, base=1, cap=8)
    assert admitted


# -- settings --------------------------------------------------------------------------


def test_url_options_and_defaults() -> None:
    s = RedisHotSettings.from_url(StoreUrl.parse("redis://h:7000/3"), ttl=90)
    assert (s.host, s.port, s.db, s.prefix, s.ttl, s.cluster, s.ssl) == (
        "h", 7000, 3, "ts:", 90.0, False, False)
    assert (s.timeout, s.socket_timeout, s.connect_timeout) == (0.5, 0.25, 0.25)
    s = RedisHotSettings.from_url(StoreUrl.parse(
        "rediss+cluster://u:p@h?prefix=app:&ttl=5&seeds=a:1,[::1]:2&backoff_max=1"), ttl=90)
    assert (s.cluster, s.ssl, s.ttl, s.prefix, s.seeds, s.backoff_max) == (
        True, True, 5.0, "app:", (("a", 1), ("::1", 2)), 1.0)
    assert RedisHotSettings.from_url(StoreUrl.parse("valkey://v"), ttl=1).host == "v"


def test_the_password_never_shows() -> None:
    store = RedisHot.from_url(StoreUrl.parse("redis://user:s3cret@h:1/0"), ttl=1)
    assert "s3cret" not in repr(store)
    assert "s3cret" not in repr(store.settings)
    assert store.settings.password == "s3cret"


@pytest.mark.parametrize("url", [
    "redis://h/0?prefix=a{b}",
    "redis://h/0?nope=1",
    "redis://h/x",
    "redis://h/0?ttl=-1",
    "redis://h/0?timeout=abc",
    "redis://h/0?ssl_cert_reqs=maybe",
    "redis://h/0?seeds=a:1",
    "redis+cluster://h/2",
    "redis+cluster://h?seeds=nohostport",
    "redis://h/0?backoff=2&backoff_max=1",
    "memory://",
])
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        RedisHot.from_url(StoreUrl.parse(url), ttl=60)


# -- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("thread", ["plain", "{x}", "}{", "a:b", "线程", "x" * 10_000])
def test_every_key_of_a_thread_shares_one_slot(thread: str) -> None:
    keys = [entry_key("p:", thread, ns) for ns in ("", "child:1", "{ns}")]
    keys.append(namespaces_key("p:", thread))
    assert all(k.startswith("p:{") for k in keys)
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert max(len(k) for k in keys) < 100  # digests, not the ids themselves


async def test_lifecycle_close_is_idempotent_and_final(redis_url: str) -> None:
    store = make(redis_url, prefix=unique_prefix())
    with pytest.raises(LifecycleError):
        await store.get("t", "")
    await store.setup()
    await store.aclose()
    await store.aclose()
    with pytest.raises(LifecycleError):
        await store.put(entry("t", "1"))


# -- behaviour only Redis has --------------------------------------------------------------


async def test_writes_come_back_in_the_order_they_arrived(hot: RedisHot) -> None:
    t = f"t-{uuid.uuid4()}"
    await hot.put(entry(t, "1", writes=(w("z", 0), w("a", 5))))
    await hot.add_writes(t, "", "1", [w("m", 1), w("b", -3, b"one")], version=3)
    await hot.add_writes(t, "", "1", [w("b", -3, b"two"), w("c", 0)], version=4)
    got = await hot.get(t, "")
    assert got is not None
    assert [(x.task_id, x.idx, x.payload.data) for x in got.writes] == [
        ("z", 0, b"v"), ("a", 5, b"v"), ("m", 1, b"v"), ("b", -3, b"two"), ("c", 0, b"v")]


@pytest.mark.parametrize(("first", "second"), [
    (9, 10), (10, 9), (5, 5), (2**40, 2**40 + 1), (2**40 + 1, 2**40), (1, 2**52),
])
async def test_versions_compare_as_python_compares_them(hot: RedisHot, first: int,
                                                        second: int) -> None:
    """Entries are ordered by the warm version as integers (never as text), in Lua."""
    t = f"t-{uuid.uuid4()}"
    reference = MemoryHot(ttl=60)
    a, b = entry(t, "b", version=first), entry(t, "a", version=second)
    assert await hot.put(a) == await reference.put(a)
    assert await hot.put(b) == await reference.put(b)
    got, expected = await hot.get(t, ""), await reference.get(t, "")
    assert got is not None and expected is not None
    assert (got.checkpoint_id, got.version) == (expected.checkpoint_id, expected.version)
    assert should_replace_hot(a, b) == (got.checkpoint_id == "a")


async def test_location_and_archive_key_survive(hot: RedisHot) -> None:
    t = f"t-{uuid.uuid4()}"
    stub = StoredCheckpoint(
        thread_id=t, checkpoint_ns="", checkpoint_id="1", parent_id="0",
        checkpoint=Payload("msgpack", b""), metadata=Payload("msgpack", b"md"), blobs={},
        writes=(), location="archived", archive_key="segments/x", version=1)
    await hot.put(stub)
    assert await hot.get(t, "") == stub


async def test_thousands_of_writes_in_one_put(hot: RedisHot) -> None:
    t = f"t-{uuid.uuid4()}"
    writes = tuple(w(f"task-{i}", 0) for i in range(10_000))
    assert await hot.put(entry(t, "1", writes=writes))
    got = await hot.get(t, "")
    assert got is not None and got.writes == writes


async def test_every_write_sets_the_ttl_again(hot: RedisHot, raw: Redis) -> None:
    t = f"t-{uuid.uuid4()}"
    prefix = hot.settings.prefix
    await hot.put(entry(t, "1"))
    keys = [entry_key(prefix, t, ""), namespaces_key(prefix, t)]
    for key in keys:
        assert 0 < await raw.pttl(key) <= 60_000
        await raw.pexpire(key, 5_000)
    assert await hot.add_writes(t, "", "1", [w("a", 0)], version=3)
    for key in keys:
        assert await raw.pttl(key) > 5_000
    assert await hot.add_writes(t, "", "2", [w("a", 1)], version=4) is False


async def test_a_colliding_entry_is_a_miss(hot: RedisHot, raw: Redis) -> None:
    """Keys are digests; a frame of another thread under our key must not be served."""
    t, other = f"t-{uuid.uuid4()}", f"o-{uuid.uuid4()}"
    prefix = hot.settings.prefix
    await hot.put(entry(other, "1"))
    await raw.copy(entry_key(prefix, other, ""), entry_key(prefix, t, ""))
    assert await hot.get(t, "") is None
    await hot.put(entry(t, "1", ns="a"))
    await raw.copy(entry_key(prefix, t, "a"), entry_key(prefix, t, "b"))
    assert await hot.get(t, "b") is None
    assert await hot.get(t, "a") is not None


async def test_damaged_entries_raise_corrupt_payload(hot: RedisHot, raw: Redis) -> None:
    t = f"t-{uuid.uuid4()}"
    key = entry_key(hot.settings.prefix, t, "")
    await hot.put(entry(t, "1"))
    await raw.hset(key, "m:frame", b"\xc1garbage")
    with pytest.raises(CorruptPayload):
        await hot.get(t, "")
    await raw.delete(key)
    await raw.set(key, b"someone else's string")
    with pytest.raises(CorruptPayload):
        await hot.get(t, "")
    with pytest.raises(CorruptPayload):
        await hot.put(entry(t, "2"))
    assert hot.breaker == Breaker()  # bad data is not an outage


# -- private servers: round trips, scripts, outages ---------------------------------------


async def _monitor(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"MONITOR\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"+OK")
    return reader, writer


async def _client_commands(reader: asyncio.StreamReader, marker: bytes) -> list[str]:
    """Commands sent by clients (not by scripts) up to the ECHO ``marker``."""
    seen: list[str] = []
    async with asyncio.timeout(10):
        while True:
            line = await reader.readline()
            if marker in line:
                return seen
            if b" lua]" in line:
                continue
            seen.append(line.split(b'"')[1].decode().upper())


async def test_one_round_trip_per_operation(redis_servers: Callable[[], RedisServer]) -> None:
    server = redis_servers()
    async with opened(make(server.url)) as hot:
        t = f"t-{uuid.uuid4()}"
        await hot.put(entry(t, "0"))  # connect first: the handshake is not part of an op
        marker_client = Redis(port=server.port)
        await marker_client.ping()
        reader, writer = await _monitor(server.port)
        try:
            ops: dict[str, Callable[[], Any]] = {
                "put": lambda: hot.put(entry(t, "1", writes=(w("a", 0),))),
                "add_writes": lambda: hot.add_writes(t, "", "1", [w("b", 0), w("c", -1)],
                                                     version=3),
                "get": lambda: hot.get(t, ""),
                "invalidate_ns": lambda: hot.invalidate(t, ""),
                "invalidate_thread": lambda: hot.invalidate(t),
            }
            counted: dict[str, list[str]] = {}
            for name, op in ops.items():
                await op()
                marker = f"end-of-{name}".encode()
                await marker_client.echo(marker)
                counted[name] = await _client_commands(reader, marker)
        finally:
            writer.close()
            await marker_client.aclose()
    assert counted == {"put": ["EVALSHA"], "add_writes": ["EVALSHA"], "get": ["HGETALL"],
                       "invalidate_ns": ["EVALSHA"], "invalidate_thread": ["EVALSHA"]}


async def test_scripts_are_reloaded_after_the_server_forgets_them(
    redis_servers: Callable[[], RedisServer],
) -> None:
    server = redis_servers()
    async with opened(make(server.url)) as hot:
        client = Redis(port=server.port)
        try:
            await client.script_flush()
        finally:
            await client.aclose()
        assert await hot.put(entry("t", "1"))
        assert await hot.add_writes("t", "", "1", [w("a", 0)], version=3)
        got = await hot.get("t", "")
        assert got is not None and len(got.writes) == 1


async def test_a_dead_server_fails_fast_backs_off_and_recovers(
    redis_servers: Callable[[], RedisServer],
) -> None:
    server = redis_servers()
    clock = Clock()
    async with opened(make(server.url, clock=clock, backoff="1", backoff_max="4")) as hot:
        assert await hot.put(entry("t", "1"))
        server.kill()
        with pytest.raises(TierUnavailable):
            await hot.get("t", "")
        assert hot.breaker.failures == 1
        # within the backoff: refused without touching the network
        for _ in range(5):
            with pytest.raises(TierUnavailable, match="skipped"):
                await hot.put(entry("t", "2"))
        assert hot.refused == 5
        clock.now += 1.0  # the probe goes out and fails: the wait doubles
        with pytest.raises(TierUnavailable, match="failed"):
            await hot.get("t", "")
        assert hot.breaker.failures == 2
        assert hot.breaker.open_until == clock.now + 2.0
        server.start()  # same port, empty: the scripts are gone too
        with pytest.raises(TierUnavailable, match="skipped"):
            await hot.get("t", "")
        clock.now += 2.0
        assert await hot.get("t", "") is None
        assert hot.breaker == Breaker()
        assert await hot.put(entry("t", "3"))
        got = await hot.get("t", "")
        assert got is not None and got.checkpoint_id == "3"


async def test_setup_against_a_dead_server_starts_degraded(
    redis_servers: Callable[[], RedisServer],
) -> None:
    server = redis_servers()
    server.kill()
    clock = Clock()
    async with opened(make(server.url, clock=clock)) as hot:  # does not raise
        assert hot.breaker.failures == 1
        server.start()
        clock.now += 10
        assert await hot.put(entry("t", "1"))


@pytest.fixture
async def blackhole() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_silent_server_costs_one_timeout_not_a_hang(blackhole: int) -> None:
    clock = Clock()
    async with asyncio.timeout(10):  # a bound against hanging, not a latency assertion
        silent = make(f"redis://127.0.0.1:{blackhole}/0", clock=clock, timeout="0.5",
                      socket_timeout="0.25", connect_timeout="0.25")
        async with opened(silent) as hot:
            assert hot.breaker.failures == 1
            clock.now += 1
            with pytest.raises(TierUnavailable):
                await hot.get("t", "")
            assert hot.breaker.failures == 2


async def test_wrong_password_is_a_configuration_error(tmp_path: Any) -> None:
    server = RedisServer(tmp_path / "auth")
    server.start()
    try:
        client = Redis(port=server.port)
        await client.config_set("requirepass", "right")
        await client.aclose()
        with pytest.raises(ConfigurationError, match="credentials"):
            await make(f"redis://:wrong@127.0.0.1:{server.port}/0").setup()
        async with opened(make(f"redis://:right@127.0.0.1:{server.port}/0")) as hot:
            assert await hot.put(entry("t", "1"))
    finally:
        server.kill()


async def test_tls_with_the_right_ca_and_not_without(tmp_path: Any) -> None:
    server = RedisServer(tmp_path / "tls", tls=True).start()
    try:
        async with opened(make(server.url)) as hot:
            assert hot.settings.ssl
            assert await hot.put(entry("t", "1"))
            got = await hot.get("t", "")
            assert got is not None and got.checkpoint_id == "1"
        untrusted = server.url.split("?", 1)[0]
        with pytest.raises(ConfigurationError, match="certificate"):
            await make(untrusted).setup()
    finally:
        server.kill()


async def test_cluster_and_plain_urls_must_match_the_server(
    redis_url: str, redis_cluster_url: str,
) -> None:
    plain_as_cluster = redis_url.replace("redis://", "redis+cluster://").rsplit("/", 1)[0]
    with pytest.raises(ConfigurationError):
        await make(plain_as_cluster).setup()
    cluster_as_plain = "redis://" + redis_cluster_url.split("://", 1)[1].split("?", 1)[0]
    with pytest.raises(ConfigurationError, match="cluster"):
        await make(cluster_as_plain).setup()


async def test_an_entry_of_an_older_release_is_never_fresh_and_any_put_replaces_it(
    hot: RedisHot, raw: Redis,
) -> None:
    """Entries written before versions existed have no version field: version 0."""
    t = f"t-{uuid.uuid4()}"
    await hot.put(entry(t, "1", writes=(w("a", -3, b"old"),), version=9))
    await raw.hdel(entry_key(hot.settings.prefix, t, ""), "m:ver")
    old = await hot.get(t, "")
    assert old is not None and old.version == 0
    assert await hot.add_writes(t, "", "1", [w("a", -3, b"new")], version=1) is False
    assert await hot.put(entry(t, "1", writes=(w("a", -3, b"new"),), version=1))
    got = await hot.get(t, "")
    assert got is not None and got.version == 1 and got.writes[0].payload.data == b"new"


async def test_once_set_up_a_store_is_named_by_its_server_not_by_its_spelling(
        redis_url: str, redis_servers: Callable[[], RedisServer]) -> None:
    """Savers of one process share floors by this name (``hotcache.peers_of``): any
    spelling of one server is one place, two servers are two."""
    port = int(redis_url.rsplit(":", 1)[1].split("/", 1)[0])
    other = redis_servers()
    prefix = unique_prefix()
    stores = [make(f"redis://127.0.0.1:{port}/0", prefix=prefix),
              make(f"redis://localhost:{port}/0", prefix=prefix),
              make(f"redis://localhost:{port}/1", prefix=prefix),
              make(f"redis://127.0.0.1:{port}/0", prefix=unique_prefix()),
              make(f"redis://127.0.0.1:{other.port}/0", prefix=prefix)]
    assert stores[0].identity != stores[1].identity  # before the server answers: as spelled
    async with contextlib.AsyncExitStack() as stack:
        for store in stores:
            await stack.enter_async_context(opened(store))
        same, other_db, other_prefix, other_server = (s.identity for s in stores[1:])
        assert same == stores[0].identity
        assert len({stores[0].identity, other_db, other_prefix, other_server}) == 4
        assert stores[1].aliases == (stores[1].spelled,)


async def test_a_cluster_is_named_by_its_nodes_whichever_seeds_found_it(
        redis_cluster_url: str) -> None:
    first = redis_cluster_url.split("?", 1)[0]
    another = parse_qs(urlsplit(redis_cluster_url).query)["seeds"][0].split(",")[0]
    prefix = unique_prefix()
    a = make(first, prefix=prefix)
    b = make(f"redis+cluster://{another}", prefix=prefix)
    async with opened(a), opened(b):
        assert a.identity == b.identity
        assert a.identity != a.spelled
