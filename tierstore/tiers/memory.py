"""``memory://`` — the in-process hot tier, and the reference ``HotStore``.

An LRU of the latest assembled checkpoint per (thread, ns) with a TTL. It is what
the embedded stack uses and what every other hot backend must behave like:
replace only with a copy of a strictly newer warm head version, merge writes only
into the checkpoint they belong to and only when they continue the cached version
(``policy.chain_writes``), keep the first write per (task_id, idx >= 0), let special
writes (idx < 0) replace.

It is also the reference ``LeaseStore``: leases live in this object, so they keep
apart the runs that share one saver; across processes use ``redis://``.

URL options: ``memory://?max_entries=10000&ttl=3600``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from tierstore.errors import ConfigurationError
from tierstore.lifecycle import Lifecycle
from tierstore.policy import chain_writes, should_replace_hot
from tierstore.records import StoredCheckpoint, WriteRecord
from tierstore.settings import StoreUrl
from tierstore.tiers.base import HotStore, LeaseStore

__all__ = ["MemoryHot"]


class MemoryHot(HotStore, LeaseStore):
    """In-process LRU hot tier; safe within one event loop (no awaits inside a step)."""

    backend = "memory"

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ConfigurationError(f"memory:// max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, StoredCheckpoint]] = (
            OrderedDict()
        )
        # thread -> its namespaces with an entry: a thread is dropped without a scan
        self._namespaces: dict[str, set[str]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        # thread -> (expires, version floor) a delete left: no copy at or below is stored
        self._tombstones: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._life = Lifecycle("memory hot tier")

    @classmethod
    def from_url(cls, url: StoreUrl, *, ttl: float) -> MemoryHot:
        if url.host or url.path not in ("", "/"):
            raise ConfigurationError(f"{url.masked!r}: memory:// takes no host or path")
        unknown = sorted(set(url.query) - {"max_entries", "ttl"})
        if unknown:
            raise ConfigurationError(
                f"{url.masked!r}: unknown memory:// option(s) {', '.join(unknown)}; "
                "known: max_entries, ttl")
        try:
            max_entries = int(url.option("max_entries", "10000") or 10000)
            ttl = float(url.option("ttl", str(ttl)) or ttl)
        except ValueError as exc:
            raise ConfigurationError(f"{url.masked!r}: bad option value ({exc})") from exc
        return cls(max_entries=max_entries, ttl=ttl)

    async def setup(self) -> None:
        if self._life.begin():
            self._life.opened()

    async def aclose(self) -> None:
        if self._life.close():
            self._entries.clear()
            self._namespaces.clear()
            self._tombstones.clear()

    def _check(self) -> None:
        """A dict needs no opening, so only a closed store refuses (its entries are gone)."""
        if self._life.is_closed:
            self._life.require()

    def _live(self, key: tuple[str, str]) -> StoredCheckpoint | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires, record = item
        if expires <= self._clock():
            self._drop(key)
            return None
        return record

    def _store(self, key: tuple[str, str], record: StoredCheckpoint) -> None:
        self._entries[key] = (self._clock() + self.ttl, record)
        self._entries.move_to_end(key)
        self._namespaces.setdefault(key[0], set()).add(key[1])
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[str, str]) -> StoredCheckpoint | None:
        item = self._entries.pop(key, None)
        if item is None:
            return None
        namespaces = self._namespaces[key[0]]
        namespaces.discard(key[1])
        if not namespaces:
            del self._namespaces[key[0]]
        return item[1]

    async def get(self, thread_id: str, checkpoint_ns: str) -> StoredCheckpoint | None:
        self._check()
        key = (thread_id, checkpoint_ns)
        record = self._live(key)
        if record is not None:
            self._entries.move_to_end(key)
        return record

    async def put(self, record: StoredCheckpoint) -> bool:
        self._check()
        key = (record.thread_id, record.checkpoint_ns)
        if record.version <= self._floor(record.thread_id):
            return False
        if not should_replace_hot(self._live(key), record):
            return False
        self._store(key, record)
        return True

    async def add_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[WriteRecord],
        *,
        version: int,
    ) -> bool:
        self._check()
        key = (thread_id, checkpoint_ns)
        merged = chain_writes(self._live(key), checkpoint_id, writes, version)
        if merged is None:
            return False
        self._store(key, merged)
        return True

    def _floor(self, thread_id: str) -> int:
        item = self._tombstones.get(thread_id)
        if item is None:
            return 0
        if item[0] <= self._clock():
            del self._tombstones[thread_id]
            return 0
        return item[1]

    async def invalidate(
        self, thread_id: str, checkpoint_ns: str | None = None, *, floor: int = 0
    ) -> None:
        self._check()
        if checkpoint_ns is not None:
            self._drop((thread_id, checkpoint_ns))
            return
        for ns in list(self._namespaces.get(thread_id, ())):
            dropped = self._drop((thread_id, ns))
            if floor > 0 and dropped is not None:
                floor = max(floor, dropped.version)
        if floor > 0:
            self._tombstones[thread_id] = (self._clock() + self.ttl,
                                           max(floor, self._floor(thread_id)))
            self._tombstones.move_to_end(thread_id)
            while len(self._tombstones) > self.max_entries:
                self._tombstones.popitem(last=False)

    # -- LeaseStore -------------------------------------------------------------------

    def _holder(self, thread_id: str) -> str | None:
        held = self._leases.get(thread_id)
        if held is None or held[1] <= self._clock():
            return None
        return held[0]

    async def acquire_lease(self, thread_id: str, owner: str, ttl: float) -> bool:
        self._check()
        if self._holder(thread_id) is not None:
            return False
        self._leases[thread_id] = (owner, self._clock() + ttl)
        return True

    async def renew_lease(self, thread_id: str, owner: str, ttl: float) -> bool:
        self._check()
        if self._holder(thread_id) != owner:
            return False
        self._leases[thread_id] = (owner, self._clock() + ttl)
        return True

    async def release_lease(self, thread_id: str, owner: str) -> bool:
        self._check()
        if self._holder(thread_id) != owner:
            return False
        del self._leases[thread_id]
        return True

    def purge_expired(self) -> int:
        """Drop every expired entry now (reads drop them lazily otherwise)."""
        now = self._clock()
        doomed = [key for key, (expires, _) in self._entries.items() if expires <= now]
        for key in doomed:
            self._drop(key)
        for thread_id in [t for t, (until, _) in self._tombstones.items() if until <= now]:
            del self._tombstones[thread_id]
        for thread_id in [t for t, (_, until) in self._leases.items() if until <= now]:
            del self._leases[thread_id]
        return len(doomed)

    def __len__(self) -> int:
        return len(self._entries)
