"""The tierstore exception tree.

Every error tierstore raises on purpose is a ``TierstoreError``. The tree splits
into *misuse* (the caller must change something: fix a URL, pass a thread id, stop
calling a sync method on the saver's own loop) and *refusals* (the request was
well formed, but a store said no or could not answer; retrying or operating on the
store may help)::

    TierstoreError
    ├── UsageError                    misuse: fix the call or the configuration
    │   ├── ConfigurationError        bad URL, unknown scheme, contradictory options
    │   ├── InvalidInput              missing/illegal thread id, checkpoint id, config
    │   ├── LifecycleError            saver not opened, already closed, wrong loop
    │   └── PruneRefused              keep_latest would sever a DeltaChannel's chain
    └── StorageError                  refusals: the stores could not do what was asked
        ├── TierUnavailable           a store is unreachable or timed out
        ├── VersionConflict           a stale writer lost the compare-and-set
        │   └── TurnInProgress        new input would discard another turn's pending steps
        ├── CheckpointArchived        the bytes sit in a class that needs a restore
        ├── CorruptPayload            stored bytes fail to decode or verify
        │   ├── UnsafePayload         bytes from outside name a type the allowlist refuses
        │   └── DecompressionLimit    a payload, record or bundle decodes past its bound
        ├── PayloadTooLarge           a payload exceeds what the stores accept
        ├── ResidencyError            a thread has no region, or a write would leave it
        ├── LeaseBusy                 another holder kept a thread's lease for the whole wait
        ├── LeaseLost                 a newer lease holder fenced this writer out
        └── MissingBlobs              a checkpoint named channel versions warm no longer holds

Driver exceptions never escape raw: each backend maps its driver's errors to the
most specific class above in one place and chains the original (``raise … from``).
``InvalidInput`` and ``ConfigurationError`` also derive from ``ValueError`` so
that code written against LangGraph's savers, which raise ``ValueError`` for a
missing thread id, keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "CheckpointArchived",
    "ConfigurationError",
    "CorruptPayload",
    "DecompressionLimit",
    "InvalidInput",
    "LeaseBusy",
    "LeaseLost",
    "LifecycleError",
    "MissingBlobs",
    "PayloadTooLarge",
    "PruneRefused",
    "ResidencyError",
    "StorageError",
    "TierUnavailable",
    "TierstoreError",
    "TurnInProgress",
    "UnsafePayload",
    "UsageError",
    "VersionConflict",
]


class TierstoreError(Exception):
    """Root of every error tierstore raises on purpose."""


class UsageError(TierstoreError):
    """The caller must change something; retrying the same call will fail again."""


class ConfigurationError(UsageError, ValueError):
    """A URL, option or environment variable is malformed or contradictory."""


class InvalidInput(UsageError, ValueError):
    """A request carries an illegal or missing value (thread id, checkpoint id, config)."""


class LifecycleError(UsageError, RuntimeError):
    """The saver was used outside its open state, or a sync method ran on its own loop."""


class PruneRefused(UsageError, NotImplementedError):
    """``prune(keep_latest)`` of a thread that uses a ``DeltaChannel``: keeping only its
    latest checkpoint could make the channel read as empty. Nothing was pruned; delete
    the thread instead (``strategy="delete"``). A ``NotImplementedError`` too, as
    LangGraph's PostgreSQL saver raises for the same request: a refusal by design, not
    a missing feature."""


class StorageError(TierstoreError):
    """A well-formed request that a store refused or could not serve."""


class TierUnavailable(StorageError):
    """A store could not be reached, or did not answer in time."""

    def __init__(self, message: str, *, tier: str = "", backend: str = "") -> None:
        super().__init__(message)
        self.tier = tier
        self.backend = backend


class VersionConflict(StorageError):
    """A write's parent was not the current head of its (thread, namespace).

    ``head_id`` and ``version`` describe what the store holds now, so a caller can
    re-run its turn from there (see ``tierstore.retry_on_conflict``).
    """

    def __init__(
        self,
        message: str,
        *,
        thread_id: str,
        checkpoint_ns: str,
        head_id: str | None,
        version: int,
    ) -> None:
        super().__init__(message)
        self.thread_id = thread_id
        self.checkpoint_ns = checkpoint_ns
        self.head_id = head_id
        self.version = version


class TurnInProgress(VersionConflict):
    """Strict mode refused a turn's input: the head has steps of another turn still to run.

    LangGraph starts a new turn by discarding whatever tasks the head still has
    pending; in strict mode that would silently drop a turn another caller is
    running (its input stored, its answer not yet). Nothing of the refused turn was
    stored, so re-sending it later (``retry_on_conflict`` does) applies it once. A turn
    that stopped midway without a trace (its process died, its call was cancelled)
    keeps the thread until someone finishes it with ``ainvoke(None, config)``; a head
    paused on ``interrupt()`` or left by a node's error does not hold the thread.
    """


class CheckpointArchived(StorageError):
    """The checkpoint lives in a cold storage class that must be restored first.

    ``restore_state`` is one of ``"not-started"``, ``"in-progress"`` or ``"ready"``.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str,
        storage_class: str,
        restore_state: str,
        thread_id: str | None = None,
        checkpoint_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.key = key
        self.storage_class = storage_class
        self.restore_state = restore_state
        self.thread_id = thread_id
        self.checkpoint_id = checkpoint_id


class CorruptPayload(StorageError):
    """Stored bytes could not be decoded, decrypted or verified."""

    def __init__(self, message: str, *, where: str = "", detail: Any = None) -> None:
        super().__init__(message)
        self.where = where
        self.detail = detail


class UnsafePayload(CorruptPayload):
    """Bytes decoded under the safe allowlist name a type outside it.

    Raised instead of constructing the type: importing a class named by bytes that
    did not come from this saver's own writes can run code (a msgpack ext payload
    can name ``os.system``). ``type_name`` is the dotted name that was refused.
    """

    def __init__(self, message: str, *, where: str = "", type_name: str = "") -> None:
        super().__init__(message, where=where, detail=type_name)
        self.type_name = type_name


class DecompressionLimit(CorruptPayload):
    """Decoding would produce more bytes than the configured bound allows.

    A few hundred compressed bytes can declare gigabytes of output; every zstd stage
    is bounded per frame and per record or bundle in total, and this is raised
    before the memory is spent. ``limit`` is the bound that was hit.
    """

    def __init__(self, message: str, *, where: str = "", limit: int = 0) -> None:
        super().__init__(message, where=where, detail=limit)
        self.limit = limit


class PayloadTooLarge(StorageError):
    """A payload exceeds what the configured stores can hold."""


class ResidencyError(StorageError):
    """A thread matched no region, or its bytes would be written outside its region."""


class LeaseBusy(StorageError):
    """A thread's lease stayed with another holder for the whole ``wait``."""

    def __init__(self, message: str, *, thread_id: str) -> None:
        super().__init__(message)
        self.thread_id = thread_id


class LeaseLost(StorageError):
    """A write carried a fencing token older than the thread's newest lease.

    The lease expired (a long pause, a lost network) and another holder took the
    thread; the warm tier refused the write, so nothing of it was stored.
    """

    def __init__(self, message: str, *, thread_id: str, token: int, fence: int) -> None:
        super().__init__(message)
        self.thread_id = thread_id
        self.token = token
        self.fence = fence

    @classmethod
    def superseded(cls, thread_id: str, token: int, fence: int) -> LeaseLost:
        """The refusal every warm store raises, worded once."""
        return cls(
            f"thread {thread_id!r}: lease token {token} was superseded by {fence}; "
            "a newer holder owns the thread",
            thread_id=thread_id, token=token, fence=fence,
        )


class MissingBlobs(StorageError):
    """A checkpoint named channel versions that warm no longer holds; nothing was stored.

    An archive move drops from warm the channel values only archived checkpoints
    name, while a writer may still hold the parent (a cached head, or a read made
    before the move): its child names the unchanged channels by their old versions.
    Storing that child would leave a state no tier can rebuild, so the warm store
    checks inside the write and refuses with the (channel, version) pairs it lacks.
    The router supplies their payloads (the saver passes every channel's value) and
    retries once; callers only see this error if the retry is refused too.
    """

    def __init__(self, message: str, *, thread_id: str, checkpoint_ns: str,
                 missing: tuple[tuple[str, str], ...]) -> None:
        super().__init__(message)
        self.thread_id = thread_id
        self.checkpoint_ns = checkpoint_ns
        self.missing = missing

    @classmethod
    def of(cls, thread_id: str, checkpoint_ns: str,
           missing: Iterable[tuple[str, str]]) -> MissingBlobs:
        """The refusal every warm store raises, worded once."""
        pairs = tuple(sorted(set(missing)))
        return cls(
            f"thread {thread_id!r} ns {checkpoint_ns!r}: the checkpoint names channel "
            f"versions no tier holds in warm ({', '.join(ch for ch, _ in pairs)})",
            thread_id=thread_id, checkpoint_ns=checkpoint_ns, missing=pairs,
        )
