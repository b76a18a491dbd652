"""``postgresql://`` (or ``postgres://``) — the warm tier on PostgreSQL, through asyncpg.

::

    caller ──► PostgresWarm ──► asyncpg pool (min_size..max_size) ──► PostgreSQL
                  │  one pooled connection per call, no lock in Python:
                  │  calls on different threads run in parallel
                  │
                  ├─ head            1 statement  index lookup on tierstore_heads
                  ├─ get             1 statement  checkpoint + blobs + writes (lateral aggregates)
                  ├─ list            1 per page   keyset pages of 200, blobs and writes joined
                  ├─ put_checkpoint  1 statement  tierstore_put_checkpoint(): lock the head row,
                  │                                compare parent, insert, advance head
                  ├─ put_writes      1 statement  tierstore_put_writes(): insert, count new rows
                  │   (with a lease token: the *_fenced variants, the fence row FOR SHARE first)
                  ├─ next_fence      1 statement  tierstore_next_fence(): bump the thread's fence
                  ├─ ancestors       1 per page   tierstore_ancestors(): the parent chain by
                  │                                primary key, seeds and writes of its links
                  ├─ delete / copy / prune        one transaction: lock heads, change, recompute
                  └─ claim           1 statement  FOR NO KEY UPDATE SKIP LOCKED; mark_archived
                                                  and rehydrate: one transaction under the lease


Modules, lowest first::

    sql         the schema, SQL fragments and maintenance statements several modules share
    partitions  the tables hash-partitioned by thread: layout, creation, online conversion
    migrations  the shipped migrations, applied once per database however many start
    pool        options, pool, lifecycle, driver errors translated, ``_run``
    requests    head, get, list, ancestors, put_checkpoint, put_writes, next_fence
    admin       delete, delete_for_runs, copy, publish, prune, usage; partition (convert)
    tiering     claim, release, expire, index, mark_archived, rehydrate, archive refs
"""

from __future__ import annotations

from tierstore.tiers.base import WarmStore
from tierstore.tiers.postgres.admin import PostgresAdmin
from tierstore.tiers.postgres.pool import POOL_OPTIONS, server_settings
from tierstore.tiers.postgres.requests import PostgresRequests
from tierstore.tiers.postgres.tiering import PostgresTiering

__all__ = ["POOL_OPTIONS", "PostgresWarm", "server_settings"]


class PostgresWarm(PostgresRequests, PostgresAdmin, PostgresTiering, WarmStore):
    """Warm tier on PostgreSQL. Build with ``from_url`` (its own pool, closed with the store)
    or ``from_pool`` (the caller's pool, left open); ``setup()`` opens it and migrates."""
