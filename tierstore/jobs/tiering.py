"""The tiering jobs. Each is an object with ``run_once(now) -> JobReport``.

Every job is idempotent and safe to run from many workers at once: work is claimed
per (thread, ns) with a lease in the warm store, and a move is ordered so a crash
at any step leaves every checkpoint readable and the next run finishes the job::

    claim (lease) ─► plan (pure) ─► read the segment's checkpoints (one warm call)
        ─► pack segment ─► put in cold ─► verify (size and SHA-256 where the store
        keeps the digest it checked on receipt, else read back)
        ─► mark stubs + drop warm payload (one atomic step, only while the lease holds)
        ─► release

    crash before "mark": the checkpoints are still live in warm; the object written
    is an orphan that ``ColdGC`` removes (the retry writes a new key: a key is never
    written twice, so no reader or GC decision about an old key can meet new bytes
    under it). Crash after "mark": the move is complete.

Jobs: ``HistoryDemotion`` (old history → cold), ``IdleArchival`` (idle threads →
cold), ``Retention`` (expired threads deleted or pruned), ``HotExpiry`` (purge the
in-process hot tier; Redis expires keys itself), ``Rehydrate`` (restored Glacier
segments back to warm) and ``ColdGC`` (segments no stub refers to, and the offloaded
objects of thread deletes and copies a crash cut short).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import msgpack

from tierstore.codec.chain import channel_of
from tierstore.codec.segment import SEGMENT_PREFIX, pack_segment, segment_key
from tierstore.errors import CheckpointArchived, CorruptPayload, TierstoreError, TierUnavailable
from tierstore.jobs.plan import (
    TieringPolicy,
    chunks,
    delta_depth,
    next_demotion,
    plan_demotion,
    protected_ancestors,
)
from tierstore.offload import (
    SWEEPING,
    WORK_PREFIX,
    leftover_objects,
    marker_due,
    read_marker,
    thread_space,
)
from tierstore.records import Claim, ListQuery, StoredCheckpoint
from tierstore.region import Region

if TYPE_CHECKING:
    from tierstore.saver import TieredSaver

__all__ = [
    "RESTORE_PREFIX",
    "ColdGC",
    "HistoryDemotion",
    "HotExpiry",
    "IdleArchival",
    "JobReport",
    "Rehydrate",
    "Retention",
    "request_restore",
]

log = logging.getLogger("tierstore.jobs")
RESTORE_PREFIX = "restores/"
GC_GRACE_SECONDS = 3600.0
SEGMENT_LEVEL = 3
"""zstd level of the segments the archivers write. A segment's payloads are already
compressed one by one, so higher levels buy about 1% of its size for twice the CPU
(measured on chat threads: level 9 ~52 µs a checkpoint, level 3 ~22 µs)."""


@dataclass
class JobReport:
    """What one ``run_once`` did.

    ``failed`` counts the threads (or segments) whose work failed, ``error_types`` the
    failures by error class and ``errors`` has one line each: a run that moved nothing
    because every move failed must not read as a quiet success. ``busy`` counts heads
    another worker held a claim on when the run ended (a live one, or a dead one whose
    lease runs until ``busy_until``): they were skipped. ``changed_since_claim``
    counts threads retention left alone because they changed after it claimed them;
    ``delta_protected`` the threads ``keep_latest`` retention left whole because their
    latest checkpoint rebuilds a ``DeltaChannel`` from ancestors it would delete.
    """

    job: str
    claimed: int = 0
    threads: int = 0
    checkpoints: int = 0
    segments: int = 0
    bytes: int = 0
    deleted: int = 0
    failed: int = 0
    error_types: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    busy: int = 0
    busy_until: float | None = None
    changed_since_claim: int = 0
    delta_protected: int = 0
    seconds: float = 0.0

    def fail(self, where: str, exc: BaseException) -> None:
        """Count one failed unit of work."""
        kind = type(exc).__name__
        self.failed += 1
        self.error_types[kind] = self.error_types.get(kind, 0) + 1
        self.errors.append(f"{where}: {kind}: {exc}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Settled:
    """Nothing (more) to move in a head until a claim's age cutoff passes ``until``
    (None: until the head changes)."""

    until: float | None


@dataclass(frozen=True, slots=True)
class Choice:
    """What to move from one claimed head, and how the head is settled once moved
    (None: not settled, the job has work there whenever it is claimed)."""

    ids: list[str]
    settled: Settled | None = None


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Job(abc.ABC):
    name = "job"

    def __init__(
        self,
        saver: TieredSaver,
        policy: TieringPolicy | None = None,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        on_step: Callable[[str], None] | None = None,
        thread_id: str | None = None,
        dry_run: bool = False,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> None:
        self.saver = saver
        self.policy = policy or TieringPolicy()
        self.owner = owner or default_owner()
        self.clock = clock
        self.on_step = on_step
        self.thread_id = thread_id
        self.dry_run = dry_run
        self.progress = progress  # (heads visited, heads claimed so far) as a run goes
        self._visited = 0
        # regions where a claim or a release of this job went unanswered (an outage): all
        # its claims there are given back before its next run there claims anything
        self._lost: list[Region] = []
        self._run_began = (0.0, 0.0)  # (the run's ``now``, the clock then)

    def _step(self, name: str) -> None:
        """A named point in a move; tests inject crashes here."""
        if self.on_step is not None:
            self.on_step(name)

    @property
    def regions(self) -> list[Region]:
        return self.saver.regions.distinct()

    async def run_once(self, now: float | None = None) -> JobReport:
        started = time.perf_counter()
        report = JobReport(self.name)
        self._visited = 0
        now = self.clock() if now is None else now
        self._run_began = (now, self.clock())
        for region in self.regions:
            if any(s is region for s in self._lost):
                await region.warm.release_owned(owner=self.owner)
                self._lost = [s for s in self._lost if s is not region]
            await self._run_region(region, now, report)
        report.seconds = time.perf_counter() - started
        return report

    def _batch_now(self) -> float:
        """The run's ``now`` moved on by the time the run has taken so far: a batch's
        lease runs from when it is claimed. A run of a large store outlasts
        ``lease_seconds``; leasing its later batches from the run's start would make
        every move after that refused (moves check their lease on the clock)."""
        now, clock = self._run_began
        return now + max(0.0, self.clock() - clock)

    async def _claim(self, region: Region, **query: Any) -> Sequence[Claim]:
        """``warm.claim`` for this job's owner. A claim that got no answer may have
        leased heads all the same, so the region is marked for ``release_owned``:
        a run cut off by an outage holds its heads until the store is back, not
        until ``lease_seconds`` ends."""
        try:
            return await region.warm.claim(owner=self.owner, **query)
        except (TierUnavailable, asyncio.CancelledError, TimeoutError):
            self._mark_lost(region)
            raise

    async def _give_back(self, region: Region, claims: Sequence[Claim]) -> None:
        """Release ``claims``; when the store cannot take one now, they are given back
        with ``release_owned`` at the start of the next run (the run's own error, if
        any, is the one it reports)."""
        for claim in claims:
            try:
                await region.warm.release(claim.thread_id, claim.checkpoint_ns, owner=self.owner)
            except (TierUnavailable, TimeoutError):
                self._mark_lost(region)
                return
            except asyncio.CancelledError:
                self._mark_lost(region)
                raise

    def _mark_lost(self, region: Region) -> None:
        if not any(s is region for s in self._lost):
            self._lost.append(region)

    @abc.abstractmethod
    async def _run_region(self, region: Region, now: float, report: JobReport) -> None:
        """Do this job's work on one region's stores, adding to ``report``."""


async def _each(items: Sequence[Claim], limit: int,
                fn: Callable[[Claim], Awaitable[None]]) -> None:
    """Await ``fn`` on every item, at most ``limit`` at once. The first error cancels
    the calls still running (as if the worker had died there) and is raised as is."""
    queue = iter(items)

    async def worker() -> None:
        for item in queue:
            await fn(item)

    tasks = [asyncio.create_task(worker()) for _ in range(min(limit, len(items)))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Archiver(_Job):
    """Shared move logic for history demotion and idle archival.

    One run claims batch after batch until no head it has not visited is left::

        claim batch ─► for each new head (``parallel_moves`` at once): plan ─► move
            │              ─► release (settled, if the job says when it has work again)
            │          failed / dry run / not settled ─► keep the claim until the run ends
            └── repeat while the batch held a head not visited yet

    The heads of a batch are moved a few at once: each move waits on the warm
    store and the cold tier most of its time, so one worker keeps both busy while it
    packs another segment. Every head is still leased to this worker alone, and a
    move is the same sequence of steps however many run beside it.

    Keeping the claim is what makes a run end: a head the run already visited can
    not be claimed again by it, and a failed head is retried by the next run, not
    in a loop by this one. A head is claimed again by a later run only when the
    job has work there again (see ``WarmStore.claim``).
    """

    @abc.abstractmethod
    async def _claims(self, region: Region, now: float) -> Sequence[Claim]:
        """Lease the (thread, ns) heads this job has work for."""

    @abc.abstractmethod
    async def _choose(self, region: Region, claim: Claim, now: float) -> Choice:
        """The live checkpoints of a claimed head to move to cold."""

    async def _run_region(self, region: Region, now: float, report: JobReport) -> None:
        if region.cold is None:
            return
        visited: set[tuple[str, str]] = set()
        kept: list[Claim] = []
        try:
            while True:
                claims = await self._claims(region, self._batch_now())
                fresh = [c for c in claims if (c.thread_id, c.checkpoint_ns) not in visited]
                kept.extend(c for c in claims if (c.thread_id, c.checkpoint_ns) in visited)
                report.claimed += len(fresh)
                for claim in fresh:
                    visited.add((claim.thread_id, claim.checkpoint_ns))
                    kept.append(claim)
                await _each(fresh, self.policy.parallel_moves,
                            lambda claim: self._settle(region, claim, now, report, kept))
                if not fresh or len(claims) < self.policy.batch:
                    break
        finally:
            await self._give_back(region, kept)
        held = await region.warm.held_claims(now=self.clock(), thread_id=self.thread_id,
                                            exclude_owner=self.owner)
        report.busy += held.count
        if held.latest_until is not None:
            report.busy_until = max(report.busy_until or 0.0, held.latest_until)

    async def _settle(self, region: Region, claim: Claim, now: float, report: JobReport,
                      kept: list[Claim]) -> None:
        """Visit a claimed head; release it (it leaves ``kept``) when the job says how
        it is settled, else it stays claimed until the run ends."""
        settled = await self._visit(region, claim, now, report)
        self._visited += 1
        if self.progress is not None:
            self.progress(self._visited, report.claimed)
        if settled is None:
            return
        try:
            await region.warm.release(
                claim.thread_id, claim.checkpoint_ns, owner=self.owner,
                settled_head=claim.head_id, settled_until=settled.until)
        except (TierUnavailable, asyncio.CancelledError, TimeoutError):
            self._mark_lost(region)
            raise
        kept.remove(claim)

    async def _visit(
        self, region: Region, claim: Claim, now: float, report: JobReport
    ) -> Settled | None:
        """Do one head's work; returns how it is settled, None to keep it claimed."""
        try:
            choice = await self._choose(region, claim, now)
            ids = choice.ids
            if self.dry_run:
                report.threads += 1 if ids else 0
                report.checkpoints += len(ids)
                report.segments += len(chunks(ids, self.policy.segment_size))
                return None
            moved, failed = 0, report.failed
            for group in chunks(ids, self.policy.segment_size):
                done = await self._move(region, claim, group, now, report)
                if done is None:
                    continue  # every checkpoint of the group is damaged: it stays warm
                if done == 0:
                    return None  # lease lost: another worker owns this head now
                moved += done
            if moved:
                report.threads += 1
                report.checkpoints += moved
            # a damaged checkpoint left warm is a failure: the next run reports it again
            return choice.settled if report.failed == failed else None
        except TierstoreError as exc:
            report.fail(f"{claim.thread_id!r}/{claim.checkpoint_ns!r}", exc)
            log.warning("%s: %r ns %r failed: %s", self.name, claim.thread_id,
                        claim.checkpoint_ns, exc)
            return None

    async def _move(
        self, region: Region, claim: Claim, ids: list[str], now: float, report: JobReport
    ) -> int | None:
        """Move ``ids`` to one segment; returns how many moved (0: the lease was lost),
        None when every one that is still live is damaged (see ``_intact``)."""
        assert region.cold is not None
        records = await region.warm.get_live(claim.thread_id, claim.checkpoint_ns, ids)
        if not records:
            return 0
        records = self._intact(records, report)
        if not records:
            return None
        data = pack_segment(records, created_at=now, level=SEGMENT_LEVEL)
        # a key of its own for every pack: never an object another move, a reader's
        # cache or ColdGC already knows under that key (see codec.segment)
        key = segment_key(claim.thread_id, claim.checkpoint_ns, data, nonce=uuid.uuid4().hex)
        await region.cold.put(key, data, storage_class=self.policy.storage_class)
        self._step("written")
        await verify_object(region, key, data)
        self._step("verified")
        changed = await region.warm.mark_archived(
            claim.thread_id, claim.checkpoint_ns, [r.checkpoint_id for r in records],
            archive_key=key, owner=self.owner, now=self.clock(),
            writes={r.checkpoint_id: r.writes for r in records},
        )
        self._step("marked")
        if changed:
            report.segments += 1
            report.bytes += len(data)
        elif not await region.warm.archive_refs(keys=[key]):
            # Nothing moved (the lease was lost, or a delete took some of the packed
            # checkpoints meanwhile): the segment is named by nothing and may hold
            # checkpoints that were just deleted, so it goes now rather than after GC's grace.
            await region.archive.drop_unreferenced_segments([key])
        if any(r.checkpoint_id == claim.head_id for r in records):
            await region.invalidate_hot([claim.thread_id])
        return changed

    def _intact(self, records: Sequence[StoredCheckpoint], report: JobReport
                ) -> list[StoredCheckpoint]:
        """The records warm holds every value of. A live read of a checkpoint that names
        a value warm lost is refused (``CorruptPayload``); packed as read, it would read
        back from its segment without that channel and no error. So such a checkpoint
        stays warm, where the loss stays visible, and each run reports it as a failure
        (`tierstore verify` lists them too)."""
        intact = []
        for record in records:
            if not record.missing:
                intact.append(record)
                continue
            channels = list(dict.fromkeys(channel_of(name) for name in record.missing))
            where = (f"thread {record.thread_id!r} ns {record.checkpoint_ns!r} checkpoint "
                     f"{record.checkpoint_id!r}")
            names = ", ".join(repr(ch) for ch in channels)
            report.fail(f"{record.thread_id!r}/{record.checkpoint_ns!r}", CorruptPayload(
                f"{where}: warm lost the value of {names}; left warm, not archived",
                where=where, detail=channels))
            log.warning("%s: %s not archived: warm lost the value of %s",
                        self.name, where, names)
        return intact


async def verify_object(region: Region, key: str, data: bytes) -> None:
    """Bytes in cold are verified before the warm copy is dropped.

    The stored size must match. Where the store reports the SHA-256 it computed
    over the bytes it received and checked against the one sent with them (S3 objects
    put in one request, whatever their class), that digest must be the digest of
    ``data``: the proof a read-back gives (the object under this key is these bytes),
    without moving them twice. Other objects are read back and compared where their
    class is instantly readable; for GLACIER / DEEP_ARCHIVE the size is what can be
    checked.
    """
    assert region.cold is not None
    info = await region.cold.info(key)
    if info is None or info.size != len(data):
        raise CorruptPayload(f"segment {key!r} did not land intact in the cold tier", where=key)
    if info.sha256 is not None:
        if info.sha256 != hashlib.sha256(data).hexdigest():
            raise CorruptPayload(f"segment {key!r} landed with a different checksum", where=key)
        return
    if info.readable:
        try:
            back = await region.cold.get(key)
        except CheckpointArchived:
            return
        if back != data:
            raise CorruptPayload(f"segment {key!r} reads back different bytes", where=key)


class HistoryDemotion(_Archiver):
    """Checkpoints older than ``archive_after`` move to cold; the head and what it needs stay."""

    name = "history-demotion"

    async def _claims(self, region: Region, now: float) -> Sequence[Claim]:
        if self.policy.archive_after is None:
            return []
        return await self._claim(
            region, now=now, lease_seconds=self.policy.lease_seconds,
            limit=self.policy.batch, warm_before=now - self.policy.archive_after,
            thread_id=self.thread_id,
        )

    async def _choose(self, region: Region, claim: Claim, now: float) -> Choice:
        index = await region.warm.index(claim.thread_id, claim.checkpoint_ns,
                                        metadata_of=claim.head_id)
        depth = 0
        head = next((m for m in index if m.checkpoint_id == claim.head_id), None)
        if head is not None and head.metadata is not None:
            metadata = self.saver.codec.decode(head.metadata, where="head metadata")
            if isinstance(metadata, dict):
                depth = delta_depth(metadata)
        protect = protected_ancestors(index, claim.head_id, depth)
        ids = plan_demotion(index, head_id=claim.head_id, policy=self.policy, now=now,
                            protect=protect)
        until = next_demotion(index, head_id=claim.head_id, policy=self.policy,
                              protect=protect, exclude=set(ids))
        return Choice(ids, Settled(until))


class IdleArchival(_Archiver):
    """Threads not written for ``archive_idle_after`` move to cold entirely."""

    name = "idle-archival"

    async def _claims(self, region: Region, now: float) -> Sequence[Claim]:
        if self.policy.archive_idle_after is None:
            return []
        return await self._claim(
            region, now=now, lease_seconds=self.policy.lease_seconds,
            limit=self.policy.batch, idle_before=now - self.policy.archive_idle_after,
            thread_id=self.thread_id,
        )

    async def _choose(self, region: Region, claim: Claim, now: float) -> Choice:
        index = await region.warm.index(claim.thread_id, claim.checkpoint_ns)
        return Choice(sorted(m.checkpoint_id for m in index if m.location == "warm"))


class Retention(_Job):
    """Threads not written for ``expire_after`` are deleted (or pruned to their latest).

    Like the archivers, one run claims batch after batch and keeps every claim until
    it ends, so each expired thread is handled once per run and none is starved by
    the ones claimed before it (a pruned thread stays claimable).
    """

    name = "retention"

    async def _run_region(self, region: Region, now: float, report: JobReport) -> None:
        if self.policy.expire_after is None:
            return
        visited: set[str] = set()
        kept: list[Claim] = []
        try:
            while True:
                claims = await self._claim(
                    region, now=self._batch_now(), lease_seconds=self.policy.lease_seconds,
                    limit=self.policy.batch, idle_before=now - self.policy.expire_after,
                    require_live=False,
                )
                kept.extend(claims)
                threads = sorted({c.thread_id for c in claims} - visited)
                visited.update(threads)
                report.claimed += sum(1 for c in claims if c.thread_id in threads)
                if len(claims) >= self.policy.batch:
                    # a full batch may have cut a thread's namespaces in two: a thread
                    # is expired only with every one of them claimed (see _expire)
                    for thread_id in threads:
                        while True:
                            rest = await self._claim(
                                region, now=self._batch_now(),
                                lease_seconds=self.policy.lease_seconds,
                                limit=self.policy.batch,
                                idle_before=now - self.policy.expire_after,
                                require_live=False, thread_id=thread_id,
                            )
                            kept.extend(rest)
                            report.claimed += len(rest)
                            if len(rest) < self.policy.batch:
                                break
                await self._expire(threads, kept, report)
                if not threads or len(claims) < self.policy.batch:
                    break
        finally:
            await self._give_back(region, kept)

    async def _expire(self, threads: list[str], claims: Sequence[Claim],
                      report: JobReport) -> None:
        """Delete (or prune) each thread, but only as it was claimed: the warm store
        compares the heads with ``claims`` in the same step as the delete, so a turn
        committed after the claim (the user came back) keeps the thread; it is counted
        in ``changed_since_claim`` and looked at again by the next run."""
        keep_latest = self.policy.expire_strategy == "keep_latest"
        for thread_id in threads:
            heads = [c for c in claims if c.thread_id == thread_id]
            try:
                if keep_latest and await self.saver.delta_threads([thread_id]):
                    report.delta_protected += 1
                    continue
                done = await self.saver.threads.expire_thread(
                    thread_id, heads, owner=self.owner, now=self.clock(),
                    keep_latest=keep_latest)
            except TierstoreError as exc:
                report.fail(repr(thread_id), exc)
                continue
            if not done:
                report.changed_since_claim += 1
                continue
            report.threads += 1
            report.deleted += 1


class HotExpiry(_Job):
    """Purges expired entries from an in-process hot tier (Redis expires keys itself)."""

    name = "hot-expiry"

    async def _run_region(self, region: Region, now: float, report: JobReport) -> None:
        purge = getattr(region.hot, "purge_expired", None)
        if purge is not None:
            report.deleted += int(purge())


def _restore_marker(key: str) -> str:
    return f"{RESTORE_PREFIX}{hashlib.sha256(key.encode()).hexdigest()}"


async def request_restore(saver: TieredSaver, thread_id: str, *, days: int | None = None
                          ) -> dict[str, str]:
    """Ask the cold tier for readable copies of a thread's segments; returns key → state.

    A marker object per segment tells ``Rehydrate`` what to bring back to warm once
    the object store says the copy is readable.
    """
    region = saver.regions.for_thread(thread_id)
    if region.cold is None:
        return {}
    states: dict[str, str] = {}
    for key in sorted(await region.warm.archive_refs(thread_id)):
        states[key] = await region.cold.restore(key, days=days)
        await region.cold.put(_restore_marker(key), msgpack.packb([key, thread_id]),
                             storage_class="STANDARD")
    return states


class Rehydrate(_Job):
    """Brings segments whose restore finished back into warm, then drops the marker."""

    name = "rehydrate"

    async def _run_region(self, region: Region, now: float, report: JobReport) -> None:
        if region.cold is None:
            return
        markers = [k async for k in region.cold.iter_keys(RESTORE_PREFIX)]
        for marker in markers:
            raw = await region.cold.get(marker)
            if raw is None:
                continue
            key, thread_id = msgpack.unpackb(raw, raw=False)
            info = await region.cold.info(key)
            if info is None:
                await region.cold.delete([marker])
                continue
            if not info.readable:
                continue
            report.claimed += 1
            try:
                segment = await region.archive.load_segment(key)
                restored = 0
                for ns in {r.checkpoint_ns for r in segment.records.values()}:
                    stubs = [m.checkpoint_id for m in await region.warm.index(thread_id, ns)
                             if m.archive_key == key]
                    records = [segment.records[c] for c in stubs if c in segment.records]
                    restored += await region.warm.rehydrate(
                        [replace(r, thread_id=thread_id) for r in records])
            except TierstoreError as exc:
                report.fail(key, exc)
                continue
            report.checkpoints += restored
            report.threads += 1
            await region.cold.delete([marker])


class ColdGC(_Job):
    """Deletes segments no stub refers to, once they are older than a grace period.

    The grace period protects a move in flight (segment written, stubs not yet
    marked). A move marks only while its lease holds and writes its segment after it
    claimed, so the grace is never shorter than the policy's ``lease_seconds``: a
    segment older than that is named by a stub now or never will be (every move and
    rewrite writes a key of its own, never one GC saw). An object whose age the store
    cannot tell is never collected. It also
    finishes thread deletes and copies a crash interrupted: the offloaded objects of
    a thread that has no rows, named by a marker older than the grace.
    """

    name = "cold-gc"

    def __init__(self, *args: Any, grace_seconds: float = GC_GRACE_SECONDS, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.grace_seconds = grace_seconds

    async def _run_region(self, region: Region, now: float, report: JobReport) -> None:
        if region.cold is None:
            return
        if region.offloader is not None:
            await self._finish_offload_work(region, now, report)
        live = await region.warm.archive_refs()
        grace = max(self.grace_seconds, self.policy.lease_seconds)
        doomed = []
        async for key in region.cold.iter_keys(SEGMENT_PREFIX):
            if key in live:
                continue
            info = await region.cold.info(key)
            if info is not None and 0 < info.modified < now - grace:
                doomed.append(key)
        if doomed:
            report.deleted += await region.archive.drop_unreferenced_segments(doomed)

    async def _finish_offload_work(self, region: Region, now: float,
                                   report: JobReport) -> None:
        """Finish thread deletes, copies and sweeps that a crash interrupted (their markers)."""
        assert region.offloader is not None
        store = region.offloader.store
        async for marker in store.iter_keys(WORK_PREFIX):
            info, raw = await store.info(marker), await store.get(marker)
            if info is None or raw is None:
                continue
            try:
                kind, thread_id = read_marker(raw)
            except CorruptPayload as exc:
                report.errors.append(f"{marker}: {exc}")
                continue
            if kind == SWEEPING:
                if marker_due(info.modified, now=now, grace=self.grace_seconds):
                    dropped, spared = await region.archive.drop_unnamed_objects(
                        [thread_id], started=now)
                    report.deleted += dropped
                    if not spared:
                        await store.delete([marker])
                continue
            objects: dict[str, float] = {}
            async for key in store.iter_keys(thread_space(thread_id)):
                found = await store.info(key)
                objects[key] = found.modified if found is not None else 0.0
            rows = [r async for r in region.warm.list(ListQuery(thread_id=thread_id, limit=1))]
            doomed = leftover_objects(info.modified, bool(rows), objects, now=now,
                                      grace=self.grace_seconds)
            if doomed is None:
                continue
            if doomed:
                await store.delete(doomed)
            await store.delete([marker])
            report.deleted += len(doomed)
