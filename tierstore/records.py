"""The plain records that travel between the router and the tiers.

Tiers never see LangGraph objects or serde: they store and return these records,
whose payloads are already encoded (``Payload.tag`` names the codec pipeline).
That keeps every backend a dumb, testable byte store and keeps the codec in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Scalar = str | int | float | bool | None
Location = Literal["warm", "archived"]


@dataclass(frozen=True, slots=True)
class Payload:
    """Encoded bytes plus the tag of the pipeline that produced them (e.g. ``msgpack+zstd``)."""

    tag: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class BlobRecord:
    """One channel value, stored once per (thread, ns, channel, version)."""

    channel: str
    version: str
    payload: Payload


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """One pending write of a task against a checkpoint; unique per (task_id, idx)."""

    task_id: str
    idx: int
    channel: str
    payload: Payload
    task_path: str = ""


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A checkpoint as the warm tier stores it.

    ``checkpoint`` is the encoded checkpoint without its channel values (those are
    blobs); ``channel_versions`` is kept in clear so that a store can join blobs in
    the same query; ``filter_doc`` holds the scalar metadata used for list filters.
    """

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    parent_id: str | None
    checkpoint: Payload
    metadata: Payload
    channel_versions: Mapping[str, str]
    filter_doc: Mapping[str, Scalar]
    run_id: str | None = None

    @classmethod
    def new(
        cls,
        *,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        parent_id: str | None,
        checkpoint: Payload,
        metadata: Payload,
        channel_versions: Mapping[str, str],
        filter_doc: Mapping[str, Scalar],
        run_id: object,
    ) -> CheckpointRecord:
        """A record for a new checkpoint. ``run_id`` is the metadata's, as found:
        metadata is free-form, and only a text run id can be looked up by run."""
        return cls(
            thread_id=thread_id, checkpoint_ns=checkpoint_ns, checkpoint_id=checkpoint_id,
            parent_id=parent_id, checkpoint=checkpoint, metadata=metadata,
            channel_versions=channel_versions, filter_doc=filter_doc,
            run_id=run_id if isinstance(run_id, str) else None,
        )


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A checkpoint read back from a tier, fully assembled."""

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    parent_id: str | None
    checkpoint: Payload
    metadata: Payload
    blobs: Mapping[str, Payload]
    writes: tuple[WriteRecord, ...]
    location: Location = "warm"
    archive_key: str | None = None
    version: int = 0
    """The warm head version this copy was made from; 0 when unknown (never fresh).

    Caches (hot stores, the write-behind queue, HotCache's process-local copies)
    carry it so that a copy is served only while warm's head still has this version.
    """
    missing: tuple[str, ...] = ()
    """Channels the live checkpoint names with no stored value (filled by the warm
    stores that keep a blob for every version, an empty channel's included, and for
    the links of delta chains, never empty, by PostgreSQL too). The router refuses
    such a record with ``CorruptPayload``, the archive jobs leave it warm and report
    it; ``verify`` reports it."""


@dataclass(frozen=True, slots=True)
class Head:
    """The head of one (thread, ns): newest checkpoint id, its version, its write count.

    ``version`` advances, atomically with the change, on every change to what the
    latest checkpoint of the (thread, ns) reads as: a checkpoint stored, any pending
    write against the head (a negative-index write replaces another without changing
    the count), its data moving to cold, a delete, prune or copy. A cached copy is
    served only while its version equals this one. ``n_writes`` counts the pending
    writes stored against the head checkpoint (a cheap extra check).
    """

    checkpoint_id: str
    version: int
    n_writes: int


@dataclass(frozen=True, slots=True)
class ListQuery:
    """What ``alist`` asks of the warm tier. ``thread_id=None`` lists every thread."""

    thread_id: str | None = None
    checkpoint_ns: str | None = None
    checkpoint_id: str | None = None
    before_id: str | None = None
    filter: Mapping[str, Scalar] = field(default_factory=dict)
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class PutResult:
    """What a warm ``put_checkpoint`` decided: the new head and whether the parent was stale."""

    head: Head
    conflict: bool


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What an object store knows about one key without reading it."""

    key: str
    size: int
    storage_class: str
    readable: bool
    restore_state: str  # "not-needed" | "not-started" | "in-progress" | "ready"
    modified: float = 0.0  # epoch seconds of the last write; 0.0 when the store cannot tell
    sha256: str | None = None
    """Hex SHA-256 of the object's bytes as the store computed it on receipt (and
    checked against the digest sent with them); None when the store keeps none."""


@dataclass(frozen=True, slots=True)
class CheckpointMeta:
    """What tiering decisions need to know about one checkpoint, without its payload."""

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    parent_id: str | None
    created_at: float
    location: Location
    archive_key: str | None
    size: int
    metadata: Payload | None = None
    """Only for the checkpoint an ``index`` call asked it of (``metadata_of``)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A (thread, ns) leased to one worker until ``until`` (epoch seconds).

    ``version`` is the head's version when it was claimed: a job that acts on the
    whole head (retention) acts only while it is unchanged, so a turn committed
    after the claim is never lost to it.
    """

    thread_id: str
    checkpoint_ns: str
    head_id: str
    updated_at: float
    version: int = 0


@dataclass(frozen=True, slots=True)
class TierUsage:
    """Counts and bytes held by one store (``status``)."""

    threads: int = 0
    checkpoints: int = 0
    archived: int = 0
    bytes: int = 0
    objects: int = 0


@dataclass(frozen=True, slots=True)
class ClaimsHeld:
    """Heads leased to a worker right now (``status``, ``archive``).

    A worker killed mid-run leaves its claims behind: they block tiering of those
    heads until ``latest_until``, and this is how an operator gets to see them.
    """

    count: int = 0
    earliest_until: float | None = None
    latest_until: float | None = None


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One ancestor of a checkpoint, cut down to the channels a ``DeltaChannel`` rebuild asked for.

    A ``DeltaChannel`` stores its value only now and then (a snapshot); in between, the
    value is the last snapshot plus the pending writes of every ancestor since. A link
    is what one ancestor contributes: ``values``, the asked channels it stores a value
    for (an empty channel's marker left out, so a channel here is a seed; a list the
    saver stored as a delta chain, ``codec.chain``, comes as its links, by their stored
    names), and
    ``writes``, its pending writes to the asked channels in ``writes_sort_key`` order
    (task_path, task_id, idx). A stub (``location="archived"``) has no values in warm
    (its segment has them) and carries only the writes warm still holds for it.
    ``missing``: asked channels the live checkpoint names whose value warm lost (a
    delta chain's: any of its links, the deepest too), none of it in ``values``.
    """

    checkpoint_id: str
    parent_id: str | None
    values: Mapping[str, Payload]
    writes: tuple[WriteRecord, ...]
    location: Location = "warm"
    archive_key: str | None = None
    missing: tuple[str, ...] = ()
