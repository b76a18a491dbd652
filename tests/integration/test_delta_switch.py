"""A thread whose list channel changes kind: a plain ``operator.add`` list (stored here as
a delta chain, ``codec.chain``) continued by a graph where it is a ``DeltaChannel``
(LangGraph's migration path), and back again.

Each checkpoint must read as on ``InMemorySaver``, which stores a value per channel
version and hands back, for a channel a checkpoint does not change, the value of that
version: the list the plain graph stored, the ``_DeltaSnapshot`` the ``DeltaChannel``
graph stored, or nothing where it stored no value. So the first checkpoints of the
``DeltaChannel`` graph carry the list, and the first ones after switching back do not
(AsyncPostgresSaver reads the same; AsyncSqliteSaver, which stores each checkpoint's
values whole, reads the other way round at both switches). Every checkpoint is
compared as the head after its put and after each write (the hot copy where one is
kept), by id, and as the latest after the hot tier was flushed.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.types import _DeltaSnapshot
from langgraph.graph import END, START, StateGraph
from langgraph.types import Durability

from tests.stacks import STACKS, Urls
from tierstore import TieredSaver

THREAD = "switch"


def extend(state: list[str], batches: Sequence[list[str]]) -> list[str]:
    return [*state, *(item for batch in batches for item in batch)]


class Plain(TypedDict):
    items: Annotated[list[str], operator.add]
    n: int


class Sparse(TypedDict):
    """A DeltaChannel that never snapshots here: its versions store no value."""

    items: Annotated[list[str], DeltaChannel(extend, snapshot_frequency=1000)]
    n: int


class Snapshots(TypedDict):
    """A DeltaChannel that snapshots at every update."""

    items: Annotated[list[str], DeltaChannel(extend, snapshot_frequency=1)]
    n: int


def count_then_write(schema: type[Any]) -> Any:
    """``count`` leaves ``items`` alone, so the checkpoints before ``write`` name it at
    the version the previous turn (maybe another kind of channel) left."""
    g = StateGraph(schema)
    g.add_node("count", lambda s: {"n": s["n"] + 1})
    g.add_node("write", lambda s: {"items": [f"w{s['n']}"]})
    g.add_edge(START, "count")
    g.add_edge("count", "write")
    g.add_edge("write", END)
    return g


def cfg() -> RunnableConfig:
    return {"configurable": {"thread_id": THREAD, "checkpoint_ns": ""}}


def values(tup: CheckpointTuple | None) -> dict[str, Any]:
    """A checkpoint's channel values as compared: a snapshot kept apart from a list."""
    assert tup is not None
    return {ch: ("snapshot", v.value) if isinstance(v, _DeltaSnapshot) else v
            for ch, v in tup.checkpoint["channel_values"].items()}


def compared(tup: CheckpointTuple) -> dict[str, Any]:
    """What must match checkpoint by checkpoint (ids and version numbering aside)."""
    return {
        "values": values(tup),
        "channels": sorted(tup.checkpoint["channel_versions"]),
        "metadata": tup.metadata,
        "writes": [(channel, value) for _, channel, value in tup.pending_writes or ()],
    }


class HeadsOnTiered(TieredSaver):
    """TieredSaver that reads the latest checkpoint back after each put and each write,
    as a reader elsewhere would (hot copy where one is kept, else warm) and without
    this writer learning anything from the read: ``heads`` gets (step, values)."""

    heads: list[tuple[int, dict[str, Any]]]

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions
                   ) -> RunnableConfig:
        stored = await super().aput(config, checkpoint, metadata, new_versions)
        await self._read_head()
        return stored

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        await super().aput_writes(config, writes, task_id, task_path)
        await self._read_head()

    async def _read_head(self) -> None:
        record = await self.router.get(THREAD, "", None)
        assert record is not None
        head = self._to_tuple(record)
        self.heads.append((head.metadata["step"], values(head)))


KINDS: list[type[Any]] = [Plain, Plain, Sparse, Sparse, Plain, Plain, Snapshots, Snapshots,
                          Plain, Snapshots]
"""A turn per entry: plain list -> DeltaChannel -> plain list (over versions that store
nothing) -> DeltaChannel -> plain list (over snapshots) -> DeltaChannel again."""


async def run_turns(open_saver: Callable[[], AbstractAsyncContextManager[Any]], *,
                    restart: bool, durability: Durability) -> None:
    """The turns of ``KINDS``; with ``restart`` each turn runs on a saver of its own
    (a process that never saw the thread: it learns it from its first read)."""
    async with AsyncExitStack() as stack:
        saver = None
        for turn, kind in enumerate(KINDS):
            if saver is None or restart:
                await stack.aclose()
                saver = await stack.enter_async_context(open_saver())
            app = count_then_write(kind).compile(checkpointer=saver)
            await app.ainvoke({"n": turn * 10}, cfg(), durability=durability)


async def checkpoints(saver: Any) -> list[dict[str, Any]]:
    """Every checkpoint of the thread, oldest first, each read by id."""
    listed = [tup async for tup in saver.alist(cfg())]
    read = [await saver.aget_tuple(tup.config) for tup in reversed(listed)]
    return [compared(tup) for tup in read if tup is not None]


@asynccontextmanager
async def reused(saver: InMemorySaver) -> AsyncIterator[InMemorySaver]:
    yield saver


@pytest.fixture(params=["embedded", "redis+postgres"])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


RESTARTS = {
    "one-saver": (False, False),
    "saver-per-turn": (True, False),  # processes sharing the hot tier
    "saver-per-turn-hot-flushed": (True, True),  # each starts with nothing in hot
}


@pytest.mark.parametrize("durability", ["async", "sync"])
@pytest.mark.parametrize("restarts", sorted(RESTARTS))
async def test_every_checkpoint_across_the_switches_reads_as_on_in_memory(
        urls: Urls, restarts: str, durability: Durability) -> None:
    restart, flush = RESTARTS[restarts]
    memory = InMemorySaver()
    await run_turns(lambda: reused(memory), restart=False, durability=durability)
    want = await checkpoints(memory)
    by_step = {c["metadata"]["step"]: c["values"] for c in want}
    # the first checkpoints of the DeltaChannel graph name the list at the version the
    # plain graph stored it at, and InMemorySaver hands that value back
    first_delta = next(c for c in want if "counters_since_delta_snapshot" in c["metadata"])
    assert first_delta["values"]["items"] == ["w1", "w11"]

    heads: list[tuple[int, dict[str, Any]]] = []

    @asynccontextmanager
    async def watched() -> AsyncIterator[HeadsOnTiered]:
        async with urls.open(HeadsOnTiered) as saver:
            assert isinstance(saver, HeadsOnTiered)
            saver.heads = heads
            if flush:
                await saver.regions.by_name["default"].invalidate_hot([THREAD])
            yield saver

    await run_turns(watched, restart=restart, durability=durability)
    assert {step for step, _ in heads} == set(by_step)
    for step, got in heads:
        assert got == by_step[step], f"step {step} read as the head"

    async with urls.open() as saver:
        got_all = await checkpoints(saver)
        assert len(got_all) == len(want)
        for got_one, wanted in zip(got_all, want, strict=True):
            assert got_one == wanted, f"step {wanted['metadata']['step']} read by id"
        await saver.regions.by_name["default"].invalidate_hot([THREAD])
        latest = await saver.aget_tuple(cfg())
        assert latest is not None
        assert compared(latest) == want[-1]
        # and the state LangGraph rebuilds from them holds the list of every turn
        app = count_then_write(KINDS[-1]).compile(checkpointer=saver)
        assert (await app.aget_state(cfg())).values["items"] == [
            f"w{turn * 10 + 1}" for turn in range(len(KINDS))]
