"""Backends by URL scheme. Routing is a table: a new backend is one row and one module.

Modules are imported only when their scheme is used, so an embedded install needs
no driver at all; a missing driver is a ``ConfigurationError`` naming the extra.
"""

from __future__ import annotations

import importlib
from typing import Any

from tierstore.errors import ConfigurationError
from tierstore.settings import StoreUrl
from tierstore.tiers.base import HotStore, ObjectStore, WarmStore

__all__ = ["HOT", "OBJECT", "WARM", "HotStore", "ObjectStore", "WarmStore", "open_store"]

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
_TABLES = {"hot": HOT, "warm": WARM, "cold": OBJECT, "blobs": OBJECT}


def _load(target: str, extra: str | None, url: StoreUrl) -> Any:
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if extra is None or exc.name is None or exc.name.startswith("tierstore"):
            raise
        raise ConfigurationError(
            f"{url.scheme}:// needs the {exc.name!r} driver: pip install 'tierstore[{extra}]'"
        ) from exc
    return getattr(module, class_name)


def open_store(kind: str, url: str | StoreUrl, **options: Any) -> Any:
    """Build (not yet set up) the store of ``kind`` (hot/warm/cold/blobs) for ``url``."""
    parsed = url if isinstance(url, StoreUrl) else StoreUrl.parse(url)
    table = _TABLES[kind]
    if parsed.scheme not in table:
        known = ", ".join(f"{s}://" for s in table)
        raise ConfigurationError(
            f"unknown {kind} tier scheme {parsed.scheme!r} in {parsed.masked!r}; known: {known}"
        )
    target, extra = table[parsed.scheme]
    return _load(target, extra, parsed).from_url(parsed, **options)
