"""The request path: reads of heads and checkpoints, puts, fencing tokens.

The head moves only inside the database, under the head row's lock, so processes
sharing a database agree on it; ``strict`` writes compare the parent there and
write nothing when it is stale.

Limits: thread ids and namespaces may be as long as tierstore allows (64 KiB);
checkpoint ids, task ids, channel names and versions are btree keys and must fit
in about 2.6 KB (LangGraph's are a few dozen bytes); a longer one is refused with
``PayloadTooLarge``. A payload may be up to 1 GB (PostgreSQL's ``bytea`` limit).
"""

from __future__ import annotations

import builtins
import json
import math
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final, TypeVar

import asyncpg

from tierstore.codec.chain import channel_of
from tierstore.errors import LeaseLost, MissingBlobs, VersionConflict
from tierstore.policy import is_text
from tierstore.records import (
    BlobRecord,
    ChainLink,
    CheckpointRecord,
    Head,
    ListQuery,
    Payload,
    PutResult,
    Scalar,
    StoredCheckpoint,
    WriteRecord,
)
from tierstore.tiers.base import WarmFencing, WarmRequests
from tierstore.tiers.postgres.pool import PostgresPool
from tierstore.tiers.postgres.sql import SID, Conn, digest, stream

T = TypeVar("T")

_PAGE: Final = 200

_HEAD = (
    "SELECT h.head_id, h.version, h.n_writes FROM tierstore_heads AS h "
    f"WHERE {stream('h')} AND h.head_id IS NOT NULL"
)

# A page of checkpoint rows ({page}: columns c.*, h.thread_id, h.checkpoint_ns), each
# with its blobs (named by channel_versions) and its writes as parallel arrays.
# LIMIT 1 keeps the blob lookup a primary-key probe per channel: joined freely, the
# planner would hash every blob version of the namespace to find a handful. The
# page comes back in any order and is sorted in Python: sorting here would copy
# every row with its payloads, and a large page would spill to disk.
#
# No row is stored for an empty channel, so a name without one is no value, except
# for a link of a delta chain (``~<depth>~<channel>``, ``codec.chain``): a link is
# never empty, so a live checkpoint naming one that has no row lost it. The same
# probes (joined LEFT) return those names as ``lost_links``; the saver refuses the
# record and the archive jobs leave it warm, as on the stores that keep a row for
# every version. ``aput`` refuses a channel named like a link, so such a name is one.
_ASSEMBLE = """
SELECT c.thread_id, c.checkpoint_ns, c.checkpoint_id, c.parent_id, c.checkpoint_tag,
       c.checkpoint, c.metadata_tag, c.metadata, c.archive_key,
       b.channels AS blob_channels, b.tags AS blob_tags, b.data AS blob_data,
       b.lost_links,
       w.task_ids, w.idxs, w.channels AS write_channels, w.tags AS write_tags,
       w.data AS write_data, w.paths AS write_paths
  FROM ({page}) AS c
 CROSS JOIN LATERAL (
       SELECT array_agg(b.channel) FILTER (WHERE b.channel IS NOT NULL) AS channels,
              array_agg(b.tag) FILTER (WHERE b.channel IS NOT NULL) AS tags,
              array_agg(b.data) FILTER (WHERE b.channel IS NOT NULL) AS data,
              array_agg(v.channel) FILTER (
                  WHERE b.channel IS NULL AND c.archive_key IS NULL
                    AND v.channel ~ '^~(0|[1-9][0-9]{{0,3}})~') AS lost_links
         FROM jsonb_each_text(c.channel_versions) AS v(channel, version)
         LEFT JOIN LATERAL (
              SELECT b.channel, b.tag, b.data FROM tierstore_blobs AS b
               WHERE b.sid = c.sid AND b.channel = v.channel AND b.version = v.version
               LIMIT 1) AS b ON true) AS b
 CROSS JOIN LATERAL (
       SELECT array_agg(w.task_id) AS task_ids, array_agg(w.idx) AS idxs,
              array_agg(w.channel) AS channels, array_agg(w.tag) AS tags,
              array_agg(w.data) AS data, array_agg(w.task_path) AS paths
         FROM tierstore_writes AS w
        WHERE w.sid = c.sid AND w.checkpoint_id = c.checkpoint_id) AS w
"""
_ROW = "SELECT c.*, h.thread_id, h.checkpoint_ns FROM tierstore_checkpoints AS c " \
       "JOIN tierstore_heads AS h ON h.sid = c.sid"
_GET_ONE = _ASSEMBLE.format(page=f"{_ROW} WHERE c.sid = {SID} AND c.checkpoint_id = $3")
# The latest checkpoint carries the head version read by the same statement (one
# snapshot), so a hot fill can never put an old state under a new version.
_GET_LATEST = (
    "SELECT a.*, (SELECT h.version FROM tierstore_heads AS h WHERE h.sid = "
    f"{SID} AND h.head_id = a.checkpoint_id) AS head_version FROM ("
    + _ASSEMBLE.format(
        page=f"{_ROW} WHERE c.sid = {SID} ORDER BY c.checkpoint_id DESC LIMIT 1"
    )
    + ") AS a"
)

# The parent chain of $3 in the stream ($1, $2), up to $4 links, for the channels $5:
# one row per link (per channel), per seed value and per write (0008; a lost
# link of a delta chain as a value with no tag, 0009).
_ANCESTORS = "SELECT * FROM tierstore_ancestors($1, $2, $3, $4, $5)"

_PUT_CHECKPOINT = (
    "SELECT o_ok, o_head, o_version, o_n_writes, o_conflict FROM tierstore_put_checkpoint("
    + ", ".join(f"${i}" for i in range(1, 18))
    + ")"
)
_PUT_WRITES = "SELECT tierstore_put_writes($1, $2, $3, $4, $5, $6, $7, $8, $9)"
_PUT_CHECKPOINT_FENCED = (
    "SELECT o_ok, o_head, o_version, o_n_writes, o_conflict FROM "
    "tierstore_put_checkpoint_fenced(" + ", ".join(f"${i}" for i in range(1, 19)) + ")"
)
_PUT_WRITES_FENCED = "SELECT tierstore_put_writes_fenced($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
_NEXT_FENCE = "SELECT tierstore_next_fence($1)"
_FENCED_OUT = "TS409"  # SQLSTATE raised by tierstore_check_fence
_MISSING_BLOBS = "TS404"  # SQLSTATE raised by tierstore_put_checkpoint (0003)


async def _fenced(thread_id: str, token: int, call: Awaitable[T]) -> T:
    """Await a fenced statement; the server's refusal becomes ``LeaseLost``."""
    try:
        return await call
    except asyncpg.PostgresError as exc:
        if exc.sqlstate != _FENCED_OUT:
            raise
        detail = getattr(exc, "detail", None) or "0"
        raise LeaseLost.superseded(thread_id, token, int(detail)) from exc


class PostgresRequests(PostgresPool, WarmRequests, WarmFencing):
    """Reads and writes of the request path: one statement each (``list``: one per page)."""

    # -- reads --------------------------------------------------------------------------

    async def head(self, thread_id: str, checkpoint_ns: str) -> Head | None:
        async def body(conn: Conn) -> Head | None:
            row = await conn.fetchrow(_HEAD, thread_id, checkpoint_ns)
            return Head(row[0], row[1], row[2]) if row is not None else None

        return await self._run("head", body, read=True)

    async def get(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> StoredCheckpoint | None:
        async def body(conn: Conn) -> asyncpg.Record | None:
            if checkpoint_id is None:
                return await conn.fetchrow(_GET_LATEST, thread_id, checkpoint_ns)
            return await conn.fetchrow(_GET_ONE, thread_id, checkpoint_ns, checkpoint_id)

        row = await self._run("get", body, read=True)
        if row is None:
            return None
        record = _assemble(row)
        if checkpoint_id is None and row["head_version"] is not None:
            record = replace(record, version=int(row["head_version"]))
        return record

    async def list(self, query: ListQuery) -> AsyncIterator[StoredCheckpoint]:
        params: list[Any] = []

        def arg(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        where: list[str] = []
        if query.thread_id is not None and query.checkpoint_ns is not None:
            # One namespace: its rows come in key order straight off the primary key.
            arg(query.thread_id)
            arg(query.checkpoint_ns)
            where.append(f"c.sid = {SID}")  # refers to $1 and $2
            order, cursor_cols = "c.checkpoint_id DESC", ["c.checkpoint_id"]
        else:
            order = "c.checkpoint_id DESC, h.thread_id DESC, h.checkpoint_ns DESC"
            cursor_cols = ["c.checkpoint_id", "h.thread_id", "h.checkpoint_ns"]
            if query.thread_id is not None:
                t = arg(query.thread_id)
                where.append(f"tierstore_key(h.thread_id) = {digest(t)} "
                             f"AND h.thread_id = {t}")
                order = "c.checkpoint_id DESC, h.checkpoint_ns DESC"
                cursor_cols = ["c.checkpoint_id", "h.checkpoint_ns"]
            if query.checkpoint_ns is not None:
                where.append(f"h.checkpoint_ns = {arg(query.checkpoint_ns)}")
        if query.checkpoint_id is not None:
            where.append(f"c.checkpoint_id = {arg(query.checkpoint_id)}")
        if query.before_id is not None:
            where.append(f"c.checkpoint_id < {arg(query.before_id)}")
        if query.filter:
            wanted = _filter_json(query.filter)
            if wanted is None:
                return  # a value no stored document can hold matches nothing
            where.append(f"c.filter_doc @> {arg(wanted)}::jsonb")

        remaining = query.limit
        cursor: tuple[str, ...] | None = None
        while remaining is None or remaining > 0:
            size = _PAGE if remaining is None else min(_PAGE, remaining)
            page_params = list(params)
            conds = list(where)
            if cursor is not None:
                marks = []
                for value in cursor:
                    page_params.append(value)
                    marks.append(f"${len(page_params)}")
                conds.append(f"({', '.join(cursor_cols)}) < ({', '.join(marks)})")
            page_params.append(size)
            page = (f"{_ROW} WHERE {' AND '.join(conds) or 'true'} "
                    f"ORDER BY {order} LIMIT ${len(page_params)}")
            sql = _ASSEMBLE.format(page=page)

            async def body(conn: Conn, sql: str = sql,
                           args: Sequence[Any] = page_params) -> list[asyncpg.Record]:
                return await conn.fetch(sql, *args)

            records = sorted(
                (_assemble(row) for row in await self._run("list", body, read=True)),
                key=lambda r: (r.checkpoint_id, r.thread_id, r.checkpoint_ns), reverse=True,
            )
            for record in records:
                yield record
            if len(records) < size:
                return
            last = records[-1]
            position = {"c.checkpoint_id": last.checkpoint_id, "h.thread_id": last.thread_id,
                        "h.checkpoint_ns": last.checkpoint_ns}
            cursor = tuple(position[col] for col in cursor_cols)
            if remaining is not None:
                remaining -= len(records)

    async def ancestors(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        channels: Sequence[str],
        *,
        limit: int,
    ) -> builtins.list[ChainLink]:
        asked = list(dict.fromkeys(channels))
        if not asked or limit <= 0:
            return []

        async def body(conn: Conn) -> builtins.list[asyncpg.Record]:
            return await conn.fetch(_ANCESTORS, thread_id, checkpoint_ns, checkpoint_id,
                                    limit, asked)

        return _links(await self._run("ancestors", body, read=True))

    # -- writes -------------------------------------------------------------------------

    async def next_fence(self, thread_id: str) -> int:
        async def body(conn: Conn) -> int:
            return int(await conn.fetchval(_NEXT_FENCE, thread_id))

        return await self._run("next_fence", body)

    async def put_checkpoint(
        self,
        record: CheckpointRecord,
        blobs: Sequence[BlobRecord],
        *,
        strict: bool,
        fence: int | None = None,
    ) -> PutResult:
        versions = {ch: _version_key(v) for ch, v in record.channel_versions.items()}
        # A channel with a version but no value reads back the same with no row: the
        # function stores no row for tag 'empty', but counts it among the new blobs
        # when it checks that every version the checkpoint names is held (0003).
        kept = list(blobs)
        args = (
            record.thread_id, record.checkpoint_ns, record.checkpoint_id, record.parent_id,
            strict, record.run_id, record.checkpoint.tag, record.checkpoint.data,
            record.metadata.tag, record.metadata.data,
            json.dumps(versions, separators=(",", ":")),
            _doc_json(record.filter_doc),
            record.checkpoint.size + record.metadata.size,
            [b.channel for b in kept], [_version_key(b.version) for b in kept],
            [b.payload.tag for b in kept], [b.payload.data for b in kept],
        )

        async def body(conn: Conn) -> asyncpg.Record:
            try:
                if fence is None:
                    row = await conn.fetchrow(_PUT_CHECKPOINT, *args)
                else:
                    row = await _fenced(record.thread_id, fence,
                                        conn.fetchrow(_PUT_CHECKPOINT_FENCED, fence, *args))
            except asyncpg.PostgresError as exc:
                if exc.sqlstate != _MISSING_BLOBS:
                    raise
                channels = json.loads(getattr(exc, "detail", None) or "[]")
                raise MissingBlobs.of(
                    record.thread_id, record.checkpoint_ns,
                    [(ch, record.channel_versions[ch]) for ch in channels
                     if ch in record.channel_versions],
                ) from exc
            assert row is not None
            return row

        ok, head_id, version, n_writes, conflict = await self._run("put_checkpoint", body)
        if not ok:
            raise VersionConflict(
                f"thread {record.thread_id!r} ns {record.checkpoint_ns!r}: parent "
                f"{record.parent_id!r} is not the head {head_id!r} (version {version})",
                thread_id=record.thread_id, checkpoint_ns=record.checkpoint_ns,
                head_id=head_id, version=version,
            )
        return PutResult(Head(head_id, version, n_writes), conflict)

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
        # One row per (task_id, idx) per statement: the first for idx >= 0, the last
        # for idx < 0, as if the writes had been stored one by one.
        unique: dict[tuple[str, int], WriteRecord] = {}
        for w in writes:
            key = (w.task_id, w.idx)
            if w.idx < 0 or key not in unique:
                unique[key] = w
        rows = list(unique.values())
        args = (
            thread_id, checkpoint_ns, checkpoint_id,
            [w.task_id for w in rows], [w.idx for w in rows], [w.channel for w in rows],
            [w.payload.tag for w in rows], [w.payload.data for w in rows],
            [w.task_path for w in rows],
        )

        async def body(conn: Conn) -> int | None:
            if fence is None:
                version = await conn.fetchval(_PUT_WRITES, *args)
            else:
                version = await _fenced(thread_id, fence,
                                        conn.fetchval(_PUT_WRITES_FENCED, fence, *args))
            return None if version is None else int(version)

        return await self._run("put_writes", body)


def _assemble(row: asyncpg.Record) -> StoredCheckpoint:
    blobs = {
        channel: Payload(tag, data)
        for channel, tag, data in zip(row["blob_channels"] or (), row["blob_tags"] or (),
                                      row["blob_data"] or (), strict=True)
    }
    writes = tuple(
        WriteRecord(task_id, idx, channel, Payload(tag, data), path)
        for task_id, idx, channel, tag, data, path in zip(
            row["task_ids"] or (), row["idxs"] or (), row["write_channels"] or (),
            row["write_tags"] or (), row["write_data"] or (), row["write_paths"] or (),
            strict=True,
        )
    )
    archive_key = row["archive_key"]
    lost = row["lost_links"]
    return StoredCheckpoint(
        thread_id=row["thread_id"],
        checkpoint_ns=row["checkpoint_ns"],
        checkpoint_id=row["checkpoint_id"],
        parent_id=row["parent_id"],
        checkpoint=Payload(row["checkpoint_tag"] or "", row["checkpoint"] or b""),
        metadata=Payload(row["metadata_tag"], row["metadata"]),
        blobs=blobs,
        writes=writes,
        location="warm" if archive_key is None else "archived",
        archive_key=archive_key,
        missing=tuple(sorted(lost)) if lost else (),
    )


def _links(rows: Iterable[asyncpg.Record]) -> list[ChainLink]:
    """``tierstore_ancestors`` rows as links, nearest first; writes in ``writes_sort_key``
    order. A link comes once per channel still open at it. A delta chain's link the
    checkpoint names but warm lost comes as a value with no tag (0009): its channel is
    missing there, and none of its chain is handed over (a chain is a value only whole).

    Indexing the records and building each link once keeps this a small part of a walk:
    it runs for every link of every history read.
    """
    at: dict[int, tuple[str, str | None, str | None, dict[str, Payload], list[WriteRecord]]] = {}
    lost: dict[int, set[str]] = {}
    rest = []
    for row in rows:
        if row[4] is None:
            if row[0] not in at:
                at[row[0]] = (row[1], row[2], row[3], {}, [])
        else:
            rest.append(row)
    for row in rest:
        if row[7] is not None:
            at[row[0]][4].append(
                WriteRecord(row[7], row[8], row[4], Payload(row[5], row[6]), row[9]))
        elif row[5] is None:
            lost.setdefault(row[0], set()).add(channel_of(row[4]))
        else:
            at[row[0]][3][row[4]] = Payload(row[5], row[6])
    links: list[ChainLink] = []
    for depth in sorted(at):
        checkpoint_id, parent_id, archive_key, values, writes = at[depth]
        if len(writes) > 1:
            writes.sort(key=_write_order)
        missing = lost.get(depth)
        if missing:
            values = {name: p for name, p in values.items() if channel_of(name) not in missing}
        links.append(ChainLink(checkpoint_id, parent_id, values, tuple(writes),
                               "warm" if archive_key is None else "archived", archive_key,
                               tuple(sorted(missing)) if missing else ()))
    return links


def _write_order(w: WriteRecord) -> tuple[str, str, int]:
    return (w.task_path, w.task_id, w.idx)


def _version_key(version: str) -> str:
    """The stored form of a channel version: its leading zeros as a count.

    LangGraph pads version counters to 32 digits so that they sort as text; the
    store only ever matches versions for equality and never returns them, so it
    keeps ``"31~1.0.97…"`` for ``"0000…0001.0.97…"`` (about 30 bytes less in
    every checkpoint's channel_versions, blob row and blob index entry). The
    count is explicit and the rest never starts with ``0``, so distinct versions
    never share a key.
    """
    digits = version.lstrip("0")
    return f"{len(version) - len(digits)}~{digits}"


def _storable(value: Any) -> bool:
    """Whether jsonb can hold ``value`` exactly (no NaN/Infinity, no NUL, valid text)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return is_text(value)
    return True


def _doc_json(doc: Mapping[str, Scalar]) -> str:
    """The filter document as jsonb text; entries jsonb cannot hold are left out."""
    kept = {k: v for k, v in doc.items() if _storable(k) and _storable(v)}
    return json.dumps(kept, separators=(",", ":"), ensure_ascii=False)


def _filter_json(flt: Mapping[str, Scalar]) -> str | None:
    """The containment document for a filter, or None if no stored document can match."""
    if not all(_storable(k) and _storable(v) for k, v in flt.items()):
        return None
    return json.dumps(dict(flt), separators=(",", ":"), ensure_ascii=False)

