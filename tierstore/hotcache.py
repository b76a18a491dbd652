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
``hot_check="trusted"`` a queued copy or the hot entry is served without asking warm,
unless a hot update of it failed since the last one that landed: such a doubtful entry
is read from warm and invalidated once the hot tier answers again (``_send``).

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

Deletes win across savers. One process may run several savers over the same stores
(LangGraph's Agent Server opens one per event loop): each has its own queue and near
copies, and with ``memory://`` its own hot tier. A delete, prune, run delete or copy
onto a thread leaves a version floor (``policy.tombstone_version``) in ``HotPeers``,
shared by every cache of the process over the same hot entries (one Redis database
and prefix; for in-process hot tiers, one warm store): no copy at or below it is
served, queued, flushed or filled by any of them, on any event loop, and each peer
drops its copies (and its own ``memory://`` entries) at once on its loop. Redis keeps
the same floor as a tombstone for other processes.

The hot tier is an accelerator: any error from it is logged (at most every 10 s per
saver), counted and turned into a miss. It never fails a read or a write.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from tierstore.metrics import Metrics
from tierstore.policy import chain_writes, is_hot_fresh, should_replace_hot
from tierstore.records import Head, StoredCheckpoint, WriteRecord
from tierstore.stats import Stats
from tierstore.tiers.base import HotStore, WarmStore
from tierstore.tracing import note_hot_error

__all__ = ["HOT_WARNING_INTERVAL", "HotCache", "HotGuard", "HotPeers"]

log = logging.getLogger("tierstore")
T = TypeVar("T")

HOT_WARNING_INTERVAL = 10.0

Key = tuple[str, str]  # (thread id, checkpoint ns)
DOUBT_RETRIES = 3  # tries of the repair on close, ``DOUBT_RETRY_WAIT`` apart
DOUBT_RETRY_WAIT = 0.5
_FAILED: Any = object()
FLOOR_ENTRIES = 100_000  # threads whose floor ``HotPeers`` keeps at most (oldest go first)
DEFAULT_FLOOR_TTL = 3600.0  # a floor's life when the hot store names no ttl


class HotPeers:
    """The hot caches of this process that front the same hot entries, and the version
    floors deletes left for them: no copy of a thread at or below its floor is used.

    Thread-safe: savers on several event loops share it. A floor lives as long as the
    hot tier keeps an entry (its ttl), the longest any copy from before it can last.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._caches: weakref.WeakSet[HotCache] = weakref.WeakSet()
        self._floors: OrderedDict[str, tuple[float, int]] = OrderedDict()
        # the newest head version a cache of this process saw warm commit, per (thread,
        # ns): a trusted copy below it is behind a peer's write that has not reached the
        # hot tier yet (its write-behind, or a hot write that failed)
        self._heads: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def seen(self, thread_id: str, checkpoint_ns: str, version: int, *, ttl: float) -> None:
        """Warm holds this (thread, ns) at ``version`` or later."""
        key = (thread_id, checkpoint_ns)
        until = time.monotonic() + ttl
        with self._lock:
            item = self._heads.get(key)
            if item is None or item[1] <= version:
                self._heads[key] = (until, version)
                self._heads.move_to_end(key)
                while len(self._heads) > FLOOR_ENTRIES:
                    self._heads.popitem(last=False)

    def newest(self, thread_id: str, checkpoint_ns: str) -> int:
        """The newest head version seen committed for a (thread, ns); 0 if none lately."""
        with self._lock:
            item = self._heads.get((thread_id, checkpoint_ns))
            if item is None:
                return 0
            if item[0] <= time.monotonic():
                del self._heads[(thread_id, checkpoint_ns)]
                return 0
            return item[1]

    def join(self, cache: HotCache) -> None:
        with self._lock:
            self._caches.add(cache)

    def leave(self, cache: HotCache) -> None:
        with self._lock:
            self._caches.discard(cache)

    def floor(self, thread_id: str) -> int:
        if not self._floors:  # the common case: no delete lately, no lock
            return 0
        with self._lock:
            return self._floor(thread_id)

    def _floor(self, thread_id: str) -> int:
        item = self._floors.get(thread_id)
        if item is None:
            return 0
        if item[0] <= time.monotonic():
            del self._floors[thread_id]
            return 0
        return item[1]

    def raise_floor(self, thread_ids: Sequence[str], floor: int, *, ttl: float
                    ) -> list[HotCache]:
        """Record the floor of each thread (kept if higher already); the caches to tell."""
        until = time.monotonic() + ttl
        with self._lock:
            for thread_id in thread_ids:
                self._floors[thread_id] = (until, max(floor, self._floor(thread_id)))
                self._floors.move_to_end(thread_id)
            while len(self._floors) > FLOOR_ENTRIES:
                self._floors.popitem(last=False)
            return list(self._caches)


_PEERS: weakref.WeakValueDictionary[Hashable, HotPeers] = weakref.WeakValueDictionary()
_PEERS_LOCK = threading.Lock()


def peers_of(hot: HotStore, warm: WarmStore) -> HotPeers:
    """The ``HotPeers`` of a hot store in this process.

    A hot store that names a shared place (``identity``: the Redis server, database and
    key prefix; ``aliases``: other names of it) is grouped with every store naming the
    same; an in-process one (``memory://``) with those in front of the same warm store
    (its ``identity``, else the object).
    """
    shared = getattr(hot, "identity", None)
    if shared is not None:
        keys: list[Hashable] = [("hot", name) for name in (shared, *getattr(hot, "aliases", ()))]
    else:
        place = getattr(warm, "identity", None)
        keys = [("warm", place) if place is not None else ("object", warm)]
    with _PEERS_LOCK:
        # the group of the first name already known (a store whose server never answered
        # is known by its spelling only); every name of this store joins that group
        peers = next((p for p in map(_PEERS.get, keys) if p is not None), None) or HotPeers()
        for key in keys:
            _PEERS.setdefault(key, peers)
        return peers


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
            note_hot_error(op, exc)
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
        # hot entries that may be behind warm (``trusted`` only): thread -> ns (None:
        # every ns) -> what failed. See ``_send``.
        self._doubts: dict[str, dict[str | None, _Doubt]] = {}
        self._ticks = itertools.count(1)
        self._repairing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[None]] = set()
        # deletes through any saver of this process over the same hot entries
        self._peers = peers_of(hot, warm)
        self._shared_hot = getattr(hot, "identity", None) is not None
        self._floor_ttl = float(getattr(hot, "ttl", DEFAULT_FLOOR_TTL))
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- peers --------------------------------------------------------------------------

    def open(self) -> None:
        """Serve from the running event loop: peers tell this cache of deletes there.
        Called once the stores are set up, when the hot store knows its server's name."""
        self._loop = asyncio.get_running_loop()
        self._peers = peers_of(self.hot, self.warm)
        self._peers.join(self)

    def close(self) -> None:
        self._peers.leave(self)
        self._loop = None

    def _seen(self, thread_id: str, checkpoint_ns: str, version: int) -> None:
        """A write of this process moved warm's head to ``version`` (``HotPeers.seen``):
        kept as long as the hot tier keeps an entry, the longest a copy can lag."""
        if version > 0:
            self._peers.seen(thread_id, checkpoint_ns, version, ttl=self._floor_ttl)

    def _usable(self, record: StoredCheckpoint) -> bool:
        """Whether a copy is above the floor a delete of its thread left (``HotPeers``)."""
        return record.version > self._peers.floor(record.thread_id)

    def _floor_raised(self, thread_ids: Sequence[str], floor: int) -> list[Awaitable[Any]]:
        """Record a delete's floor, and drop every peer's copies below it: at once for the
        peers on this loop (their in-process hot entries by the awaitables returned), on
        their own loop for the others (meanwhile the floor keeps them from being used)."""
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        sends: list[Awaitable[Any]] = []
        for peer in self._peers.raise_floor(thread_ids, floor, ttl=self._floor_ttl):
            loop = peer._loop
            if peer is self or loop is None:
                continue
            if loop is here:
                sends.extend(peer._below_floor(thread_ids, floor))
                continue
            with contextlib.suppress(RuntimeError):  # a closed loop serves nothing any more
                loop.call_soon_threadsafe(peer._below_floor_soon, thread_ids, floor)
        return sends

    def _below_floor(self, thread_ids: Sequence[str], floor: int) -> list[Awaitable[Any]]:
        """Drop this cache's copies of the threads at or below ``floor`` (another saver
        deleted them); the invalidations of this cache's own in-process hot entries."""
        for thread_id in thread_ids:
            for key in [k for k, r in self._pending.items()
                        if k[0] == thread_id and r.version <= floor]:
                self._discard(key)
            for key in [k for k, r in self._inflight.items()
                        if k[0] == thread_id and r.version <= floor]:
                del self._inflight[key]
            self._near.pop_thread(thread_id)
        if self._shared_hot:  # the deleting saver invalidated the shared entries
            return []
        return [self._send("invalidate", self.hot.invalidate(t, floor=floor), (t, None),
                           floor=floor) for t in thread_ids]

    def _below_floor_soon(self, thread_ids: Sequence[str], floor: int) -> None:
        for send in self._below_floor(thread_ids, floor):
            self._spawn(send)

    # -- reads ------------------------------------------------------------------------

    async def latest(self, thread_id: str, checkpoint_ns: str) -> StoredCheckpoint | None:
        """The latest checkpoint of a (thread, ns), if a copy of it can be trusted.

        The newest copy this process holds (queued by the write-behind, or read
        recently) is tried first: with ``verify`` it costs only the warm head lookup.
        """
        hot = self.hot
        local = self.queued(thread_id, checkpoint_ns)
        if not self.verify:
            if local is None:
                if self.doubtful(thread_id, checkpoint_ns):  # the entry may be behind warm
                    self._count_hit(False)
                    return None
                local = await self._guard(hot, "get", hot.get(thread_id, checkpoint_ns), None)
                if local is not None and not self._usable(local):  # a deleted thread's
                    self._stats.hot_stale += 1
                    local = None
            if local is not None and local.version < self._peers.newest(thread_id,
                                                                        checkpoint_ns):
                self._stats.hot_stale += 1  # behind a write of this process (a peer's)
                local = None
            self._count_hit(local is not None)
            return local
        near_key = (thread_id, checkpoint_ns)
        if local is None:
            local = self._near.get(near_key)
            if local is not None and not self._usable(local):
                self._near.pop(near_key)
                local = None
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
        if not is_hot_fresh(hit, head) or not self._usable(hit):
            self._stats.hot_stale += 1
            return None
        self._count_hit(True)
        self._remember(hit)
        return hit

    async def fill(self, record: StoredCheckpoint) -> None:
        """A latest checkpoint just read from warm (carrying its head version). Neither
        raises nor lifts a doubt: warm may have moved on since the read."""
        if not self._usable(record):  # read before a delete that has happened since
            return
        await self._send("fill", self.hot.put(record),
                         (record.thread_id, record.checkpoint_ns), doubt_on_failure=False,
                         settles=False)
        self._remember(record)

    async def peek(self, thread_id: str, checkpoint_ns: str) -> str | None:
        """The checkpoint id the hot tier holds for a (thread, ns), if any (never raises)."""
        hit = await self._guard(self.hot, "peek", self.hot.get(thread_id, checkpoint_ns), None)
        return hit.checkpoint_id if hit is not None else None

    def queued(self, thread_id: str, checkpoint_ns: str) -> StoredCheckpoint | None:
        """The newest state this process has queued or is sending for a (thread, ns)."""
        key = (thread_id, checkpoint_ns)
        pending = self._pending.get(key)
        queued = pending if pending is not None else self._inflight.get(key)
        if queued is not None and not self._usable(queued):  # another saver deleted it
            self._discard(key)
            return None
        return queued

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
        if not self._usable(record):  # a delete since: the thread is gone or newer
            return
        self._seen(record.thread_id, record.checkpoint_ns, record.version)
        await self._queue(record)
        self._remember(record)

    async def drop(self, thread_id: str, checkpoint_ns: str, *, version: int = 0) -> None:
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
        self._seen(thread_id, checkpoint_ns, version)
        key = (thread_id, checkpoint_ns)
        self._near.pop(key)
        if self.verify and self.delay > 0:
            self._discard(key, keep_timer=True)  # the bound runs from the first drop
            self._dropped.add(key)
            self._arm(key)
            return
        self._discard(key)
        await self._send("invalidate", self.hot.invalidate(*key), key)

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
        self._seen(thread_id, checkpoint_ns, version)
        key = (thread_id, checkpoint_ns)
        queued = False
        if self.delay > 0:
            base = self.queued(thread_id, checkpoint_ns)
            merged = chain_writes(base, checkpoint_id, writes, version)
            if merged is not None:
                self._pending[key] = merged
                self._arm(key)
                queued = True
        if not queued:
            merged_hot = await self._send(
                "add_writes",
                self.hot.add_writes(thread_id, checkpoint_ns, checkpoint_id, writes,
                                    version=version),
                key, version=version, settles=False,
            )
            if merged_hot is False and not self.verify:
                # the entry is not the version right before these writes (another
                # process's writes came in another order, or it is gone): behind warm
                await self._send("invalidate", self.hot.invalidate(*key), key)
        near = chain_writes(self._near.get(key), checkpoint_id, writes, version)
        if near is not None:
            self._remember(near)
        else:  # it missed a change (or never was this checkpoint): it can only miss now
            self._near.pop(key)

    # -- invalidation -------------------------------------------------------------------

    async def invalidate(self, thread_ids: Sequence[str], *, floor: int = 0) -> None:
        """Drop the threads' copies here and in the hot tier. A ``floor`` (taken before
        the warm change, ``policy.tombstone_version``) also leaves a tombstone there, so
        another process's queued copy from before cannot come back, and makes every
        saver of this process over the same hot entries drop its copies from before."""
        if floor > 0:
            peers = self._floor_raised(thread_ids, floor)
            if peers:
                await asyncio.gather(*peers)
        self.forget(thread_ids)
        for thread_id in thread_ids:
            await self._send("invalidate", self.hot.invalidate(thread_id, floor=floor),
                             (thread_id, None), floor=floor)

    def invalidate_soon(self, thread_id: str, *, floor: int) -> None:
        """``invalidate`` for a caller that cannot wait (it was cancelled): this
        process's copies go at once, the hot entry in a task of its own. Until that
        task lands, this process reads the thread from warm even with ``trusted``
        (``verify`` compares every hot copy with warm's head anyway); if it fails,
        the repair sends it again."""
        for send in self._floor_raised([thread_id], floor):
            self._spawn(send)
        self.forget([thread_id])
        self._doubt((thread_id, None), floor=floor)
        self._spawn(self._send("invalidate", self.hot.invalidate(thread_id, floor=floor),
                               (thread_id, None), floor=floor))

    # -- hot entries that may be behind warm (``trusted``) ------------------------------

    def doubtful(self, thread_id: str, checkpoint_ns: str) -> bool:
        """Whether the hot entry of a (thread, ns) may be behind warm: a hot write or
        invalidation of it failed (or is on its way) since the last one that landed."""
        doubts = self._doubts.get(thread_id)
        return doubts is not None and (checkpoint_ns in doubts or None in doubts)

    async def _send(
        self,
        op: str,
        call: Awaitable[T],
        key: tuple[str, str | None],
        *,
        version: int | None = None,
        floor: int = 0,
        doubt_on_failure: bool = True,
        settles: bool = True,
    ) -> T | None:
        """One hot update of ``key`` (``(thread, None)``: every ns of the thread): a
        put or add_writes of the head at ``version``, or an invalidation (``version``
        None). ``None`` when it failed.

        With ``trusted``, a hot entry is served without asking warm, so an update that
        failed leaves an entry that may be behind warm, and nothing else would replace
        it before a newer write reached the hot tier (LangGraph would resume this
        process's next turn from it and fork the thread's history). Such an entry is
        *doubtful*: this process reads it from warm and, as soon as the hot tier
        answers again, invalidates it (``_repair``), so that other processes stop
        serving it too. A doubt is lifted by a put that landed at a version at least
        the failed one's, or by an invalidation that started after the failure; an
        update that started earlier proves nothing.
        """
        started = next(self._ticks)
        result = await self._guard(self.hot, op, call, _FAILED)
        if result is _FAILED:
            if doubt_on_failure:
                self._doubt(key, floor=floor, version=version)
            return None
        if settles:
            self._settle(key, started=started, version=version)
        if self._doubts and not self._repairing:
            self._spawn(self._repair())
        return cast("T", result)

    def _doubt(self, key: tuple[str, str | None], *, floor: int = 0,
               version: int | None = None) -> None:
        if self.verify:
            return
        thread_id, checkpoint_ns = key
        doubts = self._doubts.setdefault(thread_id, {})
        old = doubts.get(checkpoint_ns)
        if old is not None:
            floor = max(floor, old.floor)
            # an invalidation's doubt (no version) is lifted by invalidations only
            version = None if version is None or old.version is None else max(version,
                                                                              old.version)
        doubts[checkpoint_ns] = _Doubt(next(self._ticks), floor, version)

    def _settle(self, key: tuple[str, str | None], *, started: int,
                version: int | None) -> None:
        thread_id, checkpoint_ns = key
        doubts = self._doubts.get(thread_id)
        if doubts is None:
            return
        for ns in [checkpoint_ns] if checkpoint_ns is not None else list(doubts):
            doubt = doubts.get(ns)
            if doubt is None:
                continue
            if version is None:
                lifted = doubt.tick < started
            else:  # a put: lifts a failed put or add_writes of this (thread, ns) only
                lifted = doubt.version is not None and version >= doubt.version
            if lifted:
                del doubts[ns]
        if not doubts:
            del self._doubts[thread_id]

    async def _repair(self) -> None:
        """Invalidate every doubtful hot entry (with its tombstone floor); stop at the
        first failure (the hot tier is away again; the next answer restarts this)."""
        if self._repairing:
            return
        self._repairing = True
        try:
            for thread_id, doubts in list(self._doubts.items()):
                for checkpoint_ns, doubt in list(doubts.items()):
                    if checkpoint_ns is None:
                        call = self.hot.invalidate(thread_id, floor=doubt.floor)
                    else:
                        call = self.hot.invalidate(thread_id, checkpoint_ns)
                    started = next(self._ticks)
                    if await self._guard(self.hot, "repair", call, _FAILED) is _FAILED:
                        return
                    self._settle((thread_id, checkpoint_ns), started=started, version=None)
        finally:
            self._repairing = False

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

    def _spawn(self, work: Awaitable[Any]) -> None:
        """Run ``work`` in a task of its own that nobody waits for (kept referenced)."""
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the write-behind queue ---------------------------------------------------------

    async def _queue(self, record: StoredCheckpoint) -> None:
        if self.delay <= 0:
            await self._send("put", self.hot.put(record),
                             (record.thread_id, record.checkpoint_ns), version=record.version)
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
                await self._send("invalidate", self.hot.invalidate(*key), key)
            return
        if not self._usable(record):  # the thread was deleted since it was queued
            return
        self._inflight[key] = record
        try:
            await self._send("put", self.hot.put(record), key, version=record.version)
        finally:
            if self._inflight.get(key) is record:
                del self._inflight[key]

    async def drain(self) -> None:
        """Send everything queued now (on close), wait for sends in flight and for
        invalidations of writes whose callers gave up on them, and invalidate the hot
        entries left doubtful, trying a few times: once this process is gone, nothing
        else knows they may be behind warm."""
        for timer in self._timers.values():
            timer.cancel()
        keys = list(self._timers)
        self._timers.clear()
        await asyncio.gather(*(self._flush(k) for k in keys), *list(self._tasks))
        for attempt in range(DOUBT_RETRIES):
            if self._background:
                await asyncio.wait(list(self._background))
            if not self._doubts:
                return
            if attempt:
                await asyncio.sleep(DOUBT_RETRY_WAIT)
            await self._repair()
        if self._doubts:
            log.warning("hot tier unreachable on close: %d threads' hot entries may be behind "
                        "warm until hot_ttl (hot_check=\"trusted\" serves them as they are)",
                        len(self._doubts))


@dataclass(frozen=True, slots=True)
class _Doubt:
    """A failed hot update: when (a tick of ``HotCache._ticks``), the tombstone floor an
    invalidation was to leave, and the head version a put or add_writes was to store
    (None for an invalidation)."""

    tick: int
    floor: int
    version: int | None


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
