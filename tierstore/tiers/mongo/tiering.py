"""Tiering (used by ``tierstore.jobs``): head leases, archive stubs, rehydration.

A checkpoint with ``location: "archived"`` is a stub: its body, writes and blobs live
in the cold segment named by ``archive_key``; metadata, parent and channel versions
stay so that ``list`` and its filters never touch cold. Tiering jobs lease a head by
a filtered update (``lease_until`` free or expired) and turn checkpoints into stubs
one conditional update each (``location: "warm"`` in the filter), so two workers
never archive the same checkpoint twice.
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from tierstore.errors import InvalidInput
from tierstore.records import (
    BlobRecord,
    CheckpointMeta,
    Claim,
    ClaimsHeld,
    Payload,
    StoredCheckpoint,
    WriteRecord,
)
from tierstore.tiers.mongo.admin import MongoAdmin
from tierstore.tiers.mongo.documents import (
    OR_CHUNK,
    PAGE,
    READ_FIELDS,
    Doc,
    GridFSRef,
    gridfs_ids,
    keyset_after,
    plain,
    read_payload,
    versions_of,
)


def _settled(head: Doc, warm_before: float) -> bool:
    """History demotion found nothing to move in this head for cutoffs up to
    ``settled_until`` (None: any), and the head has not moved on since."""
    if head.get("settled_head") is None or head.get("settled_head") != head.get("head_id"):
        return False
    until = head.get("settled_until")
    return until is None or warm_before <= float(until)


def _packed_write(checkpoint_id: str, write: WriteRecord) -> Doc:
    """A filter for the stored write that is this one: same task, index and bytes
    (inline, or a GridFS file with the same digest)."""
    digest = hashlib.sha256(write.payload.data).hexdigest()
    return {"checkpoint_id": checkpoint_id, "task_id": write.task_id, "idx": int(write.idx),
            "payload.tag": write.payload.tag,
            "$or": [{"payload.data": write.payload.data}, {"payload.sha256": digest}]}


class MongoTiering(MongoAdmin):
    """Leases are filtered updates on heads; archiving is a conditional update per checkpoint."""

    async def claim(
        self,
        *,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        warm_before: float | None = None,
        idle_before: float | None = None,
        require_live: bool = True,
        thread_id: str | None = None,
    ) -> Sequence[Claim]:
        """Lease heads with a filtered update: a lease is taken only while it is free."""
        free: Doc = {"$or": [{"lease_until": None}, {"lease_until": {"$lt": now}}]}
        flt: Doc = dict(free)
        if thread_id is not None:
            flt["thread_id"] = plain(thread_id, "thread_id")
        if idle_before is not None:
            flt["updated_at"] = {"$lt": idle_before}
        sort = [("updated_at", 1), ("thread_id", 1), ("checkpoint_ns", 1)]
        projection = {"_id": 1, "thread_id": 1, "checkpoint_ns": 1, "head_id": 1,
                      "updated_at": 1, "settled_head": 1, "settled_until": 1, "version": 1}
        claimed: builtins.list[Claim] = []
        last: Doc | None = None
        with self._errors("claim"):
            heads = self._c("heads")
            while len(claimed) < limit:
                page_filter = flt if last is None else {"$and": [flt, keyset_after(last, sort)]}
                page = await heads.find(page_filter, projection).sort(sort).limit(
                    PAGE).to_list(None)
                for head in page:
                    if not await self._claimable(head, warm_before, idle_before, require_live):
                        continue
                    taken = await heads.update_one(
                        {"_id": head["_id"], **free},
                        {"$set": {"lease_owner": owner, "lease_until": now + lease_seconds}},
                    )
                    if taken.modified_count:
                        claimed.append(Claim(head["thread_id"], head["checkpoint_ns"],
                                             head["head_id"], float(head["updated_at"]),
                                             int(head.get("version", 0))))
                        if len(claimed) >= limit:
                            break
                if len(page) < PAGE:
                    break
                last = page[-1]
        return claimed

    async def expire_thread(
        self,
        thread_id: str,
        heads: Sequence[Claim],
        *,
        owner: str,
        now: float,
        keep_latest: bool,
    ) -> bool:
        """Compared right before the delete, not in one transaction with it (the store
        uses none): a put landing in between those two calls is the remaining window."""
        t = plain(thread_id, "thread_id")
        expected = {(c.checkpoint_ns, c.head_id, c.version) for c in heads
                    if c.thread_id == thread_id}
        with self._errors("expire_thread"):
            current = await self._c("heads").find(
                {"thread_id": t},
                {"_id": 0, "checkpoint_ns": 1, "head_id": 1, "version": 1, "lease_owner": 1,
                 "lease_until": 1},
            ).to_list(None)
        if not current or any(d.get("lease_owner") != owner or d.get("lease_until") is None
                               or d["lease_until"] < now for d in current):
            return False
        if {(d["checkpoint_ns"], d["head_id"], int(d.get("version", 0)))
                for d in current} != expected:
            return False
        if keep_latest:
            await self.prune([thread_id], keep_latest=True)
        else:
            await self.delete_thread(thread_id)
        return True

    async def _claimable(
        self, head: Doc, warm_before: float | None, idle_before: float | None,
        require_live: bool,
    ) -> bool:
        key = {"thread_id": head["thread_id"], "checkpoint_ns": head["checkpoint_ns"],
               "location": "warm"}
        checkpoints = self._c("checkpoints")
        if warm_before is not None and _settled(head, warm_before):
            return False
        if warm_before is not None and not await checkpoints.count_documents(
            {**key, "checkpoint_id": {"$ne": head["head_id"]},
             "created_at": {"$lt": warm_before}}, limit=1,
        ):
            return False
        return not (idle_before is not None and require_live
                    and not await checkpoints.count_documents(key, limit=1))

    async def release(
        self,
        thread_id: str,
        checkpoint_ns: str,
        *,
        owner: str,
        settled_head: str | None = None,
        settled_until: float | None = None,
    ) -> None:
        with self._errors("release"):
            await self._c("heads").update_one(
                {"thread_id": plain(thread_id, "thread_id"),
                 "checkpoint_ns": plain(checkpoint_ns, "checkpoint_ns"),
                 "lease_owner": plain(owner, "owner")},
                {"$set": {"lease_owner": None, "lease_until": None,
                          "settled_head": settled_head, "settled_until": settled_until}},
            )

    async def release_owned(self, *, owner: str) -> int:
        with self._errors("release_owned"):
            result = await self._c("heads").update_many(
                {"lease_owner": plain(owner, "owner")},
                {"$set": {"lease_owner": None, "lease_until": None}},
            )
        return int(result.modified_count)

    async def held_claims(
        self, *, now: float, thread_id: str | None = None, exclude_owner: str | None = None
    ) -> ClaimsHeld:
        owner: Doc = {"$ne": None}
        if exclude_owner is not None:
            owner = {"$nin": [None, plain(exclude_owner, "owner")]}
        flt: Doc = {"lease_owner": owner, "lease_until": {"$gte": now}}
        if thread_id is not None:
            flt["thread_id"] = plain(thread_id, "thread_id")
        with self._errors("held_claims"):
            docs = await self._c("heads").find(flt, {"_id": 0, "lease_until": 1}).to_list(None)
        until = [float(d["lease_until"]) for d in docs]
        return ClaimsHeld(len(until), min(until, default=None), max(until, default=None))

    async def index(
        self, thread_id: str, checkpoint_ns: str, *, metadata_of: str | None = None
    ) -> Sequence[CheckpointMeta]:
        t, ns = plain(thread_id, "thread_id"), plain(checkpoint_ns, "checkpoint_ns")
        metadata: Payload | None = None
        with self._errors("index"):
            docs = await self._c("checkpoints").find(
                {"thread_id": t, "checkpoint_ns": ns},
                {"_id": 0, "checkpoint_id": 1, "parent_id": 1, "created_at": 1, "location": 1,
                 "archive_key": 1, "size_bytes": 1},
            ).sort([("checkpoint_id", -1)]).to_list(None)
            if metadata_of is not None:
                where = f"thread {t!r} checkpoint {metadata_of!r} metadata"
                doc = await self._c("checkpoints").find_one(
                    {"thread_id": t, "checkpoint_ns": ns,
                     "checkpoint_id": plain(metadata_of, "checkpoint_id")},
                    {"_id": 0, "metadata": 1})
                if doc is not None:
                    found = read_payload(doc.get("metadata"), where)
                    metadata = (await self._download(found, where)
                                if isinstance(found, GridFSRef) else found)
        return [
            CheckpointMeta(t, ns, d["checkpoint_id"], d.get("parent_id"),
                           float(d.get("created_at") or 0.0),
                           "archived" if d.get("location") == "archived" else "warm",
                           d.get("archive_key"), int(d.get("size_bytes") or 0),
                           metadata if d["checkpoint_id"] == metadata_of else None)
            for d in docs
        ]

    async def get_live(
        self, thread_id: str, checkpoint_ns: str, checkpoint_ids: Sequence[str]
    ) -> Sequence[StoredCheckpoint]:
        """One query for the checkpoints, then ``get``'s assembly (blobs and writes of
        them all in a few queries); a checkpoint turned into a stub meanwhile is left out."""
        ids = sorted({plain(c, "checkpoint_id") for c in checkpoint_ids})
        if not ids:
            return []
        flt: Doc = {"thread_id": plain(thread_id, "thread_id"),
                    "checkpoint_ns": plain(checkpoint_ns, "checkpoint_ns"),
                    "location": {"$ne": "archived"}}
        docs: list[Doc] = []
        with self._errors("get_live"):
            for start in range(0, len(ids), OR_CHUNK):
                docs.extend(await self._c("checkpoints").find(
                    {**flt, "checkpoint_id": {"$in": ids[start:start + OR_CHUNK]}},
                    dict(READ_FIELDS)).to_list(None))
            records = await self._assemble(docs)
        return sorted((r for r in records if r.location == "warm"),
                      key=lambda r: r.checkpoint_id)

    if TYPE_CHECKING:
        async def _assemble(self, docs: Sequence[Doc], *,
                            reread: bool = True) -> Sequence[StoredCheckpoint]:
            """``MongoReads._assemble``: ``MongoWarm`` is built of both."""

    async def mark_archived(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_ids: Sequence[str],
        *,
        archive_key: str,
        owner: str,
        now: float,
        writes: Mapping[str, Sequence[WriteRecord]] | None = None,
    ) -> int:
        """Turn live checkpoints into stubs, each by one conditional update.

        The lease is checked first, but what makes two workers safe is the filter
        ``location: "warm"``: a checkpoint becomes a stub exactly once, naming the
        segment of whoever flipped it; the other segment is left for cold GC.
        Payload files, writes and (after the grace) blobs of the stubs go afterwards,
        so a crash leaves at worst a stub whose leftovers are collected later.
        """
        t, ns = plain(thread_id, "thread_id"), plain(checkpoint_ns, "checkpoint_ns")
        ids = [plain(c, "checkpoint_id") for c in checkpoint_ids]
        key = {"thread_id": t, "checkpoint_ns": ns}
        with self._errors("mark_archived"):
            held = await self._c("heads").find_one(
                {**key, "lease_owner": plain(owner, "owner"), "lease_until": {"$gte": now}},
                {"_id": 0, "head_id": 1},
            )
            if held is None or not ids:
                return 0
            live = {**key, "checkpoint_id": {"$in": ids}, "location": {"$ne": "archived"}}
            if await self._c("checkpoints").count_documents(live) != len(set(ids)):
                # some were deleted (or moved) since they were packed: all or nothing (a
                # delete landing between this count and the update is not excluded here)
                return 0
            files = [f for d in await self._c("checkpoints").find(
                live, {"_id": 0, "checkpoint.gridfs": 1}).to_list(None)
                for f in gridfs_ids(d, ("checkpoint",))]
            flipped = await self._c("checkpoints").update_many(
                live,
                {"$set": {"location": "archived", "archive_key": plain(archive_key, "key")},
                 "$unset": {"checkpoint": ""}},
            )
            stubs = [d["checkpoint_id"] for d in await self._c("checkpoints").find(
                {**key, "checkpoint_id": {"$in": ids}, "location": "archived"},
                {"_id": 0, "checkpoint_id": 1}).to_list(None)]
            if stubs:
                doomed: Doc = {**key, "checkpoint_id": {"$in": stubs}}
                if writes is not None:  # only what the segment holds stays out of warm
                    packed = [_packed_write(cid, w) for cid in stubs for w in writes.get(cid, ())]
                    doomed = {**key, "$or": packed} if packed else {**key, "_id": None}
                files.extend(await self._files_of("writes", doomed))
                await self._c("writes").delete_many(doomed)
                if held["head_id"] in stubs:
                    await self._c("heads").update_one(
                        {**key, "head_id": held["head_id"]}, {"$set": {"n_writes": 0}})
            if flipped.modified_count:
                # after the data moved: every cached copy of the head fails the check now
                await self._c("heads").update_one(key, {"$inc": {"version": 1}})
            await self._delete_files(files)
            await self._collect_blobs(t, ns)
        return int(flipped.modified_count)

    async def rehydrate(self, records: Sequence[StoredCheckpoint]) -> int:
        """Make stubs live again: blobs and writes first, then the stub flips back."""
        restored = 0
        with self._errors("rehydrate"):
            checkpoints = self._c("checkpoints")
            for r in records:
                t = plain(r.thread_id, "thread_id")
                ns = plain(r.checkpoint_ns, "checkpoint_ns")
                cid = plain(r.checkpoint_id, "checkpoint_id")
                key = {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": cid}
                stub = await checkpoints.find_one({**key, "location": "archived"}, {"_id": 0})
                if stub is None:
                    continue
                now = self._clock()
                versions = dict(versions_of(stub))
                blob_docs = [
                    await self._blob_doc(t, ns, BlobRecord(channel, versions[channel], payload),
                                         now)
                    for channel, payload in r.blobs.items() if channel in versions
                ]
                await self._insert_blobs(blob_docs, now)
                await self._insert_writes(t, ns, cid, r.writes, replace_special=False)
                packed = await self._pack(
                    {k: v for k, v in stub.items() if k != "checkpoint"},
                    {"checkpoint": ("checkpoint", r.checkpoint)},
                )
                flipped = await checkpoints.update_one(
                    {**key, "location": "archived"},
                    {"$set": {"location": "warm", "archive_key": None,
                              "checkpoint": packed["checkpoint"]}},
                )
                if flipped.modified_count:
                    restored += 1
                    await self._settle_writes(t, ns, cid)
                    await self._c("heads").update_one(
                        {"thread_id": t, "checkpoint_ns": ns}, {"$inc": {"version": 1}})
                else:  # rehydrated by someone else meanwhile
                    await self._delete_files(gridfs_ids(packed, ("checkpoint",)))
        return restored

    async def archive_refs(
        self, thread_id: str | None = None, *, keys: Sequence[str] | None = None
    ) -> dict[str, int]:
        match: Doc = {"archive_key": {"$type": "string"}}
        if thread_id is not None:
            match["thread_id"] = plain(thread_id, "thread_id")
        if keys is not None:
            if not keys:
                return {}
            wanted = sorted({plain(k, "key") for k in keys})
            match["archive_key"] = {"$in": wanted}  # the archive_key index: O(keys)
        with self._errors("archive_refs"):
            rows = await self._aggregate("checkpoints", [
                {"$match": match}, {"$group": {"_id": "$archive_key", "n": {"$sum": 1}}},
            ])
        return {str(row["_id"]): int(row["n"]) for row in rows}

    async def archive_stubs(
        self, *, keys: Sequence[str] | None = None, run_ids: Sequence[str] | None = None
    ) -> dict[str, builtins.set[str]]:
        if keys is None and run_ids is None:
            raise InvalidInput("archive_stubs needs keys or run_ids")
        flt: Doc = {"archive_key": {"$type": "string"}}
        if keys is not None:
            flt["archive_key"] = {"$in": [plain(k, "key") for k in keys]}
        if run_ids is not None:
            flt["run_id"] = {"$in": [plain(r, "run_id") for r in run_ids]}
        if (keys is not None and not keys) or (run_ids is not None and not run_ids):
            return {}
        out: dict[str, builtins.set[str]] = {}
        with self._errors("archive_stubs"):
            async for doc in self._c("checkpoints").find(
                flt, {"_id": 0, "archive_key": 1, "checkpoint_id": 1},
            ):
                out.setdefault(str(doc["archive_key"]), set()).add(str(doc["checkpoint_id"]))
        return out

    async def repoint_archive(
        self, old_key: str, new_key: str, checkpoint_ids: Sequence[str]
    ) -> int:
        ids = [plain(c, "checkpoint_id") for c in checkpoint_ids]
        with self._errors("repoint_archive"):
            moved = await self._c("checkpoints").update_many(
                {"archive_key": plain(old_key, "key"), "checkpoint_id": {"$in": ids}},
                {"$set": {"archive_key": plain(new_key, "key")}},
            )
        return int(moved.modified_count)
