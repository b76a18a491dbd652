"""The stored documents: collection names, size limits, and the pure helpers that
build filters and read payload fields. Nothing here talks to the server.

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

Ids are always values, never field names or operators: channel versions and metadata
filters are arrays of small ``{c, v}`` / ``{k, t, v}`` documents rather than
sub-documents keyed by channel or metadata key, so a key such as ``$where`` or ``a.b``
is stored and matched as plain text with no escaping. Every id is checked to be a
``str`` before it enters a filter, so a caller can never smuggle in an operator
document. A filter entry records the JSON type (``t``) next to the value, which is what
keeps ``True`` apart from ``1`` and ``"1"`` (the server would equate none of them,
but the type keeps the mock honest too); keys and strings longer than 256 bytes are
stored and matched as their SHA-256 digest, so no entry, and no index key, is ever large.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tierstore.errors import CorruptPayload, InvalidInput, PayloadTooLarge
from tierstore.records import ListQuery, Payload, Scalar

__all__ = [
    "COLLECTIONS",
    "DEFAULT_OFFLOAD_THRESHOLD",
    "DEFAULT_ORPHAN_GRACE",
    "DOCUMENT_BUDGET",
    "GRIDFS_BUCKET",
    "MAX_DOCUMENT",
    "OR_CHUNK",
    "PAGE",
    "READ_FIELDS",
    "REF_SIZE",
    "Doc",
    "Docs",
    "FileIds",
    "GridFSRef",
    "Ids",
    "filter_entry",
    "fit_document",
    "gridfs_ids",
    "is_scalar",
    "keyset_after",
    "list_plan",
    "plain",
    "read_payload",
    "versions_of",
]

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

PAGE: Final = 200
"""Documents per round trip of a paged scan (``list``, ``claim``)."""
OR_CHUNK: Final = 256
"""Most branches in one ``$or``/``$in`` filter, so no query document grows large."""
_INT64: Final = (-(2**63), 2**63 - 1)

READ_FIELDS: Final[Mapping[str, int]] = {
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


def plain(value: Any, what: str) -> str:
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


def is_scalar(value: Any) -> bool:
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


def list_plan(query: ListQuery) -> tuple[Doc, list[tuple[str, int]]]:
    """The filter and the newest-first sort of a list query (sort keys match an index)."""
    flt: Doc = {}
    if query.thread_id is not None:
        flt["thread_id"] = plain(query.thread_id, "thread_id")
    if query.checkpoint_ns is not None:
        flt["checkpoint_ns"] = plain(query.checkpoint_ns, "checkpoint_ns")
    id_cond: Doc = {}
    if query.checkpoint_id is not None:
        id_cond["$eq"] = plain(query.checkpoint_id, "checkpoint_id")
    if query.before_id is not None:
        id_cond["$lt"] = plain(query.before_id, "before checkpoint_id")
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


def keyset_after(last: Doc, sort: Sequence[tuple[str, int]]) -> Doc:
    """Keyset condition: strictly after ``last`` in ``sort`` order."""
    branches: list[Doc] = []
    for i, (field, direction) in enumerate(sort):
        branch: Doc = {f: last[f] for f, _ in sort[:i]}
        branch[field] = {"$lt" if direction < 0 else "$gt": last[field]}
        branches.append(branch)
    return branches[0] if len(branches) == 1 else {"$or": branches}


def versions_of(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(cv["c"]), str(cv["v"])) for cv in doc.get("channel_versions") or ()]


def gridfs_ids(doc: Mapping[str, Any], fields: Iterable[str]) -> list[Any]:
    out = []
    for field in fields:
        value = doc.get(field)
        if isinstance(value, Mapping) and "gridfs" in value:
            out.append(value["gridfs"])
    return out


@dataclass(frozen=True, slots=True)
class GridFSRef:
    """A payload that lives in GridFS, as its document describes it."""

    tag: str
    file_id: Any
    sha256: str
    size: int


def read_payload(value: Any, where: str) -> Payload | GridFSRef:
    if value is None:
        return Payload("", b"")
    if not isinstance(value, Mapping) or not isinstance(value.get("tag"), str):
        raise CorruptPayload(f"{where}: malformed payload field", where=where)
    if "gridfs" in value:
        try:
            return GridFSRef(value["tag"], value["gridfs"], str(value["sha256"]),
                             int(value["size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptPayload(f"{where}: malformed GridFS reference", where=where) from exc
    return Payload(value["tag"], bytes(value.get("data") or b""))
