"""Archiving never removes what a live writer still points to.

A worker in another OS process archives every idle thread and all history, in a
loop, while live turns run on threads whose latest checkpoint the app holds in its
hot tier and process copy. Each turn's checkpoint names the channel versions it did
not change (``profile`` is written once, in the first turn); if the worker dropped
their values from warm between the app's read and its write, the write must store
them again. Afterwards a fresh saver reads every checkpoint and must see exactly
what a reference run with no archiving stored.
"""

from __future__ import annotations

import asyncio
import operator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph

from tests.integration.archiver import Archiver, start_archiver
from tests.stacks import STACKS, Urls
from tierstore import TieredSaver
from tierstore.ops import verify

RACE_STACKS = ["embedded", "redis+postgres+s3"]  # a memory and a Redis hot tier
THREADS, TURNS = 6, 8


class Profile(TypedDict, total=False):
    profile: dict[str, str]
    notes: Annotated[list[str], operator.add]
    turn: int


def profile_graph() -> Any:
    def remember(state: Profile) -> dict[str, Any]:
        update: dict[str, Any] = {"turn": state.get("turn", 0) + 1}
        if "profile" not in state:
            update["profile"] = {"name": "Ada", "plan": "pro"}
        return update

    def note(state: Profile) -> dict[str, Any]:
        return {"notes": [f"turn {state['turn']}"]}

    g: StateGraph[Profile] = StateGraph(Profile)
    g.add_node("remember", remember)
    g.add_node("note", note)
    g.add_edge(START, "remember")
    g.add_edge("remember", "note")
    g.add_edge("note", END)
    return g


def thread_cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


async def live_turns(saver: TieredSaver, worker: Archiver | None = None) -> None:
    """Turns on every thread at once; with a worker, each thread lets it finish a
    pass between its turns, so the head it holds cached was archived under it."""
    app = profile_graph().compile(checkpointer=saver)

    async def run(thread: str) -> None:
        for i in range(TURNS):
            await app.ainvoke({"notes": [f"input {i}"]}, thread_cfg(thread))
            if worker is not None:
                await worker.caught_up()

    await asyncio.gather(*(run(f"race-{k}") for k in range(THREADS)))


async def everything(saver: TieredSaver, threads: int = THREADS) -> dict[str, list[Any]]:
    """Every checkpoint of every thread, newest first, as LangGraph reads it back:
    through ``list`` and through ``get_tuple`` of each id (ids themselves differ
    between runs; their order, parents' positions, values and writes may not)."""
    seen: dict[str, list[Any]] = {}
    for k in range(threads):
        thread = f"race-{k}"
        listed = [t async for t in saver.alist(thread_cfg(thread))]
        ids = [t.config["configurable"]["checkpoint_id"] for t in listed]
        rows = []
        for t in listed:
            one = await saver.aget_tuple(t.config)
            assert one is not None
            for got in (t, one):
                parent = (got.parent_config or {}).get("configurable", {}).get("checkpoint_id")
                rows.append((
                    got.metadata.get("step"), got.metadata.get("source"),
                    dict(got.checkpoint["channel_values"]),
                    None if parent is None else ids.index(parent),
                    sorted((w[1], repr(w[2])) for w in got.pending_writes or []),
                ))
        seen[thread] = rows
    return seen


@pytest.mark.parametrize("stack", RACE_STACKS)
async def test_archiving_in_another_process_never_loses_what_a_writer_names(
    stack: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    urls: Urls = STACKS[stack](request, tmp_path / "raced")
    reference: Urls = STACKS[stack](request, tmp_path / "reference")
    async with reference.open() as saver:
        await live_turns(saver)
    async with reference.open() as saver:
        expected = await everything(saver)

    async with urls.open() as saver:
        worker = await asyncio.to_thread(start_archiver, urls)
        try:
            await live_turns(saver, worker)
        finally:
            moved, _ = await asyncio.to_thread(worker.stop)
    assert moved > THREADS  # heads and history really went to cold under the turns

    async with urls.open() as fresh:
        got = await everything(fresh)
        for rows in got.values():
            for _, _, values, _, _ in rows:
                assert "profile" in values or values.get("turn") is None
        differ = {
            thread: next((i, row, want) for i, (row, want) in
                         enumerate(zip(got[thread], rows, strict=False)) if row != want)
            for thread, rows in expected.items()
            if got.get(thread) != rows and len(got.get(thread, ())) == len(rows)
        }
        assert differ == {}
        assert {t: len(r) for t, r in got.items()} == {t: len(r) for t, r in expected.items()}
        report = await verify(fresh)
        assert report["ok"], report["problems"]
