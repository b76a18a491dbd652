"""``ancestors`` on SQLite: a checkpoint's parent chain, cut down to some channels.

::

    walk (one recursive statement): the start's parent, then each link's parent, by
      │  primary key; per asked channel i, carried from link to link:
      │    o_i  still open: no live link nearer the start stores a value for it
      │    t_i  while open, the tag of the value this link names: NULL when it names
      │         none, '' when it names one whose row is gone, 'empty' for no value,
      │         '~' when it names the channel's delta chain
      │  the recursion stops once no channel is open, at the root, at a parent that
      │  is not stored, or after ``limit`` links
    writes: one statement for every link's writes to the asked channels
    seeds:  one statement per value found (a link that stores one ends its channel; a
            list the saver stored as a delta chain, ``codec.chain``, is one: its links,
            every one the link names, so that a lost one, the deepest included, makes
            the channel missing there instead of a chain that ends early)

It runs on the store's thread inside one read transaction, so the three statements
see one snapshot. A channel's version is read from the link's ``channel_versions``
with ``json_each`` (an exact key match, whatever the channel's name) and probed by
primary key; ``CROSS JOIN`` fixes SQLite's loop order so that every step is a probe.
The walk follows ``parent_id``, not the order of the ids: ids are time-ordered only
within one writer, and a range of ids holds other branches' checkpoints too.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from tierstore.codec.chain import channel_of, link_name
from tierstore.codec.pipeline import EMPTY
from tierstore.records import ChainLink, Payload, WriteRecord

__all__ = ["walk_ancestors"]

_LOST = ""
"""``t_i`` of a live link that names a version warm holds no row for."""
_CHAIN = "~"
"""``t_i`` of a live link that names the channel's delta chain (``codec.chain``): a list
the saver stored in links, a value all the same."""


@lru_cache(maxsize=32)
def _walk_sql(channels: int) -> str:
    def tag(alias: str, i: int) -> str:
        return ("coalesce("
                f"(SELECT coalesce(b.tag, '{_LOST}') FROM json_each({alias}.channel_versions) "
                "AS v LEFT JOIN blobs AS b ON b.thread_id = :t AND b.checkpoint_ns = :ns "
                f"AND b.channel = v.key AND b.version = v.value WHERE v.key = :c{i}), "
                f"(SELECT '{_CHAIN}' FROM json_each({alias}.channel_versions) AS v "
                f"WHERE v.key = :l{i}))")

    still = [f"chain.o{i} AND (chain.t{i} IS NULL OR chain.t{i} IN ('{_LOST}', '{EMPTY.tag}'))"
             for i in range(channels)]
    cols = ", ".join([f"o{i}" for i in range(channels)] + [f"t{i}" for i in range(channels)])
    first = ", ".join(["1"] * channels + [f"CASE WHEN c.location = 'warm' THEN {tag('c', i)} END"
                                          for i in range(channels)])
    step = ", ".join(still + [f"CASE WHEN {still[i]} AND p.location = 'warm' THEN "
                              f"{tag('p', i)} END" for i in range(channels)])
    return f"""
WITH RECURSIVE chain(depth, checkpoint_id, parent_id, location, archive_key, {cols}) AS (
  SELECT 1, c.checkpoint_id, c.parent_id, c.location, c.archive_key, {first}
    FROM checkpoints AS s CROSS JOIN checkpoints AS c
      ON c.thread_id = s.thread_id AND c.checkpoint_ns = s.checkpoint_ns
     AND c.checkpoint_id = s.parent_id
   WHERE s.thread_id = :t AND s.checkpoint_ns = :ns AND s.checkpoint_id = :id
  UNION ALL
  SELECT chain.depth + 1, p.checkpoint_id, p.parent_id, p.location, p.archive_key, {step}
    FROM chain CROSS JOIN checkpoints AS p
      ON p.thread_id = :t AND p.checkpoint_ns = :ns AND p.checkpoint_id = chain.parent_id
   WHERE chain.depth < :limit AND ({" OR ".join(f"({s})" for s in still)})
)
SELECT checkpoint_id, parent_id, location, archive_key, {cols} FROM chain
"""


_VALUES = (
    "SELECT v.key, b.tag, b.data FROM checkpoints AS c, json_each(c.channel_versions) AS v "
    "{join} blobs AS b ON b.thread_id = c.thread_id AND b.checkpoint_ns = c.checkpoint_ns "
    "AND b.channel = v.key AND b.version = v.value "
    "WHERE c.thread_id = ? AND c.checkpoint_ns = ? AND c.checkpoint_id = ? AND {names}"
)
_SEED = _VALUES.format(join="CROSS JOIN", names="v.key = ?")
# every link the checkpoint names, a lost one with a NULL tag (a LEFT JOIN keeps the
# loop order too: each name probes blobs by primary key)
_CHAIN_LINKS = _VALUES.format(join="LEFT JOIN", names="v.key GLOB '~*'")


def walk_ancestors(conn: sqlite3.Connection, thread_id: str, checkpoint_ns: str,
                   checkpoint_id: str, asked: Sequence[str], *, limit: int) -> list[ChainLink]:
    """The links ``WarmRequests.ancestors`` returns, read inside the caller's transaction."""
    k = len(asked)
    params: dict[str, Any] = {"t": thread_id, "ns": checkpoint_ns, "id": checkpoint_id,
                              "limit": limit}
    params.update({f"c{i}": ch for i, ch in enumerate(asked)})
    params.update({f"l{i}": link_name(0, ch) for i, ch in enumerate(asked)})
    rows = conn.execute(_walk_sql(k), params).fetchall()
    if not rows:
        return []
    opened: dict[str, list[str]] = {}
    for row in rows:
        opened[row[0]] = [ch for i, ch in enumerate(asked) if row[4 + i]]
    marks = ", ".join("?" for _ in opened)
    channels = ", ".join("?" for _ in asked)
    writes: dict[str, list[WriteRecord]] = {}
    for cid, task_id, idx, channel, tag, data, task_path in conn.execute(
        "SELECT checkpoint_id, task_id, idx, channel, tag, data, task_path FROM writes "
        f"WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id IN ({marks}) "
        f"AND channel IN ({channels})",
        (thread_id, checkpoint_ns, *opened, *asked),
    ):
        if channel in opened[cid]:
            writes.setdefault(cid, []).append(
                WriteRecord(task_id, idx, channel, Payload(tag, bytes(data)), task_path))
    links: list[ChainLink] = []
    for row in rows:
        cid, parent_id, location, archive_key = row[:4]
        tags = row[4 + k:]
        values: dict[str, Payload] = {}
        missing: list[str] = []
        for ch, tag in zip(asked, tags, strict=True):
            if tag == _LOST:
                missing.append(ch)
            elif tag == _CHAIN:
                chain = [(name, link_tag, data) for name, link_tag, data in conn.execute(
                    _CHAIN_LINKS, (thread_id, checkpoint_ns, cid)) if channel_of(name) == ch]
                if any(link_tag is None for _, link_tag, _ in chain):
                    missing.append(ch)  # a chain is a value only whole
                else:
                    values.update((name, Payload(link_tag, bytes(data)))
                                  for name, link_tag, data in chain)
            elif tag is not None and tag != EMPTY.tag:
                _, seed_tag, data = conn.execute(_SEED, (thread_id, checkpoint_ns, cid, ch)
                                                 ).fetchone()
                values[ch] = Payload(seed_tag, bytes(data))
        mine = writes.get(cid, [])
        if len(mine) > 1:
            mine.sort(key=lambda w: (w.task_path, w.task_id, w.idx))
        links.append(ChainLink(checkpoint_id=cid, parent_id=parent_id, values=values,
                               writes=tuple(mine), location=location,
                               archive_key=archive_key, missing=tuple(missing)))
    return links
