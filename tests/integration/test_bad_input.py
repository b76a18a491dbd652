"""Bad input gets a clear, typed error and never corrupts or loses stored data."""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6

from tests.stacks import STACKS, Stack, stack_params
from tierstore import (
    ConfigurationError,
    CorruptPayload,
    InvalidInput,
    LifecycleError,
    TieredSaver,
    TierstoreError,
)
from tierstore.demo import build_agent
from tierstore.ops import export_thread, import_file

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


# -- every bad argument, on every stack ------------------------------------------------------


def _checkpoint(**values: Any) -> dict[str, Any]:
    cp: dict[str, Any] = dict(empty_checkpoint())
    cp["id"] = str(uuid6())
    cp["channel_values"] = values
    cp["channel_versions"] = {k: "1" for k in values}
    return cp


BIG = 1 << 70
NS = {"thread_id": "victim", "checkpoint_ns": ""}

# (what, call, the exact class, a fragment naming the bad part). ``call`` gets the saver
# and the config of the thread's latest checkpoint.
Call = Callable[[TieredSaver, dict[str, Any]], Awaitable[Any]]
BAD_CALLS: list[tuple[str, Call, type[TierstoreError], str]] = [
    ("checkpoint-not-a-dict",
     lambda s, c: s.aput(c, "checkpoint", {}, {}), InvalidInput, "checkpoint"),
    ("checkpoint-none", lambda s, c: s.aput(c, None, {}, {}), InvalidInput, "checkpoint"),
    ("channel-versions-not-a-dict",
     lambda s, c: s.aput(c, {**_checkpoint(), "channel_versions": ["a"]}, {}, {}),
     InvalidInput, "channel_versions"),
    ("channel-values-not-a-dict",
     lambda s, c: s.aput(c, {**_checkpoint(), "channel_values": 3}, {}, {}),
     InvalidInput, "channel_values"),
    ("metadata-none", lambda s, c: s.aput(c, _checkpoint(), None, {}), InvalidInput, "metadata"),
    ("metadata-not-a-dict",
     lambda s, c: s.aput(c, _checkpoint(), "md", {}), InvalidInput, "metadata"),
    ("new-versions-none",
     lambda s, c: s.aput(c, _checkpoint(), {}, None), InvalidInput, "new_versions"),
    ("value-serde-cannot-encode",
     lambda s, c: s.aput(c, _checkpoint(a=object()), {}, {"a": "1"}), InvalidInput, "'a'"),
    ("value-over-64-bits",
     lambda s, c: s.aput(c, _checkpoint(a=BIG), {}, {"a": "1"}), InvalidInput, "'a'"),
    ("metadata-serde-cannot-encode",
     lambda s, c: s.aput(c, _checkpoint(), {"x": object()}, {}), InvalidInput, "metadata"),
    ("metadata-over-64-bits",
     lambda s, c: s.aput(c, _checkpoint(), {"step": BIG}, {}), InvalidInput, "metadata"),
    ("channel-surrogate",
     lambda s, c: s.aput(c, _checkpoint(**{"\ud800": 1}), {}, {"\ud800": "1"}),
     InvalidInput, "channel"),
    ("channel-nul",
     lambda s, c: s.aput(c, _checkpoint(**{"a\x00": 1}), {}, {"a\x00": "1"}),
     InvalidInput, "channel"),
    ("channel-named-like-a-link",
     lambda s, c: s.aput(c, _checkpoint(**{"~0~notes": ["x"]}), {}, {"~0~notes": "1"}),
     InvalidInput, "'~0~notes'"),
    ("channel-named-like-a-link-without-value",
     lambda s, c: s.aput(c, {**_checkpoint(), "channel_versions": {"~12~notes": "1"}}, {},
                         {"~12~notes": "1"}), InvalidInput, "'~12~notes'"),
    ("version-surrogate",
     lambda s, c: s.aput(c, {**_checkpoint(a=1), "channel_versions": {"a": "\udc00"}}, {},
                         {"a": "\udc00"}), InvalidInput, "version"),
    ("writes-none", lambda s, c: s.aput_writes(c, None, "task"), InvalidInput, "writes"),
    ("writes-one-string", lambda s, c: s.aput_writes(c, "ab", "task"), InvalidInput, "writes"),
    ("write-1-tuple", lambda s, c: s.aput_writes(c, [("a",)], "task"), InvalidInput, "write 0"),
    ("write-3-tuple",
     lambda s, c: s.aput_writes(c, [("a", 1), ("a", 1, 2)], "task"), InvalidInput, "write 1"),
    ("write-a-string", lambda s, c: s.aput_writes(c, ["ab"], "task"), InvalidInput, "write 0"),
    ("write-channel-int",
     lambda s, c: s.aput_writes(c, [(1, "x")], "task"), InvalidInput, "channel"),
    ("write-channel-surrogate",
     lambda s, c: s.aput_writes(c, [("\ud800", "x")], "task"), InvalidInput, "channel"),
    ("write-value-serde-cannot-encode",
     lambda s, c: s.aput_writes(c, [("ok", 1), ("a", object())], "task"), InvalidInput, "'a'"),
    ("write-value-over-64-bits",
     lambda s, c: s.aput_writes(c, [("a", BIG)], "task"), InvalidInput, "'a'"),
    ("task-path-int",
     lambda s, c: s.aput_writes(c, [("a", 1)], "task", 5), InvalidInput, "task_path"),
    ("task-path-surrogate",
     lambda s, c: s.aput_writes(c, [("a", 1)], "task", "\ud800"), InvalidInput, "task_path"),
    ("filter-over-64-bits",
     lambda s, c: _drain(s.alist(c, filter={"step": BIG})), InvalidInput, "'step'"),
    ("filter-nan",
     lambda s, c: _drain(s.alist(c, filter={"score": math.nan})), InvalidInput, "'score'"),
    ("filter-key-not-a-string",
     lambda s, c: _drain(s.alist(c, filter={1: "x"})), InvalidInput, "filter"),
    ("filter-surrogate",
     lambda s, c: _drain(s.alist(c, filter={"source": "\ud800"})), InvalidInput, "'source'"),
    ("list-config-a-string",
     lambda s, c: _drain(s.alist("victim")), InvalidInput, "config"),
    ("list-configurable-a-list",
     lambda s, c: _drain(s.alist({"configurable": ["victim"]})), InvalidInput, "configurable"),
    ("list-before-a-string",
     lambda s, c: _drain(s.alist(c, before="x")), InvalidInput, "before"),
    ("list-before-no-configurable",
     lambda s, c: _drain(s.alist(c, before={})), InvalidInput, "before"),
    ("delete-for-runs-none", lambda s, c: s.adelete_for_runs(None), InvalidInput, "run_id"),
    ("prune-none", lambda s, c: s.aprune(None), InvalidInput, "thread_id"),
    ("next-version-garbage",
     lambda s, c: _sync(s.get_next_version, "garbage", None), InvalidInput, "version"),
    ("next-version-nan",
     lambda s, c: _sync(s.get_next_version, math.nan, None), InvalidInput, "version"),
    ("export-path-none",
     lambda s, c: export_thread(s, "victim", None), InvalidInput, "path"),
    ("export-path-surrogate",
     lambda s, c: export_thread(s, "victim", "\ud800.tsx"), InvalidInput, "path"),
    ("import-path-none", lambda s, c: import_file(s, None), InvalidInput, "path"),
    ("lease-ttl-inf", lambda s, c: _lease(s, ttl=math.inf), ConfigurationError, "ttl"),
    ("lease-ttl-nan", lambda s, c: _lease(s, ttl=math.nan), ConfigurationError, "ttl"),
    ("lease-ttl-string", lambda s, c: _lease(s, ttl="10"), ConfigurationError, "ttl"),
    ("lease-ttl-bool", lambda s, c: _lease(s, ttl=True), ConfigurationError, "ttl"),
    ("lease-wait-inf", lambda s, c: _lease(s, wait=math.inf), ConfigurationError, "wait"),
    ("lease-wait-negative", lambda s, c: _lease(s, wait=-1), ConfigurationError, "wait"),
]


async def _sync(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


async def _drain(items: AsyncIterator[Any]) -> list[Any]:
    return [x async for x in items]


async def _lease(saver: TieredSaver, **kwargs: Any) -> None:
    async with saver.lease("victim", **kwargs):
        pass


async def _state(saver: TieredSaver) -> list[Any]:
    """Everything a reader can see of the victim thread."""
    return [(t.checkpoint["id"], t.metadata, t.checkpoint["channel_values"], t.pending_writes)
            async for t in saver.alist({"configurable": {"thread_id": "victim"}})]


@pytest.fixture(params=stack_params())
def any_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Stack:
    return STACKS[request.param](request, tmp_path)


@pytest.mark.parametrize(("what", "call", "error", "fragment"), BAD_CALLS,
                         ids=[case[0] for case in BAD_CALLS])
async def test_bad_arguments_get_a_typed_error_and_write_nothing(
    any_stack: Stack, what: str, call: Call, error: type[TierstoreError], fragment: str,
) -> None:
    async with any_stack.open() as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember victim")]}, cfg("victim"))
        latest = await saver.aget_tuple(cfg("victim"))
        assert latest is not None
        before = await _state(saver)
        with pytest.raises(TierstoreError) as info:
            await call(saver, dict(latest.config))
        assert type(info.value) is error, repr(info.value)
        assert fragment in str(info.value)
        assert await _state(saver) == before
        assert (await app.aget_state(cfg("victim"))).values["notes"] == ["victim"]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("hot_ttl", "10"), ("hot_ttl", math.inf), ("hot_ttl", math.nan), ("hot_ttl", True),
        ("hot_local_entries", None), ("hot_local_entries", 1.5), ("hot_local_entries", True),
        ("hot_write_delay", "0.1"), ("offload_threshold", None), ("offload_threshold", 2.0**20),
        ("compression_level", 3.5), ("compression_level", False), ("compress_min", "1"),
        ("filterable_metadata", "source"), ("filterable_metadata", ("source", 1)),
        ("encryption", "secret-key"), ("concurrency", ["strict"]),
    ],
    ids=lambda v: repr(v)[:24],
)
def test_option_values_of_the_wrong_type_name_the_option(tmp_path: Path, option: str,
                                                         value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        embedded(tmp_path, **{option: value})
    assert type(info.value) is ConfigurationError
    assert option in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"warm": "sqlite:///{tmp}/w.db?bogus=1"}, "bogus"),
        ({"warm": "sqlite:///{tmp}/w.db?timeout=inf"}, "timeout"),
        ({"warm": "sqlite:///{tmp}/w.db?timeout=-1"}, "timeout"),
        ({"cold": "file://{tmp}/cold?storage_class=GLACIER"}, "storage_class"),
        ({"hot": "memory://?bogus=1"}, "bogus"),
    ],
    ids=["sqlite-unknown", "sqlite-timeout-inf", "sqlite-timeout-negative", "file-unknown",
         "memory-unknown"],
)
def test_unknown_url_options_are_refused_by_name(tmp_path: Path, kwargs: dict[str, str],
                                                 fragment: str) -> None:
    urls = {"hot": "memory://", "warm": f"sqlite:///{tmp_path}/w.db",
            "cold": f"file://{tmp_path}/cold"}
    urls.update({k: v.format(tmp=tmp_path) for k, v in kwargs.items()})
    with pytest.raises(ConfigurationError) as info:
        TieredSaver.from_urls(**urls)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"regions": "eu"}, "regions"),
        ({"regions": {"eu": "sqlite:///x.db"}}, "'eu'"),
        ({"rules": "eu-*"}, "rules"),
        ({"rules": [("eu-*",)]}, "rule 0"),
        ({"rules": [("eu-*", 1)]}, "rule 0"),
        ({"rules": (r for r in [("eu-*", "eu")])}, "rules"),
        ({"default_region": ["eu"]}, "default_region"),
        ({"resolver": "eu"}, "resolver"),
    ],
    ids=["regions-str", "region-str", "rules-str", "rule-1-tuple", "rule-int", "rules-generator",
         "default-list", "resolver-str"],
)
def test_malformed_region_specs_are_refused_by_name(tmp_path: Path, kwargs: dict[str, Any],
                                                    fragment: str) -> None:
    spec: dict[str, Any] = {"regions": {"eu": {"warm": f"sqlite:///{tmp_path}/eu.db"}}}
    spec.update(kwargs)
    with pytest.raises(ConfigurationError) as info:
        TieredSaver.from_regions(**spec)
    assert fragment in str(info.value)


async def test_export_into_a_missing_directory_is_refused(tmp_path: Path) -> None:
    async with embedded(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember t")]}, cfg("t"))
        with pytest.raises(InvalidInput, match="no/such"):
            await export_thread(saver, "t", tmp_path / "no" / "such" / "t.tsx")
        with pytest.raises(InvalidInput):
            await export_thread(saver, "t", tmp_path)  # a directory, not a file
        assert not (tmp_path / "no").exists()


async def test_export_is_written_atomically(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed export leaves the previous file whole and no temporary behind."""
    target = tmp_path / "out" / "t.tsx"
    target.parent.mkdir()
    async with embedded(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember t")]}, cfg("t"))
        await export_thread(saver, "t", target)
        good = target.read_bytes()
        await app.ainvoke({"messages": [HumanMessage("remember more")]}, cfg("t"))

        def fail(*args: Any, **kwargs: Any) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", fail)
        with pytest.raises(InvalidInput, match="space"):
            await export_thread(saver, "t", target)
        monkeypatch.undo()
        assert target.read_bytes() == good
        assert sorted(p.name for p in target.parent.iterdir()) == ["t.tsx"]
        await export_thread(saver, "t", target)
        assert target.read_bytes() != good
