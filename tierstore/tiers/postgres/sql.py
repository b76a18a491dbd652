"""The schema every statement of the store works on, and the SQL fragments they share.

Tables (``migrations/postgres``)::

    tierstore_heads        sid ◄─┬─ one row per (thread_id, checkpoint_ns): head_id, version,
                                 │  n_writes, conflicts, lease; unique on SHA-224 of both ids
    tierstore_checkpoints  (sid, checkpoint_id) ─ payloads, channel_versions, filter_doc (GIN);
                                 │                  archive_key set = a stub
    tierstore_blobs        (sid, channel, version) ─ one channel value, stored once
    tierstore_writes       (sid, checkpoint_id, task_id, idx) ─ pending writes
    tierstore_fences       (thread_key) ─ newest lease token per thread, by SHA-224 digest

With ``partitions=N`` the checkpoint, blob and write tables are hash-partitioned by
``sid`` (``partitions.py``): the statements are the same, and each statement about one
namespace runs on one partition.

Bytes on disk per checkpoint are part of the design: the surrogate ``sid`` keeps
thread ids (any text up to 64 KiB) out of every other row and index entry;
channel versions are stored with their run of leading zeros as a count
(``requests._version_key``); a channel that has a version but no value gets no blob row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"


def digest(value: str) -> str:
    """The digest ``tierstore_key()`` computes, spelled with built-in functions: the
    index is matched all the same, without the cost of calling an SQL function."""
    return f"sha224(convert_to({value}, 'UTF8'))"


def stream(alias: str) -> str:
    """One (thread $1, ns $2) of ``tierstore_heads AS alias``, by its unique index."""
    return (
        f"tierstore_key({alias}.thread_id) = {digest('$1')} "
        f"AND tierstore_key({alias}.checkpoint_ns) = {digest('$2')} "
        f"AND {alias}.thread_id = $1 AND {alias}.checkpoint_ns = $2"
    )


# Every namespace of the threads in the text[] $1.
THREADS = (
    "tierstore_key(h.thread_id) = "
    f"ANY(ARRAY(SELECT {digest('t')} FROM unnest($1::text[]) AS t)) "
    "AND h.thread_id = ANY($1::text[])"
)

SID = f"(SELECT s.sid FROM tierstore_heads AS s WHERE {stream('s')})"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- shared by thread admin and expiry ---------------------------------------------------

DELETE_THREADS = f"DELETE FROM tierstore_heads AS h WHERE {THREADS} RETURNING h.sid"
DELETE_STREAMS = """
WITH c AS (DELETE FROM tierstore_checkpoints WHERE sid = ANY($1::bigint[])),
     b AS (DELETE FROM tierstore_blobs WHERE sid = ANY($1::bigint[]))
DELETE FROM tierstore_writes WHERE sid = ANY($1::bigint[])
"""
DELETE_WRITES_OF = """
DELETE FROM tierstore_writes AS w
 USING unnest($1::bigint[], $2::text[]) AS d(sid, checkpoint_id)
 WHERE w.sid = d.sid AND w.checkpoint_id = d.checkpoint_id
"""
# After checkpoints left a namespace: drop blobs no remaining live checkpoint names
# (a stub's values are in its cold segment),
# recompute head and n_writes (version still moves forward), and forget
# namespaces left with nothing at all.
DROP_ORPHAN_BLOBS = """
WITH live AS (
    SELECT DISTINCT c.sid, v.key AS channel, v.value AS version
      FROM tierstore_checkpoints AS c, jsonb_each_text(c.channel_versions) AS v
     WHERE c.sid = ANY($1::bigint[]) AND c.archive_key IS NULL)
DELETE FROM tierstore_blobs AS b
 WHERE b.sid = ANY($1::bigint[])
   AND NOT EXISTS (SELECT 1 FROM live AS l
                    WHERE l.sid = b.sid AND l.channel = b.channel AND l.version = b.version)
"""
# The version moves to at least the clock in microseconds: above the tombstone the
# router leaves in the hot tier, taken before the change (policy.tombstone_version).
RECOMPUTE_HEADS = """
UPDATE tierstore_heads AS h
   SET head_id = m.head_id, updated_at = now(),
       version = greatest(h.version + 1,
                          (floor(extract(epoch FROM clock_timestamp()) * 1000000))::bigint),
       n_writes = (SELECT count(*) FROM tierstore_writes AS w
                    WHERE w.sid = h.sid AND w.checkpoint_id = m.head_id)
  FROM (SELECT s.sid, (SELECT max(c.checkpoint_id) FROM tierstore_checkpoints AS c
                        WHERE c.sid = s.sid) AS head_id
          FROM unnest($1::bigint[]) AS s(sid)) AS m
 WHERE h.sid = m.sid
"""
DROP_EMPTY_STREAMS = """
DELETE FROM tierstore_heads AS h
 WHERE h.sid = ANY($1::bigint[]) AND h.head_id IS NULL
   AND NOT EXISTS (SELECT 1 FROM tierstore_writes AS w WHERE w.sid = h.sid)
"""


async def refresh(conn: Conn, sids: Sequence[int]) -> None:
    """Blobs, head and n_writes after checkpoints left (or arrived in) namespaces."""
    await conn.execute(DROP_ORPHAN_BLOBS, sids)
    await conn.execute(RECOMPUTE_HEADS, sids)
    await conn.execute(DROP_EMPTY_STREAMS, sids)
