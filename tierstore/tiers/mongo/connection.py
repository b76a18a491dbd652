"""The connection: client ownership, the store's lifecycle, and the one place driver
exceptions become tierstore errors.

Durability is the server's write concern: put ``?w=majority&journal=true`` in the URL
for replica sets. Driver errors become tierstore errors in ``translate`` only.

URL options (removed before the URL reaches PyMongo; everything else is passed on):
``?offload_threshold=1048576`` (bytes above which a payload goes to GridFS),
``?orphan_grace=600`` (seconds before an unreferenced blob or file may be collected).
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final, Protocol, Self
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from bson.errors import BSONError, InvalidDocument
from gridfs import AsyncGridFSBucket
from gridfs.errors import CorruptGridFile, NoFile
from pymongo import AsyncMongoClient
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DocumentTooLarge,
    ExecutionTimeout,
    InvalidName,
    InvalidOperation,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)
from pymongo.errors import ConfigurationError as MongoConfigurationError

from tierstore.errors import (
    ConfigurationError,
    CorruptPayload,
    InvalidInput,
    LifecycleError,
    PayloadTooLarge,
    StorageError,
    TierstoreError,
    TierUnavailable,
)
from tierstore.lifecycle import Lifecycle
from tierstore.settings import StoreUrl
from tierstore.tiers.mongo.documents import (
    COLLECTIONS,
    DEFAULT_OFFLOAD_THRESHOLD,
    DEFAULT_ORPHAN_GRACE,
    DOCUMENT_BUDGET,
    GRIDFS_BUCKET,
)
from tierstore.tiers.mongo.migrations import apply_migrations

_OPTIONS: Final = ("offload_threshold", "orphan_grace")
_DUPLICATE_KEY: Final = 11000
_AUTH_CODES: Final = frozenset({13, 18})  # Unauthorized, AuthenticationFailed
_INDEX_CONFLICT_CODES: Final = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict
# Write concerns this deployment can never satisfy (more nodes than it has, or a tag
# set it does not define): a retry cannot help, the URL's w= must change.
_WRITE_CONCERN_CONFIG_CODES: Final = frozenset({
    79, 100,  # UnknownReplWriteConcern, UnsatisfiableWriteConcern
})
# Server codes that say "not now" rather than "no": the node is unreachable, stepping
# down, shutting down or overloaded, or a cursor died with its connection. A retry
# (after a failover, for one) may succeed, so they are TierUnavailable, not refusals.
_TRANSIENT_CODES: Final = frozenset({
    6, 7, 89, 9001,  # HostUnreachable, HostNotFound, NetworkTimeout, SocketException
    50, 262,  # MaxTimeMSExpired, ExceededTimeLimit
    24, 46, 112,  # LockTimeout, LockBusy, WriteConflict
    43,  # CursorNotFound (killed by a failover or a pool reset)
    91, 11600, 11601, 11602,  # ShutdownInProgress, InterruptedAtShutdown, Interrupted,
    #                           InterruptedDueToReplStateChange
    189, 10058, 10107, 13435, 13436,  # PrimarySteppedDown and the "not primary" family
    134,  # ReadConcernMajorityNotAvailableYet
    133,  # FailedToSatisfyReadPreference (mongos found no eligible node, e.g. no primary)
    202, 279,  # NetworkInterfaceExceededTimeLimit, ClientDisconnect
    13388,  # StaleConfig (a shard's routing table is being refreshed)
    16500,  # Cosmos DB / DocumentDB: request rate too large (throttled)
})
_TRANSIENT_LABELS: Final = ("RetryableWriteError", "TransientTransactionError",
                            "SystemOverloadedError", "RetryableError")


class GridFSBucket(Protocol):
    """The three GridFS calls this package makes (``gridfs.AsyncGridFSBucket`` or Motor's)."""

    def upload_from_stream(
        self, filename: str, source: bytes, *, metadata: Mapping[str, Any] | None = None
    ) -> Any: ...

    def open_download_stream(self, file_id: Any) -> Any: ...

    def delete(self, file_id: Any) -> Any: ...


BucketFactory = Callable[[Any, str], GridFSBucket]
"""``(database, bucket_name) -> bucket``; production uses ``gridfs.AsyncGridFSBucket``."""


def _async_bucket(database: Any, bucket_name: str) -> GridFSBucket:
    return AsyncGridFSBucket(database, bucket_name=bucket_name)


def _motor_bucket(database: Any, bucket_name: str) -> GridFSBucket:
    from motor.motor_asyncio import AsyncIOMotorGridFSBucket

    bucket: GridFSBucket = AsyncIOMotorGridFSBucket(database, bucket_name=bucket_name)
    return bucket


CLIENT_OPTIONS: Final = ("database", "offload_threshold", "orphan_grace")
"""The options of a store on the caller's client (``from_client``)."""

# class (module.qualname, most derived first in the MRO) -> (driver flavour, client or database)
_CLIENT_CLASSES: Final = {
    "pymongo.asynchronous.mongo_client.AsyncMongoClient": ("pymongo", "client"),
    "pymongo.asynchronous.database.AsyncDatabase": ("pymongo", "database"),
    "motor.core.AgnosticClient": ("motor", "client"),
    "motor.core.AgnosticDatabase": ("motor", "database"),
    "mongomock_motor.AsyncMongoMockClient": ("motor", "client"),
    "mongomock_motor.AsyncMongoMockDatabase": ("motor", "database"),
}


def client_kind(obj: object) -> tuple[str, str] | None:
    """``(flavour, "client" | "database")`` of a MongoDB client or database object, by
    class name, so that checking needs neither Motor nor mongomock installed."""
    for klass in type(obj).__mro__:
        found = _CLIENT_CLASSES.get(f"{klass.__module__}.{klass.__qualname__}")
        if found is not None:
            return found
    return None


# -- errors: the one place driver exceptions become tierstore errors ----------------------


def translate(exc: Exception, where: str) -> TierstoreError:
    """The most specific tierstore error for a PyMongo/BSON/GridFS exception."""
    if isinstance(exc, NoFile):
        return CorruptPayload(f"{where}: an offloaded payload is missing from GridFS ({exc})",
                              where=where)
    if isinstance(exc, CorruptGridFile):
        return CorruptPayload(f"{where}: a GridFS file is damaged ({exc})", where=where)
    if isinstance(exc, DocumentTooLarge):
        return PayloadTooLarge(f"{where}: {exc}")
    if isinstance(exc, MongoConfigurationError | InvalidName):
        return ConfigurationError(f"{where}: {exc}")
    if isinstance(exc, OperationFailure) and exc.code in _AUTH_CODES:
        return ConfigurationError(f"{where}: the server refused the credentials or role ({exc})")
    if isinstance(exc, OperationFailure) and exc.code in _INDEX_CONFLICT_CODES:
        return ConfigurationError(
            f"{where}: an index of the same name exists with another definition ({exc})"
        )
    if _unsatisfiable_write_concern(exc):
        return ConfigurationError(
            f"{where}: the deployment cannot satisfy the write concern (w=/wtimeoutMS in the "
            f"URL); retrying will not help ({exc})"
        )
    if _transient(exc):
        return TierUnavailable(f"{where}: {exc}", tier="warm", backend="mongodb")
    if isinstance(exc, InvalidDocument):
        return InvalidInput(f"{where}: a value cannot be stored in MongoDB ({exc})")
    if isinstance(exc, BSONError):
        return CorruptPayload(f"{where}: undecodable document ({exc})", where=where)
    if isinstance(exc, OperationFailure):
        return StorageError(f"{where}: the server refused the operation ({exc})")
    return TierUnavailable(f"{where}: {exc}", tier="warm", backend="mongodb")


def _unsatisfiable_write_concern(exc: Exception) -> bool:
    """Whether ``exc`` says the write concern can never be met (codes 79 and 100).

    A bulk write counts only when it has no write error of its own and one of its write
    concern errors carries such a code.
    """
    if isinstance(exc, BulkWriteError):
        details = exc.details or {}
        if details.get("writeErrors"):
            return False
        return any(e.get("code") in _WRITE_CONCERN_CONFIG_CODES
                   for e in details.get("writeConcernErrors") or [])
    return isinstance(exc, OperationFailure) and exc.code in _WRITE_CONCERN_CONFIG_CODES


def _transient(exc: Exception) -> bool:
    """Whether ``exc`` says the server could not answer now (a retry may succeed).

    Network errors, pool resets and server selection timeouts (``ConnectionFailure``),
    time limits, and write concern failures (the write may or may not be replicated:
    an unknown outcome, like a cut connection) are transient; so is a server refusal
    whose code or error label says the node is unreachable, recovering, busy or
    throttling, or that a sharded cluster's routing is being refreshed. (A write concern
    that can never be met is caught before this, by ``_unsatisfiable_write_concern``.) A bulk
    write is transient when every error it carries is.
    """
    if isinstance(exc, ConnectionFailure | ExecutionTimeout | WriteConcernError):
        return True
    if not isinstance(exc, OperationFailure):
        return False
    if any(exc.has_error_label(label) for label in _TRANSIENT_LABELS):
        return True
    if isinstance(exc, BulkWriteError):
        details = exc.details or {}
        write_errors = details.get("writeErrors") or []
        if not write_errors:
            return bool(details.get("writeConcernErrors"))
        return all(e.get("code") in _TRANSIENT_CODES for e in write_errors)
    return exc.code in _TRANSIENT_CODES


def duplicate_positions(exc: BulkWriteError) -> set[int] | None:
    """Positions that failed only because the key exists; None if anything else failed."""
    errors = (exc.details or {}).get("writeErrors") or []
    if any(err.get("code") != _DUPLICATE_KEY for err in errors):
        return None
    return {int(err["index"]) for err in errors}


def client_url(url: StoreUrl) -> str:
    """The URL PyMongo sees: tierstore's own options removed, credentials untouched."""
    parts = urlsplit(url.raw)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in _OPTIONS]
    return urlunsplit(parts._replace(query=urlencode(query)))


# -- the connection ----------------------------------------------------------------------


class MongoConnection:
    """The lowest layer of ``MongoWarm``: every other layer reaches the database
    through ``_c`` (which refuses a store that is not open) and ``_errors``."""

    backend = "mongodb"

    def __init__(
        self,
        url: str | StoreUrl | None = None,
        *,
        database: Any = None,
        client: Any = None,
        database_name: str | None = None,
        gridfs: BucketFactory | None = None,
        offload_threshold: int = DEFAULT_OFFLOAD_THRESHOLD,
        orphan_grace: float = DEFAULT_ORPHAN_GRACE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        given = sum(x is not None for x in (url, database, client))
        if given != 1:
            raise ConfigurationError("MongoWarm needs exactly one of url, database or client")
        self._url = StoreUrl.parse(url) if isinstance(url, str) else url
        if self._url is not None:
            if self._url.scheme not in ("mongodb", "mongodb+srv"):
                raise ConfigurationError(
                    f"{self._url.masked!r} is not a mongodb:// or mongodb+srv:// URL"
                )
            database_name = unquote(self._url.path.lstrip("/"))
            if not database_name:
                raise ConfigurationError(
                    f"{self._url.masked!r} names no database; use mongodb://host/dbname"
                )
        elif client is not None and not database_name:
            raise ConfigurationError("MongoWarm(client=…) also needs database_name=")
        if isinstance(offload_threshold, bool) or not 1024 <= offload_threshold <= DOCUMENT_BUDGET:
            raise ConfigurationError(
                f"offload_threshold must be within 1024..{DOCUMENT_BUDGET} bytes, "
                f"got {offload_threshold!r}"
            )
        if not orphan_grace >= 0:
            raise ConfigurationError(f"orphan_grace cannot be negative: {orphan_grace!r}")
        self.database_name: str = str(database_name or getattr(database, "name", "?"))
        self.offload_threshold = offload_threshold
        self.orphan_grace = float(orphan_grace)
        self._given_database = database
        self._given_client = client
        self._bucket_factory = gridfs or _async_bucket
        self._clock = clock
        self._life = Lifecycle(f"mongodb warm tier {self._where}")
        self._opening = asyncio.Lock()  # a second, concurrent setup waits for the first
        self._db: Any = None
        self._bucket: Any = None
        self._owned_client: Any = None

    @classmethod
    def from_url(cls, url: StoreUrl) -> Self:
        try:
            threshold = int(url.option("offload_threshold", str(DEFAULT_OFFLOAD_THRESHOLD))
                            or DEFAULT_OFFLOAD_THRESHOLD)
            grace = float(url.option("orphan_grace", str(DEFAULT_ORPHAN_GRACE))
                          or DEFAULT_ORPHAN_GRACE)
        except ValueError as exc:
            raise ConfigurationError(f"{url.masked!r}: bad option value ({exc})") from exc
        return cls(url, offload_threshold=threshold, orphan_grace=grace)

    @classmethod
    def from_client(cls, client: object, **options: Any) -> Self:
        """A store on the caller's client or database (PyMongo async, Motor, mongomock-motor).

        ``options``: ``database`` (needed with a client), ``offload_threshold``,
        ``orphan_grace``. The client stays the caller's: the store never closes it.
        """
        unknown = sorted(set(options) - set(CLIENT_OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) for a MongoDB client: {', '.join(unknown)}; known: "
                f"{', '.join(CLIENT_OPTIONS)}"
            )
        kind = client_kind(client)
        if kind is None:
            raise ConfigurationError(
                "the MongoDB warm tier takes a pymongo.AsyncMongoClient or AsyncDatabase (or "
                f"Motor's), got {type(client).__module__}.{type(client).__qualname__}"
            )
        flavour, what = kind
        try:
            numbers: dict[str, Any] = {}
            if "offload_threshold" in options:
                numbers["offload_threshold"] = int(options["offload_threshold"])
            if "orphan_grace" in options:
                numbers["orphan_grace"] = float(options["orphan_grace"])
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"bad option for a MongoDB client: {exc}") from exc
        gridfs = _motor_bucket if flavour == "motor" else None
        name = options.get("database")
        if what == "database":
            if name is not None:
                raise ConfigurationError("a MongoDB database object names its database; "
                                         "drop database=")
            return cls(database=client, gridfs=gridfs, **numbers)
        if not name:
            raise ConfigurationError("a MongoDB client needs database='name' among its options")
        return cls(client=client, database_name=str(name), gridfs=gridfs, **numbers)

    def __repr__(self) -> str:
        target = self._url.masked if self._url is not None else f"database {self.database_name}"
        return f"MongoWarm({target!r}, {self._life.state})"

    @property
    def identity(self) -> tuple[str, str, str] | None:
        """The server and database (None for a database or client given as an object)."""
        if self._url is None:
            return None
        return ("mongodb", self._url.masked, self.database_name)

    @property
    def _where(self) -> str:
        return self._url.masked if self._url is not None else self.database_name

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Driver errors leave as tierstore errors (see ``translate``).

        The driver's ``InvalidOperation`` on a store closed while the call was under way
        (its client is closed) is a ``LifecycleError``; on an open store it is not the
        store's lifecycle, and ``translate`` decides.
        """
        try:
            yield
        except (PyMongoError, BSONError) as exc:
            if isinstance(exc, InvalidOperation) and self._life.is_closed:
                raise LifecycleError(
                    f"mongodb warm tier {self._where} was closed during {what} ({exc})"
                ) from exc
            raise translate(exc, f"mongodb {self._where}: {what}") from exc

    # -- lifecycle --------------------------------------------------------------------

    async def setup(self) -> None:
        """Connect and migrate; a no-op once open, refused once closed (``Lifecycle``)."""
        async with self._opening:
            if not self._life.begin():
                return
            try:
                with self._errors("setup"):
                    if self._url is not None:
                        self._owned_client = AsyncMongoClient(client_url(self._url),
                                                              appname="tierstore")
                        database = self._owned_client[self.database_name]
                    elif self._given_database is not None:
                        database = self._given_database
                    else:
                        database = self._given_client[self.database_name]
                    await apply_migrations(database, self._clock)
                    bucket = self._bucket_factory(database, GRIDFS_BUCKET)
            except BaseException:
                await self._close_owned()
                self._life.failed()
                raise
            self._db = database
            self._bucket = bucket
            self._life.opened()
            if not self._life.is_open:  # closed while it was opening: let nothing leak
                self._db = self._bucket = None
                await self._close_owned()

    async def aclose(self) -> None:
        self._life.close()
        self._db = None
        self._bucket = None
        await self._close_owned()

    async def _close_owned(self) -> None:
        client, self._owned_client = self._owned_client, None
        if client is not None:
            await client.close()

    def __del__(self) -> None:
        if getattr(self, "_owned_client", None) is not None:
            warnings.warn(f"{self!r} was not closed; call aclose()", ResourceWarning,
                          stacklevel=1)

    def _c(self, name: str) -> Any:
        self._life.require()
        return self._db[COLLECTIONS[name]]
