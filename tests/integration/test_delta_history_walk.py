"""``aget_delta_channel_history`` where the parent chain is not a plain line: branches
written in between, a parent missing, a parent stored after its child, a chain that
loops. Built with ``aput``/``aput_writes`` as LangGraph calls them, on every stack.

LangGraph's own walk (``BaseCheckpointSaver.aget_delta_channel_history``, a ``get_tuple``
per ancestor) is the reference wherever it ends; a chain that loops it would walk
forever, and there the walk ends at the first checkpoint it comes back to.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.base.id import uuid6

from tests.stacks import STACKS, Urls
from tierstore import TieredSaver


@pytest.fixture(params=sorted(STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


@pytest.fixture
async def saver(urls: Urls) -> AsyncIterator[TieredSaver]:
    async with urls.open() as s:
        yield s


def new_id() -> str:
    return str(uuid6())


def cfg(thread: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    configurable: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ""}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


async def put(saver: TieredSaver, thread: str, checkpoint_id: str, parent: str | None, *,
              snapshot: str | None = None) -> str:
    """A checkpoint whose ``items`` channel has a new version, stored as a value only
    when ``snapshot`` is given, with one write to ``items`` (and one elsewhere)."""
    checkpoint: dict[str, Any] = dict(empty_checkpoint())
    checkpoint["id"] = checkpoint_id
    version = f"{checkpoint_id}.v"
    checkpoint["channel_versions"] = {"items": version}
    checkpoint["channel_values"] = {} if snapshot is None else {"items": snapshot}
    await saver.aput(cfg(thread, parent), checkpoint,  # type: ignore[arg-type]
                     {"source": "loop", "step": 0, "parents": {}}, {"items": version})
    await saver.aput_writes(cfg(thread, checkpoint_id),
                            [("items", f"w-{checkpoint_id}"), ("other", "x")], task_id="task")
    return checkpoint_id


async def history(saver: TieredSaver, thread: str, checkpoint_id: str) -> Any:
    return await asyncio.wait_for(saver.aget_delta_channel_history(
        config=cfg(thread, checkpoint_id), channels=["items"]), timeout=30)


async def base_history(saver: TieredSaver, thread: str, checkpoint_id: str) -> Any:
    return await BaseCheckpointSaver.aget_delta_channel_history(
        saver, config=cfg(thread, checkpoint_id), channels=["items"])


async def test_a_branch_written_in_between_is_not_walked(saver: TieredSaver) -> None:
    t = "branches"
    a = await put(saver, t, new_id(), None, snapshot="seed")
    b = await put(saver, t, new_id(), a)
    # another branch off b, written before the start; its snapshot must not seed the walk
    c = await put(saver, t, new_id(), b)
    await put(saver, t, new_id(), c, snapshot="wrong")
    start = await put(saver, t, new_id(), b)
    fast = await history(saver, t, start)
    assert fast == await base_history(saver, t, start)
    # the seed's own writes count: they were made after its value was stored
    assert fast["items"] == {"seed": "seed", "writes": [("task", "items", f"w-{a}"),
                                                        ("task", "items", f"w-{b}")]}


async def test_a_parent_not_stored_ends_the_walk(saver: TieredSaver) -> None:
    t = "missing"
    a = await put(saver, t, new_id(), None, snapshot="seed")
    await put(saver, t, new_id(), a)
    gone = new_id()  # an older checkpoint id that nothing stored
    d = await put(saver, t, new_id(), gone)
    start = await put(saver, t, new_id(), d)
    fast = await history(saver, t, start)
    assert fast == await base_history(saver, t, start)
    assert fast["items"] == {"writes": [("task", "items", f"w-{d}")]}


async def test_a_parent_whose_id_sorts_above_its_child_is_followed(
        saver: TieredSaver) -> None:
    """Ids are time-ordered only within one writer: a writer whose clock runs behind
    stores a child whose id sorts below its parent's."""
    t = "late-parent"
    low, high = new_id(), new_id()
    a = await put(saver, t, new_id(), None, snapshot="seed")
    parent = await put(saver, t, high, a)
    child = await put(saver, t, low, parent)
    start = await put(saver, t, new_id(), child)
    fast = await history(saver, t, start)
    assert fast == await base_history(saver, t, start)
    assert [w[2] for w in fast["items"]["writes"]] == [f"w-{x}" for x in (a, parent, child)]
    assert fast["items"]["seed"] == "seed"


async def test_a_chain_that_loops_ends_where_it_comes_back(saver: TieredSaver) -> None:
    """Storing a checkpoint again under one of its descendants makes the chain a loop;
    LangGraph's own walk would go round forever."""
    t = "loop"
    a, b = new_id(), new_id()
    await put(saver, t, a, None)
    await put(saver, t, b, a)
    await put(saver, t, a, b)  # a again, now a child of b
    start = await put(saver, t, new_id(), b)
    fast = await history(saver, t, start)
    assert fast["items"] == {"writes": [("task", "items", f"w-{a}"),
                                        ("task", "items", f"w-{b}")]}

