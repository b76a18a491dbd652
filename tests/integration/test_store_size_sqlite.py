"""SQLite (the embedded stack): every request-path operation costs the same in a store of
a dozen other threads as in one of three thousand (``store_size`` describes the thread
and the operations).

The cost is counted in virtual-machine steps of the warm store's connection
(``set_progress_handler``, as ``tests/contract/test_sqlite_read_scaling.py`` does for
the length of a thread), and in directories the file cold tier lists. SQLite plans
without statistics of table sizes (nothing runs ``ANALYZE``), so one measurement per
store size covers every plan the store will use.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.store_size import (
    FEW,
    MANY,
    OPERATIONS,
    OPTIONS,
    Figures,
    assert_flat,
    build_thread,
    cfg,
    fill_object_dirs,
    measure_operation,
    report,
)
from tierstore import TieredSaver
from tierstore.tiers.sqlite import SqliteWarm

TEMPLATES = 4
CACHED = 1200
"""Other threads read through the saver before the large store is measured: the hot
tier holds them all, this process's own LRU (``hot_local_entries``, 1,024) is full."""
HOT_ENTRIES = 2 * MANY
EVERY = 20
"""VM instructions per progress callback."""

_NUMBERS = "WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
_COPIES = (
    # copy i of template thread i % TEMPLATES: thread ids, run ids and archive keys its own
    "SELECT n.i, 'other-' || n.i || '/' || t.thread_id AS dst, t.thread_id AS src "
    "FROM n JOIN (SELECT DISTINCT thread_id FROM heads WHERE thread_id LIKE 'tpl-%') AS t "
    "ON t.thread_id = 'tpl-' || (n.i % ?)"
)
_COPY = [
    "INSERT INTO heads (thread_id, checkpoint_ns, head_id, version, n_writes, conflicts, "
    "updated_at) SELECT m.dst, h.checkpoint_ns, h.head_id, h.version, h.n_writes, 0, "
    "h.updated_at FROM m JOIN heads AS h ON h.thread_id = m.src",
    "INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, parent_id, run_id, "
    "checkpoint_tag, checkpoint, metadata_tag, metadata, channel_versions, filter_doc, "
    "location, archive_key, created_at, accessed_at, size_bytes) SELECT m.dst, "
    "c.checkpoint_ns, c.checkpoint_id, c.parent_id, 'other-' || m.i || '/' || c.run_id, "
    "c.checkpoint_tag, c.checkpoint, c.metadata_tag, c.metadata, c.channel_versions, "
    "c.filter_doc, c.location, c.archive_key || '.' || m.i, c.created_at, c.accessed_at, "
    "c.size_bytes FROM m JOIN checkpoints AS c ON c.thread_id = m.src",
    "INSERT INTO blobs (thread_id, checkpoint_ns, channel, version, tag, data) SELECT m.dst, "
    "b.checkpoint_ns, b.channel, b.version, b.tag, b.data FROM m JOIN blobs AS b "
    "ON b.thread_id = m.src",
    "INSERT INTO writes (thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, tag, "
    "data, task_path) SELECT m.dst, w.checkpoint_ns, w.checkpoint_id, w.task_id, w.idx, "
    "w.channel, w.tag, w.data, w.task_path FROM m JOIN writes AS w ON w.thread_id = m.src",
]


def _fill(path: Path, first: int, last: int) -> list[str]:
    """Copies ``first``..``last`` of the template threads, by a connection of its own."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TEMP TABLE m (i INTEGER, dst TEXT, src TEXT)")
        conn.execute(f"{_NUMBERS}INSERT INTO m {_COPIES}", (first, last, TEMPLATES))
        for statement in _COPY:
            conn.execute(statement)
        copies = [r[0] for r in conn.execute("SELECT dst FROM m")]
        conn.execute("DROP TABLE m")
        conn.execute("COMMIT")
        return copies
    finally:
        conn.close()


class Steps:
    """Virtual-machine steps (in units of ``EVERY``) of the warm store's connection."""

    def __init__(self, warm: SqliteWarm) -> None:
        conn = warm._conn
        assert conn is not None
        self.conn: sqlite3.Connection = conn
        self.count = 0

    def _tick(self) -> int:
        self.count += 1
        return 0

    async def __call__(self, call: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
        self.count = 0
        self.conn.set_progress_handler(self._tick, EVERY)
        try:
            result = await call()
        finally:
            self.conn.set_progress_handler(None, 0)
        return result, self.count


@pytest.fixture(scope="module")
async def figures(tmp_path_factory: pytest.TempPathFactory) -> Figures:
    tmp: Path = tmp_path_factory.mktemp("store-size-sqlite")
    out: Figures = {name: {} for name in OPERATIONS}
    async with TieredSaver.from_urls(hot=f"memory://?max_entries={HOT_ENTRIES}",
                                     warm=f"sqlite:///{tmp}/warm.db?synchronous=normal",
                                     cold=f"file://{tmp}/cold", **OPTIONS) as saver:
        warm = saver.regions.distinct()[0].warm
        assert isinstance(warm, SqliteWarm)
        steps = Steps(warm)
        for i in range(TEMPLATES):
            await build_thread(saver, f"tpl-{i}")
        for first, last, phase in ((1, FEW, "few"), (FEW + 1, MANY, "many")):
            others = _fill(tmp / "warm.db", first, last)
            fill_object_dirs(tmp / "cold", others)
            for other in others[:CACHED]:  # the caches fill with threads read lately
                assert await saver.aget_tuple(cfg(other)) is not None
            for name in OPERATIONS:
                t = await build_thread(saver, f"{phase}-{name}-{uuid.uuid4().hex[:6]}")
                out[name][phase] = await measure_operation(saver, name, t, steps)
    report(out, f"x{EVERY} VM steps")
    return out


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_cost_follows_the_thread_not_the_store(figures: Figures, name: str) -> None:
    assert_flat(figures, name, unit=f"x{EVERY} VM steps", sizes={"few": FEW, "many": MANY})
