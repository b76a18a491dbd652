"""``mongodb://host/dbname`` and ``mongodb+srv://…/dbname`` — the MongoDB warm tier.

Production talks to the server through PyMongo's native async API
(``pymongo.AsyncMongoClient``); the code keeps to the operations that Motor and
mongomock-motor also provide (no transactions, no ``bulk_write``, aggregation only
where noted), so the same module runs against the in-process mock the tests use.

Documents (collection names live in ``COLLECTIONS``, indexes in ``migrations/mongo/``)::

    tierstore_heads        {thread_id, checkpoint_ns, head_id, version, n_writes, conflicts,
                            updated_at, lease_owner, lease_until, fence}
                                              unique (thread_id, checkpoint_ns)
    tierstore_checkpoints  {thread_id, checkpoint_ns, checkpoint_id, parent_id, run_id,
                            checkpoint: PAYLOAD, metadata: PAYLOAD,
                            channel_versions: [{c: channel, v: version}, …],
                            filter_doc: [{k: key, t: type, v: value}, …],
                            location, archive_key, created_at, size_bytes, token}
                                              unique (thread_id, checkpoint_ns, checkpoint_id)
    tierstore_blobs        {thread_id, checkpoint_ns, channel, version, payload: PAYLOAD, seen_at}
                                              unique (thread_id, checkpoint_ns, channel, version)
    tierstore_writes       {thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel,
                            task_path, payload: PAYLOAD}
                                              unique (thread_id, …, checkpoint_id, task_id, idx)
    tierstore_fences       {_id: SHA-256 of thread_id, fence}   newest lease token per thread
    tierstore_fs.files / .chunks   GridFS: one file per offloaded payload, owned by one document
    tierstore_migrations   {_id: version, name, applied_at}

    PAYLOAD = {tag, data: <bytes>, size}                             kept in the document
            | {tag, gridfs: <file id>, sha256: <hex>, size}           offloaded to GridFS

A checkpoint with ``location: "archived"`` is a stub: its body, writes and blobs live
in the cold segment named by ``archive_key``; metadata, parent and channel versions
stay so that ``list`` and its filters never touch cold. Tiering jobs lease a head by
a filtered update (``lease_until`` free or expired) and turn checkpoints into stubs
one conditional update each (``location: "warm"`` in the filter), so two workers
never archive the same checkpoint twice.

Ids are always values, never field names or operators: channel versions and metadata
filters are arrays of small ``{c, v}`` / ``{k, t, v}`` documents rather than
sub-documents keyed by channel or metadata key, so a key such as ``$where`` or ``a.b``
is stored and matched as plain text with no escaping. Every id is checked to be a
``str`` before it enters a filter, so a caller can never smuggle in an operator
document. A filter entry records the JSON type (``t``) next to the value, which is what
keeps ``True`` apart from ``1`` and ``"1"`` (the server would equate none of them,
but the type keeps the mock honest too); keys and strings longer than 256 bytes are
stored and matched as their SHA-256 digest, so no entry, and no index key, is ever large.

Write flow of ``put_checkpoint`` (no multi-document transactions: the order is the
guarantee)::

    [strict] read head ── parent ≠ head ──► VersionConflict           nothing was written
    1 upload to GridFS every payload over the threshold, then the largest
      remaining ones until the document fits under 16 MiB            orphans at worst
    2 insert the new blobs (a duplicate key means: already there)    nothing names them yet
    3 upsert the checkpoint document                                 readable from here on
    4 head compare-and-set:
        update_one({thread, ns, version: v, head_id: h}, {$set: …})  retried on a miss
        [strict] the head moved off the parent ──► undo 3 and 2, VersionConflict
    5 count the head's writes and $max them into n_writes

With a lease token (``fence``) the fence document is read before step 1 (a token
already superseded writes nothing), step 4 also requires the head's ``fence`` to be
at most the token and ``$max``-es it in, and ``next_fence`` raises the fence document
and then every head of the thread. A head created in step 4 is checked against the
fence document once more and taken back (with the checkpoint) if a newer lease was
issued meanwhile, which covers a namespace that had no head yet. Pending writes
are checked against the fence document before they are inserted: without
transactions, a lease taken over during that one insert does not undo it.

A crash after 1 or 2 leaves files and blobs that no checkpoint names (collected
later, see below); a crash after 3 leaves a complete, readable checkpoint whose head
lags until the next put or maintenance moves it (the head only ever moves to the
greatest id). Between 3 and 4 a strict writer that is about to lose a race is
readable for one round trip; a strict writer whose parent is already stale writes
nothing at all. The head is the only document that is compare-and-set; a head that
names a checkpoint which no longer exists is repaired before a conflict is reported.

Deletes go the other way: documents first, then their GridFS files, so a crash can
leave an unreferenced file but never a reference to a missing one. Each GridFS file
belongs to exactly one document (``copy_thread`` copies the bytes), which is what
makes deleting it with its document safe. Leftovers are collectable:

- blobs that no live checkpoint names any more are deleted by ``delete_for_runs``,
  ``prune`` and ``mark_archived`` once they are older than ``orphan_grace`` (a put
  in flight inserts its blobs a moment before its checkpoint; the grace keeps those);
- ``sweep_gridfs()`` deletes GridFS files older than ``orphan_grace`` that no
  document references (uploads of a crashed put, files of a crashed delete).

``usage`` and ``archive_refs`` are the only aggregations; they iterate the cursor
(``async for``), which PyMongo, Motor and the mock all allow.

Durability is the server's write concern: put ``?w=majority&journal=true`` in the URL
for replica sets. Driver errors become tierstore errors in ``_translate`` only.

URL options (removed before the URL reaches PyMongo; everything else is passed on):
``?offload_threshold=1048576`` (bytes above which a payload goes to GridFS),
``?orphan_grace=600`` (seconds before an unreferenced blob or file may be collected).
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import inspect
import json
import logging
import random
import time
import uuid
import warnings
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import bson
from bson.errors import BSONError, InvalidDocument
from gridfs import AsyncGridFSBucket
from gridfs.errors import CorruptGridFile, NoFile
from pymongo import AsyncMongoClient, ReturnDocument
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DocumentTooLarge,
    DuplicateKeyError,
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
    LeaseLost,
    LifecycleError,
    MissingBlobs,
    PayloadTooLarge,
    StorageError,
    TierstoreError,
    TierUnavailable,
    VersionConflict,
)
from tierstore.migrate import Migration, migrations_for
from tierstore.policy import fence_key, fenced_out, first_version
from tierstore.records import (
    BlobRecord,
    CheckpointMeta,
    CheckpointRecord,
    Claim,
    ClaimsHeld,
    Head,
    ListQuery,
    Payload,
    PutResult,
    Scalar,
    StoredCheckpoint,
    TierUsage,
    WriteRecord,
)
from tierstore.settings import StoreUrl

__all__ = [
    "COLLECTIONS",
    "GRIDFS_BUCKET",
    "BucketFactory",
    "GridFSBucket",
    "MongoWarm",
    "filter_entry",
    "fit_document",
]

log = logging.getLogger("tierstore.mongo")
T = TypeVar("T")

COLLECTIONS: Final[Mapping[str, str]] = {
    "heads": "tierstore_heads",
    "checkpoints": "tierstore_checkpoints",
    "blobs": "tierstore_blobs",
    "writes": "tierstore_writes",
    "fences": "tierstore_fences",
    "migrations": "tierstore_migrations",
    "gridfs_files": "tierstore_fs.files",
}
GRIDFS_BUCKET: Final = "tierstore_fs"

MAX_DOCUMENT: Final = 16 * 1024 * 1024
"""MongoDB's BSON document limit."""
DOCUMENT_BUDGET: Final = MAX_DOCUMENT - 64 * 1024
"""What a document may use; the margin covers ``_id`` and what the server adds."""
REF_SIZE: Final = 160
"""An upper bound of what a GridFS reference adds to a document in place of its data."""
DEFAULT_OFFLOAD_THRESHOLD: Final = 1 << 20
DEFAULT_ORPHAN_GRACE: Final = 600.0
DIGEST_ABOVE: Final = 256
DIGEST_PREFIX: Final = "sha256:"

# Where each kind of GridFS file is referenced from: kind -> (collection, payload field).
_FILE_OWNERS: Final[Mapping[str, tuple[str, str]]] = {
    "checkpoint": ("checkpoints", "checkpoint"),
    "metadata": ("checkpoints", "metadata"),
    "blob": ("blobs", "payload"),
    "write": ("writes", "payload"),
}
_OPTIONS: Final = ("offload_threshold", "orphan_grace")
_PAGE: Final = 200
_OR_CHUNK: Final = 256
_CAS_ATTEMPTS: Final = 100
_PARALLEL_FILES: Final = 8
_INT64: Final = (-(2**63), 2**63 - 1)
_DUPLICATE_KEY: Final = 11000
_AUTH_CODES: Final = frozenset({13, 18})  # Unauthorized, AuthenticationFailed
_INDEX_CONFLICT_CODES: Final = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict
# Write concerns this deployment can never satisfy (more nodes than it has, or a tag
# set it does not define): a retry cannot help, the URL's w= must change.
_WRITE_CONCERN_CONFIG_CODES: Final = frozenset({
    79, 100,  # UnknownReplWriteConcern, UnsatisfiableWriteConcern
})
_INDEX_OPTIONS: Final = frozenset({"unique", "sparse", "partialFilterExpression"})
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
_READ_FIELDS: Final[Mapping[str, int]] = {
    "_id": 0,
    "thread_id": 1,
    "checkpoint_ns": 1,
    "checkpoint_id": 1,
    "parent_id": 1,
    "checkpoint": 1,
    "metadata": 1,
    "channel_versions": 1,
    "location": 1,
    "archive_key": 1,
}

Doc = dict[str, Any]
Docs = list[Doc]
FileIds = list[Any]
Ids = list[str]
State = Literal["unopened", "opened", "closed"]


class GridFSBucket(Protocol):
    """The three GridFS calls this module makes (``gridfs.AsyncGridFSBucket`` or Motor's)."""

    def upload_from_stream(
        self, filename: str, source: bytes, *, metadata: Mapping[str, Any] | None = None
    ) -> Any: ...

    def open_download_stream(self, file_id: Any) -> Any: ...

    def delete(self, file_id: Any) -> Any: ...


BucketFactory = Callable[[Any, str], GridFSBucket]
"""``(database, bucket_name) -> bucket``; production uses ``gridfs.AsyncGridFSBucket``."""


def _async_bucket(database: Any, bucket_name: str) -> GridFSBucket:
    return AsyncGridFSBucket(database, bucket_name=bucket_name)


# -- errors: the one place driver exceptions become tierstore errors ----------------------


def _translate(exc: Exception, where: str) -> TierstoreError:
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


# -- pure helpers -------------------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    """Only plain strings enter a filter: a dict here would be an operator."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    return value


def _digest_text(text: str) -> str:
    """Long text (and text that looks like a digest) is stored as its SHA-256."""
    raw = text.encode("utf-8")
    if len(raw) > DIGEST_ABOVE or text.startswith(DIGEST_PREFIX):
        return DIGEST_PREFIX + hashlib.sha256(raw).hexdigest()
    return text


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def filter_entry(key: str, value: Scalar) -> Doc:
    """The ``{k, t, v}`` form of one metadata scalar, for storing and for matching.

    ``t`` keeps JSON types apart (``True`` is not ``1``); ints and floats share
    ``num`` so that ``1`` matches ``1.0``, as in JSON. Integers beyond 64 bits do not
    fit BSON and are kept as decimal text under their own type.
    """
    entry_type: str
    stored: Any
    if value is None:
        entry_type, stored = "null", None
    elif isinstance(value, bool):
        entry_type, stored = "bool", value
    elif isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            entry_type, stored = "num", value
        else:
            entry_type, stored = "bigint", str(value)
    elif isinstance(value, float):
        entry_type, stored = "num", value
    elif isinstance(value, str):
        entry_type, stored = "str", _digest_text(value)
    else:
        raise InvalidInput(
            f"metadata filter values must be str, int, float, bool or None; "
            f"{key!r} is {type(value).__name__}"
        )
    return {"k": _digest_text(str(key)), "t": entry_type, "v": stored}


def fit_document(
    base_size: int, sizes: Mapping[str, int], *, threshold: int, budget: int = DOCUMENT_BUDGET
) -> list[str]:
    """Which payload fields of one document go to GridFS.

    Every payload over ``threshold``, then the largest remaining ones until the
    document (``base_size`` without payload bytes, plus what stays inline) fits
    ``budget``. Raises ``PayloadTooLarge`` if it cannot fit even with every payload
    offloaded (too many channels or metadata keys, not too many bytes).
    """
    if base_size + REF_SIZE * len(sizes) > budget:
        raise PayloadTooLarge(
            f"a document would be {base_size} bytes before any payload; MongoDB's limit is "
            f"{MAX_DOCUMENT} (too many channels or scalar metadata keys?)"
        )
    chosen = [name for name, size in sizes.items() if size > threshold]
    rest = sorted((n for n in sizes if n not in chosen), key=lambda n: (-sizes[n], n))
    inline = sum(sizes[n] for n in rest)
    for name in rest:
        if base_size + inline + REF_SIZE * len(chosen) <= budget:
            break
        chosen.append(name)
        inline -= sizes[name]
    return chosen


@dataclass(frozen=True, slots=True)
class _HeadStep:
    head_id: str
    version: int
    moved: bool
    conflict: bool


async def _shielded(step: Awaitable[T]) -> T:
    """Await ``step`` in a task of its own that a cancellation of the caller does not stop.

    The caller still sees ``CancelledError`` at once; the step finishes in the
    background and its outcome is retrieved (and logged if it failed), never lost.
    """
    task = asyncio.ensure_future(step)

    def retrieve(done: asyncio.Future[T]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.debug("a shielded store step failed after its caller left: %r",
                      done.exception())

    task.add_done_callback(retrieve)
    return await asyncio.shield(task)


def _advance_head(
    head_id: str | None, version: int, checkpoint_id: str, parent_id: str | None
) -> _HeadStep:
    """The head after storing ``checkpoint_id``: the greatest id wins, every put counts."""
    moved = head_id is None or checkpoint_id > head_id
    return _HeadStep(
        head_id=checkpoint_id if moved or head_id is None else head_id,
        version=version + 1,
        moved=moved,
        conflict=parent_id != head_id,
    )


def _list_plan(query: ListQuery) -> tuple[Doc, list[tuple[str, int]]]:
    """The filter and the newest-first sort of a list query (sort keys match an index)."""
    flt: Doc = {}
    if query.thread_id is not None:
        flt["thread_id"] = _text(query.thread_id, "thread_id")
    if query.checkpoint_ns is not None:
        flt["checkpoint_ns"] = _text(query.checkpoint_ns, "checkpoint_ns")
    id_cond: Doc = {}
    if query.checkpoint_id is not None:
        id_cond["$eq"] = _text(query.checkpoint_id, "checkpoint_id")
    if query.before_id is not None:
        id_cond["$lt"] = _text(query.before_id, "before checkpoint_id")
    if id_cond:
        flt["checkpoint_id"] = id_cond
    if query.filter:
        flt["$and"] = [
            {"filter_doc": {"$elemMatch": filter_entry(key, value)}}
            for key, value in query.filter.items()
        ]
    if query.thread_id is not None and query.checkpoint_ns is not None:
        sort = [("checkpoint_id", -1)]
    elif query.thread_id is not None:
        sort = [("checkpoint_id", -1), ("checkpoint_ns", -1)]
    else:
        sort = [("checkpoint_id", -1), ("thread_id", -1), ("checkpoint_ns", -1)]
    return flt, sort


def _settled(head: Doc, warm_before: float) -> bool:
    """History demotion found nothing to move in this head for cutoffs up to
    ``settled_until`` (None: any), and the head has not moved on since."""
    if head.get("settled_head") is None or head.get("settled_head") != head.get("head_id"):
        return False
    until = head.get("settled_until")
    return until is None or warm_before <= float(until)


def _after(last: Doc, sort: Sequence[tuple[str, int]]) -> Doc:
    """Keyset condition: strictly after ``last`` in ``sort`` order."""
    branches: list[Doc] = []
    for i, (field, direction) in enumerate(sort):
        branch: Doc = {f: last[f] for f, _ in sort[:i]}
        branch[field] = {"$lt" if direction < 0 else "$gt": last[field]}
        branches.append(branch)
    return branches[0] if len(branches) == 1 else {"$or": branches}


def _backoff_delay(attempt: int, jitter: float) -> float:
    """Seconds to wait before compare-and-set attempt ``attempt`` (``jitter`` in [0, 1)).

    The first misses retry at once (the winner has already moved on); after that a
    growing, jittered pause keeps a crowd of writers on one thread from retrying in
    lockstep.
    """
    if attempt < 3:
        return 0.0
    return jitter * min(0.05, 0.0005 * (1 << min(attempt - 3, 7)))


def _versions(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(cv["c"]), str(cv["v"])) for cv in doc.get("channel_versions") or ()]


def _duplicate_positions(exc: BulkWriteError) -> set[int] | None:
    """Positions that failed only because the key exists; None if anything else failed."""
    errors = (exc.details or {}).get("writeErrors") or []
    if any(err.get("code") != _DUPLICATE_KEY for err in errors):
        return None
    return {int(err["index"]) for err in errors}


def _file_ids(doc: Mapping[str, Any], fields: Iterable[str]) -> list[Any]:
    out = []
    for field in fields:
        value = doc.get(field)
        if isinstance(value, Mapping) and "gridfs" in value:
            out.append(value["gridfs"])
    return out


@dataclass(frozen=True, slots=True)
class _Ref:
    """A payload that lives in GridFS, as its document describes it."""

    tag: str
    file_id: Any
    sha256: str
    size: int


def _packed_write(checkpoint_id: str, write: WriteRecord) -> Doc:
    """A filter for the stored write that is this one: same task, index and bytes
    (inline, or a GridFS file with the same digest)."""
    digest = hashlib.sha256(write.payload.data).hexdigest()
    return {"checkpoint_id": checkpoint_id, "task_id": write.task_id, "idx": int(write.idx),
            "payload.tag": write.payload.tag,
            "$or": [{"payload.data": write.payload.data}, {"payload.sha256": digest}]}


def _read_payload(value: Any, where: str) -> Payload | _Ref:
    if value is None:
        return Payload("", b"")
    if not isinstance(value, Mapping) or not isinstance(value.get("tag"), str):
        raise CorruptPayload(f"{where}: malformed payload field", where=where)
    if "gridfs" in value:
        try:
            return _Ref(value["tag"], value["gridfs"], str(value["sha256"]), int(value["size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptPayload(f"{where}: malformed GridFS reference", where=where) from exc
    return Payload(value["tag"], bytes(value.get("data") or b""))


def _index_specs(migration: Migration) -> list[tuple[str, list[tuple[str, int]], str, Doc]]:
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


def _client_url(url: StoreUrl) -> str:
    """The URL PyMongo sees: tierstore's own options removed, credentials untouched."""
    parts = urlsplit(url.raw)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in _OPTIONS]
    return urlunsplit(parts._replace(query=urlencode(query)))


# -- the store ----------------------------------------------------------------------------


class MongoWarm:
    """Warm tier on one MongoDB database, with large payloads in GridFS.

    Give it a URL (it creates, owns and closes its client), or a database object
    (``client[name]``; PyMongo async, Motor or mongomock-motor), or a client plus a
    database name; objects passed in stay the caller's to close.
    """

    backend = "mongodb"
    offloads_internally = True
    """Tells ``build_stack`` not to put an object-store offloader in front: GridFS is ours."""

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
        self._state: State = "unopened"
        self._db: Any = None
        self._bucket: Any = None
        self._owned_client: Any = None

    @classmethod
    def from_url(cls, url: StoreUrl) -> MongoWarm:
        try:
            threshold = int(url.option("offload_threshold", str(DEFAULT_OFFLOAD_THRESHOLD))
                            or DEFAULT_OFFLOAD_THRESHOLD)
            grace = float(url.option("orphan_grace", str(DEFAULT_ORPHAN_GRACE))
                          or DEFAULT_ORPHAN_GRACE)
        except ValueError as exc:
            raise ConfigurationError(f"{url.masked!r}: bad option value ({exc})") from exc
        return cls(url, offload_threshold=threshold, orphan_grace=grace)

    def __repr__(self) -> str:
        target = self._url.masked if self._url is not None else f"database {self.database_name}"
        return f"MongoWarm({target!r}, {self._state})"

    @property
    def _where(self) -> str:
        return self._url.masked if self._url is not None else self.database_name

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Driver errors leave as tierstore errors (see ``_translate``).

        The driver's ``InvalidOperation`` on a store closed while the call was under way
        (its client is closed) is a ``LifecycleError``; on an open store it is not the
        store's lifecycle, and ``_translate`` decides.
        """
        try:
            yield
        except (PyMongoError, BSONError) as exc:
            if isinstance(exc, InvalidOperation) and self._state == "closed":
                raise LifecycleError(
                    f"mongodb warm tier {self._where} was closed during {what} ({exc})"
                ) from exc
            raise _translate(exc, f"mongodb {self._where}: {what}") from exc

    # -- lifecycle --------------------------------------------------------------------

    async def setup(self) -> None:
        if self._state == "opened":
            return
        with self._errors("setup"):
            if self._url is not None:
                self._owned_client = AsyncMongoClient(_client_url(self._url), appname="tierstore")
                database = self._owned_client[self.database_name]
            elif self._given_database is not None:
                database = self._given_database
            else:
                database = self._given_client[self.database_name]
            try:
                await self._migrate(database)
                self._bucket = self._bucket_factory(database, GRIDFS_BUCKET)
            except BaseException:
                await self._close_owned()
                raise
        self._db = database
        self._state = "opened"

    async def _migrate(self, database: Any) -> None:
        table = database[COLLECTIONS["migrations"]]
        done = {doc["_id"] async for doc in table.find({}, {"_id": 1})}
        for migration in migrations_for("mongo"):
            if migration.version in done:
                continue
            for collection, keys, name, options in _index_specs(migration):
                await database[collection].create_index(keys, name=name, **options)
            # another process may apply the same migration at the same time
            with suppress(DuplicateKeyError):
                await table.insert_one({"_id": migration.version, "name": migration.name,
                                        "applied_at": self._clock()})

    async def aclose(self) -> None:
        self._db = None
        self._bucket = None
        self._state = "closed"
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
        if self._state != "opened":
            raise LifecycleError(f"mongodb warm tier {self._where} is not open ({self._state})")
        return self._db[COLLECTIONS[name]]

    # -- GridFS -----------------------------------------------------------------------

    async def _upload(self, kind: str, payload: Payload) -> Doc:
        digest = hashlib.sha256(payload.data).hexdigest()
        file_id = await self._bucket.upload_from_stream(
            f"{kind}/{digest}", payload.data, metadata={"kind": kind, "sha256": digest}
        )
        return {"tag": payload.tag, "gridfs": file_id, "sha256": digest, "size": payload.size}

    async def _download(self, ref: _Ref, where: str) -> Payload:
        with self._errors(f"reading GridFS file {ref.file_id} of {where}"):
            stream = await self._bucket.open_download_stream(ref.file_id)
            data = bytes(await stream.read())
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise CorruptPayload(
                f"mongodb {self._where}: GridFS file {ref.file_id} of {where} fails its "
                "checksum", where=where,
            )
        return Payload(ref.tag, data)

    async def _delete_files(self, file_ids: Iterable[Any]) -> None:
        async def delete(file_id: Any) -> None:
            with suppress(NoFile):  # already gone: deleting is idempotent
                await self._bucket.delete(file_id)

        ids = [*file_ids]
        for start in range(0, len(ids), _PARALLEL_FILES):
            await asyncio.gather(*(delete(f) for f in ids[start:start + _PARALLEL_FILES]))

    async def _pack(self, doc: Doc, payloads: Mapping[str, tuple[str, Payload]]) -> Doc:
        """``doc`` with its payload fields filled in, offloading what must not stay inline."""
        skeleton = {**doc, **{f: {"tag": p.tag, "data": b""} for f, (_, p) in payloads.items()}}
        offload = fit_document(
            len(bson.encode(skeleton)),
            {field: payload.size for field, (_, payload) in payloads.items()},
            threshold=self.offload_threshold,
        )
        out = dict(doc)
        for field, (kind, payload) in payloads.items():
            if field in offload:
                out[field] = await self._upload(kind, payload)
            else:
                out[field] = {"tag": payload.tag, "data": payload.data, "size": payload.size}
        return out

    async def _copy_payload(self, value: Any, kind: str, where: str) -> Any:
        """A payload field for a copied document; GridFS bytes are copied, never shared."""
        payload = _read_payload(value, where)
        if isinstance(payload, Payload):
            return value
        return await self._upload(kind, await self._download(payload, where))

    # -- reads ------------------------------------------------------------------------

    async def head(self, thread_id: str, checkpoint_ns: str) -> Head | None:
        with self._errors("head"):
            doc = await self._head_doc(_text(thread_id, "thread_id"),
                                       _text(checkpoint_ns, "checkpoint_ns"))
        if doc is None:
            return None
        return Head(doc["head_id"], int(doc["version"]), int(doc.get("n_writes", 0)))

    async def _head_doc(self, thread_id: str, checkpoint_ns: str) -> Doc | None:
        doc: Doc | None = await self._c("heads").find_one(
            {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns},
            {"_id": 0, "head_id": 1, "version": 1, "n_writes": 1, "fence": 1},
        )
        return doc

    async def get(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> StoredCheckpoint | None:
        flt: Doc = {"thread_id": _text(thread_id, "thread_id"),
                    "checkpoint_ns": _text(checkpoint_ns, "checkpoint_ns")}
        if checkpoint_id is not None:
            flt["checkpoint_id"] = _text(checkpoint_id, "checkpoint_id")
        with self._errors("get"):
            # Without transactions the head's version is read before the checkpoint:
            # every change stores its data first and moves the version after, so what
            # is read next holds at least that version's state. A copy cached under it
            # is served only while the head still has that version, i.e. before any
            # later change has completed.
            for _attempt in range(3):
                before = await self._head_doc(flt["thread_id"], flt["checkpoint_ns"]) \
                    if checkpoint_id is None else None
                doc = await self._c("checkpoints").find_one(
                    flt, dict(_READ_FIELDS), sort=[("checkpoint_id", -1)]
                )
                if doc is None:
                    return None
                assembled = await self._assemble([doc])
                if assembled:
                    break
                if checkpoint_id is not None:
                    return None  # taken back between the two reads: it does not exist
            else:
                raise TierUnavailable(
                    f"the latest checkpoint of thread {thread_id!r} was taken back three "
                    "times while being read (concurrent refused writes); retry",
                    tier="warm", backend=self.backend)
            record = assembled[0]
            if before is not None and before.get("head_id") == record.checkpoint_id:
                record = replace(record, version=int(before["version"]))
        return record

    async def list(self, query: ListQuery) -> AsyncIterator[StoredCheckpoint]:
        flt, sort = _list_plan(query)
        remaining = query.limit
        last: Doc | None = None
        while remaining is None or remaining > 0:
            page = _PAGE if remaining is None else min(_PAGE, remaining)
            page_filter = flt if last is None else {"$and": [flt, _after(last, sort)]}
            with self._errors("list"):
                docs = await (
                    self._c("checkpoints").find(page_filter, dict(_READ_FIELDS))
                    .sort(sort).limit(page).to_list(None)
                )
                records = await self._assemble(docs)
            for record in records:
                yield record
            if len(docs) < page:
                return
            last = docs[-1]
            if remaining is not None:
                remaining -= len(docs)

    async def _assemble(self, docs: Sequence[Doc], *,
                        reread: bool = True) -> Sequence[StoredCheckpoint]:
        """Join blobs and writes of a page of checkpoints in a few queries, not per row.

        A live checkpoint finds a blob for every channel version it names (the rest
        are listed in ``missing``). Without transactions, an archive move can turn a
        checkpoint read as live into a stub and collect its blobs before they are
        fetched: such checkpoints (``reread``) are read once more, and a stub then
        reads from cold.
        """
        pairs: dict[tuple[str, str], set[tuple[str, str]]] = {}
        ids: dict[tuple[str, str], Ids] = {}
        for doc in docs:
            key = (doc["thread_id"], doc["checkpoint_ns"])
            if doc.get("location") != "archived":  # a stub's values live in its segment
                pairs.setdefault(key, set()).update(_versions(doc))
            ids.setdefault(key, []).append(doc["checkpoint_id"])
        blob_docs, write_docs = await asyncio.gather(
            self._fetch_blobs(pairs), self._fetch_writes(ids)
        )
        blobs: dict[tuple[str, str, str, str], Payload | _Ref] = {
            (b["thread_id"], b["checkpoint_ns"], b["channel"], b["version"]):
                _read_payload(b.get("payload"), f"blob {b['channel']!r}")
            for b in blob_docs
        }
        if reread:
            torn = [doc for doc in docs if doc.get("location") != "archived" and any(
                (doc["thread_id"], doc["checkpoint_ns"], ch, v) not in blobs
                for ch, v in _versions(doc))]
            if torn:
                keys = [{k: doc[k] for k in ("thread_id", "checkpoint_ns", "checkpoint_id")}
                        for doc in torn]
                again = {(d["thread_id"], d["checkpoint_ns"], d["checkpoint_id"]): d
                         for d in await self._c("checkpoints").find(
                             {"$or": keys}, dict(_READ_FIELDS)).to_list(None)}
                # a checkpoint gone on the second read was a put refused and taken back
                # (strict mode, a lost fence) or deleted meanwhile: it is not returned
                gone = {id(d) for d in torn
                        if (d["thread_id"], d["checkpoint_ns"], d["checkpoint_id"]) not in again}
                return await self._assemble([
                    again.get((d["thread_id"], d["checkpoint_ns"], d["checkpoint_id"]), d)
                    for d in docs if id(d) not in gone], reread=False)
        writes: dict[tuple[str, str, str], Docs] = {}
        for w in write_docs:
            writes.setdefault((w["thread_id"], w["checkpoint_ns"], w["checkpoint_id"]),
                              []).append(w)

        refs: dict[Any, tuple[_Ref, str]] = {}

        def note(value: Payload | _Ref, where: str) -> Payload | _Ref:
            if isinstance(value, _Ref):
                refs.setdefault(value.file_id, (value, where))
            return value

        staged = []
        for doc in docs:
            t, ns, cid = doc["thread_id"], doc["checkpoint_ns"], doc["checkpoint_id"]
            where = f"thread {t!r} checkpoint {cid!r}"
            checkpoint = note(_read_payload(doc.get("checkpoint"), where), where)
            metadata = note(_read_payload(doc.get("metadata"), where), where)
            missing = tuple(sorted(ch for ch, v in _versions(doc)
                                   if (t, ns, ch, v) not in blobs)) \
                if doc.get("location") != "archived" else ()
            channel_values = {
                channel: note(blobs[(t, ns, channel, version)], f"{where} channel {channel!r}")
                for channel, version in _versions(doc)
                if doc.get("location") != "archived" and (t, ns, channel, version) in blobs
            }
            pending = sorted(writes.get((t, ns, cid), ()),
                             key=lambda w: (w.get("task_path", ""), w["task_id"], w["idx"]))
            staged.append((doc, checkpoint, metadata, channel_values, missing, [
                (w, note(_read_payload(w.get("payload"), f"{where} write"), f"{where} write"))
                for w in pending
            ]))

        fetched = await self._download_all(refs)

        def real(value: Payload | _Ref) -> Payload:
            return fetched[value.file_id] if isinstance(value, _Ref) else value

        return [
            StoredCheckpoint(
                thread_id=doc["thread_id"],
                checkpoint_ns=doc["checkpoint_ns"],
                checkpoint_id=doc["checkpoint_id"],
                parent_id=doc.get("parent_id"),
                checkpoint=real(checkpoint),
                metadata=real(metadata),
                blobs={channel: real(value) for channel, value in channel_values.items()},
                writes=tuple(
                    WriteRecord(w["task_id"], int(w["idx"]), w["channel"], real(value),
                                w.get("task_path", ""))
                    for w, value in pending_writes
                ),
                location=doc.get("location") or "warm",
                archive_key=doc.get("archive_key"),
                missing=missing,
            )
            for doc, checkpoint, metadata, channel_values, missing, pending_writes in staged
        ]

    async def _download_all(self, refs: Mapping[Any, tuple[_Ref, str]]) -> dict[Any, Payload]:
        gate = asyncio.Semaphore(_PARALLEL_FILES)

        async def one(ref: _Ref, where: str) -> Payload:
            async with gate:
                return await self._download(ref, where)

        items = list(refs.items())
        values = await asyncio.gather(*(one(ref, where) for _, (ref, where) in items))
        return {file_id: value for (file_id, _), value in zip(items, values, strict=True)}

    async def _fetch_blobs(
        self, pairs: Mapping[tuple[str, str], set[tuple[str, str]]]
    ) -> Docs:
        queries = []
        for (t, ns), wanted in pairs.items():
            ordered = sorted(wanted)
            for start in range(0, len(ordered), _OR_CHUNK):
                branches = [{"channel": c, "version": v}
                            for c, v in ordered[start:start + _OR_CHUNK]]
                queries.append({"thread_id": t, "checkpoint_ns": ns, "$or": branches})
        results = await asyncio.gather(*(
            self._c("blobs").find(q, {"_id": 0, "seen_at": 0}).to_list(None) for q in queries
        ))
        return [doc for docs in results for doc in docs]

    async def _fetch_writes(self, ids: Mapping[tuple[str, str], Sequence[str]]) -> Docs:
        results = await asyncio.gather(*(
            self._c("writes").find(
                {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": {"$in": cids}},
                {"_id": 0},
            ).to_list(None)
            for (t, ns), cids in ids.items()
        ))
        return [doc for docs in results for doc in docs]

    # -- writes -----------------------------------------------------------------------

    async def next_fence(self, thread_id: str) -> int:
        t = _text(thread_id, "thread_id")
        with self._errors("next_fence"):
            for attempt in range(2):
                try:
                    doc = await self._c("fences").find_one_and_update(
                        {"_id": fence_key(t)}, {"$inc": {"fence": 1}}, upsert=True,
                        return_document=ReturnDocument.AFTER,
                    )
                    break
                except DuplicateKeyError:  # two first upserts raced; the retry increments
                    if attempt:
                        raise
            token = int(doc["fence"])
            await self._c("heads").update_many({"thread_id": t}, {"$max": {"fence": token}})
            return token

    async def _check_fence(self, t: str, token: int | None, fence: Any = None) -> None:
        """Raise ``LeaseLost`` if ``token`` is older than the thread's fence (or ``fence``)."""
        if token is None:
            return
        if fence is None:
            doc = await self._c("fences").find_one({"_id": fence_key(t)}, {"fence": 1})
            fence = doc["fence"] if doc is not None else None
        if fenced_out(None if fence is None else int(fence), token):
            raise LeaseLost.superseded(t, token, int(fence))

    async def put_checkpoint(
        self,
        record: CheckpointRecord,
        blobs: Sequence[BlobRecord],
        *,
        strict: bool,
        fence: int | None = None,
    ) -> PutResult:
        t = _text(record.thread_id, "thread_id")
        ns = _text(record.checkpoint_ns, "checkpoint_ns")
        cid = _text(record.checkpoint_id, "checkpoint_id")
        parent = None if record.parent_id is None else _text(record.parent_id, "parent_id")
        with self._errors("put_checkpoint"):
            await self._check_fence(t, fence)
            current = await self._head_doc(t, ns) if strict else None
            if strict:
                current = await self._settle_conflict(t, ns, parent, current)
            now = self._clock()
            await self._check_blobs(t, ns, record, blobs, now)
            token = uuid.uuid4().hex
            blob_docs = await asyncio.gather(*(self._blob_doc(t, ns, b, now) for b in blobs))
            doc = await self._pack(
                {
                    "thread_id": t,
                    "checkpoint_ns": ns,
                    "checkpoint_id": cid,
                    "parent_id": parent,
                    "run_id": record.run_id,
                    "channel_versions": [{"c": _text(c, "channel"), "v": _text(v, "version")}
                                         for c, v in record.channel_versions.items()],
                    "filter_doc": [filter_entry(k, v) for k, v in record.filter_doc.items()
                                   if _is_scalar(v)],
                    "location": "warm",
                    "archive_key": None,
                    "created_at": now,
                    "size_bytes": record.checkpoint.size + record.metadata.size,
                    "token": token,
                },
                {"checkpoint": ("checkpoint", record.checkpoint),
                 "metadata": ("metadata", record.metadata)},
            )
            # From the first insert on, the steps run to the end even if the caller is
            # cancelled (LangGraph cancels a run's pending writes when one fails): a
            # checkpoint stored without its head step or its undo would be a silent fork.
            key = {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": cid}

            async def store_and_move() -> PutResult:
                with self._errors("put_checkpoint"):
                    new_blobs = await self._insert_blobs(blob_docs, now)
                    previous = await self._replace("checkpoints", key, doc)
                    try:
                        result = await self._move_head(t, ns, cid, parent, strict=strict,
                                                       current=current, now=now, fence=fence)
                    except (VersionConflict, LeaseLost):
                        await self._undo_put(key, token, previous, doc, new_blobs)
                        raise
                    if previous is not None:
                        await self._delete_files(_file_ids(previous, ("checkpoint", "metadata")))
                    return result

            return await _shielded(store_and_move())

    async def _check_blobs(self, t: str, ns: str, record: CheckpointRecord,
                           blobs: Sequence[BlobRecord], now: float) -> None:
        """Before anything is stored: every channel version the record names that is
        not among its new blobs must be in warm, or ``MissingBlobs`` (nothing written).

        An archive move collects blobs only archived checkpoints name; a writer that
        read the parent before the move would otherwise store a child naming them.
        The named blobs' ``seen_at`` is refreshed first and they are looked up after,
        so a blob found here is inside the collector's grace until the head moves
        (the collector deletes only blobs last seen before ``now - orphan_grace``).
        Empty channels have blob documents too, so a document is the whole test.
        """
        new = {(b.channel, b.version) for b in blobs}
        wanted = sorted((_text(c, "channel"), _text(v, "version"))
                        for c, v in record.channel_versions.items() if (c, v) not in new)
        if not wanted:
            return
        found: set[tuple[str, str]] = set()
        for start in range(0, len(wanted), _OR_CHUNK):
            chunk = wanted[start:start + _OR_CHUNK]
            query = {"thread_id": t, "checkpoint_ns": ns,
                     "$or": [{"channel": c, "version": v} for c, v in chunk]}
            await self._c("blobs").update_many(query, {"$max": {"seen_at": now}})
            async for doc in self._c("blobs").find(query, {"_id": 0, "channel": 1,
                                                           "version": 1}):
                found.add((doc["channel"], doc["version"]))
        missing = [pair for pair in wanted if pair not in found]
        if missing:
            raise MissingBlobs.of(t, ns, missing)

    async def _blob_doc(self, t: str, ns: str, blob: BlobRecord, now: float) -> Doc:
        return await self._pack(
            {"_id": bson.ObjectId(), "thread_id": t, "checkpoint_ns": ns,
             "channel": _text(blob.channel, "channel"), "version": _text(blob.version, "version"),
             "seen_at": now},
            {"payload": ("blob", blob.payload)},
        )

    async def _insert_blobs(self, docs: Sequence[Doc], now: float) -> Docs:
        """Insert blobs once per key; returns the documents this call created.

        A blob that already exists keeps its bytes; it is re-inserted by upsert only
        if it was collected in between, and its ``seen_at`` is refreshed so that the
        orphan collector leaves it alone while the checkpoint naming it is written.
        """
        if not docs:
            return []
        try:
            await self._c("blobs").insert_many(list(docs), ordered=False)
            return [*docs]
        except BulkWriteError as exc:
            duplicates = _duplicate_positions(exc)
            if duplicates is None:
                raise
        created = [d for i, d in enumerate(docs) if i not in duplicates]
        unused: FileIds = []
        for i in sorted(duplicates):
            doc = docs[i]
            result = await self._c("blobs").update_one(
                {"thread_id": doc["thread_id"], "checkpoint_ns": doc["checkpoint_ns"],
                 "channel": doc["channel"], "version": doc["version"]},
                {"$setOnInsert": {"payload": doc["payload"]}, "$max": {"seen_at": now}},
                upsert=True,
            )
            if result.upserted_id is not None:
                created.append({**doc, "_id": result.upserted_id})
            else:
                unused.extend(_file_ids(doc, ("payload",)))
        await self._delete_files(unused)
        return created

    async def _replace(self, collection: str, key: Doc, doc: Doc) -> Doc | None:
        """Insert-or-replace by key; returns the replaced document (its files are the caller's)."""
        coll = self._c(collection)
        for attempt in range(2):
            try:
                previous: Doc | None = await coll.find_one_and_replace(
                    key, doc, upsert=True, return_document=ReturnDocument.BEFORE
                )
                return previous
            except DuplicateKeyError:
                if attempt:  # two upserts raced on the unique key; the retry replaces
                    raise
        return None  # pragma: no cover - the loop returns or raises

    async def _move_head(
        self, t: str, ns: str, cid: str, parent: str | None, *, strict: bool,
        current: Doc | None, now: float, fence: int | None = None,
    ) -> PutResult:
        """The head compare-and-set: retried on a miss, never a blind write."""
        heads = self._c("heads")
        key = {"thread_id": t, "checkpoint_ns": ns}
        fresh = current is not None
        for attempt in range(_CAS_ATTEMPTS):
            if not fresh:
                await asyncio.sleep(_backoff_delay(attempt, random.random()))
                current = await self._head_doc(t, ns)
            fresh = False
            if current is not None and "fence" in current:
                # the put read the fence document already; a takeover since then raised
                # this head's fence (next_fence), so the head's own value is enough here
                await self._check_fence(t, fence, current["fence"])
            head_id = current["head_id"] if current is not None else None
            if strict and head_id != parent:
                if head_id == cid and current is not None:
                    # a concurrent repair already made this checkpoint the head
                    return PutResult(Head(cid, int(current["version"]),
                                          int(current.get("n_writes", 0))), False)
                settled = await self._settle_conflict(t, ns, parent, current)
                fresh = True
                current = settled
                continue
            # a new head document starts where no earlier one's versions reached
            version = int(current["version"]) if current is not None else first_version(now) - 1
            step = _advance_head(head_id, version, cid, parent)
            if current is None:
                created = {**key, "head_id": step.head_id, "version": step.version,
                           "n_writes": 0, "conflicts": int(step.conflict), "updated_at": now}
                if fence is not None:
                    created["fence"] = fence
                try:
                    await heads.insert_one(created)
                except DuplicateKeyError:
                    continue
                if fence is not None:
                    try:
                        await self._check_fence(t, fence)
                    except LeaseLost:
                        # A newer lease was issued while this namespace got its first head.
                        # Its next_fence may already have raised this head's fence, so the
                        # head is matched by what this call wrote, not by its token.
                        await heads.delete_one({**key, "head_id": step.head_id,
                                                "version": step.version})
                        raise
            else:
                changes: Doc = {"head_id": step.head_id, "version": step.version,
                                "updated_at": now}
                if step.moved:
                    changes["n_writes"] = 0
                update: Doc = {"$set": changes}
                if step.conflict:
                    update["$inc"] = {"conflicts": 1}
                expected: Doc = {**key, "version": version, "head_id": head_id}
                if fence is not None:
                    update["$max"] = {"fence": fence}
                    expected["$or"] = [{"fence": {"$exists": False}}, {"fence": {"$lte": fence}}]
                result = await heads.update_one(expected, update)
                if result.matched_count == 0:
                    continue
            n_writes = (await self._settle_writes(t, ns, cid) if step.moved
                        else int(current.get("n_writes", 0)) if current is not None else 0)
            return PutResult(Head(step.head_id, step.version, n_writes), step.conflict)
        raise TierUnavailable(
            f"mongodb {self._where}: the head of thread {t!r} ns {ns!r} changed "
            f"{_CAS_ATTEMPTS} times in a row; giving up", tier="warm", backend="mongodb",
        )

    async def _settle_conflict(
        self, t: str, ns: str, parent: str | None, current: Doc | None
    ) -> Doc | None:
        """Raise VersionConflict unless the head is ``parent``; repair a dangling head first.

        A head can name a checkpoint that no longer exists only after a crash or an
        undone strict write met a concurrent repair; recomputing it once keeps strict
        writers from conflicting with a checkpoint nobody can read.
        """
        head_id = current["head_id"] if current is not None else None
        if head_id == parent:
            return current
        if head_id is not None and not await self._c("checkpoints").count_documents(
            {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": head_id}, limit=1
        ):
            await self._refresh_head(t, ns)
            current = await self._head_doc(t, ns)
            head_id = current["head_id"] if current is not None else None
            if head_id == parent:
                return current
        version = int(current["version"]) if current is not None else 0
        raise VersionConflict(
            f"thread {t!r} ns {ns!r}: parent {parent!r} is not the head {head_id!r} "
            f"(version {version})",
            thread_id=t, checkpoint_ns=ns, head_id=head_id, version=version,
        )

    async def _undo_put(
        self, key: Doc, token: str, previous: Doc | None, doc: Doc, new_blobs: Sequence[Doc]
    ) -> None:
        """Take back a strict write that lost the race, touching only what it wrote."""
        checkpoints = self._c("checkpoints")
        if previous is None:
            removed = await checkpoints.delete_one({**key, "token": token})
            undone = removed.deleted_count > 0
        else:
            restored = await checkpoints.replace_one({**key, "token": token}, previous)
            undone = restored.matched_count > 0
        if new_blobs:
            await self._c("blobs").delete_many({"_id": {"$in": [b["_id"] for b in new_blobs]}})
        files = [f for b in new_blobs for f in _file_ids(b, ("payload",))]
        if undone:
            files.extend(_file_ids(doc, ("checkpoint", "metadata")))
        await self._delete_files(files)

    async def _settle_writes(self, t: str, ns: str, cid: str) -> int:
        """Count the writes of ``cid`` and raise the head's n_writes to it if ``cid`` is head.

        ``$max`` makes racing writers agree: a count taken earlier can never lower one
        taken later, and a head that moved on is not touched.
        """
        n: int = await self._c("writes").count_documents(
            {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": cid}
        )
        if n:
            await self._c("heads").update_one(
                {"thread_id": t, "checkpoint_ns": ns, "head_id": cid}, {"$max": {"n_writes": n}}
            )
        return n

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[WriteRecord],
        *,
        fence: int | None = None,
    ) -> int | None:
        if not writes:
            return None
        t = _text(thread_id, "thread_id")
        ns = _text(checkpoint_ns, "checkpoint_ns")
        cid = _text(checkpoint_id, "checkpoint_id")
        with self._errors("put_writes"):
            await self._check_fence(t, fence)
            await self._insert_writes(t, ns, cid, writes, replace_special=True)
            # the writes are stored first, then the head's count and version move in one
            # update; every call moves the version (a replaced write keeps the count).
            # A put making cid the head moves the head either after this store (and
            # counts the write) or before this update (which then moves the version), so
            # a reader (version first, content second) never pairs a version with older
            # content. What remains without transactions: a
            # call cut off between the two steps leaves its write uncounted until the
            # head's next change, and a copy made before it matches until then.
            n: int = await self._c("writes").count_documents(
                {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": cid}
            )
            head = await self._c("heads").find_one_and_update(
                {"thread_id": t, "checkpoint_ns": ns, "head_id": cid},
                {"$max": {"n_writes": n}, "$inc": {"version": 1}},
                projection={"_id": 0, "version": 1},
                return_document=ReturnDocument.AFTER,
            )
        return None if head is None else int(head["version"])

    async def _insert_writes(
        self, t: str, ns: str, cid: str, writes: Sequence[WriteRecord], *,
        replace_special: bool,
    ) -> None:
        """The first write per (task_id, idx) stays; special ones (idx < 0) may replace it."""
        docs = await asyncio.gather(*(
            self._pack(
                {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": cid,
                 "task_id": _text(w.task_id, "task_id"), "idx": int(w.idx),
                 "channel": _text(w.channel, "channel"),
                 "task_path": _text(w.task_path, "task_path")},
                {"payload": ("write", w.payload)},
            )
            for w in writes
        ))
        kept = [d for d in docs if d["idx"] >= 0 or not replace_special]
        unused: FileIds = []
        if kept:
            try:
                await self._c("writes").insert_many(kept, ordered=False)
            except BulkWriteError as exc:
                duplicates = _duplicate_positions(exc)
                if duplicates is None:
                    raise
                for i in duplicates:
                    unused.extend(_file_ids(kept[i], ("payload",)))
        for doc in (d for d in docs if d["idx"] < 0 and replace_special):
            key = {k: doc[k] for k in ("thread_id", "checkpoint_ns", "checkpoint_id",
                                       "task_id", "idx")}
            previous = await self._replace("writes", key, doc)
            if previous is not None:
                unused.extend(_file_ids(previous, ("payload",)))
        await self._delete_files(unused)

    # -- maintenance ------------------------------------------------------------------

    async def _files_of(self, collection: str, flt: Doc) -> FileIds:
        fields = ("checkpoint", "metadata") if collection == "checkpoints" else ("payload",)
        query = {**flt, "$or": [{f"{f}.gridfs": {"$exists": True}} for f in fields]}
        projection = {"_id": 0, **{f"{f}.gridfs": 1 for f in fields}}
        docs = await self._c(collection).find(query, projection).to_list(None)
        return [file_id for doc in docs for file_id in _file_ids(doc, fields)]

    async def delete_thread(self, thread_id: str) -> None:
        t = _text(thread_id, "thread_id")
        with self._errors("delete_thread"):
            files: FileIds = []
            for collection in ("checkpoints", "writes", "blobs"):
                files.extend(await self._files_of(collection, {"thread_id": t}))
            for collection in ("checkpoints", "writes", "blobs", "heads"):
                await self._c(collection).delete_many({"thread_id": t})
            await self._delete_files(files)

    async def _delete_checkpoints(self, t: str, ns: str, id_cond: Any) -> int:
        """Delete some checkpoints of one (thread, ns) and their writes; fix the head."""
        flt = {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": id_cond}
        files = await self._files_of("checkpoints", flt) + await self._files_of("writes", flt)
        named: set[tuple[str, str]] = set()
        async for doc in self._c("checkpoints").find(flt, {"_id": 0, "channel_versions": 1}):
            named.update(_versions(doc))
        deleted = await self._c("checkpoints").delete_many(flt)
        await self._c("writes").delete_many(flt)
        await self._delete_files(files)
        if deleted.deleted_count:
            await self._refresh_head(t, ns)
            await self._collect_blobs(t, ns, deleted=named)
        return int(deleted.deleted_count)

    async def delete_for_runs(self, run_ids: Sequence[str]) -> Sequence[str]:
        ids = [_text(r, "run_id") for r in run_ids]
        if not ids:
            return []
        with self._errors("delete_for_runs"):
            docs = await self._c("checkpoints").find(
                {"run_id": {"$in": ids}},
                {"_id": 0, "thread_id": 1, "checkpoint_ns": 1, "checkpoint_id": 1},
            ).to_list(None)
            groups: dict[tuple[str, str], Ids] = {}
            for doc in docs:
                groups.setdefault((doc["thread_id"], doc["checkpoint_ns"]), []).append(
                    doc["checkpoint_id"])
            for (t, ns), cids in groups.items():
                await self._delete_checkpoints(t, ns, {"$in": cids})
        return sorted({t for t, _ in groups})

    async def prune(self, thread_ids: Sequence[str], *, keep_latest: bool) -> None:
        threads = [_text(t, "thread_id") for t in thread_ids]
        if not keep_latest:
            for t in threads:
                await self.delete_thread(t)
            return
        with self._errors("prune"):
            checkpoints = self._c("checkpoints")
            for t in threads:
                for ns in await checkpoints.distinct("checkpoint_ns", {"thread_id": t}):
                    latest = await checkpoints.find_one(
                        {"thread_id": t, "checkpoint_ns": ns},
                        {"_id": 0, "checkpoint_id": 1}, sort=[("checkpoint_id", -1)],
                    )
                    if latest is not None:
                        await self._delete_checkpoints(t, ns, {"$lt": latest["checkpoint_id"]})

    async def _refresh_head(self, t: str, ns: str) -> None:
        """Point the head at the greatest remaining checkpoint (or drop it); version +1."""
        heads = self._c("heads")
        key = {"thread_id": t, "checkpoint_ns": ns}
        for attempt in range(_CAS_ATTEMPTS):
            await asyncio.sleep(_backoff_delay(attempt, random.random()))
            current = await self._head_doc(t, ns)
            latest = await self._c("checkpoints").find_one(
                key, {"_id": 0, "checkpoint_id": 1}, sort=[("checkpoint_id", -1)]
            )
            if latest is None:
                if current is None:
                    return
                gone = await heads.delete_one({**key, "version": current["version"]})
                if gone.deleted_count:
                    return
                continue
            cid = latest["checkpoint_id"]
            n = await self._c("writes").count_documents({**key, "checkpoint_id": cid})
            if current is None:
                try:
                    now = self._clock()
                    await heads.insert_one({**key, "head_id": cid, "version": first_version(now),
                                            "n_writes": n, "conflicts": 0, "updated_at": now})
                except DuplicateKeyError:
                    continue
            else:
                # at least the clock: above the hot tier's tombstone taken before
                now = self._clock()
                version = max(int(current["version"]) + 1, first_version(now))
                result = await heads.update_one(
                    {**key, "version": current["version"], "head_id": current["head_id"]},
                    {"$set": {"head_id": cid, "n_writes": n, "updated_at": now,
                              "version": version}},
                )
                if result.matched_count == 0:
                    continue
            await self._settle_writes(t, ns, cid)
            return
        raise TierUnavailable(
            f"mongodb {self._where}: the head of thread {t!r} ns {ns!r} kept changing",
            tier="warm", backend="mongodb",
        )

    async def _collect_blobs(self, t: str, ns: str,
                             deleted: Iterable[tuple[str, str]] = ()) -> None:
        """Delete blobs of (t, ns) that no live checkpoint names and that are past the grace.

        Blobs named by ``deleted`` (the channel versions of checkpoints just deleted)
        go at once, grace or not: deleting a run must remove its values now, and the
        grace only protects blobs of a put in flight, whose versions a deleted
        checkpoint does not name (versions grow along a thread).
        """
        cutoff = self._clock() - self.orphan_grace
        key = {"thread_id": t, "checkpoint_ns": ns}
        live: set[tuple[str, str]] = set()
        async for doc in self._c("checkpoints").find(
            {**key, "location": {"$ne": "archived"}}, {"_id": 0, "channel_versions": 1}
        ):
            live.update(_versions(doc))
        projection = {"_id": 1, "channel": 1, "version": 1, "payload.gridfs": 1}
        candidates = await self._c("blobs").find(
            {**key, "seen_at": {"$lt": cutoff}}, projection).to_list(None)
        doomed = [d for d in candidates if (d["channel"], d["version"]) not in live]
        if doomed:
            await self._c("blobs").delete_many(
                {"_id": {"$in": [d["_id"] for d in doomed]}, "seen_at": {"$lt": cutoff}}
            )
        now_doomed = sorted(set(deleted) - live)
        if now_doomed:
            pairs = [{"channel": c, "version": v} for c, v in now_doomed]
            exact = await self._c("blobs").find({**key, "$or": pairs}, projection).to_list(None)
            await self._c("blobs").delete_many({"_id": {"$in": [d["_id"] for d in exact]}})
            doomed.extend(exact)
        if not doomed:
            return
        files = [f for d in doomed for f in _file_ids(d, ("payload",))]
        if files:  # a blob re-offered meanwhile survived the delete and keeps its file
            survivors = await self._c("blobs").find(
                {"payload.gridfs": {"$in": files}}, {"_id": 0, "payload.gridfs": 1}
            ).to_list(None)
            kept = {f for s in survivors for f in _file_ids(s, ("payload",))}
            await self._delete_files(f for f in files if f not in kept)

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        src = _text(source_thread_id, "thread_id")
        dst = _text(target_thread_id, "thread_id")
        if src == dst:
            return
        with self._errors("copy_thread"):
            now = self._clock()
            # blobs, then writes, then checkpoints: a copied checkpoint is readable whole
            async for doc in self._c("blobs").find({"thread_id": src}, {"_id": 0}):
                where = f"blob {doc['channel']!r} of thread {src!r}"
                payload = await self._copy_payload(doc.get("payload"), "blob", where)
                await self._insert_blobs([{**doc, "_id": bson.ObjectId(), "thread_id": dst,
                                           "payload": payload, "seen_at": now}], now)
            async for doc in self._c("writes").find({"thread_id": src}, {"_id": 0}):
                where = f"write of thread {src!r}"
                copy = {**doc, "thread_id": dst,
                        "payload": await self._copy_payload(doc.get("payload"), "write", where)}
                key = {k: copy[k] for k in ("thread_id", "checkpoint_ns", "checkpoint_id",
                                            "task_id", "idx")}
                previous = await self._replace("writes", key, copy)
                if previous is not None:
                    await self._delete_files(_file_ids(previous, ("payload",)))
            namespaces: set[str] = set()
            async for doc in self._c("checkpoints").find({"thread_id": src}, {"_id": 0}):
                where = f"checkpoint {doc['checkpoint_id']!r} of thread {src!r}"
                copy = {**doc, "thread_id": dst, "token": uuid.uuid4().hex}
                for field in ("checkpoint", "metadata"):
                    if field in doc:
                        copy[field] = await self._copy_payload(doc[field], field, where)
                key = {"thread_id": dst, "checkpoint_ns": doc["checkpoint_ns"],
                       "checkpoint_id": doc["checkpoint_id"]}
                previous = await self._replace("checkpoints", key, copy)
                if previous is not None:
                    await self._delete_files(_file_ids(previous, ("checkpoint", "metadata")))
                namespaces.add(doc["checkpoint_ns"])
            for ns in sorted(namespaces):
                await self._refresh_head(dst, ns)

    async def publish_thread(self, source_thread_id: str, target_thread_id: str, *,
                             replace: bool) -> None:
        """MongoDB has no transaction here: check, copy, and check again.

        A target with checkpoints is refused before the copy; one that gained
        checkpoints while the copy ran (the application wrote it meanwhile) gets the
        copied checkpoints taken out again and the import refused, so its own
        checkpoints are never mixed with imported ones. With ``replace`` the old
        target is deleted right before the copy: a crash in between leaves the
        thread missing (the staged copy stays under its staging id).
        """
        src = _text(source_thread_id, "thread_id")
        dst = _text(target_thread_id, "thread_id")
        refusal = (f"thread {dst[:200]!r} already exists; import it under another id "
                   "(--as-thread) or replace it (--replace)")
        with self._errors("publish_thread"):
            taken = await self._c("checkpoints").find_one({"thread_id": dst}, {"_id": 1})
        if taken is not None and not replace:
            raise InvalidInput(refusal)
        if replace:
            await self.delete_thread(dst)
        with self._errors("publish_thread"):
            ours = {(d["checkpoint_ns"], d["checkpoint_id"]) async for d in
                    self._c("checkpoints").find({"thread_id": src},
                                                {"_id": 0, "checkpoint_ns": 1,
                                                 "checkpoint_id": 1})}
        await self.copy_thread(src, dst)
        with self._errors("publish_thread"):
            found = {(d["checkpoint_ns"], d["checkpoint_id"]) async for d in
                     self._c("checkpoints").find({"thread_id": dst},
                                                 {"_id": 0, "checkpoint_ns": 1,
                                                  "checkpoint_id": 1})}
            if found - ours:
                by_ns: dict[str, list[str]] = {}
                for ns, cid in ours:
                    by_ns.setdefault(ns, []).append(cid)
                for ns, cids in by_ns.items():
                    await self._delete_checkpoints(dst, ns, {"$in": cids})
        if found - ours:
            raise InvalidInput(refusal)

    # -- tiering: leases, stubs, rehydration (used by tierstore.jobs) -------------------

    async def claim(
        self,
        *,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        warm_before: float | None = None,
        idle_before: float | None = None,
        require_live: bool = True,
        thread_id: str | None = None,
    ) -> Sequence[Claim]:
        """Lease heads with a filtered update: a lease is taken only while it is free."""
        free: Doc = {"$or": [{"lease_until": None}, {"lease_until": {"$lt": now}}]}
        flt: Doc = dict(free)
        if thread_id is not None:
            flt["thread_id"] = _text(thread_id, "thread_id")
        if idle_before is not None:
            flt["updated_at"] = {"$lt": idle_before}
        sort = [("updated_at", 1), ("thread_id", 1), ("checkpoint_ns", 1)]
        projection = {"_id": 1, "thread_id": 1, "checkpoint_ns": 1, "head_id": 1,
                      "updated_at": 1, "settled_head": 1, "settled_until": 1, "version": 1}
        claimed: builtins.list[Claim] = []
        last: Doc | None = None
        with self._errors("claim"):
            heads = self._c("heads")
            while len(claimed) < limit:
                page_filter = flt if last is None else {"$and": [flt, _after(last, sort)]}
                page = await heads.find(page_filter, projection).sort(sort).limit(
                    _PAGE).to_list(None)
                for head in page:
                    if not await self._claimable(head, warm_before, idle_before, require_live):
                        continue
                    taken = await heads.update_one(
                        {"_id": head["_id"], **free},
                        {"$set": {"lease_owner": owner, "lease_until": now + lease_seconds}},
                    )
                    if taken.modified_count:
                        claimed.append(Claim(head["thread_id"], head["checkpoint_ns"],
                                             head["head_id"], float(head["updated_at"]),
                                             int(head.get("version", 0))))
                        if len(claimed) >= limit:
                            break
                if len(page) < _PAGE:
                    break
                last = page[-1]
        return claimed

    async def expire_thread(
        self,
        thread_id: str,
        heads: Sequence[Claim],
        *,
        owner: str,
        now: float,
        keep_latest: bool,
    ) -> bool:
        """Compared right before the delete, not in one transaction with it (the store
        uses none): a put landing in between those two calls is the remaining window."""
        t = _text(thread_id, "thread_id")
        expected = {(c.checkpoint_ns, c.head_id, c.version) for c in heads
                    if c.thread_id == thread_id}
        with self._errors("expire_thread"):
            current = await self._c("heads").find(
                {"thread_id": t},
                {"_id": 0, "checkpoint_ns": 1, "head_id": 1, "version": 1, "lease_owner": 1,
                 "lease_until": 1},
            ).to_list(None)
        if not current or any(d.get("lease_owner") != owner or d.get("lease_until") is None
                               or d["lease_until"] < now for d in current):
            return False
        if {(d["checkpoint_ns"], d["head_id"], int(d.get("version", 0)))
                for d in current} != expected:
            return False
        if keep_latest:
            await self.prune([thread_id], keep_latest=True)
        else:
            await self.delete_thread(thread_id)
        return True

    async def _claimable(
        self, head: Doc, warm_before: float | None, idle_before: float | None,
        require_live: bool,
    ) -> bool:
        key = {"thread_id": head["thread_id"], "checkpoint_ns": head["checkpoint_ns"],
               "location": "warm"}
        checkpoints = self._c("checkpoints")
        if warm_before is not None and _settled(head, warm_before):
            return False
        if warm_before is not None and not await checkpoints.count_documents(
            {**key, "checkpoint_id": {"$ne": head["head_id"]},
             "created_at": {"$lt": warm_before}}, limit=1,
        ):
            return False
        return not (idle_before is not None and require_live
                    and not await checkpoints.count_documents(key, limit=1))

    async def release(
        self,
        thread_id: str,
        checkpoint_ns: str,
        *,
        owner: str,
        settled_head: str | None = None,
        settled_until: float | None = None,
    ) -> None:
        with self._errors("release"):
            await self._c("heads").update_one(
                {"thread_id": _text(thread_id, "thread_id"),
                 "checkpoint_ns": _text(checkpoint_ns, "checkpoint_ns"),
                 "lease_owner": _text(owner, "owner")},
                {"$set": {"lease_owner": None, "lease_until": None,
                          "settled_head": settled_head, "settled_until": settled_until}},
            )

    async def release_owned(self, *, owner: str) -> int:
        with self._errors("release_owned"):
            result = await self._c("heads").update_many(
                {"lease_owner": _text(owner, "owner")},
                {"$set": {"lease_owner": None, "lease_until": None}},
            )
        return int(result.modified_count)

    async def held_claims(
        self, *, now: float, thread_id: str | None = None, exclude_owner: str | None = None
    ) -> ClaimsHeld:
        owner: Doc = {"$ne": None}
        if exclude_owner is not None:
            owner = {"$nin": [None, _text(exclude_owner, "owner")]}
        flt: Doc = {"lease_owner": owner, "lease_until": {"$gte": now}}
        if thread_id is not None:
            flt["thread_id"] = _text(thread_id, "thread_id")
        with self._errors("held_claims"):
            docs = await self._c("heads").find(flt, {"_id": 0, "lease_until": 1}).to_list(None)
        until = [float(d["lease_until"]) for d in docs]
        return ClaimsHeld(len(until), min(until, default=None), max(until, default=None))

    async def index(self, thread_id: str, checkpoint_ns: str) -> Sequence[CheckpointMeta]:
        t, ns = _text(thread_id, "thread_id"), _text(checkpoint_ns, "checkpoint_ns")
        with self._errors("index"):
            docs = await self._c("checkpoints").find(
                {"thread_id": t, "checkpoint_ns": ns},
                {"_id": 0, "checkpoint_id": 1, "parent_id": 1, "created_at": 1, "location": 1,
                 "archive_key": 1, "size_bytes": 1},
            ).sort([("checkpoint_id", -1)]).to_list(None)
        return [
            CheckpointMeta(t, ns, d["checkpoint_id"], d.get("parent_id"),
                           float(d.get("created_at") or 0.0),
                           "archived" if d.get("location") == "archived" else "warm",
                           d.get("archive_key"), int(d.get("size_bytes") or 0))
            for d in docs
        ]

    async def mark_archived(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_ids: Sequence[str],
        *,
        archive_key: str,
        owner: str,
        now: float,
        writes: Mapping[str, Sequence[WriteRecord]] | None = None,
    ) -> int:
        """Turn live checkpoints into stubs, each by one conditional update.

        The lease is checked first, but what makes two workers safe is the filter
        ``location: "warm"``: a checkpoint becomes a stub exactly once, naming the
        segment of whoever flipped it; the other segment is left for cold GC.
        Payload files, writes and (after the grace) blobs of the stubs go afterwards,
        so a crash leaves at worst a stub whose leftovers are collected later.
        """
        t, ns = _text(thread_id, "thread_id"), _text(checkpoint_ns, "checkpoint_ns")
        ids = [_text(c, "checkpoint_id") for c in checkpoint_ids]
        key = {"thread_id": t, "checkpoint_ns": ns}
        with self._errors("mark_archived"):
            held = await self._c("heads").find_one(
                {**key, "lease_owner": _text(owner, "owner"), "lease_until": {"$gte": now}},
                {"_id": 0, "head_id": 1},
            )
            if held is None or not ids:
                return 0
            live = {**key, "checkpoint_id": {"$in": ids}, "location": {"$ne": "archived"}}
            if await self._c("checkpoints").count_documents(live) != len(set(ids)):
                # some were deleted (or moved) since they were packed: all or nothing (a
                # delete landing between this count and the update is not excluded here)
                return 0
            files = [f for d in await self._c("checkpoints").find(
                live, {"_id": 0, "checkpoint.gridfs": 1}).to_list(None)
                for f in _file_ids(d, ("checkpoint",))]
            flipped = await self._c("checkpoints").update_many(
                live,
                {"$set": {"location": "archived", "archive_key": _text(archive_key, "key")},
                 "$unset": {"checkpoint": ""}},
            )
            stubs = [d["checkpoint_id"] for d in await self._c("checkpoints").find(
                {**key, "checkpoint_id": {"$in": ids}, "location": "archived"},
                {"_id": 0, "checkpoint_id": 1}).to_list(None)]
            if stubs:
                doomed: Doc = {**key, "checkpoint_id": {"$in": stubs}}
                if writes is not None:  # only what the segment holds stays out of warm
                    packed = [_packed_write(cid, w) for cid in stubs for w in writes.get(cid, ())]
                    doomed = {**key, "$or": packed} if packed else {**key, "_id": None}
                files.extend(await self._files_of("writes", doomed))
                await self._c("writes").delete_many(doomed)
                if held["head_id"] in stubs:
                    await self._c("heads").update_one(
                        {**key, "head_id": held["head_id"]}, {"$set": {"n_writes": 0}})
            if flipped.modified_count:
                # after the data moved: every cached copy of the head fails the check now
                await self._c("heads").update_one(key, {"$inc": {"version": 1}})
            await self._delete_files(files)
            await self._collect_blobs(t, ns)
        return int(flipped.modified_count)

    async def rehydrate(self, records: Sequence[StoredCheckpoint]) -> int:
        """Make stubs live again: blobs and writes first, then the stub flips back."""
        restored = 0
        with self._errors("rehydrate"):
            checkpoints = self._c("checkpoints")
            for r in records:
                t = _text(r.thread_id, "thread_id")
                ns = _text(r.checkpoint_ns, "checkpoint_ns")
                cid = _text(r.checkpoint_id, "checkpoint_id")
                key = {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": cid}
                stub = await checkpoints.find_one({**key, "location": "archived"}, {"_id": 0})
                if stub is None:
                    continue
                now = self._clock()
                versions = dict(_versions(stub))
                blob_docs = [
                    await self._blob_doc(t, ns, BlobRecord(channel, versions[channel], payload),
                                         now)
                    for channel, payload in r.blobs.items() if channel in versions
                ]
                await self._insert_blobs(blob_docs, now)
                await self._insert_writes(t, ns, cid, r.writes, replace_special=False)
                packed = await self._pack(
                    {k: v for k, v in stub.items() if k != "checkpoint"},
                    {"checkpoint": ("checkpoint", r.checkpoint)},
                )
                flipped = await checkpoints.update_one(
                    {**key, "location": "archived"},
                    {"$set": {"location": "warm", "archive_key": None,
                              "checkpoint": packed["checkpoint"]}},
                )
                if flipped.modified_count:
                    restored += 1
                    await self._settle_writes(t, ns, cid)
                    await self._c("heads").update_one(
                        {"thread_id": t, "checkpoint_ns": ns}, {"$inc": {"version": 1}})
                else:  # rehydrated by someone else meanwhile
                    await self._delete_files(_file_ids(packed, ("checkpoint",)))
        return restored

    async def archive_refs(
        self, thread_id: str | None = None, *, keys: Sequence[str] | None = None
    ) -> dict[str, int]:
        match: Doc = {"archive_key": {"$type": "string"}}
        if thread_id is not None:
            match["thread_id"] = _text(thread_id, "thread_id")
        if keys is not None:
            if not keys:
                return {}
            wanted = sorted({_text(k, "key") for k in keys})
            match["archive_key"] = {"$in": wanted}  # the archive_key index: O(keys)
        with self._errors("archive_refs"):
            rows = await self._aggregate("checkpoints", [
                {"$match": match}, {"$group": {"_id": "$archive_key", "n": {"$sum": 1}}},
            ])
        return {str(row["_id"]): int(row["n"]) for row in rows}

    async def archive_stubs(
        self, *, keys: Sequence[str] | None = None, run_ids: Sequence[str] | None = None
    ) -> dict[str, builtins.set[str]]:
        if keys is None and run_ids is None:
            raise InvalidInput("archive_stubs needs keys or run_ids")
        flt: Doc = {"archive_key": {"$type": "string"}}
        if keys is not None:
            flt["archive_key"] = {"$in": [_text(k, "key") for k in keys]}
        if run_ids is not None:
            flt["run_id"] = {"$in": [_text(r, "run_id") for r in run_ids]}
        if (keys is not None and not keys) or (run_ids is not None and not run_ids):
            return {}
        out: dict[str, builtins.set[str]] = {}
        with self._errors("archive_stubs"):
            async for doc in self._c("checkpoints").find(
                flt, {"_id": 0, "archive_key": 1, "checkpoint_id": 1},
            ):
                out.setdefault(str(doc["archive_key"]), set()).add(str(doc["checkpoint_id"]))
        return out

    async def repoint_archive(
        self, old_key: str, new_key: str, checkpoint_ids: Sequence[str]
    ) -> int:
        ids = [_text(c, "checkpoint_id") for c in checkpoint_ids]
        with self._errors("repoint_archive"):
            moved = await self._c("checkpoints").update_many(
                {"archive_key": _text(old_key, "key"), "checkpoint_id": {"$in": ids}},
                {"$set": {"archive_key": _text(new_key, "key")}},
            )
        return int(moved.modified_count)

    async def usage(self) -> TierUsage:
        with self._errors("usage"):
            threads = await self._aggregate("heads", [
                {"$group": {"_id": "$thread_id"}}, {"$group": {"_id": None, "n": {"$sum": 1}}},
            ])
            by_location = await self._aggregate("checkpoints", [
                {"$group": {"_id": "$location", "n": {"$sum": 1},
                            "bytes": {"$sum": "$size_bytes"}}},
            ])
            payload_bytes = 0
            for name in ("blobs", "writes"):
                for row in await self._aggregate(name, [
                    {"$group": {"_id": None, "bytes": {"$sum": "$payload.size"}}},
                ]):
                    payload_bytes += int(row["bytes"])
            files = await self._c("gridfs_files").count_documents({})
        counts = {row["_id"]: (int(row["n"]), int(row["bytes"])) for row in by_location}
        live = counts.get("warm", (0, 0))
        return TierUsage(
            threads=int(threads[0]["n"]) if threads else 0,
            checkpoints=live[0],
            archived=counts.get("archived", (0, 0))[0],
            bytes=live[1] + payload_bytes,
            objects=int(files),
        )

    async def _aggregate(self, collection: str, pipeline: Sequence[Doc]) -> Docs:
        """PyMongo's ``aggregate`` must be awaited for its cursor; Motor's returns it."""
        cursor = self._c(collection).aggregate(builtins.list(pipeline), allowDiskUse=True)
        if inspect.isawaitable(cursor):
            cursor = await cursor
        return [doc async for doc in cursor]

    async def sweep_gridfs(self, *, now: float | None = None) -> int:
        """Delete GridFS files older than ``orphan_grace`` that no document references.

        Only crashes leave such files (an upload whose document was never written, a
        delete that stopped before its files). Safe to run from many workers at once:
        a file is only deleted while nothing names it, and the grace keeps uploads of
        puts in flight. Returns how many files were deleted.
        """
        at = self._clock() if now is None else now
        cutoff = datetime.fromtimestamp(at - self.orphan_grace, UTC).replace(tzinfo=None)
        with self._errors("sweep_gridfs"):
            files = await self._c("gridfs_files").find(
                {"uploadDate": {"$lt": cutoff}}, {"_id": 1, "metadata.kind": 1}
            ).to_list(None)
            by_kind: dict[str, FileIds] = {}
            for f in files:
                kind = str((f.get("metadata") or {}).get("kind"))
                if kind in _FILE_OWNERS:
                    by_kind.setdefault(kind, []).append(f["_id"])
            orphans: FileIds = []
            for kind, ids in by_kind.items():
                collection, field = _FILE_OWNERS[kind]
                for start in range(0, len(ids), _OR_CHUNK):
                    chunk = ids[start:start + _OR_CHUNK]
                    used = await self._c(collection).find(
                        {f"{field}.gridfs": {"$in": chunk}}, {"_id": 0, f"{field}.gridfs": 1}
                    ).to_list(None)
                    referenced = {f for doc in used for f in _file_ids(doc, (field,))}
                    orphans.extend(i for i in chunk if i not in referenced)
            await self._delete_files(orphans)
        return len(orphans)

