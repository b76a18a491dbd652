"""The PostgreSQL warm tier under load while the server is restarted or its sessions killed.

Twelve conversations of the load test's chat agent run turns over one
``TieredSaver`` (Redis hot, a private PostgreSQL cluster warm, reached through a
fault-injecting TCP proxy) while, three times each, the server is stopped and
started (a clean shutdown, and a crash: ``-m immediate``), every tierstore
backend is killed with ``pg_terminate_backend``, the network resets every
connection (a failover), refuses new ones for a while (a partition), or stops
carrying bytes for longer than ``command_timeout`` (a black hole). For every kind
of fault:

- every failure a caller sees is ``TierUnavailable`` (never a driver error such
  as asyncpg's ``InternalClientError``: a connection is never reused while an
  earlier operation still owns it);
- traffic flows again after each fault by itself (turns are acknowledged again);
- afterwards every conversation takes a turn at the first attempt;
- every acknowledged turn is in the system of record, and nothing that was never
  sent: the ledger reads each thread back through the saver and through a new
  saver with no hot tier.

The same holds with two replicas of the app (two savers, two pools) and an
archiving worker moving their threads to cold under them while the server
restarts: the worker's runs fail only with ``TierUnavailable`` too, and it goes on.

Nothing asserts on durations; every wait is bounded by ``DEADLINE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from loadtest.workload import build_chat_agent
from tests.faults.conversations import Conversations, until, untranslated
from tests.servers.postgres import PrivateCluster
from tests.servers.proxy import TcpProxy
from tests.servers.redis import unique_prefix, with_query
from tierstore import TieredSaver
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, IdleArchival

DEADLINE = 90.0
USERS = 12
FAULTS = 3
COMMAND_TIMEOUT = 3.0
WARM_OPTIONS = f"command_timeout={COMMAND_TIMEOUT:g}&connect_timeout=3&max_size=6"

Fault = Callable[[PrivateCluster, TcpProxy], Awaitable[None]]


async def restart(cluster: PrivateCluster, mode: str) -> None:
    await asyncio.to_thread(cluster.stop, mode)
    await asyncio.to_thread(cluster.start)


async def clean_restart(cluster: PrivateCluster, _: TcpProxy) -> None:
    await restart(cluster, "fast")


async def crash_restart(cluster: PrivateCluster, _: TcpProxy) -> None:
    await restart(cluster, "immediate")


async def failover_reset(_: PrivateCluster, proxy: TcpProxy) -> None:
    assert proxy.cut() > 0, "no connection was open: the fault met no traffic"


async def partition(_: PrivateCluster, proxy: TcpProxy) -> None:
    proxy.refuse()
    proxy.cut()
    await asyncio.sleep(1.0)
    proxy.accept()


async def black_hole(_: PrivateCluster, proxy: TcpProxy) -> None:
    proxy.stall()
    await asyncio.sleep(COMMAND_TIMEOUT + 1.0)  # statements time out; cancels cannot get through
    proxy.resume()


async def terminate_sessions(cluster: PrivateCluster, _: TcpProxy) -> None:
    conn = await asyncpg.connect(cluster.url, timeout=5)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'tierstore' AND pid <> pg_backend_pid()")
    finally:
        await conn.close()
    assert killed > 0, "the saver had no session to kill: the fault did not happen"


def chat(saver: TieredSaver, users: int, tag: str, *, pause: float = 0.005) -> Conversations:
    """``users`` conversations over ``saver``, each reading its latest state after a turn."""
    app = build_chat_agent(200).compile(checkpointer=saver)
    return Conversations(app, [f"{tag}-u{n}" for n in range(users)], message_bytes=200,
                         pause=pause, reader=saver)


@pytest.fixture
async def proxy(postgres_cluster: PrivateCluster) -> AsyncIterator[TcpProxy]:
    async with TcpProxy("127.0.0.1", postgres_cluster.port) as relay:
        yield relay


@pytest.fixture
async def saver(proxy: TcpProxy, redis_url: str) -> AsyncIterator[TieredSaver]:
    hot = with_query(redis_url, prefix=unique_prefix())
    warm = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres?{WARM_OPTIONS}"
    async with TieredSaver.from_urls(hot=hot, warm=warm, cold=None) as opened:
        yield opened


@pytest.mark.parametrize(
    "fault", [clean_restart, crash_restart, terminate_sessions, failover_reset, partition,
              black_hole],
    ids=["restart", "crash-restart", "terminate-backends", "failover-reset", "partition",
         "black-hole"])
async def test_turns_survive_the_fault_with_only_typed_failures(
    fault: Fault, postgres_cluster: PrivateCluster, proxy: TcpProxy, saver: TieredSaver,
) -> None:
    load = chat(saver, USERS, f"pg-{uuid.uuid4().hex[:8]}")
    load.start()
    try:
        await until(lambda: load.total() >= 2 * USERS, "turns acknowledged before the fault")
        for _ in range(FAULTS):
            await fault(postgres_cluster, proxy)
            before = load.total()
            await until(lambda: load.total() >= before + USERS,  # noqa: B023
                        "turns acknowledged again, with nobody's help")
    finally:
        await load.finish()

    wrong = untranslated(load.errors)
    assert not wrong, f"{len(wrong)} untyped failures, first: {wrong[0]}"
    for thread_id in load.threads:
        assert await asyncio.wait_for(load.turn(thread_id), DEADLINE), (
            f"{thread_id}: a turn after recovery failed: {load.errors[-1]!r}")

    verdict = await asyncio.wait_for(load.ledger.verify(saver), DEADLINE)
    assert verdict.ok, verdict.summary()
    assert verdict.acked == load.total()
    async with TieredSaver.from_urls(hot=None, warm=postgres_cluster.url, cold=None) as fresh:
        again = await asyncio.wait_for(load.ledger.verify(fresh), DEADLINE)
    assert again.ok, again.summary()


EVERYTHING = TieringPolicy(archive_after=0, archive_idle_after=0, keep_latest=1, segment_size=64)


async def archive_until(stop: asyncio.Event, saver: TieredSaver, failures: Counter[str],
                        progress: Counter[str]) -> None:
    """Both archiving jobs, pass after pass, as a worker beside the app; failures counted.

    Stopped between runs, so that no run is cut short holding its claims.
    """
    jobs = (HistoryDemotion(saver, EVERYTHING), IdleArchival(saver, EVERYTHING))
    while not stop.is_set():
        for job in jobs:
            try:
                report = await job.run_once(now=time.time() + 1)
            except Exception as exc:  # a worker's run may fail during the fault, not stop
                failures[type(exc).__name__] += 1
            else:
                failures.update(report.error_types)
                progress["runs"] += 1
                progress["moved"] += report.checkpoints
        await asyncio.sleep(0.01)


async def test_two_replicas_and_an_archiving_worker_ride_out_a_restart(
    postgres_cluster: PrivateCluster, redis_url: str, tmp_path: Path,
) -> None:
    schema = f"replicas_{uuid.uuid4().hex[:8]}"  # the worker sees this test's threads only
    urls = {"hot": with_query(redis_url, prefix=unique_prefix()),
            "warm": f"{postgres_cluster.url}?{WARM_OPTIONS}&schema={schema}",
            "cold": f"file://{tmp_path}/cold"}
    async with contextlib.AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(TieredSaver.from_urls(**urls))
                    for _ in range(2)]
        worker = await stack.enter_async_context(TieredSaver.from_urls(**urls))
        tag = f"pg-{uuid.uuid4().hex[:8]}"
        loads = [chat(r, USERS // 3, f"{tag}-r{n}", pause=0.05) for n, r in enumerate(replicas)]
        job_failures: Counter[str] = Counter()
        progress: Counter[str] = Counter()
        stop = asyncio.Event()
        archiving = asyncio.create_task(archive_until(stop, worker, job_failures, progress))
        for load in loads:
            load.start()
        try:
            await until(lambda: all(load.total() >= USERS for load in loads), "turns before")
            await restart(postgres_cluster, "fast")
            before = [load.total() for load in loads]
            ran = progress["runs"]
            await until(lambda: all(load.total() >= b + USERS for load, b in zip(
                loads, before, strict=True)), "turns acknowledged again on both replicas")
            await until(lambda: progress["runs"] >= ran + 2, "worker runs after the restart")
        finally:
            for load in loads:
                await load.finish()
            stop.set()
            await asyncio.wait_for(archiving, DEADLINE)

        assert set(job_failures) <= {"TierUnavailable"}, job_failures
        for load in loads:
            wrong = untranslated(load.errors)
            assert not wrong, f"{len(wrong)} untyped failures, first: {wrong[0]}"
        assert progress["moved"] > 0, "the worker archived nothing beside the app"
        final = await IdleArchival(worker, EVERYTHING).run_once(now=time.time() + 1)
        assert not final.failed and not final.busy, final  # the worker gave back every claim
        fresh = await stack.enter_async_context(
            TieredSaver.from_urls(hot=None, warm=urls["warm"], cold=urls["cold"]))
        for load in loads:
            verdict = await asyncio.wait_for(load.ledger.verify(fresh), DEADLINE)
            assert verdict.ok, verdict.summary()  # read back from cold: every head is archived
        assert fresh.stats.rehydrated > 0
