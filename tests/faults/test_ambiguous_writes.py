"""A warm write whose answer is lost: it may have landed, and no cache may hide that.

When the connection drops after the warm store committed but before its answer
arrived, the caller sees ``TierUnavailable`` although the write is stored; when the
answer is only slow, a caller that gives up (a timeout, a cancel) sees the same, and
the write may even land after a reader has refilled the hot tier from warm. The
next read must return what warm holds, in either hot check mode: with
``hot_check="trusted"`` a hot copy is served without asking warm, so a failed warm
write must take the thread's hot copies (Redis and this process's) with it.

The lost answer is injected around a real store (the write is really committed,
then the call raises), on the embedded stack and on Redis + PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.base import copy_checkpoint
from langgraph.checkpoint.base.id import uuid6

from tests.servers.redis import unique_prefix, with_query
from tierstore import TieredSaver
from tierstore.demo import build_agent
from tierstore.errors import TierUnavailable
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import IdleArchival
from tierstore.tiers import open_store


class LosesAnswers:
    """A warm store that, when armed, commits a write and then loses its answer: it
    reports a dropped connection (``"reset"``) or never answers, so that the caller
    gives up (``"silent"``)."""

    def __init__(self, inner: Any, how: str) -> None:
        self._inner = inner
        self.how = how
        self.armed = False
        self.landing: list[asyncio.Future[Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def _lost(self, result: Any) -> Any:
        if not self.armed:
            return result
        if self.how == "silent":
            await asyncio.Event().wait()
        if self.how == "late":
            raise AssertionError("a late write commits in put_checkpoint, not here")
        raise TierUnavailable("connection reset after commit", tier="warm",
                              backend=self._inner.backend)

    async def put_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed and self.how == "late":  # commits after the caller gave up
            landed = asyncio.ensure_future(self._late(*args, **kwargs))
            self.landing.append(landed)
            return await asyncio.shield(landed)
        return await self._lost(await self._inner.put_checkpoint(*args, **kwargs))

    async def _late(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.5)
        return await self._inner.put_checkpoint(*args, **kwargs)

    async def put_writes(self, *args: Any, **kwargs: Any) -> Any:
        return await self._lost(await self._inner.put_writes(*args, **kwargs))


@pytest.fixture(params=["embedded", "redis+postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "embedded":
        return "memory://", f"sqlite:///{tmp_path}/warm.db"
    redis_url: str = request.getfixturevalue("redis_url")
    postgres_url: str = request.getfixturevalue("postgres_url")
    return with_query(redis_url, prefix=unique_prefix()), postgres_url


@pytest.mark.parametrize("how", ["reset", "silent", "late"])
@pytest.mark.parametrize("hot_check", ["verify", "trusted"])
async def test_a_write_that_landed_without_an_answer_is_what_the_next_read_returns(
    stores: tuple[str, str], hot_check: str, how: str,
) -> None:
    hot_url, warm_url = stores
    warm = LosesAnswers(open_store("warm", warm_url), how)
    saver = TieredSaver.from_stores(warm=warm, hot=open_store("hot", hot_url, ttl=3600),
                                    hot_check=hot_check)
    config = {"configurable": {"thread_id": f"t-{uuid.uuid4()}"}}
    async with saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember apples")]}, config)
        before = await saver.aget_tuple(config)
        assert before is not None
        warm.armed = True
        if how == "reset":
            with pytest.raises(TierUnavailable):
                await app.ainvoke({"messages": [HumanMessage("remember pears")]}, config)
        else:  # the caller gives up on a put that is stored (or about to be), unanswered
            child = copy_checkpoint(before.checkpoint)
            child["id"] = str(uuid6(clock_seq=7))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(saver.aput(before.config, child, {"step": 9}, {}), 0.2)
            if how == "late":  # a reader refills the hot tier before the write lands
                assert (await saver.aget_tuple(config)) is not None
                await asyncio.wait_for(asyncio.gather(*warm.landing), 5)
        warm.armed = False
        stored = await warm.get(config["configurable"]["thread_id"], "", None)
        assert stored is not None and stored.checkpoint_id != before.config[
            "configurable"]["checkpoint_id"], "the injected failure did not commit first"
        latest = await saver.aget_tuple(config)
        assert latest is not None
        assert latest.config["configurable"]["checkpoint_id"] == stored.checkpoint_id


class SlowInvalidation:
    """A hot store whose invalidations take a while to arrive (a busy Redis, a slow
    network): the caller that gave up on a write reads again before its invalidation
    of the thread's hot entry has landed."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.5)
        return await self._inner.invalidate(*args, **kwargs)


async def test_a_trusted_read_while_the_invalidation_is_on_its_way_reads_warm(
    stores: tuple[str, str],
) -> None:
    """A process that gave up on a write invalidates the thread's hot entry in a task of
    its own; until that lands, its reads of the thread must not trust the hot copy."""
    hot_url, warm_url = stores
    warm = LosesAnswers(open_store("warm", warm_url), "silent")
    hot = SlowInvalidation(open_store("hot", hot_url, ttl=3600))
    saver = TieredSaver.from_stores(warm=warm, hot=hot, hot_check="trusted")
    config = {"configurable": {"thread_id": f"t-{uuid.uuid4()}"}}
    async with saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember apples")]}, config)
        before = await saver.aget_tuple(config)
        assert before is not None
        warm.armed = True
        child = copy_checkpoint(before.checkpoint)
        child["id"] = str(uuid6(clock_seq=7))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(saver.aput(before.config, child, {"step": 9}, {}), 0.2)
        warm.armed = False
        latest = await saver.aget_tuple(config)
        assert latest is not None
        assert latest.config["configurable"]["checkpoint_id"] == child["id"]


class LosesClaimAnswers:
    """A warm store whose ``claim``, when armed, leases the heads and then reports a
    dropped connection, as if the answer was lost after the commit."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim(self, **query: Any) -> Any:
        claims = await self._inner.claim(**query)
        if self.armed and claims:
            raise TierUnavailable("connection reset after commit", tier="warm",
                                  backend=self._inner.backend)
        return claims


async def test_heads_leased_by_a_claim_whose_answer_was_lost_are_archived_by_the_next_run(
    stores: tuple[str, str], tmp_path: Path,
) -> None:
    hot_url, warm_url = stores
    warm = LosesClaimAnswers(open_store("warm", warm_url))
    saver = TieredSaver.from_stores(warm=warm, hot=open_store("hot", hot_url, ttl=3600),
                                    cold=open_store("cold", f"file://{tmp_path}/cold"))
    async with saver:
        app = build_agent().compile(checkpointer=saver)
        thread_id = f"t-{uuid.uuid4()}"
        config = {"configurable": {"thread_id": thread_id}}
        await app.ainvoke({"messages": [HumanMessage("remember figs")]}, config)
        policy = TieringPolicy(archive_idle_after=0, keep_latest=1, lease_seconds=3600)
        job = IdleArchival(saver, policy, thread_id=thread_id)
        warm.armed = True
        with pytest.raises(TierUnavailable):
            await job.run_once(now=time.time() + 1)
        warm.armed = False
        report = await job.run_once(now=time.time() + 1)
        assert report.threads == 1 and not report.failed, report  # not held for an hour
        state = await saver.aget_tuple(config)
        assert state is not None and "figs" in str(state.checkpoint["channel_values"])
