"""The document steps that the request path, thread admin and tiering share: heads,
fences, blob and write inserts, head repair, blob collection.

There are no multi-document transactions: each step orders its operations so that
a crash between two of them leaves documents that still read correctly and that a
later call or the collectors repair (see ``writes`` and ``gridfs_offload``).

``usage`` and ``archive_refs`` are the only aggregations; they iterate the cursor
(``async for``), which PyMongo, Motor and the mock all allow.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import random
from collections.abc import Iterable, Sequence
from typing import Any, Final

import bson
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError

from tierstore.errors import LeaseLost, TierUnavailable
from tierstore.policy import backoff, fence_key, fenced_out, first_version
from tierstore.records import BlobRecord, WriteRecord
from tierstore.tiers.mongo.connection import duplicate_positions
from tierstore.tiers.mongo.documents import Doc, Docs, FileIds, gridfs_ids, plain, versions_of
from tierstore.tiers.mongo.gridfs_offload import GridFSOffload

CAS_ATTEMPTS: Final = 100
_FREE_RETRIES: Final = 3


def cas_delay(attempt: int) -> float:
    """Seconds to wait before compare-and-set attempt ``attempt`` (from 0).

    The first misses retry at once (the winner has already moved on); after that a
    growing, fully jittered pause (``policy.backoff``) keeps a crowd of writers on one
    thread from retrying in lockstep.
    """
    return backoff(attempt - _FREE_RETRIES, base=0.0005, cap=0.05, jitter=random.random())


class MongoSteps(GridFSOffload):
    """Building blocks shared by the reads, writes, admin and tiering layers."""

    async def _head_doc(self, thread_id: str, checkpoint_ns: str) -> Doc | None:
        doc: Doc | None = await self._c("heads").find_one(
            {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns},
            {"_id": 0, "head_id": 1, "version": 1, "n_writes": 1, "fence": 1},
        )
        return doc

    async def _check_fence(self, t: str, token: int | None, fence: Any = None) -> None:
        """Raise ``LeaseLost`` if ``token`` is older than the thread's fence (or ``fence``)."""
        if token is None:
            return
        if fence is None:
            doc = await self._c("fences").find_one({"_id": fence_key(t)}, {"fence": 1})
            fence = doc["fence"] if doc is not None else None
        if fenced_out(None if fence is None else int(fence), token):
            raise LeaseLost.superseded(t, token, int(fence))

    async def _blob_doc(self, t: str, ns: str, blob: BlobRecord, now: float) -> Doc:
        return await self._pack(
            {"_id": bson.ObjectId(), "thread_id": t, "checkpoint_ns": ns,
             "channel": plain(blob.channel, "channel"), "version": plain(blob.version, "version"),
             "seen_at": now},
            {"payload": ("blob", blob.payload)},
        )

    async def _insert_blobs(self, docs: Sequence[Doc], now: float) -> Docs:
        """Insert blobs once per key; returns the documents this call created.

        A blob that already exists keeps its bytes; it is re-inserted by upsert only
        if it was collected in between, and its ``seen_at`` is refreshed so that the
        orphan collector leaves it alone while the checkpoint naming it is written.
        """
        if not docs:
            return []
        try:
            await self._c("blobs").insert_many(list(docs), ordered=False)
            return [*docs]
        except BulkWriteError as exc:
            duplicates = duplicate_positions(exc)
            if duplicates is None:
                raise
        created = [d for i, d in enumerate(docs) if i not in duplicates]
        unused: FileIds = []
        for i in sorted(duplicates):
            doc = docs[i]
            result = await self._c("blobs").update_one(
                {"thread_id": doc["thread_id"], "checkpoint_ns": doc["checkpoint_ns"],
                 "channel": doc["channel"], "version": doc["version"]},
                {"$setOnInsert": {"payload": doc["payload"]}, "$max": {"seen_at": now}},
                upsert=True,
            )
            if result.upserted_id is not None:
                created.append({**doc, "_id": result.upserted_id})
            else:
                unused.extend(gridfs_ids(doc, ("payload",)))
        await self._delete_files(unused)
        return created

    async def _replace(self, collection: str, key: Doc, doc: Doc) -> Doc | None:
        """Insert-or-replace by key; returns the replaced document (its files are the caller's)."""
        coll = self._c(collection)
        for attempt in range(2):
            try:
                previous: Doc | None = await coll.find_one_and_replace(
                    key, doc, upsert=True, return_document=ReturnDocument.BEFORE
                )
                return previous
            except DuplicateKeyError:
                if attempt:  # two upserts raced on the unique key; the retry replaces
                    raise
        return None  # pragma: no cover - the loop returns or raises

    async def _settle_writes(self, t: str, ns: str, cid: str) -> int:
        """Count the writes of ``cid`` and raise the head's n_writes to it if ``cid`` is head.

        ``$max`` makes racing writers agree: a count taken earlier can never lower one
        taken later, and a head that moved on is not touched.
        """
        n: int = await self._c("writes").count_documents(
            {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": cid}
        )
        if n:
            await self._c("heads").update_one(
                {"thread_id": t, "checkpoint_ns": ns, "head_id": cid}, {"$max": {"n_writes": n}}
            )
        return n

    async def _insert_writes(
        self, t: str, ns: str, cid: str, writes: Sequence[WriteRecord], *,
        replace_special: bool,
    ) -> None:
        """The first write per (task_id, idx) stays; special ones (idx < 0) may replace it."""
        docs = await asyncio.gather(*(
            self._pack(
                {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": cid,
                 "task_id": plain(w.task_id, "task_id"), "idx": int(w.idx),
                 "channel": plain(w.channel, "channel"),
                 "task_path": plain(w.task_path, "task_path")},
                {"payload": ("write", w.payload)},
            )
            for w in writes
        ))
        kept = [d for d in docs if d["idx"] >= 0 or not replace_special]
        unused: FileIds = []
        if kept:
            try:
                await self._c("writes").insert_many(kept, ordered=False)
            except BulkWriteError as exc:
                duplicates = duplicate_positions(exc)
                if duplicates is None:
                    raise
                for i in duplicates:
                    unused.extend(gridfs_ids(kept[i], ("payload",)))
        for doc in (d for d in docs if d["idx"] < 0 and replace_special):
            key = {k: doc[k] for k in ("thread_id", "checkpoint_ns", "checkpoint_id",
                                       "task_id", "idx")}
            previous = await self._replace("writes", key, doc)
            if previous is not None:
                unused.extend(gridfs_ids(previous, ("payload",)))
        await self._delete_files(unused)

    async def _delete_checkpoints(self, t: str, ns: str, id_cond: Any) -> int:
        """Delete some checkpoints of one (thread, ns) and their writes; fix the head."""
        flt = {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": id_cond}
        files = await self._files_of("checkpoints", flt) + await self._files_of("writes", flt)
        named: set[tuple[str, str]] = set()
        async for doc in self._c("checkpoints").find(flt, {"_id": 0, "channel_versions": 1}):
            named.update(versions_of(doc))
        deleted = await self._c("checkpoints").delete_many(flt)
        await self._c("writes").delete_many(flt)
        await self._delete_files(files)
        if deleted.deleted_count:
            await self._refresh_head(t, ns)
            await self._collect_blobs(t, ns, deleted=named)
        return int(deleted.deleted_count)

    async def _refresh_head(self, t: str, ns: str) -> None:
        """Point the head at the greatest remaining checkpoint (or drop it); version +1."""
        heads = self._c("heads")
        key = {"thread_id": t, "checkpoint_ns": ns}
        for attempt in range(CAS_ATTEMPTS):
            await asyncio.sleep(cas_delay(attempt))
            current = await self._head_doc(t, ns)
            latest = await self._c("checkpoints").find_one(
                key, {"_id": 0, "checkpoint_id": 1}, sort=[("checkpoint_id", -1)]
            )
            if latest is None:
                if current is None:
                    return
                gone = await heads.delete_one({**key, "version": current["version"]})
                if gone.deleted_count:
                    return
                continue
            cid = latest["checkpoint_id"]
            n = await self._c("writes").count_documents({**key, "checkpoint_id": cid})
            if current is None:
                try:
                    now = self._clock()
                    await heads.insert_one({**key, "head_id": cid, "version": first_version(now),
                                            "n_writes": n, "conflicts": 0, "updated_at": now})
                except DuplicateKeyError:
                    continue
            else:
                # at least the clock: above the hot tier's tombstone taken before
                now = self._clock()
                version = max(int(current["version"]) + 1, first_version(now))
                result = await heads.update_one(
                    {**key, "version": current["version"], "head_id": current["head_id"]},
                    {"$set": {"head_id": cid, "n_writes": n, "updated_at": now,
                              "version": version}},
                )
                if result.matched_count == 0:
                    continue
            await self._settle_writes(t, ns, cid)
            return
        raise TierUnavailable(
            f"mongodb {self._where}: the head of thread {t!r} ns {ns!r} kept changing",
            tier="warm", backend="mongodb",
        )

    async def _collect_blobs(self, t: str, ns: str,
                             deleted: Iterable[tuple[str, str]] = ()) -> None:
        """Delete blobs of (t, ns) that no live checkpoint names and that are past the grace.

        Blobs named by ``deleted`` (the channel versions of checkpoints just deleted)
        go at once, grace or not: deleting a run must remove its values now, and the
        grace only protects blobs of a put in flight, whose versions a deleted
        checkpoint does not name (versions grow along a thread).
        """
        cutoff = self._clock() - self.orphan_grace
        key = {"thread_id": t, "checkpoint_ns": ns}
        live: set[tuple[str, str]] = set()
        async for doc in self._c("checkpoints").find(
            {**key, "location": {"$ne": "archived"}}, {"_id": 0, "channel_versions": 1}
        ):
            live.update(versions_of(doc))
        projection = {"_id": 1, "channel": 1, "version": 1, "payload.gridfs": 1}
        candidates = await self._c("blobs").find(
            {**key, "seen_at": {"$lt": cutoff}}, projection).to_list(None)
        doomed = [d for d in candidates if (d["channel"], d["version"]) not in live]
        if doomed:
            await self._c("blobs").delete_many(
                {"_id": {"$in": [d["_id"] for d in doomed]}, "seen_at": {"$lt": cutoff}}
            )
        now_doomed = sorted(set(deleted) - live)
        if now_doomed:
            pairs = [{"channel": c, "version": v} for c, v in now_doomed]
            exact = await self._c("blobs").find({**key, "$or": pairs}, projection).to_list(None)
            await self._c("blobs").delete_many({"_id": {"$in": [d["_id"] for d in exact]}})
            doomed.extend(exact)
        if not doomed:
            return
        files = [f for d in doomed for f in gridfs_ids(d, ("payload",))]
        if files:  # a blob re-offered meanwhile survived the delete and keeps its file
            survivors = await self._c("blobs").find(
                {"payload.gridfs": {"$in": files}}, {"_id": 0, "payload.gridfs": 1}
            ).to_list(None)
            kept = {f for s in survivors for f in gridfs_ids(s, ("payload",))}
            await self._delete_files(f for f in files if f not in kept)

    async def _aggregate(self, collection: str, pipeline: Sequence[Doc]) -> Docs:
        """PyMongo's ``aggregate`` must be awaited for its cursor; Motor's returns it."""
        cursor = self._c(collection).aggregate(builtins.list(pipeline), allowDiskUse=True)
        if inspect.isawaitable(cursor):
            cursor = await cursor
        return [doc async for doc in cursor]
