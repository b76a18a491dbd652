"""The stored payload of each channel version a saver wrote or read lately.

A channel's value at a version never changes, so a checkpoint that names a channel
unchanged needs no serde call and no compression for it: its payload is the one
stored when that version was new. LangGraph reads the head before a turn and then
writes its children, which name most of the head's versions unchanged::

    aget_tuple ─► remember_read(record): every version it names ─┐
    aput ───────► get(thread, ns, channel, version) ◄────────────┤ hit: the stored payload
                  miss: encode the value handed in, put() it ────┘

What is stored wins over the value handed in, as on every saver that stores a value
per version: a list that was a ``DeltaChannel`` at that version comes back rebuilt
from history while the version stores a snapshot or no value, and a copy of the
checkpoint (the hot tier's) must read as the warm store does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any

from tierstore.codec.pipeline import EMPTY
from tierstore.records import Payload, StoredCheckpoint

__all__ = ["PAYLOAD_CACHE_ENTRIES", "PayloadCache"]

PAYLOAD_CACHE_ENTRIES = 4096
"""Channel versions remembered (an LRU)."""

Key = tuple[str, str, str, str]
"""(thread id, checkpoint ns, channel, version)"""


class PayloadCache:
    """An LRU of stored payloads by thread, namespace, channel and version."""

    def __init__(self, entries: int = PAYLOAD_CACHE_ENTRIES) -> None:
        self.entries = entries
        self._payloads: OrderedDict[Key, Payload] = OrderedDict()

    def get(self, key: Key) -> Payload | None:
        payload = self._payloads.get(key)
        if payload is not None:
            self._payloads.move_to_end(key)
        return payload

    def put(self, key: Key, payload: Payload) -> Payload:
        self._payloads[key] = payload
        self._payloads.move_to_end(key)
        if len(self._payloads) > self.entries:
            self._payloads.popitem(last=False)
        return payload

    def remember_read(self, record: StoredCheckpoint, versions: Mapping[str, Any], *,
                      skip: Collection[str] = ()) -> None:
        """The payloads of a checkpoint just read, for every version ``versions`` (its
        ``channel_versions``) names, except the channels in ``skip`` (delta chains).

        A version the record holds no payload for stores no value (PostgreSQL keeps no
        row for it). A hot copy may also lack a ``DeltaChannel`` snapshot its writer did
        not know; taken as empty here, it reads as the copy did.
        """
        for ch, version in versions.items():
            if ch not in skip:
                self.put((record.thread_id, record.checkpoint_ns, ch, str(version)),
                         record.blobs.get(ch, EMPTY))
