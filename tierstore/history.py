"""What a ``DeltaChannel`` rebuild reads: the writes of a checkpoint's ancestors back to a seed.

A ``DeltaChannel`` stores its value only at snapshots; LangGraph rebuilds it from
the nearest ancestor that stores a value (the seed) plus the pending writes of every
ancestor from that one on. LangGraph's default walk reads one whole checkpoint per
ancestor; here the warm store hands over the chain, cut down to the asked channels,
a page of links per call::

    warm.ancestors(t, ns, id, channels, limit=PAGE) ── links, newest first ──┐
          ▲                                                                  │
          │ chain goes on, channels still unseeded: from the last link's id  │
          └──────────────────────────────────────────────────────────────────┤
    a stub (location="archived")? its values and writes from its segment ◄───┤
          (``Archive.materialize``: a segment is fetched once for many links) │
    per channel: the writes of each link until the one that stores a value ◄┘
          ─► offloaded payloads read back ─► ``ChannelHistory`` per channel
          ─► ``decode_history``: what LangGraph receives, delta chains replayed

The rules are LangGraph's (``BaseCheckpointSaver.get_delta_channel_history``): the
target's own writes and value do not count; a link's writes count for a channel
until, and including, the first link that stores a value for it, whose value is
the seed (a list this saver stored as a delta chain of its own, ``codec.chain``, is
such a value: a channel that was a plain list before it became a ``DeltaChannel``);
the walk ends at the root or at a parent that is not stored, leaving
unseeded channels without a seed. Stubs are read without being rehydrated, as
``list`` reads history. A chain that comes back to a checkpoint it passed (one
stored again under its own descendant) ends there, as in LangGraph's SQLite saver:
LangGraph's default walk would go round it forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langgraph.checkpoint.base import DeltaChannelHistory

from tierstore.codec import Codec
from tierstore.codec.chain import ChainLink as DeltaLink
from tierstore.codec.chain import channel_of, parse_link_name, resolve_values
from tierstore.codec.pipeline import EMPTY
from tierstore.errors import CorruptPayload
from tierstore.metrics import Metrics
from tierstore.records import ChainLink, Payload, StoredCheckpoint, WriteRecord
from tierstore.region import Region

__all__ = ["PAGE", "ChannelHistory", "channel_history", "decode_history"]

PAGE = 200
"""Links per warm call: a DeltaChannel snapshots every 100 updates by default, so one
call usually reaches the seed."""


@dataclass(frozen=True, slots=True)
class ChannelHistory:
    """One channel's history, still encoded: writes oldest first, and the seed if any.

    ``seed`` holds the stored values that make the seed, by stored name: the channel's
    own value, or every link of the delta chain it was stored as (``codec.chain``).
    A warm store hands over a chain only whole (a link it lost makes the channel
    missing at that link, and the walk refuses it); a segment keeps no list of the
    names a checkpoint stored, so for a chain read from one ``seed_checkpoint`` is
    that checkpoint, encoded: its ``channel_versions`` names the version the chain
    must end at.
    """

    writes: tuple[WriteRecord, ...]
    seed: Mapping[str, Payload] | None = None
    seed_checkpoint: Payload | None = None


async def channel_history(
    region: Region,
    metrics: Metrics,
    *,
    thread_id: str,
    checkpoint_ns: str,
    checkpoint_id: str,
    channels: Sequence[str],
) -> dict[str, ChannelHistory]:
    """The history of each channel at ``checkpoint_id``, in a warm call per ``PAGE`` links."""
    asked = list(dict.fromkeys(channels))
    remaining = list(asked)
    per_link: dict[str, list[tuple[WriteRecord, ...]]] = {ch: [] for ch in asked}
    seeds: dict[str, dict[str, Payload]] = {}
    archived_seeds: dict[str, Payload] = {}
    warm = region.warm
    cursor = checkpoint_id
    walked = {checkpoint_id}
    looped = False
    while remaining and not looped:
        links = await metrics.timed("warm", warm, "ancestors", warm.ancestors(
            thread_id, checkpoint_ns, cursor, remaining, limit=PAGE))
        for stored in links:
            if stored.checkpoint_id in walked:
                looped = True
                break
            walked.add(stored.checkpoint_id)
            link, checkpoint = stored, None
            if stored.location == "archived":
                link, checkpoint = await _from_segment(region, thread_id, checkpoint_ns,
                                                       stored, remaining)
            elif stored.missing:
                _check_complete(thread_id, checkpoint_ns, stored, remaining)
            for ch in remaining:
                per_link[ch].append(tuple(w for w in link.writes if w.channel == ch))
            if link.values:
                for ch, stored_values in _seeds(link.values, remaining).items():
                    seeds[ch] = stored_values
                    if checkpoint is not None and ch not in stored_values:  # a chain
                        archived_seeds[ch] = checkpoint
                    remaining.remove(ch)
                if not remaining:
                    break
        if len(links) < PAGE:  # the root, or a parent no longer stored
            break
        cursor = links[-1].checkpoint_id
    return await _expanded(region, thread_id, {
        ch: ChannelHistory(
            writes=tuple(w for writes in reversed(per_link[ch]) for w in writes),
            seed=seeds.get(ch),
            seed_checkpoint=archived_seeds.get(ch),
        )
        for ch in asked
    })


def _seeds(values: Mapping[str, Payload], channels: Sequence[str]
           ) -> dict[str, dict[str, Payload]]:
    """The stored values of a link that seed each of ``channels`` it holds one for: the
    channel's own value, else the links of its delta chain (a whole value wins, as
    ``codec.chain.resolve_values`` has it)."""
    found: dict[str, dict[str, Payload]] = {}
    for name, payload in values.items():
        ch = name if name in channels else channel_of(name)
        if ch in channels:
            found.setdefault(ch, {})[name] = payload
    return {ch: {ch: stored[ch]} if ch in stored else stored for ch, stored in found.items()}


async def _from_segment(region: Region, thread_id: str, checkpoint_ns: str, link: ChainLink,
                        channels: Sequence[str]) -> tuple[ChainLink, Payload]:
    """An archived link with its values and writes read from its segment (merged with
    the writes stored on the stub after the move, as every read of a stub merges them),
    and its encoded checkpoint."""
    stub = StoredCheckpoint(
        thread_id=thread_id, checkpoint_ns=checkpoint_ns, checkpoint_id=link.checkpoint_id,
        parent_id=link.parent_id, checkpoint=EMPTY, metadata=EMPTY, blobs={},
        writes=link.writes, location="archived", archive_key=link.archive_key)
    record = await region.archive.materialize(stub)
    wanted = set(channels)
    writes = sorted((w for w in record.writes if w.channel in wanted),
                    key=lambda w: (w.task_path, w.task_id, w.idx))
    return ChainLink(
        checkpoint_id=link.checkpoint_id,
        parent_id=link.parent_id,
        values={name: p for name, p in record.blobs.items()
                if (name in wanted or channel_of(name) in wanted) and p.tag != EMPTY.tag},
        writes=tuple(writes),
        location="archived",
        archive_key=link.archive_key,
    ), record.checkpoint


def _check_complete(thread_id: str, checkpoint_ns: str, link: ChainLink,
                    channels: Sequence[str]) -> None:
    """A live ancestor that lost an asked value cannot tell whether it is the seed: the
    rebuild would be wrong, so it is refused as a full read of that checkpoint is."""
    lost = [ch for ch in link.missing if ch in channels]
    if not lost:
        return
    where = (f"thread {thread_id!r} ns {checkpoint_ns!r} checkpoint "
             f"{link.checkpoint_id!r}")
    raise CorruptPayload(
        f"{where}: no tier holds the value of channel {lost[0]!r}; "
        "`tierstore verify` lists every such checkpoint",
        where=f"{where} channel {lost[0]!r}", detail=lost)


async def _expanded(region: Region, thread_id: str,
                    histories: Mapping[str, ChannelHistory]) -> dict[str, ChannelHistory]:
    """The histories with their offloaded payloads read back in."""
    offloader = region.offloader
    if offloader is None:
        return dict(histories)

    async def one(history: ChannelHistory) -> ChannelHistory:
        payloads = await asyncio.gather(*(offloader.expand(w.payload, thread_id)
                                          for w in history.writes))
        seed = None
        if history.seed is not None:
            names = list(history.seed)
            seed = dict(zip(names, await asyncio.gather(*(
                offloader.expand(history.seed[name], thread_id) for name in names)),
                strict=True))
        checkpoint = history.seed_checkpoint
        if checkpoint is not None:
            checkpoint = await offloader.expand(checkpoint, thread_id)
        return ChannelHistory(
            writes=tuple(WriteRecord(w.task_id, w.idx, w.channel, p, w.task_path)
                         for w, p in zip(history.writes, payloads, strict=True)),
            seed=seed,
            seed_checkpoint=checkpoint,
        )

    names = list(histories)
    done = await asyncio.gather(*(one(histories[ch]) for ch in names))
    return dict(zip(names, done, strict=True))


def decode_history(codec: Codec, thread_id: str, channel: str,
                   history: ChannelHistory) -> DeltaChannelHistory:
    """One channel's history as LangGraph's ``get_delta_channel_history`` returns it."""
    where = f"thread {thread_id!r} history of channel {channel!r}"
    entry: DeltaChannelHistory = {"writes": [
        (w.task_id, w.channel, codec.decode(w.payload, where=f"{where} write"))
        for w in history.writes
    ]}
    if history.seed is not None:
        entry["seed"] = _decode_seed(codec, channel, history.seed, where=f"{where} seed",
                                     checkpoint=history.seed_checkpoint)
    return entry


def _decode_seed(codec: Codec, channel: str, stored: Mapping[str, Payload], *,
                 where: str, checkpoint: Payload | None = None) -> Any:
    """A seed from its stored values: the channel's own, or the links of the delta
    chain it was stored as, replayed and checked as a read of that checkpoint does.

    The chain must end at the checkpoint's version of the channel. A warm store hands
    over every link the checkpoint names or reports the channel missing, so there the
    chain ends at its deepest link; a chain read from a segment ends at the version its
    encoded ``checkpoint`` names, so that a link the segment lacks, the deepest too, is
    ``CorruptPayload``, never a list missing its last items.
    """
    if channel in stored:
        return codec.decode(stored[channel], where=where)
    decoded = {name: codec.decode(payload, where=where) for name, payload in stored.items()}
    if checkpoint is not None:
        body = codec.decode(checkpoint, where=f"{where} checkpoint")
        named = body.get("channel_versions") if isinstance(body, dict) else None
        version = named.get(channel) if isinstance(named, dict) else None
    else:
        deepest = max(decoded, key=lambda name: (parse_link_name(name) or (-1, ""))[0])
        last = decoded[deepest]
        version = last.version if isinstance(last, DeltaLink) else None
    return resolve_values({channel: version} if version is not None else {}, decoded,
                          where=where).values.get(channel)
