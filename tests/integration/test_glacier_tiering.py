"""Archives in S3 Glacier (moto's server): refused until restored, then rehydrated."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from tests.servers.s3 import manual_restores, s3_url
from tierstore import CheckpointArchived, TieredSaver
from tierstore.demo import build_agent
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, IdleArchival, Rehydrate, request_restore

LATER = 10 * 365 * 86400.0


def cfg(thread: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"thread_id": thread}
    if checkpoint_id:
        c["checkpoint_id"] = checkpoint_id
    return {"configurable": c}


def glacier_saver(tmp_path: Path, cold: str, **options: Any) -> TieredSaver:
    return TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{tmp_path}/warm.db",
                                 cold=cold, **options)


@pytest.mark.parametrize("storage_class", ["GLACIER", "DEEP_ARCHIVE"])
async def test_glacier_archive_needs_a_restore(tmp_path: Path, moto_endpoint: str,
                                               storage_class: str) -> None:
    cold = s3_url(moto_endpoint, storage_class=storage_class)
    async with glacier_saver(tmp_path, cold) as saver:
        app = build_agent().compile(checkpointer=saver)
        for text in ("remember gold", "what is 1 + 2", "what is 3 + 4"):
            await app.ainvoke({"messages": [HumanMessage(text)]}, cfg("g"))
        history = [s async for s in app.aget_state_history(cfg("g"))]
        report = await HistoryDemotion(
            saver, TieringPolicy(archive_after=60, archive_idle_after=None)
        ).run_once(now=time.time() + LATER)
        assert report.checkpoints == len(history) - 1 and report.errors == []
        # the latest state is still warm and instantly readable
        assert (await app.aget_state(cfg("g"))).values == history[0].values
        old_id = history[-2].config["configurable"]["checkpoint_id"]
        with pytest.raises(CheckpointArchived) as info:
            await saver.aget_tuple(cfg("g", old_id))
        assert info.value.restore_state == "not-started"
        assert info.value.storage_class == storage_class
        assert info.value.checkpoint_id == old_id


async def test_on_archived_restore_then_worker_rehydrates(tmp_path: Path,
                                                          moto_endpoint: str) -> None:
    cold = s3_url(moto_endpoint, storage_class="GLACIER")
    async with glacier_saver(tmp_path, cold, on_archived="restore") as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember silver")]}, cfg("idle"))
        before = [s.values async for s in app.aget_state_history(cfg("idle"))]
        await IdleArchival(saver, TieringPolicy(archive_after=None, archive_idle_after=60)
                           ).run_once(now=time.time() + LATER)
        with manual_restores(moto_endpoint, times=3):
            with pytest.raises(CheckpointArchived) as info:
                await app.ainvoke({"messages": [HumanMessage("what do you remember")]},
                                  cfg("idle"))
            assert info.value.restore_state == "in-progress"
            states = await request_restore(saver, "idle")
            assert set(states.values()) <= {"in-progress", "ready"}
            report = await Rehydrate(saver).run_once()
            assert report.checkpoints == 0  # still in progress: nothing rehydrated yet
            for _ in range(10):
                report = await Rehydrate(saver).run_once()
                if report.checkpoints:
                    break
            assert report.checkpoints == len(before)
        out = await app.ainvoke({"messages": [HumanMessage("what do you remember")]}, cfg("idle"))
        assert out["messages"][-1].content == "I remember: silver."
        after = [s.values async for s in app.aget_state_history(cfg("idle"))]
        assert after[-len(before):] == before


def record_restores(saver: TieredSaver, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The RestoreRequest of every S3 restore the saver's cold store sends from now on."""
    store: Any = saver.regions.by_name["default"].cold
    requests: list[dict[str, Any]] = []
    real_restore = store._client.restore_object

    async def recording_restore(**kwargs: Any) -> Any:
        requests.append(kwargs["RestoreRequest"])
        return await real_restore(**kwargs)

    monkeypatch.setattr(store._client, "restore_object", recording_restore)
    return requests


async def test_a_restore_on_read_lasts_the_urls_restore_days(
        tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cold = s3_url(moto_endpoint, storage_class="GLACIER", restore_days="3")
    async with glacier_saver(tmp_path, cold, on_archived="restore") as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember copper")]}, cfg("days"))
        await IdleArchival(saver, TieringPolicy(archive_after=None, archive_idle_after=60)
                           ).run_once(now=time.time() + LATER)
        requests = record_restores(saver, monkeypatch)
        with manual_restores(moto_endpoint, times=3), \
                pytest.raises(CheckpointArchived) as info:
            await saver.aget_tuple(cfg("days"))
        assert info.value.restore_state == "in-progress"
        assert [r["Days"] for r in requests] == [3]


async def test_an_operator_restore_lasts_the_urls_restore_days(
        tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tierstore restore` without --days keeps the cold URL's restore_days too."""
    cold = s3_url(moto_endpoint, storage_class="GLACIER", restore_days="3")
    async with glacier_saver(tmp_path, cold) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember tin")]}, cfg("ops-days"))
        await app.ainvoke({"messages": [HumanMessage("remember zinc")]}, cfg("ops-days-9"))
        await IdleArchival(saver, TieringPolicy(archive_after=None, archive_idle_after=60)
                           ).run_once(now=time.time() + LATER)
        requests = record_restores(saver, monkeypatch)
        states = await request_restore(saver, "ops-days")
        assert states and [r["Days"] for r in requests] == [3] * len(states)
        requests.clear()
        await request_restore(saver, "ops-days-9", days=9)  # --days still wins
        assert requests and {r["Days"] for r in requests} == {9}


async def test_glacier_ir_archives_read_transparently(tmp_path: Path,
                                                      moto_endpoint: str) -> None:
    cold = s3_url(moto_endpoint, storage_class="GLACIER_IR")
    async with glacier_saver(tmp_path, cold) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember bronze")]}, cfg("ir"))
        before = [s.values async for s in app.aget_state_history(cfg("ir"))]
        await IdleArchival(saver, TieringPolicy(archive_after=None, archive_idle_after=60)
                           ).run_once(now=time.time() + LATER)
    async with glacier_saver(tmp_path, cold) as saver:
        app = build_agent().compile(checkpointer=saver)
        assert [s.values async for s in app.aget_state_history(cfg("ir"))] == before
        out = await app.ainvoke({"messages": [HumanMessage("what do you remember")]}, cfg("ir"))
        assert out["messages"][-1].content == "I remember: bronze."
