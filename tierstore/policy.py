"""Pure decisions. No await, no driver, no clock: every input is an argument.

Everything here is unit-tested directly (``tests/unit``); the router and the saver
call these functions and do the I/O around them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import random
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from langgraph.checkpoint.base import WRITES_IDX_MAP

from tierstore.errors import InvalidInput
from tierstore.records import Head, Scalar, StoredCheckpoint, WriteRecord

__all__ = [
    "MAX_ID_BYTES",
    "TURN_KEY",
    "checkpoint_ids",
    "discards_pending_tasks",
    "fence_key",
    "fenced_out",
    "filter_doc",
    "is_explicit_fork",
    "is_hot_fresh",
    "lease_renew_every",
    "matches_filter",
    "merge_writes",
    "next_channel_version",
    "resolve_region",
    "retry_delay",
    "should_replace_hot",
    "split_filter",
    "validate_id",
    "write_index",
]

MAX_ID_BYTES = 64 * 1024
"""Thread ids, namespaces and checkpoint ids longer than this (UTF-8) are refused."""


def validate_id(value: Any, *, what: str = "thread_id") -> str:
    """Normalise an id to ``str`` or refuse it with ``InvalidInput``.

    Ids are data, never syntax: any Unicode text is accepted except NUL (which
    PostgreSQL text cannot hold) and lone surrogates (which have no UTF-8 form).
    ``int`` and ``UUID`` ids are accepted as their string form, as LangGraph does.
    """
    if isinstance(value, bool) or value is None:
        raise InvalidInput(f"{what} must be a string, got {value!r}")
    if isinstance(value, int | uuid.UUID):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if what == "thread_id" and not value:
        raise InvalidInput("thread_id must not be empty")
    if "\x00" in value:
        raise InvalidInput(f"{what} must not contain NUL characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{what} is not valid Unicode text ({exc.reason})") from exc
    if size > MAX_ID_BYTES:
        raise InvalidInput(f"{what} is {size} bytes long; the limit is {MAX_ID_BYTES}")
    return value


def checkpoint_ids(config: Mapping[str, Any] | None) -> tuple[str, str, str | None]:
    """``(thread_id, checkpoint_ns, checkpoint_id)`` from a RunnableConfig, validated."""
    if not isinstance(config, Mapping):
        raise InvalidInput(f"config must be a mapping, got {type(config).__name__}")
    configurable = config.get("configurable")
    if not isinstance(configurable, Mapping) or configurable.get("thread_id") is None:
        raise InvalidInput(
            "config has no configurable.thread_id; pass "
            '{"configurable": {"thread_id": "..."}} to identify the conversation'
        )
    thread_id = validate_id(configurable["thread_id"], what="thread_id")
    ns = validate_id(configurable.get("checkpoint_ns") or "", what="checkpoint_ns")
    raw_id = configurable.get("checkpoint_id")
    checkpoint_id = validate_id(raw_id, what="checkpoint_id") if raw_id else None
    return thread_id, ns, checkpoint_id


def write_index(channel: str, idx: int) -> int:
    """LangGraph's special channels (error, interrupt, …) take fixed negative indices."""
    return WRITES_IDX_MAP.get(channel, idx)


def next_channel_version(current: str | int | float | None) -> str:
    """A monotonically increasing, lexicographically sortable channel version.

    The integer part orders versions; the random fraction makes two writers that
    raced from the same parent produce distinct versions, so neither blob shadows
    the other (the same scheme LangGraph's own savers use).
    """
    if current is None:
        current_v = 0
    elif isinstance(current, int | float):
        current_v = int(current)
    else:
        current_v = int(str(current).split(".")[0])
    return f"{current_v + 1:032}.{random.random():016}"


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def filter_doc(metadata: Mapping[str, Any]) -> dict[str, Scalar]:
    """The metadata values a store can filter on natively: top-level scalars."""
    return {str(k): v for k, v in metadata.items() if is_scalar(v)}


def split_filter(
    flt: Mapping[str, Any] | None,
) -> tuple[dict[str, Scalar], dict[str, Any]]:
    """Split a list filter into the part a store evaluates and the part checked in Python."""
    pushdown: dict[str, Scalar] = {}
    residual: dict[str, Any] = {}
    for key, value in (flt or {}).items():
        if is_scalar(value):
            pushdown[key] = value
        else:
            residual[key] = value
    return pushdown, residual


def scalar_equal(stored: Any, wanted: Scalar) -> bool:
    """Equality as a JSON document store sees it: ``True`` is not ``1``."""
    if isinstance(wanted, bool) or isinstance(stored, bool):
        return type(stored) is type(wanted) and stored == wanted
    if wanted is None:
        return stored is None
    if isinstance(wanted, str):
        return isinstance(stored, str) and stored == wanted
    return isinstance(stored, int | float) and stored == wanted


def matches_filter(metadata: Mapping[str, Any], flt: Mapping[str, Any]) -> bool:
    """Every key of ``flt`` is present in ``metadata`` with an equal value."""
    for key, wanted in flt.items():
        if key not in metadata:
            return False
        stored = metadata[key]
        if is_scalar(wanted):
            if not scalar_equal(stored, wanted):
                return False
        elif stored != wanted:
            return False
    return True


TURN_KEY = "tierstore_turn"
"""Metadata key of the turn id ``retry_on_conflict`` stamps on every checkpoint of a turn.

A random id, never user data, so it stays filterable in clear under encryption.
"""

STOPPED_RUN_CHANNELS = frozenset({"__interrupt__", "__error__"})
"""Pending-write channels that mark a head whose run has stopped (paused or failed)."""


def discards_pending_tasks(
    parent_seen: Mapping[str, Mapping[str, Any]],
    child_seen: Mapping[str, Mapping[str, Any]],
    parent_write_channels: Sequence[str],
) -> bool:
    """Would this input checkpoint drop steps another turn still has to run?

    LangGraph starts a turn on a head with pending tasks by marking those tasks'
    triggers as seen (it "discards" them) and stores that in ``versions_seen``; the
    input itself touches no node's seen versions. So any seen version that differs
    from the parent's means tasks were discarded. That is a new user turn abandoning
    a paused (``interrupt()``) or failed head, which LangGraph allows, or cutting in
    on a turn still running, which strict mode refuses.
    """
    if any(channel in STOPPED_RUN_CHANNELS for channel in parent_write_channels):
        return False
    for node, seen in child_seen.items():
        before = parent_seen.get(node) or {}
        if any(before.get(channel) != version for channel, version in seen.items()):
            return True
    return False


FORK_SOURCES = frozenset({"fork", "update"})


def is_explicit_fork(metadata: Mapping[str, Any]) -> bool:
    """Whether a checkpoint starts a branch on purpose, so strict mode lets it through.

    LangGraph marks the checkpoint that starts a time-travel branch with
    ``source="fork"`` and a manual ``update_state`` with ``source="update"``; any
    other write (``input``, ``loop``) must continue from the current head.
    """
    return metadata.get("source") in FORK_SOURCES


def retry_delay(attempt: int, *, base: float = 0.01, cap: float = 1.0, jitter: float) -> float:
    """Exponential backoff for conflict retries; ``jitter`` in [0, 1) is passed in."""
    return float(min(cap, base * (2 ** min(attempt, 16))) * (0.5 + jitter))


def resolve_region(
    thread_id: str, rules: Sequence[tuple[str, str]], default: str | None
) -> str | None:
    """The region of a thread: the first rule whose glob pattern matches, else the default.

    Patterns are ``fnmatch`` globs matched case-sensitively against the whole id
    (``"eu-*"``, ``"tenant:acme:*"``); routing is this table, never an ``if`` chain.
    """
    for pattern, region in rules:
        if fnmatch.fnmatchcase(thread_id, pattern):
            return region
    return default


def is_hot_fresh(cached: StoredCheckpoint, head: Head | None) -> bool:
    """A cached latest checkpoint may be served only if warm agrees it is complete.

    It must be the warm head and hold every pending write warm holds for it; a
    cache that missed a write (a hot write failed, another process was cut off)
    therefore never serves stale state.
    """
    return (
        head is not None
        and cached.checkpoint_id == head.checkpoint_id
        and len(cached.writes) == head.n_writes
    )


def should_replace_hot(cached: StoredCheckpoint | None, candidate: StoredCheckpoint) -> bool:
    """A cached entry is replaced only by a newer checkpoint, or the same one with more writes."""
    if cached is None:
        return True
    if candidate.checkpoint_id != cached.checkpoint_id:
        return candidate.checkpoint_id > cached.checkpoint_id
    return len(candidate.writes) >= len(cached.writes)


def merge_writes(
    existing: Sequence[WriteRecord], new: Sequence[WriteRecord]
) -> tuple[WriteRecord, ...]:
    """Writes keyed by (task_id, idx): the first stays for idx >= 0, the last wins for idx < 0."""
    merged = {(w.task_id, w.idx): w for w in existing}
    for write in new:
        key = (write.task_id, write.idx)
        if write.idx >= 0 and key in merged:
            continue
        merged[key] = write
    return tuple(merged.values())


# -- leases and fencing -----------------------------------------------------------------


def fence_key(thread_id: str) -> str:
    """What a warm store keys a thread's fence by: a digest, so a deleted thread's
    fence outlives it without keeping its id."""
    return hashlib.sha256(thread_id.encode("utf-8", "surrogatepass")).hexdigest()


def fenced_out(fence: int | None, token: int) -> bool:
    """Is a write carrying ``token`` stale? Only when a newer lease raised the fence past it."""
    return fence is not None and fence > token


def lease_renew_every(ttl: float) -> float:
    """Renew a lease three times per TTL, so that two missed renewals still keep it."""
    return max(ttl / 3.0, 0.01)
