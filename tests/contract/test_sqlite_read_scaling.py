"""SQLite reads and blob collection grow linearly with a thread's history.

The cost is counted in SQLite virtual-machine steps (``set_progress_handler``), not
in seconds, so the test is exact on a loaded machine: a thread four times as long
must cost about four times as much, where a join that scans the thread's blobs for
every checkpoint costs sixteen times as much.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.builders import record
from tierstore.records import BlobRecord, ListQuery, Payload
from tierstore.tiers import sqlite as sqlite_tier
from tierstore.tiers.sqlite import SqliteWarm

CHANNELS = 5
SMALL = 300
GROWTH = 4
LINEAR_BOUND = GROWTH * 1.6
"""A linear read costs ~4x; anything over 6.4x is growing faster than the thread."""


def _version(n: int) -> str:
    return f"{n:032}.0"


async def _fill(warm: SqliteWarm, thread: str, n: int, channels: int = CHANNELS) -> None:
    """``n`` checkpoints; each bumps one channel, so the thread holds ~n blobs."""
    versions = {f"ch{c}": _version(0) for c in range(channels)}
    await warm.put_checkpoint(record(thread, 0, versions=versions, run_id="run-0"),
                              [BlobRecord(ch, v, Payload("msgpack", b"v0"))
                               for ch, v in versions.items()], strict=False)
    for i in range(1, n):
        ch = f"ch{i % channels}"
        versions[ch] = _version(i)
        await warm.put_checkpoint(
            record(thread, i, parent=i - 1, versions=versions, run_id=f"run-{i}"),
            [BlobRecord(ch, versions[ch], Payload("msgpack", f"v{i}".encode()))], strict=False)


class Steps:
    """Counts VM steps of the store's connection while armed."""

    EVERY = 50

    def __init__(self, warm: SqliteWarm) -> None:
        conn = warm._conn
        assert conn is not None
        self.conn: sqlite3.Connection = conn
        self.count = 0

    def _tick(self) -> int:
        self.count += 1
        return 0

    async def measure(self, op: Callable[[], Awaitable[Any]]) -> int:
        self.count = 0
        self.conn.set_progress_handler(self._tick, self.EVERY)
        try:
            await op()
        finally:
            self.conn.set_progress_handler(None, 0)
        return self.count


@pytest.fixture
async def warm(tmp_path: Path) -> AsyncIterator[SqliteWarm]:
    store = SqliteWarm(str(tmp_path / "warm.db"), synchronous="normal")
    await store.setup()
    try:
        yield store
    finally:
        await store.aclose()


async def _list_all(warm: SqliteWarm, query: ListQuery) -> int:
    return len([r async for r in warm.list(query)])


@pytest.mark.parametrize("with_ns", [True, False], ids=["thread+ns", "thread"])
async def test_listing_a_thread_is_linear_in_its_length(warm: SqliteWarm, with_ns: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_tier, "_PAGE", 40)  # many pages: each must cost only its rows
    await _fill(warm, "short", SMALL)
    await _fill(warm, "long", SMALL * GROWTH)
    steps = Steps(warm)
    ns = "" if with_ns else None
    short = await steps.measure(lambda: _list_all(warm, ListQuery(thread_id="short",
                                                                 checkpoint_ns=ns)))
    long = await steps.measure(lambda: _list_all(warm, ListQuery(thread_id="long",
                                                                checkpoint_ns=ns)))
    assert long / short < LINEAR_BOUND, (short, long)
    listed = [r async for r in warm.list(ListQuery(thread_id="long", checkpoint_ns=ns))]
    assert len(listed) == SMALL * GROWTH
    newest = listed[0]
    assert set(newest.blobs) == {f"ch{c}" for c in range(CHANNELS)}
    last = SMALL * GROWTH - 1
    assert newest.blobs[f"ch{last % CHANNELS}"].data == f"v{last}".encode()


async def test_getting_a_wide_checkpoint_is_linear_in_its_channels(warm: SqliteWarm) -> None:
    await _fill(warm, "narrow", 1, channels=SMALL * 4)
    await _fill(warm, "wide", 1, channels=SMALL * 4 * GROWTH)
    steps = Steps(warm)
    narrow = await steps.measure(lambda: warm.get("narrow", "", None))
    wide = await steps.measure(lambda: warm.get("wide", "", None))
    assert wide / narrow < LINEAR_BOUND, (narrow, wide)
    got = await warm.get("wide", "", None)
    assert got is not None and len(got.blobs) == SMALL * 4 * GROWTH


async def test_blob_collection_is_linear_in_the_thread(warm: SqliteWarm) -> None:
    await _fill(warm, "short", SMALL)
    await _fill(warm, "long", SMALL * GROWTH)
    steps = Steps(warm)
    # Deleting one run's checkpoint recomputes the head and collects the thread's blobs.
    short = await steps.measure(lambda: warm.delete_for_runs(["run-1"]))
    assert short > 0
    steps_long = Steps(warm)
    long = await steps_long.measure(lambda: warm.delete_for_runs([f"run-{SMALL * GROWTH - 2}"]))
    assert long / short < LINEAR_BOUND, (short, long)


async def test_blob_collection_keeps_what_live_checkpoints_name(warm: SqliteWarm) -> None:
    await _fill(warm, "t", 12)
    conn = warm._conn
    assert conn is not None
    before = conn.execute("SELECT count(*) FROM blobs WHERE thread_id = 't'").fetchone()[0]
    # checkpoint 1 bumped ch1 to version 1; checkpoint 6 bumped it again, so ch1@1 is
    # named only by checkpoints 1..5: deleting them orphans exactly that blob.
    await warm.delete_for_runs([f"run-{i}" for i in range(1, 6)])
    after = {tuple(r) for r in conn.execute(
        "SELECT channel, version FROM blobs WHERE thread_id = 't'")}
    assert len(after) == before - 1
    assert ("ch1", _version(1)) not in after
    assert {("ch2", _version(2)), ("ch0", _version(5)), ("ch1", _version(0))} <= after
    got = await warm.get("t", "", "1ef-00000000")
    assert got is not None and set(got.blobs) == {f"ch{c}" for c in range(CHANNELS)}
