"""The MongoDB tier's schema is its indexes: ``migrations/mongo/NNNN_name.json`` files,
applied once each at setup and recorded in ``tierstore_migrations``.

Creating an index that already exists with the same definition is a no-op, so two
processes that set up the same database at once both succeed; one with another
definition under the same name is a ``ConfigurationError`` (see ``connection.translate``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Final

from pymongo.errors import DuplicateKeyError

from tierstore.errors import ConfigurationError
from tierstore.migrate import Migration, apply_pending
from tierstore.tiers.mongo.documents import COLLECTIONS, Doc

_INDEX_OPTIONS: Final = frozenset({"unique", "sparse", "partialFilterExpression"})


def index_specs(migration: Migration) -> list[tuple[str, list[tuple[str, int]], str, Doc]]:
    """``(collection, keys, name, options)`` of every index a migration file declares."""
    try:
        spec = json.loads(migration.text)
        out = []
        for index in spec["indexes"]:
            logical = index["collection"]
            if logical not in COLLECTIONS:
                raise ConfigurationError(f"unknown collection {logical!r}")
            keys = [(str(field), int(direction)) for field, direction in index["keys"]]
            options = {k: v for k, v in index.items() if k in _INDEX_OPTIONS}
            out.append((COLLECTIONS[logical], keys, str(index["name"]), options))
        return out
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            f"migrations/mongo/{migration.version:04d}_{migration.name}.json is malformed: {exc}"
        ) from exc


async def apply_migrations(database: Any, clock: Callable[[], float]) -> None:
    """Create the indexes of every migration ``database`` has not recorded yet.

    No lock and no transaction: creating the same index twice is harmless, and a
    version recorded by another process meanwhile is a duplicate key, not an error.
    """
    table = database[COLLECTIONS["migrations"]]

    async def apply(migration: Migration) -> None:
        for collection, keys, name, options in index_specs(migration):
            await database[collection].create_index(keys, name=name, **options)
        with suppress(DuplicateKeyError):
            await table.insert_one({"_id": migration.version, "name": migration.name,
                                    "applied_at": clock()})

    applied = {doc["_id"] async for doc in table.find({}, {"_id": 1})}
    await apply_pending("mongo", applied=applied, apply=apply)
