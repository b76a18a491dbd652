"""The three tier Protocols. Every backend is one module implementing one of them.

::

    HotStore     latest assembled checkpoint per (thread, ns), with TTL   memory:// redis://
    LeaseStore   per-thread leases with a TTL (the hot backends)         memory:// redis://
    WarmStore    the system of record: checkpoints, blobs, writes, heads  sqlite:/// postgresql:// mongodb://
    ObjectStore  immutable objects by key: cold archive and blob offload  file:// s3://

``WarmStore`` is the composite of four narrow Protocols, split by who calls them::

    WarmRequests  the request path (router, saver)      setup aclose head get list put_* ancestors
    WarmFencing   fencing tokens (leases)               next_fence
    WarmAdmin     whole-thread admin (saver, CLI)       delete_* copy/publish_thread prune usage
    WarmTiering   the tiering jobs (tierstore.jobs)     claim release … archive stubs rehydrate

The in-memory hot store, the SQLite warm store and the file object store are the
reference implementations; ``tests/contract`` runs one suite over every backend.

Rules every implementation keeps:

- Payloads are opaque bytes; a store never decodes them.
- Heads move by compare-and-set inside the store (SQL ``WHERE``, Mongo filter, Lua),
  never by reading and then writing.
- Every change to a head (checkpoint, pending write, archive move, delete, prune,
  copy) advances its ``version`` atomically with the change; the latest checkpoint
  a warm ``get`` returns carries the head version read with it (same snapshot).
  A hot store replaces an entry only with a strictly newer version.
- ``put_writes`` is idempotent per (task_id, idx) for ``idx >= 0``; special writes
  (``idx < 0``: errors, interrupts, resumes) replace what was there.
- Driver errors leave a store as ``TierUnavailable`` / ``CorruptPayload`` / …,
  translated in one place per module.
- A write that carries a fencing token (``fence=``) is refused with ``LeaseLost``
  when the thread's fence (raised by ``next_fence``) is above it; the check and the
  write are one atomic step of the store.
- ``aclose`` is idempotent.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

from tierstore.records import (
    BlobRecord,
    ChainLink,
    CheckpointMeta,
    CheckpointRecord,
    Claim,
    ClaimsHeld,
    Head,
    ListQuery,
    ObjectInfo,
    PutResult,
    StoredCheckpoint,
    TierUsage,
    WriteRecord,
)

__all__ = [
    "HotStore",
    "LeaseStore",
    "ObjectStore",
    "WarmAdmin",
    "WarmFencing",
    "WarmRequests",
    "WarmStore",
    "WarmTiering",
]


@runtime_checkable
class HotStore(Protocol):
    """A cache of the latest checkpoint per (thread, ns). Losing it loses nothing."""

    backend: str

    async def setup(self) -> None: ...

    async def aclose(self) -> None: ...

    async def get(self, thread_id: str, checkpoint_ns: str) -> StoredCheckpoint | None:
        """The cached latest checkpoint with its pending writes, or None."""
        ...

    async def put(self, record: StoredCheckpoint) -> bool:
        """Cache ``record`` only if its ``version`` is strictly newer than the cached
        entry's (an entry of unknown version counts as 0); True if stored."""
        ...

    async def add_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[WriteRecord],
        *,
        version: int,
    ) -> bool:
        """Merge writes into the cached entry and give it ``version``, only if the entry
        is ``checkpoint_id`` at ``version - 1`` (see ``policy.chain_writes``); True if
        merged. Otherwise the entry stays as it is and fails the freshness check."""
        ...

    async def invalidate(
        self, thread_id: str, checkpoint_ns: str | None = None, *, floor: int = 0
    ) -> None:
        """Drop the cached entry of one namespace, or of every namespace of the thread.

        For a whole thread, a ``floor`` above 0 also leaves a tombstone for at least
        the hot TTL: ``put`` refuses every copy of the thread whose version is at or
        below the highest of the floor and the versions dropped. A delete's floor is
        above every version the deleted heads had (``policy.tombstone_version``), so a
        copy queued before the delete, by any process, can no longer bring it back.
        """
        ...


@runtime_checkable
class LeaseStore(Protocol):
    """Mutual exclusion per thread with a TTL. It only keeps honest holders apart:
    safety against an expired holder comes from the warm tier's fencing token."""

    async def acquire_lease(self, thread_id: str, owner: str, ttl: float) -> bool:
        """Take the thread's lease for ``ttl`` seconds if nobody holds it; True if taken."""
        ...

    async def renew_lease(self, thread_id: str, owner: str, ttl: float) -> bool:
        """Extend the lease if ``owner`` still holds it; False once it was lost."""
        ...

    async def release_lease(self, thread_id: str, owner: str) -> bool:
        """Give the lease back if ``owner`` holds it; True if it did."""
        ...


@runtime_checkable
class WarmRequests(Protocol):
    """What a turn needs from the system of record: the request path.

    Every write is durable before the call returns.
    """

    backend: str

    async def setup(self) -> None: ...

    async def aclose(self) -> None: ...

    async def head(self, thread_id: str, checkpoint_ns: str) -> Head | None:
        """One indexed lookup: the head of a (thread, ns), used to validate hot hits."""
        ...

    async def get(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> StoredCheckpoint | None:
        """One checkpoint (the newest when ``checkpoint_id`` is None), blobs and writes joined."""
        ...

    def list(self, query: ListQuery) -> AsyncIterator[StoredCheckpoint]:
        """Matching checkpoints, newest first per (thread, ns), without N+1 queries."""
        ...

    async def put_checkpoint(
        self,
        record: CheckpointRecord,
        blobs: Sequence[BlobRecord],
        *,
        strict: bool,
        fence: int | None = None,
    ) -> PutResult:
        """Store a checkpoint and its new blobs and advance the head atomically.

        With ``strict`` the head must equal ``record.parent_id`` (no head when it is
        None), else ``VersionConflict`` is raised and nothing is written. With
        ``fence``, a thread fence above it raises ``LeaseLost`` and nothing is written.
        Every channel version the record names must be among ``blobs`` (an empty
        channel's ``EMPTY`` payload counts) or still held by warm, else ``MissingBlobs``
        carries the missing (channel, version) pairs and nothing is written: an archive
        move may have dropped them after the writer read the parent. The check is part
        of the same atomic step as the write.
        """
        ...

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[WriteRecord],
        *,
        fence: int | None = None,
    ) -> int | None:
        """Store pending writes; the head's new version, or None if ``checkpoint_id`` is
        not the head. Every call against the head advances the version (atomically with
        the writes), even one that only replaces a negative-index write."""
        ...

    async def ancestors(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        channels: Sequence[str],
        *,
        limit: int,
    ) -> Sequence[ChainLink]:
        """The ancestors of ``checkpoint_id`` (itself left out), newest first, following
        ``parent_id``, each cut down to ``channels``: what a ``DeltaChannel`` replays.

        Without it, rebuilding such a channel costs one ``get`` per ancestor back to the
        last snapshot; this is a bounded number of round trips for up to ``limit`` links
        (SQLite: one call on the store's thread; PostgreSQL: one function call;
        MongoDB: a few queries per page of the namespace). The walk stops after
        ``limit`` links, at the root, at a parent that is not stored, and after the
        first link where every asked channel has had a value at some live link (older
        links cannot change the rebuild); a channel named by the links of its delta
        chain (``~0~channel``…, ``codec.chain``) has one, handed over as those links,
        every one the checkpoint names: one warm lost (the deepest too) makes the
        channel ``missing`` there instead.
        A stub's values are in cold: the walk goes on through it and the caller reads
        its segment. Empty when ``checkpoint_id`` is not stored or has no parent; the
        caller pages on from the last link's id.
        """
        ...


@runtime_checkable
class WarmFencing(Protocol):
    """Fencing tokens. Only a lease holder asks for one (when it takes a thread); the
    request path merely carries the token into ``put_checkpoint`` / ``put_writes``."""

    async def next_fence(self, thread_id: str) -> int:
        """Issue the thread's next fencing token (1, 2, 3…); lower tokens are refused from now on.

        Stores keep only a digest of the thread id with the fence, and keep the fence
        when the thread is deleted, so a stale holder stays fenced out.
        """
        ...


@runtime_checkable
class WarmAdmin(Protocol):
    """Whole-thread operations: the saver's admin calls (delete, copy, import, prune)
    and the CLI. Each touches many rows, never on a turn's path."""

    async def delete_thread(self, thread_id: str) -> None: ...

    async def delete_for_runs(self, run_ids: Sequence[str]) -> Sequence[str]:
        """Delete every checkpoint (and its writes) of these runs; returns the threads touched."""
        ...

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None: ...

    async def publish_thread(self, source_thread_id: str, target_thread_id: str, *,
                             replace: bool) -> None:
        """Copy a staged thread onto its real id, refusing a target that has checkpoints.

        The check and the copy are one step where the store allows (one transaction in
        SQLite and PostgreSQL), so a thread the application creates while an import
        runs is never merged with the import: ``InvalidInput`` instead. With
        ``replace`` the target's rows are deleted and the copy made in that same step;
        until it commits the old thread stays whole.
        """
        ...

    async def prune(self, thread_ids: Sequence[str], *, keep_latest: bool) -> None:
        """Keep only the newest checkpoint per namespace, or delete everything."""
        ...

    async def usage(self) -> TierUsage:
        """Counts and bytes for ``ops.status``; may scan the store, so never on a turn's path."""
        ...


@runtime_checkable
class WarmTiering(Protocol):
    """What the jobs in ``tierstore.jobs`` need to move data between tiers: claims on
    heads, archive stubs and their keys. Never on the request path."""

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
        """Lease up to ``limit`` (thread, ns) heads whose lease is free or expired.

        ``warm_before``: heads with a live (``warm``) checkpoint other than the head
        created before it. ``idle_before``: heads last written before it (that still
        have live checkpoints, unless ``require_live`` is False); ``thread_id``: only
        that thread's namespaces. Oldest first.
        With ``warm_before``, a head released as settled at its current head id is
        skipped while ``warm_before`` is at or below its ``settled_until`` (always when
        that is None): a run never claims again what it found nothing to move in.
        Claiming uses the store's own primitives (a transaction / ``FOR UPDATE SKIP
        LOCKED`` / a filtered update), so many workers never hold the same head.
        """
        ...

    async def release(
        self,
        thread_id: str,
        checkpoint_ns: str,
        *,
        owner: str,
        settled_head: str | None = None,
        settled_until: float | None = None,
    ) -> None:
        """Give a claim back if ``owner`` holds it.

        ``settled_head``: history demotion has nothing (more) to move while the head is
        this id and claims cut off at or below ``settled_until`` (see ``claim``); the
        marker is replaced by the next release and dies when the head moves on.
        """
        ...

    async def release_owned(self, *, owner: str) -> int:
        """Give back every claim ``owner`` holds; returns how many.

        For a job that lost track of its claims: a claim or release whose answer an
        outage swallowed. It visits every head held by anyone (no index serves it), so
        a job calls it only after such a loss, not on every run.
        """
        ...

    async def expire_thread(
        self,
        thread_id: str,
        heads: Sequence[Claim],
        *,
        owner: str,
        now: float,
        keep_latest: bool,
    ) -> bool:
        """Delete a claimed thread (``keep_latest``: prune it to its newest checkpoint
        per namespace) only if it has not changed since it was claimed.

        Unchanged means: its heads are exactly ``heads`` (same namespaces, head ids
        and versions) and ``owner`` still holds each lease past ``now``. The check is
        part of the same atomic step as the delete (MongoDB: made right before it), so
        a turn committed after the claim survives. Returns whether anything was done.
        """
        ...

    async def held_claims(
        self, *, now: float, thread_id: str | None = None, exclude_owner: str | None = None
    ) -> ClaimsHeld:
        """Heads leased to a worker (other than ``exclude_owner``) past ``now``."""
        ...

    async def index(
        self, thread_id: str, checkpoint_ns: str, *, metadata_of: str | None = None
    ) -> Sequence[CheckpointMeta]:
        """Every checkpoint of a (thread, ns), newest first, without payloads.

        ``metadata_of``: that checkpoint comes with its metadata (history demotion
        reads the head's ``DeltaChannel`` depth from it), in the same call.
        """
        ...

    async def get_live(
        self, thread_id: str, checkpoint_ns: str, checkpoint_ids: Sequence[str]
    ) -> Sequence[StoredCheckpoint]:
        """The live (not archived) checkpoints among ``checkpoint_ids``, oldest first,
        each as ``get`` returns it (blobs and pending writes joined); ids that are
        stubs or not stored are left out.

        What an archive move packs into one segment: one snapshot and a bounded number
        of round trips whatever the number of ids (PostgreSQL: one statement, each
        channel value sent once however many of the checkpoints name it), not one
        ``get`` each.
        """
        ...

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
        """Turn live checkpoints into stubs pointing at ``archive_key`` and drop their payloads.

        One atomic step, and only while ``owner`` still holds the lease; returns how many
        checkpoints became stubs (0 when the lease was lost). Metadata, parent and channel
        versions stay on the stub so ``list`` and its filters never touch cold.
        ``writes``: the pending writes the segment holds, per checkpoint id; only those
        leave warm (same task, index and bytes), so a write stored after the segment
        was packed stays on the stub, where reads merge it. None drops them all.
        """
        ...

    async def rehydrate(self, records: Sequence[StoredCheckpoint]) -> int:
        """Put archived checkpoints back as live rows (payload, blobs, writes)."""
        ...

    async def archive_refs(
        self, thread_id: str | None = None, *, keys: Sequence[str] | None = None
    ) -> dict[str, int]:
        """Archive keys referenced by stubs with their stub counts.

        Scoped to one thread and/or to the given ``keys`` (indexed lookups: what the
        request path uses, so a delete costs O(thread), not O(store)); with neither,
        every key of the store (a GROUP BY over all stubs: background jobs only).
        """
        ...

    async def archive_stubs(
        self, *, keys: Sequence[str] | None = None, run_ids: Sequence[str] | None = None
    ) -> dict[str, builtins.set[str]]:
        """Archive key -> checkpoint ids of the stubs (of any thread) naming it.

        Only stubs naming one of ``keys`` and/or belonging to one of ``run_ids`` (indexed
        lookups; at least one filter is required). Tells which checkpoints a rewritten
        segment must keep, and which segments hold the checkpoints of runs to delete.
        """
        ...

    async def repoint_archive(
        self, old_key: str, new_key: str, checkpoint_ids: Sequence[str]
    ) -> int:
        """Stubs naming ``old_key`` whose id is in ``checkpoint_ids`` now name ``new_key``.

        Each stub moves atomically (one statement / one document update); a stub whose
        id is not listed keeps ``old_key``, which then stays referenced and is kept.
        Returns how many stubs moved. The stub's data does not change, so heads keep
        their version.
        """
        ...


@runtime_checkable
class WarmStore(WarmRequests, WarmFencing, WarmAdmin, WarmTiering, Protocol):
    """The whole warm tier: what every warm backend implements.

    Callers that need less name the narrow Protocol instead, so a reader (and mypy)
    sees which part of a backend a module depends on.
    """


@runtime_checkable
class ObjectStore(Protocol):
    """Immutable objects by key: the cold archive and the large-payload offload."""

    backend: str

    async def setup(self) -> None: ...

    async def aclose(self) -> None: ...

    async def put(self, key: str, data: bytes, *, storage_class: str | None = None) -> None: ...

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, None if absent; ``CheckpointArchived`` if it needs a restore."""
        ...

    async def info(self, key: str) -> ObjectInfo | None: ...

    async def delete(self, keys: Sequence[str]) -> None: ...

    def iter_keys(self, prefix: str) -> AsyncIterator[str]: ...

    async def restore(self, key: str, *, days: int | None = None) -> str:
        """Ask for a readable copy of an archived object; returns the restore state.

        ``days`` is how long the copy stays readable; None: the store's configured default."""
        ...
