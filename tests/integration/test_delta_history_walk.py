"""``aget_delta_channel_history`` where the parent chain is not a plain line: branches
written in between, a parent missing, a parent stored after its child, a chain that
loops. Built with ``aput``/``aput_writes`` as LangGraph calls them, on every stack.

LangGraph's own walk (``BaseCheckpointSaver.aget_delta_channel_history``, a ``get_tuple``
per ancestor) is the reference wherever it ends; a chain that loops it would walk
forever, and there the walk ends at the first checkpoint it comes back to.
"""

from __future__ import annotations

import asyncio
import operator
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.graph import END, START, StateGraph

from tests.calls import count_calls
from tests.stacks import ARCHIVING_STACKS, STACKS, Urls
from tierstore import TieredSaver
from tierstore.codec.chain import parse_link_name
from tierstore.codec.segment import pack_segment, segment_key
from tierstore.errors import CorruptPayload
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion


@pytest.fixture(params=sorted(STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


@pytest.fixture
async def saver(urls: Urls) -> AsyncIterator[TieredSaver]:
    async with urls.open() as s:
        yield s


def new_id() -> str:
    return str(uuid6())


def cfg(thread: str, checkpoint_id: str | None = None) -> RunnableConfig:
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


# -- loading a thread ---------------------------------------------------------------------


class Snapshots(TypedDict):
    items: Annotated[list[str], DeltaChannel(extend, snapshot_frequency=1)]
    n: int


def extend(state: list[str], batches: Sequence[list[str]]) -> list[str]:
    return [*state, *(item for batch in batches for item in batch)]


def write_then_count() -> Any:
    """``write`` updates the delta channel (a snapshot at every update), ``count`` does not:
    the head names the channel at the snapshot's version and stores no value of its own."""
    g = StateGraph(Snapshots)
    g.add_node("write", lambda s: {"items": [f"i{s['n']}"]})
    g.add_node("count", lambda s: {"n": s["n"] + 1})
    g.add_edge(START, "write")
    g.add_edge("write", "count")
    g.add_edge("count", END)
    return g


async def test_a_head_after_a_snapshot_loads_without_a_walk(saver: TieredSaver) -> None:
    """Read from warm, a head whose channel is unchanged since a snapshot carries the
    snapshot (its blob is named at that version); read from the hot tier it must too,
    or LangGraph walks the ancestors for what the read could have handed over."""
    app = write_then_count().compile(checkpointer=saver)
    await app.ainvoke({"items": ["a"], "n": 0}, cfg("snap"))
    warm = saver.regions.by_name["default"].warm
    counts = count_calls(warm, ["get", "ancestors"])
    out = await app.ainvoke({"items": ["b"], "n": 5}, cfg("snap"))
    assert out["items"] == ["a", "i0", "b", "i5"]
    assert counts["ancestors"] == 0
    latest = await saver.aget_tuple(cfg("snap"))
    assert latest is not None
    assert latest.checkpoint["channel_values"]["items"].value == ["a", "i0", "b", "i5"]


class Plain(TypedDict):
    items: Annotated[list[str], operator.add]
    n: int


def appender(schema: Any) -> Any:
    g = StateGraph(schema)
    g.add_node("step", lambda s: {"items": [f"s{s['n']}"], "n": s["n"] + 1})
    g.add_edge(START, "step")
    g.add_edge("step", END)
    return g


MIGRATED = ["in0", "s0", "in1", "s10", "in2", "s20", "in3", "s30", "in4", "s40"]


async def migrate_a_thread(saver: TieredSaver) -> Any:
    """Turns while ``items`` was a plain list channel (this saver stores it as a delta
    chain of its own), then turns with ``items`` a DeltaChannel."""
    before = appender(Plain).compile(checkpointer=saver)
    for turn in range(3):
        await before.ainvoke({"items": [f"in{turn}"], "n": turn * 10}, cfg("migrated"))
    after = appender(Sparse).compile(checkpointer=saver)
    for turn in range(3, 5):
        await after.ainvoke({"items": [f"in{turn}"], "n": turn * 10}, cfg("migrated"))
    return after


async def assert_every_history_as_base(saver: TieredSaver, thread: str) -> None:
    configs = [t.config async for t in saver.alist(cfg(thread))]
    fast = [await saver.aget_delta_channel_history(config=c, channels=["items"])
            for c in configs]
    base = [await BaseCheckpointSaver.aget_delta_channel_history(saver, config=c,
                                                                 channels=["items"])
            for c in configs]
    assert fast == base
    assert any("seed" in h["items"] for h in fast)


async def test_a_list_stored_before_the_channel_became_a_delta_channel_seeds_it(
        saver: TieredSaver) -> None:
    """The last plain value is the seed, as LangGraph's walk finds it, and the writes
    before it do not count."""
    after = await migrate_a_thread(saver)
    await assert_every_history_as_base(saver, "migrated")
    assert (await after.aget_state(cfg("migrated"))).values["items"] == MIGRATED


@pytest.fixture(params=sorted(ARCHIVING_STACKS))
def archiving_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return ARCHIVING_STACKS[request.param](request, tmp_path)


async def test_an_archived_list_seeds_it_from_its_segment(archiving_urls: Urls) -> None:
    async with archiving_urls.open() as saver:
        after = await migrate_a_thread(saver)
        report = await HistoryDemotion(saver, TieringPolicy(
            archive_after=0, archive_idle_after=0, segment_size=4)).run_once(
                now=time.time() + 10 * 365 * 86400.0)
        assert report.errors == [] and report.checkpoints > 0
        await assert_every_history_as_base(saver, "migrated")
        assert (await after.aget_state(cfg("migrated"))).values["items"] == MIGRATED


class Sparse(TypedDict):
    items: Annotated[list[str], DeltaChannel(extend, snapshot_frequency=1000)]
    n: int


# -- a seed whose delta chain lost a link ---------------------------------------------------


LONG = "".join(f"{i * 7919 % 10007:05d}" for i in range(400))
"""Hardly compressible: the items appended after it stay smaller than the snapshot."""


async def migrate_a_long_list(saver: TieredSaver, thread: str) -> str:
    """A thread whose ``items`` list grew as one delta chain of several links (its first
    item is long, so the items appended after it are stored as links), then became a
    ``DeltaChannel``. Returns the seed of the head's history: the last checkpoint that
    names the chain."""
    before = appender(Plain).compile(checkpointer=saver)
    await before.ainvoke({"items": [LONG], "n": 0}, cfg(thread))
    for turn in range(1, 3):
        await before.ainvoke({"items": [f"in{turn}"], "n": turn * 10}, cfg(thread))
    after = appender(Sparse).compile(checkpointer=saver)
    await after.ainvoke({"items": ["in3"], "n": 30}, cfg(thread))
    async for listed in saver.alist(cfg(thread)):
        checkpoint_id: str = listed.config["configurable"]["checkpoint_id"]
        if await chain_of(saver, thread, checkpoint_id):
            return checkpoint_id
    raise AssertionError("no checkpoint names a delta chain")


async def chain_of(saver: TieredSaver, thread: str, checkpoint_id: str) -> list[str]:
    """The stored names of the links a checkpoint names, snapshot first."""
    stored = await saver.regions.for_thread(thread).warm.get(thread, "", checkpoint_id)
    assert stored is not None
    depths = {name: parse_link_name(name) for name in stored.blobs}
    return sorted((name for name, parsed in depths.items() if parsed is not None),
                  key=lambda name: (parse_link_name(name) or (0, ""))[0])


async def lose_link(saver: TieredSaver, thread: str, checkpoint_id: str, which: str) -> None:
    """Delete the blob row of the deepest or a middle link of the chain a checkpoint names,
    behind the store's back (a bad manual delete, storage damage)."""
    names = await chain_of(saver, thread, checkpoint_id)
    assert len(names) >= 3  # a snapshot, a middle link, a deepest one
    name = names[-1] if which == "deepest" else names[len(names) // 2]
    warm: Any = saver.regions.for_thread(thread).warm
    if warm.backend == "sqlite":
        deleted = await warm._run(lambda conn: conn.execute(
            "DELETE FROM blobs WHERE thread_id = ? AND checkpoint_ns = '' AND channel = ? "
            "AND version = (SELECT v.value FROM checkpoints AS c, json_each(c.channel_versions)"
            " AS v WHERE c.thread_id = ? AND c.checkpoint_id = ? AND v.key = ?)",
            (thread, name, thread, checkpoint_id, name)).rowcount)
    elif warm.backend == "mongodb":
        doc = await warm._c("checkpoints").find_one(
            {"thread_id": thread, "checkpoint_ns": "", "checkpoint_id": checkpoint_id})
        [version] = [cv["v"] for cv in doc["channel_versions"] if cv["c"] == name]
        deleted = (await warm._c("blobs").delete_many(
            {"thread_id": thread, "checkpoint_ns": "", "channel": name,
             "version": version})).deleted_count
    else:
        status = await warm._run("test", lambda conn: conn.execute(
            "DELETE FROM tierstore_blobs AS b USING tierstore_checkpoints AS c "
            "WHERE c.checkpoint_id = $1 AND b.sid = c.sid AND b.channel = $2 "
            "AND b.version = c.channel_versions ->> $2", checkpoint_id, name))
        deleted = int(status.split()[-1])
    assert deleted == 1


async def assert_history_refused(saver: TieredSaver, thread: str, checkpoint_id: str) -> None:
    """The history is refused, naming the thread and the channel: never a seed one link
    short (a list missing its last items) or with a gap."""
    with pytest.raises(CorruptPayload) as refused:
        await saver.aget_delta_channel_history(config=cfg(thread, checkpoint_id),
                                               channels=["items"])
    assert repr(thread) in str(refused.value) and "'items'" in str(refused.value)


@pytest.mark.parametrize("which", ["deepest", "middle"])
async def test_a_seed_missing_a_link_of_its_chain_is_refused(saver: TieredSaver,
                                                             which: str) -> None:
    thread = f"lost-{which}"
    seed = await migrate_a_long_list(saver, thread)
    head = await saver.aget_tuple(cfg(thread))
    assert head is not None
    head_id = head.config["configurable"]["checkpoint_id"]
    healthy = await history(saver, thread, head_id)
    assert healthy["items"]["seed"] == [LONG, "s0", "in1", "s10", "in2", "s20"]
    await lose_link(saver, thread, seed, which)
    await assert_history_refused(saver, thread, head_id)
    with pytest.raises(CorruptPayload):  # as a full read of the seed is
        await saver.aget_tuple(cfg(thread, seed))


async def archive_as_read(saver: TieredSaver, thread: str, checkpoint_ids: list[str]) -> None:
    """Archive checkpoints in one segment exactly as they read from warm, a lost value
    left out: what a demotion did before it left such checkpoints warm (and still does
    where a full read cannot tell a lost link: PostgreSQL's warm store). Segments written
    that way are in cold stores now, and their reads must still refuse the loss."""
    region = saver.regions.for_thread(thread)
    assert region.cold is not None
    records = [await region.warm.get(thread, "", c) for c in checkpoint_ids]
    assert all(r is not None and r.location == "warm" for r in records)
    data = pack_segment([r for r in records if r is not None], created_at=time.time())
    key = segment_key(thread, "", data, nonce=uuid.uuid4().hex)
    await region.cold.put(key, data)
    now = time.time()
    owner = f"archiver-{uuid.uuid4().hex[:8]}"
    assert await region.warm.claim(owner=owner, now=now, lease_seconds=60, limit=1,
                                   idle_before=now + 1, thread_id=thread)
    try:
        assert await region.warm.mark_archived(
            thread, "", checkpoint_ids, archive_key=key, owner=owner,
            now=now) == len(checkpoint_ids)
    finally:
        await region.warm.release(thread, "", owner=owner)


@pytest.mark.parametrize("which", ["deepest", "middle"])
async def test_an_archived_seed_missing_a_link_of_its_chain_is_refused(
        archiving_urls: Urls, which: str) -> None:
    """The link was lost in warm before its checkpoint was archived, so the segment
    lacks it too: a segment keeps no list of the names a checkpoint stored, so the seed
    read from it must end at the version that checkpoint names. Everything before the
    seed is archived, its parent (the seed of the seed's history) included; a demotion
    would keep that parent live, as the head's DeltaChannel counters reach back to it."""
    thread = f"lost-archived-{which}"
    async with archiving_urls.open() as saver:
        seed = await migrate_a_long_list(saver, thread)
        ids = [t.config["configurable"]["checkpoint_id"] async for t in saver.alist(
            cfg(thread), before=cfg(thread, seed))]
        older = ids[0]  # the seed's parent
        await lose_link(saver, thread, older, which)
        await archive_as_read(saver, thread, ids)
        stub = await saver.regions.for_thread(thread).warm.get(thread, "", older)
        assert stub is not None and stub.location == "archived"
        await assert_history_refused(saver, thread, seed)
