"""Large-payload offload to an object store, behind a checksummed reference.

::

    put:  Payload(tag, 20 MB) of thread T ──► object "offload/<h>/<sha256(T)>/<sha256>"
          ──► Payload(tag+"+ref", [key, sha256, size])
    get:  Payload(tag+"+ref", …) read for thread R ──► fetch R's object of that sha256
          ──► verify sha256 and size ──► Payload(tag, 20 MB)

Each thread owns the objects in its own key space (``thread_space``), so deleting a
thread deletes exactly its objects and never one another thread reads. A key in a
thread space is read as "this content, in the reading thread's space", so the rows
``copy_thread`` copies resolve to the copy's own objects, which it copies first; a
segment shared by a copy is read on behalf of the copy, too. The key stays
absolute so a version that predates thread spaces still reads what this one writes.
Within a thread, objects are content-addressed: the same large value written twice
is stored once and a retried write never duplicates it.

References written before thread spaces name a global key (``offload/<h>/<sha256>``)
and stay readable; a thread delete leaves those alone (other threads may share them).
An object that no warm row refers to any more is an orphan; ``collectable_orphans``
says which keys those are.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping, Set
from dataclasses import replace

import msgpack

from tierstore import offthread
from tierstore.errors import CorruptPayload
from tierstore.offthread import check as check_size
from tierstore.records import Payload, StoredCheckpoint
from tierstore.tiers.base import ObjectStore

__all__ = [
    "COPYING",
    "DELETING",
    "OFFLOAD_PREFIX",
    "OFFLOAD_STORAGE_CLASS",
    "Offloader",
    "REF",
    "SWEEPING",
    "WORK_PREFIX",
    "collectable_orphans",
    "copy_space",
    "delete_space",
    "is_ref",
    "leftover_objects",
    "marker_due",
    "read_marker",
    "ref_key",
    "thread_space",
    "unreferenced_objects",
    "work_marker",
]

REF = "ref"
OFFLOAD_PREFIX = "offload/"
OFFLOAD_STORAGE_CLASS = "STANDARD"


def is_ref(payload: Payload) -> bool:
    return payload.tag.endswith("+" + REF)


def thread_space(thread_id: str) -> str:
    """Every offloaded object of one thread has a key that starts with this."""
    h = hashlib.sha256(thread_id.encode("utf-8")).hexdigest()
    return f"{OFFLOAD_PREFIX}{h[:2]}/{h}/"


def make_ref(payload: Payload, thread_id: str) -> tuple[str, Payload]:
    check_size(len(payload.data))
    digest = hashlib.sha256(payload.data).hexdigest()
    key = f"{thread_space(thread_id)}{digest}"
    body = msgpack.packb([key, digest, len(payload.data)], use_bin_type=True)
    return key, Payload(f"{payload.tag}+{REF}", body)


def _sha256(data: bytes) -> str:
    check_size(len(data))
    return hashlib.sha256(data).hexdigest()


def _resolve(key: str, digest: str, thread_id: str) -> str:
    """A key in some thread's space means "this content in the reader's space"."""
    in_a_space = key.startswith(OFFLOAD_PREFIX) and key.count("/") == 3
    return f"{thread_space(thread_id)}{digest}" if in_a_space else key


def ref_key(payload: Payload, thread_id: str) -> str:
    """The object a reference names when read on behalf of ``thread_id``."""
    key, digest, _size = _parse(payload)
    return _resolve(key, digest, thread_id)


def _parse(payload: Payload) -> tuple[str, str, int]:
    try:
        key, digest, size = msgpack.unpackb(payload.data, raw=False)
        return str(key), str(digest), int(size)
    except Exception as exc:
        raise CorruptPayload(f"damaged offload reference ({exc})", where="offload") from exc


WORK_PREFIX = "offload-work/"
"""Markers of thread deletes and copies in progress (see ``work_marker``)."""
DELETING = "delete"
COPYING = "copy"
SWEEPING = "sweep"
"""Some checkpoints of the thread were deleted: objects only they named must go."""


def work_marker(kind: str, thread_id: str) -> tuple[str, bytes]:
    """Key and body of the marker left while a thread's objects are deleted or copied in.

    Removed when the work is done; one left behind means a crash, and ``ColdGC``
    decides with ``leftover_objects`` what to delete.
    """
    h = hashlib.sha256(thread_id.encode("utf-8")).hexdigest()
    return f"{WORK_PREFIX}{kind}/{h}", msgpack.packb([kind, thread_id], use_bin_type=True)


def read_marker(data: bytes) -> tuple[str, str]:
    try:
        kind, thread_id = msgpack.unpackb(data, raw=False)
        return str(kind), str(thread_id)
    except Exception as exc:
        raise CorruptPayload(f"damaged offload work marker ({exc})", where="offload") from exc


def leftover_objects(
    marker_modified: float,
    thread_has_rows: bool,
    objects: Mapping[str, float],
    *,
    now: float,
    grace: float,
) -> list[str] | None:
    """The objects to delete for a marker a crash left behind; None: not decided yet.

    ``objects`` maps each key in the thread's space to its last write time (0.0 when
    the store cannot tell, which never qualifies). A marker younger than ``grace``
    may belong to work still running. A thread that has rows again (the delete never
    reached warm, the copy finished, or the thread was written anew) keeps every
    object; otherwise nothing names them, and all but those of a put in flight (newer
    than the grace) go.
    """
    if not marker_due(marker_modified, now=now, grace=grace):
        return None
    if thread_has_rows:
        return []
    return sorted(k for k, modified in objects.items() if 0 < modified < now - grace)


def marker_due(marker_modified: float, *, now: float, grace: float) -> bool:
    """Is a work marker old enough to mean a crash (not work still running)?"""
    return 0 < marker_modified < now - grace


OFFLOAD_GRACE_SECONDS = 300.0
"""How long an offloaded object nothing names is kept: a put writes its objects
before its warm row, so an unnamed object this young may belong to a put still in
flight (its warm statement slow, stalled or retried) that is about to name it."""


def unreferenced_objects(objects: Mapping[str, float], named: Set[str], *,
                         started: float, grace: float = OFFLOAD_GRACE_SECONDS
                         ) -> tuple[list[str], list[str]]:
    """Objects of a thread's space that its rows no longer name, after some were deleted:
    ``(doomed, spared)``.

    Only objects last written at least ``grace`` seconds before ``started`` (when the
    delete began) are doomed: a younger one may belong to a put still in flight. The
    younger unnamed ones are ``spared``, for a later sweep (``ColdGC``) to look at
    again. An object whose age the store cannot tell (0.0) is always kept.
    """
    unnamed = [(k, modified) for k, modified in objects.items() if k not in named]
    doomed = sorted(k for k, modified in unnamed if 0 < modified <= started - grace)
    spared = sorted(k for k, modified in unnamed if modified > started - grace)
    return doomed, spared


def collectable_orphans(stored_keys: Iterable[str], referenced: Iterable[str]) -> list[str]:
    """Offloaded objects that no stored reference points to."""
    live = set(referenced)
    return sorted(k for k in stored_keys if k.startswith(OFFLOAD_PREFIX) and k not in live)


class Offloader:
    """Moves payloads above ``threshold`` bytes into ``store`` and brings them back."""

    def __init__(self, store: ObjectStore, *, threshold: int) -> None:
        self.store = store
        self.threshold = threshold

    async def shrink(self, payloads: Mapping[int, Payload], *,
                     thread_id: str) -> dict[int, Payload]:
        """Replace every payload over the threshold by a reference (keys are caller ids).

        The objects go into ``thread_id``'s space: the thread the payloads belong to.
        """
        out: dict[int, Payload] = {}
        uploads: dict[str, bytes] = {}
        big = {ident: payload for ident, payload in payloads.items()
               if payload.size > self.threshold and not is_ref(payload)}
        refs = await offthread.run(lambda: {i: make_ref(p, thread_id) for i, p in big.items()})
        for ident, payload in payloads.items():
            if ident in refs:
                key, ref = refs[ident]
                uploads[key] = payload.data
                out[ident] = ref
            else:
                out[ident] = payload
        await asyncio.gather(
            *(self.store.put(k, d, storage_class=OFFLOAD_STORAGE_CLASS) for k, d in uploads.items())
        )
        return out

    async def expand(self, payload: Payload, thread_id: str) -> Payload:
        """The payload behind a reference read on behalf of ``thread_id``."""
        if not is_ref(payload):
            return payload
        stored, digest, size = _parse(payload)
        key = _resolve(stored, digest, thread_id)
        data = await self.store.get(key)
        if data is None and key != stored:
            # a copy made by a version that did not copy objects reads its source's
            key = stored
            data = await self.store.get(key)
        if data is None:
            raise CorruptPayload(f"offloaded object {key!r} is missing", where="offload")
        if len(data) != size or await offthread.run(lambda: _sha256(data)) != digest:
            raise CorruptPayload(f"offloaded object {key!r} fails its checksum", where="offload")
        return Payload(payload.tag[: -len(REF) - 1], data)

    async def expand_record(self, record: StoredCheckpoint) -> StoredCheckpoint:
        refs = [record.checkpoint, *record.blobs.values(), *(w.payload for w in record.writes)]
        if not any(is_ref(p) for p in refs):
            return record
        t = record.thread_id
        checkpoint = await self.expand(record.checkpoint, t)
        names = list(record.blobs)
        values = await asyncio.gather(*(self.expand(record.blobs[n], t) for n in names))
        payloads = await asyncio.gather(*(self.expand(w.payload, t) for w in record.writes))
        return replace(
            record,
            checkpoint=checkpoint,
            blobs=dict(zip(names, values, strict=True)),
            writes=tuple(replace(w, payload=p) for w, p in zip(record.writes, payloads,
                                                              strict=True)),
        )


async def copy_space(store: ObjectStore, source_thread_id: str, target_thread_id: str) -> int:
    """Copy every offloaded object of one thread into another thread's space.

    Runs before the warm rows are copied, so every reference the copy gets already
    resolves; a crash in between leaves objects in the target's space that nothing
    names yet (deleting the target, or ``ColdGC`` via a marker, removes them).
    """
    source, target = thread_space(source_thread_id), thread_space(target_thread_id)
    copied = 0
    async for key in store.iter_keys(source):
        data = await store.get(key)
        if data is None:  # deleted meanwhile: nothing left to copy
            continue
        await store.put(target + key[len(source):], data, storage_class=OFFLOAD_STORAGE_CLASS)
        copied += 1
    return copied


async def delete_space(store: ObjectStore, thread_id: str) -> int:
    """Delete every offloaded object of a thread (its warm rows are gone already)."""
    keys = [k async for k in store.iter_keys(thread_space(thread_id))]
    if keys:
        await store.delete(keys)
    return len(keys)
