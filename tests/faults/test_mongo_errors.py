"""Every PyMongo network, timeout and failover error leaves the saver as ``TierUnavailable``.

No MongoDB server can run on the build machines, so this is the one fault test on a
fake: a database wrapper that, once armed, makes every collection and GridFS call
raise a chosen PyMongo error (the way the driver raises them: on the awaited call or
on the cursor's first fetch). The saver is driven through every call LangGraph makes,
and the warm store through its other calls; each must fail with ``TierUnavailable``
chained to the driver error, and work again as soon as the wrapper is disarmed.

The errors are the ones a connection cut, a pool reset, a server selection timeout,
an election (not primary, shutting down, stepped down) or a slow replica produce, as
exceptions of their own class or as ``OperationFailure`` carrying the server's code
or a retryable error label. Two kinds are not transient: a write concern the
deployment can never satisfy is a ``ConfigurationError``, and the driver's
``InvalidOperation`` on a store closed during the call is a ``LifecycleError``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConnectionFailure,
    CursorNotFound,
    ExecutionTimeout,
    InvalidOperation,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ProtocolError,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
    WriteConcernError,
    WTimeoutError,
    _OperationCancelled,
)

from loadtest.workload import build_chat_agent, thread_config, turn_input
from tests.servers.mongo import MongoTarget
from tierstore import TieredSaver
from tierstore.errors import ConfigurationError, LifecycleError, TierstoreError, TierUnavailable
from tierstore.tiers.mongo import MongoWarm

ERRORS: dict[str, Exception] = {
    "AutoReconnect": AutoReconnect("connection reset by peer"),
    "NetworkTimeout": NetworkTimeout("timed out"),
    "ServerSelectionTimeoutError": ServerSelectionTimeoutError("No servers found yet"),
    "ConnectionFailure": ConnectionFailure("connection closed"),
    "WaitQueueTimeoutError": WaitQueueTimeoutError("timed out waiting for a connection"),
    "pool cleared (_OperationCancelled)": _OperationCancelled("operation cancelled"),
    "NotPrimaryError": NotPrimaryError("not primary", {"code": 10107}),
    "ExecutionTimeout": ExecutionTimeout("operation exceeded time limit", 50),
    "WTimeoutError": WTimeoutError("waiting for replication timed out", 64),
    "ProtocolError": ProtocolError("message length larger than server max"),
    "CursorNotFound": CursorNotFound("cursor id not found", 43),
    "OperationFailure HostUnreachable": OperationFailure("host unreachable", 6),
    "OperationFailure HostNotFound": OperationFailure("host not found", 7),
    "OperationFailure NetworkTimeout": OperationFailure("network timeout", 89),
    "OperationFailure SocketException": OperationFailure("socket exception", 9001),
    "OperationFailure ExceededTimeLimit": OperationFailure("exceeded time limit", 262),
    "OperationFailure ReadConcernMajorityNotAvailableYet":
        OperationFailure("read concern majority not available yet", 134),
    "OperationFailure Interrupted": OperationFailure("operation was interrupted", 11601),
    "OperationFailure WriteConflict": OperationFailure(
        "write conflict", 112, {"errorLabels": ["TransientTransactionError"], "code": 112}),
    "OperationFailure RetryableWriteError label": OperationFailure(
        "connection pool for the shard was cleared", 1, {
            "errorLabels": ["RetryableWriteError"], "code": 1}),
    "WriteConcernError ShutdownInProgress": WriteConcernError("shutdown in progress", 91),
    "WriteConcernError InterruptedAtShutdown": WriteConcernError("interrupted at shutdown",
                                                                 11600),
    "WriteConcernError PrimarySteppedDown": WriteConcernError("primary stepped down", 189),
    "BulkWriteError with a write concern error": BulkWriteError({
        "writeErrors": [], "nInserted": 1,
        "writeConcernErrors": [{"code": 91, "errmsg": "shutdown in progress"}]}),
    "OperationFailure FailedToSatisfyReadPreference (mongos, no primary)":
        OperationFailure("could not find host matching read preference", 133),
    "OperationFailure NetworkInterfaceExceededTimeLimit":
        OperationFailure("network interface exceeded time limit", 202),
    "OperationFailure StaleConfig": OperationFailure("stale config", 13388),
    "OperationFailure ClientDisconnect": OperationFailure("client disconnected", 279),
    "OperationFailure request rate too large (Cosmos DB, DocumentDB)":
        OperationFailure("Request rate is large", 16500),
}

# Errors that no retry can cure: the write concern in the URL cannot be met by this
# deployment (more nodes than it has, or a tag set it does not define).
CONFIG_ERRORS: dict[str, Exception] = {
    "WriteConcernError UnsatisfiableWriteConcern": WriteConcernError(
        "Not enough data-bearing nodes", 100, {"code": 100}),
    "WriteConcernError UnknownReplWriteConcern": WriteConcernError(
        "unrecognized getLastError mode: majorty", 79, {"code": 79}),
    "BulkWriteError with an unsatisfiable write concern": BulkWriteError({
        "writeErrors": [], "nInserted": 1,
        "writeConcernErrors": [{"code": 100, "errmsg": "Not enough data-bearing nodes"}]}),
}


class Switch:
    """What the wrapped database raises now (``None``: nothing, calls pass through)."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.raised = 0
        # When set, calls wait here first (``waiting`` says one has arrived).
        self.hold: asyncio.Event | None = None
        self.waiting = asyncio.Event()

    async def wait(self) -> None:
        if self.hold is not None:
            self.waiting.set()
            await self.hold.wait()

    def check(self) -> None:
        if self.error is not None:
            self.raised += 1
            raise self.error


class _Cursor:
    """A cursor whose fetches raise when armed (a cursor is built lazily, then fetched)."""

    def __init__(self, target: Any, switch: Switch) -> None:
        self._target = target
        self._switch = switch

    def __getattr__(self, name: str) -> Any:
        return _wrap(getattr(self._target, name), self._switch)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        await self._switch.wait()
        self._switch.check()
        async for item in self._target:
            yield item


def _wrap(attr: Any, switch: Switch) -> Any:
    if inspect.iscoroutinefunction(attr):
        @functools.wraps(attr)
        async def call(*args: Any, **kwargs: Any) -> Any:
            await switch.wait()
            switch.check()
            return _result(await attr(*args, **kwargs), switch)
        return call
    if callable(attr):
        @functools.wraps(attr)
        def sync(*args: Any, **kwargs: Any) -> Any:
            return _result(attr(*args, **kwargs), switch)
        return sync
    return attr


def _result(value: Any, switch: Switch) -> Any:
    kind = type(value).__name__
    if "Cursor" in kind or "GridOut" in kind:
        return _Cursor(value, switch)
    return value


class _Faulty:
    """A collection or GridFS bucket whose every call goes through the switch."""

    def __init__(self, target: Any, switch: Switch) -> None:
        self._target = target
        self._switch = switch

    def __getattr__(self, name: str) -> Any:
        return _wrap(getattr(self._target, name), self._switch)


class FaultyDatabase:
    def __init__(self, database: Any, switch: Switch) -> None:
        self._database = database
        self._switch = switch
        self.name: str = database.name

    def __getitem__(self, name: str) -> Any:
        return _Faulty(self._database[name], self._switch)

    def get_collection(self, name: str) -> Any:
        return self[name]


@pytest.fixture
def switch() -> Switch:
    return Switch()


@pytest.fixture
async def saver(mongo_db: MongoTarget, switch: Switch) -> AsyncIterator[TieredSaver]:
    if mongo_db.real:
        pytest.skip("injects errors into the mock; the real server is cut through a proxy in "
                    "test_mongo_faults.py")
    gridfs = mongo_db.gridfs
    assert gridfs is not None

    def bucket(database: Any, name: str) -> Any:
        return _Faulty(gridfs(database, name), switch)

    warm = MongoWarm(database=FaultyDatabase(mongo_db.database, switch), gridfs=bucket,
                     offload_threshold=1024)
    async with TieredSaver.from_stores(warm=warm, hot=None, cold=None) as opened:
        yield opened


Call = Callable[[TieredSaver, dict[str, Any]], Awaitable[Any]]


async def _turn(saver: TieredSaver, seen: dict[str, Any]) -> Any:
    app = build_chat_agent(2000).compile(checkpointer=saver)
    return await app.ainvoke(turn_input("t", seen["turns"], 2000), thread_config("t"))


async def _list(saver: TieredSaver, seen: dict[str, Any]) -> Any:
    return [t async for t in saver.alist(thread_config("t"))]


def _warm(saver: TieredSaver) -> Any:
    return saver.regions.by_name["default"].warm


CALLS: dict[str, Call] = {
    "turn (aput, aput_writes)": _turn,
    "aget_tuple latest": lambda s, seen: s.aget_tuple(thread_config("t")),
    "aget_tuple by id": lambda s, seen: s.aget_tuple(seen["config"]),
    "alist": _list,
    "aput_writes": lambda s, seen: s.aput_writes(seen["config"], [("x", 1)], task_id="w"),
    "adelete_thread": lambda s, seen: s.adelete_thread("t"),
    "adelete_for_runs": lambda s, seen: s.adelete_for_runs(["run-1"]),
    "acopy_thread": lambda s, seen: s.acopy_thread("t", "t-copy"),
    "aprune": lambda s, seen: s.aprune(["t"]),
    "warm head": lambda s, seen: _warm(s).head("t", ""),
    "warm index": lambda s, seen: _warm(s).index("t", ""),
    "warm usage": lambda s, seen: _warm(s).usage(),
    "warm next_fence": lambda s, seen: _warm(s).next_fence("t"),
    "warm held_claims": lambda s, seen: _warm(s).held_claims(now=0.0),
    "warm claim": lambda s, seen: _warm(s).claim(owner="job", now=2e9, lease_seconds=30,
                                                 limit=10, warm_before=2e9),
    "warm release": lambda s, seen: _warm(s).release("t", "", owner="job"),
    "warm mark_archived": lambda s, seen: _warm(s).mark_archived(
        "t", "", [seen["config"]["configurable"]["checkpoint_id"]], archive_key="k",
        owner="job", now=2e9),
    "warm archive_refs": lambda s, seen: _warm(s).archive_refs("t"),
    "warm archive_stubs": lambda s, seen: _warm(s).archive_stubs(keys=["k"]),
    "warm sweep_gridfs": lambda s, seen: _warm(s).sweep_gridfs(now=2e9),
}


async def _every_call_fails(
    saver: TieredSaver, switch: Switch, error: Exception, kind: type[TierstoreError],
) -> None:
    """Each call in CALLS raises ``kind`` chained to ``error``; then the store works."""
    seen: dict[str, Any] = {"turns": 0}
    for _ in range(2):  # history, and a state large enough for GridFS
        await _turn(saver, seen)
        seen["turns"] += 1
    head = await saver.aget_tuple(thread_config("t"))
    assert head is not None
    seen["config"] = head.config
    wrong: dict[str, str] = {}
    for name, call in CALLS.items():
        switch.error = error
        raised = switch.raised
        try:
            await call(saver, seen)
        except kind as exc:
            if exc.__cause__ is not error:
                wrong[name] = f"{kind.__name__} not chained to the driver error: {exc!r}"
        except Exception as exc:
            wrong[name] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        else:
            if switch.raised > raised:
                wrong[name] = "the driver error was swallowed: the call returned"
        finally:
            switch.error = None
    assert wrong == {}, f"{error!r} escaped untranslated or mistranslated from: {wrong}"
    await _turn(saver, seen)  # and the store works again at once
    assert await saver.aget_tuple(thread_config("t")) is not None


@pytest.mark.parametrize("error", list(ERRORS))
async def test_every_call_fails_unavailable_then_recovers(
    saver: TieredSaver, switch: Switch, error: str,
) -> None:
    await _every_call_fails(saver, switch, ERRORS[error], TierUnavailable)


@pytest.mark.parametrize("error", list(CONFIG_ERRORS))
async def test_an_unsatisfiable_write_concern_is_a_configuration_error(
    saver: TieredSaver, switch: Switch, error: str,
) -> None:
    await _every_call_fails(saver, switch, CONFIG_ERRORS[error], ConfigurationError)


CLOSED_CLIENT = "Cannot use AsyncMongoClient after close"


def faulty_warm(mongo_db: MongoTarget, switch: Switch) -> MongoWarm:
    if mongo_db.real:
        pytest.skip("injects errors into the mock")
    gridfs = mongo_db.gridfs
    assert gridfs is not None
    return MongoWarm(database=FaultyDatabase(mongo_db.database, switch),
                     gridfs=lambda database, name: _Faulty(gridfs(database, name), switch),
                     offload_threshold=1024)


async def test_a_call_cut_off_by_aclose_is_a_lifecycle_error(
    mongo_db: MongoTarget, switch: Switch,
) -> None:
    """A call under way when the store is closed: the driver's InvalidOperation says so."""
    warm = faulty_warm(mongo_db, switch)
    await warm.setup()
    switch.hold = asyncio.Event()
    switch.error = InvalidOperation(CLOSED_CLIENT)
    call = asyncio.create_task(warm.head("t", ""))
    await asyncio.wait_for(switch.waiting.wait(), 30)
    await warm.aclose()
    switch.hold.set()
    with pytest.raises(LifecycleError) as caught:
        await asyncio.wait_for(call, 30)
    assert caught.value.__cause__ is switch.error


async def test_invalid_operation_on_an_open_store_is_not_a_lifecycle_error(
    mongo_db: MongoTarget, switch: Switch,
) -> None:
    """The store is open (someone else closed the client it was given): not its lifecycle."""
    warm = faulty_warm(mongo_db, switch)
    await warm.setup()
    try:
        switch.error = InvalidOperation(CLOSED_CLIENT)
        with pytest.raises(TierUnavailable):
            await asyncio.wait_for(warm.head("t", ""), 30)
    finally:
        await warm.aclose()
