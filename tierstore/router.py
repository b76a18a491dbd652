"""The router: which stores serve a thread, and in what order they are read and written.

Read of the latest checkpoint (``hot_check="verify"``)::

    hot.get(t, ns) ─┐ in parallel
    warm.head(t, ns)┴─► hot hit and is_hot_fresh(hit, head)? ── yes ─► serve hit
                                        │ no
                                        ▼
                         warm.get(t, ns) ─► refill hot (best effort) ─► serve

A warm row may be a stub (``location="archived"``): its payload sits in a cold
segment, which is fetched (and cached), verified and unpacked. Reading one archived
checkpoint by itself (``get``: resuming an idle thread, time travel) also rehydrates
it into warm, so a child written next finds every channel value it points to; ``list``
reads history without rehydrating. A segment in a class that needs a restore raises
``CheckpointArchived`` (after starting the restore when ``on_archived="restore"``).

Write::

    offload payloads > threshold ─► warm.put_checkpoint (durable, head CAS)
                                  ─► hot.put (best effort; never fails the write)

The hot tier is an accelerator: any error from it is logged, counted and turned
into a miss. Warm errors propagate, because warm is the system of record.
A thread's stores are chosen by ``Regions`` (a table), so every byte of a thread is
written only to its own region's stores.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from tierstore.codec.segment import Segment, thread_prefix, unpack_segment
from tierstore.errors import CheckpointArchived, ConfigurationError, CorruptPayload, ResidencyError
from tierstore.hotwriter import HotWriter
from tierstore.lease import current_fence
from tierstore.metrics import Metrics
from tierstore.offload import Offloader
from tierstore.policy import is_hot_fresh, matches_filter, merge_writes
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
from tierstore.tiers.base import HotStore, ObjectStore, WarmStore

__all__ = ["Regions", "Router", "Stats", "TierStack"]

log = logging.getLogger("tierstore")
T = TypeVar("T")

DEFAULT_REGION = "default"
HOT_WARNING_INTERVAL = 10.0


@dataclass(slots=True)
class Stats:
    """Counters of one saver; cheap enough to bump on every call."""

    hot_hits: int = 0
    hot_misses: int = 0
    hot_stale: int = 0
    hot_errors: int = 0
    warm_reads: int = 0
    conflicts: int = 0
    offloaded: int = 0
    cold_reads: int = 0
    rehydrated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class TierStack:
    """The stores of one region. ``warm`` is required; the others are optional."""

    warm: WarmStore
    hot: HotStore | None = None
    cold: ObjectStore | None = None
    offloader: Offloader | None = None

    def stores(self) -> list[Any]:
        return [s for s in (self.warm, self.hot, self.cold) if s is not None]


@dataclass(slots=True)
class Regions:
    """Region name → stack, and the rule that picks a thread's region.

    One region named ``default`` is the common case. ``resolve`` maps a thread id
    to a region name, or None when no rule matches.
    """

    stacks: Mapping[str, TierStack]
    resolve: Callable[[str], str | None] = field(default=lambda _thread_id: DEFAULT_REGION)

    def __post_init__(self) -> None:
        if not self.stacks:
            raise ConfigurationError("at least one region is required")

    def stack_for(self, thread_id: str) -> TierStack:
        name = self.resolve(thread_id)
        if name is None:
            raise ResidencyError(f"thread {thread_id!r} matches no region and no default is set")
        try:
            return self.stacks[name]
        except KeyError:
            raise ResidencyError(
                f"thread {thread_id!r} belongs to region {name!r}, which this saver does not "
                f"serve (it serves {', '.join(sorted(self.stacks))})"
            ) from None


class Router:
    """Reads and writes checkpoints through the tier stack of each thread's region."""

    SEGMENT_CACHE = 16

    def __init__(
        self,
        regions: Regions,
        *,
        verify_hot: bool = True,
        on_archived: str = "raise",
        restore_days: int = 7,
        hot_write_delay: float = 0.0,
        local_entries: int = 0,
    ) -> None:
        self.regions = regions
        self.verify_hot = verify_hot
        self.hot_writer = HotWriter(delay=hot_write_delay, guard=self._guard_bool)
        self.on_archived = on_archived
        self.restore_days = restore_days
        self.stats = Stats()
        self.metrics = Metrics()
        self._segments: OrderedDict[tuple[int, str], Segment] = OrderedDict()
        self._last_hot_warning = float("-inf")
        self._near: OrderedDict[tuple[int, str, str], StoredCheckpoint] = OrderedDict()
        self.local_entries = local_entries

    # -- lifecycle --------------------------------------------------------------------

    async def setup(self) -> None:
        done: list[Any] = []
        try:
            for stack in self.regions.stacks.values():
                for store in stack.stores():
                    if any(store is d for d in done):
                        continue
                    await store.setup()
                    done.append(store)
        except BaseException:
            await self._close(done)
            raise

    async def aclose(self) -> None:
        await self.hot_writer.drain()
        seen: list[Any] = []
        for stack in self.regions.stacks.values():
            seen.extend(s for s in stack.stores() if not any(s is x for x in seen))
        await self._close(seen)

    @staticmethod
    async def _close(stores: Sequence[Any]) -> None:
        errors: list[BaseException] = []
        for store in reversed(stores):
            try:
                await store.aclose()
            except Exception as exc:
                errors.append(exc)
        if errors:
            log.warning("errors while closing stores: %s", errors)

    # -- hot tier helpers: never raise --------------------------------------------------

    async def _hot(self, store: HotStore, op: str, call: Awaitable[T], default: T) -> T:
        try:
            return await self.metrics.timed("hot", store, op, call)
        except Exception as exc:
            self.stats.hot_errors += 1
            now = time.monotonic()
            if now - self._last_hot_warning >= HOT_WARNING_INTERVAL:
                self._last_hot_warning = now
                log.warning("hot tier %s failed (%s: %s); serving from warm "
                            "(%d hot errors so far; repeats are logged at most every %.0fs)",
                            op, type(exc).__name__, exc, self.stats.hot_errors,
                            HOT_WARNING_INTERVAL)
            else:
                log.debug("hot tier %s failed: %s", op, exc)
            return default

    # -- reads ------------------------------------------------------------------------

    async def get(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> StoredCheckpoint | None:
        stack = self.regions.stack_for(thread_id)
        record: StoredCheckpoint | None = None
        if checkpoint_id is None and stack.hot is not None:
            record = await self._hot_latest(stack, stack.hot, thread_id, checkpoint_ns)
        if record is None:
            self.stats.warm_reads += 1
            record = await self.metrics.timed(
                "warm", stack.warm, "get", stack.warm.get(thread_id, checkpoint_ns, checkpoint_id))
            if record is not None and record.location == "archived":
                record = await self.materialize(stack, record)
                # Restore on demand: a checkpoint read on its own is about to be resumed
                # (the latest of an idle thread) or forked (time travel). Its child will
                # name the channel versions it did not change, so they must be live in
                # warm again. ``list`` reads history without rehydrating.
                self.stats.rehydrated += await stack.warm.rehydrate([record])
            if record is not None and stack.hot is not None and checkpoint_id is None:
                await self._hot(stack.hot, "fill", stack.hot.put(record), False)
                self._remember(stack, record)
        if record is None:
            return None
        return await self.expand(stack, record)

    async def peek_hot(self, stack: TierStack, thread_id: str, checkpoint_ns: str) -> str | None:
        """The checkpoint id the hot tier holds for a (thread, ns), if any (never raises)."""
        if stack.hot is None:
            return None
        hit = await self._hot(stack.hot, "peek", stack.hot.get(thread_id, checkpoint_ns), None)
        return hit.checkpoint_id if hit is not None else None

    async def head(self, thread_id: str, checkpoint_ns: str) -> Head | None:
        """The warm head of a (thread, ns): what a refusal reports as the current state."""
        return await self._head(self.regions.stack_for(thread_id), thread_id, checkpoint_ns)

    # -- cold -------------------------------------------------------------------------

    async def load_segment(self, stack: TierStack, key: str) -> Segment:
        """Fetch, verify and unpack a segment; a small LRU keeps recent ones."""
        cache_key = (id(stack), key)
        cached = self._segments.get(cache_key)
        if cached is not None:
            self._segments.move_to_end(cache_key)
            return cached
        if stack.cold is None:
            raise CorruptPayload(f"checkpoint archived in {key!r} but no cold tier is configured",
                                 where=key)
        try:
            data = await self.metrics.timed("cold", stack.cold, "get_segment", stack.cold.get(key))
        except CheckpointArchived as exc:
            if self.on_archived == "restore" and exc.restore_state == "not-started":
                state = await stack.cold.restore(key, days=self.restore_days)
                raise CheckpointArchived(
                    f"{exc} (restore requested: {state})", key=exc.key,
                    storage_class=exc.storage_class, restore_state=state,
                    thread_id=exc.thread_id, checkpoint_id=exc.checkpoint_id,
                ) from exc
            raise
        if data is None:
            raise CorruptPayload(f"archive segment {key!r} is missing from the cold tier",
                                 where=key)
        self.stats.cold_reads += 1
        segment = unpack_segment(data, key=key)
        self._segments[cache_key] = segment
        while len(self._segments) > self.SEGMENT_CACHE:
            self._segments.popitem(last=False)
        return segment

    async def materialize(self, stack: TierStack, stub: StoredCheckpoint) -> StoredCheckpoint:
        """The full checkpoint behind an archived stub."""
        if stub.archive_key is None:
            raise CorruptPayload(f"checkpoint {stub.checkpoint_id!r} is archived without a key")
        try:
            segment = await self.load_segment(stack, stub.archive_key)
        except CheckpointArchived as exc:
            exc.thread_id, exc.checkpoint_id = stub.thread_id, stub.checkpoint_id
            raise
        found = segment.records.get(stub.checkpoint_id)
        if found is None:
            raise CorruptPayload(
                f"segment {stub.archive_key!r} does not hold checkpoint {stub.checkpoint_id!r}",
                where=stub.archive_key,
            )
        # a copied thread shares its source's segments: the stub names the thread
        return replace(found, thread_id=stub.thread_id, checkpoint_ns=stub.checkpoint_ns)

    async def drop_unreferenced_segments(self, stack: TierStack, keys: Sequence[str]) -> int:
        """Delete the given segments that no stub refers to any more."""
        if stack.cold is None or not keys:
            return 0
        live = await stack.warm.archive_refs()
        dead = [k for k in keys if k not in live]
        if dead:
            await stack.cold.delete(dead)
            for key in dead:
                self._segments.pop((id(stack), key), None)
        return len(dead)

    async def _guard_bool(self, store: HotStore, op: str, call: Awaitable[bool],
                          default: bool) -> bool:
        return await self._hot(store, op, call, default)

    async def _hot_latest(
        self, stack: TierStack, hot: HotStore, thread_id: str, checkpoint_ns: str
    ) -> StoredCheckpoint | None:
        """The hot copy of the latest checkpoint, if it can be trusted; None otherwise.

        The newest copy this process holds (queued by the write-behind, or read
        recently) is tried first: with ``verify`` it costs only the warm head lookup.
        """
        local = self.hot_writer.peek(hot, thread_id, checkpoint_ns)
        if not self.verify_hot:
            if local is None:
                local = await self._hot(hot, "get", hot.get(thread_id, checkpoint_ns), None)
            self._count_hit(local is not None)
            return local
        near_key = (id(stack), thread_id, checkpoint_ns)
        if local is None:
            local = self._near.get(near_key)
        if local is not None:
            head = await self._head(stack, thread_id, checkpoint_ns)
            if is_hot_fresh(local, head):
                self._count_hit(True)
                if near_key in self._near:
                    self._near.move_to_end(near_key)
                return local
            self._near.pop(near_key, None)
            hit = await self._hot(hot, "get", hot.get(thread_id, checkpoint_ns), None)
        else:
            hit, head = await asyncio.gather(
                self._hot(hot, "get", hot.get(thread_id, checkpoint_ns), None),
                self._head(stack, thread_id, checkpoint_ns),
            )
        if hit is None:
            self._count_hit(False)
            return None
        if not is_hot_fresh(hit, head):
            self.stats.hot_stale += 1
            return None
        self._count_hit(True)
        self._remember(stack, hit)
        return hit

    def _remember(self, stack: TierStack, record: StoredCheckpoint) -> None:
        """Keep a process-local copy of a latest checkpoint (used with ``verify`` only)."""
        if not self.verify_hot or self.local_entries <= 0:
            return
        key = (id(stack), record.thread_id, record.checkpoint_ns)
        self._near[key] = record
        self._near.move_to_end(key)
        while len(self._near) > self.local_entries:
            self._near.popitem(last=False)

    def _count_hit(self, hit: bool) -> None:
        if hit:
            self.stats.hot_hits += 1
        else:
            self.stats.hot_misses += 1

    async def expand(self, stack: TierStack, record: StoredCheckpoint) -> StoredCheckpoint:
        if stack.offloader is None:
            return record
        return await stack.offloader.expand_record(record)

    async def list(
        self, query: ListQuery, residual: Mapping[str, Any], decode_metadata: Callable[
            [StoredCheckpoint], Mapping[str, Any]]
    ) -> AsyncIterator[StoredCheckpoint]:
        """Newest first. Filters the store cannot evaluate are checked here, before ``limit``.

        Without a thread id every region is listed and the streams are merged newest
        first, so one saver over several regions lists like one store.
        """
        if query.thread_id is not None:
            stacks = [self.regions.stack_for(query.thread_id)]
        else:
            stacks = list({id(s): s for s in self.regions.stacks.values()}.values())
        limit = query.limit
        store_query = replace(query, limit=None) if residual else query
        streams = [self._stack_rows(stack, store_query, residual, decode_metadata)
                   for stack in stacks]
        count = 0
        async for record in _merge_newest_first(streams):
            yield record
            count += 1
            if limit is not None and count >= limit:
                return

    async def _head(self, stack: TierStack, thread_id: str, checkpoint_ns: str) -> Head | None:
        return await self.metrics.timed("warm", stack.warm, "head",
                                        stack.warm.head(thread_id, checkpoint_ns))

    async def _stack_rows(
        self, stack: TierStack, query: ListQuery, residual: Mapping[str, Any],
        decode_metadata: Callable[[StoredCheckpoint], Mapping[str, Any]],
    ) -> AsyncIterator[StoredCheckpoint]:
        started = time.perf_counter()
        try:
            async for row in stack.warm.list(query):
                if residual and not matches_filter(decode_metadata(row), residual):
                    continue
                record = await self.materialize(stack, row) if row.location == "archived" else row
                yield await self.expand(stack, record)
        finally:  # the whole listing of one region, however far the caller read
            self.metrics.observe("warm", stack.warm.backend, "list",
                                 time.perf_counter() - started)

    # -- writes -----------------------------------------------------------------------

    async def put(
        self,
        record: CheckpointRecord,
        new_blobs: Sequence[BlobRecord],
        values: Mapping[str, Payload],
        *,
        strict: bool,
    ) -> PutResult:
        stack = self.regions.stack_for(record.thread_id)
        if stack.offloader is not None:
            record, new_blobs, values = await self._shrink(stack.offloader, record, new_blobs,
                                                           values)
        # a lease held in this context on the thread fences the write (see tierstore.lease)
        fence = current_fence(stack.warm, record.thread_id)
        result = await self.metrics.timed(
            "warm", stack.warm, "put_checkpoint",
            stack.warm.put_checkpoint(record, new_blobs, strict=strict, fence=fence))
        if result.conflict:
            self.stats.conflicts += 1
            log.info(
                "concurrent write on thread %r ns %r: parent %r was not the head",
                record.thread_id, record.checkpoint_ns, record.parent_id,
            )
        if stack.hot is not None and result.head.checkpoint_id == record.checkpoint_id:
            cached = StoredCheckpoint(
                thread_id=record.thread_id,
                checkpoint_ns=record.checkpoint_ns,
                checkpoint_id=record.checkpoint_id,
                parent_id=record.parent_id,
                checkpoint=record.checkpoint,
                metadata=record.metadata,
                blobs=values,
                writes=(),
            )
            await self.hot_writer.put(stack.hot, cached)
            self._remember(stack, cached)
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
        small = await offloader.shrink(payloads)
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
        stack = self.regions.stack_for(thread_id)
        fence = current_fence(stack.warm, thread_id)
        if stack.offloader is not None:
            small = await stack.offloader.shrink({id(w.payload): w.payload for w in writes})
            writes = [replace(w, payload=small[id(w.payload)]) for w in writes]
        await self.metrics.timed(
            "warm", stack.warm, "put_writes",
            stack.warm.put_writes(thread_id, checkpoint_ns, checkpoint_id, writes, fence=fence))
        if stack.hot is not None:
            await self.hot_writer.add_writes(stack.hot, thread_id, checkpoint_ns, checkpoint_id,
                                             writes)
            near = self._near.get((id(stack), thread_id, checkpoint_ns))
            if near is not None and near.checkpoint_id == checkpoint_id:
                self._remember(stack, replace(near, writes=merge_writes(near.writes, writes)))

    # -- whole-thread operations --------------------------------------------------------

    async def invalidate_hot(self, stack: TierStack, thread_id: str) -> None:
        """Forget a thread in the hot tier, including updates this process has queued."""
        await self._invalidate(stack, [thread_id])

    async def _invalidate(self, stack: TierStack, thread_ids: Sequence[str]) -> None:
        if stack.hot is not None:
            hot = stack.hot
            for thread_id in thread_ids:
                self.hot_writer.forget(hot, thread_id)
                for key in [k for k in self._near if k[0] == id(stack) and k[1] == thread_id]:
                    del self._near[key]
                await self._hot(hot, "invalidate", hot.invalidate(thread_id), None)

    async def delete_thread(self, thread_id: str) -> None:
        stack = self.regions.stack_for(thread_id)
        await self._invalidate(stack, [thread_id])
        archived = list(await stack.warm.archive_refs(thread_id)) if stack.cold else []
        await stack.warm.delete_thread(thread_id)
        await self._invalidate(stack, [thread_id])
        if stack.cold is not None:
            own = [k async for k in stack.cold.iter_keys(thread_prefix(thread_id))]
            await self.drop_unreferenced_segments(stack, sorted({*archived, *own}))

    async def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        for stack in {id(s): s for s in self.regions.stacks.values()}.values():
            before = list(await stack.warm.archive_refs()) if stack.cold else []
            touched = await stack.warm.delete_for_runs(run_ids)
            await self._invalidate(stack, touched)
            await self.drop_unreferenced_segments(stack, before)

    async def copy_thread(self, source: str, target: str) -> None:
        src, dst = self.regions.stack_for(source), self.regions.stack_for(target)
        if src is not dst:
            raise ResidencyError(
                f"cannot copy thread {source!r} into {target!r}: they live in different regions"
            )
        await dst.warm.copy_thread(source, target)
        await self._invalidate(dst, [target])

    async def prune(self, thread_ids: Sequence[str], *, keep_latest: bool) -> None:
        by_stack: dict[int, tuple[TierStack, list[str]]] = {}
        for thread_id in thread_ids:
            stack = self.regions.stack_for(thread_id)
            by_stack.setdefault(id(stack), (stack, []))[1].append(thread_id)
        for stack, threads in by_stack.values():
            before: builtins.list[str] = []
            if stack.cold is not None:
                for thread_id in threads:
                    before.extend(await stack.warm.archive_refs(thread_id))
            await stack.warm.prune(threads, keep_latest=keep_latest)
            await self._invalidate(stack, threads)
            await self.drop_unreferenced_segments(stack, before)


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
