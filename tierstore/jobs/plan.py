"""Tiering policy and the pure decisions behind every job.

Nothing here awaits, reads a clock or touches a store: each function takes the
metadata it needs, the policy and ``now``, and is unit-tested with a fake clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tierstore import policy
from tierstore.errors import ConfigurationError
from tierstore.records import CheckpointMeta

__all__ = [
    "TieringPolicy",
    "backoff",
    "chunks",
    "delta_depth",
    "uses_delta_channels",
    "is_expired",
    "is_idle",
    "next_demotion",
    "plan_demotion",
    "protected_ancestors",
]

DAY = 86400.0
STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "GLACIER_IR", "GLACIER", "DEEP_ARCHIVE")


@dataclass(frozen=True, slots=True, kw_only=True)
class TieringPolicy:
    """When data moves between tiers. Durations are seconds; None disables a move.

    hot_ttl: an idle thread's cached latest checkpoint expires from hot after this.
    archive_after: history older than this moves to cold, except the newest
        ``keep_latest`` checkpoints of each (thread, ns) and what they need.
    archive_idle_after: a thread not written for this long moves to cold entirely.
    expire_after: a thread not written for this long is deleted (``expire_strategy``
        "delete"), or pruned to its latest checkpoint ("keep_latest").
    storage_class: cold storage class of archive segments (None: the cold URL's).
    segment_size: checkpoints per archive segment.
    lease_seconds / batch: how long a worker holds a claimed thread, how many per run.
    parallel_moves: how many claimed heads one worker moves at once (each move waits
        on the stores most of its time).
    """

    hot_ttl: float = 3600.0
    archive_after: float | None = 30 * DAY
    archive_idle_after: float | None = 90 * DAY
    keep_latest: int = 1
    expire_after: float | None = None
    expire_strategy: Literal["delete", "keep_latest"] = "delete"
    storage_class: str | None = None
    segment_size: int = 200
    lease_seconds: float = 300.0
    batch: int = 100
    parallel_moves: int = 4

    def __post_init__(self) -> None:
        for name in ("archive_after", "archive_idle_after", "expire_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigurationError(f"{name} cannot be negative: {value!r}")
        if self.keep_latest < 1:
            raise ConfigurationError("keep_latest must be at least 1: the head always stays")
        if (self.segment_size < 1 or self.batch < 1 or self.lease_seconds <= 0
                or self.parallel_moves < 1):
            raise ConfigurationError(
                "segment_size, batch, lease_seconds and parallel_moves must be positive")
        if self.storage_class is not None and self.storage_class not in STORAGE_CLASSES:
            raise ConfigurationError(
                f"unknown storage class {self.storage_class!r}; use one of "
                f"{', '.join(STORAGE_CLASSES)}"
            )
        if self.expire_strategy not in ("delete", "keep_latest"):
            raise ConfigurationError(
                f"expire_strategy must be 'delete' or 'keep_latest': {self.expire_strategy!r}"
            )


def uses_delta_channels(metadata: Mapping[str, Any]) -> bool:
    """Whether a checkpoint comes from a graph with a ``DeltaChannel`` (LangGraph
    records its delta counters in the metadata of every such checkpoint)."""
    return ("counters_since_delta_snapshot" in metadata
            or "delta_writes_versioned" in metadata)


def delta_depth(metadata: Mapping[str, Any]) -> int:
    """How many ancestors a checkpoint needs to rebuild its DeltaChannels.

    LangGraph records, per delta channel, ``(updates, supersteps)`` since the last
    snapshot; the snapshot sits ``supersteps`` parents back.
    """
    counters = metadata.get("counters_since_delta_snapshot")
    if not isinstance(counters, Mapping):
        return 0
    depth = 0
    for value in counters.values():
        if isinstance(value, list | tuple) and len(value) == 2:
            try:
                depth = max(depth, int(value[1]))
            except (TypeError, ValueError):
                continue
    return depth


def protected_ancestors(index: Sequence[CheckpointMeta], head_id: str, depth: int) -> set[str]:
    """The head and its first ``depth`` ancestors along the parent chain."""
    by_id = {m.checkpoint_id: m for m in index}
    keep: set[str] = set()
    current: str | None = head_id
    while current is not None and current in by_id and len(keep) <= depth:
        keep.add(current)
        current = by_id[current].parent_id
    return keep


def plan_demotion(
    index: Sequence[CheckpointMeta],
    *,
    head_id: str,
    policy: TieringPolicy,
    now: float,
    protect: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Live checkpoints old enough to archive, oldest first.

    Never the head, never the newest ``keep_latest``, never anything in ``protect``
    (the ancestors the head needs to rebuild its channels).
    """
    if policy.archive_after is None:
        return []
    cutoff = now - policy.archive_after
    newest = {m.checkpoint_id for m in sorted(index, key=lambda m: m.checkpoint_id,
                                               reverse=True)[: policy.keep_latest]}
    chosen = [
        m.checkpoint_id
        for m in index
        if m.location == "warm"
        and m.created_at < cutoff
        and m.checkpoint_id != head_id
        and m.checkpoint_id not in newest
        and m.checkpoint_id not in protect
    ]
    return sorted(chosen)


def next_demotion(
    index: Sequence[CheckpointMeta],
    *,
    head_id: str,
    policy: TieringPolicy,
    protect: set[str] | frozenset[str] = frozenset(),
    exclude: set[str] | frozenset[str] = frozenset(),
) -> float | None:
    """The creation time of the live checkpoint this head will next be able to demote.

    A head whose old history is all protected (``keep_latest``, DeltaChannel ancestry)
    has nothing to move, and claiming it again on every run would never end. The job
    marks it settled instead; the marker holds for claims whose age cutoff is at or
    below the returned time (None: for any cutoff) and dies with the head, since a new
    checkpoint changes what is protected. ``exclude``: ids just moved or being moved.
    """
    newest = {m.checkpoint_id for m in sorted(index, key=lambda m: m.checkpoint_id,
                                               reverse=True)[: policy.keep_latest]}
    waiting = [
        m.created_at
        for m in index
        if m.location == "warm"
        and m.checkpoint_id != head_id
        and m.checkpoint_id not in newest
        and m.checkpoint_id not in protect
        and m.checkpoint_id not in exclude
    ]
    return min(waiting, default=None)


def is_idle(updated_at: float, *, policy: TieringPolicy, now: float) -> bool:
    return policy.archive_idle_after is not None and updated_at < now - policy.archive_idle_after


def is_expired(updated_at: float, *, policy: TieringPolicy, now: float) -> bool:
    return policy.expire_after is not None and updated_at < now - policy.expire_after


def chunks(ids: Sequence[str], size: int) -> list[list[str]]:
    """Oldest-first fixed-size groups, so earlier segments keep their keys as history grows."""
    ordered = sorted(ids)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def backoff(interval: float, failures: int, *, cap: float = 600.0) -> float:
    """Delay before the next run of a job that failed ``failures`` times in a row.

    A job that succeeds keeps its own interval, even one longer than ``cap``; each
    failure doubles it (``policy.backoff``), so a broken tier is not hammered.
    """
    if failures <= 0:
        return interval
    return policy.backoff(failures, base=interval, cap=cap)
