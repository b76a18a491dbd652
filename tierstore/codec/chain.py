"""Delta chains: a list channel stored as a snapshot plus the items appended since.

LangGraph stores a channel again whole at every new version, so a ``messages`` list
costs the square of its length over a conversation. A new version of a list channel
that extends a version this saver wrote (``new[:n] == old``: ``add_messages``,
``operator.add``) is stored as a *link* that holds only the appended items::

    checkpoint c7 names   ~0~messages @ v3   snapshot: [m1 m2 m3]
                          ~1~messages @ v5   base v3, 3 items before: [m4 m5]
                          ~2~messages @ v7   base v5, 5 items before: [m6 m7]
    read: [m1 m2 m3] + [m4 m5] + [m6 m7]  (each base checked: version and length)

Each link is a blob of its own under a channel name of its own (``~<depth>~<channel>``)
at the version that wrote it, and the checkpoint's stored ``channel_versions`` names
every link of its chain instead of the channel itself. So a checkpoint names every blob
it needs: the warm stores fetch the whole chain in the query they already use for the
latest checkpoint, and everything that decides which blobs are still referenced
(archive moves, prune, run deletes, copies, rehydration, the put-time check for values
archived under a writer) counts the bases as references without knowing about chains.
LangGraph's own ``channel_versions`` (inside the encoded checkpoint) is unchanged.

A link's payload is tagged ``<serde type>+delta`` before compression and encryption,
so it is encrypted like any payload, and a reader that does not know the stage refuses
it instead of returning a shortened list.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tierstore.errors import CorruptPayload

__all__ = [
    "DELTA",
    "LINK_FORMAT",
    "ChainLink",
    "Resolved",
    "channel_of",
    "is_link_name",
    "link_name",
    "link_version",
    "resolve_values",
]

DELTA = "delta"
"""The tag stage of a link payload (innermost: before zstd and encryption)."""
LINK_FORMAT = 1
_LINK = re.compile(r"~(0|[1-9][0-9]{0,3})~(.*)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One link of a chain: the items ``version`` appended to the ``base_len`` items of
    ``base_version`` (a snapshot has no base and holds the whole list)."""

    version: str
    base_version: str | None
    base_len: int
    items: list[Any]

    def body(self) -> list[Any]:
        """What the serde encodes (a plain list, so every serde can carry it)."""
        return [LINK_FORMAT, self.version, self.base_version, self.base_len, self.items]

    @classmethod
    def from_body(cls, body: Any, *, where: str) -> ChainLink:
        if (not isinstance(body, list | tuple) or len(body) != 5 or body[0] != LINK_FORMAT
                or not isinstance(body[1], str)
                or not (body[2] is None or isinstance(body[2], str))
                or isinstance(body[3], bool) or not isinstance(body[3], int) or body[3] < 0
                or not isinstance(body[4], list | tuple)
                or (body[2] is None) != (body[3] == 0)):
            raise CorruptPayload(f"{where}: not a delta link", where=where)
        return cls(body[1], body[2], body[3], list(body[4]))


def link_version(version: str, base: str | None = None) -> str:
    """The version a link is stored at: the channel's, without the zeros that pad its
    integer part to 32 digits (each checkpoint row names every link of its chain, so
    this keeps rows small; the link's payload carries the version in full), and for a
    delta a digest of its base.

    Blobs are stored once per name and version (a second write of one is a no-op), so
    a name and version must always mean the same bytes. A snapshot at a version is
    the channel's value there; a delta is that only together with its base, and two
    writers that knew different chains (a checkpoint stored again by another process)
    may put the same version at the same depth over different bases.
    """
    head, dot, rest = version.partition(".")
    if dot and len(head) == 32 and head.isascii() and head.isdigit():
        version = f"{int(head)}.{rest}"
    if base is None:
        return version
    digest = hashlib.sha256(base.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{version}@{digest}"


def link_name(depth: int, channel: str) -> str:
    """The stored channel name of link ``depth`` (0: the snapshot) of ``channel``."""
    return f"~{depth}~{channel}"


def parse_link_name(name: str) -> tuple[int, str] | None:
    match = _LINK.fullmatch(name)
    return None if match is None else (int(match.group(1)), match.group(2))


def is_link_name(name: str) -> bool:
    return _LINK.fullmatch(name) is not None


def channel_of(name: str) -> str:
    """The channel a stored name belongs to (itself unless it is a link)."""
    parsed = parse_link_name(name)
    return name if parsed is None else parsed[1]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A checkpoint's channel values, and for each chained channel its links in order
    (stored name and link), so that a writer can go on from them."""

    values: dict[str, Any]
    chains: dict[str, tuple[tuple[str, ChainLink], ...]]


def resolve_values(versions: Mapping[str, Any], decoded: Mapping[str, Any], *,
                   where: str) -> Resolved:
    """Channel values from decoded blobs (``ChainLink`` for links), chains replayed.

    ``versions`` is LangGraph's ``channel_versions`` of the checkpoint: a name in it is
    a channel, whatever it looks like. A chain must be whole: links 0..d present, each
    naming the version and length of the one before it, the last one the checkpoint's
    version of the channel. Anything else is ``CorruptPayload`` naming the channel,
    never a shortened list.
    """
    values: dict[str, Any] = {}
    links: dict[str, dict[int, tuple[str, ChainLink]]] = {}
    for name, value in decoded.items():
        parsed = None if name in versions else parse_link_name(name)
        if parsed is None:
            if isinstance(value, ChainLink):
                raise CorruptPayload(f"{where} channel {name!r}: a delta link stored as "
                                     "the channel's value", where=f"{where} channel {name!r}")
            values[name] = value
            continue
        if not isinstance(value, ChainLink):
            raise CorruptPayload(f"{where} channel {parsed[1]!r}: link {parsed[0]} is not a "
                                 "delta link", where=f"{where} channel {parsed[1]!r}")
        links.setdefault(parsed[1], {})[parsed[0]] = (name, value)
    chains: dict[str, tuple[tuple[str, ChainLink], ...]] = {}
    for channel, by_depth in links.items():
        at = f"{where} channel {channel!r}"
        if channel in values:
            continue  # a whole value stored for this version wins; the links are spare
        ordered: list[tuple[str, ChainLink]] = []
        items: list[Any] = []
        for depth in range(len(by_depth)):
            entry = by_depth.get(depth)
            if entry is None:
                raise CorruptPayload(f"{at}: link {depth} of its delta chain is missing "
                                     "(its base is gone)", where=at)
            link = entry[1]
            base = ordered[-1][1].version if ordered else None
            if link.base_version != base or link.base_len != len(items):
                raise CorruptPayload(f"{at}: link {depth} of its delta chain does not follow "
                                     "the link before it", where=at)
            items.extend(link.items)
            ordered.append(entry)
        wanted = versions.get(channel)
        if wanted is None or str(wanted) != ordered[-1][1].version:
            raise CorruptPayload(f"{at}: its delta chain ends at version "
                                 f"{ordered[-1][1].version!r}, not the checkpoint's", where=at)
        values[channel] = items
        chains[channel] = tuple(ordered)
    return Resolved(values, chains)
