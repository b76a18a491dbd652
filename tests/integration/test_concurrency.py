"""Optimistic locking under real races, on every stack."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from tests.integration.stacks import STACKS, Urls
from tierstore import ConfigurationError, TieredSaver, VersionConflict
from tierstore.concurrency import retry_on_conflict
from tierstore.demo import build_agent


@pytest.fixture(params=sorted(STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


def open_saver(urls: Urls, **options: Any) -> TieredSaver:
    return urls.open(**options)


def ask(text: str) -> dict[str, Any]:
    return {"messages": [HumanMessage(text)]}


def cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


async def single_chain(saver: TieredSaver, thread: str) -> bool:
    """True when no checkpoint of the thread has two children (no silent fork)."""
    parents = Counter([
        t.parent_config["configurable"]["checkpoint_id"]
        async for t in saver.alist(cfg(thread)) if t.parent_config is not None
    ])
    return all(n == 1 for n in parents.values())


async def test_strict_race_with_retry_keeps_every_input(urls: Urls) -> None:
    async with open_saver(urls, concurrency="strict") as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke(ask("hello"), cfg("race"))
        await asyncio.gather(*(retry_on_conflict(app.ainvoke, ask(f"remember item {i}"),
                                                 cfg("race")) for i in range(20)))
        notes = (await app.aget_state(cfg("race"))).values["notes"]
        # every input made it; a turn cut off mid-way by another writer keeps the steps
        # it had stored, so its retry may record the same note a second time
        assert set(notes) == {f"item {i}" for i in range(20)}
        assert await single_chain(saver, "race")


async def test_strict_race_without_retry_refuses_the_losers(urls: Urls) -> None:
    async with open_saver(urls, concurrency="strict") as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke(ask("hello"), cfg("losers"))
        results = await asyncio.gather(
            *(app.ainvoke(ask(f"remember item {i}"), cfg("losers")) for i in range(10)),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, dict)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert len(winners) >= 1 and len(winners) + len(losers) == 10
        assert all(isinstance(e, VersionConflict) for e in losers)
        assert all(e.thread_id == "losers" and e.head_id for e in losers)  # type: ignore[attr-defined]
        notes = (await app.aget_state(cfg("losers"))).values["notes"]
        assert len(notes) == len(winners)  # a refused turn left nothing behind
        assert await single_chain(saver, "losers")


async def test_permissive_race_is_counted_as_conflicts(urls: Urls) -> None:
    async with open_saver(urls) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke(ask("hello"), cfg("perm"))
        results = await asyncio.gather(
            *(app.ainvoke(ask(f"remember item {i}"), cfg("perm")) for i in range(10)))
        assert len(results) == 10  # LangGraph semantics: nobody is refused
        assert saver.stats.conflicts >= 1
        assert not await single_chain(saver, "perm")  # the history forked, and we said so


async def test_strict_mode_allows_explicit_forks(urls: Urls) -> None:
    async with open_saver(urls, concurrency="strict") as saver:
        app = build_agent().compile(checkpointer=saver)
        for text in ("what is 1 + 1", "remember blue", "what is 2 + 2"):
            await app.ainvoke(ask(text), cfg("fork"))
        history = [s async for s in app.aget_state_history(cfg("fork"))]
        first = next(s for s in reversed(history) if s.values.get("turns") == 1 and not s.next)
        forked = await app.ainvoke(ask("what do you remember"), first.config)  # time travel
        assert forked["messages"][-1].content == "I remember: nothing yet."
        updated = await app.aupdate_state(history[3].config, {"notes": ["edited"]})
        assert updated["configurable"]["checkpoint_id"]
        with pytest.raises(ConfigurationError):
            await retry_on_conflict(app.ainvoke, ask("x"), first.config)
