"""Archive segments: compressed, checksummed bundles of checkpoints of one (thread, ns).

::

    object = b"TSEG" | version (1 byte) | sha256(body) (32 bytes) | body
    body   = zstd(msgpack({"v": 1, "thread_id", "checkpoint_ns", "created_at",
                           "entries": [[checkpoint_id, sha256(frame), frame], …]}))
    frame  = codec.frames.pack_stored(checkpoint with its blobs and pending writes)

A segment verifies itself: the outer digest covers the whole body, and each entry
carries the digest of its own frame, so ``tierstore verify`` can tell a damaged
object from a damaged entry. Keys are derived from hashes, so any thread id (``..``,
``/``, 10 KB of text) yields a safe, fixed-length key::

    segments/<sha256(thread)[:2]>/<sha256(thread)>/<sha256(ns)[:16]>/<sha256(object)>.<nonce>.tseg

A key is written once and never again: it names the digest of the object's bytes and
a random nonce the writer draws for each pack. So an object under a key is immutable
(a process may cache it by key for as long as it likes), a stub names exactly the
bytes that were verified before it was marked (``check_segment_key`` refuses anything
else), and a key ``ColdGC`` found unreferenced is never named again: a later move of
the same checkpoints, a retried move, a rewrite, always writes a new key. A retry
after a crash before the mark writes a new object; the one left behind is named by no
stub and ``ColdGC`` removes it. Keys written before the digest was part of them
(``<40 hex>.tseg``) stay readable; they are checked by the segment's own digest only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence, Set
from dataclasses import dataclass, replace

import msgpack
import zstandard

from tierstore.codec.frames import pack_stored, unpack_stored
from tierstore.codec.limits import Budget, DecodeLimits, bounded_decompress, charge_msgpack
from tierstore.errors import CorruptPayload
from tierstore.records import StoredCheckpoint

__all__ = [
    "SEGMENT_PREFIX",
    "Segment",
    "check_segment_key",
    "pack_segment",
    "segment_key",
    "segment_rewrite",
    "unpack_segment",
]

MAGIC = b"TSEG"
VERSION = 1
SEGMENT_PREFIX = "segments/"
_HEADER = len(MAGIC) + 1 + 32


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def thread_prefix(thread_id: str) -> str:
    """Every segment key of one thread starts with this."""
    h = _digest(thread_id)
    return f"{SEGMENT_PREFIX}{h[:2]}/{h}/"


def segment_key(thread_id: str, checkpoint_ns: str, data: bytes, *, nonce: str) -> str:
    """The key of one packed segment: under its thread's prefix, unique to this pack.

    ``nonce`` is drawn at random by the writer for every pack (``uuid4().hex``; this
    function stays pure): two packs of the same bytes (a retry, the same checkpoints
    archived again at the same instant) still get two keys, so no key is ever written
    twice.
    """
    if not nonce or not nonce.isalnum():
        raise ValueError("a segment nonce is a non-empty alphanumeric string")
    return (f"{thread_prefix(thread_id)}{_digest(checkpoint_ns)[:16]}/"
            f"{hashlib.sha256(data).hexdigest()}.{nonce}.tseg")


def check_segment_key(key: str, data: bytes) -> None:
    """Refuse bytes that are not the object ``key`` was written with.

    A stub names its segment's key, and the key names the digest of the bytes
    verified before the stub was marked: whatever is read under it, whichever cache
    it came from, a stub is never served (nor rehydrated from) anything else. Keys
    of the older form carry no digest and are not checked here.
    """
    name = key.rsplit("/", 1)[-1]
    parts = name.split(".")
    if len(parts) != 3 or len(parts[0]) != 64:
        return
    if hashlib.sha256(data).hexdigest() != parts[0]:
        raise CorruptPayload(f"{key}: the object fails the checksum its key names", where=key)


def segment_rewrite(held: Collection[str], removed: Set[str]) -> list[str] | None:
    """Which checkpoints a segment keeps once ``removed`` are deleted, sorted.

    None when none of ``removed`` is in it (nothing to rewrite); an empty list when
    nothing is left (the segment is dropped once no stub names it).
    """
    if removed.isdisjoint(held):
        return None
    return sorted(c for c in held if c not in removed)


@dataclass(frozen=True, slots=True)
class Segment:
    thread_id: str
    checkpoint_ns: str
    created_at: float
    records: dict[str, StoredCheckpoint]


def pack_segment(records: Sequence[StoredCheckpoint], *, created_at: float,
                 level: int = 9) -> bytes:
    if not records:
        raise ValueError("a segment holds at least one checkpoint")
    first = records[0]
    entries = []
    for record in records:
        if (record.thread_id, record.checkpoint_ns) != (first.thread_id, first.checkpoint_ns):
            raise ValueError("a segment holds checkpoints of one (thread, ns)")
        frame = pack_stored(record)
        entries.append([record.checkpoint_id, hashlib.sha256(frame).hexdigest(), frame])
    body = zstandard.ZstdCompressor(level=level).compress(msgpack.packb({
        "v": VERSION,
        "thread_id": first.thread_id,
        "checkpoint_ns": first.checkpoint_ns,
        "created_at": created_at,
        "entries": entries,
    }, use_bin_type=True))
    return MAGIC + bytes([VERSION]) + hashlib.sha256(body).digest() + body


def unpack_segment(data: bytes, *, key: str = "segment",
                   max_bytes: int = DecodeLimits().max_bundle_bytes) -> Segment:
    """Verify and unpack a segment; its body may decode to at most ``max_bytes``."""
    if len(data) < _HEADER or data[:4] != MAGIC:
        raise CorruptPayload(f"{key}: not a tierstore segment", where=key)
    if data[4] != VERSION:
        raise CorruptPayload(f"{key}: unknown segment version {data[4]}", where=key)
    digest, body = data[5:_HEADER], data[_HEADER:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptPayload(f"{key}: segment fails its checksum", where=key)
    plain = bounded_decompress(body, limit=max_bytes, where=key, what="bundle")
    budget = Budget(max_bytes, "bundle")
    budget.spend(len(plain), where=key)
    charge_msgpack(plain, budget, where=key)
    try:
        doc = msgpack.unpackb(plain, raw=False)
        thread_id, ns = doc["thread_id"], doc["checkpoint_ns"]
        entries = doc["entries"]
    except Exception as exc:
        raise CorruptPayload(f"{key}: damaged segment body ({exc})", where=key) from exc
    records: dict[str, StoredCheckpoint] = {}
    for checkpoint_id, sha, frame in entries:
        if hashlib.sha256(frame).hexdigest() != sha:
            raise CorruptPayload(f"{key}: entry {checkpoint_id!r} fails its checksum", where=key)
        record = unpack_stored(frame, where=f"{key}#{checkpoint_id}", budget=budget)
        records[checkpoint_id] = replace(record, location="warm", archive_key=None)
    return Segment(thread_id, ns, float(doc["created_at"]), records)
