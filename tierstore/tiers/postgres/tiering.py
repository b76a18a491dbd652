"""Tiering: leases on heads for the background jobs, and the moves to and from cold.

Never on the request path. A worker claims heads with ``FOR NO KEY UPDATE SKIP
LOCKED`` (workers skip each other's rows and heads a put holds), then changes
them in one transaction that checks its lease under the head row's lock.

An archive move costs a fixed number of round trips per segment, whatever the number
of checkpoints in it::

    get_live       1 statement   the segment's checkpoints, each channel value once,
                                 their writes
    mark_archived  BEGIN ─► lock the head, check the lease ─► one statement: stubs,
                   packed writes out, orphaned values out, head version + 1 ─► COMMIT
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from tierstore.codec.chain import is_link_name
from tierstore.codec.pipeline import EMPTY
from tierstore.errors import InvalidInput
from tierstore.records import (
    CheckpointMeta,
    Claim,
    ClaimsHeld,
    Payload,
    StoredCheckpoint,
    WriteRecord,
)
from tierstore.tiers.base import WarmTiering
from tierstore.tiers.postgres.pool import PostgresPool
from tierstore.tiers.postgres.sql import (
    DELETE_STREAMS,
    DELETE_THREADS,
    DELETE_WRITES_OF,
    SID,
    THREADS,
    Conn,
    digest,
    refresh,
    stream,
)

# The heads a claim considers are read and sorted first, on their own columns only
# ({heads}); the probes of their checkpoints ({probes}) then run in that order and
# stop once {limit} heads are locked. Filtered before the sort, every head of the store
# would be probed on every claim (O(store) per batch). {heads} is checked again on the
# locked row, which a concurrent release or claim may have changed.
_CLAIM = """
WITH picked AS (
    SELECT h.sid
      FROM (SELECT h.sid, h.updated_at FROM tierstore_heads AS h
             WHERE {heads} ORDER BY h.updated_at OFFSET 0) AS o
      JOIN tierstore_heads AS h ON h.sid = o.sid
     WHERE {heads}{probes}
     ORDER BY o.updated_at
     LIMIT {limit}
       FOR NO KEY UPDATE OF h SKIP LOCKED)
UPDATE tierstore_heads AS h SET lease_owner = {owner}, lease_until = {until}
  FROM picked
 WHERE h.sid = picked.sid
RETURNING h.thread_id, h.checkpoint_ns, h.head_id, extract(epoch FROM h.updated_at)::float8,
          h.version
"""
# A claimed thread's heads, locked against puts until the expiring transaction ends.
_EXPIRE_LOCK = (
    "SELECT h.sid, h.checkpoint_ns, h.head_id, h.version, h.lease_owner, h.lease_until "
    f"FROM tierstore_heads AS h WHERE {THREADS} ORDER BY h.sid FOR UPDATE"
)
_RELEASE = (
    "UPDATE tierstore_heads AS h SET lease_owner = NULL, lease_until = NULL, "
    "settled_head = $4, settled_until = $5 "
    f"WHERE {stream('h')} AND h.lease_owner = $3"
)
_HELD_CLAIMS = (
    "SELECT count(*), min(h.lease_until), max(h.lease_until) FROM tierstore_heads AS h "
    "WHERE h.lease_owner IS NOT NULL AND h.lease_until >= $1 "
    "AND ($2::text IS NULL OR (tierstore_key(h.thread_id) = sha224(convert_to($2, 'UTF8')) "
    "AND h.thread_id = $2)) AND ($3::text IS NULL OR h.lease_owner <> $3)"
)
_INDEX = (
    "SELECT c.checkpoint_id, c.parent_id, extract(epoch FROM c.created_at)::float8, "
    "c.archive_key, c.size_bytes, c.metadata_tag, "
    "CASE WHEN c.checkpoint_id = $3 THEN c.metadata END FROM tierstore_checkpoints AS c "
    f"WHERE c.sid = {SID} ORDER BY c.checkpoint_id DESC"
)
_LEASED = (
    f"SELECT h.sid FROM tierstore_heads AS h WHERE {stream('h')} "
    "AND h.lease_owner = $3 AND h.lease_until >= $4 FOR NO KEY UPDATE"
)
_LOCK_KEYS = f"""
SELECT h.sid, h.thread_id, h.checkpoint_ns
  FROM tierstore_heads AS h
  JOIN unnest($1::text[], $2::text[]) AS k(thread_id, checkpoint_ns)
    ON tierstore_key(h.thread_id) = {digest('k.thread_id')}
   AND tierstore_key(h.checkpoint_ns) = {digest('k.checkpoint_ns')}
   AND h.thread_id = k.thread_id AND h.checkpoint_ns = k.checkpoint_ns
 ORDER BY h.sid
   FOR NO KEY UPDATE OF h
"""
# The live checkpoints of a segment ($3) of one stream, in one statement and one
# snapshot: kind 0 rows are checkpoints, kind 1 the channel values they name (each
# (channel, version) once, however many checkpoints name it), kind 2 their pending
# writes. LIMIT 1 keeps each value a primary-key probe: joined freely, the planner
# (which cannot tell how many pairs the checkpoints name) hashes the whole blob table.
GET_LIVE = f"""
WITH c AS MATERIALIZED (
    SELECT c.sid, c.checkpoint_id, c.parent_id, c.checkpoint_tag, c.checkpoint,
           c.metadata_tag, c.metadata, c.channel_versions
      FROM tierstore_checkpoints AS c
     WHERE c.sid = {SID} AND c.checkpoint_id = ANY($3::text[]) AND c.archive_key IS NULL)
SELECT 0, c.checkpoint_id, c.parent_id, c.checkpoint_tag, c.checkpoint, c.metadata_tag,
       c.metadata, c.channel_versions::text, NULL::integer
  FROM c
UNION ALL
SELECT 1, v.channel, v.version, b.tag, b.data, NULL, NULL, NULL, NULL
  FROM (SELECT DISTINCT c.sid, v.channel, v.version
          FROM c, jsonb_each_text(c.channel_versions) AS v(channel, version)) AS v
 CROSS JOIN LATERAL (
       SELECT b.tag, b.data FROM tierstore_blobs AS b
        WHERE b.sid = v.sid AND b.channel = v.channel AND b.version = v.version
        LIMIT 1) AS b
UNION ALL
SELECT 2, w.checkpoint_id, w.task_id, w.tag, w.data, w.channel, NULL, w.task_path, w.idx
  FROM c JOIN tierstore_writes AS w ON w.sid = c.sid AND w.checkpoint_id = c.checkpoint_id
"""
# The stubs of one move ($1: sid, $2: ids, $3: key), run under the head row's lock in
# a statement of its own, so its snapshot holds every put that committed before the
# lock. Its parts cannot see each other's changes: the values kept are those the
# checkpoints staying live name ($2 left out), and the caller rolls back unless every
# id of $2 became a stub. {writes} deletes the pending writes the segment holds.
_MARK = """
WITH changed AS (
    UPDATE tierstore_checkpoints SET archive_key = $3, checkpoint = NULL, checkpoint_tag = NULL
     WHERE sid = $1 AND checkpoint_id = ANY($2::text[]) AND archive_key IS NULL
    RETURNING checkpoint_id),
gone AS ({writes}),
live AS (
    SELECT DISTINCT v.channel, v.version
      FROM tierstore_checkpoints AS c,
           jsonb_each_text(c.channel_versions) AS v(channel, version)
     WHERE c.sid = $1 AND c.archive_key IS NULL AND c.checkpoint_id <> ALL($2::text[])),
orphans AS (
    DELETE FROM tierstore_blobs AS b
     WHERE b.sid = $1
       AND NOT EXISTS (SELECT 1 FROM live AS l
                        WHERE l.channel = b.channel AND l.version = b.version)),
bumped AS (
    UPDATE tierstore_heads SET version = version + 1
     WHERE sid = $1 AND EXISTS (SELECT 1 FROM changed))
SELECT count(*) FROM changed
"""
MARK_ALL_WRITES = _MARK.format(writes=(
    "DELETE FROM tierstore_writes WHERE sid = $1 AND checkpoint_id = ANY($2::text[])"))
# Only what the segment holds, matched by task, index, tag and the SHA-256 of the bytes
# (32 bytes a write on the wire, not the write again): a write stored after the
# segment was packed stays on the stub, where reads merge it.
MARK_PACKED_WRITES = _MARK.format(writes=(
    "DELETE FROM tierstore_writes AS w USING unnest($4::text[], $5::text[], $6::int[], "
    "$7::text[], $8::bytea[]) AS p(checkpoint_id, task_id, idx, tag, digest) "
    "WHERE w.sid = $1 AND w.checkpoint_id = p.checkpoint_id AND w.task_id = p.task_id "
    "AND w.idx = p.idx AND w.tag = p.tag AND sha256(w.data) = p.digest"))
# The stubs of one thread by segment: its heads first, then each namespace's checkpoints
# by the sid just read (LATERAL, kept apart by OFFSET 0), so that on a partitioned store
# each probe runs on that sid's partition only. Joined freely, the planner may start
# from the stubs (the archive_key index of every partition) and hash-join the heads.
_THREAD_REFS = f"""
SELECT c.archive_key, count(*)
  FROM tierstore_heads AS h
 CROSS JOIN LATERAL (
       SELECT c.archive_key FROM tierstore_checkpoints AS c
        WHERE c.sid = h.sid AND c.archive_key IS NOT NULL
          AND ($2::text[] IS NULL OR c.archive_key = ANY($2::text[]))
       OFFSET 0) AS c
 WHERE {THREADS}
 GROUP BY c.archive_key
"""
_COUNT_HEAD_WRITES = """
UPDATE tierstore_heads AS h
   SET n_writes = (SELECT count(*) FROM tierstore_writes AS w
                    WHERE w.sid = h.sid AND w.checkpoint_id = h.head_id),
       version = h.version + 1
 WHERE h.sid = ANY($1::bigint[])
"""


def claim_statement(
    *,
    owner: str,
    now: float,
    lease_seconds: float,
    limit: int,
    warm_before: float | None,
    idle_before: float | None,
    require_live: bool,
    thread_id: str | None,
) -> tuple[str, list[Any]]:
    """The statement (and its arguments) that leases heads for ``claim``."""
    params: list[Any] = []

    def arg(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    conds = ["h.head_id IS NOT NULL",
             f"(h.lease_until IS NULL OR h.lease_until < {arg(now)})"]
    probes = []
    if thread_id is not None:
        t = arg(thread_id)
        conds.append(f"tierstore_key(h.thread_id) = {digest(t)} AND h.thread_id = {t}")
    if warm_before is not None:
        before = arg(warm_before)
        conds.append("(h.settled_head IS NULL OR h.settled_head <> h.head_id OR "
                     f"h.settled_until < {before})")
        probes.append(
            "EXISTS (SELECT 1 FROM tierstore_checkpoints AS c WHERE c.sid = h.sid "
            f"AND c.archive_key IS NULL AND c.created_at < to_timestamp({before}) "
            "AND c.checkpoint_id <> h.head_id)"
        )
    if idle_before is not None:
        conds.append(f"h.updated_at < to_timestamp({arg(idle_before)})")
        if require_live:
            probes.append("EXISTS (SELECT 1 FROM tierstore_checkpoints AS c "
                          "WHERE c.sid = h.sid AND c.archive_key IS NULL)")
    sql = _CLAIM.format(heads=" AND ".join(conds), probes="".join(f" AND {p}" for p in probes),
                        limit=arg(limit), owner=arg(owner), until=arg(now + lease_seconds))
    return sql, params


class _NothingMarked(Exception):
    """Rolls back a ``mark_archived`` transaction that could not move every packed id."""


class PostgresTiering(PostgresPool, WarmTiering):
    """The ``WarmStore`` calls of the jobs in ``tierstore.jobs``."""

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
        """Lease heads with ``FOR NO KEY UPDATE SKIP LOCKED``: concurrent workers skip
        each other's rows (and heads a put holds) instead of queueing behind them."""
        sql, params = claim_statement(
            owner=owner, now=now, lease_seconds=lease_seconds, limit=limit,
            warm_before=warm_before, idle_before=idle_before, require_live=require_live,
            thread_id=thread_id)

        async def body(conn: Conn) -> list[asyncpg.Record]:
            return await conn.fetch(sql, *params)

        rows = await self._run("claim", body)
        claims = [Claim(r[0], r[1], r[2], r[3], int(r[4])) for r in rows]
        return sorted(claims, key=lambda c: c.updated_at)

    async def release(
        self,
        thread_id: str,
        checkpoint_ns: str,
        *,
        owner: str,
        settled_head: str | None = None,
        settled_until: float | None = None,
    ) -> None:
        async def body(conn: Conn) -> None:
            await conn.execute(_RELEASE, thread_id, checkpoint_ns, owner, settled_head,
                               settled_until)

        await self._run("release", body)

    async def release_owned(self, *, owner: str) -> int:
        async def body(conn: Conn) -> str:
            return await conn.execute(
                "UPDATE tierstore_heads SET lease_owner = NULL, lease_until = NULL "
                "WHERE lease_owner = $1", owner)

        status = await self._run("release_owned", body)
        return int(status.rsplit(" ", 1)[-1])

    async def expire_thread(
        self,
        thread_id: str,
        heads: Sequence[Claim],
        *,
        owner: str,
        now: float,
        keep_latest: bool,
    ) -> bool:
        """The heads are locked (``FOR UPDATE``) and compared before anything is
        deleted: a put in flight finishes first and then fails the comparison."""
        expected = {(c.checkpoint_ns, c.head_id, c.version) for c in heads
                    if c.thread_id == thread_id}

        async def body(conn: Conn) -> bool:
            async with conn.transaction():
                rows = [r for r in await conn.fetch(_EXPIRE_LOCK, [thread_id])
                        if r[2] is not None]
                if not rows or any(r[4] != owner or r[5] is None or r[5] < now
                                   for r in rows):
                    return False
                if {(r[1], r[2], int(r[3])) for r in rows} != expected:
                    return False
                if not keep_latest:
                    sids = [r[0] for r in await conn.fetch(DELETE_THREADS, [thread_id])]
                    if sids:
                        await conn.execute(DELETE_STREAMS, sids)
                    return True
                doomed = await conn.fetch(
                    "DELETE FROM tierstore_checkpoints AS c WHERE c.sid = ANY($1::bigint[]) "
                    "AND c.checkpoint_id < (SELECT max(l.checkpoint_id) FROM "
                    "tierstore_checkpoints AS l WHERE l.sid = c.sid) "
                    "RETURNING c.sid, c.checkpoint_id",
                    [r[0] for r in rows],
                )
                if doomed:
                    await conn.execute(DELETE_WRITES_OF, [r[0] for r in doomed],
                                       [r[1] for r in doomed])
                    await refresh(conn, sorted({r[0] for r in doomed}))
                return True

        return bool(await self._run("expire_thread", body))

    async def held_claims(
        self, *, now: float, thread_id: str | None = None, exclude_owner: str | None = None
    ) -> ClaimsHeld:
        async def body(conn: Conn) -> asyncpg.Record:
            row = await conn.fetchrow(_HELD_CLAIMS, now, thread_id, exclude_owner)
            assert row is not None
            return row

        count, first, last = await self._run("held_claims", body, read=True)
        return ClaimsHeld(count, first, last)

    async def index(
        self, thread_id: str, checkpoint_ns: str, *, metadata_of: str | None = None
    ) -> Sequence[CheckpointMeta]:
        async def body(conn: Conn) -> list[asyncpg.Record]:
            return await conn.fetch(_INDEX, thread_id, checkpoint_ns, metadata_of)

        return [
            CheckpointMeta(thread_id, checkpoint_ns, cid, parent, created,
                           "warm" if key is None else "archived", key, size,
                           None if md is None else Payload(md_tag, md))
            for cid, parent, created, key, size, md_tag, md
            in await self._run("index", body, read=True)
        ]

    async def get_live(
        self, thread_id: str, checkpoint_ns: str, checkpoint_ids: Sequence[str]
    ) -> list[StoredCheckpoint]:
        if not checkpoint_ids:
            return []

        async def body(conn: Conn) -> list[asyncpg.Record]:
            return await conn.fetch(GET_LIVE, thread_id, checkpoint_ns,
                                    sorted(set(checkpoint_ids)))

        rows = await self._run("get_live", body, read=True)
        values: dict[tuple[str, str], Payload] = {}
        writes: dict[str, list[WriteRecord]] = {}
        checkpoints = []
        for kind, a, b, tag, data, c, d, e, idx in rows:
            if kind == 0:
                checkpoints.append((a, b, tag, data, c, d, e))
            elif kind == 1:
                values[a, b] = Payload(tag, data)
            else:
                writes.setdefault(a, []).append(WriteRecord(b, idx, c, Payload(tag, data), e))
        out = []
        for checkpoint_id, parent_id, tag, data, md_tag, md, versions in checkpoints:
            named = json.loads(versions)
            out.append(StoredCheckpoint(
                thread_id=thread_id, checkpoint_ns=checkpoint_ns,
                checkpoint_id=checkpoint_id, parent_id=parent_id,
                checkpoint=Payload(tag or "", data or b""), metadata=Payload(md_tag, md),
                blobs={ch: values[ch, v] for ch, v in named.items() if (ch, v) in values},
                writes=tuple(writes.get(checkpoint_id, ())),
                # as ``get``: an empty channel has no row, but a delta chain's link is
                # never empty, so a link named with no row was lost
                missing=tuple(sorted(ch for ch, v in named.items()
                                     if (ch, v) not in values and is_link_name(ch))),
            ))
        return sorted(out, key=lambda r: r.checkpoint_id)

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
        ids = sorted(set(checkpoint_ids))
        extra: tuple[list[Any], ...]
        if writes is None:
            sql, extra = MARK_ALL_WRITES, ()
        else:
            packed = [(cid, w) for cid in ids for w in writes.get(cid, ())]
            sql = MARK_PACKED_WRITES
            extra = ([c for c, _ in packed], [w.task_id for _, w in packed],
                     [w.idx for _, w in packed], [w.payload.tag for _, w in packed],
                     [hashlib.sha256(w.payload.data).digest() for _, w in packed])

        async def body(conn: Conn) -> int:
            async with conn.transaction():
                # The lease is checked under the head row's lock: a worker whose lease
                # ran out cannot turn checkpoints into stubs another worker now owns,
                # and puts, deletes and rehydrations of the stream wait for the commit.
                sid = await conn.fetchval(_LEASED, thread_id, checkpoint_ns, owner, now)
                if sid is None:
                    return 0
                changed = int(await conn.fetchval(sql, sid, ids, archive_key, *extra))
                if changed != len(ids):
                    # some were deleted (or moved) since they were packed: all or nothing,
                    # so a segment never holds a checkpoint a concurrent delete removed
                    raise _NothingMarked
                return changed

        try:
            return await self._run("mark_archived", body)
        except _NothingMarked:
            return 0

    async def rehydrate(self, records: Sequence[StoredCheckpoint]) -> int:
        if not records:
            return 0
        keys = sorted({(r.thread_id, r.checkpoint_ns) for r in records})

        async def body(conn: Conn) -> int:
            async with conn.transaction():
                locked = await conn.fetch(_LOCK_KEYS, [k[0] for k in keys], [k[1] for k in keys])
                sids = {(r[1], r[2]): r[0] for r in locked}
                restored = 0
                touched: set[int] = set()
                for r in records:
                    sid = sids.get((r.thread_id, r.checkpoint_ns))
                    if sid is None:
                        continue
                    row = await conn.fetchrow(
                        "UPDATE tierstore_checkpoints SET archive_key = NULL, "
                        "checkpoint_tag = $3, checkpoint = $4 WHERE sid = $1 "
                        "AND checkpoint_id = $2 AND archive_key IS NOT NULL "
                        "RETURNING channel_versions",
                        sid, r.checkpoint_id, r.checkpoint.tag, r.checkpoint.data,
                    )
                    if row is None:
                        continue  # already live, or deleted meanwhile
                    restored += 1
                    touched.add(sid)
                    stored = json.loads(row[0])
                    blobs = [(ch, stored[ch], p) for ch, p in r.blobs.items()
                             if ch in stored and p != EMPTY]
                    await conn.execute(
                        "INSERT INTO tierstore_blobs (sid, channel, version, tag, data) "
                        "SELECT $1, u.* FROM unnest($2::text[], $3::text[], $4::text[], "
                        "$5::bytea[]) AS u ON CONFLICT DO NOTHING",
                        sid, [b[0] for b in blobs], [b[1] for b in blobs],
                        [b[2].tag for b in blobs], [b[2].data for b in blobs],
                    )
                    await conn.execute(
                        "INSERT INTO tierstore_writes (sid, idx, checkpoint_id, task_id, channel, "
                        "tag, data, task_path) SELECT $1, u.idx, $2, u.task_id, u.channel, "
                        "u.tag, u.data, u.task_path FROM unnest($3::text[], $4::int[], "
                        "$5::text[], $6::text[], $7::bytea[], $8::text[]) "
                        "AS u(task_id, idx, channel, tag, data, task_path) ON CONFLICT DO NOTHING",
                        sid, r.checkpoint_id, [w.task_id for w in r.writes],
                        [w.idx for w in r.writes], [w.channel for w in r.writes],
                        [w.payload.tag for w in r.writes], [w.payload.data for w in r.writes],
                        [w.task_path for w in r.writes],
                    )
                if touched:
                    await conn.execute(_COUNT_HEAD_WRITES, sorted(touched))
                return restored

        return await self._run("rehydrate", body)

    async def archive_refs(
        self, thread_id: str | None = None, *, keys: Sequence[str] | None = None
    ) -> dict[str, int]:
        if keys is not None and not keys:
            return {}
        wanted = sorted(set(keys)) if keys is not None else None

        async def body(conn: Conn) -> list[asyncpg.Record]:
            if thread_id is None and wanted is None:
                return await conn.fetch(
                    "SELECT archive_key, count(*) FROM tierstore_checkpoints "
                    "WHERE archive_key IS NOT NULL GROUP BY archive_key"
                )
            if thread_id is None:  # the archive_key index: O(keys)
                return await conn.fetch(
                    "SELECT archive_key, count(*) FROM tierstore_checkpoints "
                    "WHERE archive_key = ANY($1::text[]) GROUP BY archive_key",
                    wanted,
                )
            return await conn.fetch(_THREAD_REFS, [thread_id], wanted)

        return {key: int(n) for key, n in await self._run("archive_refs", body, read=True)}

    async def archive_stubs(
        self, *, keys: Sequence[str] | None = None, run_ids: Sequence[str] | None = None
    ) -> dict[str, set[str]]:
        if keys is None and run_ids is None:
            raise InvalidInput("archive_stubs needs keys or run_ids")
        if (keys is not None and not keys) or (run_ids is not None and not run_ids):
            return {}

        async def body(conn: Conn) -> list[asyncpg.Record]:
            return await conn.fetch(
                "SELECT archive_key, checkpoint_id FROM tierstore_checkpoints "
                "WHERE archive_key IS NOT NULL "
                "AND ($1::text[] IS NULL OR archive_key = ANY($1::text[])) "
                "AND ($2::text[] IS NULL OR run_id = ANY($2::text[]))",
                list(keys) if keys is not None else None,
                list(run_ids) if run_ids is not None else None,
            )

        out: dict[str, set[str]] = {}
        for key, checkpoint_id in await self._run("archive_stubs", body, read=True):
            out.setdefault(key, set()).add(checkpoint_id)
        return out

    async def repoint_archive(
        self, old_key: str, new_key: str, checkpoint_ids: Sequence[str]
    ) -> int:
        async def body(conn: Conn) -> str:
            return await conn.execute(
                "UPDATE tierstore_checkpoints SET archive_key = $2 "
                "WHERE archive_key = $1 AND checkpoint_id = ANY($3::text[])",
                old_key, new_key, list(checkpoint_ids),
            )

        status = await self._run("repoint_archive", body)
        return int(status.rsplit(" ", 1)[-1])
