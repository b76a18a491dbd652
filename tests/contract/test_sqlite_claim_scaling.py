"""SQLite: a history demotion claim costs the heads it takes, not the heads settled before.

History demotion settles every head it has moved (migration 0003): such a head has
nothing to move until a new checkpoint arrives or its next checkpoint grows old enough.
A run claims batch after batch, oldest first, and the heads settled so far are the
oldest of the store; a claim that steps over them costs more with every head the store
holds. Here 100 heads with history to move are claimed among a few settled heads and
among many (all older than the ones taken), and the cost of the claim is counted in
virtual-machine steps of the store's connection (never timed).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tierstore.tiers.sqlite import SqliteWarm

TAKE = 100
FEW = 50
MANY = 5_000
EVERY = 20  # VM instructions per progress callback
BOUND = 1.3  # a btree a level deeper; stepping over the settled heads is ~50x
DUE_AT = 2_000_000.0  # settled heads of the "due" kind have work again from then on

_HEAD = ("INSERT INTO heads (thread_id, checkpoint_ns, head_id, version, n_writes, conflicts, "
         "updated_at, settled_head, settled_until) VALUES (?, '', 'c2', 1, 0, 0, ?, ?, ?)")
_CKPT = ("INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, parent_id, "
         "checkpoint_tag, checkpoint, metadata_tag, metadata, channel_versions, filter_doc, "
         "location, archive_key, created_at, accessed_at, size_bytes) "
         "VALUES (?, '', ?, ?, 't', x'00', 't', x'00', '{}', '{}', ?, ?, ?, ?, 1)")


def _fill(path: Path, settled: int, due: int) -> None:
    """``settled`` heads with nothing to move (their history archived, oldest of the
    store), ``due`` settled heads whose next checkpoint is old enough at ``DUE_AT``, and
    ``TAKE`` heads never settled, each with one old checkpoint besides the head."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for i in range(settled):
            conn.execute(_HEAD, (f"settled-{i}", float(i), "c2", None))
            conn.execute(_CKPT, (f"settled-{i}", "c1", None, "archived", "k", i, i))
            conn.execute(_CKPT, (f"settled-{i}", "c2", "c1", "warm", None, i, i))
        for j in range(due + TAKE):
            thread, at = (f"due-{j}", 1e5 + j) if j < due else (f"take-{j}", 1e6 + j)
            conn.execute(_HEAD, (thread, at, "c2" if j < due else None,
                                 DUE_AT - 1 if j < due else None))
            conn.execute(_CKPT, (thread, "c1", None, "warm", None, at, at))
            conn.execute(_CKPT, (thread, "c2", "c1", "warm", None, at, at))
        conn.execute("COMMIT")
    finally:
        conn.close()


class Steps:
    def __init__(self, warm: SqliteWarm) -> None:
        assert warm._conn is not None
        self.conn: sqlite3.Connection = warm._conn
        self.count = 0

    def _tick(self) -> int:
        self.count += 1
        return 0

    async def __call__(self, op: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
        self.count = 0
        self.conn.set_progress_handler(self._tick, EVERY)
        try:
            result = await op()
        finally:
            self.conn.set_progress_handler(None, 0)
        return result, self.count


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[dict[int, SqliteWarm]]:
    out: dict[int, SqliteWarm] = {}
    try:
        for settled in (FEW, MANY):
            store = SqliteWarm(str(tmp_path / f"warm-{settled}.db"), synchronous="normal")
            await store.setup()
            out[settled] = store
            _fill(tmp_path / f"warm-{settled}.db", settled, due=0)
        yield out
    finally:
        for store in out.values():
            await store.aclose()


async def _claim(warm: SqliteWarm, *, now: float = 1e7, limit: int = TAKE) -> list[str]:
    claims = await warm.claim(owner="w", now=now, lease_seconds=60, limit=limit,
                              warm_before=now)
    return [c.thread_id for c in claims]


async def test_a_claim_costs_the_heads_it_takes_not_the_settled_ones(
        stores: dict[int, SqliteWarm]) -> None:
    cost: dict[int, int] = {}
    for settled, store in stores.items():
        taken, cost[settled] = await Steps(store)(lambda s=store: _claim(s))  # type: ignore[misc]
        assert sorted(taken) == sorted(f"take-{j}" for j in range(TAKE))
    assert cost[MANY] / cost[FEW] <= BOUND, cost


async def test_settled_heads_are_claimed_again_once_due_oldest_first(tmp_path: Path) -> None:
    store = SqliteWarm(str(tmp_path / "warm.db"), synchronous="normal")
    await store.setup()
    try:
        _fill(tmp_path / "warm.db", 20, due=30)
        # not due yet: only the heads never settled
        assert sorted(await _claim(store, now=DUE_AT - 10)) == sorted(
            f"take-{j}" for j in range(30, 30 + TAKE))
        await store.release_owned(owner="w")
        # due: the due heads are older than the unsettled ones, so they come first
        taken = await _claim(store, now=DUE_AT + 10, limit=40)
        assert taken == [f"due-{j}" for j in range(30)] + [f"take-{j}" for j in range(30, 40)]
        # a leased head is not claimed again; the settled ones with nothing to move never
        rest = await _claim(store, now=DUE_AT + 20, limit=1000)
        assert sorted(rest) == sorted(f"take-{j}" for j in range(40, 30 + TAKE))
    finally:
        await store.aclose()
