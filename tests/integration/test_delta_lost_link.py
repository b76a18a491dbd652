"""A list channel stored as a delta chain of one link (``~0~<channel>``) that warm lost.

A link is never an empty value: a checkpoint that names one needs its row. SQLite and
MongoDB refuse such a checkpoint (``CorruptPayload``), and archiving leaves it warm and
reports it. On PostgreSQL, which keeps no row for an empty channel, the missing row of
the chain's only link reads as "no value": the read hands back a state without the
channel, the tiering jobs pack the checkpoint as it reads and report nothing, and a
``DeltaChannel`` seeded by it, once read from its segment, walks past it and rebuilds
a different list (here the items twice). Live, before the move, the same history is
refused: archiving is what hides the loss.

The channel starts as a plain ``list`` (no reducer: each node writes the whole list),
then becomes a ``DeltaChannel``; the last checkpoint before the switch is the seed.

The stores tell a link from a channel by its name alone, so a channel named like a
link (``~1~items``) is refused when a checkpoint first names it: kept, it would read as
part of ``items`` in a history walk (MongoDB, and every segment), and when empty (a
``DeltaChannel`` between snapshots) as a lost link on PostgreSQL.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.channels import DeltaChannel
from langgraph.graph import END, START, StateGraph

from tests.stacks import ARCHIVING_STACKS, Urls
from tierstore import TieredSaver
from tierstore.errors import CorruptPayload, InvalidInput
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, IdleArchival

STACKS = ["embedded", "postgres+file"]
EVERYTHING = TieringPolicy(archive_after=0, archive_idle_after=0, keep_latest=1, segment_size=2)


@pytest.fixture(params=STACKS)
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return ARCHIVING_STACKS[request.param](request, tmp_path)


def concat(state: list[Any], writes: list[Any]) -> list[Any]:
    return [*state, *(item for write in writes for item in write)]


class Whole(TypedDict):
    items: list[str]


class Delta(TypedDict):
    items: Annotated[list[str], DeltaChannel(concat, snapshot_frequency=3)]


def whole_graph() -> Any:
    g: StateGraph[Whole] = StateGraph(Whole)
    g.add_node("a", lambda s: {"items": [*s["items"], f"a{len(s['items'])}"]})
    g.add_edge(START, "a")
    g.add_edge("a", END)
    return g


def delta_graph() -> Any:
    g: StateGraph[Delta] = StateGraph(Delta)
    g.add_node("a", lambda s: {"items": [f"a{len(s['items'])}"]})
    g.add_edge(START, "a")
    g.add_edge("a", END)
    return g


def cfg(thread: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread}}


async def lose_link(saver: TieredSaver, thread: str, checkpoint_id: str) -> None:
    """Delete the row of the ``~0~items`` link the checkpoint names (storage damage)."""
    warm: Any = saver.regions.for_thread(thread).warm
    if warm.backend == "sqlite":
        def run(conn: Any) -> int:
            return int(conn.execute(
                "DELETE FROM blobs WHERE thread_id = ? AND checkpoint_ns = '' "
                "AND channel = '~0~items' AND version = (SELECT json_extract("
                "channel_versions, '$.\"~0~items\"') FROM checkpoints WHERE thread_id = ? "
                "AND checkpoint_ns = '' AND checkpoint_id = ?)",
                (thread, thread, checkpoint_id)).rowcount)

        deleted = await warm._run(run)
    else:
        status = await warm._run("test", lambda conn: conn.execute(
            "DELETE FROM tierstore_blobs AS b USING tierstore_checkpoints AS c "
            "WHERE c.checkpoint_id = $1 AND b.sid = c.sid AND b.channel = '~0~items' "
            "AND b.version = c.channel_versions ->> '~0~items'", checkpoint_id))
        deleted = int(status.split()[-1])
    assert deleted == 1


async def archive_everything(saver: TieredSaver) -> list[str]:
    errors: list[str] = []
    now = time.time() + 1
    for job in (HistoryDemotion(saver, EVERYTHING), IdleArchival(saver, EVERYTHING)):
        errors.extend((await job.run_once(now=now)).errors)
    return errors


async def seeded_thread(saver: TieredSaver, thread: str
                        ) -> tuple[RunnableConfig, str, dict[str, Any]]:
    """One turn as a whole list, then DeltaChannel turns; returns the seed's config, the
    checkpoint id of the first DeltaChannel turn's end and its state's values."""
    whole = whole_graph().compile(checkpointer=saver)
    await whole.ainvoke({"items": ["u0"]}, cfg(thread))
    seed = await saver.aget_tuple(cfg(thread))
    assert seed is not None
    delta = delta_graph().compile(checkpointer=saver)
    await delta.ainvoke({"items": ["u1"]}, cfg(thread))
    first = await saver.aget_tuple(cfg(thread))
    assert first is not None
    values = (await delta.aget_state(first.config)).values
    assert values == {"items": ["u0", "a1", "u1", "a3"]}
    for i in range(3):  # a snapshot comes later: the seed and this turn may be archived
        await delta.ainvoke({"items": [f"v{i}"]}, cfg(thread))
    return seed.config, first.config["configurable"]["checkpoint_id"], values


async def test_a_lost_only_link_is_refused_and_archiving_reports_it(urls: Urls) -> None:
    async with urls.open() as saver:
        seed, _, _ = await seeded_thread(saver, "lost-link")
        await lose_link(saver, "lost-link", seed["configurable"]["checkpoint_id"])
    async with urls.open() as saver:  # nothing cached from before the damage
        with pytest.raises(CorruptPayload, match="'items'"):
            await saver.aget_tuple(seed)
        errors = await archive_everything(saver)
        assert any("'items'" in line for line in errors), errors
        with pytest.raises(CorruptPayload, match="'items'"):
            await saver.aget_tuple(seed)


async def test_a_seed_that_lost_its_only_link_is_refused_after_archiving(urls: Urls) -> None:
    async with urls.open() as saver:
        seed, first_id, _ = await seeded_thread(saver, "lost-seed")
        await lose_link(saver, "lost-seed", seed["configurable"]["checkpoint_id"])
        first: RunnableConfig = {"configurable": {
            "thread_id": "lost-seed", "checkpoint_ns": "", "checkpoint_id": first_id}}
        app = delta_graph().compile(checkpointer=saver)
        with pytest.raises(CorruptPayload, match="'items'"):  # live: refused everywhere
            await app.aget_state(first)
        await archive_everything(saver)
    async with urls.open() as saver:
        app = delta_graph().compile(checkpointer=saver)
        refused = ""
        try:
            state = await app.aget_state(first)
        except CorruptPayload as exc:
            refused = str(exc)
        else:  # whole or refused (PostgreSQL rebuilt ['u0', 'u0', 'a1', 'u1', 'a3'])
            pytest.fail(f"rebuilt {state.values} from a seed that lost its link")
        assert "'items'" in refused


@pytest.mark.parametrize(("name", "delta"), [("~1~items", False), ("~0~items", True)])
async def test_a_channel_named_like_a_link_is_refused_before_it_is_stored(
        urls: Urls, name: str, delta: bool) -> None:
    """Beside a ``DeltaChannel`` ``items``: a plain list ``~1~items`` (a history walk
    would take it for a link of ``items``) or a ``DeltaChannel`` ``~0~items`` (no value
    between snapshots: on PostgreSQL no row, a lost link by its name)."""
    reducer: Any = concat
    items = Annotated[list[str], DeltaChannel(reducer, snapshot_frequency=3)]
    other: Any = Annotated[list[str], DeltaChannel(reducer, snapshot_frequency=3)] \
        if delta else list[str]
    typed_dict: Any = TypedDict  # a channel name that is no identifier
    state = typed_dict("state", {"items": items, name: other})
    g: StateGraph[Any] = StateGraph(state)
    g.add_node("a", lambda s: {"items": ["a"], name: ["o"] if delta else [*s[name], "o"]})
    g.add_edge(START, "a")
    g.add_edge("a", END)
    async with urls.open() as saver:
        app = g.compile(checkpointer=saver)
        with pytest.raises(InvalidInput, match=re.escape(repr(name)) + ".*rename"):
            await app.ainvoke({"items": ["u"], name: []}, cfg("named-like-a-link"))
        stored = [t async for t in saver.alist(cfg("named-like-a-link"))]
        assert all(name not in t.checkpoint["channel_versions"] for t in stored)
