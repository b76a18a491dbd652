"""``redis://`` — the Redis / Valkey hot tier, on one server or a Redis Cluster.

URLs::

    redis://[user:password@]host:6379/0?prefix=ts:&ttl=3600
    rediss://…                            TLS (?ssl_ca_certs=…&ssl_cert_reqs=required)
    valkey://host:6379/0                  the same protocol, the same commands
    redis+cluster://host:7000?seeds=host2:7001,host3:7002
    rediss+cluster://…                    cluster over TLS

Only plain commands and Lua are used (no modules), so Redis 6+ and Valkey serve it.

Key layout (``T`` = BLAKE2b-128 hex of the thread id, ``N`` = the same of the namespace)::

    <prefix>{T}:e:N   HASH  the cached latest checkpoint of one (thread, ns)
                      ├─ m:id      checkpoint id, compared inside Lua
                      ├─ m:frame   the checkpoint without writes (``pack_stored``); it
                      │            carries the full thread id and ns, checked on read
                      ├─ m:loc     msgpack [location, archive_key]
                      ├─ m:seq     last write sequence number
                      ├─ m:ver     the warm head version the entry was made from
                      │            (absent in entries of older releases: version 0,
                      │            never fresh, replaced by any put)
                      └─ w<idx>:<task_id>  8 hex digits of sequence + one packed write
    <prefix>{T}:ns    SET   N of every namespace cached for the thread
    <prefix>{T}:lease STRING owner of the thread's lease, with the lease's TTL

``{T}`` is a hash tag: all keys of a thread hash to one cluster slot, so every
script below runs on one node. It is a digest because thread ids are data and may
hold braces, colons or 10 KB of text; a digest can collide, so a read that finds
another thread's (or namespace's) frame under the key reports a miss. Both keys of
an entry get the TTL again on every write; a thread idle for the TTL disappears.

Flows, one round trip each::

    get         HGETALL entry ─► frame's thread id, ns, id match? ─► record, writes by seq
    put         EVALSHA put         cached version >= ours?                  ─► 0
                                    DEL + HSET entry, SADD ns, PEXPIRE both  ─► 1
    add_writes  EVALSHA add_writes  cached id is not ours, or cached version
                                    is not ours - 1 (a change is missing)    ─► 0
                                    each write: field absent   ─► HSET, next seq
                                                idx < 0        ─► new value, same seq
                                                else           ─► keep the first
                                    m:ver = ours, PEXPIRE both               ─► 1
    invalidate  EVALSHA drop_ns     DEL entry, SREM N
                EVALSHA drop_thread DEL <prefix>{T}:e:<each member>, DEL ns set
    lease       SET lease owner NX PX ttl; renew / release: EVALSHA, only if GET = owner

Entries are ordered by the warm head version they carry (integers, compared in Lua),
never by checkpoint id or write count. Scripts are sent once with SCRIPT LOAD at setup;
a server that lost them (restart, failover) answers NOSCRIPT and redis-py reloads.

Degraded mode. The hot tier is an accelerator, so a dead or slow Redis must cost a
miss, never a turn::

    call ─► breaker open? ── yes ─► TierUnavailable at once, no network
              │ no (closed; or half-open, and this call is the single probe)
              ▼
            command, bounded by ?timeout= (connect and socket timeouts below it)
              ├─ ok ─────────────────────► breaker closed
              └─ refused / timed out ────► TierUnavailable; breaker open for
                                           backoff_delay(failures): base·2^(n-1), capped

The router turns every ``TierUnavailable`` into a logged, counted miss and serves
from warm; the breaker closes again on the first probe that succeeds.

Staleness bound. A hot write can fail after warm committed (Redis cut off for this
process only, or a timeout after the server applied nothing), and another process
may have written since. With ``hot_check="verify"`` (the default) the router checks
every hit against the warm head (same checkpoint id and same head version), so
such an entry is never served. With ``hot_check="trusted"`` it is served until it is
replaced by a copy of a newer head version or expires: an entry is at most the TTL
(``?ttl=``, else the saver's ``hot_ttl``) older than its last successful write, and
that is the staleness a trusted reader accepts.

URL options (defaults): ``prefix`` (``ts:``), ``ttl`` (saver's ``hot_ttl``, seconds),
``timeout`` (0.5: a whole call; setup gets ten times it), ``socket_timeout`` (0.25),
``connect_timeout`` (0.25),
``backoff`` (0.1) and ``backoff_max`` (5.0) seconds, ``max_connections``,
``client_name``, ``seeds`` (more cluster nodes), ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs`` (``required``/``optional``/``none``),
``ssl_check_hostname``.

A client of your own: ``tierstore.tiers.clients.redis_hot`` (the store uses it, never
closes it).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import ssl
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from string import Template
from typing import Any, TypeVar, cast

import msgpack
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    MaxConnectionsError,
    NoPermissionError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:
    from redis.driver_info import DriverInfo
except ImportError:  # redis < 7 names itself with lib_version
    DriverInfo = None  # type: ignore[assignment,misc]

from tierstore.codec.frames import pack_stored, pack_write, unpack_stored, unpack_write
from tierstore.errors import (
    ConfigurationError,
    CorruptPayload,
    LifecycleError,
    TierstoreError,
    TierUnavailable,
)
from tierstore.lifecycle import Lifecycle
from tierstore.policy import merge_writes
from tierstore.records import StoredCheckpoint, TierUsage, WriteRecord
from tierstore.settings import StoreUrl
from tierstore.tiers.base import HotStore, LeaseStore
from tierstore.tiers.breaker import (
    Breaker,
    backoff_delay,
    breaker_admit,
    breaker_failure,
    breaker_success,
)

__all__ = [
    "Breaker",
    "RedisHot",
    "RedisHotSettings",
    "backoff_delay",
    "breaker_admit",
    "breaker_failure",
    "breaker_success",
    "entry_key",
    "lease_key",
    "namespaces_key",
    "tombstone_key",
]

log = logging.getLogger("tierstore.redis")
T = TypeVar("T")

# -- every key and field name, in one place -------------------------------------------

DEFAULT_PREFIX = "ts:"
ENTRY = ":e:"  # <prefix>{T}:e:N
NAMESPACES = ":ns"  # <prefix>{T}:ns
LEASE = ":lease"  # <prefix>{T}:lease
TOMBSTONE = ":tomb"  # <prefix>{T}:tomb  the version floor a delete left, for hot_ttl
F_ID = "m:id"
F_FRAME = "m:frame"
F_LOC = "m:loc"
F_SEQ = "m:seq"
F_VER = "m:ver"
WRITE_FIELD = "w"  # w<idx>:<task_id>
SEQ_WIDTH = 8  # hex digits of the sequence number in front of each write

SETUP_BUDGET = 10  # setup may take this many times ``timeout``
_DIGEST_BYTES = 16
SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "valkey")


def _digest(text: str) -> str:
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=_DIGEST_BYTES).hexdigest()


def _thread_base(prefix: str, thread_id: str) -> str:
    return f"{prefix}{{{_digest(thread_id)}}}"


def entry_key(prefix: str, thread_id: str, checkpoint_ns: str) -> str:
    """The HASH holding the cached latest checkpoint of (thread, ns)."""
    return f"{_thread_base(prefix, thread_id)}{ENTRY}{_digest(checkpoint_ns)}"


def namespaces_key(prefix: str, thread_id: str) -> str:
    """The SET of namespace digests cached for a thread (what ``invalidate`` drops)."""
    return f"{_thread_base(prefix, thread_id)}{NAMESPACES}"


def tombstone_key(prefix: str, thread_id: str) -> str:
    """The STRING holding the version floor a delete left: no entry at or below it is
    stored again, so a late write-behind flush cannot bring deleted state back."""
    return f"{_thread_base(prefix, thread_id)}{TOMBSTONE}"


def lease_key(prefix: str, thread_id: str) -> str:
    """The STRING naming the holder of a thread's lease."""
    return f"{_thread_base(prefix, thread_id)}{LEASE}"


def _write_field(write: WriteRecord) -> bytes:
    return f"{WRITE_FIELD}{write.idx}:".encode() + write.task_id.encode("utf-8", "surrogatepass")


def _pack_write_value(write: WriteRecord) -> bytes:
    packed: bytes = msgpack.packb(pack_write(write), use_bin_type=True)
    return packed


# -- Lua: one script per mutation ---------------------------------------------------------

# KEYS: entry, ns set, tombstone. ARGV: id, frame, loc, ttl ms, N, version, then
# field/value pairs. Only a strictly newer warm head version replaces an entry: an
# older write-behind flush never overwrites a newer entry, whatever its checkpoint id
# and write count; and nothing at or below a delete's tombstone is stored at all.
_PUT = """
local version = tonumber(ARGV[6])
if version <= 0 then return 0 end
if version <= tonumber(redis.call('GET', KEYS[3]) or '0') then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then
  if tonumber(redis.call('HGET', KEYS[1], '$VER') or '0') >= version then return 0 end
  redis.call('DEL', KEYS[1])
end
local count = (#ARGV - 6) / 2
redis.call('HSET', KEYS[1], '$ID', ARGV[1], '$FRAME', ARGV[2], '$LOC', ARGV[3], '$SEQ', count,
           '$VER', ARGV[6])
for i = 7, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%0${WIDTH}x', (i - 5) / 2) .. ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: entry, ns set. ARGV: id, ttl ms, version, then field/value pairs. Byte 45 is
# '-': idx < 0. The writes are merged only into the entry of the version right before
# theirs: anything else would be missing a change and must stay behind warm.
_ADD_WRITES = """
if redis.call('HGET', KEYS[1], '$ID') ~= ARGV[1] then return 0 end
local cached = tonumber(redis.call('HGET', KEYS[1], '$VER') or '0')
if cached <= 0 or cached + 1 ~= tonumber(ARGV[3]) then return 0 end
for i = 4, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if not old then
    local seq = redis.call('HINCRBY', KEYS[1], '$SEQ', 1)
    redis.call('HSET', KEYS[1], ARGV[i], string.format('%0${WIDTH}x', seq) .. ARGV[i + 1])
  elseif string.byte(ARGV[i], 2) == 45 then
    redis.call('HSET', KEYS[1], ARGV[i], string.sub(old, 1, $WIDTH) .. ARGV[i + 1])
  end
end
redis.call('HSET', KEYS[1], '$VER', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: entry, ns set. ARGV: N.
_DROP_NS = """
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: ns set, tombstone. ARGV: the entry key up to N, floor, ttl ms. The entries
# share the set's hash tag, so they live in the slot of the declared keys. A floor
# above 0 leaves a tombstone at the highest of it, the old tombstone and the versions
# of the entries dropped.
_DROP_THREAD = """
local floor = tonumber(ARGV[2])
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if floor > 0 then
    local v = tonumber(redis.call('HGET', ARGV[1] .. n, '$VER') or '0')
    if v > floor then floor = v end
  end
  redis.call('DEL', ARGV[1] .. n)
end
redis.call('DEL', KEYS[1])
if floor > 0 then
  local old = tonumber(redis.call('GET', KEYS[2]) or '0')
  if old > floor then floor = old end
  redis.call('SET', KEYS[2], string.format('%.0f', floor), 'PX', ARGV[3])
end
return 1
"""


# KEYS: lease. ARGV: owner, ttl ms.
_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lease. ARGV: owner.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


def _lua(source: str) -> str:
    return Template(source).substitute(
        ID=F_ID, FRAME=F_FRAME, LOC=F_LOC, SEQ=F_SEQ, VER=F_VER, WIDTH=SEQ_WIDTH
    )


SCRIPTS: Mapping[str, str] = {
    "put": _lua(_PUT),
    "add_writes": _lua(_ADD_WRITES),
    "drop_ns": _lua(_DROP_NS),
    "drop_thread": _lua(_DROP_THREAD),
    "renew_lease": _RENEW_LEASE,
    "release_lease": _RELEASE_LEASE,
}


# -- settings -------------------------------------------------------------------------------

_CERT_REQS = ("required", "optional", "none")
_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_OPTIONS = (
    "prefix", "ttl", "timeout", "socket_timeout", "connect_timeout", "backoff", "backoff_max",
    "max_connections", "client_name", "seeds", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
    "ssl_cert_reqs", "ssl_check_hostname",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisHotSettings:
    """Everything a ``RedisHot`` needs, parsed once from its URL. ``repr`` hides the password."""

    masked_url: str
    host: str = "localhost"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cluster: bool = False
    seeds: tuple[tuple[str, int], ...] = ()
    ssl: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = True
    prefix: str = DEFAULT_PREFIX
    ttl: float = 3600.0
    timeout: float = 0.5
    socket_timeout: float = 0.25
    connect_timeout: float = 0.25
    backoff: float = 0.1
    backoff_max: float = 5.0
    max_connections: int | None = None
    client_name: str | None = None

    def __post_init__(self) -> None:
        where = self.masked_url
        if "{" in self.prefix or "}" in self.prefix:
            raise ConfigurationError(
                f"{where!r}: prefix {self.prefix!r} must not contain braces; they would "
                "replace the per-thread hash tag"
            )
        for name in ("ttl", "timeout", "socket_timeout", "connect_timeout", "backoff",
                     "backoff_max"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigurationError(f"{where!r}: {name} must be positive, got {value!r}")
        if self.backoff_max < self.backoff:
            raise ConfigurationError(f"{where!r}: backoff_max must be >= backoff")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigurationError(f"{where!r}: max_connections must be >= 1")
        if self.ssl_cert_reqs not in _CERT_REQS:
            raise ConfigurationError(
                f"{where!r}: ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}"
            )
        if self.cluster and self.db != 0:
            raise ConfigurationError(f"{where!r}: Redis Cluster has only database 0")
        if self.seeds and not self.cluster:
            raise ConfigurationError(f"{where!r}: seeds= needs a redis+cluster:// URL")

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))

    @classmethod
    def from_url(cls, url: StoreUrl, *, ttl: float) -> RedisHotSettings:
        where = url.masked
        if url.scheme not in SCHEMES:
            raise ConfigurationError(
                f"{where!r}: not a Redis URL (expected {', '.join(s + '://' for s in SCHEMES)})"
            )
        unknown = sorted(set(url.query) - set(_OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"{where!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(_OPTIONS)}"
            )
        q = url.query
        try:
            path = url.path.strip("/")
            db = int(path) if path else 0
            seeds = tuple(_host_port(s) for s in q.get("seeds", "").split(",") if s.strip())
            check_hostname = _BOOL[q.get("ssl_check_hostname", "true").lower()]
            numbers = {
                name: float(q.get(name, default))
                for name, default in (("ttl", ttl), ("timeout", 0.5), ("socket_timeout", 0.25),
                                      ("connect_timeout", 0.25), ("backoff", 0.1),
                                      ("backoff_max", 5.0))
            }
            max_connections = int(q["max_connections"]) if "max_connections" in q else None
        except (ValueError, KeyError) as exc:
            raise ConfigurationError(f"{where!r}: bad option value ({exc})") from exc
        return cls(
            masked_url=where,
            host=url.host or "localhost",
            port=url.port or 6379,
            db=db,
            username=url.username,
            password=url.password,
            cluster=url.scheme.endswith("+cluster"),
            seeds=seeds,
            ssl=url.scheme.startswith("rediss"),
            ssl_ca_certs=q.get("ssl_ca_certs"),
            ssl_certfile=q.get("ssl_certfile"),
            ssl_keyfile=q.get("ssl_keyfile"),
            ssl_cert_reqs=q.get("ssl_cert_reqs", "required"),
            ssl_check_hostname=check_hostname,
            prefix=q.get("prefix", DEFAULT_PREFIX),
            max_connections=max_connections,
            client_name=q.get("client_name") or None,
            **numbers,
        )


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"seed {text!r} is not host:port")
    return host.strip("[]"), int(port)


# -- driver errors: translated here, and only here --------------------------------------------

_DRIVER_ERRORS = (RedisError, RedisClusterException, OSError)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # redis-py wraps socket errors once or twice
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _translate(exc: BaseException, where: str, op: str) -> tuple[TierstoreError, bool]:
    """The tierstore error for a driver error, and whether the breaker should open.

    It opens when every call would fail the same way: the server is unreachable
    (refused, reset, timed out, loading, cluster down, busy) or refuses us outright
    (credentials, TLS certificate). A full client pool or the refusal of one command
    (foreign data under the prefix) says nothing about the next call, so it does not.
    """
    message = f"redis hot tier {where}: {op} failed ({type(exc).__name__}: {exc})"
    if isinstance(exc, AuthenticationError | AuthorizationError | NoPermissionError):
        return ConfigurationError(f"{where!r}: Redis refused the credentials or ACL ({exc})"), True
    if _caused_by(exc, ssl.SSLCertVerificationError):
        return ConfigurationError(
            f"{where!r}: the server's TLS certificate was refused ({exc}); set ssl_ca_certs="
        ), True
    if isinstance(exc, AskError):  # MOVED too: a cluster node behind a plain URL
        return ConfigurationError(
            f"{where!r}: the server is a Redis Cluster node; use a redis+cluster:// URL"
        ), False
    if isinstance(exc, RedisClusterException) and "not enabled" in str(exc):
        return ConfigurationError(
            f"{where!r}: the server is not a Redis Cluster node; use a redis:// URL"
        ), False
    if isinstance(exc, MaxConnectionsError):
        return TierUnavailable(message, tier="hot", backend="redis"), False
    unreachable = (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException,
                   ClusterDownError, TryAgainError, ReadOnlyError)
    if isinstance(exc, unreachable):
        return TierUnavailable(message, tier="hot", backend="redis"), True
    if isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"):
        return CorruptPayload(
            f"redis hot tier {where}: a key under the prefix holds foreign data ({exc})",
            where="redis",
        ), False
    busy = isinstance(exc, ResponseError) and str(exc).startswith("BUSY")
    return TierUnavailable(message, tier="hot", backend="redis"), busy


# -- the store -------------------------------------------------------------------------------

Client = Redis | RedisCluster


# How the client names itself (CLIENT SETINFO): given, or redis-py looks its version up
# in the installed package's metadata, a walk of sys.path on the event loop, per client.
_IDENTITY: dict[str, Any] = (
    {"driver_info": DriverInfo(lib_version=redis.__version__)} if DriverInfo is not None
    else {"lib_version": redis.__version__})


class RedisHot(HotStore, LeaseStore):
    """Hot tier on Redis, Valkey or Redis Cluster; the semantics of ``MemoryHot``, shared."""

    backend = "redis"

    def __init__(
        self, settings: RedisHotSettings, *, clock: Callable[[], float] = time.monotonic,
        client: Client | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._given = client  # the caller's (``clients.redis_hot``): used, never closed
        self._client: Client | None = None
        self._server: tuple[Any, ...] | None = None  # the server as it names itself (setup)
        self._scripts: dict[str, AsyncScript] = {}
        self._breaker = Breaker()
        self._life = Lifecycle(f"redis hot tier {settings.masked_url}")
        self.refused = 0
        """Calls answered by the open breaker without touching the network."""

    @classmethod
    def from_url(cls, url: StoreUrl, *, ttl: float) -> RedisHot:
        return cls(RedisHotSettings.from_url(url, ttl=ttl))

    def __repr__(self) -> str:
        s = self.settings
        return f"RedisHot({s.masked_url!r}, prefix={s.prefix!r}, ttl={s.ttl})"

    @property
    def identity(self) -> tuple[Any, ...]:
        """Where the entries live: stores with the same identity share them. Once the
        server has answered ``setup``, it is the server as it names itself (its run id,
        or a cluster's node addresses), so any spelling of it (``localhost`` or
        ``127.0.0.1``, a socket path, other seeds, the caller's client) is the same place."""
        s = self.settings
        if self._server is not None:
            return (*self._server, s.db, s.prefix)
        return self.spelled

    @property
    def spelled(self) -> tuple[Any, ...]:
        """Where the entries live, as the settings spell it (before the server answers)."""
        s = self.settings
        return ("redis", s.cluster, s.host, s.port, s.seeds, s.db, s.prefix)

    @property
    def aliases(self) -> tuple[tuple[Any, ...], ...]:
        """Other names of ``identity``: stores that share any of them share entries."""
        return (self.spelled,) if self._server is not None else ()

    @property
    def ttl(self) -> float:
        return self.settings.ttl

    @property
    def breaker(self) -> Breaker:
        return self._breaker

    # -- lifecycle ----------------------------------------------------------------------

    def _connect(self) -> Client:
        s = self.settings
        common: dict[str, Any] = {
            **_IDENTITY,
            "username": s.username,
            "password": s.password,
            "socket_timeout": s.socket_timeout,
            "socket_connect_timeout": s.connect_timeout,
            "client_name": s.client_name,
        }
        if s.ssl:
            common.update(
                ssl=True, ssl_ca_certs=s.ssl_ca_certs, ssl_certfile=s.ssl_certfile,
                ssl_keyfile=s.ssl_keyfile, ssl_cert_reqs=s.ssl_cert_reqs,
                ssl_check_hostname=s.ssl_check_hostname,
            )
        if s.max_connections is not None:
            common["max_connections"] = s.max_connections
        if s.cluster:
            nodes = [ClusterNode(h, p) for h, p in ((s.host, s.port), *s.seeds)]
            # one retry lets the client follow a failover after refreshing the slot map
            return RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 1), **common)
        # one retry on a dropped connection, none on a timeout: a slow server costs one timeout
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        return Redis(host=s.host, port=s.port, db=s.db, retry=retry, **common)

    async def setup(self) -> None:
        """Connect and load the scripts. An unreachable server is not an error here:
        the store starts degraded and recovers by itself. Misconfiguration is."""
        if not self._life.begin():
            return
        try:
            client = self._connect() if self._given is None else self._given
            self._client = client
            self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}
            # discovering a cluster and loading every script on every primary is a dozen
            # round trips, once, off the path of any turn: it gets more than one call's time
            await self._run("setup", self._load_scripts,
                            budget=self.settings.timeout * SETUP_BUDGET)
        except TierUnavailable as exc:
            log.warning("redis hot tier %s unavailable at startup; serving from warm until "
                        "it answers (%s)", self.settings.masked_url, exc)
        except BaseException:
            await self._release()
            self._life.failed()
            raise
        self._life.opened()

    async def _load_scripts(self, client: Client) -> None:
        if not self.settings.cluster:
            info = await client.info()
            if str(info.get("cluster_enabled", "0")) == "1":
                fix = "use a redis+cluster:// URL" if self._given is None else "pass a RedisCluster"
                raise ConfigurationError(
                    f"{self.settings.masked_url!r}: the server runs in cluster mode; {fix}"
                )
            if info.get("run_id"):
                self._server = ("redis", "run_id", str(info["run_id"]))
        for name, script in self._scripts.items():
            sha = await client.script_load(SCRIPTS[name])
            script.sha = sha.decode() if isinstance(sha, bytes) else str(sha)
        if self.settings.cluster and isinstance(client, RedisCluster):
            # the nodes as the cluster announces them, whichever seeds found it
            nodes = sorted({(n.host, int(n.port)) for n in client.get_nodes()})
            if nodes:
                self._server = ("redis", "cluster", tuple(nodes))

    async def aclose(self) -> None:
        if self._life.close():
            await self._release()

    async def _release(self) -> None:
        client, self._client = self._client, None
        self._scripts = {}
        if client is not None and client is not self._given:
            await client.aclose()

    def __del__(self) -> None:
        if getattr(self, "_client", None) is not None and getattr(self, "_given", None) is None:
            warnings.warn(
                f"{self!r} was not closed; call aclose()", ResourceWarning, stacklevel=1
            )

    # -- the one place that talks to the server ---------------------------------------------

    async def _run(
        self, op: str, action: Callable[[Client], Awaitable[T]], *, budget: float | None = None
    ) -> T:
        if self._life.state != "opening":  # setup's own calls run while it opens
            self._life.require(op)
        client = self._client
        if client is None:  # closed while setup was under way
            raise LifecycleError(f"{self._life.what} was closed during setup")
        s = self.settings
        admitted, self._breaker = breaker_admit(
            self._breaker, self._clock(), base=s.backoff, cap=s.backoff_max
        )
        if not admitted:
            self.refused += 1
            wait = max(0.0, self._breaker.open_until - self._clock())
            raise TierUnavailable(
                f"redis hot tier {s.masked_url}: {op} skipped after "
                f"{self._breaker.failures} failed call(s); next try in {wait:.2f}s",
                tier="hot", backend=self.backend,
            )
        try:
            async with asyncio.timeout(budget or s.timeout):
                result = await action(client)
        except _DRIVER_ERRORS as exc:
            error, unreachable = _translate(exc, s.masked_url, op)
            if unreachable:
                before = self._breaker
                self._breaker = breaker_failure(
                    before, self._clock(), base=s.backoff, cap=s.backoff_max
                )
                if self._breaker is not before:
                    log.warning("redis hot tier %s unreachable (%d in a row); backing off "
                                "%.2fs", s.masked_url, self._breaker.failures,
                                backoff_delay(self._breaker.failures, base=s.backoff,
                                              cap=s.backoff_max))
            raise error from exc
        if self._breaker.failures:
            log.info("redis hot tier %s answers again", s.masked_url)
        self._breaker = breaker_success(self._breaker)
        return result

    def _script(self, name: str) -> AsyncScript:
        try:
            return self._scripts[name]
        except KeyError:
            raise LifecycleError("redis hot tier is not set up; call setup() first") from None

    # -- HotStore ----------------------------------------------------------------------------

    async def get(self, thread_id: str, checkpoint_ns: str) -> StoredCheckpoint | None:
        key = entry_key(self.settings.prefix, thread_id, checkpoint_ns)

        async def read(client: Client) -> Mapping[bytes, bytes]:
            # decode_responses is off, so field names and values are bytes
            return cast("Mapping[bytes, bytes]", await client.hgetall(key))

        raw = await self._run("get", read)
        if not raw:
            return None
        return _decode_entry(raw, thread_id, checkpoint_ns, where=f"redis {key}")

    async def put(self, record: StoredCheckpoint) -> bool:
        prefix = self.settings.prefix
        keys = [entry_key(prefix, record.thread_id, record.checkpoint_ns),
                namespaces_key(prefix, record.thread_id),
                tombstone_key(prefix, record.thread_id)]
        args: list[bytes | str | int] = [
            record.checkpoint_id,
            pack_stored(record, with_writes=False),
            msgpack.packb([record.location, record.archive_key], use_bin_type=True),
            self.settings.ttl_ms,
            _digest(record.checkpoint_ns),
            record.version,
        ]
        for write in merge_writes((), record.writes):
            args += [_write_field(write), _pack_write_value(write)]
        script = self._script("put")

        async def call(client: Client) -> Any:
            return await script(keys=keys, args=args, client=client)

        return bool(await self._run("put", call))

    async def add_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[WriteRecord],
        *,
        version: int,
    ) -> bool:
        prefix = self.settings.prefix
        keys = [entry_key(prefix, thread_id, checkpoint_ns), namespaces_key(prefix, thread_id)]
        args: list[bytes | str | int] = [checkpoint_id, self.settings.ttl_ms, version]
        for write in writes:
            args += [_write_field(write), _pack_write_value(write)]
        script = self._script("add_writes")

        async def call(client: Client) -> Any:
            return await script(keys=keys, args=args, client=client)

        return bool(await self._run("add_writes", call))

    async def invalidate(
        self, thread_id: str, checkpoint_ns: str | None = None, *, floor: int = 0
    ) -> None:
        prefix = self.settings.prefix
        if checkpoint_ns is not None:
            script = self._script("drop_ns")
            keys = [entry_key(prefix, thread_id, checkpoint_ns), namespaces_key(prefix, thread_id)]
            args: list[str | int] = [_digest(checkpoint_ns)]
        else:
            script = self._script("drop_thread")
            keys = [namespaces_key(prefix, thread_id), tombstone_key(prefix, thread_id)]
            args = [f"{_thread_base(prefix, thread_id)}{ENTRY}", max(floor, 0),
                    self.settings.ttl_ms]

        async def call(client: Client) -> Any:
            return await script(keys=keys, args=args, client=client)

        await self._run("invalidate", call)

    # -- LeaseStore --------------------------------------------------------------------------

    async def acquire_lease(self, thread_id: str, owner: str, ttl: float) -> bool:
        key = lease_key(self.settings.prefix, thread_id)
        ttl_ms = max(1, int(ttl * 1000))

        async def call(client: Client) -> Any:
            return await client.set(key, owner, nx=True, px=ttl_ms)

        return bool(await self._run("acquire_lease", call))

    async def _lease_script(self, name: str, thread_id: str, args: list[str | int]) -> bool:
        script = self._script(name)
        keys = [lease_key(self.settings.prefix, thread_id)]

        async def call(client: Client) -> Any:
            return await script(keys=keys, args=args, client=client)

        return bool(await self._run(name, call))

    async def renew_lease(self, thread_id: str, owner: str, ttl: float) -> bool:
        return await self._lease_script("renew_lease", thread_id,
                                        [owner, max(1, int(ttl * 1000))])

    async def release_lease(self, thread_id: str, owner: str) -> bool:
        return await self._lease_script("release_lease", thread_id, [owner])

    # -- status ------------------------------------------------------------------------------

    async def usage(self) -> TierUsage:
        """The keys under the prefix and the memory Redis reports for them (MEMORY
        USAGE), for ``tierstore status --cost``: ``checkpoints`` counts cached entries,
        ``objects`` keys, ``bytes`` their memory. Each call to the server is one SCAN
        page and its MEMORY USAGE calls, on every primary of a cluster; never on a
        turn's path."""
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.settings.prefix) + "*"
        budget = self.settings.timeout * SETUP_BUDGET

        async def primaries(client: Client) -> list[Any]:
            return list(client.get_primaries()) if isinstance(client, RedisCluster) else [None]

        async def page(client: Client, node: Any, cursor: int) -> tuple[int, list[Any]]:
            target = {} if node is None else {"target_nodes": node}
            after, keys = await client.scan(cursor, match=pattern, count=500, **target)
            if isinstance(after, dict):  # a cluster answers per node
                after = next(iter(after.values()), 0)
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.memory_usage(key)
            sizes = await pipe.execute() if keys else []
            return int(after), list(zip(keys, sizes, strict=True))

        entries = objects = size = 0
        for node in await self._run("usage", primaries, budget=budget):
            cursor, first = 0, True
            while first or cursor:
                scan = functools.partial(page, node=node, cursor=cursor)
                cursor, found = await self._run("usage", scan, budget=budget)
                first = False
                for key, used in found:
                    objects += 1
                    size += int(used or 0)
                    entries += ENTRY.encode() in (key if isinstance(key, bytes) else
                                                  str(key).encode())
        return TierUsage(checkpoints=entries, objects=objects, bytes=size)


def _decode_entry(
    raw: Mapping[bytes, bytes], thread_id: str, checkpoint_ns: str, *, where: str
) -> StoredCheckpoint | None:
    """The record in an entry, or None when the entry belongs to a colliding id."""
    frame = raw.get(F_FRAME.encode())
    cached_id = raw.get(F_ID.encode())
    loc = raw.get(F_LOC.encode())
    ver = raw.get(F_VER.encode())
    if frame is None or cached_id is None or loc is None:
        raise CorruptPayload(f"{where}: entry lacks its meta fields", where=where)
    prefix = WRITE_FIELD.encode()
    try:
        values = sorted(v for k, v in raw.items() if k.startswith(prefix))
        writes = tuple(
            unpack_write(msgpack.unpackb(v[SEQ_WIDTH:], raw=False)) for v in values
        )
        location, archive_key = msgpack.unpackb(loc, raw=False)
        version = int(ver) if ver is not None else 0  # older entries: unknown, never fresh
    except Exception as exc:
        raise CorruptPayload(f"{where}: damaged write or location ({exc})", where=where) from exc
    record = unpack_stored(frame, writes=writes, where=where)
    if (record.thread_id, record.checkpoint_ns) != (thread_id, checkpoint_ns):
        return None  # a digest collision: another thread's entry is no hit for this one
    if record.checkpoint_id != cached_id.decode("utf-8", "surrogatepass"):
        raise CorruptPayload(f"{where}: frame and id field disagree", where=where)
    if location not in ("warm", "archived"):
        raise CorruptPayload(f"{where}: unknown location {location!r}", where=where)
    return replace(record, location=location, archive_key=archive_key, version=version)
