"""MongoDB: every request-path operation costs the same in a store of a dozen other threads
as in one of hundreds (``store_size`` describes the thread and the operations).

The cost is the index keys and documents a server examines. The emulation cannot
explain a query (it scans every document for each), so on it each query the store
sends is costed as MongoDB's planner would run it on the indexes the store declares
(``migrations/mongo``, plus ``_id``): the index whose leading fields the filter binds
most tightly (equalities and ``$in`` extend a prefix, a range ends it), and the
documents that match that prefix are counted; a filter no index serves is a
collection scan, every document counted. A top-level ``$or`` is costed branch by
branch, as the server's OR plan runs it; an aggregation by its leading ``$match``.
Inserts count the documents inserted.
GridFS files (large payloads) are read and deleted by their ids, through the bucket,
and are not counted. On a real server (``TIERSTORE_TEST_MONGO_URL``) the profiler
counts ``keysExamined`` and ``docsExamined`` of every operation instead.

The emulation is slow on large collections (each query, and each insert's unique
check, reads them all in Python), so it holds 100 other threads where a real server
holds 3,000: a collection scan still costs several times what it did in the small
store, far past the bound. Lines of tierstore's Python are not counted here: tracing
would slow every call of the emulation; the SQLite and PostgreSQL suites count them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mongomock.filtering import filter_applies

from tests.integration.store_size import (
    FEW,
    MANY,
    OFFLOAD_THRESHOLD,
    OPERATIONS,
    OPTIONS,
    Figures,
    StoreMeter,
    assert_flat,
    build_thread,
    fill_object_dirs,
    measure_operation,
    report,
)
from tests.servers.mongo import MONGO_URL_VAR, _with_database
from tierstore import TieredSaver
from tierstore.migrate import migrations_for
from tierstore.tiers.file import FileStore
from tierstore.tiers.mongo import MongoWarm
from tierstore.tiers.mongo.documents import COLLECTIONS
from tierstore.tiers.mongo.migrations import index_specs

TEMPLATES = 4
MANY_EMULATED = 100
"""Other threads in the large store on the emulation."""

Filter = Mapping[str, Any]

_RANGE = frozenset({"$lt", "$lte", "$gt", "$gte", "$type"})


# -- costing a query on the emulation ------------------------------------------------------


def _declared_indexes() -> dict[str, list[list[str]]]:
    """Collection -> the key fields of each index the store creates (``_id`` included)."""
    out: dict[str, list[list[str]]] = {}
    for migration in migrations_for("mongo"):
        for collection, keys, _name, _options in index_specs(migration):
            out.setdefault(collection, [["_id"]]).append([field for field, _ in keys])
    return out


def _conjunctions(flt: Filter) -> list[dict[str, Any]]:
    """The filter as an OR of conjunctions (field -> condition), ``$and``/``$or`` flattened."""
    branches: list[dict[str, Any]] = [{}]
    for key, value in flt.items():
        if key == "$and":
            parts: list[list[dict[str, Any]]] = [_conjunctions(v) for v in value]
        elif key == "$or":
            parts = [[c for v in value for c in _conjunctions(v)]]
        else:
            parts = [[{key: value}]]
        for alternatives in parts:
            branches = [{**b, **a} for b in branches for a in alternatives]
    return branches


def _bound(condition: Any) -> tuple[bool, bool]:
    """Whether an index can seek on ``condition``, and whether the seek is a point
    (equality or ``$in``: the next field of a compound index may narrow it further)."""
    if not isinstance(condition, Mapping) or not any(k.startswith("$") for k in condition):
        return True, True
    ops = set(condition)
    if ops <= {"$eq", "$in"}:
        return True, True
    if ops <= _RANGE or condition == {"$exists": True}:
        return True, False
    return False, False


class Examined:
    """Keys and documents a server would examine for the queries sent while armed."""

    def __init__(self) -> None:
        self.indexes = _declared_indexes()
        self.count = 0
        self.armed = False

    def query(self, collection: str, sync: Any, flt: Filter | None) -> None:
        if not self.armed:
            return
        for branch in _conjunctions(flt or {}):
            prefixes: list[dict[str, Any]] = []
            for keys in self.indexes.get(collection, [["_id"]]):
                prefix: dict[str, Any] = {}
                for field in keys:
                    if field not in branch:
                        break
                    seekable, point = _bound(branch[field])
                    if not seekable:
                        break
                    prefix[field] = branch[field]
                    if not point:
                        break
                if prefix and prefix not in prefixes:
                    prefixes.append(prefix)
            # one pass over the documents for every candidate index; the best one runs
            counts = [0] * len(prefixes)
            scanned = 0
            for doc in sync._store.documents:
                scanned += 1
                for i, prefix in enumerate(prefixes):
                    if filter_applies(prefix, doc):  # type: ignore[no-untyped-call]
                        counts[i] += 1
            self.count += min(counts) if counts else scanned

    def inserted(self, n: int) -> None:
        if self.armed:
            self.count += n

    @contextmanager
    def counting(self) -> Iterator[Examined]:
        self.count = 0
        self.armed = True
        try:
            yield self
        finally:
            self.armed = False


_FILTERED = ("find", "find_one", "find_one_and_update", "find_one_and_delete",
             "find_one_and_replace", "update_one", "update_many", "replace_one",
             "delete_one", "delete_many", "count_documents", "distinct")


class _Costed:
    """A collection of the emulation whose queries are costed before they run."""

    def __init__(self, target: Any, name: str, examined: Examined) -> None:
        self._target = target
        self._name = name
        self._examined = examined
        self._sync = target._AsyncMongoMockCollection__collection

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._target, attr)
        if attr in _FILTERED:
            def costed(*args: Any, **kwargs: Any) -> Any:
                flt = args[0] if args else kwargs.get("filter")
                if attr == "distinct":
                    flt = args[1] if len(args) > 1 else kwargs.get("filter")
                self._examined.query(self._name, self._sync, flt)
                return value(*args, **kwargs)

            return costed
        if attr in ("insert_one", "insert_many"):
            def inserting(*args: Any, **kwargs: Any) -> Any:
                docs = args[0] if args else kwargs.get("documents", ())
                self._examined.inserted(len(docs) if attr == "insert_many" else 1)
                return value(*args, **kwargs)

            return inserting
        if attr == "aggregate":
            def aggregating(pipeline: list[Any], *args: Any, **kwargs: Any) -> Any:
                first = pipeline[0] if pipeline else {}
                self._examined.query(self._name, self._sync, first.get("$match", {}))
                return value(pipeline, *args, **kwargs)

            return aggregating
        if attr == "bulk_write":
            raise AssertionError(f"{attr} is not costed: add it to this suite")
        return value


class _CostedDatabase:
    """The database ``MongoWarm`` sees on the emulation: ``db[name]`` costed."""

    def __init__(self, database: Any, examined: Examined) -> None:
        self._database = database
        self._examined = examined
        self.name: str = database.name

    def __getitem__(self, name: str) -> Any:
        return _Costed(self._database[name], name, self._examined)

    def get_collection(self, name: str) -> Any:
        return self[name]


# -- the stores ------------------------------------------------------------------------------


async def _fill(db: Any, first: int, last: int) -> list[str]:
    """Copies ``first``..``last`` of the template threads, written as documents."""
    copies = {f"other-{i}/tpl-{i % TEMPLATES}": i for i in range(first, last + 1)}
    for logical in ("heads", "checkpoints", "blobs", "writes"):
        collection = db[COLLECTIONS[logical]]
        templates = await collection.find(
            {"thread_id": {"$in": [f"tpl-{i}" for i in range(TEMPLATES)]}}).to_list(None)
        docs = []
        for dst, i in copies.items():
            src = dst.split("/", 1)[1]
            for doc in templates:
                if doc["thread_id"] != src:
                    continue
                copy = {k: v for k, v in doc.items() if k not in ("_id", "lease_owner")}
                copy["thread_id"] = dst
                for field in ("run_id", "archive_key"):
                    if isinstance(copy.get(field), str):
                        copy[field] = f"{copy[field]}.{i}"
                docs.append(copy)
        if docs:
            await collection.insert_many(docs, ordered=False)
    return list(copies)


@pytest.fixture(scope="module")
async def figures(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Figures]:
    tmp: Path = tmp_path_factory.mktemp("store-size-mongo")
    url = os.environ.get(MONGO_URL_VAR)
    if url:
        async with _real_server(url) as (warm, db, measure):
            yield await _figures(tmp, warm, db, measure, many=MANY)
        return
    from mongomock_motor import AsyncMongoMockClient, enabled_gridfs_integration
    from motor.motor_asyncio import AsyncIOMotorGridFSBucket

    with enabled_gridfs_integration():
        raw: Any = AsyncMongoMockClient()[f"tierstore_{uuid.uuid4().hex[:12]}"]
        examined = Examined()

        def bucket(_database: Any, bucket_name: str) -> Any:
            return AsyncIOMotorGridFSBucket(raw, bucket_name=bucket_name)

        async def measure(call: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
            with examined.counting():
                result = await call()
            return result, examined.count

        warm = MongoWarm(database=_CostedDatabase(raw, examined), gridfs=bucket,
                         offload_threshold=OFFLOAD_THRESHOLD, orphan_grace=0)
        yield await _figures(tmp, warm, raw, measure, many=MANY_EMULATED)


def _real_server(url: str) -> Any:
    """The store on a database of its own on the real server, and the profiler's count."""
    from contextlib import asynccontextmanager

    from pymongo import AsyncMongoClient

    @asynccontextmanager
    async def opened() -> AsyncIterator[tuple[MongoWarm, Any, StoreMeter]]:
        name = f"tierstore_{uuid.uuid4().hex[:12]}"
        client: Any = AsyncMongoClient(url)
        db = client[name]

        async def measure(call: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
            await db.command("profile", 0)
            await db.drop_collection("system.profile")
            await db.command("profile", 2)
            try:
                result = await call()
            finally:
                await db.command("profile", 0)
            ops = await db["system.profile"].find(
                {"ns": {"$regex": f"^{name}\\.tierstore_(?!fs)"}}).to_list(None)
            return result, sum(int(op.get("keysExamined", 0)) + int(op.get("docsExamined", 0))
                               for op in ops)

        try:
            yield (MongoWarm(_with_database(url, name), offload_threshold=OFFLOAD_THRESHOLD,
                             orphan_grace=0), db, measure)
        finally:
            await client.drop_database(name)
            await client.close()

    return opened()


async def _figures(tmp: Path, warm: MongoWarm, db: Any, meter: StoreMeter, *,
                   many: int) -> Figures:
    out: Figures = {name: {} for name in OPERATIONS}
    async with TieredSaver.from_stores(warm=warm, cold=FileStore(tmp / "cold"),
                                       **OPTIONS) as saver:
        for i in range(TEMPLATES):
            await build_thread(saver, f"tpl-{i}")
        for first, last, phase in ((1, FEW, "few"), (FEW + 1, many, "many")):
            fill_object_dirs(tmp / "cold", await _fill(db, first, last))
            for name in OPERATIONS:
                t = await build_thread(saver, f"{phase}-{name}-{uuid.uuid4().hex[:6]}")
                out[name][phase] = await measure_operation(saver, name, t, meter,
                                                           python=False)
    report(out, "examined")
    return out


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_cost_follows_the_thread_not_the_store(figures: Figures, name: str) -> None:
    many = MANY if os.environ.get(MONGO_URL_VAR) else MANY_EMULATED
    assert_flat(figures, name, unit="keys and documents examined",
                sizes={"few": FEW, "many": many})
