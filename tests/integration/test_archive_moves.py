"""What one archive move costs, and that moves overlap: a segment's checkpoints come from
warm in one call, a segment is read back only where the cold store keeps no checksum of
its own, and one worker moves several claimed heads at once."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint

from tests.calls import count_calls
from tests.stacks import ARCHIVING_STACKS, Urls
from tierstore import TieredSaver
from tierstore.codec.segment import SEGMENT_PREFIX
from tierstore.errors import CorruptPayload
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, IdleArchival, verify_object
from tierstore.records import ObjectInfo

FUTURE = 10 * 365 * 86400.0


@pytest.fixture(params=sorted(ARCHIVING_STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return ARCHIVING_STACKS[request.param](request, tmp_path)


async def thread(saver: TieredSaver, thread_id: str, checkpoints: int) -> None:
    config: Any = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    for step in range(checkpoints):
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"step": step, "kept": "same value all along"}
        checkpoint["channel_versions"] = {"step": str(step + 1), "kept": "1"}
        config = await saver.aput(config, checkpoint, {"step": step, "source": "loop"},
                                  {"step": str(step + 1), **({"kept": "1"} if step == 0 else {})})
        await saver.aput_writes(config, [("step", step)], f"task-{step}")


async def history(saver: TieredSaver, thread_id: str) -> list[Any]:
    config: Any = {"configurable": {"thread_id": thread_id}}
    return [(t.checkpoint["channel_values"], t.metadata["step"],
             sorted((w[1], w[2]) for w in t.pending_writes or []))
            async for t in saver.alist(config)]


async def test_a_segment_comes_from_warm_in_one_call_not_one_per_checkpoint(urls: Urls) -> None:
    async with urls.open() as saver:
        await thread(saver, "long", 30)
        before = await history(saver, "long")
        warm = saver.regions.for_thread("long").warm
        calls = count_calls(warm, ["get", "get_live", "index", "mark_archived"])
        policy = TieringPolicy(archive_after=60, archive_idle_after=None, segment_size=200)
        report = await HistoryDemotion(saver, policy).run_once(now=time.time() + FUTURE)
        assert (report.checkpoints, report.segments, report.failed) == (29, 1, 0)
        assert calls == {"get": 0, "get_live": 1, "index": 1, "mark_archived": 1}
        calls.update(dict.fromkeys(calls, 0))
        idle = TieringPolicy(archive_after=None, archive_idle_after=60, segment_size=10)
        report = await IdleArchival(saver, idle).run_once(now=time.time() + FUTURE)
        assert (report.checkpoints, report.segments, report.failed) == (1, 1, 0)
        assert calls == {"get": 0, "get_live": 1, "index": 1, "mark_archived": 1}
    async with urls.open() as fresh:
        assert await history(fresh, "long") == before


async def test_a_segment_is_read_back_only_where_the_cold_store_keeps_no_checksum(
    urls: Urls,
) -> None:
    async with urls.open() as saver:
        for k in range(3):
            await thread(saver, f"t-{k}", 5)
        region = saver.regions.for_thread("t-0")
        assert region.cold is not None
        calls = count_calls(region.cold, ["get", "info"])
        policy = TieringPolicy(archive_after=60, archive_idle_after=None, segment_size=2)
        report = await HistoryDemotion(saver, policy).run_once(now=time.time() + FUTURE)
        assert (report.checkpoints, report.segments, report.failed) == (12, 6, 0)
        assert calls["info"] == 6
        # S3 checked the digest sent with each put and reports it: nothing is read back
        assert calls["get"] == (0 if region.cold.backend == "s3" else 6)


@pytest.mark.parametrize("stack", ["embedded", "postgres+file"])
async def test_one_worker_moves_several_heads_at_once(
    stack: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The first segment's upload does not finish until a second one has started: a
    worker that moved one head after the other would wait here forever."""
    urls = ARCHIVING_STACKS[stack](request, tmp_path)
    async with urls.open() as saver:
        for k in range(4):
            await thread(saver, f"p-{k}", 3)
        region = saver.regions.for_thread("p-0")
        cold = region.cold
        assert cold is not None
        put, started, second = cold.put, [0], asyncio.Event()

        async def overlapping(key: str, data: bytes, *, storage_class: str | None = None) -> None:
            if key.startswith(SEGMENT_PREFIX):
                started[0] += 1
                if started[0] == 2:
                    second.set()
                await second.wait()
            await put(key, data, storage_class=storage_class)

        cold.put = overlapping  # type: ignore[method-assign]
        policy = TieringPolicy(archive_after=60, archive_idle_after=None, parallel_moves=2)
        async with asyncio.timeout(60):  # a guard against the hang, not a measurement
            report = await HistoryDemotion(saver, policy).run_once(now=time.time() + FUTURE)
        assert (report.threads, report.checkpoints, report.failed) == (4, 8, 0)


class _Cold:
    """An object store answering ``info`` with a given digest, counting reads."""

    def __init__(self, data: bytes, sha256: str | None) -> None:
        self.data, self.sha256, self.reads = data, sha256, 0

    async def info(self, key: str) -> ObjectInfo:
        return ObjectInfo(key=key, size=len(self.data), storage_class="STANDARD",
                          readable=True, restore_state="not-needed", sha256=self.sha256)

    async def get(self, key: str) -> bytes:
        self.reads += 1
        return self.data


async def test_a_segment_is_verified_by_the_digest_the_store_reports() -> None:
    data = b"segment bytes" * 100
    right = _Cold(data, hashlib.sha256(data).hexdigest())
    await verify_object(SimpleNamespace(cold=right), "k", data)  # type: ignore[arg-type]
    assert right.reads == 0
    wrong = _Cold(data, hashlib.sha256(b"other bytes").hexdigest())
    with pytest.raises(CorruptPayload, match="different checksum"):
        await verify_object(SimpleNamespace(cold=wrong), "k", data)  # type: ignore[arg-type]
    unknown = _Cold(data[:-1] + b"!", None)  # no digest kept: read back and compared
    with pytest.raises(CorruptPayload, match="reads back different bytes"):
        await verify_object(SimpleNamespace(cold=unknown), "k", data)  # type: ignore[arg-type]
    assert unknown.reads == 1
