"""Backends by URL scheme. Routing is a table: a new backend is one row and one module.

Modules are imported only when their scheme is used, so an embedded install needs
no driver at all; a missing driver is a ``ConfigurationError`` naming the extra.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Literal, overload

from tierstore.errors import ConfigurationError
from tierstore.settings import StoreUrl
from tierstore.tiers.base import HotStore, ObjectStore, WarmStore

__all__ = ["HOT", "OBJECT", "WARM", "HotStore", "Kind", "ObjectStore", "WarmStore", "open_store"]

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
_PROTOCOLS: dict[Kind, type[HotStore] | type[WarmStore] | type[ObjectStore]] = {
    "hot": HotStore, "warm": WarmStore, "cold": ObjectStore, "blobs": ObjectStore,
}


def _load(target: str, extra: str | None, url: StoreUrl) -> Callable[..., object]:
    """The ``from_url`` of the backend class ``target`` names, importing its module now."""
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if extra is None or exc.name is None or exc.name.startswith("tierstore"):
            raise
        raise ConfigurationError(
            f"{url.scheme}:// needs the {exc.name!r} driver: pip install 'tierstore[{extra}]'"
        ) from exc
    factory: Callable[..., object] = getattr(module, class_name).from_url
    return factory


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
    store = _load(target, extra, parsed)(parsed, **options)
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
