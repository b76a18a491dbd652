"""Thread administration: delete, prune, copy and publish whole threads, and usage."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import bson

from tierstore.errors import InvalidInput
from tierstore.records import TierUsage
from tierstore.tiers.mongo.documents import FileIds, Ids, gridfs_ids, plain
from tierstore.tiers.mongo.steps import MongoSteps


class MongoAdmin(MongoSteps):
    """Deletes remove documents first and their GridFS files after (see ``gridfs_offload``)."""

    async def delete_thread(self, thread_id: str) -> None:
        t = plain(thread_id, "thread_id")
        with self._errors("delete_thread"):
            files: FileIds = []
            for collection in ("checkpoints", "writes", "blobs"):
                files.extend(await self._files_of(collection, {"thread_id": t}))
            for collection in ("checkpoints", "writes", "blobs", "heads"):
                await self._c(collection).delete_many({"thread_id": t})
            await self._delete_files(files)

    async def delete_for_runs(self, run_ids: Sequence[str]) -> Sequence[str]:
        ids = [plain(r, "run_id") for r in run_ids]
        if not ids:
            return []
        with self._errors("delete_for_runs"):
            docs = await self._c("checkpoints").find(
                {"run_id": {"$in": ids}},
                {"_id": 0, "thread_id": 1, "checkpoint_ns": 1, "checkpoint_id": 1},
            ).to_list(None)
            groups: dict[tuple[str, str], Ids] = {}
            for doc in docs:
                groups.setdefault((doc["thread_id"], doc["checkpoint_ns"]), []).append(
                    doc["checkpoint_id"])
            for (t, ns), cids in groups.items():
                await self._delete_checkpoints(t, ns, {"$in": cids})
        return sorted({t for t, _ in groups})

    async def prune(self, thread_ids: Sequence[str], *, keep_latest: bool) -> None:
        threads = [plain(t, "thread_id") for t in thread_ids]
        if not keep_latest:
            for t in threads:
                await self.delete_thread(t)
            return
        with self._errors("prune"):
            checkpoints = self._c("checkpoints")
            for t in threads:
                for ns in await checkpoints.distinct("checkpoint_ns", {"thread_id": t}):
                    latest = await checkpoints.find_one(
                        {"thread_id": t, "checkpoint_ns": ns},
                        {"_id": 0, "checkpoint_id": 1}, sort=[("checkpoint_id", -1)],
                    )
                    if latest is not None:
                        await self._delete_checkpoints(t, ns, {"$lt": latest["checkpoint_id"]})

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        src = plain(source_thread_id, "thread_id")
        dst = plain(target_thread_id, "thread_id")
        if src == dst:
            return
        with self._errors("copy_thread"):
            now = self._clock()
            # blobs, then writes, then checkpoints: a copied checkpoint is readable whole
            async for doc in self._c("blobs").find({"thread_id": src}, {"_id": 0}):
                where = f"blob {doc['channel']!r} of thread {src!r}"
                payload = await self._copy_payload(doc.get("payload"), "blob", where)
                await self._insert_blobs([{**doc, "_id": bson.ObjectId(), "thread_id": dst,
                                           "payload": payload, "seen_at": now}], now)
            async for doc in self._c("writes").find({"thread_id": src}, {"_id": 0}):
                where = f"write of thread {src!r}"
                copy = {**doc, "thread_id": dst,
                        "payload": await self._copy_payload(doc.get("payload"), "write", where)}
                key = {k: copy[k] for k in ("thread_id", "checkpoint_ns", "checkpoint_id",
                                            "task_id", "idx")}
                previous = await self._replace("writes", key, copy)
                if previous is not None:
                    await self._delete_files(gridfs_ids(previous, ("payload",)))
            namespaces: set[str] = set()
            async for doc in self._c("checkpoints").find({"thread_id": src}, {"_id": 0}):
                where = f"checkpoint {doc['checkpoint_id']!r} of thread {src!r}"
                copy = {**doc, "thread_id": dst, "token": uuid.uuid4().hex}
                for field in ("checkpoint", "metadata"):
                    if field in doc:
                        copy[field] = await self._copy_payload(doc[field], field, where)
                key = {"thread_id": dst, "checkpoint_ns": doc["checkpoint_ns"],
                       "checkpoint_id": doc["checkpoint_id"]}
                previous = await self._replace("checkpoints", key, copy)
                if previous is not None:
                    await self._delete_files(gridfs_ids(previous, ("checkpoint", "metadata")))
                namespaces.add(doc["checkpoint_ns"])
            for ns in sorted(namespaces):
                await self._refresh_head(dst, ns)

    async def publish_thread(self, source_thread_id: str, target_thread_id: str, *,
                             replace: bool) -> None:
        """MongoDB has no transaction here: check, copy, and check again.

        A target with checkpoints is refused before the copy; one that gained
        checkpoints while the copy ran (the application wrote it meanwhile) gets the
        copied checkpoints taken out again and the import refused, so its own
        checkpoints are never mixed with imported ones. With ``replace`` the old
        target is deleted right before the copy: a crash in between leaves the
        thread missing (the staged copy stays under its staging id).
        """
        src = plain(source_thread_id, "thread_id")
        dst = plain(target_thread_id, "thread_id")
        refusal = (f"thread {dst[:200]!r} already exists; import it under another id "
                   "(--as-thread) or replace it (--replace)")
        with self._errors("publish_thread"):
            taken = await self._c("checkpoints").find_one({"thread_id": dst}, {"_id": 1})
        if taken is not None and not replace:
            raise InvalidInput(refusal)
        if replace:
            await self.delete_thread(dst)
        with self._errors("publish_thread"):
            ours = {(d["checkpoint_ns"], d["checkpoint_id"]) async for d in
                    self._c("checkpoints").find({"thread_id": src},
                                                {"_id": 0, "checkpoint_ns": 1,
                                                 "checkpoint_id": 1})}
        await self.copy_thread(src, dst)
        with self._errors("publish_thread"):
            found = {(d["checkpoint_ns"], d["checkpoint_id"]) async for d in
                     self._c("checkpoints").find({"thread_id": dst},
                                                 {"_id": 0, "checkpoint_ns": 1,
                                                  "checkpoint_id": 1})}
            if found - ours:
                by_ns: dict[str, list[str]] = {}
                for ns, cid in ours:
                    by_ns.setdefault(ns, []).append(cid)
                for ns, cids in by_ns.items():
                    await self._delete_checkpoints(dst, ns, {"$in": cids})
        if found - ours:
            raise InvalidInput(refusal)

    async def usage(self) -> TierUsage:
        with self._errors("usage"):
            threads = await self._aggregate("heads", [
                {"$group": {"_id": "$thread_id"}}, {"$group": {"_id": None, "n": {"$sum": 1}}},
            ])
            by_location = await self._aggregate("checkpoints", [
                {"$group": {"_id": "$location", "n": {"$sum": 1},
                            "bytes": {"$sum": "$size_bytes"}}},
            ])
            payload_bytes = 0
            for name in ("blobs", "writes"):
                for row in await self._aggregate(name, [
                    {"$group": {"_id": None, "bytes": {"$sum": "$payload.size"}}},
                ]):
                    payload_bytes += int(row["bytes"])
            files = await self._c("gridfs_files").count_documents({})
        counts = {row["_id"]: (int(row["n"]), int(row["bytes"])) for row in by_location}
        live = counts.get("warm", (0, 0))
        return TierUsage(
            threads=int(threads[0]["n"]) if threads else 0,
            checkpoints=live[0],
            archived=counts.get("archived", (0, 0))[0],
            bytes=live[1] + payload_bytes,
            objects=int(files),
        )
