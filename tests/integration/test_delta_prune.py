"""``prune(keep_latest)`` never severs a ``DeltaChannel``'s chain.

A delta channel's value at the latest checkpoint is rebuilt from its ancestors'
writes back to the last snapshot; keeping only the latest checkpoint would make it
read as empty, with no error (LangGraph's ``prune`` docstring warns every saver).
So a thread whose graph uses a DeltaChannel is refused (the whole call, before
anything is deleted), and retention with ``expire_strategy="keep_latest"`` leaves it
as it is.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.channels.delta import DeltaChannel
from langgraph.graph import END, START, StateGraph

from tests.integration.test_delta_channel import Sparse, extend
from tests.stacks import STACKS, Urls
from tierstore import PruneRefused, TieredSaver
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import Retention

FUTURE = 10 * 365 * 86400.0


class Dense(TypedDict):
    items: Annotated[list[str], DeltaChannel(extend, snapshot_frequency=1)]
    n: int


class Plain(TypedDict):
    items: list[str]
    n: int


def graph(schema: type, steps: int) -> Any:
    g = StateGraph(schema)
    g.add_node("step", lambda s: {"items": [*([] if schema is not Plain else s["items"]),
                                            f"s{s['n']}"], "n": s["n"] + 1})
    g.add_edge(START, "step")
    g.add_conditional_edges("step", lambda s: END if s["n"] >= steps else "step")
    return g


def cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


@pytest.fixture(params=sorted(STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


@pytest.fixture
async def saver(urls: Urls) -> AsyncIterator[TieredSaver]:
    async with urls.open() as s:
        yield s


async def run(saver: TieredSaver, schema: type, thread: str, steps: int = 6) -> Any:
    app = graph(schema, steps).compile(checkpointer=saver)
    await app.ainvoke({"items": [], "n": 0}, cfg(thread))
    return app


async def count(saver: TieredSaver, thread: str) -> int:
    return len([t async for t in saver.alist(cfg(thread))])


async def test_keep_latest_refuses_a_thread_whose_head_needs_ancestors(
        saver: TieredSaver) -> None:
    sparse = await run(saver, Sparse, "sparse")
    plain = await run(saver, Plain, "plain")
    expected = (await sparse.aget_state(cfg("sparse"))).values
    assert expected["items"] == [f"s{i}" for i in range(6)]
    before = {t: await count(saver, t) for t in ("sparse", "plain")}
    with pytest.raises(PruneRefused) as refused:
        await saver.aprune(["plain", "sparse"], strategy="keep_latest")
    assert isinstance(refused.value, NotImplementedError)  # as LangGraph's savers raise
    assert "sparse" in str(refused.value) and "plain" not in str(refused.value)
    # refused whole, before anything was deleted
    assert {t: await count(saver, t) for t in before} == before
    assert (await sparse.aget_state(cfg("sparse"))).values == expected
    await saver.aprune(["plain"], strategy="keep_latest")
    assert await count(saver, "plain") == 1
    assert (await plain.aget_state(cfg("plain"))).values["items"] == [f"s{i}" for i in range(6)]
    await saver.aprune(["sparse"], strategy="delete")  # deleting all of it is always fine
    assert await count(saver, "sparse") == 0
    await run(saver, Sparse, "sparse-2")
    await saver.aprune(["sparse-2"], strategy="delete_all")  # the Agent Server's name for it
    assert await count(saver, "sparse-2") == 0


async def test_keep_latest_refuses_a_delta_thread_even_at_a_snapshot(saver: TieredSaver) -> None:
    """Its latest checkpoint needs no ancestor now, but a turn committed between the
    check and the prune could make one that does: every DeltaChannel thread is refused."""
    dense = await run(saver, Dense, "dense")
    expected = (await dense.aget_state(cfg("dense"))).values
    before = await count(saver, "dense")
    with pytest.raises(PruneRefused):
        await saver.aprune(["dense"], strategy="keep_latest")
    assert await count(saver, "dense") == before
    assert (await dense.aget_state(cfg("dense"))).values == expected


async def test_retention_keep_latest_leaves_a_delta_thread_whole(saver: TieredSaver) -> None:
    sparse = await run(saver, Sparse, "sparse-idle")
    await run(saver, Plain, "plain-idle")
    expected = (await sparse.aget_state(cfg("sparse-idle"))).values
    before = await count(saver, "sparse-idle")
    policy = TieringPolicy(archive_after=None, archive_idle_after=None, expire_after=60,
                           expire_strategy="keep_latest")
    report = await Retention(saver, policy).run_once(time.time() + FUTURE)
    assert report.delta_protected == 1 and report.failed == 0
    assert await count(saver, "sparse-idle") == before
    assert (await sparse.aget_state(cfg("sparse-idle"))).values == expected
    assert await count(saver, "plain-idle") == 1
