"""The router: the order in which one read or one write touches a thread's stores.

Read of the latest checkpoint::

    region.cache.latest(t, ns) ── fresh copy ──────────────────────────────► serve
          │ miss (none, stale, or hot down; see ``hotcache`` for the freshness rule)
          ▼
    warm.get(t, ns) ─► archived stub? materialize from its segment, rehydrate into warm
          (carries the head version of its own snapshot)
          ─► cache.fill (best effort) ─► expand offloaded payloads ─► serve

A warm row may be a stub (``location="archived"``): its payload sits in a cold
segment (``Archive``). Reading one archived checkpoint by itself (``get``: resuming
an idle thread, time travel) also rehydrates it into warm, so a child written next
finds every channel value it points to; ``list`` reads history without rehydrating.

Write::

    offload payloads > threshold ─► warm.put_checkpoint (durable, head CAS, lease fence)
                                  ─► cache.put / cache.drop (best effort; never fails it)

Warm errors propagate, because warm is the system of record; a warm write that ends
without an answer drops the thread's cached copies (``_unanswered``). A thread's
stores are chosen by ``Regions``, so every byte of a thread is written only to its
own region's stores. Whole-thread operations live in ``tierstore.threads``.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from tierstore import offthread
from tierstore.codec.chain import channel_of
from tierstore.codec.limits import DecodeLimits
from tierstore.codec.pipeline import payload_work
from tierstore.errors import CorruptPayload, MissingBlobs, TierUnavailable
from tierstore.history import ChannelHistory, channel_history
from tierstore.hotcache import HotGuard
from tierstore.lease import current_fence
from tierstore.metrics import Metrics
from tierstore.offload import OFFLOAD_GRACE_SECONDS, Offloader
from tierstore.policy import matches_filter, supply_blobs, tombstone_version
from tierstore.records import (
    BlobRecord,
    CheckpointRecord,
    Head,
    ListQuery,
    Payload,
    PutResult,
    StoredCheckpoint,
    WriteRecord,
)
from tierstore.region import Region, Regions
from tierstore.settings import SaverOptions
from tierstore.stats import Stats
from tierstore.tracing import finish, start_store_span

__all__ = ["Router"]

log = logging.getLogger("tierstore")
T = TypeVar("T")


class Router:
    """Reads and writes checkpoints through the stores and caches of each thread's region."""

    def __init__(
        self,
        regions: Regions,
        *,
        verify_hot: bool = True,
        on_archived: str = "raise",
        hot_write_delay: float = 0.0,
        local_entries: int = 0,
        max_bundle_bytes: int = DecodeLimits().max_bundle_bytes,
        offload_grace: float = OFFLOAD_GRACE_SECONDS,
    ) -> None:
        self.regions = regions
        self.stats = Stats()
        self.metrics = Metrics()
        guard = HotGuard(self.stats, self.metrics)
        for region in regions.distinct():
            region.bind(stats=self.stats, metrics=self.metrics, guard=guard,
                        verify_hot=verify_hot, hot_write_delay=hot_write_delay,
                        local_entries=local_entries, on_archived=on_archived,
                        max_bundle_bytes=max_bundle_bytes, offload_grace=offload_grace)

    @classmethod
    def from_options(cls, regions: Regions, options: SaverOptions) -> Router:
        """The router a saver with these options uses over ``regions``."""
        return cls(regions, verify_hot=options.hot_check == "verify",
                   on_archived=options.on_archived, hot_write_delay=options.hot_write_delay,
                   local_entries=options.hot_local_entries,
                   max_bundle_bytes=options.max_bundle_bytes,
                   offload_grace=options.offload_grace)

    # -- reads ------------------------------------------------------------------------

    async def get(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> StoredCheckpoint | None:
        region = self.regions.for_thread(thread_id)
        cache = region.cache if checkpoint_id is None else None
        record: StoredCheckpoint | None = None
        if cache is not None:
            record = await cache.latest(thread_id, checkpoint_ns)
        if record is None:
            self.stats.warm_reads += 1
            record = await self.metrics.timed(
                "warm", region.warm, "get", region.warm.get(thread_id, checkpoint_ns,
                                                            checkpoint_id))
            if record is not None and record.location == "archived":
                # rehydrating moves the head version: this copy must not be cached as is
                record = replace(await region.archive.materialize(record), version=0)
                # Restore on demand: a checkpoint read on its own is about to be resumed
                # (the latest of an idle thread) or forked (time travel). Its child will
                # name the channel versions it did not change, so they must be live in
                # warm again. ``list`` reads history without rehydrating.
                self.stats.rehydrated += await region.warm.rehydrate([record])
            if record is not None:
                record = _complete(record)  # never cache a partial state
            if record is not None and cache is not None and record.version > 0:
                await cache.fill(record)
        if record is None:
            return None
        return await region.expand(_complete(record))

    async def delta_history(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None,
        channels: Sequence[str],
    ) -> dict[str, ChannelHistory]:
        """Per channel, the writes of the ancestors of a checkpoint back to the nearest
        one that stores a value for it (see ``tierstore.history``), still encoded.

        The latest checkpoint (``checkpoint_id`` None) is found as ``get`` finds it;
        the ancestors cost a warm call per ``history.PAGE`` links, not one per link.
        """
        if checkpoint_id is None:
            target = await self.get(thread_id, checkpoint_ns, None)
            if target is None:
                return {ch: ChannelHistory(writes=()) for ch in channels}
            checkpoint_id = target.checkpoint_id
        return await channel_history(self.regions.for_thread(thread_id), self.metrics,
                                     thread_id=thread_id, checkpoint_ns=checkpoint_ns,
                                     checkpoint_id=checkpoint_id, channels=channels)

    async def head(self, thread_id: str, checkpoint_ns: str) -> Head | None:
        """The warm head of a (thread, ns): what a refusal reports as the current state."""
        warm = self.regions.for_thread(thread_id).warm
        return await self.metrics.timed("warm", warm, "head", warm.head(thread_id, checkpoint_ns))

    async def list(
        self, query: ListQuery, residual: Mapping[str, Any], decode_metadata: Callable[
            [StoredCheckpoint], Mapping[str, Any]]
    ) -> AsyncIterator[StoredCheckpoint]:
        """Newest first. Filters the store cannot evaluate are checked here, before ``limit``.

        Without a thread id every region is listed and the streams are merged newest
        first, so one saver over several regions lists like one store.
        """
        if query.thread_id is not None:
            regions = [self.regions.for_thread(query.thread_id)]
        else:
            regions = self.regions.distinct()
        limit = query.limit
        store_query = replace(query, limit=None) if residual else query
        streams = [self._region_rows(region, store_query, residual, decode_metadata)
                   for region in regions]
        count = 0
        async for record in _merge_newest_first(streams):
            yield record
            count += 1
            if limit is not None and count >= limit:
                return

    async def _region_rows(
        self, region: Region, query: ListQuery, residual: Mapping[str, Any],
        decode_metadata: Callable[[StoredCheckpoint], Mapping[str, Any]],
    ) -> AsyncIterator[StoredCheckpoint]:
        tracer = self.metrics.tracing.tracer()
        span = None if tracer is None else start_store_span(tracer, "warm", region.warm.backend,
                                                            "list")
        error: BaseException | None = None
        started = time.perf_counter()
        try:
            async for row in region.warm.list(query):
                if residual and not matches_filter(await offthread.run(
                        partial(decode_metadata, row), size=payload_work(row.metadata)),
                        residual):
                    continue
                record = await region.archive.materialize(row) if row.location == "archived" \
                    else _complete(row)
                yield await region.expand(record)
        except GeneratorExit:  # the caller stopped reading: not a failure of the store
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:  # the whole listing of one region, however far the caller read
            self.metrics.observe("warm", region.warm.backend, "list",
                                 time.perf_counter() - started)
            if span is not None:
                finish(span, error)
                span.end()

    # -- writes -----------------------------------------------------------------------

    async def put(
        self,
        record: CheckpointRecord,
        new_blobs: Sequence[BlobRecord],
        values: Mapping[str, Payload],
        *,
        strict: bool,
    ) -> PutResult:
        region = self.regions.for_thread(record.thread_id)
        warm = region.warm
        if region.offloader is not None:
            record, new_blobs, values = await self._shrink(region.offloader, record, new_blobs,
                                                           values)
        # a lease held in this context on the thread fences the write (see tierstore.lease)
        fence = current_fence(warm, record.thread_id)
        try:
            result = await self._unanswered(region, record.thread_id, self.metrics.timed(
                "warm", warm, "put_checkpoint",
                warm.put_checkpoint(record, new_blobs, strict=strict, fence=fence)))
        except MissingBlobs as exc:
            # An archive move dropped values the parent's children still name (this
            # writer read the parent before the move, or holds it cached). Their
            # payloads are at hand in ``values``; a channel with no value is empty.
            supplied = supply_blobs(exc.missing, values, new_blobs)
            log.info("thread %r ns %r: %d channel values were archived under the writer; "
                     "storing them again with checkpoint %r", record.thread_id,
                     record.checkpoint_ns, len(exc.missing), record.checkpoint_id)
            result = await self._unanswered(region, record.thread_id, self.metrics.timed(
                "warm", warm, "put_checkpoint",
                warm.put_checkpoint(record, supplied, strict=strict, fence=fence)))
        if result.conflict:
            self.stats.conflicts += 1
            log.info(
                "concurrent write on thread %r ns %r: parent %r was not the head",
                record.thread_id, record.checkpoint_ns, record.parent_id,
            )
        cache = region.cache
        if cache is None or result.head.checkpoint_id != record.checkpoint_id:
            return result
        if result.head.n_writes:
            # LangGraph may store a step's writes before its checkpoint; this process
            # cannot tell whether it saw all of them, so it caches nothing and drops
            # the older entry. The next reader fills hot from warm, version and all.
            await cache.drop(record.thread_id, record.checkpoint_ns,
                             version=result.head.version)
        else:
            # exactly warm at result.head.version: the new head, with no writes yet
            await cache.put(StoredCheckpoint(
                thread_id=record.thread_id,
                checkpoint_ns=record.checkpoint_ns,
                checkpoint_id=record.checkpoint_id,
                parent_id=record.parent_id,
                checkpoint=record.checkpoint,
                metadata=record.metadata,
                blobs=values,
                writes=(),
                version=result.head.version,
            ))
        return result

    async def _shrink(
        self,
        offloader: Offloader,
        record: CheckpointRecord,
        new_blobs: Sequence[BlobRecord],
        values: Mapping[str, Payload],
    ) -> tuple[CheckpointRecord, builtins.list[BlobRecord], dict[str, Payload]]:
        payloads: dict[int, Payload] = {id(record.checkpoint): record.checkpoint}
        payloads.update({id(b.payload): b.payload for b in new_blobs})
        payloads.update({id(p): p for p in values.values()})
        small = await offloader.shrink(payloads, thread_id=record.thread_id)
        self.stats.offloaded += sum(1 for k, p in small.items() if p is not payloads[k])
        return (
            replace(record, checkpoint=small[id(record.checkpoint)]),
            [replace(b, payload=small[id(b.payload)]) for b in new_blobs],
            {ch: small[id(p)] for ch, p in values.items()},
        )

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[WriteRecord],
    ) -> None:
        region = self.regions.for_thread(thread_id)
        warm = region.warm
        fence = current_fence(warm, thread_id)
        if region.offloader is not None:
            small = await region.offloader.shrink({id(w.payload): w.payload for w in writes},
                                                  thread_id=thread_id)
            writes = [replace(w, payload=small[id(w.payload)]) for w in writes]
        version = await self._unanswered(region, thread_id, self.metrics.timed(
            "warm", warm, "put_writes",
            warm.put_writes(thread_id, checkpoint_ns, checkpoint_id, writes, fence=fence)))
        cache = region.cache
        if cache is not None and version is not None:
            await cache.add_writes(thread_id, checkpoint_ns, checkpoint_id, writes,
                                   version=version)

    async def _unanswered(self, region: Region, thread_id: str, write: Awaitable[T]) -> T:
        """Await a warm write; when it ends without an answer, forget the thread's cached copies.

        ``TierUnavailable`` from a write, or the caller giving up on it (cancelled,
        timed out), means no answer came back: the write may have committed (the
        connection dropped after the commit, or the server was just slow). A copy
        cached from before would then be older than warm, and ``hot_check="trusted"``
        serves copies without asking warm, so the thread's copies in this process are
        dropped at once and its hot entry is invalidated (best effort: the hot tier may
        be down too; a caller that gave up does not wait for it). The invalidation
        leaves a tombstone at today's version: the write may land only after a reader
        refilled the hot tier from warm as it was before, so no copy of the thread is
        accepted there for ``hot_ttl`` (it is read from warm meanwhile).
        """
        try:
            return await write
        except TierUnavailable:
            await region.invalidate_hot([thread_id], floor=tombstone_version(time.time()))
            raise
        except (asyncio.CancelledError, TimeoutError):
            cache = region.cache
            if cache is not None:
                cache.invalidate_soon(thread_id, floor=tombstone_version(time.time()))
            raise


def _complete(record: StoredCheckpoint) -> StoredCheckpoint:
    """A live checkpoint that names a channel value warm no longer holds is damaged:
    ``CorruptPayload`` naming the channel, never a state without it (which LangGraph
    would resume from as if the channel had never been written). A missing link of a
    delta chain is named by its channel: the chain cannot be replayed without it."""
    if not record.missing:
        return record
    channels = list(dict.fromkeys(channel_of(name) for name in record.missing))
    where = (f"thread {record.thread_id!r} ns {record.checkpoint_ns!r} checkpoint "
             f"{record.checkpoint_id!r}")
    more = f" (and {len(channels) - 1} more)" if len(channels) > 1 else ""
    raise CorruptPayload(
        f"{where}: no tier holds the value of channel {channels[0]!r}{more}; "
        "`tierstore verify` lists every such checkpoint",
        where=f"{where} channel {channels[0]!r}", detail=channels)


def _order(record: StoredCheckpoint) -> tuple[str, str, str]:
    return (record.checkpoint_id, record.thread_id, record.checkpoint_ns)


async def _merge_newest_first(
    streams: Sequence[AsyncIterator[StoredCheckpoint]],
) -> AsyncIterator[StoredCheckpoint]:
    """Merge streams that are each newest first into one newest-first stream."""
    if len(streams) == 1:
        async for record in streams[0]:
            yield record
        return
    heads: dict[int, StoredCheckpoint] = {}
    for i, stream in enumerate(streams):
        first = await anext(stream, None)
        if first is not None:
            heads[i] = first
    while heads:
        i = max(heads, key=lambda k: _order(heads[k]))
        yield heads[i]
        following = await anext(streams[i], None)
        if following is None:
            del heads[i]
        else:
            heads[i] = following
