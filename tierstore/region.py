"""Regions: the stores that serve a thread, and the caches that go with them.

A ``Region`` is one hot/warm/cold stack with the caches of its data in this
process: its ``HotCache`` (the latest checkpoints) and its ``Archive`` (segments and
offloaded objects). Caches live on their region, so nothing is keyed by region.
``Regions`` places a thread in a region by name (a table), so every byte of a
thread is written only to its own region's stores.

A region is made of stores first (``Region(warm, hot, cold, offloader)``) and gets
its caches once, from the saver that serves it (``bind``), since the counters they
bump are the saver's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

from tierstore.archive import Archive
from tierstore.codec.limits import DecodeLimits
from tierstore.errors import ConfigurationError, LifecycleError, ResidencyError
from tierstore.hotcache import HotCache, HotGuard
from tierstore.metrics import Metrics
from tierstore.offload import OFFLOAD_GRACE_SECONDS, Offloader
from tierstore.records import StoredCheckpoint
from tierstore.settings import DEFAULT_REGION, SaverOptions, StackSpec
from tierstore.stats import Stats
from tierstore.tiers import open_store, tier_store
from tierstore.tiers.base import HotStore, ObjectStore, WarmStore

__all__ = ["DEFAULT_REGION", "Region", "Regions", "Store"]

log = logging.getLogger("tierstore")


Store = WarmStore | HotStore | ObjectStore


class Region:
    """The stores of one region and its caches. ``warm`` is required; the others are optional."""

    __slots__ = ("_archive", "_cache", "cold", "hot", "name", "offloader", "warm")

    def __init__(
        self,
        warm: WarmStore,
        hot: HotStore | None = None,
        cold: ObjectStore | None = None,
        offloader: Offloader | None = None,
        *,
        name: str = DEFAULT_REGION,
    ) -> None:
        self.name = name
        self.warm = warm
        self.hot = hot
        self.cold = cold
        self.offloader = offloader
        self._cache: HotCache | None = None
        self._archive: Archive | None = None

    def __repr__(self) -> str:
        tiers = ", ".join(f"{tier}={store.backend}" for tier, store in
                          (("hot", self.hot), ("warm", self.warm), ("cold", self.cold))
                          if store is not None)
        return f"Region({self.name!r}, {tiers})"

    @classmethod
    def of_stores(cls, *, name: str = DEFAULT_REGION, warm: WarmStore, hot: HotStore | None,
                  cold: ObjectStore | None, options: SaverOptions) -> Region:
        """A region over these stores; large payloads go to the cold store unless the
        warm store keeps them itself (GridFS)."""
        offloader = None
        if cold is not None and not getattr(warm, "offloads_internally", False):
            offloader = Offloader(cold, threshold=options.offload_threshold)
        return cls(name=name, warm=warm, hot=hot, cold=cold, offloader=offloader)

    @classmethod
    def of_tiers(cls, *, warm: object, hot: object, cold: object, options: SaverOptions,
                 tier_options: Mapping[str, Mapping[str, object] | None] | None = None
                 ) -> Region:
        """A region whose tiers are each a URL, a client of the caller's or a store
        (``tiers.tier_store``); ``tier_options[tier]`` configure a client tier."""
        given = dict(tier_options or {})
        for kind, tier in (("hot", hot), ("cold", cold)):
            if given.get(kind) and tier is None:
                raise ConfigurationError(f"{kind}_options given without a {kind} tier")
        return cls.of_stores(
            warm=cast("WarmStore", tier_store("warm", warm, given.get("warm"))),
            hot=None if hot is None else cast("HotStore", tier_store(
                "hot", hot, given.get("hot"), ttl=options.hot_ttl)),
            cold=None if cold is None else cast("ObjectStore", tier_store(
                "cold", cold, given.get("cold"))),
            options=options)

    def stores(self) -> list[Store]:
        return [s for s in (self.warm, self.hot, self.cold) if s is not None]

    def bind(
        self,
        *,
        stats: Stats,
        metrics: Metrics,
        guard: HotGuard,
        verify_hot: bool = True,
        hot_write_delay: float = 0.0,
        local_entries: int = 0,
        on_archived: str = "raise",
        max_bundle_bytes: int = DecodeLimits().max_bundle_bytes,
        offload_grace: float = OFFLOAD_GRACE_SECONDS,
    ) -> None:
        """Give the region its caches, counted in the serving saver's ``stats``."""
        if self._archive is not None:
            raise ConfigurationError(f"{self!r} is served by another saver already")
        if self.hot is not None:
            self._cache = HotCache(self.hot, self.warm, guard=guard, verify=verify_hot,
                                   delay=hot_write_delay, local_entries=local_entries)
        self._archive = Archive(self.warm, self.cold, self.offloader, stats=stats,
                                metrics=metrics, on_archived=on_archived,
                                max_bundle_bytes=max_bundle_bytes, offload_grace=offload_grace)

    @property
    def cache(self) -> HotCache | None:
        """The latest checkpoints of this region's threads (None without a hot tier)."""
        self._require_bound()
        return self._cache

    @property
    def archive(self) -> Archive:
        """This region's cold side: segments and offloaded objects."""
        if self._archive is None:
            self._require_bound()
        assert self._archive is not None
        return self._archive

    def _require_bound(self) -> None:
        if self._archive is None:
            raise LifecycleError(f"{self!r} is not served by a saver")

    async def invalidate_hot(self, thread_ids: Sequence[str], *, floor: int = 0) -> None:
        """Forget threads in the hot tier, including what this process holds of them
        (see ``HotCache.invalidate``); nothing to do without a hot tier."""
        cache = self.cache
        if cache is not None:
            await cache.invalidate(thread_ids, floor=floor)

    async def expand(self, record: StoredCheckpoint) -> StoredCheckpoint:
        """The record with its offloaded payloads read back in."""
        if self.offloader is None:
            return record
        return await self.offloader.expand_record(record)


class Regions:
    """Region name → region, and the rule that picks a thread's region.

    One region named ``default`` is the common case. ``resolve`` maps a thread id
    to a region name, or None when no rule matches. Several names may share one
    region; each region takes the first name it is listed under.
    """

    def __init__(
        self,
        regions: Mapping[str, Region],
        resolve: Callable[[str], str | None] = lambda _thread_id: DEFAULT_REGION,
    ) -> None:
        if not regions:
            raise ConfigurationError("at least one region is required")
        self._by_name = dict(regions)
        self.resolve = resolve
        for name, region in reversed(self._by_name.items()):
            region.name = name

    @classmethod
    def from_spec(cls, spec: StackSpec) -> Regions:
        """Build (not connect) the stores of every region of ``spec``, placed as it says."""
        options = spec.options
        regions = {
            name: Region.of_stores(
                name=name,
                warm=open_store("warm", urls.warm),
                hot=None if urls.hot is None else open_store("hot", urls.hot,
                                                             ttl=options.hot_ttl),
                cold=None if urls.cold is None else open_store("cold", urls.cold),
                options=options,
            )
            for name, urls in spec.regions.items()
        }
        return cls(regions, spec.region_of)

    @property
    def by_name(self) -> Mapping[str, Region]:
        """Every name this saver serves, each with its region."""
        return self._by_name

    def distinct(self) -> list[Region]:
        """Each region once, in table order, however many names it is served under."""
        return list(dict.fromkeys(self._by_name.values()))

    def for_thread(self, thread_id: str) -> Region:
        name = self.resolve(thread_id)
        if name is None:
            raise ResidencyError(f"thread {thread_id!r} matches no region and no default is set")
        try:
            return self._by_name[name]
        except KeyError:
            raise ResidencyError(
                f"thread {thread_id!r} belongs to region {name!r}, which this saver does not "
                f"serve (it serves {', '.join(sorted(self._by_name))})"
            ) from None

    # -- lifecycle ----------------------------------------------------------------------

    def _stores(self) -> list[Store]:
        seen: list[Store] = []
        for region in self.distinct():
            seen.extend(s for s in region.stores() if not any(s is x for x in seen))
        return seen

    async def setup(self) -> None:
        done: list[Store] = []
        try:
            for store in self._stores():
                await store.setup()
                done.append(store)
        except BaseException:
            await _close(done)
            raise
        for region in self.distinct():
            if region._cache is not None:
                region._cache.open()

    async def aclose(self) -> None:
        for region in self.distinct():
            cache = region._cache
            if cache is not None:
                await cache.drain()
                cache.close()
        await _close(self._stores())


async def _close(stores: Iterable[Store]) -> None:
    errors: list[BaseException] = []
    for store in reversed(list(stores)):
        try:
            await store.aclose()
        except Exception as exc:
            errors.append(exc)
    if errors:
        log.warning("errors while closing stores: %s", errors)
