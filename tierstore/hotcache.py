"""The latest checkpoint of a thread, as this process and the hot tier hold it.

Three copies of a latest checkpoint exist besides warm: the hot tier's entry, the
write-behind queue (updates not sent yet), and a small process-local LRU (``near``)
of entries read or written lately. ``HotCache`` owns all three for one region, and
one rule decides whether any of them may be served (``policy.is_hot_fresh``).

Read of the latest checkpoint (``hot_check="verify"``)::

    queued/near copy? ── yes ─► warm.head(t, ns) ─► is_hot_fresh(copy, head)? ── yes ─► serve
          │ no                                             │ no: drop the near copy
          ▼                                                ▼
    hot.get(t, ns) ─┐ in parallel                    hot.get(t, ns)
    warm.head(t, ns)┴─► hot hit and is_hot_fresh(hit, head)? ── yes ─► serve hit (kept near)
                                        │ no     (same checkpoint id, same head version)
                                        ▼
                         miss: the router reads warm, then ``fill``s the copy back

Every copy carries the warm head version it was made from. Warm advances that
version with every change to the head, so a copy that missed any change (another
replica's write, an archive move, a delete) is a miss, never a stale hit. With
``hot_check="trusted"`` a queued copy or the hot entry is served without asking warm.

Write-behind: one hot update per (thread, ns) per burst, not one per call. A
LangGraph turn stores several checkpoints and pending writes in quick succession,
and only the last state matters to the next reader. Sending each to Redis costs a
round trip (and its event-loop work) per call; coalescing them costs one::

    aput / aput_writes ──(warm committed)──► pending[(thread, ns)] = newest record (+ writes)
                                             └─ first one arms a timer (``delay``)
    timer fires ─────────────────────────────► hot.put(newest record with its writes)
    aget_tuple(latest) ──────────────────────► pending/in-flight record, checked against
                                               the warm head like any hot hit

Writes are merged into a queued record only when they continue its version exactly
(``policy.chain_writes``), and the hot store keeps whichever copy has the newer
version, so a flush that lost a race can never overwrite a newer entry. Nothing is
lost by waiting: warm already holds every write, and a reader that finds the hot
entry behind warm (another process, or before the timer fires) sees the mismatch
with the warm head and reads warm. ``delay=0`` writes through on every call.

The hot tier is an accelerator: any error from it is logged (at most every 10 s per
saver), counted and turned into a miss. It never fails a read or a write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from tierstore.metrics import Metrics
from tierstore.policy import chain_writes, is_hot_fresh, should_replace_hot
from tierstore.records import Head, StoredCheckpoint, WriteRecord
from tierstore.stats import Stats
from tierstore.tiers.base import HotStore, WarmStore

__all__ = ["HOT_WARNING_INTERVAL", "HotCache", "HotGuard"]

log = logging.getLogger("tierstore")
T = TypeVar("T")

HOT_WARNING_INTERVAL = 10.0

Key = tuple[str, str]  # (thread id, checkpoint ns)


class HotGuard:
    """Turns hot-tier errors into counted misses. One per saver, shared by its regions,
    so an outage of every region's hot tier still logs one warning per interval."""

    def __init__(self, stats: Stats, metrics: Metrics) -> None:
        self.stats = stats
        self.metrics = metrics
        self._last_warning = float("-inf")

    async def __call__(self, store: HotStore, op: str, call: Awaitable[T], default: T) -> T:
        try:
            return await self.metrics.timed("hot", store, op, call)
        except Exception as exc:
            self.stats.hot_errors += 1
            now = time.monotonic()
            if now - self._last_warning >= HOT_WARNING_INTERVAL:
                self._last_warning = now
                log.warning("hot tier %s failed (%s: %s); serving from warm "
                            "(%d hot errors so far; repeats are logged at most every %.0fs)",
                            op, type(exc).__name__, exc, self.stats.hot_errors,
                            HOT_WARNING_INTERVAL)
            else:
                log.debug("hot tier %s failed: %s", op, exc)
            return default


class HotCache:
    """The one owner of a region's latest-checkpoint copies: hot entry, queue, near LRU."""

    def __init__(
        self,
        hot: HotStore,
        warm: WarmStore,
        *,
        guard: HotGuard,
        verify: bool = True,
        delay: float = 0.0,
        local_entries: int = 0,
    ) -> None:
        self.hot = hot
        self.warm = warm
        self.verify = verify
        self.delay = delay
        self.local_entries = local_entries
        self._guard = guard
        self._stats = guard.stats
        self._metrics = guard.metrics
        self._near = _NearCopies(local_entries)
        self._pending: dict[Key, StoredCheckpoint] = {}
        self._inflight: dict[Key, StoredCheckpoint] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._dropped: set[Key] = set()  # hot entries to invalidate unless replaced first
        self._invalidating: dict[str, int] = {}  # thread -> invalidations still on their way
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[None]] = set()

    # -- reads ------------------------------------------------------------------------

    async def latest(self, thread_id: str, checkpoint_ns: str) -> StoredCheckpoint | None:
        """The latest checkpoint of a (thread, ns), if a copy of it can be trusted.

        The newest copy this process holds (queued by the write-behind, or read
        recently) is tried first: with ``verify`` it costs only the warm head lookup.
        """
        hot = self.hot
        local = self.queued(thread_id, checkpoint_ns)
        if not self.verify:
            if thread_id in self._invalidating:  # the hot entry may predate an unanswered write
                self._count_hit(False)
                return None
            if local is None:
                local = await self._guard(hot, "get", hot.get(thread_id, checkpoint_ns), None)
            self._count_hit(local is not None)
            return local
        near_key = (thread_id, checkpoint_ns)
        if local is None:
            local = self._near.get(near_key)
        if local is not None:
            head = await self._head(thread_id, checkpoint_ns)
            if is_hot_fresh(local, head):
                self._count_hit(True)
                self._near.touch(near_key)
                return local
            self._near.pop(near_key)
            hit = await self._guard(hot, "get", hot.get(thread_id, checkpoint_ns), None)
        else:
            hit, head = await asyncio.gather(
                self._guard(hot, "get", hot.get(thread_id, checkpoint_ns), None),
                self._head(thread_id, checkpoint_ns),
            )
        if hit is None:
            self._count_hit(False)
            return None
        if not is_hot_fresh(hit, head):
            self._stats.hot_stale += 1
            return None
        self._count_hit(True)
        self._remember(hit)
        return hit

    async def fill(self, record: StoredCheckpoint) -> None:
        """A latest checkpoint just read from warm (carrying its head version)."""
        await self._guard(self.hot, "fill", self.hot.put(record), False)
        self._remember(record)

    async def peek(self, thread_id: str, checkpoint_ns: str) -> str | None:
        """The checkpoint id the hot tier holds for a (thread, ns), if any (never raises)."""
        hit = await self._guard(self.hot, "peek", self.hot.get(thread_id, checkpoint_ns), None)
        return hit.checkpoint_id if hit is not None else None

    def queued(self, thread_id: str, checkpoint_ns: str) -> StoredCheckpoint | None:
        """The newest state this process has queued or is sending for a (thread, ns)."""
        key = (thread_id, checkpoint_ns)
        pending = self._pending.get(key)
        return pending if pending is not None else self._inflight.get(key)

    async def _head(self, thread_id: str, checkpoint_ns: str) -> Head | None:
        return await self._metrics.timed("warm", self.warm, "head",
                                         self.warm.head(thread_id, checkpoint_ns))

    def _remember(self, record: StoredCheckpoint) -> None:
        """Keep a process-local copy of a latest checkpoint (used with ``verify`` only)."""
        if not self.verify or self.local_entries <= 0:
            return
        self._near.put((record.thread_id, record.checkpoint_ns), record)

    def _count_hit(self, hit: bool) -> None:
        if hit:
            self._stats.hot_hits += 1
        else:
            self._stats.hot_misses += 1

    # -- writes -----------------------------------------------------------------------

    async def put(self, record: StoredCheckpoint) -> None:
        """A new head exactly as warm holds it at ``record.version`` (no writes yet)."""
        await self._queue(record)
        self._remember(record)

    async def drop(self, thread_id: str, checkpoint_ns: str) -> None:
        """Forget one (thread, ns) here and in the hot tier: the new head's content is
        not known exactly (writes may have come before it), so the next reader fills
        the hot tier from warm, version and all.

        When every hit is checked against warm (``verify``) and updates are written
        behind, the hot entry is dropped like it is updated: by the queue, at most
        ``delay`` after the first drop. LangGraph stores a turn's first pending writes
        before its input checkpoint, so this runs once a turn, and the turn's next
        checkpoint, queued within the delay, replaces the entry anyway (a newer version
        always wins): the invalidation is sent only if nothing newer is queued by then.
        No checked reader serves the old entry meanwhile (warm's head moved on); another
        process that trusts hot hits sees it for at most ``delay``, as it sees a put
        that late. A process that trusts its hits would read the old entry itself, so
        it invalidates at once.
        """
        key = (thread_id, checkpoint_ns)
        self._near.pop(key)
        if self.verify and self.delay > 0:
            self._discard(key, keep_timer=True)  # the bound runs from the first drop
            self._dropped.add(key)
            self._arm(key)
            return
        self._discard(key)
        await self._guard(self.hot, "invalidate", self.hot.invalidate(*key), None)

    async def add_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[WriteRecord],
        *,
        version: int,
    ) -> None:
        """Writes stored in warm, which moved the head to ``version``."""
        key = (thread_id, checkpoint_ns)
        queued = False
        if self.delay > 0:
            base = self._pending.get(key) or self._inflight.get(key)
            merged = chain_writes(base, checkpoint_id, writes, version)
            if merged is not None:
                self._pending[key] = merged
                self._arm(key)
                queued = True
        if not queued:
            await self._guard(
                self.hot, "add_writes",
                self.hot.add_writes(thread_id, checkpoint_ns, checkpoint_id, writes,
                                    version=version),
                False,
            )
        near = chain_writes(self._near.get(key), checkpoint_id, writes, version)
        if near is not None:
            self._remember(near)
        else:  # it missed a change (or never was this checkpoint): it can only miss now
            self._near.pop(key)

    # -- invalidation -------------------------------------------------------------------

    async def invalidate(self, thread_ids: Sequence[str], *, floor: int = 0) -> None:
        """Drop the threads' copies here and in the hot tier. A ``floor`` (taken before
        the warm change, ``policy.tombstone_version``) also leaves a tombstone there, so
        another process's queued copy from before cannot come back."""
        self.forget(thread_ids)
        for thread_id in thread_ids:
            await self._guard(self.hot, "invalidate",
                              self.hot.invalidate(thread_id, floor=floor), None)

    def invalidate_soon(self, thread_id: str, *, floor: int) -> None:
        """``invalidate`` for a caller that cannot wait (it was cancelled): this
        process's copies go at once, the hot entry in a task of its own. Until that
        task ends, this process reads the thread from warm even with ``trusted``
        (``verify`` compares every hot copy with warm's head anyway)."""
        self.forget([thread_id])
        self._invalidating[thread_id] = self._invalidating.get(thread_id, 0) + 1

        async def invalidate() -> None:
            try:
                await self._guard(self.hot, "invalidate",
                                  self.hot.invalidate(thread_id, floor=floor), None)
            finally:  # landed or given up: copies read from warm from now on are newer
                left = self._invalidating.pop(thread_id) - 1
                if left:
                    self._invalidating[thread_id] = left

        self._spawn(invalidate())

    def forget(self, thread_ids: Sequence[str]) -> None:
        """Drop this process's copies of the threads: queued hot updates and near entries."""
        for thread_id in thread_ids:
            for key in [k for k in self._pending if k[0] == thread_id]:
                del self._pending[key]
                timer = self._timers.pop(key, None)
                if timer is not None:
                    timer.cancel()
            for key in [k for k in self._inflight if k[0] == thread_id]:
                del self._inflight[key]
            self._near.pop_thread(thread_id)
            self._dropped.difference_update([k for k in self._dropped if k[0] == thread_id])

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` in a task of its own that nobody waits for (kept referenced)."""
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the write-behind queue ---------------------------------------------------------

    async def _queue(self, record: StoredCheckpoint) -> None:
        if self.delay <= 0:
            await self._guard(self.hot, "put", self.hot.put(record), False)
            return
        key = (record.thread_id, record.checkpoint_ns)
        if should_replace_hot(self._pending.get(key), record):
            self._pending[key] = record
        self._arm(key)

    def _discard(self, key: Key, *, keep_timer: bool = False) -> None:
        """Drop the queued update of one (thread, ns): it is older than warm now and no
        exact copy replaces it. An update already in flight is refused by the hot
        store if a newer entry got there first, and fails the freshness check if not."""
        self._pending.pop(key, None)
        self._inflight.pop(key, None)
        if keep_timer:
            return
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _arm(self, key: Key) -> None:
        if key in self._timers:
            return
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(self.delay, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        task = asyncio.get_running_loop().create_task(self._flush(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, key: Key) -> None:
        record = self._pending.pop(key, None)
        dropped = key in self._dropped
        self._dropped.discard(key)
        if record is None:
            if dropped:
                await self._guard(self.hot, "invalidate", self.hot.invalidate(*key), None)
            return
        self._inflight[key] = record
        try:
            await self._guard(self.hot, "put", self.hot.put(record), False)
        finally:
            if self._inflight.get(key) is record:
                del self._inflight[key]

    async def drain(self) -> None:
        """Send everything queued now (on close), wait for sends in flight and for
        invalidations of writes whose callers gave up on them."""
        for timer in self._timers.values():
            timer.cancel()
        keys = list(self._timers)
        self._timers.clear()
        await asyncio.gather(*(self._flush(k) for k in keys), *list(self._tasks))
        if self._background:
            await asyncio.wait(list(self._background))


class _NearCopies:
    """The process-local LRU of latest checkpoints, each thread's namespaces indexed:
    forgetting a thread (a delete, a copy onto it) costs its own entries, not a walk
    over every thread the LRU holds."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._copies: OrderedDict[Key, StoredCheckpoint] = OrderedDict()
        self._namespaces: dict[str, set[str]] = {}

    def get(self, key: Key) -> StoredCheckpoint | None:
        return self._copies.get(key)

    def touch(self, key: Key) -> None:
        if key in self._copies:
            self._copies.move_to_end(key)

    def put(self, key: Key, record: StoredCheckpoint) -> None:
        self._copies[key] = record
        self._copies.move_to_end(key)
        self._namespaces.setdefault(key[0], set()).add(key[1])
        while len(self._copies) > self.size:
            self.pop(next(iter(self._copies)))

    def pop(self, key: Key) -> None:
        if self._copies.pop(key, None) is None:
            return
        namespaces = self._namespaces[key[0]]
        namespaces.discard(key[1])
        if not namespaces:
            del self._namespaces[key[0]]

    def pop_thread(self, thread_id: str) -> None:
        for ns in list(self._namespaces.get(thread_id, ())):
            self.pop((thread_id, ns))

    def __len__(self) -> int:
        return len(self._copies)
