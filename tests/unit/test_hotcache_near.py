"""The process-local copies of latest checkpoints (``hotcache``): forgetting a thread
drops its copies found through an index of its namespaces, which the LRU's evictions
keep exact; the other threads' copies stay."""

from __future__ import annotations

from tests.builders import entry
from tierstore.hotcache import HotCache, HotGuard
from tierstore.metrics import Metrics
from tierstore.records import Head, StoredCheckpoint
from tierstore.stats import Stats
from tierstore.tiers.memory import MemoryHot


class Heads:
    """A warm store that answers ``head`` only: each copy filled is what warm holds."""

    backend = "heads"

    def __init__(self) -> None:
        self.heads: dict[tuple[str, str], Head] = {}

    async def head(self, thread_id: str, checkpoint_ns: str) -> Head | None:
        return self.heads.get((thread_id, checkpoint_ns))


async def test_forgetting_a_thread_drops_its_near_copies_alone() -> None:
    hot, warm = MemoryHot(), Heads()
    await hot.setup()
    cache = HotCache(hot, warm, guard=HotGuard(Stats(), Metrics()),  # type: ignore[arg-type]
                     local_entries=2)

    async def fill(record: StoredCheckpoint) -> None:
        warm.heads[(record.thread_id, record.checkpoint_ns)] = Head(
            record.checkpoint_id, record.version, len(record.writes))
        await cache.fill(record)

    await fill(entry("t", "0001", ns="a"))
    await fill(entry("t", "0001", ns="b"))
    await fill(entry("u", "0001"))  # this process keeps two: t/a goes
    for key in (("t", "a"), ("t", "b"), ("u", "")):
        await hot.invalidate(*key)  # from now on only this process's copies answer
    assert await cache.latest("t", "a") is None
    assert await cache.latest("t", "b") is not None
    cache.forget(["t"])
    assert await cache.latest("t", "b") is None
    assert await cache.latest("u", "") is not None
    cache.forget(["t"])  # nothing of it is left: a no-op
    await fill(entry("t", "0002", ns="a"))
    await fill(entry("v", "0001"))  # u goes (t/a is newer)
    assert await cache.latest("u", "") is None
    assert await cache.latest("t", "a") is not None
