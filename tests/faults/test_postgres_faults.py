"""The PostgreSQL warm tier when the server misbehaves, on a private throwaway cluster.

1. The server is stopped: calls fail fast with ``TierUnavailable`` naming the
   store (password masked), and the same store works again once it is restarted.
2. The server is frozen (SIGSTOP): calls give up after ``command_timeout`` and a
   new store gives up after ``connect_timeout``, instead of hanging; all recover.
3. Wrong password, missing database, refused port: one clear typed error each.
4. Many stores run ``setup()`` at once on an empty schema: one migrates, none fails.
5. Strict writers in separate pools race round after round: one winner per round.

Every wait is bounded by ``DEADLINE`` so that a hang fails the test instead of
stalling the run; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from langchain_core.messages import HumanMessage

from tests.servers.postgres import PrivateCluster, free_port, run_sql, with_database
from tests.servers.proxy import TcpProxy
from tierstore import TieredSaver
from tierstore.demo import build_agent
from tierstore.errors import ConfigurationError, TierUnavailable, VersionConflict
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import IdleArchival
from tierstore.migrate import migrations_for
from tierstore.records import CheckpointRecord, ListQuery, Payload
from tierstore.settings import StoreUrl
from tierstore.tiers.postgres import PostgresWarm

DEADLINE = 60.0


def store(url: str, **options: Any) -> PostgresWarm:
    return PostgresWarm.from_url(StoreUrl.parse(url), **options)


def record(thread: str, n: int, parent: int | None) -> CheckpointRecord:
    return CheckpointRecord(
        thread_id=thread,
        checkpoint_ns="",
        checkpoint_id=f"{n:08d}",
        parent_id=f"{parent:08d}" if parent is not None else None,
        checkpoint=Payload("msgpack", b"cp"),
        metadata=Payload("msgpack", b"md"),
        channel_versions={},
        filter_doc={"step": n},
    )


async def bounded(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, DEADLINE)


@pytest.fixture
async def opened(postgres_cluster: PrivateCluster) -> AsyncIterator[PostgresWarm]:
    warm = store(postgres_cluster.url, command_timeout="2", connect_timeout="2")
    await bounded(warm.setup())
    try:
        yield warm
    finally:
        await bounded(warm.aclose())


async def test_stopped_server_fails_fast_and_the_store_recovers(
    postgres_cluster: PrivateCluster, opened: PostgresWarm
) -> None:
    thread = f"t-{uuid.uuid4()}"
    await opened.put_checkpoint(record(thread, 1, None), [], strict=True)
    postgres_cluster.stop()
    try:
        for call in (opened.head(thread, ""),
                     opened.put_checkpoint(record(thread, 2, 1), [], strict=True)):
            with pytest.raises(TierUnavailable) as info:
                await bounded(call)
            assert "postgres warm tier" in str(info.value)
            assert info.value.tier == "warm" and info.value.backend == "postgres"
            assert "\n" not in str(info.value)
    finally:
        postgres_cluster.start()
    head = await bounded(opened.head(thread, ""))
    assert head is not None and head.checkpoint_id == "00000001"
    result = await bounded(opened.put_checkpoint(record(thread, 2, 1), [], strict=True))
    assert (result.head.checkpoint_id, result.head.version) == ("00000002", head.version + 1)


async def test_frozen_server_times_out_instead_of_hanging(
    postgres_cluster: PrivateCluster, opened: PostgresWarm
) -> None:
    thread = f"t-{uuid.uuid4()}"
    await opened.put_checkpoint(record(thread, 1, None), [], strict=False)
    late = store(postgres_cluster.url, connect_timeout="1")
    postgres_cluster.freeze()
    try:
        with pytest.raises(TierUnavailable, match="timed out"):
            await bounded(opened.get(thread, "", None))
        with pytest.raises(TierUnavailable):
            await bounded(late.setup())
    finally:
        postgres_cluster.thaw()
    got = await bounded(opened.get(thread, "", None))
    assert got is not None and got.checkpoint_id == "00000001"
    await bounded(late.setup())
    try:
        assert await bounded(late.head(thread, "")) is not None
    finally:
        await bounded(late.aclose())


async def test_wrong_password_is_a_configuration_error_with_the_password_masked(
    postgres_cluster: PrivateCluster,
) -> None:
    good = postgres_cluster.require_password("tierstore_pw", "s3cret-Pa55")
    bad = good.replace("s3cret-Pa55", "wrong-Pa55")
    warm = store(bad, connect_timeout="5")
    with pytest.raises(ConfigurationError, match="authentication failed") as info:
        await bounded(warm.setup())
    assert "wrong-Pa55" not in str(info.value) and "***" in str(info.value)
    assert "wrong-Pa55" not in repr(warm)
    ok = store(good, schema=f"pw_{uuid.uuid4().hex[:8]}")
    await bounded(ok.setup())
    await bounded(ok.aclose())


async def test_missing_database_and_refused_port(postgres_url: str) -> None:
    missing = store(with_database(postgres_url, f"nope_{uuid.uuid4().hex[:8]}"))
    with pytest.raises(ConfigurationError, match="does not exist"):
        await bounded(missing.setup())
    refused = store(f"postgresql://postgres:pw@127.0.0.1:{free_port()}/x", connect_timeout="5")
    with pytest.raises(TierUnavailable) as info:
        await bounded(refused.setup())
    assert ":***@" in str(info.value) and ":pw@" not in str(info.value)
    assert "state='unopened'" in repr(refused)  # nothing left open; setup may be retried


async def test_many_stores_set_up_one_schema_at_once(postgres_cluster: PrivateCluster) -> None:
    schema = f"race_{uuid.uuid4().hex[:8]}"
    stores = [store(postgres_cluster.url, schema=schema, min_size="1", max_size="2")
              for _ in range(8)]
    try:
        await bounded(asyncio.gather(*(s.setup() for s in stores)))
        thread = f"t-{uuid.uuid4()}"
        await stores[0].put_checkpoint(record(thread, 1, None), [], strict=True)
        for other in stores[1:]:
            assert (await other.head(thread, "")) is not None
    finally:
        await asyncio.gather(*(s.aclose() for s in stores))
    conn = await asyncpg.connect(postgres_cluster.url)
    try:
        rows = await conn.fetch(f'SELECT version FROM "{schema}".tierstore_migrations')
        shipped = migrations_for("postgres")
        assert sorted(r[0] for r in rows) == [m.version for m in shipped]  # each applied once
        functions = await conn.fetchval(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = $1::regnamespace "
            "AND proname LIKE 'tierstore_%'", schema)
        created = {name for m in shipped for name in re.findall(
            r"CREATE (?:OR REPLACE )?FUNCTION (\w+)", m.text)}
        assert functions == len(created)  # a function recreated later counts once
    finally:
        await conn.close()


async def test_strict_race_between_processes_has_one_winner_per_round(
    postgres_cluster: PrivateCluster,
) -> None:
    writers = [store(postgres_cluster.url, max_size="3") for _ in range(4)]
    await bounded(asyncio.gather(*(w.setup() for w in writers)))
    thread = f"t-{uuid.uuid4()}"
    try:
        first = await writers[0].put_checkpoint(record(thread, 0, None), [], strict=True)
        head = 0
        for round_ in range(1, 9):
            lost: list[str | None] = []
            attempts = [
                (w, head, round_ * 100 + i) for i, w in enumerate(writers) for _ in range(3)
            ]

            async def attempt(w: PostgresWarm, parent: int, n: int,
                              lost: list[str | None] = lost) -> int | None:
                try:
                    await w.put_checkpoint(record(thread, n, parent), [], strict=True)
                except VersionConflict as conflict:
                    lost.append(conflict.head_id)
                    return None
                return n

            won = [n for n in await bounded(asyncio.gather(*(attempt(*a) for a in attempts)))
                   if n is not None]
            assert len(won) == 1, f"round {round_}: winners {won}"
            assert len(lost) == len(attempts) - 1 and None not in lost
            head = won[0]
            current = await writers[-1].head(thread, "")
            assert current is not None
            assert (current.checkpoint_id, current.version) == (
                f"{head:08d}", first.head.version + round_)
        chain = [r async for r in writers[1].list(ListQuery(thread_id=thread))]
        assert len(chain) == 9
        for newer, older in itertools.pairwise(chain):
            assert newer.parent_id == older.checkpoint_id
    finally:
        await asyncio.gather(*(w.aclose() for w in writers))


@pytest.mark.parametrize("call", ["read", "write"])
async def test_a_session_killed_while_idle_is_replaced_not_reused(
    postgres_cluster: PrivateCluster, call: str,
) -> None:
    """The server's FATAL reaches an idle pooled connection before its close does.

    The event loop is held while the backend is terminated, so both the FATAL
    message and the end of the stream are waiting on the socket; two loop turns
    later the message has been read and the close not yet. A call given that
    connection once failed with asyncpg's ``InternalClientError`` ("another
    operation is in progress"). It must be served by a new session instead: the
    statement never reached the server, so even a write is safe to send again.
    """
    warm = store(postgres_cluster.url, min_size="1", max_size="1")
    await bounded(warm.setup())
    thread = f"t-{uuid.uuid4()}"
    try:
        await warm.put_checkpoint(record(thread, 1, None), [], strict=True)
        run_sql(postgres_cluster.url,
               "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
               "WHERE application_name = 'tierstore'")
        time.sleep(0.3)  # noqa: ASYNC251 -- holds the loop: the FATAL and the close both arrive
        await asyncio.sleep(0)  # one turn reads the FATAL …
        await asyncio.sleep(0)  # … and the close is not processed before the next call
        if call == "read":
            head = await bounded(warm.head(thread, ""))
            assert head is not None and head.checkpoint_id == "00000001"
        else:
            result = await bounded(warm.put_checkpoint(record(thread, 2, 1), [], strict=True))
            assert result.head.checkpoint_id == "00000002"
    finally:
        await bounded(warm.aclose())


async def test_a_run_cut_off_by_a_restart_gives_its_heads_back_when_the_server_returns(
    postgres_cluster: PrivateCluster, tmp_path: Path,
) -> None:
    """The server stops in the middle of an archiving run, so the run cannot release
    the heads it claimed. When the server is back, the same worker's next run must
    archive them, not find them busy until ``lease_seconds`` has passed."""
    schema = f"cut_{uuid.uuid4().hex[:8]}"
    saver = TieredSaver.from_urls(hot=None, warm=f"{postgres_cluster.url}?schema={schema}",
                                  cold=f"file://{tmp_path}/cold")
    policy = TieringPolicy(archive_idle_after=0, keep_latest=1, lease_seconds=3600)
    stopped: list[str] = []

    def stop_once(step: str) -> None:
        if not stopped:
            stopped.append(step)
            postgres_cluster.stop()  # blocks the loop, as a server dying mid-call would

    async with saver:
        app = build_agent().compile(checkpointer=saver)
        threads = [f"t-{n}-{uuid.uuid4()}" for n in range(3)]
        for thread_id in threads:
            await app.ainvoke({"messages": [HumanMessage("remember plums")]},
                              {"configurable": {"thread_id": thread_id}})
        job = IdleArchival(saver, policy, on_step=stop_once)
        try:
            with contextlib.suppress(TierUnavailable):
                first = await bounded(job.run_once(now=time.time() + 1))
                assert first.failed > 0
        finally:
            postgres_cluster.start()
        assert stopped, "the run never reached a move"
        job.on_step = None
        second = await bounded(job.run_once(now=time.time() + 1))
        assert second.busy == 0, f"heads still claimed by the cut-off run: {second}"
        assert second.threads == len(threads) and not second.failed, second


async def test_a_caller_who_gives_up_during_a_black_hole_is_not_held(
    postgres_cluster: PrivateCluster,
) -> None:
    """The network stops carrying bytes. A caller that cancels its call, or whose
    ``asyncio.timeout`` ends, gets its ``CancelledError`` / ``TimeoutError`` then:
    the call's connection is released in the background, where the driver's wait for
    the server to confirm the cancel cannot hold the caller until ``command_timeout``
    (and turn the cancel into ``TierUnavailable``). Afterwards the saver works."""
    async with TcpProxy("127.0.0.1", postgres_cluster.port) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres?command_timeout=30"
        async with TieredSaver.from_urls(hot=None, warm=url, cold=None) as saver:
            config = {"configurable": {"thread_id": f"t-{uuid.uuid4()}"}}
            await saver.aget_tuple(config)
            proxy.stall()
            try:
                call = asyncio.create_task(saver.aget_tuple(config))
                await asyncio.sleep(0.3)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await bounded(call)
                assert call.cancelled()
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await saver.adelete_thread(config["configurable"]["thread_id"])
            finally:
                proxy.resume()
            assert await bounded(saver.aget_tuple(config)) is None
