"""Backends by URL scheme, and by the class of a client the caller already holds.
Routing is a table: a new backend is one row and one module.

Modules are imported only when their scheme is used, so an embedded install needs
no driver at all; a missing driver is a ``ConfigurationError`` naming the extra.

A client is routed by the names of its classes (most derived first), so recognising
one imports no driver either::

    tier_store(kind, value, options)
      ├─ str ──────────────► open_store(kind, url)             the store opens and closes
      │                                                         its own connection
      ├─ a known client ───► CLIENTS[class](client, …)         the store uses the client,
      │  (CLIENTS)                                              never closes it
      ├─ a store ──────────► as it is                           (``from_stores``)
      └─ anything else ────► ConfigurationError naming what the tier takes
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast, overload

from tierstore.errors import ConfigurationError
from tierstore.settings import StoreUrl
from tierstore.tiers.base import HotStore, ObjectStore, WarmStore

__all__ = [
    "CLIENTS", "HOT", "OBJECT", "REFUSED_CLIENTS", "WARM", "HotStore", "Kind", "ObjectStore",
    "WarmStore", "open_client_store", "open_store", "tier_store",
]

Kind = Literal["hot", "warm", "cold", "blobs"]

# scheme -> ("module:Class", extra that provides its driver)
HOT: dict[str, tuple[str, str | None]] = {
    "memory": ("tierstore.tiers.memory:MemoryHot", None),
    "redis": ("tierstore.tiers.redis:RedisHot", "redis"),
    "rediss": ("tierstore.tiers.redis:RedisHot", "redis"),
    "redis+cluster": ("tierstore.tiers.redis:RedisHot", "redis"),
    "rediss+cluster": ("tierstore.tiers.redis:RedisHot", "redis"),
    "valkey": ("tierstore.tiers.redis:RedisHot", "redis"),
}
WARM: dict[str, tuple[str, str | None]] = {
    "sqlite": ("tierstore.tiers.sqlite:SqliteWarm", None),
    "postgresql": ("tierstore.tiers.postgres:PostgresWarm", "postgres"),
    "postgres": ("tierstore.tiers.postgres:PostgresWarm", "postgres"),
    "mongodb": ("tierstore.tiers.mongo:MongoWarm", "mongo"),
    "mongodb+srv": ("tierstore.tiers.mongo:MongoWarm", "mongo"),
}
OBJECT: dict[str, tuple[str, str | None]] = {
    "file": ("tierstore.tiers.file:FileStore", None),
    "s3": ("tierstore.tiers.s3:S3Store", "s3"),
}
_TABLES: dict[Kind, dict[str, tuple[str, str | None]]] = {
    "hot": HOT, "warm": WARM, "cold": OBJECT, "blobs": OBJECT,
}
# client class (module.qualname) -> (tier kinds it serves, "module:Class.factory", extra)
CLIENTS: dict[str, tuple[frozenset[Kind], str, str]] = {
    "redis.asyncio.client.Redis": (frozenset({"hot"}), "tierstore.tiers.clients:redis_hot",
                                   "redis"),
    "redis.asyncio.cluster.RedisCluster": (frozenset({"hot"}),
                                           "tierstore.tiers.clients:redis_hot", "redis"),
    "asyncpg.pool.Pool": (frozenset({"warm"}), "tierstore.tiers.postgres:PostgresWarm.from_pool",
                          "postgres"),
    **{name: (frozenset({"warm"}), "tierstore.tiers.mongo:MongoWarm.from_client", "mongo")
       for name in ("pymongo.asynchronous.mongo_client.AsyncMongoClient",
                    "pymongo.asynchronous.database.AsyncDatabase",
                    "motor.core.AgnosticClient", "motor.core.AgnosticDatabase",
                    "mongomock_motor.AsyncMongoMockClient",
                    "mongomock_motor.AsyncMongoMockDatabase")},
    **{name: (frozenset({"cold", "blobs"}), "tierstore.tiers.clients:s3_store", "s3")
       for name in ("aioboto3.session.Session", "aiobotocore.client.AioBaseClient")},
}
# clients that look right but cannot serve: class -> what to pass instead
REFUSED_CLIENTS: dict[str, str] = {
    "redis.client.Redis": "a synchronous redis.Redis blocks the event loop; pass a "
                          "redis.asyncio.Redis",
    "redis.cluster.RedisCluster": "a synchronous redis.RedisCluster blocks the event loop; pass "
                                  "a redis.asyncio.RedisCluster",
    "asyncpg.connection.Connection": "one connection cannot serve concurrent calls; pass an "
                                     "asyncpg.Pool (asyncpg.create_pool)",
    "asyncpg.pool.PoolConnectionProxy": "one connection cannot serve concurrent calls; pass "
                                        "its asyncpg.Pool",
    "psycopg_pool.pool_async.AsyncConnectionPool": "the PostgreSQL tier runs on asyncpg; pass "
                                                   "an asyncpg.Pool or a postgresql:// URL",
    "psycopg.connection_async.AsyncConnection": "the PostgreSQL tier runs on asyncpg; pass an "
                                                "asyncpg.Pool or a postgresql:// URL",
    "pymongo.synchronous.mongo_client.MongoClient": "a synchronous MongoClient blocks the event "
                                                    "loop; pass a pymongo.AsyncMongoClient",
    "pymongo.synchronous.database.Database": "a synchronous Database blocks the event loop; "
                                             "pass one of a pymongo.AsyncMongoClient",
    "boto3.session.Session": "a boto3 session makes blocking clients; pass an aioboto3.Session",
    "botocore.client.BaseClient": "a botocore client blocks the event loop; pass an "
                                  "aioboto3.Session or an S3 client opened from one",
}
_TAKES: dict[Kind, str] = {
    "hot": "a memory:// or redis:// URL, a redis.asyncio.Redis or RedisCluster, or a HotStore",
    "warm": "a sqlite://, postgresql:// or mongodb:// URL, an asyncpg.Pool, a "
            "pymongo.AsyncMongoClient or AsyncDatabase (or Motor's), or a WarmStore",
    "cold": "a file:// or s3:// URL, an aioboto3.Session or S3 client, or an ObjectStore",
    "blobs": "a file:// or s3:// URL, an aioboto3.Session or S3 client, or an ObjectStore",
}
_PROTOCOLS: dict[Kind, type[HotStore] | type[WarmStore] | type[ObjectStore]] = {
    "hot": HotStore, "warm": WarmStore, "cold": ObjectStore, "blobs": ObjectStore,
}


def _load(target: str, extra: str | None, what: str | StoreUrl) -> Callable[..., object]:
    """The factory ``target`` names (``module:name`` or ``module:Class.method``), importing
    its module now; ``what`` names the scheme or client that needs it in the error."""
    module_name, _, path = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if extra is None or exc.name is None or exc.name.startswith("tierstore"):
            raise
        needs = f"{what.scheme}://" if isinstance(what, StoreUrl) else what
        raise ConfigurationError(
            f"{needs} needs the {exc.name!r} driver: pip install 'tierstore[{extra}]'"
        ) from exc
    factory: Any = module
    for name in path.split("."):
        factory = getattr(factory, name)
    return cast("Callable[..., object]", factory)


@overload
def open_store(kind: Literal["hot"], url: str | StoreUrl, *, ttl: float) -> HotStore: ...


@overload
def open_store(kind: Literal["warm"], url: str | StoreUrl, **options: str | float) -> WarmStore: ...


@overload
def open_store(kind: Literal["cold", "blobs"], url: str | StoreUrl) -> ObjectStore: ...


def open_store(
    kind: Kind, url: str | StoreUrl, **options: str | float
) -> HotStore | WarmStore | ObjectStore:
    """Build (not yet set up) the store of ``kind`` (hot/warm/cold/blobs) for ``url``.

    The class comes from a table, so mypy cannot follow it: the store built is checked
    against the tier's Protocol here, and a backend that misses a method fails at
    open, naming it, instead of at its first call in production.
    """
    parsed = url if isinstance(url, StoreUrl) else StoreUrl.parse(url)
    table = _TABLES[kind]
    if parsed.scheme not in table:
        known = ", ".join(f"{s}://" for s in table)
        raise ConfigurationError(
            f"unknown {kind} tier scheme {parsed.scheme!r} in {parsed.masked!r}; known: {known}"
        )
    target, extra = table[parsed.scheme]
    store = _load(f"{target}.from_url", extra, parsed)(parsed, **options)
    return _checked(kind, store, target)


def _class_names(obj: object) -> list[str]:
    return [f"{k.__module__}.{k.__qualname__}" for k in type(obj).__mro__]


def open_client_store(kind: Kind, client: object, **options: object
                      ) -> HotStore | WarmStore | ObjectStore:
    """Build (not yet set up) the store of ``kind`` on a client the caller holds.

    The store uses the client and never closes it; ``options`` are the backend's
    (``prefix``, ``schema``, ``bucket``, …; each factory of ``CLIENTS`` lists its own). A client
    of another tier, a blocking client and an unknown object raise ``ConfigurationError``
    saying what the tier takes.
    """
    for name in _class_names(client):
        if name in REFUSED_CLIENTS:
            raise ConfigurationError(f"{kind} tier: {REFUSED_CLIENTS[name]}")
        if name not in CLIENTS:
            continue
        kinds, target, extra = CLIENTS[name]
        if kind not in kinds:
            serves = "/".join(sorted(kinds))
            raise ConfigurationError(
                f"{kind} tier: a {type(client).__qualname__} serves the {serves} tier; the "
                f"{kind} tier takes {_TAKES[kind]}"
            )
        store = _load(target, extra, f"a {type(client).__qualname__}")(client, **options)
        return _checked(kind, store, target)
    raise ConfigurationError(
        f"{kind} tier: cannot use a {type(client).__module__}.{type(client).__qualname__}; "
        f"it takes {_TAKES[kind]}"
    )


def tier_store(kind: Kind, value: object, options: Mapping[str, object] | None = None, *,
               ttl: float | None = None) -> HotStore | WarmStore | ObjectStore:
    """The store of one tier from a URL, a client the caller holds, or a store.

    ``options`` apply to a client only (a URL carries its own in its query, a store was
    configured when it was built); ``ttl`` is the hot tier's default (the saver's
    ``hot_ttl``), which a client's ``ttl`` option overrides.
    """
    options = dict(options or {})
    if isinstance(value, str | StoreUrl):
        if options:
            raise ConfigurationError(
                f"{kind} tier: options {', '.join(sorted(options))} go in the URL's query "
                "when the tier is a URL"
            )
        if kind == "hot":
            return open_store("hot", value, ttl=3600.0 if ttl is None else ttl)
        if kind == "warm":
            return open_store("warm", value)
        return open_store(kind, value)
    if any(n in CLIENTS or n in REFUSED_CLIENTS for n in _class_names(value)):
        if kind == "hot" and ttl is not None:
            options.setdefault("ttl", ttl)
        return open_client_store(kind, value, **options)
    if isinstance(value, _PROTOCOLS[kind]):
        if options:
            raise ConfigurationError(
                f"{kind} tier: a store is configured when it is built; options "
                f"{', '.join(sorted(options))} cannot apply to it"
            )
        return value
    return open_client_store(kind, value, **options)


def _checked(kind: Kind, store: object, target: str) -> HotStore | WarmStore | ObjectStore:
    protocol = _PROTOCOLS[kind]
    if not isinstance(store, protocol):
        missing = sorted(name for name in _members(protocol) if not hasattr(store, name))
        raise TypeError(
            f"{target} does not implement {protocol.__name__}: missing {', '.join(missing)}"
        )
    return store


def _members(protocol: type) -> set[str]:
    """Public names a Protocol (and the Protocols it extends) declares."""
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass is object or not getattr(klass, "_is_protocol", False):
            continue
        names.update(n for n in vars(klass) if not n.startswith("_"))
        names.update(n for n in getattr(klass, "__annotations__", {}) if not n.startswith("_"))
    return names
