"""The SQLite warm tier's page size: new stores get 8 KiB pages, older stores keep theirs.

``checkpoints`` is a ``WITHOUT ROWID`` table, an index b-tree, which keeps at most
about a quarter of a page of each row on the page; with 4 KiB pages a chat
checkpoint (800-1,300 bytes) often spills its tail onto an overflow page of its own.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from loadtest.workload import build_chat_agent, thread_config, turn_input
from tierstore import TieredSaver
from tierstore.tiers import sqlite_base
from tierstore.tiers.sqlite import SqliteWarm

THREADS = 10
TURNS = 10
REPLY_BYTES = 500
OLD_PAGE_SIZE = 4096
CONVERT = ("PRAGMA journal_mode=DELETE; PRAGMA page_size=8192; VACUUM; "
           "PRAGMA journal_mode=WAL;")
"""The offline conversion the README gives, run while no process has the file open."""


def _pragma(path: Path, name: str) -> Any:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def _old_file(path: Path, journal_mode: str = "wal") -> None:
    """A file made with 4 KiB pages, as every store was before 8 KiB became the default."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA page_size={OLD_PAGE_SIZE}")
        conn.execute(f"PRAGMA journal_mode={journal_mode}")
        conn.execute("CREATE TABLE kept (x INTEGER)")
        conn.execute("INSERT INTO kept VALUES (1)")


def _saver(path: Path) -> Any:
    return TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{path}",
                                 cold=f"file://{path.parent}/cold")


async def _chat(path: Path, threads: range, turns: range) -> None:
    async with _saver(path) as saver:
        app = build_chat_agent(REPLY_BYTES).compile(checkpointer=saver)
        for t in threads:
            for n in turns:
                await app.ainvoke(turn_input(f"t{t}", n, REPLY_BYTES), thread_config(f"t{t}"))


async def _history(path: Path, threads: range) -> list[Any]:
    """Every checkpoint of the threads, as a new process reads them (nothing hot)."""
    async with _saver(path) as saver:
        return [(c.config, c.checkpoint, c.metadata, c.parent_config, c.pending_writes)
                for t in threads async for c in saver.alist(thread_config(f"t{t}"))]


async def test_a_new_store_has_8_kib_pages(tmp_path: Path) -> None:
    path = tmp_path / "warm.db"
    store = SqliteWarm(str(path))
    await store.setup()
    await store.aclose()
    assert _pragma(path, "page_size") == 8192
    assert _pragma(path, "journal_mode") == "wal"


async def test_a_store_in_memory_still_opens() -> None:
    async with TieredSaver.from_urls(hot="memory://", warm="sqlite:///:memory:") as saver:
        app = build_chat_agent(REPLY_BYTES).compile(checkpointer=saver)
        await app.ainvoke(turn_input("t0", 0, REPLY_BYTES), thread_config("t0"))
        assert [c async for c in saver.alist(thread_config("t0"))]


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
async def test_an_older_store_keeps_its_4_kib_pages(tmp_path: Path, journal_mode: str) -> None:
    path = tmp_path / "warm.db"
    _old_file(path, journal_mode)
    await _chat(path, range(2), range(3))
    before = await _history(path, range(2))
    await _chat(path, range(2, 3), range(3))  # a second opening writes too
    assert await _history(path, range(2)) == before
    assert len(await _history(path, range(3))) == len(before) * 3 // 2
    assert _pragma(path, "page_size") == OLD_PAGE_SIZE
    assert _pragma(path, "journal_mode") == "wal"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(1,)]  # not rebuilt


async def test_the_offline_conversion_keeps_every_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "warm.db"
    _old_file(path)
    await _chat(path, range(3), range(4))
    before = await _history(path, range(3))
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executescript(CONVERT)
    assert _pragma(path, "page_size") == 8192
    assert _pragma(path, "journal_mode") == "wal"
    assert await _history(path, range(3)) == before
    await _chat(path, range(3), range(4, 5))  # and it takes new turns
    assert len(await _history(path, range(3))) > len(before)


def _dbstat(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("SELECT count(*) FROM dbstat").fetchone()
    except sqlite3.OperationalError as exc:
        pytest.skip(f"this SQLite build has no dbstat table ({exc})")


async def _overflow_pages(path: Path) -> int:
    """Chat turns into a new store; the overflow pages its ``checkpoints`` table took."""
    await _chat(path, range(THREADS), range(TURNS))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        _dbstat(conn)
        rows, largest = conn.execute(
            "SELECT count(*), max(length(thread_id) + length(checkpoint_id) "
            "+ coalesce(length(checkpoint), 0) + length(metadata) + length(channel_versions) "
            "+ length(filter_doc)) FROM checkpoints").fetchone()
        overflow: int = conn.execute("SELECT count(*) FROM dbstat WHERE name = 'checkpoints' "
                                     "AND pagetype = 'overflow'").fetchone()[0]
    assert rows >= THREADS * TURNS
    assert largest > 1002  # more than a 4 KiB page keeps of a row of this table
    return overflow


async def test_chat_checkpoints_need_no_overflow_pages(tmp_path: Path) -> None:
    assert await _overflow_pages(tmp_path / "warm.db") == 0


async def test_with_4_kib_pages_the_same_checkpoints_overflow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the check above fails on the page size every store had before."""
    monkeypatch.setattr(sqlite_base, "PAGE_SIZE", OLD_PAGE_SIZE)
    assert await _overflow_pages(tmp_path / "warm.db") > 0
