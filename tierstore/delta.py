"""The writer's side of delta chains (the format is ``tierstore.codec.chain``).

A delta can only be written against a value this process knows exactly, so the saver
keeps, per (thread, ns, channel), the chain it last wrote or read: the version, the
list's items (a shallow copy), and every link's stored name, version and payload. A
new version of the channel that extends those items becomes one more link; anything
else (no entry: another process wrote the channel, a restart, an eviction; a value
that does not extend it; a chain at its bounds, ``policy.extend_chain``) becomes a new
snapshot. A wrong delta is never written: the prefix is checked item by item on
the bytes the serde makes of each item (a digest of them), never on ``==`` or
identity. Items that compare equal may still differ (``1`` and ``1.0``, ``0.0`` and
``-0.0``, dict order, an enum and its value), and an item the graph changed in place
is the same object with other contents: only its bytes tell. The digests of a chain
are taken when it is written, or, for a chain learned from a read, from its stored
payloads decoded again (never from the objects handed to the graph), unless the read
returned exactly the payloads this writer stored (LangGraph reads the head before
every turn): the same bytes have the same digests.

Every checkpoint names all the links of its chain and the put carries all their
payloads, so a link the warm store no longer holds (an archive move, a prune or a run
delete under this writer, another process deleting the thread) is stored again by
the put's missing-values path; the writer never needs to know that it happened.

Checking every item costs one serde call per item per new version (what a saver
storing the whole list spends anyway), and saves the compression and the bytes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tierstore.codec.chain import ChainLink, link_name, link_version
from tierstore.codec.pipeline import Codec
from tierstore.errors import TierstoreError
from tierstore.policy import MAX_DELTAS, extend_chain
from tierstore.records import Payload

__all__ = ["CHAIN_ENTRIES", "Chain", "ChainWriter", "item_digests"]

CHAIN_ENTRIES = 1024
"""Chains the writer remembers (one per thread, namespace and list channel)."""

ChainKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class Chain:
    """A chain as stored: its version, the whole list, and its links oldest first
    (stored channel name, stored version, payload)."""

    version: str
    items: tuple[Any, ...]
    links: tuple[tuple[str, str, Payload], ...]
    digests: tuple[bytes, ...] | None = None
    """Per item, a digest of its serde bytes when stored (None: learned from a read)."""

    @property
    def names(self) -> dict[str, str]:
        """What the checkpoint's stored ``channel_versions`` names for this channel."""
        return {name: version for name, version, _ in self.links}

    @property
    def payloads(self) -> dict[str, Payload]:
        return {name: payload for name, _, payload in self.links}


def item_digests(codec: Codec, items: Sequence[Any]) -> tuple[bytes, ...]:
    """A digest of the serde bytes of each item: equal digests, equal stored items."""
    out = []
    for item in items:
        type_, data = codec.serde.dumps_typed(item)
        out.append(hashlib.blake2b(type_.encode() + b"\0" + bytes(data),
                                   digest_size=16).digest())
    return tuple(out)


def _stored_digests(codec: Codec, chain: Chain) -> tuple[bytes, ...]:
    """The digests of a chain's items as its links store them (decoded again)."""
    items: list[Any] = []
    try:
        for name, _version, payload in chain.links:
            link = codec.decode(payload, where=f"delta link {name!r}")
            if not isinstance(link, ChainLink):
                return ()
            items.extend(link.items)
    except TierstoreError:  # unreadable here (another key, say): the next version is a snapshot
        return ()
    return item_digests(codec, items)


class ChainWriter:
    """An LRU of the chains this saver wrote or read last, and the next link of each."""

    def __init__(self, entries: int = CHAIN_ENTRIES, max_deltas: int = MAX_DELTAS) -> None:
        self.entries = entries
        self.max_deltas = max_deltas
        self._chains: OrderedDict[ChainKey, Chain] = OrderedDict()

    def current(self, key: ChainKey, version: str) -> Chain | None:
        """The chain of an unchanged channel, if this writer knows it at ``version``."""
        chain = self._chains.get(key)
        if chain is None or chain.version != version:
            return None
        self._chains.move_to_end(key)
        return chain

    def next(self, codec: Codec, key: ChainKey, value: list[Any], version: str) -> Chain:
        """The chain storing ``value`` as the channel's new ``version``: one more link
        when it extends the chain known for the channel, else a new snapshot."""
        channel = key[2]
        digests = item_digests(codec, value)
        known = self._chains.get(key)
        if known is not None and known.version != version and len(value) >= len(known.items):
            if known.digests is None:  # learned from a read: its stored bytes, not the objects
                known = replace(known, digests=_stored_digests(codec, known))
                self._chains[key] = known
            base = len(known.items)
            if known.digests is not None and len(known.digests) == base \
                    and digests[:base] == known.digests:
                payload = codec.encode_link(ChainLink(version, known.version, base,
                                                      value[base:]))
                tails = sum(p.size for _, _, p in known.links[1:]) + payload.size
                if extend_chain(deltas=len(known.links) - 1,
                                snapshot_bytes=known.links[0][2].size,
                                tail_bytes=tails, max_deltas=self.max_deltas):
                    link = (link_name(len(known.links), channel),
                            link_version(version, known.version), payload)
                    return Chain(version, tuple(value), (*known.links, link), digests)
        payload = codec.encode_link(ChainLink(version, None, 0, list(value)))
        return Chain(version, tuple(value),
                     ((link_name(0, channel), link_version(version), payload),), digests)

    def remember(self, key: ChainKey, chain: Chain) -> None:
        """Record a chain now stored (after its put) or read back (a writer goes on from it)."""
        self._chains[key] = chain
        self._chains.move_to_end(key)
        while len(self._chains) > self.entries:
            self._chains.popitem(last=False)

    def remember_read(self, thread_id: str, ns: str,
                      chains: Mapping[str, tuple[tuple[str, ChainLink], ...]],
                      values: Mapping[str, Any], payloads: Mapping[str, Payload]) -> None:
        """Chains of a checkpoint just read (``codec.chain.resolve_values``): LangGraph
        writes its child next, and its list channels can then go on as deltas."""
        for channel, links in chains.items():
            stored = tuple((name, link_version(link.version, link.base_version), payloads[name])
                           for name, link in links)
            key = (thread_id, ns, channel)
            version = links[-1][1].version
            known = self._chains.get(key)
            # the chain this writer stored, read back byte for byte: its digests hold
            digests = (known.digests if known is not None and known.version == version
                       and known.links == stored else None)
            self.remember(key, Chain(version, tuple(values[channel]), stored, digests))
