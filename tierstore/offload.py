"""Large-payload offload to an object store, behind a checksummed reference.

::

    put:  Payload(tag, 20 MB) ──► object "offload/<sha256>"
          ──► Payload(tag+"+ref", [key, sha256, size])
    get:  Payload(tag+"+ref", …) ──► fetch object ──► verify sha256 and size ──► Payload(tag, 20 MB)

Objects are content-addressed, so the same large value written twice is stored
once and a retried write never duplicates it. An object that no warm row refers
to any more is an orphan; ``collectable_orphans`` says which keys those are.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import replace

import msgpack

from tierstore.errors import CorruptPayload
from tierstore.records import Payload, StoredCheckpoint
from tierstore.tiers.base import ObjectStore

__all__ = ["OFFLOAD_PREFIX", "REF", "Offloader", "collectable_orphans", "ref_key"]

REF = "ref"
OFFLOAD_PREFIX = "offload/"
OFFLOAD_STORAGE_CLASS = "STANDARD"


def is_ref(payload: Payload) -> bool:
    return payload.tag.endswith("+" + REF)


def make_ref(payload: Payload) -> tuple[str, Payload]:
    digest = hashlib.sha256(payload.data).hexdigest()
    key = f"{OFFLOAD_PREFIX}{digest[:2]}/{digest}"
    body = msgpack.packb([key, digest, len(payload.data)], use_bin_type=True)
    return key, Payload(f"{payload.tag}+{REF}", body)


def ref_key(payload: Payload) -> str:
    key, _digest, _size = _parse(payload)
    return key


def _parse(payload: Payload) -> tuple[str, str, int]:
    try:
        key, digest, size = msgpack.unpackb(payload.data, raw=False)
        return str(key), str(digest), int(size)
    except Exception as exc:
        raise CorruptPayload(f"damaged offload reference ({exc})", where="offload") from exc


def collectable_orphans(stored_keys: Iterable[str], referenced: Iterable[str]) -> list[str]:
    """Offloaded objects that no stored reference points to."""
    live = set(referenced)
    return sorted(k for k in stored_keys if k.startswith(OFFLOAD_PREFIX) and k not in live)


class Offloader:
    """Moves payloads above ``threshold`` bytes into ``store`` and brings them back."""

    def __init__(self, store: ObjectStore, *, threshold: int) -> None:
        self.store = store
        self.threshold = threshold

    async def shrink(self, payloads: Mapping[int, Payload]) -> dict[int, Payload]:
        """Replace every payload over the threshold by a reference (keys are caller ids)."""
        out: dict[int, Payload] = {}
        uploads: dict[str, bytes] = {}
        for ident, payload in payloads.items():
            if payload.size > self.threshold and not is_ref(payload):
                key, ref = make_ref(payload)
                uploads[key] = payload.data
                out[ident] = ref
            else:
                out[ident] = payload
        await asyncio.gather(
            *(self.store.put(k, d, storage_class=OFFLOAD_STORAGE_CLASS) for k, d in uploads.items())
        )
        return out

    async def expand(self, payload: Payload) -> Payload:
        if not is_ref(payload):
            return payload
        key, digest, size = _parse(payload)
        data = await self.store.get(key)
        if data is None:
            raise CorruptPayload(f"offloaded object {key!r} is missing", where="offload")
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise CorruptPayload(f"offloaded object {key!r} fails its checksum", where="offload")
        return Payload(payload.tag[: -len(REF) - 1], data)

    async def expand_record(self, record: StoredCheckpoint) -> StoredCheckpoint:
        refs = [record.checkpoint, *record.blobs.values(), *(w.payload for w in record.writes)]
        if not any(is_ref(p) for p in refs):
            return record
        checkpoint = await self.expand(record.checkpoint)
        names = list(record.blobs)
        values = await asyncio.gather(*(self.expand(record.blobs[n]) for n in names))
        payloads = await asyncio.gather(*(self.expand(w.payload) for w in record.writes))
        return replace(
            record,
            checkpoint=checkpoint,
            blobs=dict(zip(names, values, strict=True)),
            writes=tuple(replace(w, payload=p) for w, p in zip(record.writes, payloads,
                                                              strict=True)),
        )
