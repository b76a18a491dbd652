"""The cold side of one region: archive segments and offloaded objects.

A warm row may be a stub (``location="archived"``): its payload sits in a cold
segment, which is fetched (and cached), verified and unpacked here. A segment in a
class that needs a restore raises ``CheckpointArchived`` (after starting the restore,
for the cold store's own ``restore_days``, when ``on_archived="restore"``).

Deletes reach the cold side after warm: segments are rewritten without the
checkpoints gone (``rewrite_segment``, ``compact_segment``) or dropped once no stub
names them, and a thread's offloaded objects that no row names any more are swept.
A marker object (``offload.work_marker``) names a thread while its objects are being
deleted, copied in or swept, so ``ColdGC`` finishes what a crash cut short.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Sequence, Set
from dataclasses import replace

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
from tierstore.errors import CheckpointArchived, CorruptPayload
from tierstore.metrics import Metrics
from tierstore.offload import (
    OFFLOAD_GRACE_SECONDS,
    OFFLOAD_STORAGE_CLASS,
    Offloader,
    delete_space,
    is_ref,
    ref_key,
    thread_space,
    unreferenced_objects,
    work_marker,
)
from tierstore.policy import merge_writes
from tierstore.records import ListQuery, StoredCheckpoint
from tierstore.stats import Stats
from tierstore.tiers.base import ObjectStore, WarmStore

__all__ = ["Archive"]

log = logging.getLogger("tierstore")


class Archive:
    """Segments and offloaded objects of one region, with a small LRU of segments."""

    SEGMENT_CACHE = 16

    def __init__(
        self,
        warm: WarmStore,
        cold: ObjectStore | None,
        offloader: Offloader | None,
        *,
        stats: Stats,
        metrics: Metrics,
        on_archived: str = "raise",
        max_bundle_bytes: int = DecodeLimits().max_bundle_bytes,
        offload_grace: float = OFFLOAD_GRACE_SECONDS,
    ) -> None:
        self.warm = warm
        self.cold = cold
        self.offloader = offloader
        self.on_archived = on_archived
        self.max_bundle_bytes = max_bundle_bytes
        self.offload_grace = offload_grace
        self._stats = stats
        self._metrics = metrics
        self._segments: OrderedDict[str, Segment] = OrderedDict()

    # -- reading segments -----------------------------------------------------------------

    async def load_segment(self, key: str) -> Segment:
        """Fetch, verify and unpack a segment; a small LRU keeps recent ones.

        The LRU is safe by key: a segment key is written once and never again (each
        move and rewrite packs under a key of its own, see ``codec.segment``), and the
        key names the digest of its bytes, which is checked here. So a cached segment
        is exactly what every stub naming its key was marked for, and rehydrating from
        it never writes back a record older than what the stub names.
        """
        cached = self._segments.get(key)
        if cached is not None:
            self._segments.move_to_end(key)
            return cached
        cold = self.cold
        if cold is None:
            raise CorruptPayload(f"checkpoint archived in {key!r} but no cold tier is configured",
                                 where=key)
        try:
            data = await self._metrics.timed("cold", cold, "get_segment", cold.get(key))
        except CheckpointArchived as exc:
            if self.on_archived == "restore" and exc.restore_state == "not-started":
                state = await cold.restore(key)
                raise CheckpointArchived(
                    f"{exc} (restore requested: {state})", key=exc.key,
                    storage_class=exc.storage_class, restore_state=state,
                    thread_id=exc.thread_id, checkpoint_id=exc.checkpoint_id,
                ) from exc
            raise
        if data is None:
            raise CorruptPayload(f"archive segment {key!r} is missing from the cold tier",
                                 where=key)
        self._stats.cold_reads += 1
        segment = unpack_segment(data, key=key, max_bytes=self.max_bundle_bytes)
        check_segment_key(key, data)
        self._segments[key] = segment
        while len(self._segments) > self.SEGMENT_CACHE:
            self._segments.popitem(last=False)
        return segment

    def forget_segments(self) -> None:
        """Empty the segment LRU (every segment is fetched and verified again)."""
        self._segments.clear()

    async def materialize(self, stub: StoredCheckpoint) -> StoredCheckpoint:
        """The full checkpoint behind an archived stub."""
        if stub.archive_key is None:
            raise CorruptPayload(f"checkpoint {stub.checkpoint_id!r} is archived without a key")
        try:
            segment = await self.load_segment(stub.archive_key)
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

    # -- dropping and rewriting segments ----------------------------------------------------

    async def drop_unreferenced_segments(self, keys: Sequence[str]) -> int:
        """Delete the given segments that no stub refers to any more.

        Only the given keys are looked up (an indexed lookup each), so the cost follows
        the segments concerned, not the size of the store.
        """
        if self.cold is None or not keys:
            return 0
        live = await self.warm.archive_refs(keys=keys)
        dead = [k for k in keys if k not in live]
        if dead:
            await self.cold.delete(dead)
            for key in dead:
                self._segments.pop(key, None)
        return len(dead)

    async def rewrite_segment(self, key: str, removed: Set[str]) -> str | None:
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
        cold = self.cold
        if cold is None:
            return None
        new_key: str | None = None
        if await self.warm.archive_refs(keys=[key]):
            try:
                segment = await self.load_segment(key)
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
                info = await cold.info(key)
                await cold.put(new_key, data,
                               storage_class=info.storage_class if info else None)
                await self._verify_cold(cold, new_key, data)
                await self.warm.repoint_archive(key, new_key, plan)
        return new_key

    @staticmethod
    async def _verify_cold(cold: ObjectStore, key: str, data: bytes) -> None:
        """The rewritten segment is read back before any stub is moved to it."""
        info = await cold.info(key)
        if info is None or info.size != len(data):
            raise CorruptPayload(f"segment {key!r} did not land intact in the cold tier",
                                 where=key)
        if info.readable and await cold.get(key) != data:
            raise CorruptPayload(f"segment {key!r} reads back different bytes", where=key)

    async def compact_segment(self, key: str) -> None:
        """Rewrite a segment to the checkpoints stubs (of any thread) still name, or drop it.

        Used after a prune or a thread delete, when the stubs gone are not known in
        advance: what stays is derived from the stubs left, so running it again (a
        later prune or delete of any thread naming the segment) finishes what a crash
        cut short. Every stub moves to the new segment, so the old one is dropped.
        """
        if self.cold is None:
            return
        named = (await self.warm.archive_stubs(keys=[key])).get(key, set())
        if named:
            try:
                segment = await self.load_segment(key)
            except (CheckpointArchived, CorruptPayload) as exc:
                log.warning("segment %r cannot be read (%s); deleted checkpoints stay in it "
                            "until it can", key, exc)
                return
            await self.rewrite_segment(key, set(segment.records) - named)
        await self.drop_unreferenced_segments([key])

    async def thread_segments(self, thread_id: str) -> list[str]:
        """The segments a thread's stubs name now (taken before its rows change)."""
        return list(await self.warm.archive_refs(thread_id)) if self.cold else []

    async def purge_thread(self, thread_id: str, archived: Sequence[str]) -> None:
        """The cold side of a thread delete: its segments and its objects.

        A segment a copy still names is compacted to what the copy names.
        """
        if self.cold is not None:
            own = [k async for k in self.cold.iter_keys(thread_prefix(thread_id))]
            keys = sorted({*archived, *own})
            named = await self.warm.archive_refs(keys=keys)
            for key in keys:
                if key in named:
                    await self.compact_segment(key)
            await self.drop_unreferenced_segments([k for k in keys if k not in named])
        if self.offloader is not None:
            await delete_space(self.offloader.store, thread_id)

    # -- offloaded objects --------------------------------------------------------------------

    async def mark(self, kind: str, thread_id: str) -> str | None:
        """Leave a note that a thread's offloaded objects are being deleted, copied in or
        swept (``ColdGC`` finishes the work if the note outlives its grace period)."""
        if self.offloader is None:
            return None
        key, body = work_marker(kind, thread_id)
        await self.offloader.store.put(key, body, storage_class=OFFLOAD_STORAGE_CLASS)
        return key

    async def unmark(self, marker: str | None) -> None:
        if marker is not None and self.offloader is not None:
            await self.offloader.store.delete([marker])

    async def drop_unnamed_objects(self, thread_ids: Sequence[str], *,
                                   started: float) -> tuple[int, int]:
        """After some checkpoints of these threads were deleted, delete the offloaded
        objects that none of their remaining rows (live, or archived in segments) name
        and that were written at least ``offload_grace`` seconds before ``started``.

        Returns ``(dropped, spared)``: spared are unnamed objects too young to tell from
        a put in flight; the caller leaves its sweep marker, so ``ColdGC`` looks at the
        thread again once they are old enough.
        """
        if self.offloader is None:
            return 0, 0
        store = self.offloader.store
        dropped = spared = 0
        for thread_id in thread_ids:
            named = await self._named_objects(thread_id)
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

    async def sweep(self, thread_ids: Sequence[str], markers: Sequence[str | None], *,
                    started: float) -> None:
        """Drop each thread's unnamed objects; its marker goes only when none was spared."""
        for thread_id, marker in zip(thread_ids, markers, strict=True):
            _, spared = await self.drop_unnamed_objects([thread_id], started=started)
            if not spared:
                await self.unmark(marker)

    async def _named_objects(self, thread_id: str) -> set[str] | None:
        """Every offloaded object a thread's rows name; None when a segment of it cannot
        be read now (then nothing of the thread may be deleted)."""
        named: set[str] = set()
        async for stored in self.warm.list(ListQuery(thread_id=thread_id)):
            row = stored
            if stored.location == "archived":
                try:
                    row = await self.materialize(stored)
                except (CheckpointArchived, CorruptPayload) as exc:
                    log.warning("thread %r: offloaded objects of deleted checkpoints stay until "
                                "its archive is readable: %s", thread_id, exc)
                    return None
            payloads = (row.checkpoint, *row.blobs.values(), *(w.payload for w in row.writes))
            named.update(ref_key(p, thread_id) for p in payloads if is_ref(p))
        return named
