"""The router: which stores serve a thread, and in what order they are read and written.

Read of the latest checkpoint (``hot_check="verify"``)::

    hot.get(t, ns) ─┐ in parallel
    warm.head(t, ns)┴─► hot hit and is_hot_fresh(hit, head)? ── yes ─► serve hit
                                        │ no     (same checkpoint id, same head version)
                                        ▼
                         warm.get(t, ns) ─► refill hot (best effort) ─► serve
                         (carries the head version of its own snapshot)

Every copy of a latest checkpoint (hot entry, write-behind queue, the process-local
``_near`` LRU) carries the warm head version it was made from. Warm advances that
version with every change to the head, so a copy that missed any change (another
replica's write, an archive move, a delete) is a miss, never a stale hit.

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
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from tierstore.codec.limits import DecodeLimits
from tierstore.codec.segment import (
    Segment,
    check_segment_key,
    pack_segment,
    segment_key,
    segment_rewrite,
    thread_prefix,
    unpack_segment,
)
from tierstore.errors import (
    CheckpointArchived,
    ConfigurationError,
    CorruptPayload,
    InvalidInput,
    MissingBlobs,
    ResidencyError,
    TierUnavailable,
)
from tierstore.hotwriter import HotWriter
from tierstore.lease import current_fence
from tierstore.metrics import Metrics
from tierstore.offload import (
    COPYING,
    DELETING,
    OFFLOAD_GRACE_SECONDS,
    OFFLOAD_STORAGE_CLASS,
    SWEEPING,
    Offloader,
    copy_space,
    delete_space,
    is_ref,
    ref_key,
    thread_space,
    unreferenced_objects,
    work_marker,
)
from tierstore.policy import (
    chain_writes,
    is_hot_fresh,
    matches_filter,
    merge_writes,
    supply_blobs,
    tombstone_version,
)
from tierstore.records import (
    BlobRecord,
    CheckpointRecord,
    Claim,
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
        max_bundle_bytes: int = DecodeLimits().max_bundle_bytes,
        offload_grace: float = OFFLOAD_GRACE_SECONDS,
    ) -> None:
        self.regions = regions
        self.offload_grace = offload_grace
        self.max_bundle_bytes = max_bundle_bytes
        self.verify_hot = verify_hot
        self.hot_writer = HotWriter(delay=hot_write_delay, guard=self._guard_bool)
        self.on_archived = on_archived
        self.restore_days = restore_days
        self.stats = Stats()
        self.metrics = Metrics()
        self._segments: OrderedDict[tuple[int, str], Segment] = OrderedDict()
        self._last_hot_warning = float("-inf")
        self._near: OrderedDict[tuple[int, str, str], StoredCheckpoint] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()
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
        if self._background:  # hot invalidations of writes their callers gave up on
            await asyncio.wait(list(self._background))
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
                # rehydrating moves the head version: this copy must not be cached as is
                record = replace(await self.materialize(stack, record), version=0)
                # Restore on demand: a checkpoint read on its own is about to be resumed
                # (the latest of an idle thread) or forked (time travel). Its child will
                # name the channel versions it did not change, so they must be live in
                # warm again. ``list`` reads history without rehydrating.
                self.stats.rehydrated += await stack.warm.rehydrate([record])
            if record is not None:
                record = _complete(record)  # never cache a partial state
            if (record is not None and stack.hot is not None and checkpoint_id is None
                    and record.version > 0):
                await self._hot(stack.hot, "fill", stack.hot.put(record), False)
                self._remember(stack, record)
        if record is None:
            return None
        return await self.expand(stack, _complete(record))

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
        """Fetch, verify and unpack a segment; a small LRU keeps recent ones.

        The LRU is safe by key: a segment key is written once and never again (each
        move and rewrite packs under a key of its own, see ``codec.segment``), and the
        key names the digest of its bytes, which is checked here. So a cached segment
        is exactly what every stub naming its key was marked for, and rehydrating from
        it never writes back a record older than what the stub names.
        """
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
        segment = unpack_segment(data, key=key, max_bytes=self.max_bundle_bytes)
        check_segment_key(key, data)
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
        # A copied thread shares its source's segments: the stub names the thread.
        # Writes that landed on the stub after it was archived (an interrupted thread
        # resumed, a run's writes racing the move) sit in warm; warm's are newer.
        return replace(found, thread_id=stub.thread_id, checkpoint_ns=stub.checkpoint_ns,
                       writes=merge_writes(found.writes, stub.writes))

    async def drop_unreferenced_segments(self, stack: TierStack, keys: Sequence[str]) -> int:
        """Delete the given segments that no stub refers to any more.

        Only the given keys are looked up (an indexed lookup each), so the cost follows
        the segments concerned, not the size of the store.
        """
        if stack.cold is None or not keys:
            return 0
        live = await stack.warm.archive_refs(keys=keys)
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
                record = await self.materialize(stack, row) if row.location == "archived" \
                    else _complete(row)
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
        try:
            result = await self._unanswered(stack, record.thread_id, self.metrics.timed(
                "warm", stack.warm, "put_checkpoint",
                stack.warm.put_checkpoint(record, new_blobs, strict=strict, fence=fence)))
        except MissingBlobs as exc:
            # An archive move dropped values the parent's children still name (this
            # writer read the parent before the move, or holds it cached). Their
            # payloads are at hand in ``values``; a channel with no value is empty.
            supplied = supply_blobs(exc.missing, values, new_blobs)
            log.info("thread %r ns %r: %d channel values were archived under the writer; "
                     "storing them again with checkpoint %r", record.thread_id,
                     record.checkpoint_ns, len(exc.missing), record.checkpoint_id)
            result = await self._unanswered(stack, record.thread_id, self.metrics.timed(
                "warm", stack.warm, "put_checkpoint",
                stack.warm.put_checkpoint(record, supplied, strict=strict, fence=fence)))
        if result.conflict:
            self.stats.conflicts += 1
            log.info(
                "concurrent write on thread %r ns %r: parent %r was not the head",
                record.thread_id, record.checkpoint_ns, record.parent_id,
            )
        if stack.hot is None or result.head.checkpoint_id != record.checkpoint_id:
            return result
        if result.head.n_writes:
            # LangGraph may store a step's writes before its checkpoint; this process
            # cannot tell whether it saw all of them, so it caches nothing and drops
            # the older entry. The next reader fills hot from warm, version and all.
            key = (record.thread_id, record.checkpoint_ns)
            self.hot_writer.discard(stack.hot, *key)
            self._near.pop((id(stack), *key), None)
            await self._hot(stack.hot, "invalidate", stack.hot.invalidate(*key), None)
        else:
            # exactly warm at result.head.version: the new head, with no writes yet
            cached = StoredCheckpoint(
                thread_id=record.thread_id,
                checkpoint_ns=record.checkpoint_ns,
                checkpoint_id=record.checkpoint_id,
                parent_id=record.parent_id,
                checkpoint=record.checkpoint,
                metadata=record.metadata,
                blobs=values,
                writes=(),
                version=result.head.version,
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
        stack = self.regions.stack_for(thread_id)
        fence = current_fence(stack.warm, thread_id)
        if stack.offloader is not None:
            small = await stack.offloader.shrink({id(w.payload): w.payload for w in writes},
                                                 thread_id=thread_id)
            writes = [replace(w, payload=small[id(w.payload)]) for w in writes]
        version = await self._unanswered(stack, thread_id, self.metrics.timed(
            "warm", stack.warm, "put_writes",
            stack.warm.put_writes(thread_id, checkpoint_ns, checkpoint_id, writes, fence=fence)))
        if stack.hot is not None and version is not None:
            await self.hot_writer.add_writes(stack.hot, thread_id, checkpoint_ns, checkpoint_id,
                                             writes, version=version)
            near_key = (id(stack), thread_id, checkpoint_ns)
            merged = chain_writes(self._near.get(near_key), checkpoint_id, writes, version)
            if merged is not None:
                self._remember(stack, merged)
            else:  # it missed a change (or never was this checkpoint): it can only miss now
                self._near.pop(near_key, None)

    async def _unanswered(self, stack: TierStack, thread_id: str, write: Awaitable[T]) -> T:
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
            await self._invalidate(stack, [thread_id], floor=tombstone_version(time.time()))
            raise
        except (asyncio.CancelledError, TimeoutError):
            self._forget_here(stack, [thread_id])
            if stack.hot is not None:
                hot, floor = stack.hot, tombstone_version(time.time())
                self._spawn(self._hot(hot, "invalidate", hot.invalidate(thread_id, floor=floor),
                                      None))
            raise

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` in a task of its own that nobody waits for (kept referenced)."""
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- whole-thread operations --------------------------------------------------------

    async def invalidate_hot(self, stack: TierStack, thread_id: str) -> None:
        """Forget a thread in the hot tier, including updates this process has queued."""
        await self._invalidate(stack, [thread_id])

    async def _invalidate(
        self, stack: TierStack, thread_ids: Sequence[str], *, floor: int = 0
    ) -> None:
        """Drop the threads' cached copies here and in the hot tier. A ``floor`` (taken
        before the warm change, ``policy.tombstone_version``) also leaves a tombstone
        there, so another process's queued copy from before cannot come back."""
        if stack.hot is not None:
            hot = stack.hot
            self._forget_here(stack, thread_ids)
            for thread_id in thread_ids:
                await self._hot(hot, "invalidate", hot.invalidate(thread_id, floor=floor), None)

    def _forget_here(self, stack: TierStack, thread_ids: Sequence[str]) -> None:
        """Drop this process's copies of the threads: queued hot updates and near entries."""
        if stack.hot is None:
            return
        for thread_id in thread_ids:
            self.hot_writer.forget(stack.hot, thread_id)
            for key in [k for k in self._near if k[0] == id(stack) and k[1] == thread_id]:
                del self._near[key]

    async def delete_thread(self, thread_id: str) -> None:
        """Delete a thread from every tier: warm rows, hot entries, offloaded objects, segments.

        ::

            marker ─► warm delete ─► hot invalidate ─► segments no stub names
                   ─► the thread's offloaded objects ─► marker removed

        A crash after the warm delete leaves the marker, and ``ColdGC`` finishes the
        job after its grace period. A segment a copy still names is compacted to the
        checkpoints the copy names (the copy's own data), and goes with the copy.
        """
        stack = self.regions.stack_for(thread_id)
        floor = tombstone_version(time.time())
        await self._invalidate(stack, [thread_id], floor=floor)
        archived = list(await stack.warm.archive_refs(thread_id)) if stack.cold else []
        marker = await self._mark(stack, DELETING, thread_id)
        await stack.warm.delete_thread(thread_id)
        await self._invalidate(stack, [thread_id], floor=floor)
        await self._purge_cold(stack, thread_id, archived)
        await self._unmark(stack, marker)

    async def expire_thread(self, thread_id: str, heads: Sequence[Claim], *, owner: str,
                            now: float, keep_latest: bool) -> bool:
        """Retention's delete (or prune to the newest checkpoints) of a claimed thread,
        done only if warm finds the thread unchanged since ``heads`` were claimed.

        The warm store decides in the same atomic step as its delete, so a turn
        committed after the claim keeps the whole thread; the cold side is touched
        only after warm said yes. Returns whether the thread was expired.
        """
        stack = self.regions.stack_for(thread_id)
        archived = list(await stack.warm.archive_refs(thread_id)) if stack.cold else []
        started = time.time()
        marker = await self._mark(stack, SWEEPING if keep_latest else DELETING, thread_id)
        floor = tombstone_version(time.time())
        if not await stack.warm.expire_thread(thread_id, heads, owner=owner, now=now,
                                              keep_latest=keep_latest):
            await self._unmark(stack, marker)
            return False
        await self._invalidate(stack, [thread_id], floor=floor)
        if keep_latest:
            for key in sorted(set(archived)):
                await self.compact_segment(stack, key)
            _, spared = await self.drop_unnamed_objects(stack, [thread_id], started=started)
            if spared:  # the marker stays: ColdGC sweeps the rest once they are old enough
                return True
        else:
            await self._purge_cold(stack, thread_id, archived)
        await self._unmark(stack, marker)
        return True

    async def _purge_cold(self, stack: TierStack, thread_id: str, archived: Sequence[str]
                          ) -> None:
        """The cold side of a thread delete: its segments and its objects.

        A segment a copy still names is compacted to what the copy names.
        """
        if stack.cold is not None:
            own = [k async for k in stack.cold.iter_keys(thread_prefix(thread_id))]
            keys = sorted({*archived, *own})
            named = await stack.warm.archive_refs(keys=keys)
            for key in keys:
                if key in named:
                    await self.compact_segment(stack, key)
            await self.drop_unreferenced_segments(stack, [k for k in keys if k not in named])
        if stack.offloader is not None:
            await delete_space(stack.offloader.store, thread_id)

    @staticmethod
    async def _mark(stack: TierStack, kind: str, thread_id: str) -> str | None:
        """Leave a note that a thread's offloaded objects are being deleted, copied in or
        swept (``ColdGC`` finishes the work if the note outlives its grace period)."""
        if stack.offloader is None:
            return None
        key, body = work_marker(kind, thread_id)
        await stack.offloader.store.put(key, body, storage_class=OFFLOAD_STORAGE_CLASS)
        return key

    @staticmethod
    async def _unmark(stack: TierStack, marker: str | None) -> None:
        if marker is not None and stack.offloader is not None:
            await stack.offloader.store.delete([marker])

    async def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints of some runs from every tier.

        A segment is shared by the checkpoints of one (thread, ns), whichever run
        wrote them, and by every copy of the thread. So the segments holding archived
        checkpoints of these runs are found first (one indexed lookup by run) and
        rewritten without them, the kept stubs moving to the new segment; only then
        are the runs deleted from warm, and the old segments, named by nothing any
        more, deleted::

            stubs of the runs ─► rewrite their segments, move the kept stubs
                ─► warm delete ─► hot invalidate ─► old segments ─► unnamed objects

        A call cut short before the warm delete is finished by calling it again (the
        runs' stubs still name the old segments); after it, what is left is named by
        nothing: old segments go with ``ColdGC``, and so do the offloaded objects of
        each touched thread (a marker names the thread until they are swept).
        """
        for stack in {id(s): s for s in self.regions.stacks.values()}.values():
            started = time.time()
            doomed: dict[str, set[str]] = {}
            while stack.cold is not None:
                # a worker may archive more of these runs while their segments are being
                # rewritten: look again until no new segment holds them
                found = await stack.warm.archive_stubs(run_ids=run_ids)
                fresh = {k: v for k, v in found.items() if doomed.get(k) != v}
                if not fresh:
                    break
                for key in sorted(fresh):
                    await self.rewrite_segment(stack, key, fresh[key])
                doomed.update(fresh)
            floor = tombstone_version(time.time())
            touched = await stack.warm.delete_for_runs(run_ids)
            markers = [await self._mark(stack, SWEEPING, t) for t in touched]
            await self._invalidate(stack, touched, floor=floor)
            await self.drop_unreferenced_segments(stack, sorted(doomed))
            await self._sweep(stack, touched, markers, started=started)

    async def drop_unnamed_objects(self, stack: TierStack, thread_ids: Sequence[str], *,
                                   started: float) -> tuple[int, int]:
        """After some checkpoints of these threads were deleted, delete the offloaded
        objects that none of their remaining rows (live, or archived in segments) name
        and that were written at least ``offload_grace`` seconds before ``started``.

        Returns ``(dropped, spared)``: spared are unnamed objects too young to tell from
        a put in flight; the caller leaves its sweep marker, so ``ColdGC`` looks at the
        thread again once they are old enough.
        """
        if stack.offloader is None:
            return 0, 0
        store = stack.offloader.store
        dropped = spared = 0
        for thread_id in thread_ids:
            named = await self._named_objects(stack, thread_id)
            if named is None:
                spared += 1  # a segment could not be read: look again later
                continue
            objects: dict[str, float] = {}
            async for key in store.iter_keys(thread_space(thread_id)):
                if key not in named:
                    info = await store.info(key)
                    objects[key] = info.modified if info is not None else 0.0
            dead, young = unreferenced_objects(objects, named, started=started,
                                               grace=self.offload_grace)
            if dead:
                await store.delete(dead)
                dropped += len(dead)
            spared += len(young)
        return dropped, spared

    async def _sweep(self, stack: TierStack, thread_ids: Sequence[str], markers: Sequence[Any],
                     *, started: float) -> None:
        """Drop each thread's unnamed objects; its marker goes only when none was spared."""
        for thread_id, marker in zip(thread_ids, markers, strict=True):
            _, spared = await self.drop_unnamed_objects(stack, [thread_id], started=started)
            if not spared:
                await self._unmark(stack, marker)

    async def _named_objects(self, stack: TierStack, thread_id: str) -> set[str] | None:
        """Every offloaded object a thread's rows name; None when a segment of it cannot
        be read now (then nothing of the thread may be deleted)."""
        named: set[str] = set()
        async for stored in stack.warm.list(ListQuery(thread_id=thread_id)):
            row = stored
            if stored.location == "archived":
                try:
                    row = await self.materialize(stack, stored)
                except (CheckpointArchived, CorruptPayload) as exc:
                    log.warning("thread %r: offloaded objects of deleted checkpoints stay until "
                                "its archive is readable: %s", thread_id, exc)
                    return None
            payloads = (row.checkpoint, *row.blobs.values(), *(w.payload for w in row.writes))
            named.update(ref_key(p, thread_id) for p in payloads if is_ref(p))
        return named

    async def rewrite_segment(self, stack: TierStack, key: str, removed: Set[str]) -> str | None:
        """Write a segment again without the checkpoints ``removed``; returns the new key.

        ::

            named by a stub? ─ no ─► nothing to do
                 │ yes
            read, verify ─► pack the rest ─► put new key ─► read back, verify
                 ─► re-point the stubs of the kept checkpoints

        The old segment is left for the caller to drop once the stubs of ``removed``
        are gone (``drop_unreferenced_segments``). A crash at any step loses nothing:
        the old segment stays while any stub names it, and a new segment nobody names
        yet is an orphan for ``ColdGC``. A segment that must be restored first
        (Glacier), or that is damaged or missing, is left as it is, with a warning.
        """
        if stack.cold is None:
            return None
        new_key: str | None = None
        if await stack.warm.archive_refs(keys=[key]):
            try:
                segment = await self.load_segment(stack, key)
            except (CheckpointArchived, CorruptPayload) as exc:
                # a delete is never refused for the archive's sake: what it removes from
                # warm goes; the segment stays as it is for the stubs that name it
                log.warning("segment %r cannot be read (%s); deleted checkpoints stay in it "
                            "until it can", key, exc)
                return None
            plan = segment_rewrite(segment.records, removed)
            if plan:
                data = pack_segment([segment.records[c] for c in plan],
                                    created_at=segment.created_at)
                new_key = segment_key(segment.thread_id, segment.checkpoint_ns, data,
                                      nonce=uuid.uuid4().hex)
                info = await stack.cold.info(key)
                await stack.cold.put(new_key, data,
                                     storage_class=info.storage_class if info else None)
                await self._verify_cold(stack, new_key, data)
                await stack.warm.repoint_archive(key, new_key, plan)
        return new_key

    @staticmethod
    async def _verify_cold(stack: TierStack, key: str, data: bytes) -> None:
        """The rewritten segment is read back before any stub is moved to it."""
        assert stack.cold is not None
        info = await stack.cold.info(key)
        if info is None or info.size != len(data):
            raise CorruptPayload(f"segment {key!r} did not land intact in the cold tier",
                                 where=key)
        if info.readable and await stack.cold.get(key) != data:
            raise CorruptPayload(f"segment {key!r} reads back different bytes", where=key)

    async def copy_thread(self, source: str, target: str) -> None:
        src, dst = self.regions.stack_for(source), self.regions.stack_for(target)
        if src is not dst:
            raise ResidencyError(
                f"cannot copy thread {source!r} into {target!r}: they live in different regions"
            )
        # the copy's references resolve in its own space: objects first, rows second
        marker = await self._mark(dst, COPYING, target)
        if dst.offloader is not None and source != target:
            await copy_space(dst.offloader.store, source, target)
        floor = tombstone_version(time.time())
        await dst.warm.copy_thread(source, target)
        await self._unmark(dst, marker)
        await self._invalidate(dst, [target], floor=floor)

    async def publish_thread(self, source: str, target: str, *, replace: bool) -> None:
        """``copy_thread`` for an import: refuses a target with checkpoints unless
        ``replace``, and then swaps the target's rows for the copy in one warm step.

        The old target's segments and offloaded objects that nothing names any more
        are deleted after that step (an interrupted clean-up leaves only unnamed
        bytes, which a later delete or ``ColdGC`` removes).
        """
        src, dst = self.regions.stack_for(source), self.regions.stack_for(target)
        if src is not dst:
            raise ResidencyError(
                f"cannot publish thread {source!r} as {target!r}: they live in different regions"
            )
        archived = list(await dst.warm.archive_refs(target)) if replace and dst.cold else []
        started = time.time()
        marker = await self._mark(dst, COPYING, target)
        if dst.offloader is not None and source != target:
            await copy_space(dst.offloader.store, source, target)
        try:
            await dst.warm.publish_thread(source, target, replace=replace)
        except InvalidInput:
            # refused: nothing was published. Objects copied into the target's space
            # stay until that thread is deleted (an object a put in flight is about
            # to name cannot be told apart from them).
            await self._unmark(dst, marker)
            raise
        finally:
            await self._invalidate(dst, [target])
        if replace:
            await self.drop_unreferenced_segments(dst, archived)
            _, spared = await self.drop_unnamed_objects(dst, [target], started=started)
            if spared:  # the marker stays: ColdGC sweeps the rest once they are old enough
                return
        await self._unmark(dst, marker)

    async def prune(self, thread_ids: Sequence[str], *, keep_latest: bool) -> None:
        by_stack: dict[int, tuple[TierStack, list[str]]] = {}
        for thread_id in thread_ids:
            stack = self.regions.stack_for(thread_id)
            by_stack.setdefault(id(stack), (stack, []))[1].append(thread_id)
        for stack, threads in by_stack.values():
            if not keep_latest:  # the "delete" strategy deletes whole threads
                for thread_id in threads:
                    await self.delete_thread(thread_id)
                continue
            before: builtins.list[str] = []
            if stack.cold is not None:
                for thread_id in threads:
                    before.extend(await stack.warm.archive_refs(thread_id))
            started = time.time()
            markers = [await self._mark(stack, SWEEPING, t) for t in threads]
            floor = tombstone_version(time.time())
            await stack.warm.prune(threads, keep_latest=keep_latest)
            await self._invalidate(stack, threads, floor=floor)
            for key in sorted(set(before)):
                await self.compact_segment(stack, key)
            await self._sweep(stack, threads, markers, started=started)

    async def compact_segment(self, stack: TierStack, key: str) -> None:
        """Rewrite a segment to the checkpoints stubs (of any thread) still name, or drop it.

        Used after a prune or a thread delete, when the stubs gone are not known in
        advance: what stays is derived from the stubs left, so running it again (a
        later prune or delete of any thread naming the segment) finishes what a crash
        cut short. Every stub moves to the new segment, so the old one is dropped.
        """
        if stack.cold is None:
            return
        named = (await stack.warm.archive_stubs(keys=[key])).get(key, set())
        if named:
            try:
                segment = await self.load_segment(stack, key)
            except (CheckpointArchived, CorruptPayload) as exc:
                log.warning("segment %r cannot be read (%s); deleted checkpoints stay in it "
                            "until it can", key, exc)
                return
            await self.rewrite_segment(stack, key, set(segment.records) - named)
        await self.drop_unreferenced_segments(stack, [key])


def _complete(record: StoredCheckpoint) -> StoredCheckpoint:
    """A live checkpoint that names a channel value warm no longer holds is damaged:
    ``CorruptPayload`` naming the channel, never a state without it (which LangGraph
    would resume from as if the channel had never been written)."""
    if not record.missing:
        return record
    where = (f"thread {record.thread_id!r} ns {record.checkpoint_ns!r} checkpoint "
             f"{record.checkpoint_id!r}")
    more = f" (and {len(record.missing) - 1} more)" if len(record.missing) > 1 else ""
    raise CorruptPayload(
        f"{where}: no tier holds the value of channel {record.missing[0]!r}{more}; "
        "`tierstore verify` lists every such checkpoint",
        where=f"{where} channel {record.missing[0]!r}", detail=list(record.missing))


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
