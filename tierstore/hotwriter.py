"""Write-behind for the hot tier: one update per (thread, ns) per burst, not one per call.

A LangGraph turn stores several checkpoints and pending writes in quick succession,
and only the last state matters to the next reader. Sending each to Redis costs a
round trip (and its event-loop work) per call; coalescing them costs one::

    aput / aput_writes ──(warm committed)──► pending[(thread, ns)] = newest record (+ writes)
                                             └─ first one arms a timer (``delay``)
    timer fires ─────────────────────────────► hot.put(newest record with its writes)
    aget_tuple(latest) ──────────────────────► pending/in-flight record, checked against
                                               the warm head like any hot hit

Every queued record carries the warm head version it was made from; writes are
merged into a queued record only when they continue its version exactly
(``policy.chain_writes``), and the hot store keeps whichever copy has the newer
version, so a flush that lost a race can never overwrite a newer entry.

Nothing is lost by waiting: warm already holds every write, and a reader that finds
the hot entry behind warm (another process, or before the timer fires) sees the
mismatch with the warm head and reads warm. ``delay=0`` writes through on every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tierstore.policy import chain_writes, should_replace_hot
from tierstore.records import StoredCheckpoint, WriteRecord
from tierstore.tiers.base import HotStore

__all__ = ["HotWriter"]

Key = tuple[int, str, str]
Guard = Callable[[HotStore, str, Awaitable[bool], bool], Awaitable[bool]]


class HotWriter:
    """Coalesces hot updates; ``guard`` turns hot errors into logged misses."""

    def __init__(self, *, delay: float, guard: Guard) -> None:
        self.delay = delay
        self._guard = guard
        self._pending: dict[Key, tuple[HotStore, StoredCheckpoint]] = {}
        self._inflight: dict[Key, StoredCheckpoint] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    @staticmethod
    def key(hot: HotStore, thread_id: str, checkpoint_ns: str) -> Key:
        return (id(hot), thread_id, checkpoint_ns)

    async def put(self, hot: HotStore, record: StoredCheckpoint) -> None:
        if self.delay <= 0:
            await self._guard(hot, "put", hot.put(record), False)
            return
        key = self.key(hot, record.thread_id, record.checkpoint_ns)
        current = self._pending.get(key)
        if should_replace_hot(current[1] if current is not None else None, record):
            self._pending[key] = (hot, record)
        self._arm(key)

    async def add_writes(
        self,
        hot: HotStore,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[WriteRecord],
        *,
        version: int,
    ) -> None:
        """Writes stored in warm, which moved the head to ``version``."""
        if self.delay > 0:
            key = self.key(hot, thread_id, checkpoint_ns)
            base = self._pending.get(key, (hot, None))[1] or self._inflight.get(key)
            merged = chain_writes(base, checkpoint_id, writes, version)
            if merged is not None:
                self._pending[key] = (hot, merged)
                self._arm(key)
                return
        await self._guard(
            hot, "add_writes",
            hot.add_writes(thread_id, checkpoint_ns, checkpoint_id, writes, version=version),
            False,
        )

    def peek(self, hot: HotStore, thread_id: str, checkpoint_ns: str) -> StoredCheckpoint | None:
        """The newest state this process has queued or is sending for a (thread, ns)."""
        key = self.key(hot, thread_id, checkpoint_ns)
        pending = self._pending.get(key)
        return pending[1] if pending is not None else self._inflight.get(key)

    def discard(self, hot: HotStore, thread_id: str, checkpoint_ns: str) -> None:
        """Drop the queued update of one (thread, ns): it is older than warm now and no
        exact copy replaces it. An update already in flight is refused by the hot
        store if a newer entry got there first, and fails the freshness check if not."""
        key = self.key(hot, thread_id, checkpoint_ns)
        self._pending.pop(key, None)
        self._inflight.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def forget(self, hot: HotStore, thread_id: str) -> None:
        """Drop queued updates of a thread (it was deleted, pruned or copied over)."""
        for key in [k for k in self._pending if k[0] == id(hot) and k[1] == thread_id]:
            del self._pending[key]
            timer = self._timers.pop(key, None)
            if timer is not None:
                timer.cancel()
        for key in [k for k in self._inflight if k[0] == id(hot) and k[1] == thread_id]:
            del self._inflight[key]

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
        item = self._pending.pop(key, None)
        if item is None:
            return
        hot, record = item
        self._inflight[key] = record
        try:
            await self._guard(hot, "put", hot.put(record), False)
        finally:
            if self._inflight.get(key) is record:
                del self._inflight[key]

    async def drain(self) -> None:
        """Send everything queued now (on close), and wait for sends in flight."""
        for timer in self._timers.values():
            timer.cancel()
        keys = list(self._timers)
        self._timers.clear()
        await asyncio.gather(*(self._flush(k) for k in keys), *list(self._tasks))
