"""The read path: ``head``, ``get`` and ``list``, and the join of a page of checkpoints
with their blobs, writes and GridFS payloads."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

from tierstore.codec.chain import channel_of
from tierstore.codec.pipeline import EMPTY
from tierstore.errors import TierUnavailable
from tierstore.records import ChainLink, Head, ListQuery, Payload, StoredCheckpoint, WriteRecord
from tierstore.tiers.mongo.documents import (
    OR_CHUNK,
    PAGE,
    READ_FIELDS,
    Doc,
    Docs,
    GridFSRef,
    Ids,
    keyset_after,
    list_plan,
    plain,
    read_payload,
    versions_of,
)
from tierstore.tiers.mongo.steps import MongoSteps


class MongoReads(MongoSteps):
    """Reads need no lock: a head's version is read before its checkpoint (see ``get``)."""

    async def head(self, thread_id: str, checkpoint_ns: str) -> Head | None:
        with self._errors("head"):
            doc = await self._head_doc(plain(thread_id, "thread_id"),
                                       plain(checkpoint_ns, "checkpoint_ns"))
        if doc is None:
            return None
        return Head(doc["head_id"], int(doc["version"]), int(doc.get("n_writes", 0)))

    async def get(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> StoredCheckpoint | None:
        flt: Doc = {"thread_id": plain(thread_id, "thread_id"),
                    "checkpoint_ns": plain(checkpoint_ns, "checkpoint_ns")}
        if checkpoint_id is not None:
            flt["checkpoint_id"] = plain(checkpoint_id, "checkpoint_id")
        with self._errors("get"):
            # Without transactions the head's version is read before the checkpoint:
            # every change stores its data first and moves the version after, so what
            # is read next holds at least that version's state. A copy cached under it
            # is served only while the head still has that version, i.e. before any
            # later change has completed.
            for _attempt in range(3):
                before = await self._head_doc(flt["thread_id"], flt["checkpoint_ns"]) \
                    if checkpoint_id is None else None
                doc = await self._c("checkpoints").find_one(
                    flt, dict(READ_FIELDS), sort=[("checkpoint_id", -1)]
                )
                if doc is None:
                    return None
                assembled = await self._assemble([doc])
                if assembled:
                    break
                if checkpoint_id is not None:
                    return None  # taken back between the two reads: it does not exist
            else:
                raise TierUnavailable(
                    f"the latest checkpoint of thread {thread_id!r} was taken back three "
                    "times while being read (concurrent refused writes); retry",
                    tier="warm", backend=self.backend)
            record = assembled[0]
            if before is not None and before.get("head_id") == record.checkpoint_id:
                record = replace(record, version=int(before["version"]))
        return record

    async def list(self, query: ListQuery) -> AsyncIterator[StoredCheckpoint]:
        flt, sort = list_plan(query)
        remaining = query.limit
        last: Doc | None = None
        while remaining is None or remaining > 0:
            page = PAGE if remaining is None else min(PAGE, remaining)
            page_filter = flt if last is None else {"$and": [flt, keyset_after(last, sort)]}
            with self._errors("list"):
                docs = await (
                    self._c("checkpoints").find(page_filter, dict(READ_FIELDS))
                    .sort(sort).limit(page).to_list(None)
                )
                records = await self._assemble(docs)
            for record in records:
                yield record
            if len(docs) < page:
                return
            last = docs[-1]
            if remaining is not None:
                remaining -= len(docs)

    async def _assemble(self, docs: Sequence[Doc], *,
                        reread: bool = True) -> Sequence[StoredCheckpoint]:
        """Join blobs and writes of a page of checkpoints in a few queries, not per row.

        A live checkpoint finds a blob for every channel version it names (the rest
        are listed in ``missing``). Without transactions, an archive move can turn a
        checkpoint read as live into a stub and collect its blobs before they are
        fetched: such checkpoints (``reread``) are read once more, and a stub then
        reads from cold.
        """
        pairs: dict[tuple[str, str], set[tuple[str, str]]] = {}
        ids: dict[tuple[str, str], Ids] = {}
        for doc in docs:
            key = (doc["thread_id"], doc["checkpoint_ns"])
            if doc.get("location") != "archived":  # a stub's values live in its segment
                pairs.setdefault(key, set()).update(versions_of(doc))
            ids.setdefault(key, []).append(doc["checkpoint_id"])
        blob_docs, write_docs = await asyncio.gather(
            self._fetch_blobs(pairs), self._fetch_writes(ids)
        )
        blobs: dict[tuple[str, str, str, str], Payload | GridFSRef] = {
            (b["thread_id"], b["checkpoint_ns"], b["channel"], b["version"]):
                read_payload(b.get("payload"), f"blob {b['channel']!r}")
            for b in blob_docs
        }
        if reread:
            torn = [doc for doc in docs if doc.get("location") != "archived" and any(
                (doc["thread_id"], doc["checkpoint_ns"], ch, v) not in blobs
                for ch, v in versions_of(doc))]
            if torn:
                keys = [{k: doc[k] for k in ("thread_id", "checkpoint_ns", "checkpoint_id")}
                        for doc in torn]
                again = {(d["thread_id"], d["checkpoint_ns"], d["checkpoint_id"]): d
                         for d in await self._c("checkpoints").find(
                             {"$or": keys}, dict(READ_FIELDS)).to_list(None)}
                # a checkpoint gone on the second read was a put refused and taken back
                # (strict mode, a lost fence) or deleted meanwhile: it is not returned
                gone = {id(d) for d in torn
                        if (d["thread_id"], d["checkpoint_ns"], d["checkpoint_id"]) not in again}
                return await self._assemble([
                    again.get((d["thread_id"], d["checkpoint_ns"], d["checkpoint_id"]), d)
                    for d in docs if id(d) not in gone], reread=False)
        writes: dict[tuple[str, str, str], Docs] = {}
        for w in write_docs:
            writes.setdefault((w["thread_id"], w["checkpoint_ns"], w["checkpoint_id"]),
                              []).append(w)

        refs: dict[Any, tuple[GridFSRef, str]] = {}

        def note(value: Payload | GridFSRef, where: str) -> Payload | GridFSRef:
            if isinstance(value, GridFSRef):
                refs.setdefault(value.file_id, (value, where))
            return value

        staged = []
        for doc in docs:
            t, ns, cid = doc["thread_id"], doc["checkpoint_ns"], doc["checkpoint_id"]
            where = f"thread {t!r} checkpoint {cid!r}"
            checkpoint = note(read_payload(doc.get("checkpoint"), where), where)
            metadata = note(read_payload(doc.get("metadata"), where), where)
            missing = tuple(sorted(ch for ch, v in versions_of(doc)
                                   if (t, ns, ch, v) not in blobs)) \
                if doc.get("location") != "archived" else ()
            channel_values = {
                channel: note(blobs[(t, ns, channel, version)], f"{where} channel {channel!r}")
                for channel, version in versions_of(doc)
                if doc.get("location") != "archived" and (t, ns, channel, version) in blobs
            }
            pending = sorted(writes.get((t, ns, cid), ()),
                             key=lambda w: (w.get("task_path", ""), w["task_id"], w["idx"]))
            staged.append((doc, checkpoint, metadata, channel_values, missing, [
                (w, note(read_payload(w.get("payload"), f"{where} write"), f"{where} write"))
                for w in pending
            ]))

        fetched = await self._download_all(refs)

        def real(value: Payload | GridFSRef) -> Payload:
            return fetched[value.file_id] if isinstance(value, GridFSRef) else value

        return [
            StoredCheckpoint(
                thread_id=doc["thread_id"],
                checkpoint_ns=doc["checkpoint_ns"],
                checkpoint_id=doc["checkpoint_id"],
                parent_id=doc.get("parent_id"),
                checkpoint=real(checkpoint),
                metadata=real(metadata),
                blobs={channel: real(value) for channel, value in channel_values.items()},
                writes=tuple(
                    WriteRecord(w["task_id"], int(w["idx"]), w["channel"], real(value),
                                w.get("task_path", ""))
                    for w, value in pending_writes
                ),
                location=doc.get("location") or "warm",
                archive_key=doc.get("archive_key"),
                missing=missing,
            )
            for doc, checkpoint, metadata, channel_values, missing, pending_writes in staged
        ]

    async def _fetch_blobs(
        self, pairs: Mapping[tuple[str, str], set[tuple[str, str]]]
    ) -> Docs:
        queries = []
        for (t, ns), wanted in pairs.items():
            ordered = sorted(wanted)
            for start in range(0, len(ordered), OR_CHUNK):
                branches = [{"channel": c, "version": v}
                            for c, v in ordered[start:start + OR_CHUNK]]
                queries.append({"thread_id": t, "checkpoint_ns": ns, "$or": branches})
        results = await asyncio.gather(*(
            self._c("blobs").find(q, {"_id": 0, "seen_at": 0}).to_list(None) for q in queries
        ))
        return [doc for docs in results for doc in docs]

    async def _fetch_writes(self, ids: Mapping[tuple[str, str], Sequence[str]]) -> Docs:
        results = await asyncio.gather(*(
            self._c("writes").find(
                {"thread_id": t, "checkpoint_ns": ns, "checkpoint_id": {"$in": cids}},
                {"_id": 0},
            ).to_list(None)
            for (t, ns), cids in ids.items()
        ))
        return [doc for docs in results for doc in docs]

    # -- ancestors of a checkpoint (DeltaChannel history) -------------------------------

    async def ancestors(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        channels: Sequence[str],
        *,
        limit: int,
    ) -> builtins.list[ChainLink]:
        """A page of the namespace (checkpoint ids only grow along a chain), walked in
        memory; then which asked values exist (tags only), and the values and writes
        of the links up to the cut: a few queries for up to ``limit`` links."""
        asked = list(dict.fromkeys(channels))
        if not asked or limit <= 0:
            return []
        flt: Doc = {"thread_id": plain(thread_id, "thread_id"),
                    "checkpoint_ns": plain(checkpoint_ns, "checkpoint_ns")}
        with self._errors("ancestors"):
            start = await self._c("checkpoints").find_one(
                {**flt, "checkpoint_id": plain(checkpoint_id, "checkpoint_id")},
                {"_id": 0, "parent_id": 1})
            chain = await self._chain(flt, start.get("parent_id") if start else None, limit)
            if not chain:
                return []
            tags = await self._value_tags(flt, chain, asked)
            torn = [doc for doc in chain if doc.get("location") != "archived" and any(
                (ch, v) not in tags for ch, v in versions_of(doc)
                if _owner(ch, asked) is not None)]
            if torn:  # an archive move may have turned them into stubs under this read
                again = {d["checkpoint_id"]: d for d in await self._c("checkpoints").find(
                    {**flt, "checkpoint_id": {"$in": [d["checkpoint_id"] for d in torn]}},
                    dict(_CHAIN_FIELDS)).to_list(None)}
                chain = [again.get(d["checkpoint_id"], d) for d in chain]
            return await self._links(flt, chain, asked, tags)

    async def _chain(self, flt: Doc, parent: str | None, limit: int) -> Docs:
        """Follow ``parent_id`` from ``parent`` through pages of the namespace, newest first."""
        chain: Docs = []
        page: dict[str, Doc] = {}
        while parent is not None and len(chain) < limit:
            doc = page.get(parent)
            if doc is None:
                docs = await (self._c("checkpoints")
                              .find({**flt, "checkpoint_id": {"$lte": parent}},
                                    dict(_CHAIN_FIELDS))
                              .sort([("checkpoint_id", -1)]).limit(PAGE).to_list(None))
                page = {d["checkpoint_id"]: d for d in docs}
                doc = page.get(parent)
                if doc is None:  # not stored (pruned, deleted): the chain ends here
                    break
            chain.append(doc)
            parent = doc.get("parent_id")
        return chain

    async def _value_tags(self, flt: Doc, chain: Docs, asked: Sequence[str]
                          ) -> dict[tuple[str, str], str]:
        """(channel, version) -> payload tag of the asked values the live links name."""
        pairs = sorted({(ch, v) for doc in chain if doc.get("location") != "archived"
                        for ch, v in versions_of(doc) if _owner(ch, asked) is not None})
        results = await asyncio.gather(*(
            self._c("blobs").find(
                {**flt, "$or": [{"channel": c, "version": v}
                                for c, v in pairs[i:i + OR_CHUNK]]},
                {"_id": 0, "channel": 1, "version": 1, "payload.tag": 1}).to_list(None)
            for i in range(0, len(pairs), OR_CHUNK)))
        return {(b["channel"], b["version"]): str((b.get("payload") or {}).get("tag", ""))
                for docs in results for b in docs}

    async def _links(self, flt: Doc, chain: Docs, asked: Sequence[str],
                     tags: Mapping[tuple[str, str], str]) -> builtins.list[ChainLink]:
        """Cut the chain after the link that seeds the last asked channel, then read the
        values that are seeds and the writes of the links kept."""
        unseeded = set(asked)
        kept: builtins.list[tuple[Doc, builtins.list[str], dict[str, str], builtins.list[str]]] = []
        for doc in chain:
            if not unseeded:
                break
            wanted = [ch for ch in asked if ch in unseeded]
            seeds: dict[str, str] = {}  # stored name -> version, of the values that seed
            chained: dict[str, dict[str, str]] = {}  # channel -> its delta chain's links
            missing: builtins.list[str] = []
            if doc.get("location") != "archived":
                for name, v in versions_of(doc):
                    ch = _owner(name, asked)
                    if ch is None or ch not in unseeded:
                        continue
                    tag = tags.get((name, v))
                    if tag is None:
                        missing.append(ch)
                    elif name != ch:
                        chained.setdefault(ch, {})[name] = v
                    elif tag != EMPTY.tag:
                        seeds[ch] = v
            for ch, links in chained.items():
                if ch not in seeds and ch not in missing:  # a whole value wins
                    seeds.update(links)
            kept.append((doc, wanted, seeds, sorted(set(missing))))
            unseeded.difference_update(_owner(name, asked) for name in seeds)
        values_wanted = sorted({(ch, v) for _, _, seeds, _ in kept for ch, v in seeds.items()})
        ids = [doc["checkpoint_id"] for doc, _, _, _ in kept]
        blob_docs, write_docs = await asyncio.gather(
            asyncio.gather(*(
                self._c("blobs").find(
                    {**flt, "$or": [{"channel": c, "version": v}
                                    for c, v in values_wanted[i:i + OR_CHUNK]]},
                    {"_id": 0, "channel": 1, "version": 1, "payload": 1}).to_list(None)
                for i in range(0, len(values_wanted), OR_CHUNK))),
            asyncio.gather(*(
                self._c("writes").find(
                    {**flt, "checkpoint_id": {"$in": ids[i:i + OR_CHUNK]},
                     "channel": {"$in": list(asked)}}, {"_id": 0}).to_list(None)
                for i in range(0, len(ids), OR_CHUNK))))
        refs: dict[Any, tuple[GridFSRef, str]] = {}

        def note(value: Payload | GridFSRef, where: str) -> Payload | GridFSRef:
            if isinstance(value, GridFSRef):
                refs.setdefault(value.file_id, (value, where))
            return value

        values = {(b["channel"], b["version"]): note(read_payload(
                      b.get("payload"), f"blob {b['channel']!r}"), f"blob {b['channel']!r}")
                  for docs in blob_docs for b in docs}
        writes: dict[str, Docs] = {}
        for docs in write_docs:
            for w in docs:
                writes.setdefault(w["checkpoint_id"], []).append(w)
        staged = []
        for doc, wanted, seeds, missing in kept:
            cid = doc["checkpoint_id"]
            where = f"checkpoint {cid!r} write"
            pending = sorted((w for w in writes.get(cid, ()) if w["channel"] in wanted),
                             key=lambda w: (w.get("task_path", ""), w["task_id"], w["idx"]))
            staged.append((doc, {ch: values[(ch, v)] for ch, v in seeds.items()
                                 if (ch, v) in values},
                           [(w, note(read_payload(w.get("payload"), where), where))
                            for w in pending], missing))
        fetched = await self._download_all(refs)

        def real(value: Payload | GridFSRef) -> Payload:
            return fetched[value.file_id] if isinstance(value, GridFSRef) else value

        return [
            ChainLink(
                checkpoint_id=doc["checkpoint_id"],
                parent_id=doc.get("parent_id"),
                values={ch: real(value) for ch, value in seeded.items()},
                writes=tuple(WriteRecord(w["task_id"], int(w["idx"]), w["channel"], real(p),
                                         w.get("task_path", "")) for w, p in pending),
                location=doc.get("location") or "warm",
                archive_key=doc.get("archive_key"),
                missing=tuple(missing),
            )
            for doc, seeded, pending, missing in staged
        ]


def _owner(name: str, asked: Sequence[str]) -> str | None:
    """The asked channel a stored name holds a value of: itself, or the channel whose
    delta chain (``codec.chain``) it is a link of."""
    if name in asked:
        return name
    ch = channel_of(name)
    return ch if ch != name and ch in asked else None


_CHAIN_FIELDS: Final[Mapping[str, int]] = {
    "_id": 0, "checkpoint_id": 1, "parent_id": 1, "channel_versions": 1, "location": 1,
    "archive_key": 1,
}
