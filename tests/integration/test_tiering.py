"""Tiering end to end: history and idle threads move to cold and back, nothing is lost."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.base import empty_checkpoint

from tests.stacks import MULTIPROCESS_STACKS, STACKS, TIERED_STACKS, Urls
from tierstore import TieredSaver
from tierstore.codec.segment import SEGMENT_PREFIX, unpack_segment
from tierstore.demo import build_agent
from tierstore.errors import CorruptPayload
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import ColdGC, HistoryDemotion, IdleArchival, Retention

FUTURE = 10 * 365 * 86400.0  # "now" for the jobs: everything written in the test is old

HISTORY = TieringPolicy(archive_after=60, archive_idle_after=None, segment_size=4)
IDLE = TieringPolicy(archive_after=None, archive_idle_after=60, segment_size=50)


@pytest.fixture(params=sorted(TIERED_STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


def open_saver(urls: Urls, **options: Any) -> TieredSaver:
    return urls.open(**options)


@pytest.fixture
async def saver(urls: Urls) -> AsyncIterator[TieredSaver]:
    async with open_saver(urls) as s:
        yield s


def cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


async def converse(app: Any, thread: str, turns: int) -> None:
    for i in range(turns):
        await app.ainvoke({"messages": [HumanMessage(f"what is {i} + {len(thread)}")]},
                          cfg(thread))


async def snapshot(app: Any, thread: str) -> list[tuple[str, Any]]:
    return [(s.config["configurable"]["checkpoint_id"], s.values)
            async for s in app.aget_state_history(cfg(thread))]


def now() -> float:
    return time.time() + FUTURE


async def test_history_demotion_keeps_every_read_correct(saver: TieredSaver, urls: Urls) -> None:
    app = build_agent().compile(checkpointer=saver)
    await converse(app, "hist", 5)
    await converse(app, "other", 2)
    before = await snapshot(app, "hist")
    report = await HistoryDemotion(saver, HISTORY).run_once(now=now())
    assert report.errors == []
    assert report.checkpoints == len(before) - 1 + len(await snapshot(app, "other")) - 1
    warm = saver.regions.by_name["default"].warm
    usage = await warm.usage()
    assert usage.checkpoints == 2  # one live head per thread
    assert await snapshot(app, "hist") == before  # list reads stubs + segments
    again = await HistoryDemotion(saver, HISTORY).run_once(now=now())
    assert again.checkpoints == 0  # nothing more to move
    # time travel to an archived checkpoint, and fork from it
    old_id, old_values = before[-4]
    state = await app.aget_state({"configurable": {"thread_id": "hist",
                                                   "checkpoint_id": old_id}})
    assert state.values == old_values
    forked = await app.ainvoke({"messages": [HumanMessage("what do you remember")]}, state.config)
    assert forked["messages"][-1].content == "I remember: nothing yet."
    # the fork is durable and complete: read it back through a saver with nothing cached
    async with open_saver(urls, hot_write_delay=0) as fresh:
        fresh_app = build_agent().compile(checkpointer=fresh)
        assert (await fresh_app.aget_state(cfg("hist"))).values == forked
    # filters and limits are served from the stubs
    inputs = [t async for t in saver.alist(cfg("hist"), filter={"source": "input"}, limit=2)]
    assert len(inputs) == 2 and all(t.metadata["source"] == "input" for t in inputs)


async def test_idle_thread_is_archived_and_resumes(urls: Urls) -> None:
    async with open_saver(urls) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember the vault code")]}, cfg("idle"))
        before = await snapshot(app, "idle")
        report = await IdleArchival(saver, IDLE).run_once(now=now())
        assert report.checkpoints == len(before)
        assert (await saver.regions.by_name["default"].warm.usage()).checkpoints == 0
    async with open_saver(urls) as saver:  # nothing cached anywhere
        app = build_agent().compile(checkpointer=saver)
        assert await snapshot(app, "idle") == before
        out = await app.ainvoke({"messages": [HumanMessage("what do you remember")]}, cfg("idle"))
        assert out["messages"][-1].content == "I remember: the vault code."
        assert saver.stats.rehydrated == 1
        assert len(await snapshot(app, "idle")) > len(before)


async def test_delete_and_prune_cover_archived_data(saver: TieredSaver) -> None:
    app = build_agent().compile(checkpointer=saver)
    await converse(app, "doomed", 3)
    await converse(app, "pruned", 3)
    await HistoryDemotion(saver, HISTORY).run_once(now=now())
    stack = saver.regions.by_name["default"]
    assert stack.cold is not None
    assert [k async for k in stack.cold.iter_keys(SEGMENT_PREFIX)]
    await saver.acopy_thread("pruned", "copy")
    assert await snapshot(app, "copy") == [
        (i, v) for i, v in await snapshot(app, "pruned")]
    await saver.adelete_thread("doomed")
    assert await snapshot(app, "doomed") == []
    await saver.aprune(["pruned"], strategy="keep_latest")
    assert len(await snapshot(app, "pruned")) == 1
    assert len(await snapshot(app, "copy")) > 1  # the copy still reads the shared segments
    await saver.aprune(["copy"], strategy="delete")
    assert [k async for k in stack.cold.iter_keys(SEGMENT_PREFIX)] == []


@pytest.mark.parametrize("step", ["written", "verified", "marked"])
async def test_a_crash_at_any_step_loses_nothing(saver: TieredSaver, step: str) -> None:
    app = build_agent().compile(checkpointer=saver)
    await converse(app, "crashy", 4)
    before = await snapshot(app, "crashy")

    class Crash(Exception):
        pass

    def crash(name: str) -> None:
        if name == step:
            raise Crash(name)

    job = HistoryDemotion(saver, HISTORY, on_step=crash)
    with pytest.raises(Crash):
        await job.run_once(now=now())
    assert await snapshot(app, "crashy") == before  # readable in between
    # the crashed worker's lease expires; the next run completes the move
    report = await HistoryDemotion(saver, HISTORY).run_once(now=now() + 3600)
    assert await snapshot(app, "crashy") == before
    warm = saver.regions.by_name["default"].warm
    refs = await warm.archive_refs("crashy")
    assert sum(refs.values()) == len(before) - 1
    assert report.errors == []
    await ColdGC(saver, grace_seconds=0).run_once(now=now() + 7200)
    assert await snapshot(app, "crashy") == before


async def test_retention_deletes_expired_threads(saver: TieredSaver) -> None:
    app = build_agent().compile(checkpointer=saver)
    await converse(app, "old", 2)
    report = await Retention(saver, TieringPolicy(expire_after=60)).run_once(now=now())
    assert report.deleted >= 1
    assert await snapshot(app, "old") == []


async def test_a_checkpoint_whose_value_warm_lost_stays_warm_and_is_reported(
        urls: Urls, caplog: pytest.LogCaptureFixture) -> None:
    """A live read of it is refused; archived as read, it would read back without the
    channel and no error. So the demotion leaves it warm, archives the rest of the
    history around it, and reports it (thread, checkpoint, channel) on every run."""
    thread = "damaged"
    config: Any = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    ids = []
    async with open_saver(urls, hot_write_delay=0) as saver:
        for i in range(1, 4):
            checkpoint = empty_checkpoint()
            checkpoint["channel_values"] = {"profile": f"v{i}", "log": ["hi"]}
            checkpoint["channel_versions"] = {"profile": str(i), "log": "1"}
            config = await saver.aput(config, checkpoint, {"source": "loop", "step": i},
                                      {"profile": str(i), "log": "1"} if i == 1
                                      else {"profile": str(i)})
            ids.append(config["configurable"]["checkpoint_id"])
        region = saver.regions.for_thread(thread)
        warm: Any = region.warm
        if warm.backend == "sqlite":
            await warm._run(lambda conn: conn.execute(
                "DELETE FROM blobs WHERE thread_id = ? AND channel = 'profile' "
                "AND version = '1'", (thread,)))
        elif warm.backend == "mongodb":
            await warm._c("blobs").delete_many(
                {"thread_id": thread, "channel": "profile", "version": "1"})
        else:
            pytest.skip("PostgreSQL stores no row for an empty channel: a missing row is "
                        "not evidence of loss (tierstore verify tells them apart)")
        lost = await warm.get(thread, "", ids[0])
        assert lost is not None and lost.missing == ("profile",)
        policy = TieringPolicy(archive_after=60, archive_idle_after=None, segment_size=1)
        with caplog.at_level(logging.WARNING, logger="tierstore.jobs"):
            report = await HistoryDemotion(saver, policy).run_once(now=now())
        assert report.checkpoints == 1 and report.segments == 1  # the other old one
        assert report.failed == 1 and report.error_types == {"CorruptPayload": 1}
        [line] = report.errors
        assert repr(thread) in line and ids[0] in line and "'profile'" in line
        assert any(ids[0] in r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING)
        left = await warm.get(thread, "", ids[0])
        moved = await warm.get(thread, "", ids[1])
        assert left is not None and left.location == "warm"
        assert moved is not None and moved.location == "archived"
        again = await HistoryDemotion(saver, policy).run_once(now=now())
        assert again.checkpoints == 0 and again.failed == 1  # not settled: said again
    async with open_saver(urls) as fresh:  # nothing cached
        with pytest.raises(CorruptPayload, match="'profile'"):
            await fresh.aget_tuple({"configurable": {**config["configurable"],
                                                     "checkpoint_id": ids[0]}})
        got = await fresh.aget_tuple({"configurable": {**config["configurable"],
                                                       "checkpoint_id": ids[1]}})
        assert got is not None
        assert got.checkpoint["channel_values"] == {"profile": "v2", "log": ["hi"]}


def _worker(urls: Urls, seed: int, results: Any) -> None:
    async def run() -> int:
        async with open_saver(urls) as saver:
            moved = 0
            for _ in range(3):
                policy = TieringPolicy(archive_after=60, archive_idle_after=None,
                                       segment_size=3, batch=2)
                report = await HistoryDemotion(saver, policy, owner=f"worker-{seed}").run_once(
                    now=now())
                moved += report.checkpoints
            return moved

    results.put(asyncio.run(run()))


@pytest.fixture(params=sorted(MULTIPROCESS_STACKS))
def shared_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


async def test_four_workers_never_archive_twice_and_lose_nothing(shared_urls: Urls) -> None:
    urls = shared_urls
    threads = [f"mw-{i}" for i in range(8)]
    async with open_saver(urls) as saver:
        app = build_agent().compile(checkpointer=saver)
        await asyncio.gather(*(converse(app, t, 3) for t in threads))
        before = {t: await snapshot(app, t) for t in threads}
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(urls, i, results)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    moved = sum(results.get(timeout=5) for _ in procs)
    expected = sum(len(h) - 1 for h in before.values())
    assert moved == expected  # every old checkpoint moved exactly once
    async with open_saver(urls) as saver:
        app = build_agent().compile(checkpointer=saver)
        stack = saver.regions.by_name["default"]
        assert stack.cold is not None
        for t in threads:
            assert await snapshot(app, t) == before[t]
        refs = await stack.warm.archive_refs()
        keys = [k async for k in stack.cold.iter_keys(SEGMENT_PREFIX)]
        in_segments: list[str] = []
        for key in keys:
            data = await stack.cold.get(key)
            assert data is not None
            in_segments.extend(unpack_segment(data, key=key).records)
        assert sorted(refs) == sorted(keys)
        assert len(in_segments) == len(set(in_segments)) == expected



async def test_a_fork_of_archived_history_keeps_unchanged_channels(saver: TieredSaver,
                                                                  urls: Urls) -> None:
    app = build_agent().compile(checkpointer=saver)
    for text in ("remember blue", "what is 1 + 1", "remember red", "what is 2 + 2"):
        await app.ainvoke({"messages": [HumanMessage(text)]}, cfg("branchy"))
    history = [s async for s in app.aget_state_history(cfg("branchy"))]
    await HistoryDemotion(saver, HISTORY).run_once(now=now())
    # the end of turn 2: notes == ["blue"], a value no live checkpoint refers to any more
    target = next(s for s in history if s.values.get("turns") == 2 and not s.next)
    assert target.values["notes"] == ["blue"]
    fork = await app.ainvoke({"messages": [HumanMessage("what is 3 + 3")]}, target.config)
    assert fork["notes"] == ["blue"]
    async with open_saver(urls, hot_write_delay=0) as fresh:  # nothing cached
        state = await build_agent().compile(checkpointer=fresh).aget_state(cfg("branchy"))
        assert state.values["notes"] == ["blue"]
        assert state.values == fork
