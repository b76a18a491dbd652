"""GridFS offload: payloads too large to stay in their document, and their files' lifecycle.

Every payload field (checkpoint, metadata, blob, write) is one of::

    PAYLOAD = {tag, data: <bytes>, size}                             kept in the document
            | {tag, gridfs: <file id>, sha256: <hex>, size}           offloaded to GridFS

A put uploads its files before it writes the documents that name them (see
``writes``); deletes go the other way: documents first, then their GridFS files, so a crash can
leave an unreferenced file but never a reference to a missing one. Each GridFS file
belongs to exactly one document (``copy_thread`` copies the bytes), which is what
makes deleting it with its document safe. Leftovers are collectable:

- blobs that no live checkpoint names any more are deleted by ``delete_for_runs``,
  ``prune`` and ``mark_archived`` once they are older than ``orphan_grace`` (a put
  in flight inserts its blobs a moment before its checkpoint; the grace keeps those);
- ``sweep_gridfs()`` deletes GridFS files older than ``orphan_grace`` that no
  document references (uploads of a crashed put, files of a crashed delete).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, Final

import bson
from gridfs.errors import NoFile

from tierstore.errors import CorruptPayload
from tierstore.records import Payload
from tierstore.tiers.mongo.connection import MongoConnection
from tierstore.tiers.mongo.documents import (
    OR_CHUNK,
    Doc,
    FileIds,
    GridFSRef,
    fit_document,
    gridfs_ids,
    read_payload,
)

# Where each kind of GridFS file is referenced from: kind -> (collection, payload field).
_FILE_OWNERS: Final[Mapping[str, tuple[str, str]]] = {
    "checkpoint": ("checkpoints", "checkpoint"),
    "metadata": ("checkpoints", "metadata"),
    "blob": ("blobs", "payload"),
    "write": ("writes", "payload"),
}

_PARALLEL_FILES: Final = 8


class GridFSOffload(MongoConnection):
    """Packs payload fields into a document or into GridFS, and reads them back."""

    async def _upload(self, kind: str, payload: Payload) -> Doc:
        digest = hashlib.sha256(payload.data).hexdigest()
        file_id = await self._bucket.upload_from_stream(
            f"{kind}/{digest}", payload.data, metadata={"kind": kind, "sha256": digest}
        )
        return {"tag": payload.tag, "gridfs": file_id, "sha256": digest, "size": payload.size}

    async def _download(self, ref: GridFSRef, where: str) -> Payload:
        with self._errors(f"reading GridFS file {ref.file_id} of {where}"):
            stream = await self._bucket.open_download_stream(ref.file_id)
            data = bytes(await stream.read())
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise CorruptPayload(
                f"mongodb {self._where}: GridFS file {ref.file_id} of {where} fails its "
                "checksum", where=where,
            )
        return Payload(ref.tag, data)

    async def _delete_files(self, file_ids: Iterable[Any]) -> None:
        async def delete(file_id: Any) -> None:
            with suppress(NoFile):  # already gone: deleting is idempotent
                await self._bucket.delete(file_id)

        ids = [*file_ids]
        for start in range(0, len(ids), _PARALLEL_FILES):
            await asyncio.gather(*(delete(f) for f in ids[start:start + _PARALLEL_FILES]))

    async def _pack(self, doc: Doc, payloads: Mapping[str, tuple[str, Payload]]) -> Doc:
        """``doc`` with its payload fields filled in, offloading what must not stay inline."""
        skeleton = {**doc, **{f: {"tag": p.tag, "data": b""} for f, (_, p) in payloads.items()}}
        offload = fit_document(
            len(bson.encode(skeleton)),
            {field: payload.size for field, (_, payload) in payloads.items()},
            threshold=self.offload_threshold,
        )
        out = dict(doc)
        for field, (kind, payload) in payloads.items():
            if field in offload:
                out[field] = await self._upload(kind, payload)
            else:
                out[field] = {"tag": payload.tag, "data": payload.data, "size": payload.size}
        return out

    async def _copy_payload(self, value: Any, kind: str, where: str) -> Any:
        """A payload field for a copied document; GridFS bytes are copied, never shared."""
        payload = read_payload(value, where)
        if isinstance(payload, Payload):
            return value
        return await self._upload(kind, await self._download(payload, where))

    async def _download_all(
        self, refs: Mapping[Any, tuple[GridFSRef, str]]
    ) -> dict[Any, Payload]:
        gate = asyncio.Semaphore(_PARALLEL_FILES)

        async def one(ref: GridFSRef, where: str) -> Payload:
            async with gate:
                return await self._download(ref, where)

        items = list(refs.items())
        values = await asyncio.gather(*(one(ref, where) for _, (ref, where) in items))
        return {file_id: value for (file_id, _), value in zip(items, values, strict=True)}

    async def _files_of(self, collection: str, flt: Doc) -> FileIds:
        fields = ("checkpoint", "metadata") if collection == "checkpoints" else ("payload",)
        query = {**flt, "$or": [{f"{f}.gridfs": {"$exists": True}} for f in fields]}
        projection = {"_id": 0, **{f"{f}.gridfs": 1 for f in fields}}
        docs = await self._c(collection).find(query, projection).to_list(None)
        return [file_id for doc in docs for file_id in gridfs_ids(doc, fields)]

    async def sweep_gridfs(self, *, now: float | None = None) -> int:
        """Delete GridFS files older than ``orphan_grace`` that no document references.

        Only crashes leave such files (an upload whose document was never written, a
        delete that stopped before its files). Safe to run from many workers at once:
        a file is only deleted while nothing names it, and the grace keeps uploads of
        puts in flight. Returns how many files were deleted.
        """
        at = self._clock() if now is None else now
        cutoff = datetime.fromtimestamp(at - self.orphan_grace, UTC).replace(tzinfo=None)
        with self._errors("sweep_gridfs"):
            files = await self._c("gridfs_files").find(
                {"uploadDate": {"$lt": cutoff}}, {"_id": 1, "metadata.kind": 1}
            ).to_list(None)
            by_kind: dict[str, FileIds] = {}
            for f in files:
                kind = str((f.get("metadata") or {}).get("kind"))
                if kind in _FILE_OWNERS:
                    by_kind.setdefault(kind, []).append(f["_id"])
            orphans: FileIds = []
            for kind, ids in by_kind.items():
                collection, field = _FILE_OWNERS[kind]
                for start in range(0, len(ids), OR_CHUNK):
                    chunk = ids[start:start + OR_CHUNK]
                    used = await self._c(collection).find(
                        {f"{field}.gridfs": {"$in": chunk}}, {"_id": 0, f"{field}.gridfs": 1}
                    ).to_list(None)
                    referenced = {f for doc in used for f in gridfs_ids(doc, (field,))}
                    orphans.extend(i for i in chunk if i not in referenced)
            await self._delete_files(orphans)
        return len(orphans)
