"""Bad input gets a clear, typed error and never corrupts or loses stored data."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from tierstore import (
    ConfigurationError,
    CorruptPayload,
    InvalidInput,
    LifecycleError,
    TieredSaver,
    TierstoreError,
)
from tierstore.demo import build_agent

ODD_THREAD_IDS = [
    "线程-スレッド-🧵",
    "a/b/c",
    "../../../etc/passwd",
    "..",
    "*",
    "a:b:c",
    "{$ne: 1}",
    "'; DROP TABLE checkpoints; --",
    "%_%",
    " leading and trailing ",
    "x" * 10_000,
]


def embedded(tmp_path: Path, **options: Any) -> TieredSaver:
    return TieredSaver.from_urls(
        hot="memory://", warm=f"sqlite:///{tmp_path}/warm.db", cold=f"file://{tmp_path}/cold",
        **options,
    )


def cfg(thread: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


@pytest.mark.parametrize("thread", ODD_THREAD_IDS, ids=lambda t: repr(t)[:20])
async def test_odd_thread_ids_are_isolated_data(tmp_path: Path, thread: str) -> None:
    async with embedded(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember neighbour")]}, cfg("neighbour"))
        await app.ainvoke({"messages": [HumanMessage("remember odd")]}, cfg(thread))
        state = await app.aget_state(cfg(thread))
        assert state.values["notes"] == ["odd"]
        listed = {t.config["configurable"]["thread_id"] async for t in saver.alist(cfg(thread))}
        assert listed == {thread}
        await saver.adelete_thread(thread)
        assert await saver.aget_tuple(cfg(thread)) is None
        assert (await app.aget_state(cfg("neighbour"))).values["notes"] == ["neighbour"]


@pytest.mark.parametrize(
    "config",
    [{}, {"configurable": {}}, {"configurable": {"thread_id": None}}, None, "thread-1"],
    ids=["empty", "no-thread", "none-thread", "none", "string"],
)
async def test_missing_thread_id_is_invalid_input(tmp_path: Path, config: Any) -> None:
    async with embedded(tmp_path) as saver:
        with pytest.raises(InvalidInput, match=r"thread_id|config"):
            await saver.aget_tuple(config)


@pytest.mark.parametrize("thread", ["", "nul\x00byte", "\ud800"],
                         ids=["empty", "nul", "surrogate"])
async def test_illegal_thread_ids_are_refused_before_any_write(tmp_path: Path,
                                                              thread: Any) -> None:
    async with embedded(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        with pytest.raises(InvalidInput):
            await app.ainvoke({"messages": [HumanMessage("hi")]}, cfg(thread))
        assert [t async for t in saver.alist(None)] == []


@pytest.mark.parametrize("thread", [b"bytes", ["list"], 3.5, True, object()],
                         ids=["bytes", "list", "float", "bool", "object"])
async def test_non_string_thread_ids_are_refused_by_the_saver(tmp_path: Path,
                                                              thread: Any) -> None:
    async with embedded(tmp_path) as saver:
        with pytest.raises(InvalidInput, match="thread_id must be a string"):
            await saver.aget_tuple(cfg(thread))
        with pytest.raises(InvalidInput):
            await saver.adelete_thread(thread)


async def test_int_thread_ids_are_their_string_form(tmp_path: Path) -> None:
    async with embedded(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember seven")]}, cfg(7))
        assert (await app.aget_state(cfg("7"))).values["notes"] == ["seven"]


async def test_unknown_checkpoint_id_is_none(tmp_path: Path) -> None:
    async with embedded(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("hi")]}, cfg("t"))
        missing = {"configurable": {"thread_id": "t", "checkpoint_id": "no-such-checkpoint"}}
        assert await saver.aget_tuple(missing) is None
        assert [x async for x in saver.alist(missing)] == []


async def test_put_writes_without_checkpoint_id_is_refused(tmp_path: Path) -> None:
    async with embedded(tmp_path) as saver:
        with pytest.raises(InvalidInput, match="checkpoint_id"):
            await saver.aput_writes(cfg("t"), [("ch", 1)], "task")


async def test_unknown_prune_strategy_is_refused(tmp_path: Path) -> None:
    async with embedded(tmp_path) as saver:
        with pytest.raises(InvalidInput, match="strategy"):
            await saver.aprune(["t"], strategy="everything")
        with pytest.raises(InvalidInput):
            await saver.aprune("t")


def _damage(db: Path, sql: str) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(sql)
    conn.close()


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE blobs SET data = substr(data, 1, length(data) / 2) WHERE length(data) > 16",
        "UPDATE blobs SET data = X'DEADBEEF'",
        "UPDATE checkpoints SET checkpoint = X'00'",
        "UPDATE blobs SET tag = 'msgpack+zstd' WHERE tag = 'msgpack'",
        "UPDATE checkpoints SET metadata_tag = 'no-such-serde'",
    ],
    ids=["truncated", "garbage", "garbage-checkpoint", "wrong-stage", "unknown-tag"],
)
async def test_corrupt_stored_payload_is_a_typed_error(tmp_path: Path, damage: str) -> None:
    async with embedded(tmp_path, hot_check="verify") as saver:
        app = build_agent().compile(checkpointer=saver)
        big = "long message " * 100  # large enough to be compressed
        await app.ainvoke({"messages": [HumanMessage(big)]}, cfg("victim"))
        await app.ainvoke({"messages": [HumanMessage("hello")]}, cfg("bystander"))
    _damage(tmp_path / "warm.db", damage)
    async with embedded(tmp_path) as saver:  # fresh hot tier: reads go to warm
        with pytest.raises(CorruptPayload) as info:
            await saver.aget_tuple(cfg("victim"))
        assert "victim" in str(info.value)
        with pytest.raises(CorruptPayload):
            _ = [t async for t in saver.alist(cfg("victim"))]


async def test_tuple_survives_only_untouched_threads(tmp_path: Path) -> None:
    async with embedded(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember safe")]}, cfg("safe"))
        await app.ainvoke({"messages": [HumanMessage("x " * 400)]}, cfg("victim"))
    _damage(tmp_path / "warm.db", "UPDATE blobs SET data = X'00' WHERE thread_id = 'victim'")
    async with embedded(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        assert (await app.aget_state(cfg("safe"))).values["notes"] == ["safe"]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"warm": "nosuch://x"}, "unknown warm tier scheme 'nosuch'"),
        ({"hot": "memcached://x"}, "unknown hot tier scheme 'memcached'"),
        ({"cold": "ftp://x/y"}, "unknown cold tier scheme 'ftp'"),
        ({"warm": "not a url"}, "no scheme"),
        ({"warm": ""}, "non-empty"),
        ({"warm": "postgresql://u:secret@host:99999/db"}, "malformed URL"),
        ({"hot": "memory://somehost"}, "takes no host"),
        ({"warm": "sqlite:///x.db?synchronous=sometimes"}, "synchronous"),
        ({"concurrency": "yolo"}, "concurrency"),
        ({"hot_ttl": 0}, "hot_ttl"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_bad_configuration_names_the_bad_part(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        TieredSaver.from_urls(**kwargs)
    assert fragment in str(info.value)
    assert "secret" not in str(info.value)


async def test_unopened_and_closed_savers_refuse_work(tmp_path: Path) -> None:
    saver = embedded(tmp_path)
    with pytest.raises(LifecycleError, match="not open"):
        await saver.aget_tuple(cfg("t"))
    async with saver:
        assert await saver.aget_tuple(cfg("t")) is None
    with pytest.raises(LifecycleError, match="closed"):
        await saver.aget_tuple(cfg("t"))
    await saver.aclose()  # idempotent
    with pytest.raises(LifecycleError):
        await saver.open()


async def test_sync_call_on_the_savers_own_loop_is_refused(tmp_path: Path) -> None:
    async with embedded(tmp_path) as saver:
        with pytest.raises(LifecycleError, match="deadlock"):
            saver.get_tuple(cfg("t"))
        with pytest.raises(LifecycleError, match="deadlock"):
            list(saver.list(cfg("t")))
        # from another thread the same sync call works
        assert await asyncio.to_thread(saver.get_tuple, cfg("t")) is None


def test_errors_form_one_tree() -> None:
    assert issubclass(InvalidInput, TierstoreError) and issubclass(InvalidInput, ValueError)
    assert issubclass(CorruptPayload, TierstoreError)
    assert issubclass(ConfigurationError, ValueError)
