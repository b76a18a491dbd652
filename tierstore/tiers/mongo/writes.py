"""The write path: ``put_checkpoint``, ``put_writes`` and ``next_fence``.

Write flow of ``put_checkpoint`` (no multi-document transactions: the order is the
guarantee)::

    [strict] read head ── parent ≠ head ──► VersionConflict           nothing was written
    1 upload to GridFS every payload over the threshold, then the largest
      remaining ones until the document fits under 16 MiB            orphans at worst
    2 insert the new blobs (a duplicate key means: already there)    nothing names them yet
    3 upsert the checkpoint document                                 readable from here on
    4 head compare-and-set:
        update_one({thread, ns, version: v, head_id: h}, {$set: …})  retried on a miss
        [strict] the head moved off the parent ──► undo 3 and 2, VersionConflict
    5 count the head's writes and $max them into n_writes

With a lease token (``fence``) the fence document is read before step 1 (a token
already superseded writes nothing), step 4 also requires the head's ``fence`` to be
at most the token and ``$max``-es it in, and ``next_fence`` raises the fence document
and then every head of the thread. A head created in step 4 is checked against the
fence document once more and taken back (with the checkpoint) if a newer lease was
issued meanwhile, which covers a namespace that had no head yet. Pending writes
are checked against the fence document before they are inserted: without
transactions, a lease taken over during that one insert does not undo it.

A crash after 1 or 2 leaves files and blobs that no checkpoint names (collected
later, see ``gridfs_offload``); a crash after 3 leaves a complete, readable checkpoint
whose head lags until the next put or maintenance moves it (the head only ever moves
to the greatest id). Between 3 and 4 a strict writer that is about to lose a race is
readable for one round trip; a strict writer whose parent is already stale writes
nothing at all. The head is the only document that is compare-and-set; a head that
names a checkpoint which no longer exists is repaired before a conflict is reported.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from tierstore.errors import LeaseLost, MissingBlobs, TierUnavailable, VersionConflict
from tierstore.policy import fence_key, first_version
from tierstore.records import BlobRecord, CheckpointRecord, Head, PutResult, WriteRecord
from tierstore.tiers.mongo.documents import (
    OR_CHUNK,
    Doc,
    filter_entry,
    gridfs_ids,
    is_scalar,
    plain,
)
from tierstore.tiers.mongo.steps import CAS_ATTEMPTS, MongoSteps, cas_delay

log = logging.getLogger("tierstore.mongo")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _HeadStep:
    head_id: str
    version: int
    moved: bool
    conflict: bool


async def _shielded(step: Awaitable[T]) -> T:
    """Await ``step`` in a task of its own that a cancellation of the caller does not stop.

    The caller still sees ``CancelledError`` at once; the step finishes in the
    background and its outcome is retrieved (and logged if it failed), never lost.
    """
    task = asyncio.ensure_future(step)

    def retrieve(done: asyncio.Future[T]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.debug("a shielded store step failed after its caller left: %r",
                      done.exception())

    task.add_done_callback(retrieve)
    return await asyncio.shield(task)


def _advance_head(
    head_id: str | None, version: int, checkpoint_id: str, parent_id: str | None
) -> _HeadStep:
    """The head after storing ``checkpoint_id``: the greatest id wins, every put counts."""
    moved = head_id is None or checkpoint_id > head_id
    return _HeadStep(
        head_id=checkpoint_id if moved or head_id is None else head_id,
        version=version + 1,
        moved=moved,
        conflict=parent_id != head_id,
    )


class MongoWrites(MongoSteps):
    """Stores checkpoints and pending writes in the order the module docstring gives."""

    async def next_fence(self, thread_id: str) -> int:
        t = plain(thread_id, "thread_id")
        with self._errors("next_fence"):
            for attempt in range(2):
                try:
                    doc = await self._c("fences").find_one_and_update(
                        {"_id": fence_key(t)}, {"$inc": {"fence": 1}}, upsert=True,
                        return_document=ReturnDocument.AFTER,
                    )
                    break
                except DuplicateKeyError:  # two first upserts raced; the retry increments
                    if attempt:
                        raise
            token = int(doc["fence"])
            await self._c("heads").update_many({"thread_id": t}, {"$max": {"fence": token}})
            return token

    async def put_checkpoint(
        self,
        record: CheckpointRecord,
        blobs: Sequence[BlobRecord],
        *,
        strict: bool,
        fence: int | None = None,
    ) -> PutResult:
        t = plain(record.thread_id, "thread_id")
        ns = plain(record.checkpoint_ns, "checkpoint_ns")
        cid = plain(record.checkpoint_id, "checkpoint_id")
        parent = None if record.parent_id is None else plain(record.parent_id, "parent_id")
        with self._errors("put_checkpoint"):
            await self._check_fence(t, fence)
            current = await self._head_doc(t, ns) if strict else None
            if strict:
                current = await self._settle_conflict(t, ns, parent, current)
            now = self._clock()
            await self._check_blobs(t, ns, record, blobs, now)
            token = uuid.uuid4().hex
            blob_docs = await asyncio.gather(*(self._blob_doc(t, ns, b, now) for b in blobs))
            doc = await self._pack(
                {
                    "thread_id": t,
                    "checkpoint_ns": ns,
                    "checkpoint_id": cid,
                    "parent_id": parent,
                    "run_id": record.run_id,
                    "channel_versions": [{"c": plain(c, "channel"), "v": plain(v, "version")}
                                         for c, v in record.channel_versions.items()],
                    "filter_doc": [filter_entry(k, v) for k, v in record.filter_doc.items()
                                   if is_scalar(v)],
                    "location": "warm",
                    "archive_key": None,
                    "created_at": now,
                    "size_bytes": record.checkpoint.size + record.metadata.size,
                    "token": token,
                },
                {"checkpoint": ("checkpoint", record.checkpoint),
                 "metadata": ("metadata", record.metadata)},
            )
            # From the first insert on, the steps run to the end even if the caller is
            # cancelled (LangGraph cancels a run's pending writes when one fails): a
            # checkpoint stored without its head step or its undo would be a silent fork.
            key = {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": cid}

            async def store_and_move() -> PutResult:
                with self._errors("put_checkpoint"):
                    new_blobs = await self._insert_blobs(blob_docs, now)
                    previous = await self._replace("checkpoints", key, doc)
                    try:
                        result = await self._move_head(t, ns, cid, parent, strict=strict,
                                                       current=current, now=now, fence=fence)
                    except (VersionConflict, LeaseLost):
                        await self._undo_put(key, token, previous, doc, new_blobs)
                        raise
                    if previous is not None:
                        await self._delete_files(gridfs_ids(previous, ("checkpoint", "metadata")))
                    return result

            return await _shielded(store_and_move())

    async def _check_blobs(self, t: str, ns: str, record: CheckpointRecord,
                           blobs: Sequence[BlobRecord], now: float) -> None:
        """Before anything is stored: every channel version the record names that is
        not among its new blobs must be in warm, or ``MissingBlobs`` (nothing written).

        An archive move collects blobs only archived checkpoints name; a writer that
        read the parent before the move would otherwise store a child naming them.
        The named blobs' ``seen_at`` is refreshed first and they are looked up after,
        so a blob found here is inside the collector's grace until the head moves
        (the collector deletes only blobs last seen before ``now - orphan_grace``).
        Empty channels have blob documents too, so a document is the whole test.
        """
        new = {(b.channel, b.version) for b in blobs}
        wanted = sorted((plain(c, "channel"), plain(v, "version"))
                        for c, v in record.channel_versions.items() if (c, v) not in new)
        if not wanted:
            return
        found: set[tuple[str, str]] = set()
        for start in range(0, len(wanted), OR_CHUNK):
            chunk = wanted[start:start + OR_CHUNK]
            query = {"thread_id": t, "checkpoint_ns": ns,
                     "$or": [{"channel": c, "version": v} for c, v in chunk]}
            await self._c("blobs").update_many(query, {"$max": {"seen_at": now}})
            async for doc in self._c("blobs").find(query, {"_id": 0, "channel": 1,
                                                           "version": 1}):
                found.add((doc["channel"], doc["version"]))
        missing = [pair for pair in wanted if pair not in found]
        if missing:
            raise MissingBlobs.of(t, ns, missing)

    async def _move_head(
        self, t: str, ns: str, cid: str, parent: str | None, *, strict: bool,
        current: Doc | None, now: float, fence: int | None = None,
    ) -> PutResult:
        """The head compare-and-set: retried on a miss, never a blind write."""
        heads = self._c("heads")
        key = {"thread_id": t, "checkpoint_ns": ns}
        fresh = current is not None
        for attempt in range(CAS_ATTEMPTS):
            if not fresh:
                await asyncio.sleep(cas_delay(attempt))
                current = await self._head_doc(t, ns)
            fresh = False
            if current is not None and "fence" in current:
                # the put read the fence document already; a takeover since then raised
                # this head's fence (next_fence), so the head's own value is enough here
                await self._check_fence(t, fence, current["fence"])
            head_id = current["head_id"] if current is not None else None
            if strict and head_id != parent:
                if head_id == cid and current is not None:
                    # a concurrent repair already made this checkpoint the head
                    return PutResult(Head(cid, int(current["version"]),
                                          int(current.get("n_writes", 0))), False)
                settled = await self._settle_conflict(t, ns, parent, current)
                fresh = True
                current = settled
                continue
            # a new head document starts where no earlier one's versions reached
            version = int(current["version"]) if current is not None else first_version(now) - 1
            step = _advance_head(head_id, version, cid, parent)
            if current is None:
                created = {**key, "head_id": step.head_id, "version": step.version,
                           "n_writes": 0, "conflicts": int(step.conflict), "updated_at": now}
                if fence is not None:
                    created["fence"] = fence
                try:
                    await heads.insert_one(created)
                except DuplicateKeyError:
                    continue
                if fence is not None:
                    try:
                        await self._check_fence(t, fence)
                    except LeaseLost:
                        # A newer lease was issued while this namespace got its first head.
                        # Its next_fence may already have raised this head's fence, so the
                        # head is matched by what this call wrote, not by its token.
                        await heads.delete_one({**key, "head_id": step.head_id,
                                                "version": step.version})
                        raise
            else:
                changes: Doc = {"head_id": step.head_id, "version": step.version,
                                "updated_at": now}
                if step.moved:
                    changes["n_writes"] = 0
                update: Doc = {"$set": changes}
                if step.conflict:
                    update["$inc"] = {"conflicts": 1}
                expected: Doc = {**key, "version": version, "head_id": head_id}
                if fence is not None:
                    update["$max"] = {"fence": fence}
                    expected["$or"] = [{"fence": {"$exists": False}}, {"fence": {"$lte": fence}}]
                result = await heads.update_one(expected, update)
                if result.matched_count == 0:
                    continue
            n_writes = (await self._settle_writes(t, ns, cid) if step.moved
                        else int(current.get("n_writes", 0)) if current is not None else 0)
            return PutResult(Head(step.head_id, step.version, n_writes), step.conflict)
        raise TierUnavailable(
            f"mongodb {self._where}: the head of thread {t!r} ns {ns!r} changed "
            f"{CAS_ATTEMPTS} times in a row; giving up", tier="warm", backend="mongodb",
        )

    async def _settle_conflict(
        self, t: str, ns: str, parent: str | None, current: Doc | None
    ) -> Doc | None:
        """Raise VersionConflict unless the head is ``parent``; repair a dangling head first.

        A head can name a checkpoint that no longer exists only after a crash or an
        undone strict write met a concurrent repair; recomputing it once keeps strict
        writers from conflicting with a checkpoint nobody can read.
        """
        head_id = current["head_id"] if current is not None else None
        if head_id == parent:
            return current
        if head_id is not None and not await self._c("checkpoints").count_documents(
            {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": head_id}, limit=1
        ):
            await self._refresh_head(t, ns)
            current = await self._head_doc(t, ns)
            head_id = current["head_id"] if current is not None else None
            if head_id == parent:
                return current
        version = int(current["version"]) if current is not None else 0
        raise VersionConflict(
            f"thread {t!r} ns {ns!r}: parent {parent!r} is not the head {head_id!r} "
            f"(version {version})",
            thread_id=t, checkpoint_ns=ns, head_id=head_id, version=version,
        )

    async def _undo_put(
        self, key: Doc, token: str, previous: Doc | None, doc: Doc, new_blobs: Sequence[Doc]
    ) -> None:
        """Take back a strict write that lost the race, touching only what it wrote."""
        checkpoints = self._c("checkpoints")
        if previous is None:
            removed = await checkpoints.delete_one({**key, "token": token})
            undone = removed.deleted_count > 0
        else:
            restored = await checkpoints.replace_one({**key, "token": token}, previous)
            undone = restored.matched_count > 0
        if new_blobs:
            await self._c("blobs").delete_many({"_id": {"$in": [b["_id"] for b in new_blobs]}})
        files = [f for b in new_blobs for f in gridfs_ids(b, ("payload",))]
        if undone:
            files.extend(gridfs_ids(doc, ("checkpoint", "metadata")))
        await self._delete_files(files)

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[WriteRecord],
        *,
        fence: int | None = None,
    ) -> int | None:
        if not writes:
            return None
        t = plain(thread_id, "thread_id")
        ns = plain(checkpoint_ns, "checkpoint_ns")
        cid = plain(checkpoint_id, "checkpoint_id")
        with self._errors("put_writes"):
            await self._check_fence(t, fence)
            await self._insert_writes(t, ns, cid, writes, replace_special=True)
            # the writes are stored first, then the head's count and version move in one
            # update; every call moves the version (a replaced write keeps the count).
            # A put making cid the head moves the head either after this store (and
            # counts the write) or before this update (which then moves the version), so
            # a reader (version first, content second) never pairs a version with older
            # content. What remains without transactions: a
            # call cut off between the two steps leaves its write uncounted until the
            # head's next change, and a copy made before it matches until then.
            n: int = await self._c("writes").count_documents(
                {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": cid}
            )
            head = await self._c("heads").find_one_and_update(
                {"thread_id": t, "checkpoint_ns": ns, "head_id": cid},
                {"$max": {"n_writes": n}, "$inc": {"version": 1}},
                projection={"_id": 0, "version": 1},
                return_document=ReturnDocument.AFTER,
            )
        return None if head is None else int(head["version"])
