"""Per-thread leases through LangGraph: runs serialised, an expired holder fenced out."""

from __future__ import annotations

import asyncio
import contextvars
import multiprocessing
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_concurrency import ask, cfg, single_chain
from tests.stacks import MULTIPROCESS_STACKS, STACKS, Urls
from tierstore import ConfigurationError, LeaseBusy, LeaseLost, LifecycleError, TieredSaver
from tierstore.demo import build_agent
from tierstore.lease import ThreadLease, current_fence
from tierstore.tiers import open_store

LEASE_STACKS = sorted(name for name in STACKS if name != "postgres")  # those with a hot tier


@pytest.fixture(params=LEASE_STACKS)
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


def token_here(saver: TieredSaver, thread: str) -> int | None:
    """The lease token the current context carries for ``thread`` in this saver's store."""
    return current_fence(saver.regions.for_thread(thread).warm, thread)


async def notes_of(app: Any, thread: str) -> list[str]:
    return list((await app.aget_state(cfg(thread))).values["notes"])


async def test_leased_runs_are_serialised(urls: Urls) -> None:
    async with urls.open() as saver:
        app = build_agent().compile(checkpointer=saver)

        async def turn(i: int) -> None:
            async with saver.lease("leased", wait=60):
                await app.ainvoke(ask(f"remember item {i}"), cfg("leased"))

        await asyncio.gather(*(turn(i) for i in range(20)))
        notes = await notes_of(app, "leased")
        assert sorted(notes) == sorted(f"item {i}" for i in range(20))  # each exactly once
        assert saver.stats.conflicts == 0
        assert await single_chain(saver, "leased")


async def test_an_expired_holder_is_fenced_out(urls: Urls) -> None:
    async with urls.open() as saver:
        app = build_agent().compile(checkpointer=saver)
        stack = saver.regions.for_thread("fenced")
        held: list[ThreadLease] = []
        first_turn_done, taken_over = asyncio.Event(), asyncio.Event()

        async def first_holder() -> None:
            async with saver.lease("fenced", ttl=5) as lease:
                held.append(lease)
                await app.ainvoke(ask("remember alpha"), cfg("fenced"))
                first_turn_done.set()
                await taken_over.wait()  # paused past its lease, e.g. a long GC pause
                with pytest.raises(LeaseLost) as info:
                    await app.ainvoke(ask("remember stale"), cfg("fenced"))
                assert info.value.token == lease.token
                assert info.value.fence > info.value.token

        task = asyncio.create_task(first_holder())
        await first_turn_done.wait()
        assert token_here(saver, "fenced") is None  # the lease token lives in its holder's context
        # the lock vanishes (it expired, or a Redis failover lost it) and a second holder comes
        assert stack.hot is not None
        await stack.hot.release_lease("fenced", held[0].owner)  # type: ignore[attr-defined]
        async with saver.lease("fenced", wait=5) as second:
            assert second.token is not None and held[0].token is not None
            assert second.token > held[0].token
            await app.ainvoke(ask("remember beta"), cfg("fenced"))
        taken_over.set()
        await task
        assert await notes_of(app, "fenced") == ["alpha", "beta"]
        assert await single_chain(saver, "fenced")


def test_an_expired_sync_holder_is_fenced_out(urls: Urls) -> None:
    """The same through the sync API: the block's token reaches the saver's own loop."""
    with urls.open() as saver:
        app = build_agent().compile(checkpointer=saver)
        stack = saver.regions.for_thread("sync-fenced")
        assert stack.hot is not None
        with saver.lease("sync-fenced", ttl=5) as first:
            app.invoke(ask("remember alpha"), cfg("sync-fenced"))
            # the lock vanishes (it expired, or a failover lost it); another holder comes
            saver._bridge.run(stack.hot.release_lease(  # type: ignore[attr-defined]
                "sync-fenced", first.owner))
            took: list[int | None] = []

            def second_holder() -> None:
                with saver.lease("sync-fenced", wait=5) as second:
                    took.append(second.token)
                    app.invoke(ask("remember beta"), cfg("sync-fenced"))

            other = threading.Thread(target=second_holder)
            other.start()
            other.join()
            assert took and took[0] is not None and first.token is not None
            assert took[0] > first.token
            with pytest.raises(LeaseLost) as info:
                app.invoke(ask("remember stale"), cfg("sync-fenced"))
            assert info.value.token == first.token
            # work handed to a thread of the holder's own, in a copy of its context
            refused: list[BaseException] = []

            def stale_worker() -> None:
                try:
                    app.invoke(ask("remember stale from a worker"), cfg("sync-fenced"))
                except LeaseLost as exc:
                    refused.append(exc)

            worker = threading.Thread(target=contextvars.copy_context().run,
                                      args=(stale_worker,))
            worker.start()
            worker.join()
            assert len(refused) == 1 and getattr(refused[0], "token", None) == first.token
        assert app.get_state(cfg("sync-fenced")).values["notes"] == ["alpha", "beta"]


async def test_a_held_lease_makes_others_wait_then_give_up(urls: Urls) -> None:
    async with urls.open() as saver:
        async with saver.lease("busy", ttl=5):
            with pytest.raises(LeaseBusy) as info:
                async with saver.lease("busy", wait=0.2):
                    pass
            assert info.value.thread_id == "busy"
            async with saver.lease("other-thread", wait=0):
                pass
        async with saver.lease("busy", wait=0):  # released on exit
            pass


async def test_a_lease_is_entered_once_and_only_on_an_open_saver(urls: Urls) -> None:
    async with urls.open() as saver:
        lease = saver.lease("once")
        async with lease:
            assert token_here(saver, "once") == lease.token
        assert token_here(saver, "once") is None
        with pytest.raises(LifecycleError):
            async with lease:
                pass
        with pytest.raises(ConfigurationError):
            saver.lease("x", ttl=0)
    with pytest.raises(LifecycleError):
        async with saver.lease("closed"):
            pass


async def test_leases_need_a_hot_tier(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    async with STACKS["postgres"](request, tmp_path).open() as saver:
        with pytest.raises(ConfigurationError, match="hot tier"):
            saver.lease("t")


def test_sync_leases_from_many_threads(urls: Urls) -> None:
    with urls.open() as saver:
        app = build_agent().compile(checkpointer=saver)
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                for i in range(4):
                    with saver.lease("sync-leased", wait=60) as lease:
                        assert token_here(saver, "sync-leased") == lease.token
                        app.invoke(ask(f"remember item k{k} i{i}"), cfg("sync-leased"))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        notes = app.get_state(cfg("sync-leased")).values["notes"]
        assert sorted(notes) == sorted(f"item k{k} i{i}" for k in range(3) for i in range(4))
        assert saver.stats.conflicts == 0


def _leased_turns(urls: Urls, worker: int, turns: int) -> None:
    async def run() -> None:
        async with urls.open() as saver:
            app = build_agent().compile(checkpointer=saver)
            for i in range(turns):
                async with saver.lease("across-processes", wait=120):
                    await app.ainvoke(ask(f"remember item k{worker} i{i}"),
                                      cfg("across-processes"))

    asyncio.run(run())


@pytest.fixture(params=sorted(s for s in MULTIPROCESS_STACKS if s != "embedded"))
def shared_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


async def test_leases_serialise_runs_across_processes(shared_urls: Urls) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_leased_turns, args=(shared_urls, k, 5)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        await asyncio.to_thread(p.join, 180)
        assert p.exitcode == 0
    saver: TieredSaver
    async with shared_urls.open() as saver:
        app = build_agent().compile(checkpointer=saver)
        notes = await notes_of(app, "across-processes")
        assert sorted(notes) == sorted(f"item k{k} i{i}" for k in range(4) for i in range(5))
        assert await single_chain(saver, "across-processes")


async def test_a_holder_learns_when_its_lock_is_gone(urls: Urls) -> None:
    async with urls.open() as saver:
        stack = saver.regions.for_thread("renewed")
        hot: Any = stack.hot
        async with saver.lease("renewed", ttl=0.6) as lease:
            await asyncio.sleep(1.0)  # longer than the TTL: renewals keep it
            assert not lease.lost
            assert not await hot.acquire_lease("renewed", "intruder", 5)
            assert await hot.release_lease("renewed", lease.owner)  # the lock vanishes
            assert await hot.acquire_lease("renewed", "intruder", 5)
            await asyncio.sleep(0.5)
            assert lease.lost
        assert await hot.release_lease("renewed", "intruder")  # exit left the intruder's lock


async def test_leaving_a_lease_never_hides_the_blocks_own_error(urls: Urls) -> None:
    saver = urls.open()
    await saver.__aenter__()

    async def close_the_saver_then_fail() -> None:
        async with saver.lease("closing", ttl=0.3):
            await saver.__aexit__(None, None, None)
            await asyncio.sleep(0.3)  # a renewal meets the closed store
            raise KeyError("the block's own error")

    with pytest.raises(KeyError, match="the block's own error"):
        await close_the_saver_then_fail()


async def test_a_lease_left_in_another_task_is_still_released(urls: Urls) -> None:
    async with urls.open() as saver:
        lease = saver.lease("handover", ttl=30)
        await lease.__aenter__()  # e.g. an async fixture or a shared exit stack
        await asyncio.create_task(lease.__aexit__(None, None, None))
        async with saver.lease("handover", wait=0):
            pass


async def test_a_token_fences_only_its_own_store(tmp_path: Path) -> None:
    a = TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{tmp_path}/a.db", cold=None)
    b = TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{tmp_path}/b.db", cold=None)
    async with a, b:
        for _ in range(5):  # b's fence for the thread is now 5
            async with b.lease("same"):
                pass
        app_b = build_agent().compile(checkpointer=b)
        async with a.lease("same") as lease:  # token 1 in a's store
            assert lease.token == 1
            await app_b.ainvoke(ask("remember copied"), cfg("same"))  # b is not fenced by it
        assert await notes_of(app_b, "same") == ["copied"]


class LosesCancels:
    """A lease store whose renewals lose the cancel that arrives while they are on the
    wire, as ``asyncio.wait_for`` does on Python 3.11 when its operation completes as
    the cancel arrives (redis-py wraps socket writes in it)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.renewing = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def renew_lease(self, *args: Any, **kwargs: Any) -> Any:
        self.renewing.set()
        with suppress(asyncio.CancelledError):  # lost
            await asyncio.sleep(0.2)
        return await self._inner.renew_lease(*args, **kwargs)


async def test_leaving_a_lease_ends_even_when_its_renewal_loses_the_cancel(
    tmp_path: Path,
) -> None:
    hot = LosesCancels(open_store("hot", "memory://", ttl=3600))
    saver = TieredSaver.from_stores(warm=open_store("warm", f"sqlite:///{tmp_path}/w.db"),
                                    hot=hot)
    async with saver:
        lease = saver.lease("renewing", ttl=3)  # renewed every second
        await lease.__aenter__()
        await asyncio.wait_for(hot.renewing.wait(), 5)
        await asyncio.wait_for(lease.__aexit__(None, None, None), 5)  # hung forever before
        async with saver.lease("renewing", wait=0):
            pass
