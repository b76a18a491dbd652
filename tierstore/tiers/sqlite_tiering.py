"""The SQLite warm tier's ``WarmTiering`` half: claims, expiry and archive stubs.

Used by the jobs in ``tierstore.jobs``, never on the request path. Each method is
one function run on the store's thread in one transaction (see ``sqlite_base``),
which is what makes a claim, an expiry check and its delete, or a move to stubs
atomic against the turns the request path commits meanwhile.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

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
from tierstore.tiers.sqlite_base import SqliteBase

__all__ = ["SqliteTiering"]


class SqliteTiering(SqliteBase, WarmTiering):
    """Tiering on one SQLite file; ``SqliteWarm`` adds the request path to it."""

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
    ) -> builtins.list[Claim]:
        conds = ["(h.lease_until IS NULL OR h.lease_until < ?)"]
        params: builtins.list[Any] = [now]
        if thread_id is not None:
            conds.append("h.thread_id = ?")
            params.append(thread_id)
        if warm_before is not None:
            conds.append(
                "EXISTS (SELECT 1 FROM checkpoints AS c WHERE c.thread_id = h.thread_id AND "
                "c.checkpoint_ns = h.checkpoint_ns AND +c.location = 'warm' AND "
                "c.checkpoint_id <> h.head_id AND c.created_at < ?)"
            )
            params.append(warm_before)
            if thread_id is None and idle_before is None:
                return await self._claim_unsettled(
                    conds, params, owner=owner, until=now + lease_seconds, limit=limit,
                    warm_before=warm_before)
            conds.append("(h.settled_head IS NULL OR h.settled_head <> h.head_id OR "
                         "h.settled_until < ?)")
            params.append(warm_before)
        if idle_before is not None:
            conds.append("h.updated_at < ?")
            params.append(idle_before)
            if require_live:
                conds.append(
                    "EXISTS (SELECT 1 FROM checkpoints AS c WHERE c.thread_id = h.thread_id "
                    "AND c.checkpoint_ns = h.checkpoint_ns AND +c.location = 'warm')"
                )

        def body(conn: sqlite3.Connection) -> builtins.list[Claim]:
            rows = conn.execute(
                "SELECT h.thread_id, h.checkpoint_ns, h.head_id, h.updated_at, h.version "
                "FROM heads AS h "
                f"WHERE {' AND '.join(conds)} ORDER BY h.updated_at LIMIT ?",
                [*params, limit],
            ).fetchall()
            conn.executemany(
                "UPDATE heads SET lease_owner = ?, lease_until = ? "
                "WHERE thread_id = ? AND checkpoint_ns = ?",
                [(owner, now + lease_seconds, t, ns) for t, ns, _, _, _ in rows],
            )
            return [Claim(t, ns, head, updated, version)
                    for t, ns, head, updated, version in rows]

        return await self._run(lambda conn: self._tx(conn, body))

    async def _claim_unsettled(
        self, conds: Sequence[str], params: Sequence[Any], *, owner: str, until: float,
        limit: int, warm_before: float,
    ) -> builtins.list[Claim]:
        """A history demotion claim across the store, from the two indexes of migration
        0005: the heads not settled, oldest first, and the settled ones whose next
        checkpoint is old enough now, soonest due first. Each index is read only as far
        as the heads it yields (plus those leased or with nothing to move), never
        through the heads settled before, so a claim costs what it takes, not the store;
        of the two lists the ``limit`` oldest heads are taken."""
        where = " AND ".join(conds)
        unsettled = (
            "SELECT h.thread_id, h.checkpoint_ns, h.head_id, h.updated_at, h.version "
            "FROM heads AS h INDEXED BY heads_unsettled "
            f"WHERE (h.settled_head IS NULL OR h.settled_head <> h.head_id) AND {where} "
            "ORDER BY h.updated_at LIMIT ?")
        due = (
            "SELECT h.thread_id, h.checkpoint_ns, h.head_id, h.updated_at, h.version "
            "FROM heads AS h INDEXED BY heads_settled_until "
            f"WHERE h.settled_head = h.head_id AND h.settled_until < ? AND {where} "
            "ORDER BY h.settled_until LIMIT ?")

        def body(conn: sqlite3.Connection) -> builtins.list[Claim]:
            rows = conn.execute(unsettled, [*params, limit]).fetchall()
            rows += conn.execute(due, [warm_before, *params, limit]).fetchall()
            rows = sorted(rows, key=lambda r: (r[3], r[0], r[1]))[:limit]
            conn.executemany(
                "UPDATE heads SET lease_owner = ?, lease_until = ? "
                "WHERE thread_id = ? AND checkpoint_ns = ?",
                [(owner, until, t, ns) for t, ns, _, _, _ in rows],
            )
            return [Claim(t, ns, head, updated, version)
                    for t, ns, head, updated, version in rows]

        return await self._run(lambda conn: self._tx(conn, body))

    async def release(
        self,
        thread_id: str,
        checkpoint_ns: str,
        *,
        owner: str,
        settled_head: str | None = None,
        settled_until: float | None = None,
    ) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE heads SET lease_owner = NULL, lease_until = NULL, settled_head = ?, "
                "settled_until = ? WHERE thread_id = ? AND checkpoint_ns = ? AND lease_owner = ?",
                (settled_head, settled_until, thread_id, checkpoint_ns, owner),
            )

        await self._run(lambda conn: self._tx(conn, body))

    async def release_owned(self, *, owner: str) -> int:
        def body(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE heads SET lease_owner = NULL, lease_until = NULL "
                "WHERE lease_owner = ?", (owner,)).rowcount

        return await self._run(lambda conn: self._tx(conn, body))

    async def expire_thread(
        self,
        thread_id: str,
        heads: Sequence[Claim],
        *,
        owner: str,
        now: float,
        keep_latest: bool,
    ) -> bool:
        expected = {(c.checkpoint_ns, c.head_id, c.version) for c in heads
                    if c.thread_id == thread_id}

        def body(conn: sqlite3.Connection) -> bool:
            current = conn.execute(
                "SELECT checkpoint_ns, head_id, version, lease_owner, lease_until FROM heads "
                "WHERE thread_id = ?",
                (thread_id,),
            ).fetchall()
            if not current or any(o != owner or u is None or u < now
                                  for _, _, _, o, u in current):
                return False
            if {(ns, h, int(v)) for ns, h, v, _, _ in current} != expected:
                return False
            if keep_latest:
                self._prune_to_latest(conn, thread_id)
            else:
                for table in ("checkpoints", "blobs", "writes", "heads"):
                    conn.execute(f"DELETE FROM {table} WHERE thread_id = ?", (thread_id,))
            return True

        return await self._run(lambda conn: self._erasing(conn, body))

    async def held_claims(
        self, *, now: float, thread_id: str | None = None, exclude_owner: str | None = None
    ) -> ClaimsHeld:
        conds = ["lease_owner IS NOT NULL", "lease_until >= ?"]
        params: builtins.list[Any] = [now]
        if thread_id is not None:
            conds.append("thread_id = ?")
            params.append(thread_id)
        if exclude_owner is not None:
            conds.append("lease_owner <> ?")
            params.append(exclude_owner)

        def fn(conn: sqlite3.Connection) -> ClaimsHeld:
            count, first, last = conn.execute(
                "SELECT count(*), min(lease_until), max(lease_until) FROM heads "
                f"WHERE {' AND '.join(conds)}", params,
            ).fetchone()
            return ClaimsHeld(count, first, last)

        return await self._run(fn)

    async def index(
        self, thread_id: str, checkpoint_ns: str, *, metadata_of: str | None = None
    ) -> builtins.list[CheckpointMeta]:
        def fn(conn: sqlite3.Connection) -> builtins.list[CheckpointMeta]:
            return [
                CheckpointMeta(thread_id, checkpoint_ns, cid, parent, created, location, key,
                               size, None if md is None else Payload(md_tag, bytes(md)))
                for cid, parent, created, location, key, size, md_tag, md in conn.execute(
                    "SELECT checkpoint_id, parent_id, created_at, location, archive_key, "
                    "size_bytes, metadata_tag, CASE WHEN checkpoint_id = ? THEN metadata END "
                    "FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ? "
                    "ORDER BY checkpoint_id DESC",
                    (metadata_of, thread_id, checkpoint_ns),
                )
            ]

        return await self._run(fn)

    async def get_live(
        self, thread_id: str, checkpoint_ns: str, checkpoint_ids: Sequence[str]
    ) -> builtins.list[StoredCheckpoint]:
        ids = json.dumps(sorted(set(checkpoint_ids)))
        key = (thread_id, checkpoint_ns)

        def read(conn: sqlite3.Connection) -> builtins.list[StoredCheckpoint]:
            rows = conn.execute(
                "SELECT checkpoint_id, parent_id, checkpoint_tag, checkpoint, metadata_tag, "
                "metadata, channel_versions FROM checkpoints WHERE thread_id = ? AND "
                "checkpoint_ns = ? AND location = 'warm' AND checkpoint_id IN "
                "(SELECT value FROM json_each(?)) ORDER BY checkpoint_id",
                (*key, ids),
            ).fetchall()
            named = [json.loads(r[6] or "{}") for r in rows]
            pairs = sorted({(ch, v) for versions in named for ch, v in versions.items()})
            # each (channel, version) once, however many of the checkpoints name it: a
            # primary-key lookup each (CROSS JOIN keeps json_each outside)
            values = {
                (ch, v): Payload(tag, bytes(data))
                for ch, v, tag, data in conn.execute(
                    "SELECT b.channel, b.version, b.tag, b.data FROM json_each(?) AS k "
                    "CROSS JOIN blobs AS b ON b.thread_id = ? AND b.checkpoint_ns = ? "
                    "AND b.channel = json_extract(k.value, '$[0]') "
                    "AND b.version = json_extract(k.value, '$[1]')",
                    (json.dumps(pairs), *key),
                )
            }
            writes: dict[str, builtins.list[WriteRecord]] = {}
            for cid, task_id, idx, channel, tag, data, path in conn.execute(
                "SELECT checkpoint_id, task_id, idx, channel, tag, data, task_path FROM writes "
                "WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id IN "
                "(SELECT value FROM json_each(?)) ORDER BY checkpoint_id, task_path, task_id, idx",
                (*key, ids),
            ):
                writes.setdefault(cid, []).append(
                    WriteRecord(task_id, idx, channel, Payload(tag, bytes(data)), path))
            out = []
            for (cid, parent_id, cp_tag, cp, md_tag, md, _), versions in zip(rows, named,
                                                                             strict=True):
                blobs = {ch: values[ch, v] for ch, v in versions.items() if (ch, v) in values}
                out.append(StoredCheckpoint(
                    thread_id=thread_id, checkpoint_ns=checkpoint_ns, checkpoint_id=cid,
                    parent_id=parent_id, checkpoint=Payload(cp_tag or "", bytes(cp or b"")),
                    metadata=Payload(md_tag, bytes(md)), blobs=blobs,
                    writes=tuple(writes.get(cid, ())),
                    # as ``get``: a live checkpoint has a blob for every version it names
                    missing=tuple(sorted(ch for ch in versions if ch not in blobs)),
                ))
            return out

        def fn(conn: sqlite3.Connection) -> builtins.list[StoredCheckpoint]:
            conn.execute("BEGIN")  # one snapshot of the file
            try:
                return read(conn)
            finally:
                conn.execute("COMMIT")

        if not checkpoint_ids:
            return []
        return await self._run(fn)

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
        def body(conn: sqlite3.Connection) -> int:
            held = conn.execute(
                "SELECT 1 FROM heads WHERE thread_id = ? AND checkpoint_ns = ? AND "
                "lease_owner = ? AND lease_until >= ?",
                (thread_id, checkpoint_ns, owner, now),
            ).fetchone()
            if held is None:
                return 0
            keys = [(thread_id, checkpoint_ns, cid) for cid in checkpoint_ids]
            wanted = set(checkpoint_ids)
            live = sum(conn.execute(
                "SELECT count(*) FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ? "
                "AND checkpoint_id = ? AND location = 'warm'", (thread_id, checkpoint_ns, cid),
            ).fetchone()[0] for cid in wanted)
            if live != len(wanted):
                return 0  # some were deleted (or moved) since they were packed: all or nothing
            changed = 0
            for key in keys:
                changed += conn.execute(
                    "UPDATE checkpoints SET location = 'archived', archive_key = ?, "
                    "checkpoint = NULL, checkpoint_tag = NULL WHERE thread_id = ? AND "
                    "checkpoint_ns = ? AND checkpoint_id = ? AND location = 'warm'",
                    (archive_key, *key),
                ).rowcount
            if changed:  # every cached copy of the head must fail the freshness check
                conn.execute(
                    "UPDATE heads SET version = version + 1 WHERE thread_id = ? "
                    "AND checkpoint_ns = ?",
                    (thread_id, checkpoint_ns),
                )
            if writes is None:
                conn.executemany(
                    "DELETE FROM writes WHERE thread_id = ? AND checkpoint_ns = ? "
                    "AND checkpoint_id = ?",
                    keys,
                )
            else:  # only what the segment holds: a later write stays on the stub
                conn.executemany(
                    "DELETE FROM writes WHERE thread_id = ? AND checkpoint_ns = ? "
                    "AND checkpoint_id = ? AND task_id = ? AND idx = ? AND tag = ? AND data = ?",
                    [(thread_id, checkpoint_ns, cid, w.task_id, w.idx, w.payload.tag,
                      w.payload.data)
                     for cid in checkpoint_ids for w in writes.get(cid, ())],
                )
            self._collect_blobs(conn, thread_id, checkpoint_ns)
            return changed

        return await self._run(lambda conn: self._tx(conn, body))

    async def rehydrate(self, records: Sequence[StoredCheckpoint]) -> int:
        def body(conn: sqlite3.Connection) -> int:
            restored = 0
            for r in records:
                key = (r.thread_id, r.checkpoint_ns, r.checkpoint_id)
                row = conn.execute(
                    "UPDATE checkpoints SET location = 'warm', archive_key = NULL, "
                    "checkpoint_tag = ?, checkpoint = ? WHERE thread_id = ? AND "
                    "checkpoint_ns = ? AND checkpoint_id = ? AND location = 'archived' "
                    "RETURNING channel_versions",
                    (r.checkpoint.tag, r.checkpoint.data, *key),
                ).fetchone()
                if row is None:
                    continue  # not a stub (already live, or gone)
                restored += 1
                versions = json.loads(row[0] or "{}")
                conn.executemany(
                    "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?, ?)",
                    [(r.thread_id, r.checkpoint_ns, ch, versions[ch], p.tag, p.data)
                     for ch, p in r.blobs.items() if ch in versions],
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO writes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(*key, w.task_id, w.idx, w.channel, w.payload.tag, w.payload.data,
                      w.task_path) for w in r.writes],
                )
            self._refresh_writes_count(conn, {(r.thread_id, r.checkpoint_ns) for r in records})
            return restored

        return await self._run(lambda conn: self._tx(conn, body))

    @staticmethod
    def _refresh_writes_count(conn: sqlite3.Connection, keys: set[tuple[str, str]]) -> None:
        for t, ns in keys:
            conn.execute(
                "UPDATE heads SET n_writes = (SELECT count(*) FROM writes AS w WHERE "
                "w.thread_id = heads.thread_id AND w.checkpoint_ns = heads.checkpoint_ns AND "
                "w.checkpoint_id = heads.head_id), version = version + 1 "
                "WHERE thread_id = ? AND checkpoint_ns = ?",
                (t, ns),
            )

    async def archive_refs(
        self, thread_id: str | None = None, *, keys: Sequence[str] | None = None
    ) -> dict[str, int]:
        def fn(conn: sqlite3.Connection) -> dict[str, int]:
            where, args = ["archive_key IS NOT NULL"], []
            if thread_id is not None:
                where.append("thread_id = ?")
                args.append(thread_id)
            if keys is not None:
                where.append("archive_key IN (SELECT value FROM json_each(?))")
                args.append(json.dumps(sorted(set(keys))))
            sql = (f"SELECT archive_key, count(*) FROM checkpoints WHERE {' AND '.join(where)}"
                   " GROUP BY archive_key")
            return {key: n for key, n in conn.execute(sql, args)}

        if keys is not None and not keys:
            return {}
        return await self._run(fn)

    async def archive_stubs(
        self, *, keys: Sequence[str] | None = None, run_ids: Sequence[str] | None = None
    ) -> dict[str, builtins.set[str]]:
        if keys is None and run_ids is None:
            raise InvalidInput("archive_stubs needs keys or run_ids")
        where, args = ["archive_key IS NOT NULL"], []
        for column, values in (("archive_key", keys), ("run_id", run_ids)):
            if values is not None:
                where.append(f"{column} IN (SELECT value FROM json_each(?))")
                args.append(json.dumps(builtins.list(values)))

        def fn(conn: sqlite3.Connection) -> dict[str, builtins.set[str]]:
            out: dict[str, builtins.set[str]] = {}
            for key, checkpoint_id in conn.execute(
                f"SELECT archive_key, checkpoint_id FROM checkpoints WHERE {' AND '.join(where)}",
                args,
            ):
                out.setdefault(key, set()).add(checkpoint_id)
            return out

        if (keys is not None and not keys) or (run_ids is not None and not run_ids):
            return {}
        return await self._run(fn)

    async def repoint_archive(
        self, old_key: str, new_key: str, checkpoint_ids: Sequence[str]
    ) -> int:
        def body(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE checkpoints SET archive_key = ? WHERE archive_key = ? AND checkpoint_id "
                "IN (SELECT value FROM json_each(?))",
                (new_key, old_key, json.dumps(builtins.list(checkpoint_ids))),
            ).rowcount

        return await self._run(lambda conn: self._tx(conn, body))
