"""Delta chains of list channels on every stack: reads equal a plain saver's, always.

Each test drives a real LangGraph chat graph (``add_messages``) on a TieredSaver and the
same inputs on LangGraph's InMemorySaver, then compares every state of the history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import msgpack
import pytest
import zstandard
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from tests.stacks import STACKS, TIERED_STACKS, Urls
from tierstore import Keyring, TieredSaver
from tierstore.codec.chain import ChainLink, is_link_name
from tierstore.codec.frames import pack_stored
from tierstore.errors import CorruptPayload
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, IdleArchival
from tierstore.ops import EXPORT_FORMAT, EXPORT_MAGIC, export_thread, import_file, read_export
from tierstore.records import ListQuery

FUTURE = 10 * 365 * 86400.0
TURNS = 12


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def chat_graph() -> StateGraph[Chat]:
    def reply(state: Chat) -> dict[str, Any]:
        last = state["messages"][-1]
        return {"messages": [AIMessage(f"reply {prose(sum(map(ord, str(last.id))))}",
                                       id=f"a-{last.id}")]}

    graph = StateGraph(Chat)
    graph.add_node("reply", reply)
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph


def cfg(thread: str, **configurable: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread, **configurable}}


WORDS = [
    "plan", "meeting", "report", "draft", "email", "call", "note", "list", "idea", "question",
    "answer", "problem", "reason", "detail", "budget", "price", "order", "ticket", "flight",
    "hotel", "train", "weather", "dinner",
]


def prose(seed: int, nbytes: int = 500) -> str:
    """Text that compresses like a chat message, not like a run of one letter."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(nbytes // 6))


def said(turn: int) -> dict[str, Any]:
    return {"messages": [HumanMessage(f"turn {turn} {prose(turn)}", id=f"h{turn}")]}


async def converse(app: Any, thread: str, turns: range, **config: Any) -> None:
    for turn in turns:
        await app.ainvoke(said(turn), {**cfg(thread), **config})


async def history(app: Any, thread: str) -> list[Any]:
    return [s.values.get("messages") async for s in app.aget_state_history(cfg(thread))]


async def links_of(saver: TieredSaver, thread: str) -> set[str]:
    names: set[str] = set()
    async for record in saver.alist_records(ListQuery(thread_id=thread)):
        names.update(name for name in record.blobs if is_link_name(name))
    return names


@pytest.fixture(params=sorted(STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


@pytest.fixture
async def saver(urls: Urls) -> AsyncIterator[TieredSaver]:
    async with urls.open() as s:
        yield s


@pytest.fixture
async def reference() -> Any:
    app = chat_graph().compile(checkpointer=InMemorySaver())
    await converse(app, "t", range(TURNS))
    return app


async def test_a_long_conversation_stores_deltas_and_reads_like_a_plain_saver(
        saver: TieredSaver, reference: Any) -> None:
    app = chat_graph().compile(checkpointer=saver)
    await converse(app, "t", range(TURNS))
    assert await history(app, "t") == await history(reference, "t")
    assert "~1~messages" in await links_of(saver, "t")
    # time travel: fork from an old checkpoint, on both
    old = [s async for s in app.aget_state_history(cfg("t"))][7]
    ref_old = [s async for s in reference.aget_state_history(cfg("t"))][7]
    await app.ainvoke(said(100), old.config)
    await reference.ainvoke(said(100), ref_old.config)
    assert await history(app, "t") == await history(reference, "t")


async def test_a_second_saver_without_cache_continues_the_thread(
        urls: Urls, saver: TieredSaver, reference: Any) -> None:
    app = chat_graph().compile(checkpointer=saver)
    await converse(app, "t", range(TURNS - 3))
    async with urls.open() as other:
        await converse(chat_graph().compile(checkpointer=other), "t", range(TURNS - 3, TURNS))
        assert await history(chat_graph().compile(checkpointer=other), "t") == \
            await history(reference, "t")
    assert await history(app, "t") == await history(reference, "t")


async def test_prune_and_run_deletes_keep_the_bases_live_checkpoints_need(
        saver: TieredSaver) -> None:
    app = chat_graph().compile(checkpointer=saver)
    runs = [str(uuid.uuid4()) for _ in range(TURNS)]
    for turn, run in enumerate(runs):
        await app.ainvoke(said(turn), {**cfg("t"), "run_id": run})
    latest = (await app.aget_state(cfg("t"))).values["messages"]
    # the first runs wrote the snapshot of the chains the later checkpoints extend
    await saver.adelete_for_runs(runs[:3])
    assert (await app.aget_state(cfg("t"))).values["messages"] == latest
    for state in await history(app, "t"):
        assert state is None or [m.id for m in state] == [m.id for m in latest[:len(state)]]
    await saver.aprune(["t"], strategy="keep_latest")
    assert (await app.aget_state(cfg("t"))).values["messages"] == latest
    await converse(app, "t", range(TURNS, TURNS + 2))
    assert len((await app.aget_state(cfg("t"))).values["messages"]) == len(latest) + 4


async def test_copy_then_delete_the_source(saver: TieredSaver, reference: Any) -> None:
    app = chat_graph().compile(checkpointer=saver)
    await converse(app, "t", range(TURNS))
    await saver.acopy_thread("t", "copy")
    await saver.adelete_thread("t")
    assert await history(app, "copy") == await history(reference, "t")


async def test_export_carries_whole_values_and_imports(
        saver: TieredSaver, reference: Any, tmp_path: Path) -> None:
    app = chat_graph().compile(checkpointer=saver)
    await converse(app, "t", range(TURNS))
    path = tmp_path / "t.export"
    await export_thread(saver, "t", path)
    assert b"~1~messages" not in path.read_bytes()  # zstd'd, but names are short and many
    await import_file(saver, path, as_thread="back")
    assert await history(app, "back") == await history(reference, "t")


async def test_an_import_refuses_a_link_passed_off_as_a_whole_value(
        saver: TieredSaver, tmp_path: Path) -> None:
    """A crafted file whose channel value is a delta link must be refused before any
    write: imported, every read of the thread would fail."""
    app = chat_graph().compile(checkpointer=saver)
    await converse(app, "t", range(3))
    path = tmp_path / "t.export"
    await export_thread(saver, "t", path)
    _, records = read_export(path.read_bytes())
    last = records[-1]
    body = saver.codec.decode(last.checkpoint)
    version = body["channel_versions"]["messages"]
    messages = saver.codec.decode(last.blobs["messages"])
    crafted = dataclasses.replace(last, blobs={
        **last.blobs, "messages": saver.codec.encode_link(ChainLink(version, None, 0, messages))})
    write_export(tmp_path / "crafted.export", "t", [*records[:-1], crafted])
    with pytest.raises(CorruptPayload, match="delta link"):
        await import_file(saver, tmp_path / "crafted.export", as_thread="crafted")
    assert [r async for r in saver.alist_records(ListQuery(thread_id="crafted"))] == []


def write_export(path: Path, thread: str, records: list[Any]) -> None:
    """An export file around these records, as ``export_thread`` frames them."""
    body = zstandard.ZstdCompressor().compress(msgpack.packb({
        "format": EXPORT_FORMAT, "thread_id": thread, "exported_at": time.time(),
        "checkpoints": [pack_stored(r) for r in records]}, use_bin_type=True))
    path.write_bytes(EXPORT_MAGIC + bytes([EXPORT_FORMAT]) + hashlib.sha256(body).digest() + body)


async def test_encrypted_chains(urls: Urls, reference: Any) -> None:
    keyring = Keyring(current="k1", keys={"k1": Keyring.generate_key()})
    async with urls.open(encryption=keyring) as saver:
        app = chat_graph().compile(checkpointer=saver)
        await converse(app, "t", range(TURNS))
        assert await history(app, "t") == await history(reference, "t")
        async for record in saver.alist_records(ListQuery(thread_id="t")):
            for name, payload in record.blobs.items():
                if is_link_name(name):
                    assert "+delta+" in payload.tag and "aesgcm" in payload.tag


async def test_a_base_deleted_under_the_writer_is_stored_again(
        urls: Urls, saver: TieredSaver) -> None:
    app = chat_graph().compile(checkpointer=saver)
    await converse(app, "t", range(4))
    parent = await saver.aget_tuple(cfg("t"))  # the writer now knows the chain
    assert parent is not None
    async with urls.open() as other:  # another process deletes the thread meanwhile
        await other.adelete_thread("t")
    old = parent.checkpoint["channel_values"]["messages"]
    new = [*old, HumanMessage("again", id="again")]
    version = saver.get_next_version(parent.checkpoint["channel_versions"]["messages"], None)
    checkpoint = {**parent.checkpoint, "id": _checkpoint_id(),
                  "channel_values": {"messages": new},
                  "channel_versions": {**parent.checkpoint["channel_versions"],
                                       "messages": version}}
    # its next version extends the chain: a delta naming links warm no longer holds
    await saver.aput(parent.config, checkpoint,  # type: ignore[arg-type]
                     {"source": "loop", "step": 9}, {"messages": version})
    async with urls.open() as fresh:  # no cache: read from warm alone
        latest = await fresh.aget_tuple(cfg("t"))
        assert latest is not None
        assert latest.checkpoint["channel_values"]["messages"] == new


def _checkpoint_id() -> str:
    from langgraph.checkpoint.base.id import uuid6

    return str(uuid6(clock_seq=-2))


@pytest.fixture(params=sorted(TIERED_STACKS))
def tiered(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


async def test_archive_and_rehydrate_keep_chains_whole(tiered: Urls, reference: Any) -> None:
    async with tiered.open() as saver:
        app = chat_graph().compile(checkpointer=saver)
        await converse(app, "t", range(TURNS - 2))
        history_policy = TieringPolicy(archive_after=60, archive_idle_after=None,
                                       segment_size=4)
        report = await HistoryDemotion(saver, history_policy).run_once(now=time.time() + FUTURE)
        assert report.errors == []
        idle = TieringPolicy(archive_after=None, archive_idle_after=60, segment_size=50)
        await converse(app, "t", range(TURNS - 2, TURNS - 1))
        report = await IdleArchival(saver, idle).run_once(now=time.time() + FUTURE)
        assert report.errors == []
        await converse(app, "t", range(TURNS - 1, TURNS))  # rehydrates, goes on
        assert await history(app, "t") == await history(reference, "t")


async def test_deltas_cut_the_bytes_stored_per_checkpoint(tmp_path: Path) -> None:
    """Channel values stored, per checkpoint, 20 turns: at least 3x fewer with deltas."""
    per_checkpoint = {}
    for delta in (True, False):
        db = tmp_path / f"{delta}.db"
        async with TieredSaver.from_urls(hot=None, warm=f"sqlite:///{db}", cold=None,
                                         delta=delta) as saver:
            app = chat_graph().compile(checkpointer=saver)
            await converse(app, "t", range(20))
        with contextlib.closing(sqlite3.connect(db)) as conn:
            (stored,), = conn.execute("SELECT sum(length(data)) FROM blobs")
            (count,), = conn.execute("SELECT count(*) FROM checkpoints")
        per_checkpoint[delta] = stored / count
    assert per_checkpoint[False] >= 3 * per_checkpoint[True], per_checkpoint


async def test_offloaded_bases(urls: Urls, reference: Any) -> None:
    async with urls.open(offload_threshold=1024) as saver:
        app = chat_graph().compile(checkpointer=saver)
        await converse(app, "t", range(TURNS))
        assert await history(app, "t") == await history(reference, "t")
        async with urls.open(offload_threshold=1024) as other:  # reads from warm alone
            again = chat_graph().compile(checkpointer=other)
            assert await history(again, "t") == await history(reference, "t")
