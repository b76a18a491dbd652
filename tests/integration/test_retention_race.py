"""Retention never takes a turn committed after it claimed the thread.

The race is made deterministic by running the app's turn inside the worker's claim
call, right after the claim is taken: the order a real worker and app can interleave.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6

from tests.stacks import STACKS, TIERED_STACKS, Urls
from tierstore import TieredSaver
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import Retention

FUTURE = 10 * 365 * 86400.0


@pytest.fixture(params=sorted(TIERED_STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


@pytest.fixture
async def saver(urls: Urls) -> AsyncIterator[TieredSaver]:
    async with urls.open(hot_write_delay=0) as s:
        yield s


def checkpoint(value: int) -> Any:
    c = empty_checkpoint()
    c["id"] = str(uuid6())
    c["channel_values"] = {"x": value}
    c["channel_versions"] = {"x": str(value)}
    return c


@pytest.mark.parametrize("strategy", ["delete", "keep_latest"])
async def test_a_turn_committed_after_the_claim_survives_retention(
    saver: TieredSaver, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    thread = f"ret-{uuid.uuid4()}"
    cfg: Any = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    first = await saver.aput(cfg, checkpoint(1), {"source": "loop", "step": 1}, {"x": "1"})
    warm = saver.regions.for_thread(thread).warm
    claim = warm.claim
    committed: list[Any] = []

    async def claim_then_turn(**kw: Any) -> Any:
        claims = await claim(**kw)
        if not committed and any(c.thread_id == thread for c in claims):
            # the user comes back right after the worker claimed the idle thread
            second = await saver.aput(first, checkpoint(2), {"source": "loop", "step": 2},
                                      {"x": "2"})
            await saver.aput_writes(second, [("x", 3)], "task-1")
            committed.append(second)
        return claims

    policy = TieringPolicy(expire_after=60, expire_strategy=strategy)  # type: ignore[arg-type]
    with monkeypatch.context() as patch:
        patch.setattr(warm, "claim", claim_then_turn)
        report = await Retention(saver, policy).run_once(time.time() + FUTURE)
    assert committed
    latest = await saver.aget_tuple(cfg)
    assert latest is not None, "retention deleted a thread with a turn newer than its claim"
    assert latest.checkpoint["channel_values"] == {"x": 2}
    assert [(w[1], w[2]) for w in latest.pending_writes or []] == [("x", 3)]
    history = [t.checkpoint["channel_values"] async for t in saver.alist(cfg)]
    assert history == [{"x": 2}, {"x": 1}]  # not pruned either
    assert report.deleted == 0 and report.changed_since_claim == 1
    # the next run sees the thread as it is now, and expires it
    report = await Retention(saver, policy).run_once(time.time() + 2 * FUTURE)
    assert report.deleted >= 1
    left = [t.checkpoint["channel_values"] async for t in saver.alist(cfg)]
    assert left == ([] if strategy == "delete" else [{"x": 2}])


async def test_a_thread_whose_namespaces_span_claim_batches_is_expired(
    saver: TieredSaver,
) -> None:
    """Claims come in batches of (thread, ns) heads: a thread is expired with all its
    idle namespaces claimed, not refused for the one the batch left out."""
    thread = f"ns-{uuid.uuid4()}"
    for ns in ("", "child:1", "child:2", "child:3"):
        cfg: Any = {"configurable": {"thread_id": thread, "checkpoint_ns": ns}}
        await saver.aput(cfg, checkpoint(1), {"source": "loop", "step": 1}, {"x": "1"})
    policy = TieringPolicy(expire_after=60, batch=1)
    report = await Retention(saver, policy).run_once(time.time() + FUTURE)
    assert report.changed_since_claim == 0 and report.failed == 0
    assert [t async for t in saver.alist({"configurable": {"thread_id": thread}})] == []
