"""A hot hit is never stale, however writes interleave across replicas.

Two replicas of one app (two savers on the same stores) answer one node's three
``interrupt()`` calls alternately; then savers in separate OS processes apply
random interleavings of ``aput`` / ``aput_writes``, and after every step each of
them must read exactly what a single reference saver reads.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import operator
import random
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from tests.stacks import (
    MULTIPROCESS_STACKS,
    STACKS,
    TIERED_STACKS,
    Stack,
    Urls,
)
from tierstore import TieredSaver
from tierstore.demo import build_agent
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import IdleArchival

QUESTIONS = ("first?", "second?", "third?")


class Answers(TypedDict):
    answers: Annotated[list[str], operator.add]


def ask_three(_: Answers) -> dict[str, list[str]]:
    return {"answers": [str(interrupt(q)) for q in QUESTIONS]}


def interview() -> StateGraph[Answers]:
    builder = StateGraph(Answers)
    builder.add_node("ask", ask_three)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    return builder


@pytest.fixture(params=sorted(STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


def cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


def pending_question(state: Any) -> Any:
    return [i.value for task in state.tasks for i in task.interrupts]


async def test_two_replicas_answering_interrupts_alternately(urls: Urls) -> None:
    """Each resume replaces the interrupt/resume writes of one checkpoint: the number
    of pending writes stays the same while their content changes. Every replica must
    see every answer the other one stored, and the thread ends with the right ones."""
    async with urls.open() as one, urls.open() as two:
        replicas = [interview().compile(checkpointer=s) for s in (one, two)]
        config = cfg("interview")
        await replicas[0].ainvoke({"answers": []}, config)
        answers = ["red", "green", "blue"]
        for i, answer in enumerate(answers):
            app = replicas[(i + 1) % 2]
            for reader in replicas:  # both replicas agree on the open question
                assert pending_question(await reader.aget_state(config)) == [QUESTIONS[i]]
            await app.ainvoke(Command(resume=answer), config)
        for reader in replicas:
            state = await reader.aget_state(config)
            assert state.values["answers"] == answers
            assert state.next == ()


# -- random interleavings across processes ------------------------------------------------

STEPS = 40
SAVERS = 3
TASKS = ("node-a", "node-b")
# channel -> index LangGraph gives it: plain channels keep the first write per
# (task, idx); the special ones (negative index) replace each other
WRITE_CHANNELS = ("x", "__interrupt__", "__resume__", "__error__")


def _normal(tup: Any) -> Any:
    """What a reader sees of the latest checkpoint, in a comparable form."""
    if tup is None:
        return None
    parent = tup.parent_config["configurable"]["checkpoint_id"] if tup.parent_config else None
    writes = sorted((t, c, repr(v)) for t, c, v in tup.pending_writes or ())
    return (tup.checkpoint["id"], parent, dict(tup.checkpoint["channel_values"]), writes)


async def _apply(saver: Any, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    if kind == "put":
        _, config, checkpoint, metadata, versions = op
        return (await saver.aput(config, checkpoint, metadata, versions))["configurable"][
            "checkpoint_id"]
    if kind == "writes":
        _, config, writes, task_id = op
        await saver.aput_writes(config, writes, task_id)
        return None
    return _normal(await saver.aget_tuple(cfg(op[1])))


def _replica(urls: Urls, inbox: Any, outbox: Any) -> None:
    """One saver in its own process: apply each op sent, answer with its result."""

    async def run() -> None:
        async with urls.open() as saver:
            outbox.put(("ready", None))
            while True:
                op = await asyncio.to_thread(inbox.get)
                if op is None:
                    return
                try:
                    outbox.put(("ok", await _apply(saver, op)))
                except Exception as exc:  # reported to the test, which fails on it
                    outbox.put(("error", f"{type(exc).__name__}: {exc}"))

    asyncio.run(run())


def _script(seed: int, thread: str) -> list[tuple[Any, ...]]:
    """A random sequence of puts (on the latest, sometimes forking off an older one)
    and pending writes (mostly on the latest; special channels replace each other)."""
    rng = random.Random(seed)
    ops: list[tuple[Any, ...]] = []
    ids: list[str] = []
    versions: dict[str, int] = {}
    values: dict[str, Any] = {}
    current: dict[str, Any] = {}
    for step in range(STEPS):
        if not ids or rng.random() < 0.3:
            checkpoint = empty_checkpoint()
            channel = rng.choice(["x", "y"])
            versions[channel] = versions.get(channel, 0) + 1
            version = f"{versions[channel]:032}.{step:016}"
            values[channel], current[channel] = f"{channel}-{step}", version
            checkpoint["channel_values"] = dict(values)
            checkpoint["channel_versions"] = dict(current)
            ids.append(checkpoint["id"])
            parent = ids[-2] if len(ids) > 1 and rng.random() < 0.9 else None
            config = {"configurable": {"thread_id": thread, "checkpoint_ns": "",
                                       **({"checkpoint_id": parent} if parent else {})}}
            ops.append(("put", config, checkpoint, {"source": "loop", "step": step},
                        {channel: version}))
            continue
        target = ids[-1] if rng.random() < 0.85 else rng.choice(ids)
        writes = [(rng.choice(WRITE_CHANNELS), f"w{step}") for _ in range(rng.randint(1, 2))]
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": "",
                                   "checkpoint_id": target}}
        ops.append(("writes", config, writes, rng.choice(TASKS)))
    return ops


@pytest.fixture(params=sorted(MULTIPROCESS_STACKS))
def shared_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_interleavings_across_processes_match_one_saver(
    shared_urls: Urls, seed: int,
) -> None:
    thread = f"interleaved-{seed}"
    ops = _script(seed, thread)
    ctx = multiprocessing.get_context("spawn")
    channels = [(ctx.Queue(), ctx.Queue()) for _ in range(SAVERS)]
    procs = [ctx.Process(target=_replica, args=(shared_urls, inbox, outbox), daemon=True)
             for inbox, outbox in channels]
    for p in procs:
        p.start()

    async def call(k: int, op: Any) -> Any:
        inbox, outbox = channels[k]
        inbox.put(op)
        status, value = await asyncio.to_thread(outbox.get, True, 120)
        assert status == "ok", value
        return value

    try:
        for _, outbox in channels:
            assert (await asyncio.to_thread(outbox.get, True, 120))[0] == "ready"
        reference = InMemorySaver()
        rng = random.Random(seed * 1000)
        for step, op in enumerate(ops):
            k = rng.randrange(SAVERS)
            await call(k, op)
            await _apply(reference, op)
            expected = await _apply(reference, ("get", thread))
            for reader in rng.sample(range(SAVERS), SAVERS):
                got = await call(reader, ("get", thread))
                assert got == expected, f"step {step} ({op[0]} through saver {k}), " \
                                        f"read through saver {reader}"
        assert any(op[0] == "writes" and op[2][0][0] != "x" for op in ops)
    finally:
        for inbox, _ in channels:
            inbox.put(None)
        for p in procs:
            await asyncio.to_thread(p.join, 60)
            if p.exitcode is None:
                p.kill()
    assert all(p.exitcode == 0 for p in procs)


async def test_a_saver_serves_its_own_copy_only_while_warm_agrees(urls: Urls) -> None:
    """The process-local copy and the write-behind queue are checked by version too."""
    saver: TieredSaver
    async with urls.open() as saver, urls.open() as other:
        config = cfg("local-copies")
        stored = await saver.aput(config, _checkpoint(), {"source": "loop", "step": 0}, {})
        await saver.aput_writes(stored, [("__interrupt__", "q-1")], "node")
        first = await saver.aget_tuple(config)
        assert first is not None and [w[2] for w in first.pending_writes or ()] == ["q-1"]
        await other.aput_writes(stored, [("__interrupt__", "q-2")], "node")  # same count
        again = await saver.aget_tuple(config)
        assert again is not None and [w[2] for w in again.pending_writes or ()] == ["q-2"]


def _checkpoint() -> Any:
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {}
    return checkpoint


@pytest.fixture(params=sorted(TIERED_STACKS))
def tiered_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


async def test_archiving_a_head_makes_every_cached_copy_miss(tiered_urls: Urls) -> None:
    """A replica's copy of a head whose data another process moved to cold fails the
    freshness check: the next read goes to warm (and its stub), not to the copy."""
    async with tiered_urls.open() as reader, tiered_urls.open() as worker:
        app = build_agent().compile(checkpointer=reader)
        config = cfg("archived-under-a-replica")
        await app.ainvoke({"messages": [HumanMessage("remember the vault code")]}, config)
        before = await reader.aget_tuple(config)
        hits = reader.stats.hot_hits
        assert await reader.aget_tuple(config) == before
        assert reader.stats.hot_hits == hits + 1  # served from this replica's copy
        policy = TieringPolicy(archive_after=None, archive_idle_after=60, segment_size=50)
        report = await IdleArchival(worker, policy).run_once(now=time.time() + 10 * 365 * 86400)
        assert report.checkpoints > 0
        hits = reader.stats.hot_hits
        after = await reader.aget_tuple(config)
        assert reader.stats.hot_hits == hits  # the copy was not served
        assert after is not None and before is not None
        assert after.checkpoint == before.checkpoint
        assert after.pending_writes == before.pending_writes


# -- a put racing a pending write of the checkpoint it stores (PostgreSQL) ----------------


@pytest.fixture
def redis_postgres_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS["redis+postgres"](request, tmp_path)


async def test_a_write_committing_during_its_checkpoints_put_is_counted(
    redis_postgres_urls: Urls,
) -> None:
    """LangGraph stores a checkpoint's pending writes in the background, so one can be
    inside its statement, not yet committed, when the put that makes the checkpoint
    the head runs. The put must wait for it (or count it afterwards): a head version
    that misses the write would let a cached copy without it pass as fresh."""
    import asyncpg
    from langgraph.checkpoint.base.id import uuid6

    from tests.servers.postgres import with_query

    warm_url = redis_postgres_urls.warm
    assert isinstance(warm_url, str)
    schema = dict(
        part.split("=", 1) for part in warm_url.split("?", 1)[1].split("&"))["schema"]
    base = warm_url.split("?", 1)[0]
    thread = "put-races-its-write"
    warm_only = Stack("postgres", None, warm_url, None)
    async with redis_postgres_urls.open(hot_write_delay=0) as saver, warm_only.open() as truth:
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        parent = await saver.aput(config, _checkpoint(), {"source": "loop", "step": 0}, {})
        child = _checkpoint()
        child["id"] = str(uuid6(clock_seq=1))
        payload = saver.codec.encode({"q": "interrupt!"})
        conn = await asyncpg.connect(with_query(base), server_settings={"search_path": schema})
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.fetchval(
                "SELECT tierstore_put_writes($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                thread, "", child["id"], ["task-ask"], [-3], ["__interrupt__"],
                [payload.tag], [payload.data], [""])
            put = asyncio.ensure_future(
                saver.aput(parent, child, {"source": "loop", "step": 1}, {}))
            # Commit once the put has finished or is waiting for the open write's lock.
            waiting = "SELECT count(*) FROM pg_stat_activity " \
                      "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            while not await conn.fetchval(waiting):
                finished, _ = await asyncio.wait({put}, timeout=0.01)
                if finished:
                    break
            await tx.commit()
            await asyncio.wait_for(put, 30)
        finally:
            await conn.close()
        expected = await truth.aget_tuple(cfg(thread))
        assert expected is not None
        assert [w[1:] for w in expected.pending_writes or ()] == [
            ("__interrupt__", {"q": "interrupt!"})]
        for _ in range(2):  # the second read is a hot hit where one is served
            got = await saver.aget_tuple(cfg(thread))
            assert got is not None
            assert got.pending_writes == expected.pending_writes


async def test_a_copy_cached_before_a_delete_never_passes_for_the_recreated_thread(
    urls: Urls,
) -> None:
    """One replica caches the head; another backs the thread up, deletes it, restores it
    (same checkpoint ids) and replaces its interrupt write. The first must read the new
    write, not its copy from before the delete."""
    async with urls.open(hot_write_delay=0) as one, urls.open(hot_write_delay=0) as two:
        thread, backup = "recreated", "recreated-backup"
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        stored = await one.aput(config, _checkpoint(), {"source": "loop", "step": 0}, {})
        await one.aput_writes(stored, [("__interrupt__", "OLD")], "task-1")
        first = await one.aget_tuple(cfg(thread))
        assert first is not None and [w[2] for w in first.pending_writes or ()] == ["OLD"]
        await two.acopy_thread(thread, backup)
        await two.adelete_thread(thread)
        await two.acopy_thread(backup, thread)
        await two.aput_writes(stored, [("__interrupt__", "NEW")], "task-1")
        for reader in (two, one):
            got = await reader.aget_tuple(cfg(thread))
            assert got is not None and [w[2] for w in got.pending_writes or ()] == ["NEW"]


@pytest.mark.parametrize("operation", ["delete", "prune", "delete_for_runs"])
async def test_a_queued_hot_copy_never_brings_deleted_state_back(
    urls: Urls, operation: str,
) -> None:
    """One replica's write-behind copy of a thread is still queued when another replica
    deletes (or prunes) it. When the copy is sent afterwards, the hot tier refuses it:
    a reader that trusts hot hits never sees the deleted checkpoint again."""
    async with urls.open(hot_write_delay=60) as one, \
            urls.open(hot_check="trusted", hot_write_delay=0) as two:
        thread = f"deleted-under-a-queue-{operation}"
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        first = await two.aput(config, _checkpoint(), {"source": "loop", "step": 0, "run_id": "r1"},
                               {})
        doomed = _checkpoint()
        doomed["channel_values"] = {"secret": "deleted"}
        doomed["channel_versions"] = {"secret": "00000000000000000000000000000001.0"}
        await one.aput(first, doomed, {"source": "loop", "step": 1, "run_id": "r2"},
                       {"secret": "00000000000000000000000000000001.0"})
        if operation == "delete":
            await two.adelete_thread(thread)
        elif operation == "prune":  # keeps only the latest: the doomed one goes too
            await two.aput(first, _checkpoint(), {"source": "loop", "step": 2, "run_id": "r3"},
                           {})
            await two.aprune([thread])
        else:
            await two.adelete_for_runs(["r2"])
        cache = one.regions.for_thread(thread).cache
        if cache is not None:
            await cache.drain()  # the queued copy lands after the delete
        trusted = await two.aget_tuple(cfg(thread))  # first: a hot hit is taken unchecked
        expected = await one.aget_tuple(cfg(thread))  # checked against warm's head
        assert expected is None or "secret" not in expected.checkpoint["channel_values"]
        assert (trusted and trusted.checkpoint["id"]) == (expected and expected.checkpoint["id"])
        assert trusted is None or "secret" not in trusted.checkpoint["channel_values"]


async def _writes_before_their_checkpoint(saver: TieredSaver, thread: str) -> tuple[Any, Any]:
    """A parent, then a child whose pending write is stored before the child itself
    (what LangGraph does with a turn's input checkpoint): the child's put cannot know
    the head's content exactly, so this process drops its copies."""
    from langgraph.checkpoint.base.id import uuid6

    config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    parent = await saver.aput(config, _checkpoint(), {"source": "loop", "step": 0}, {})
    cache = saver.regions.for_thread(thread).cache
    if cache is not None:
        await cache.drain()  # the parent is the hot entry
    child = _checkpoint()
    child["id"] = str(uuid6(clock_seq=1))
    early = {"configurable": {**parent["configurable"], "checkpoint_id": child["id"]}}
    await saver.aput_writes(early, [("answer", "early")], "task-1")
    stored = await saver.aput(parent, child, {"source": "loop", "step": 1}, {})
    return stored, child


async def test_an_inexact_head_leaves_the_hot_tier_within_the_write_delay(
    redis_postgres_urls: Urls,
) -> None:
    """The hot entry of a head this process cannot cache is invalidated by the
    write-behind queue: a reader that trusts hot hits sees the old head for at most
    ``hot_write_delay``, never until the entry's TTL."""
    urls = redis_postgres_urls
    async with urls.open(hot_write_delay=0.2) as one, \
            urls.open(hot_check="trusted", hot_write_delay=0) as two:
        thread = "inexact-head"
        _, child = await _writes_before_their_checkpoint(one, thread)
        cache = one.regions.for_thread(thread).cache
        assert cache is not None
        await cache.drain()
        got = await two.aget_tuple(cfg(thread))
        assert got is not None and got.checkpoint["id"] == child["id"]
        assert [w[1:] for w in got.pending_writes or ()] == [("answer", "early")]


async def test_an_inexact_head_followed_by_a_put_costs_no_hot_invalidation(
    redis_postgres_urls: Urls,
) -> None:
    """A turn's next checkpoint, queued within the delay, replaces the hot entry the
    inexact head left behind: no invalidation round trip is spent on it."""
    urls = redis_postgres_urls
    async with urls.open(hot_write_delay=0.2) as one, \
            urls.open(hot_check="trusted", hot_write_delay=0) as two:
        thread = "inexact-head-then-put"
        stored, _ = await _writes_before_their_checkpoint(one, thread)
        last = await one.aput(stored, _checkpoint(), {"source": "loop", "step": 2}, {})
        cache = one.regions.for_thread(thread).cache
        assert cache is not None
        await cache.drain()
        assert one.metrics.calls(tier="hot", op="invalidate") == 0
        got = await two.aget_tuple(cfg(thread))
        assert got is not None
        assert got.checkpoint["id"] == last["configurable"]["checkpoint_id"]


async def test_a_trusting_process_reads_its_own_inexact_head(urls: Urls) -> None:
    """A process that trusts hot hits drops the old entry before its put returns: it
    reads the head it just stored, writes included, never the one before."""
    async with urls.open(hot_check="trusted", hot_write_delay=0.2) as saver:
        thread = "inexact-head-trusted"
        _, child = await _writes_before_their_checkpoint(saver, thread)
        got = await saver.aget_tuple(cfg(thread))
        assert got is not None and got.checkpoint["id"] == child["id"]
        assert [w[1:] for w in got.pending_writes or ()] == [("answer", "early")]


async def test_inexact_heads_in_a_row_reach_the_hot_tier_within_the_delay(
    redis_postgres_urls: Urls,
) -> None:
    """Heads this process cannot cache, one after another: the hot entry is dropped at
    most ``hot_write_delay`` after the first, not postponed by each new one."""
    from langgraph.checkpoint.base.id import uuid6

    urls = redis_postgres_urls
    async with urls.open(hot_write_delay=1.0) as one, \
            urls.open(hot_check="trusted", hot_write_delay=0) as two:
        thread = "inexact-heads-in-a-row"
        stored, _ = await _writes_before_their_checkpoint(one, thread)
        started = time.monotonic()
        await asyncio.sleep(0.6)
        grandchild = _checkpoint()
        grandchild["id"] = str(uuid6(clock_seq=2))
        early = {"configurable": {**stored["configurable"], "checkpoint_id": grandchild["id"]}}
        await one.aput_writes(early, [("answer", "again")], "task-2")
        await one.aput(stored, grandchild, {"source": "loop", "step": 2}, {})
        await asyncio.sleep(max(0.0, 1.3 - (time.monotonic() - started)))
        got = await two.aget_tuple(cfg(thread))  # a hot hit is taken unchecked
        assert got is not None and got.checkpoint["id"] == grandchild["id"]
