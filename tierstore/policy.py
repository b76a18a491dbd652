"""Pure decisions. No await, no driver, no clock: every input is an argument.

Everything here is unit-tested directly (``tests/unit``); the router and the saver
call these functions and do the I/O around them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from langgraph.checkpoint.base import WRITES_IDX_MAP

from tierstore.codec.chain import is_link_name
from tierstore.codec.pipeline import EMPTY
from tierstore.errors import InvalidInput
from tierstore.records import BlobRecord, Head, Payload, Scalar, StoredCheckpoint, WriteRecord

__all__ = [
    "CHECKPOINT_ID_SKEW",
    "MAX_ID_BYTES",
    "TURN_KEY",
    "backoff",
    "before_checkpoint_id",
    "chain_writes",
    "checked_ids",
    "checkpoint_ids",
    "checked_channel_name",
    "checked_checkpoint",
    "checked_metadata",
    "checked_text",
    "checked_versions",
    "checked_writes",
    "discards_pending_tasks",
    "fence_key",
    "fenced_out",
    "filter_doc",
    "is_storable_scalar",
    "is_explicit_fork",
    "is_hot_fresh",
    "lease_renew_every",
    "list_scope",
    "matches_filter",
    "merge_writes",
    "next_channel_version",
    "resolve_region",
    "retry_delay",
    "should_replace_hot",
    "split_filter",
    "supply_blobs",
    "validate_checkpoint_id",
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
    if type(value) is str and _plain(value) and (value or what != "thread_id"):
        return value  # every id LangGraph makes: valid without encoding it
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


CHECKPOINT_ID_SKEW = 60.0
"""Seconds a new checkpoint id's timestamp may lie ahead of this machine's clock."""

_UUID_EPOCH_100NS = 0x01B21DD213814000  # 1582-10-15 → 1970-01-01 in 100 ns steps


def validate_checkpoint_id(value: Any, now: float, *, skew: float = CHECKPOINT_ID_SKEW) -> str:
    """A checkpoint id that is about to be written, or ``InvalidInput``.

    "Latest" is the greatest id of a (thread, ns), so an id is only safe to store if it
    orders by the time it was made: LangGraph's ids are time-ordered version 6 UUIDs
    (``langgraph.checkpoint.base.id.uuid6``) in canonical lowercase form; another
    version would not order against them (a v7 id sorts below every v6 id). Anything
    else (``"not-a-uuid"``, ``""``, uppercase, a random v4) or an id stamped more than
    ``skew`` seconds after ``now`` could stay the head for good and hide every later
    turn. Reading accepts any id.
    """
    text = validate_id(value, what="checkpoint id")
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != text or parsed.variant != uuid.RFC_4122:
        raise InvalidInput(
            f"checkpoint id {text[:80]!r} is not a time-ordered UUID in canonical form "
            "(LangGraph generates them with langgraph.checkpoint.base.id.uuid6)"
        )
    if parsed.version != 6:
        raise InvalidInput(
            f"checkpoint id {text!r} is a version {parsed.version} UUID; checkpoint ids are "
            "time-ordered version 6 UUIDs, as LangGraph generates them"
        )
    stamp = ((parsed.int >> 80) << 12 | (parsed.int >> 64) & 0x0FFF) - _UUID_EPOCH_100NS
    seconds = stamp / 1e7
    if seconds > now + skew:
        raise InvalidInput(
            f"checkpoint id {text!r} is stamped {seconds - now:.0f}s in the future; it would "
            "shadow every later checkpoint of its thread"
        )
    return text


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


def list_scope(config: Any) -> tuple[str | None, str | None, str | None]:
    """``(thread_id, checkpoint_ns, checkpoint_id)`` that a ``list`` config narrows to.

    Unlike ``checkpoint_ids`` every part is optional (``None`` lists every thread), but
    what is given must be well formed.
    """
    if config is None:
        return None, None, None
    if not isinstance(config, Mapping):
        raise InvalidInput(f"config must be a mapping, got {type(config).__name__}")
    configurable = config.get("configurable") or {}
    if not isinstance(configurable, Mapping):
        raise InvalidInput(
            f"config configurable must be a mapping, got {type(configurable).__name__}")
    thread, ns = configurable.get("thread_id"), configurable.get("checkpoint_ns")
    raw = configurable.get("checkpoint_id", configurable.get("thread_ts"))
    return (
        validate_id(thread) if thread is not None else None,
        validate_id(ns, what="checkpoint_ns") if ns is not None else None,
        validate_id(raw, what="checkpoint_id") if raw else None,
    )


def before_checkpoint_id(before: Any) -> str | None:
    """The ``checkpoint_id`` of a ``before`` config (``None``: no bound).

    The Agent Server passes the checkpoint its API was given (``{"thread_id": …,
    "checkpoint_ns": …, "checkpoint_id": …}``, no ``configurable``) for
    ``POST /threads/{id}/history``'s ``before``; its ``checkpoint_id`` is the bound.
    """
    if before is None:
        return None
    if (isinstance(before, Mapping) and "configurable" not in before
            and isinstance(before.get("checkpoint_id"), str)):
        return validate_id(before["checkpoint_id"], what="before checkpoint_id")
    configurable = before.get("configurable") if isinstance(before, Mapping) else None
    if not isinstance(configurable, Mapping):
        raise InvalidInput("before must be a config like "
                           '{"configurable": {"checkpoint_id": "..."}}')
    raw = configurable.get("checkpoint_id", configurable.get("thread_ts"))
    return validate_id(raw, what="before checkpoint_id") if raw else None


def checked_ids(values: Any, *, what: str) -> list[str]:
    """A sequence of ids (``run_ids``, ``thread_ids``), each by ``validate_id``'s rules.

    One string is refused rather than read as a sequence of one-letter ids.
    """
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise InvalidInput(f"{what}s must be a sequence of {what}s, got "
                           f"{'one string' if isinstance(values, str) else type(values).__name__}")
    return [validate_id(v, what=what) for v in values]


def write_index(channel: str, idx: int) -> int:
    """LangGraph's special channels (error, interrupt, …) take fixed negative indices."""
    return WRITES_IDX_MAP.get(channel, idx)


def next_channel_version(current: str | int | float | None) -> str:
    """A monotonically increasing, lexicographically sortable channel version.

    The integer part orders versions (32 digits, as LangGraph's own savers pad it, so
    ``int(version.split(".")[0])`` reads it anywhere); the random part makes two writers
    that raced from the same parent produce distinct versions, so neither blob shadows
    the other. It is 48 bits from the system's random source in 10 base-36 characters,
    where LangGraph writes ``random.random()`` in 18 decimal digits: every checkpoint
    names about ten versions in its body and its stored channel versions, and every
    blob row and index entry one, so the shorter form is some 100 bytes less per
    checkpoint. 48 bits leave two racing writers a chance in 10^14 of colliding; and
    the source is not the ``random`` module, so replicas of an app that seeds it alike
    still draw distinct versions.
    """
    try:
        if current is None:
            current_v = 0
        elif isinstance(current, int | float) and not isinstance(current, bool):
            current_v = int(current)
        elif isinstance(current, str):
            current_v = int(current.split(".")[0])
        else:
            raise TypeError(type(current).__name__)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"not a channel version: {current!r}"[:200]) from exc
    return f"{current_v + 1:032}.{_base36(secrets.randbits(48), 10)}"


def _base36(n: int, width: int) -> str:
    digits = []
    for _ in range(width):
        n, d = divmod(n, 36)
        digits.append(_BASE36[d])
    return "".join(reversed(digits))


_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def is_text(value: str) -> bool:
    """Whether ``value`` has a UTF-8 form without NUL (what every store's text holds)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_storable_scalar(value: Any) -> bool:
    """A scalar every store can index as it is: a 64-bit integer, a finite float, text.

    MongoDB (BSON) and SQLite hold no integer wider than 64 bits, JSON has no NaN or
    infinity, and no store's text holds a lone surrogate or NUL.
    """
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return INT64_MIN <= value <= INT64_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and is_text(value)


def filter_doc(metadata: Mapping[str, Any]) -> dict[str, Scalar]:
    """The metadata values a store can filter on natively: top-level storable scalars.

    A value no store can hold (see ``is_storable_scalar``) is left out rather than
    failing the write; a filter on such a value is refused by ``split_filter``.
    """
    return {k: v for k, v in metadata.items()
            if isinstance(k, str) and is_text(k) and is_scalar(v) and is_storable_scalar(v)}


def split_filter(
    flt: Mapping[str, Any] | None,
) -> tuple[dict[str, Scalar], dict[str, Any]]:
    """Split a list filter into the part a store evaluates and the part checked in Python.

    A scalar no store can hold (an integer over 64 bits, NaN, a lone surrogate) can
    match no stored checkpoint and would make a driver fail mid-query; it is refused
    with ``InvalidInput`` naming its key instead.
    """
    pushdown: dict[str, Scalar] = {}
    residual: dict[str, Any] = {}
    for key, value in (flt or {}).items():
        if not isinstance(key, str) or not is_text(key):
            raise InvalidInput(f"filter keys must be text, got {key!r}")
        if is_scalar(value):
            if not is_storable_scalar(value):
                raise InvalidInput(
                    f"filter value for {key!r} cannot be stored or matched by any store "
                    f"(integers must fit 64 bits, floats be finite, text be valid Unicode "
                    f"without NUL): {value!r}"[:300])
            pushdown[key] = value
        else:
            residual[key] = value
    return pushdown, residual


def checked_text(value: Any, what: str) -> str:
    """A name that must already be text (a channel, a task path): ``validate_id``'s rules,
    without its int-to-str courtesy (an int channel is a caller's bug, not an id)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    return validate_id(value, what=what)


def _plain(text: str) -> bool:
    """ASCII text without NUL, within the id limit: valid under every rule of ``validate_id``
    except a thread id's non-emptiness."""
    return text.isascii() and "\x00" not in text and len(text) <= MAX_ID_BYTES


def checked_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """A checkpoint ``aput`` can store, as a fresh dict, or ``InvalidInput`` naming the part.

    Checked before anything is encoded or written, so a malformed checkpoint never
    reaches a store (and never half-writes one).
    """
    if not isinstance(checkpoint, Mapping):
        raise InvalidInput(f"checkpoint must be a dict, got {type(checkpoint).__name__}")
    body = dict(checkpoint)
    values = body.get("channel_values")
    if values is not None and not isinstance(values, Mapping):
        raise InvalidInput(
            f"checkpoint channel_values must be a dict, got {type(values).__name__}")
    versions = body.get("channel_versions")
    if versions is not None and not isinstance(versions, Mapping):
        raise InvalidInput(
            f"checkpoint channel_versions must be a dict, got {type(versions).__name__}")
    for channel in values or {}:
        if not (type(channel) is str and _plain(channel)):
            checked_text(channel, "channel name")
        checked_channel_name(channel)
    checked_versions(versions or {}, what="checkpoint channel_versions")
    return body


def checked_channel_name(name: str, *, what: str = "channel name") -> str:
    """A channel name a checkpoint may store: not of the form of a delta-chain link
    (``~<depth>~<channel>``, ``codec.chain``), or ``InvalidInput``.

    A checkpoint's stored channel versions name the links of its chains beside its
    channels, and the stores tell them apart by that form alone (the checkpoint that
    would tell is encoded, maybe encrypted): a link with no stored value was lost,
    while a channel with none may just be empty (PostgreSQL stores no row for it), and
    a history walk takes a link for part of its channel's value. A channel of that
    form would read as damaged or as part of another channel, so it is refused before
    anything is written.
    """
    if name.startswith("~") and is_link_name(name):
        raise InvalidInput(
            f"{what} {name[:80]!r} has the form tierstore reserves for the links of "
            "a list stored as a delta chain (~<depth>~<channel>, depth 0-9999); rename "
            "the channel")
    return name


def checked_versions(versions: Any, *, what: str = "new_versions") -> dict[str, str]:
    """Channel versions as ``{channel: str(version)}``; versions are str, int or float.
    A channel named like a delta-chain link is refused (``checked_channel_name``)."""
    if not isinstance(versions, Mapping):
        raise InvalidInput(f"{what} must be a dict, got {type(versions).__name__}")
    out: dict[str, str] = {}
    for channel, version in versions.items():
        if type(channel) is str and type(version) is str and _plain(channel) and _plain(version):
            out[checked_channel_name(channel)] = version  # what validate_id would return
            continue
        name = checked_channel_name(checked_text(channel, "channel name"))
        if isinstance(version, bool) or not isinstance(version, str | int | float):
            raise InvalidInput(f"{what}: version of channel {name!r} must be a string or a "
                               f"number, got {type(version).__name__}")
        out[name] = validate_id(str(version), what=f"version of channel {name!r}")
    return out


def checked_metadata(metadata: Any) -> Mapping[str, Any]:
    """Checkpoint metadata must be a mapping (LangGraph passes a dict, maybe empty)."""
    if not isinstance(metadata, Mapping):
        raise InvalidInput(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")
    return metadata


def checked_writes(writes: Any) -> list[tuple[str, Any]]:
    """``put_writes``' writes as ``(channel, value)`` pairs, or ``InvalidInput`` naming one.

    A string is refused as a whole and as an item: unpacking ``"ab"`` would silently
    store the write ``("a", "b")``.
    """
    if isinstance(writes, str | bytes) or not isinstance(writes, Sequence):
        raise InvalidInput(
            f"writes must be a sequence of (channel, value) pairs, got {type(writes).__name__}")
    out: list[tuple[str, Any]] = []
    for i, item in enumerate(writes):
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise InvalidInput(f"write {i} must be a (channel, value) pair, got {item!r}"[:200])
        out.append((checked_text(item[0], f"write {i} channel"), item[1]))
    return out


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


_DOUBLINGS = 60
"""Past this many doublings every delay has long met its cap; stops the power growing."""


def backoff(attempt: int, *, base: float, cap: float, jitter: float = 1.0) -> float:
    """Seconds before retry ``attempt``: ``base·2^attempt`` up to ``cap``, times ``jitter``.

    The one backoff curve of the package. ``attempt`` counts from 0 (``base``); a
    negative attempt waits 0, so a caller that retries its first misses at once passes
    ``attempt - free``. ``jitter`` is the factor the caller drew (``random.random()``
    for full jitter, ``0.5 + random.random()`` around the curve): drawing it here would
    make the curve untestable.
    """
    if attempt < 0:
        return 0.0
    return float(min(cap, base * 2.0 ** min(attempt, _DOUBLINGS)) * jitter)


def retry_delay(attempt: int, *, base: float = 0.01, cap: float = 1.0, jitter: float) -> float:
    """Conflict retries: ``backoff`` spread over [0.5, 1.5) of the curve by ``jitter`` in
    [0, 1), so writers that collided once do not collide again in lockstep."""
    return backoff(attempt, base=base, cap=cap, jitter=0.5 + jitter)


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


def first_version(now: float) -> int:
    """The version a new head row starts at: ``now`` (the store's clock, seconds since
    the epoch) in microseconds.

    Deleting a namespace drops its head row, and copying, importing or writing it again
    recreates it. Were versions to restart at 1, a copy cached before the delete could
    match the new head's version and be served. Every change adds one, and no store
    makes a million changes to one head per second, so a later incarnation starts
    above every version an earlier one reached, and above any delete's tombstone in
    the hot tier (``tombstone_version``).
    """
    return round(now * 1_000_000)


def tombstone_version(now: float, deleted: int = 0) -> int:
    """The floor a delete leaves in the hot tier: no cached copy at or below it is
    accepted again. Every version the deleted heads reached (``deleted``) is below it,
    and so is every version made before ``now``; heads created afterwards start above
    it (``first_version``), as long as the clocks involved agree to the microsecond
    ordering of a delete and a later recreation (a clock behind only costs misses).
    """
    return max(first_version(now), deleted)


def is_hot_fresh(cached: StoredCheckpoint, head: Head | None) -> bool:
    """A cached latest checkpoint may be served only if it is what warm holds now.

    Warm advances the head's version with every change to the head (a checkpoint, any
    pending write, an archive move, a delete), atomically with the change, and every
    cached copy carries the version it was made from. Same checkpoint id and same
    version therefore means same content; a count of writes cannot tell, because
    negative-index writes (interrupt, resume, error) replace each other. The write
    count is compared too, as a cheap extra guard. Version 0 means "unknown": such a
    copy is never served.
    """
    return (
        head is not None
        and cached.version > 0
        and cached.checkpoint_id == head.checkpoint_id
        and cached.version == head.version
        and len(cached.writes) == head.n_writes
    )


def should_replace_hot(cached: StoredCheckpoint | None, candidate: StoredCheckpoint) -> bool:
    """A cached entry is replaced only by a copy made from a strictly newer head version.

    Checkpoint ids and write counts cannot order two copies (an older write-behind
    flush may hold the same id and count as a newer entry); the warm version can.
    A copy of unknown version (0) never replaces anything.
    """
    if candidate.version <= 0:
        return False
    return cached is None or candidate.version > cached.version


def chain_writes(
    cached: StoredCheckpoint | None,
    checkpoint_id: str,
    writes: Sequence[WriteRecord],
    version: int | None,
) -> StoredCheckpoint | None:
    """The cached copy with ``writes`` merged in, if that is exactly warm at ``version``.

    ``version`` is what warm's ``put_writes`` returned (None: not the head). The merge
    is exact only when the copy is of the same checkpoint and made from the version
    right before: any other change in between (another process's write) would be
    missing from it. Otherwise None: the caller leaves the copy as it is, and the
    freshness check turns it into a miss.
    """
    if (
        cached is None
        or version is None
        or cached.version <= 0
        or cached.checkpoint_id != checkpoint_id
        or cached.version != version - 1
    ):
        return None
    return replace(cached, writes=merge_writes(cached.writes, writes), version=version)


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


def supply_blobs(
    missing: Sequence[tuple[str, str]],
    values: Mapping[str, Payload],
    new_blobs: Sequence[BlobRecord],
) -> list[BlobRecord]:
    """The new blobs of a put plus the (channel, version) pairs warm said it lacks.

    ``values`` holds the encoded value of every channel of the checkpoint, so a
    missing version is stored again from it; a channel the checkpoint has no value
    for is empty at that version (LangGraph's empty channel), stored as such.
    """
    have = {(b.channel, b.version) for b in new_blobs}
    extra = [BlobRecord(ch, version, values.get(ch, EMPTY))
             for ch, version in missing if (ch, version) not in have]
    return [*new_blobs, *extra]


MAX_DELTAS = 8
"""Links a delta chain holds after its snapshot (see ``extend_chain``)."""


def extend_chain(*, deltas: int, snapshot_bytes: int, tail_bytes: int,
                 max_deltas: int = MAX_DELTAS) -> bool:
    """Store the next version of a chained list as a delta (True) or a new snapshot.

    A read replays the whole chain, so it stays short: at most ``max_deltas`` deltas
    after the snapshot (``deltas`` counts those already in it), and no more tail bytes
    (``tail_bytes``, the new delta's included) than the snapshot holds. Past either
    bound a new snapshot costs less to read than the chain it replaces, and it is
    written at most once per ``max_deltas`` versions, so the bytes stored per version
    stay about a ``max_deltas``-th of the list instead of all of it.
    """
    return 0 <= deltas < max_deltas and 0 <= tail_bytes <= snapshot_bytes


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
