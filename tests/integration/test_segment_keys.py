"""An archive segment, once written, is never written again under its key.

Each test replays a race in the order that broke it, by calling the job steps and
saver calls one after the other (no sleeps): a thread archived, read back (which
rehydrates it and caches the segment), written to and archived again; a copy that
shares its source's segments; ``ColdGC`` deciding a segment is unreferenced while a
worker archives the same checkpoints again.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint

from tests.stacks import STACKS, TIERED_STACKS, Urls
from tierstore import TieredSaver
from tierstore.codec.segment import SEGMENT_PREFIX, thread_prefix
from tierstore.errors import CorruptPayload
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import ColdGC, IdleArchival
from tierstore.ops import verify
from tierstore.region import Region

FUTURE = 10 * 365 * 86400.0  # "now" for the jobs: everything written in the test is idle
IDLE = TieringPolicy(archive_after=None, archive_idle_after=60, segment_size=50)


@pytest.fixture(params=sorted(TIERED_STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


@pytest.fixture
async def saver(urls: Urls) -> AsyncIterator[TieredSaver]:
    async with urls.open() as s:
        yield s


def cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}


def now() -> float:
    return time.time() + FUTURE


async def archive(saver: TieredSaver, thread: str) -> None:
    report = await IdleArchival(saver, IDLE, thread_id=thread).run_once(now=now())
    assert report.errors == []
    assert report.checkpoints == 1


async def start(saver: TieredSaver, thread: str) -> dict[str, Any]:
    """One checkpoint on ``thread``, archived, then read back (rehydrated, its segment
    cached in this process)."""
    config: dict[str, Any] = await saver.aput(
        cfg(thread), empty_checkpoint(), {"source": "loop", "step": 0, "parents": {}}, {})
    await archive(saver, thread)
    got = await saver.aget_tuple({"configurable": {"thread_id": thread}})
    assert got is not None and got.pending_writes == []
    return config


def stack_of(saver: TieredSaver) -> Region:
    stack = saver.regions.by_name["default"]
    assert stack.cold is not None
    return stack


async def segment_keys(saver: TieredSaver) -> list[str]:
    cold = stack_of(saver).cold
    assert cold is not None
    return sorted([k async for k in cold.iter_keys(SEGMENT_PREFIX)])


async def pending(saver: TieredSaver, thread: str) -> list[Any]:
    got = await saver.aget_tuple({"configurable": {"thread_id": thread}})
    assert got is not None
    return list(got.pending_writes or [])


async def test_re_archiving_never_serves_the_segment_read_before(saver: TieredSaver,
                                                                  urls: Urls) -> None:
    config = await start(saver, "t")
    await saver.aput_writes(config, [("log", "WRITE-X")], "task-1")
    await archive(saver, "t")
    expected = [("task-1", "log", "WRITE-X")]
    listed = [t.pending_writes async for t in saver.alist({"configurable": {"thread_id": "t"}})]
    assert listed == [expected]
    assert (await saver.aget_tuple(config)) is not None
    assert await pending(saver, "t") == expected  # rehydrated again: from the new segment
    assert await pending(saver, "t") == expected
    async with urls.open() as fresh:  # nothing cached
        assert await pending(fresh, "t") == expected


async def test_each_move_writes_a_key_of_its_own(saver: TieredSaver) -> None:
    config = await start(saver, "t")
    first = await segment_keys(saver)
    await saver.aput_writes(config, [("log", "WRITE-X")], "task-1")
    await archive(saver, "t")
    keys = await segment_keys(saver)
    assert len(first) == 1 and len(keys) == 2 and first[0] in keys  # old one left for GC
    assert all(k.startswith(thread_prefix("t")) for k in keys)  # deletes find them by prefix
    refs = await stack_of(saver).warm.archive_refs("t")
    assert list(refs) == [k for k in keys if k != first[0]]
    await ColdGC(saver, grace_seconds=0).run_once(now=now())
    assert await segment_keys(saver) == list(refs)
    assert await pending(saver, "t") == [("task-1", "log", "WRITE-X")]


async def test_a_copy_never_sees_its_source_archived_again(saver: TieredSaver,
                                                            urls: Urls) -> None:
    config = await saver.aput(cfg("A"), empty_checkpoint(),
                              {"source": "loop", "step": 0, "parents": {}}, {})
    await archive(saver, "A")
    await saver.acopy_thread("A", "B")
    assert await pending(saver, "A") == []  # resume A: rehydrated
    await saver.aput_writes(config, [("log", "A-ONLY")], "task-1")
    await archive(saver, "A")
    async with urls.open() as fresh:
        for reader in (saver, fresh):
            assert await pending(reader, "B") == []
            assert await pending(reader, "A") == [("task-1", "log", "A-ONLY")]


async def test_cold_gc_never_deletes_a_segment_a_later_move_names(
        saver: TieredSaver, monkeypatch: pytest.MonkeyPatch) -> None:
    config = await start(saver, "t")  # rehydrated: its segment is named by nothing now
    await saver.aput_writes(config, [("log", "WRITE-X")], "task-1")
    cold = stack_of(saver).cold
    assert cold is not None
    delete = cold.delete
    raced: list[bool] = []

    async def archive_then_delete(keys: Any) -> Any:
        # ColdGC has chosen the unreferenced segment; a worker moves the thread again
        # before GC's delete lands
        if not raced:
            raced.append(True)
            await archive(saver, "t")
        return await delete(keys)

    monkeypatch.setattr(cold, "delete", archive_then_delete)
    report = await ColdGC(saver, grace_seconds=0).run_once(now=now())
    monkeypatch.undo()
    assert raced and report.errors == []
    refs = await stack_of(saver).warm.archive_refs("t")
    assert set(refs) <= set(await segment_keys(saver))  # every named segment exists
    assert await pending(saver, "t") == [("task-1", "log", "WRITE-X")]


async def test_a_stub_is_never_served_other_bytes_than_its_key_names(saver: TieredSaver,
                                                                      urls: Urls) -> None:
    config = await start(saver, "t")
    [old] = await segment_keys(saver)
    await saver.aput_writes(config, [("log", "WRITE-X")], "task-1")
    await archive(saver, "t")
    [new] = list(await stack_of(saver).warm.archive_refs("t"))
    cold = stack_of(saver).cold
    assert cold is not None and new != old
    stale = await cold.get(old)
    assert stale is not None
    await cold.put(new, stale)  # the older pack of the same checkpoint, under the new key
    async with urls.open() as fresh:
        with pytest.raises(CorruptPayload, match="checksum its key names"):
            await fresh.aget_tuple({"configurable": {"thread_id": "t"}})
        report = await verify(fresh)
        assert report["ok"] is False
        assert any("checksum its key names" in p for p in report["problems"])


async def test_cold_gc_never_deletes_a_move_in_flight(saver: TieredSaver,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Even told to keep nothing (``grace_seconds=0``), GC waits a lease: a move marks
    its stubs only while its lease holds, so a segment younger than that may still be
    named by the move that wrote it."""
    await saver.aput(cfg("t"), empty_checkpoint(), {"source": "loop", "step": 0, "parents": {}},
                     {})
    stack = stack_of(saver)
    cold = stack.cold
    assert cold is not None
    mark = stack.warm.mark_archived
    collected: list[int] = []

    async def collect_then_mark(*args: Any, **kw: Any) -> int:
        # the segment is written and verified, its stubs not marked yet
        [key] = await segment_keys(saver)
        info = await cold.info(key)
        assert info is not None and info.modified > 0
        gc = ColdGC(saver, IDLE, grace_seconds=0)
        collected.append((await gc.run_once(now=info.modified + 1)).deleted)
        return await mark(*args, **kw)

    monkeypatch.setattr(stack.warm, "mark_archived", collect_then_mark)
    await archive(saver, "t")
    monkeypatch.undo()
    assert collected == [0]
    refs = await stack.warm.archive_refs("t")
    assert list(refs) == await segment_keys(saver)
