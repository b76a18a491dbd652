"""``TieredSaver``: LangGraph's checkpointer API, translated into router calls.

This module imports no driver. It validates ids, encodes values through the codec,
builds records, and turns records back into ``CheckpointTuple``; where bytes go is
the router's business (one read or write) and ``Threads``' (whole threads).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import OrderedDict
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import replace
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from tierstore import offthread
from tierstore.bridge import LoopBridge
from tierstore.codec import Codec
from tierstore.codec.chain import resolve_values
from tierstore.codec.limits import DecodeLimits
from tierstore.codec.pipeline import EMPTY, payload_work
from tierstore.delta import ChainWriter
from tierstore.errors import InvalidInput, PruneRefused, TurnInProgress
from tierstore.history import decode_history
from tierstore.jobs.plan import uses_delta_channels
from tierstore.lease import ThreadLease
from tierstore.metrics import Metrics
from tierstore.payloads import PayloadCache
from tierstore.policy import (
    TURN_KEY,
    before_checkpoint_id,
    checked_checkpoint,
    checked_ids,
    checked_metadata,
    checked_text,
    checked_versions,
    checked_writes,
    checkpoint_ids,
    discards_pending_tasks,
    filter_doc,
    is_explicit_fork,
    list_scope,
    next_channel_version,
    split_filter,
    validate_checkpoint_id,
    validate_id,
    write_index,
)
from tierstore.putencode import PutEncoding, encode_refusing
from tierstore.records import (
    BlobRecord,
    CheckpointRecord,
    ListQuery,
    StoredCheckpoint,
    WriteRecord,
)
from tierstore.region import Region, Regions
from tierstore.router import Router
from tierstore.settings import (
    DEFAULT_COLD_URL,
    DEFAULT_HOT_URL,
    DEFAULT_REGION,
    DEFAULT_WARM_URL,
    RegionTable,
    SaverOptions,
    StackSpec,
    resolve_options,
    resolve_spec,
)
from tierstore.stats import Stats
from tierstore.syncapi import BridgedSaver
from tierstore.threads import Threads
from tierstore.tiers import HotStore, ObjectStore, WarmStore
from tierstore.tracing import Tracing, config_thread, first_thread, no_thread, traced, traced_iter

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["TieredSaver"]

T = TypeVar("T")

PRUNE_STRATEGIES = ("keep_latest", "delete", "delete_all")
"""``delete`` (LangGraph's PostgreSQL saver) and ``delete_all`` (LangGraph's Agent Server,
whose own fallback for a saver without ``aprune`` deletes each thread) are one strategy:
every checkpoint, write and value of each thread, in every namespace and tier."""
RUN_KEY = "__pregel_runtime"
"""The per-run object LangGraph puts in ``configurable`` of every call of one run."""
MAX_FORK_GRANTS = 1024
TURN_STATE_ENTRIES = 1024

TurnState = tuple[Mapping[str, Mapping[str, Any]], tuple[str, ...]]
"""What strict mode needs of a head to judge a new turn on it: its ``versions_seen``
and the channels of its pending writes."""


class TieredSaver(
    BridgedSaver,
    AbstractContextManager["TieredSaver"],
    AbstractAsyncContextManager["TieredSaver"],
):
    """A LangGraph checkpointer over a hot cache, a warm store and a cold archive.

    Build it with ``from_conn_string`` / ``from_urls`` / ``from_clients`` / ``from_env``,
    then open it with ``async with``
    (async apps) or ``with`` (sync apps). Setup of every store runs on enter and is
    idempotent.
    """

    def __init__(
        self,
        router: Router,
        *,
        options: SaverOptions | None = None,
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
        self.options = options or SaverOptions()
        self._router = router
        self._bridge = LoopBridge()
        self._codec_cache: tuple[SerializerProtocol, Codec] | None = None
        # Explicit forks, per LangGraph run: a run that starts by reading an explicit
        # checkpoint_id (time travel) may write a child of it in strict mode. Keyed by
        # the identity of the run's runtime object, which LangGraph passes to the read
        # and to the writes of one run; the object is held so its id cannot be reused.
        self._fork_grants: OrderedDict[int, tuple[Any, set[tuple[str, str, str]]]] = (
            OrderedDict()
        )
        self._payloads = PayloadCache()
        # Delta chains of list channels written or read lately (``tierstore.delta``).
        self._chains = ChainWriter()
        self._put_encoding = PutEncoding(self._payloads, self._chains,
                                         delta=self.options.delta)
        # Strict mode: the turn state of checkpoints read lately. LangGraph reads the head
        # right before it stores a turn's input on it, so the check on that input costs
        # no extra read; a checkpoint's versions_seen never changes.
        self._turn_states: OrderedDict[tuple[str, str, str], TurnState] = OrderedDict()
        # ``with_allowlist`` views: the saver whose stores they share, and whether the
        # view opened it (then the view closes it; otherwise its owner does).
        self._view_of: TieredSaver | None = None
        self._view_opened = False

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_urls(
        cls,
        hot: str | None = DEFAULT_HOT_URL,
        warm: str = DEFAULT_WARM_URL,
        cold: str | None = DEFAULT_COLD_URL,
        *,
        serde: SerializerProtocol | None = None,
        **options: Any,
    ) -> TieredSaver:
        """A saver over one stack of stores. With no arguments: the embedded stack.

        ``hot`` and ``cold`` may be None. Unknown schemes and malformed URLs raise
        ``ConfigurationError`` naming the bad part; nothing connects until the saver
        is entered.
        """
        return cls.from_spec(StackSpec.single(hot=hot, warm=warm, cold=cold, options=options),
                             serde=serde)

    @classmethod
    def from_conn_string(cls, conn_string: str, *, hot: object = None, cold: object = None,
                         serde: SerializerProtocol | None = None, **options: Any) -> TieredSaver:
        """The warm URL ``conn_string`` alone unless ``hot``/``cold`` are given (with
        ``*_options``: ``from_clients``). LangGraph's name: ``async with
        TieredSaver.from_conn_string(url) as saver`` connects, sets up, and closes on exit."""
        return cls.from_clients(warm=conn_string, hot=hot, cold=cold, serde=serde, **options)

    @classmethod
    def from_clients(cls, *, warm: object, hot: object = None, cold: object = None,
                     warm_options: Mapping[str, Any] | None = None,
                     hot_options: Mapping[str, Any] | None = None,
                     cold_options: Mapping[str, Any] | None = None,
                     serde: SerializerProtocol | None = None, **options: Any) -> TieredSaver:
        """A saver over clients the application holds: each tier is a URL, a store or a
        client (``asyncpg.Pool``, ``redis.asyncio.Redis``/``RedisCluster``,
        ``AsyncMongoClient`` or its database, ``aioboto3.Session`` or S3 client).

        ``*_options`` are a client tier's URL options (``schema``, ``prefix``, ``ttl``,
        ``bucket``, ``database``, …). The saver never closes a client it was given and
        closes what it opened; a client of the wrong kind raises ``ConfigurationError``.
        """
        opts = resolve_options(options)
        region = Region.of_tiers(warm=warm, hot=hot, cold=cold, options=opts, tier_options={
            "warm": warm_options, "hot": hot_options, "cold": cold_options})
        return cls(Router.from_options(Regions({DEFAULT_REGION: region}), opts), options=opts,
                   serde=serde)

    @classmethod
    def from_regions(
        cls,
        regions: Mapping[str, Mapping[str, str | None]],
        *,
        rules: Sequence[tuple[str, str]] = (),
        resolver: Callable[[str], str | None] | None = None,
        default_region: str | None = None,
        serde: SerializerProtocol | None = None,
        **options: Any,
    ) -> TieredSaver:
        """One saver over several regions, each with its own hot/warm/cold URLs.

        A thread's region is ``resolver(thread_id)`` when a resolver is given, else the
        first of ``rules`` (``(glob, region)`` pairs, e.g. ``("eu-*", "eu")``) that
        matches, else ``default_region``; a thread with no region is refused with
        ``ResidencyError`` before anything is read or written. Every byte of a thread
        (checkpoints, offloaded payloads, archive segments, cache entries) goes only to
        its region's stores.
        """
        spec = StackSpec.of_regions(regions, rules=rules, resolver=resolver,
                                    default_region=default_region, options=options)
        return cls.from_spec(spec, serde=serde)

    @classmethod
    def from_region_table(
        cls, table: RegionTable, *, serde: SerializerProtocol | None = None, **options: Any
    ) -> TieredSaver:
        """``from_regions`` over a ``RegionTable`` (``RegionTable.from_file("regions.toml")``).

        A table narrowed with ``only(name)`` opens that region's stores alone and still
        places every thread by the whole table, so another region's thread is refused
        with ``ResidencyError`` naming its region.
        """
        return cls.from_spec(StackSpec.of_table(table, options=options), serde=serde)

    @classmethod
    def from_stores(
        cls,
        *,
        warm: WarmStore,
        hot: HotStore | None = None,
        cold: ObjectStore | None = None,
        serde: SerializerProtocol | None = None,
        **options: Any,
    ) -> TieredSaver:
        """A saver over store objects built by hand (``from_clients`` takes clients).

        The saver sets the stores up on enter and closes them on exit; a store that was
        given a client it did not create leaves that client open.
        """
        opts = resolve_options(options)
        region = Region.of_stores(warm=warm, hot=hot, cold=cold, options=opts)
        return cls(Router.from_options(Regions({DEFAULT_REGION: region}), opts), options=opts,
                   serde=serde)

    @classmethod
    def from_env(
        cls, *, serde: SerializerProtocol | None = None, **options: Any
    ) -> TieredSaver:
        """``TIERSTORE_HOT_URL`` / ``_WARM_URL`` / ``_COLD_URL`` and ``TIERSTORE_*`` options.

        With ``TIERSTORE_REGIONS_FILE`` set, the region table in that file instead.
        Options given here win over the environment (``settings.resolve_spec``).
        """
        return cls.from_spec(resolve_spec(options=options), serde=serde)

    @classmethod
    def from_spec(cls, spec: StackSpec, *, serde: SerializerProtocol | None = None
                  ) -> TieredSaver:
        """A saver over the stores a checked ``StackSpec`` names; every factory ends here.

        The stores are built, not connected: that happens when the saver is entered.
        """
        return cls(Router.from_options(Regions.from_spec(spec), spec.options), options=spec.options,
                   serde=serde)

    # -- lifecycle --------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._bridge.state

    @property
    def stats(self) -> Stats:
        return self._router.stats

    @property
    def metrics(self) -> Metrics:
        """Store calls per tier, backend and operation: outcomes and latency."""
        return self._router.metrics

    @property
    def tracing(self) -> Tracing:
        """Where this saver's spans go (``tierstore.tracing``): by default the global
        tracer provider, recording nothing until one is set."""
        return self._router.metrics.tracing

    def trace_with(self, provider: TracerProvider) -> Self:
        """Record this saver's spans with ``provider`` instead of the global one."""
        self._router.metrics.tracing = Tracing(provider)
        return self

    def metrics_text(self) -> str:
        """Prometheus text exposition of ``metrics`` and the ``stats`` counters."""
        return self._router.metrics.render(self._router.stats.as_dict())

    @property
    def router(self) -> Router:
        """The read/write path behind this saver."""
        return self._router

    @property
    def regions(self) -> Regions:
        """The regions this saver serves: their stores and caches (jobs and tools)."""
        return self._router.regions

    @property
    def threads(self) -> Threads:
        """Whole-thread operations (delete, copy, prune, retention, import publishing)."""
        return Threads(self._router.regions)

    async def aput_record(self, record: CheckpointRecord, blobs: Sequence[BlobRecord],
                          writes: Sequence[WriteRecord] = ()) -> None:
        """Store a checkpoint encoded already, and its pending writes, as they are.

        For imports: the records come checked and encoded (``ops.check_bundle``), and
        no strict-mode or fork rule applies, since they are history, not a new turn.
        """
        self._bridge.require_open()
        await self._router.put(record, blobs, {b.channel: b.payload for b in blobs},
                               strict=False)
        if writes:
            await self._router.put_writes(record.thread_id, record.checkpoint_ns,
                                          record.checkpoint_id, writes)

    async def alist_records(self, query: ListQuery) -> AsyncIterator[StoredCheckpoint]:
        """Stored checkpoints newest first, payloads still encoded (exports, checks)."""
        self._bridge.require_open()
        async for record in self._router.list(query, {}, lambda r: {}):
            yield record

    def lease(self, thread_id: str, *, ttl: float = 30.0, wait: float = 10.0) -> ThreadLease:
        """A per-thread lease: ``async with saver.lease(tid): await app.ainvoke(…)``.

        Runs of the thread in other processes wait up to ``wait`` seconds for it
        (then ``LeaseBusy``); it is renewed while held and expires ``ttl`` seconds
        after its holder stops renewing. Checkpoint writes inside the block carry a
        fencing token that the warm tier checks, so a holder whose lease expired and
        was taken over gets ``LeaseLost`` instead of forking the thread. Needs a hot
        tier (``redis://`` across processes, ``memory://`` within one saver).
        """
        thread_id = validate_id(thread_id)
        return ThreadLease(region=self.regions.for_thread(thread_id), bridge=self._bridge,
                           thread_id=thread_id, ttl=ttl, wait=wait)

    async def open(self) -> Self:
        if self._view_of is not None:
            if self._view_of.state != "opened":
                await self._view_of.open()
                self._view_opened = True
            return self
        self._bridge.bind_running_loop()
        if self._bridge.state == "opened":
            return self
        self._bridge.state = "opening"
        try:
            # the codec reads its zstd dictionary file once (cached); not on the loop
            await asyncio.to_thread(lambda: self.codec)
            await self._router.regions.setup()
        except BaseException:
            self._bridge.state = "closed"
            raise
        self._bridge.state = "opened"
        return self

    async def aclose(self) -> None:
        if self._view_of is not None:
            if self._view_opened:
                self._view_opened = False
                await self._view_of.aclose()
            return
        if self._bridge.state in ("closed", "unopened"):
            self._bridge.state = "closed"
            return
        self._bridge.state = "closed"
        await self._router.regions.aclose()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> Self:
        if self._view_of is not None:
            if self._view_of.state != "opened":
                self._view_of.__enter__()
                self._view_opened = True
            return self
        self._bridge.start_private_loop()
        try:
            self._bridge.run(self.open())
        except BaseException:
            self._bridge.stop_private_loop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._view_of is not None:
            if self._view_opened:
                self._view_opened = False
                self._view_of.close()
            return
        if self._bridge.state == "opened":
            self._bridge.run(self.aclose())
        self._bridge.state = "closed"
        self._bridge.stop_private_loop()

    # -- codec ------------------------------------------------------------------------

    @property
    def codec(self) -> Codec:
        """The codec over the current serde (LangGraph may swap ``serde`` on a clone)."""
        cached = self._codec_cache
        if cached is None or cached[0] is not self.serde:
            opts = self.options
            codec = Codec(self.serde, level=opts.compression_level,
                          compress_min=opts.compress_min, keyring=opts.encryption,
                          dictionary=opts.compression_dictionary,
                          limits=DecodeLimits(max_payload_bytes=opts.max_payload_bytes,
                                              max_record_bytes=opts.max_record_bytes,
                                              max_bundle_bytes=opts.max_bundle_bytes))
            if opts.safe_decode:
                codec = codec.untrusted(opts.allowed_msgpack_modules)
            self._codec_cache = (self.serde, codec)
            return codec
        return cached[1]

    @property
    def untrusted_codec(self) -> Codec:
        """The codec for bytes of outside origin (import files): safe allowlist, bounds.

        It follows ``serde``, so an allowlist given through ``with_allowlist`` or a
        strict ``serde=`` is part of it.
        """
        codec = self.codec
        return codec if codec.safe is not None else codec.untrusted(
            self.options.allowed_msgpack_modules)

    def with_allowlist(self, extra_allowlist: Collection[tuple[str, ...]]) -> TieredSaver:
        """A view of this saver that decodes every read under the safe allowlist plus
        ``extra_allowlist``.

        LangGraph's own ``with_allowlist`` only narrows a serde that is strict already;
        on a default serde it returns the saver unchanged, so bytes a store returns
        could still name any importable callable. Here the view always decodes
        safely (as ``safe_decode=True`` with these modules added to
        ``allowed_msgpack_modules``), whatever this saver's settings.

        The view shares this saver's stores, caches and loop. Closing it does not
        close them (unless the view was the one that opened them): the saver it was
        made from owns their lifecycle.
        """
        extra = tuple(tuple(entry) for entry in extra_allowlist)
        root = self._view_of if self._view_of is not None else self
        view = copy.copy(self)
        view.options = replace(self.options, safe_decode=True, allowed_msgpack_modules=(
            *self.options.allowed_msgpack_modules, *extra))
        view._codec_cache = None
        view._view_of = root
        view._view_opened = False
        return view

    def _to_tuple(self, record: StoredCheckpoint, *, follow: bool = False) -> CheckpointTuple:
        """The tuple LangGraph reads, delta chains replayed; with ``follow`` the chains
        are remembered, so that the child LangGraph writes next goes on from them."""
        codec = self.codec
        where = f"thread {record.thread_id!r} checkpoint {record.checkpoint_id!r}"
        budget = codec.budget()  # every payload of the record together: max_record_bytes
        checkpoint: Checkpoint = codec.decode(record.checkpoint, where=where, budget=budget)
        decoded = {
            channel: codec.decode(payload, where=f"{where} channel {channel!r}", budget=budget)
            for channel, payload in record.blobs.items()
            if payload.tag != EMPTY.tag
        }
        versions = checkpoint.get("channel_versions") or {}
        resolved = resolve_values(versions, decoded, where=where)
        checkpoint["channel_values"] = resolved.values
        if follow:
            if resolved.chains:
                self._chains.remember_read(record.thread_id, record.checkpoint_ns,
                                           resolved.chains, resolved.values, record.blobs)
            self._payloads.remember_read(record, versions, skip=resolved.chains)
        metadata: CheckpointMetadata = codec.decode(record.metadata, where=f"{where} metadata",
                                                    budget=budget)
        writes = sorted(record.writes, key=lambda w: (w.task_path, w.task_id, w.idx))
        configurable = {
            "thread_id": record.thread_id,
            "checkpoint_ns": record.checkpoint_ns,
        }
        return CheckpointTuple(
            config={"configurable": {**configurable, "checkpoint_id": record.checkpoint_id}},
            checkpoint=checkpoint,
            metadata=metadata,
            parent_config=(
                {"configurable": {**configurable, "checkpoint_id": record.parent_id}}
                if record.parent_id
                else None
            ),
            pending_writes=[
                (w.task_id, w.channel,
                 codec.decode(w.payload, where=f"{where} write", budget=budget))
                for w in writes
            ],
        )

    def _decode_metadata(self, record: StoredCheckpoint) -> Mapping[str, Any]:
        value = self.codec.decode(record.metadata, where="metadata")
        return value if isinstance(value, Mapping) else {}

    # -- async API --------------------------------------------------------------------

    @traced("aget_tuple", config_thread)
    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        self._bridge.require_open()
        thread_id, ns, checkpoint_id = checkpoint_ids(config)
        if checkpoint_id is not None:
            self._grant_fork(config, (thread_id, ns, checkpoint_id))
        record = await self._router.get(thread_id, ns, checkpoint_id)
        if record is None:
            return None
        result = await offthread.run(lambda: self._to_tuple(record, follow=self.options.delta),
                                     size=_record_work(record))
        if self.options.concurrency == "strict":
            # a copy: LangGraph goes on to change the checkpoint it was handed in place
            seen = result.checkpoint.get("versions_seen") or {}
            self._remember_turn_state(
                (thread_id, ns, record.checkpoint_id),
                ({node: dict(versions) for node, versions in seen.items()},
                 tuple(channel for _, channel, _ in result.pending_writes or ())))
        return result

    def _remember_turn_state(self, key: tuple[str, str, str], state: TurnState) -> TurnState:
        self._turn_states[key] = state
        self._turn_states.move_to_end(key)
        while len(self._turn_states) > TURN_STATE_ENTRIES:
            self._turn_states.popitem(last=False)
        return state

    async def _refuse_turn_in_progress(
        self, thread_id: str, ns: str, parent_id: str, checkpoint: Checkpoint
    ) -> None:
        """Strict mode: a turn's input must not drop the pending steps of another turn.

        Without this, a turn whose input is stored but whose steps are still running
        loses them to the next caller's input, and its retry can only send the input a
        second time; refusing the newcomer before anything of it is stored keeps every
        input exactly once (see ``TurnInProgress``).
        """
        key = (thread_id, ns, parent_id)
        state = self._turn_states.get(key)
        if state is None:
            record = await self._router.get(thread_id, ns, parent_id)
            if record is None:
                return  # no such parent: the compare-and-set refuses the write
            body = self.codec.decode(record.checkpoint, where=f"checkpoint {parent_id!r}")
            seen = body.get("versions_seen") if isinstance(body, Mapping) else None
            state = self._remember_turn_state(
                key, (seen or {}, tuple(w.channel for w in record.writes)))
        parent_seen, parent_writes = state
        if not discards_pending_tasks(parent_seen, checkpoint.get("versions_seen") or {},
                                      parent_writes):
            return
        head = await self._router.head(thread_id, ns)
        raise TurnInProgress(
            f"thread {thread_id!r} ns {ns!r}: checkpoint {parent_id!r} has steps of another "
            "turn still to run; this input would discard them",
            thread_id=thread_id, checkpoint_ns=ns,
            head_id=head.checkpoint_id if head is not None else None,
            version=head.version if head is not None else 0,
        )

    def _grant_fork(self, config: RunnableConfig, key: tuple[str, str, str]) -> None:
        run = config.get("configurable", {}).get(RUN_KEY)
        if run is None:
            return
        _, keys = self._fork_grants.setdefault(id(run), (run, set()))
        keys.add(key)
        self._fork_grants.move_to_end(id(run))
        while len(self._fork_grants) > MAX_FORK_GRANTS:
            self._fork_grants.popitem(last=False)

    def _is_granted_fork(self, config: RunnableConfig, key: tuple[str, str, str]) -> bool:
        run = config.get("configurable", {}).get(RUN_KEY)
        entry = self._fork_grants.get(id(run)) if run is not None else None
        return entry is not None and entry[0] is run and key in entry[1]

    @traced_iter("alist", config_thread)
    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        self._bridge.require_open()
        thread_id, ns, checkpoint_id = list_scope(config)
        before_id = before_checkpoint_id(before)
        if filter is not None and not isinstance(filter, Mapping):
            raise InvalidInput(f"filter must be a mapping, got {type(filter).__name__}")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise InvalidInput(f"limit must be an integer, got {limit!r}")
        pushdown, residual = split_filter(filter)
        if self.options.encryption is not None:
            clear = {*self.options.filterable_metadata, TURN_KEY}
            residual.update({k: v for k, v in pushdown.items() if k not in clear})
            pushdown = {k: v for k, v in pushdown.items() if k in clear}
        query = ListQuery(
            thread_id=thread_id,
            checkpoint_ns=ns,
            checkpoint_id=checkpoint_id,
            before_id=before_id,
            filter=pushdown,
            limit=max(limit, 0) if limit is not None else None,
        )
        async for record in self._router.list(query, residual, self._decode_metadata):
            yield await offthread.run(partial(self._to_tuple, record), size=_record_work(record))

    @traced("aput", config_thread)
    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        self._bridge.require_open()
        thread_id, ns, parent_id = checkpoint_ids(config)
        body: dict[str, Any] = checked_checkpoint(checkpoint)
        checked_metadata(metadata)
        fresh = checked_versions(new_versions)
        checkpoint_id = validate_checkpoint_id(body.get("id"), time.time(),
                                               skew=self.options.checkpoint_id_skew)
        values: dict[str, Any] = body.pop("channel_values", None) or {}
        versions = checked_versions(body.get("channel_versions") or {})
        md = get_serializable_checkpoint_metadata(config, metadata)
        record, new_blobs, encoded, chains = await offthread.run(partial(
            self._put_encoding.encode, self.codec, thread_id, ns, parent_id=parent_id,
            checkpoint_id=checkpoint_id, body=body, md=md, values=values, versions=versions,
            fresh=fresh, new_versions=new_versions, filter_doc=self.filter_doc(md)))
        strict = (
            self.options.concurrency == "strict"
            and not is_explicit_fork(md)
            and not (parent_id and self._is_granted_fork(config, (thread_id, ns, parent_id)))
        )
        if strict and parent_id and md.get("source") == "input":
            await self._refuse_turn_in_progress(thread_id, ns, parent_id, checkpoint)
        await self._router.put(record, new_blobs, encoded, strict=strict)
        for ch, chain in chains.items():
            self._chains.remember((thread_id, ns, ch), chain)
        return {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint_id,
            }
        }

    def filter_doc(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """Metadata a store may filter on; with encryption only the keys marked filterable."""
        doc = filter_doc(metadata)
        if self.options.encryption is None:
            return doc
        keep = {*self.options.filterable_metadata, TURN_KEY}  # a random id: no secret
        return {k: v for k, v in doc.items() if k in keep}

    @traced("aput_writes", config_thread)
    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self._bridge.require_open()
        thread_id, ns, checkpoint_id = checkpoint_ids(config)
        if checkpoint_id is None:
            raise InvalidInput("put_writes needs configurable.checkpoint_id")
        task_id = validate_id(task_id, what="task_id")
        pairs = checked_writes(writes)
        task_path = checked_text(task_path or "", "task_path")
        codec = self.codec
        records = await offthread.run(lambda: [
            WriteRecord(task_id, write_index(channel, idx), channel,
                        encode_refusing(codec, value, f"write {idx} to channel {channel!r}"),
                        task_path)
            for idx, (channel, value) in enumerate(pairs)
        ])
        await self._router.put_writes(thread_id, ns, checkpoint_id, records)

    @traced("aget_delta_channel_history", config_thread)
    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """LangGraph's walk to each ``DeltaChannel``'s seed, with a warm call per page of
        ancestors instead of a read per ancestor; same seeds, writes, order and types.

        Archived ancestors are read from their segments without being rehydrated.
        """
        self._bridge.require_open()
        if not channels:
            return {}
        thread_id, ns, checkpoint_id = checkpoint_ids(config)
        histories = await self._router.delta_history(thread_id, ns, checkpoint_id,
                                                     list(channels))
        codec = self.codec
        return await offthread.run(lambda: {ch: decode_history(codec, thread_id, ch, history)
                                            for ch, history in histories.items()})

    @traced("adelete_thread", first_thread)
    async def adelete_thread(self, thread_id: str) -> None:
        self._bridge.require_open()
        await self.threads.delete_thread(validate_id(thread_id))

    @traced("adelete_for_runs", no_thread)
    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._bridge.require_open()
        ids = checked_ids(run_ids, what="run_id")
        if ids:
            await self.threads.delete_for_runs(ids)

    @traced("acopy_thread", first_thread)
    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._bridge.require_open()
        source = validate_id(source_thread_id)
        target = validate_id(target_thread_id)
        if source == target:
            raise InvalidInput("copy_thread needs two different thread ids")
        await self.threads.copy_thread(source, target)

    @traced("aprune", no_thread)
    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._bridge.require_open()
        if strategy not in PRUNE_STRATEGIES:
            raise InvalidInput(
                f"unknown prune strategy {strategy!r}; use one of {', '.join(PRUNE_STRATEGIES)}"
            )
        ids = checked_ids(thread_ids, what="thread_id")
        if not ids:
            return
        if strategy == "keep_latest":
            # refused whole, before anything is deleted (as LangGraph's PostgreSQL saver)
            severed = await self.delta_threads(ids)
            if severed:
                raise PruneRefused(
                    "keep_latest can't prune threads that use a DeltaChannel (their latest "
                    "checkpoint may need the ancestors it deletes, and the channel would read "
                    f"as empty): {', '.join(map(repr, severed))}; nothing was pruned")
        await self.threads.prune(ids, keep_latest=strategy == "keep_latest")  # else delete

    async def delta_threads(self, thread_ids: Sequence[str]) -> list[str]:
        """The threads whose graph uses a ``DeltaChannel`` (LangGraph's delta counters in
        their checkpoints' metadata): ``keep_latest`` must not prune them.

        Every such thread is refused, not only one whose latest checkpoint needs its
        ancestors right now: a turn committed between this check and the prune could
        make a new head that needs them (LangGraph's PostgreSQL saver refuses the same
        threads). LangGraph leaves the counters out of a checkpoint taken at a snapshot,
        so every row is looked at (in warm: archived stubs keep their metadata) until
        one has them."""
        found: list[str] = []
        for thread_id in thread_ids:
            async for row in self.regions.for_thread(thread_id).warm.list(
                    ListQuery(thread_id=thread_id)):
                if uses_delta_channels(self._decode_metadata(row)):
                    found.append(thread_id)
                    break
        return found

    def get_next_version(self, current: str | None, channel: None) -> str:
        return next_channel_version(current)


def _record_work(record: StoredCheckpoint) -> int:
    """The bytes decoding ``record`` works on (``offthread.run``'s ``size``)."""
    return (payload_work(record.checkpoint) + payload_work(record.metadata)
            + sum(payload_work(p) for p in record.blobs.values())
            + sum(payload_work(w.payload) for w in record.writes))
