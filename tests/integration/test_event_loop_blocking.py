"""No blocking call on the event loop, anywhere in tierstore.

LangGraph's Agent Server (``langgraph dev``, langgraph-api) runs graphs with
blockbuster's detector on: a blocking call made on the event loop raises
``BlockingError`` and fails the run. These tests turn the same detector on (its
default functions: file system, sockets, SQLite, ``time.sleep``, locks) plus what it
does not watch and a server must not do on its loop either: ``open``, ``fsync``,
``sqlite3.connect``, and zstd, AES-GCM, SHA-256 and msgpack work on payloads of
``LARGE`` bytes or more (``tierstore.offthread``). Every saver call, the archive and
restore jobs and export/import then run on a stack whose directory does not exist
yet, with offloaded payloads and encryption on.

Every detection is also recorded, so one that tierstore caught and handled (a
degraded tier, say) still fails the test, and the failure lists them all.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import certifi
import pytest
import zstandard
from blockbuster import BlockBuster, BlockBusterFunction, blockbuster
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint

from tests.servers.postgres import PrivateCluster
from tierstore import Keyring, TieredSaver
from tierstore.demo import build_agent
from tierstore.errors import TierstoreError
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, IdleArchival, Rehydrate, request_restore
from tierstore.offthread import LARGE
from tierstore.ops import export_thread, import_file
from tierstore.settings import StoreUrl
from tierstore.tiers.postgres import PostgresWarm
from tierstore.tiers.postgres.connect import resolve

LATER = 86400.0


@dataclass
class Seen:
    """Every blocking call the detector refused, with where it was made."""

    calls: list[str] = field(default_factory=list)

    def report(self) -> str:
        return "\n\n".join(self.calls)


def _large(*args: Any, **kw: Any) -> bool:
    """CPU work on bytes: small inputs are fine inline, large ones are not."""
    sizes = [len(a) for a in (*args, *kw.values())
             if isinstance(a, bytes | bytearray | memoryview)]
    return max(sizes, default=0) >= LARGE


def _small(*args: Any, **kw: Any) -> bool:
    return not _large(*args, **kw)


def _extra_functions() -> dict[str, BlockBusterFunction]:
    """What blockbuster's defaults leave out that must not run on the loop either."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    functions = {
        name: BlockBusterFunction(None, name)
        for name in ("builtins.open", "io.open", "os.fsync", "os.makedirs", "sqlite3.connect")
    }
    cpu: list[tuple[Any, str, str]] = [
        (None, "hashlib.sha256", "hashlib.sha256"),
        (None, "msgpack.packb", "msgpack.packb"),
        (None, "msgpack.unpackb", "msgpack.unpackb"),
    ]
    for module, name, label in cpu:
        functions[label] = BlockBusterFunction(module, name, can_block_predicate=_small)
    stream = type(zstandard.ZstdDecompressor().decompressobj())
    for label, owner, name in [
        ("AESGCM.encrypt", AESGCM, "encrypt"),
        ("AESGCM.decrypt", AESGCM, "decrypt"),
        ("ZstdCompressor.compress", zstandard.ZstdCompressor, "compress"),
        ("ZstdDecompressor.decompress", zstandard.ZstdDecompressor, "decompress"),
        ("ZstdDecompressionObj.decompress", stream, "decompress"),
    ]:
        functions[label] = BlockBusterFunction(owner, name, can_block_predicate=_small)
    return functions


@pytest.fixture
def detector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Seen]:
    """blockbuster on, as langgraph-api turns it on, plus ``_extra_functions``."""
    seen = Seen()

    class Recorded(blockbuster.BlockingError):
        def __init__(self, func: str) -> None:
            super().__init__(func)
            stack = "".join(traceback.format_stack(limit=14)[:-2])
            seen.calls.append(f"{func}:\n{stack}")

    monkeypatch.setattr(blockbuster, "BlockingError", Recorded)
    bb = BlockBuster()
    bb.functions.update(_extra_functions())
    _allow_pytest_and_tracebacks(bb)
    bb.activate()
    try:
        yield seen
    finally:
        bb.deactivate()


def _allow_pytest_and_tracebacks(bb: BlockBuster) -> None:
    """What the test harness itself does on the loop, never tierstore."""
    for name in ("os.stat", "builtins.open", "io.open", "io.BufferedReader.read",
                 "io.TextIOWrapper.read"):
        bb.functions[name].can_block_in("linecache.py", {"updatecache", "checkcache"})
        bb.functions[name].can_block_in("traceback.py", {"format_stack", "extract_stack"})


def saver_for(root: Path, **options: Any) -> TieredSaver:
    """The embedded stack under ``root`` (not created yet), encrypted, offloading."""
    keyring = Keyring(current="k1", keys={"k1": bytes(range(32))})
    return TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{root}/warm/warm.db",
                                 cold=f"file://{root}/cold", encryption=keyring,
                                 offload_threshold=64 * 1024, hot_write_delay=0, **options)


def cfg(thread: str, **extra: Any) -> RunnableConfig:
    return {"configurable": {"thread_id": thread, "checkpoint_ns": "", **extra}}


def big_text() -> str:
    """Text that does not compress: it stays large through every stage."""
    return os.urandom(4 * LARGE).hex()


async def drive(saver: TieredSaver, root: Path) -> None:
    """Every saver call, the jobs, and export/import, with large payloads."""
    app = build_agent().compile(checkpointer=saver)
    big = big_text()
    await app.ainvoke({"messages": [HumanMessage("remember silver")]}, cfg("t1"))
    await app.ainvoke({"messages": [HumanMessage(big)]}, cfg("t1"))
    await app.ainvoke({"messages": [HumanMessage("what do you remember")]}, cfg("t1"))
    state = await app.aget_state(cfg("t1"))
    assert any(m.content == big for m in state.values["messages"])
    history = [s async for s in app.aget_state_history(cfg("t1"))]
    assert len(history) >= 6

    # the saver's own calls, one by one
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"doc": big}
    checkpoint["channel_versions"] = {"doc": "1"}
    written = await saver.aput(cfg("t2"), checkpoint, {"source": "input", "step": -1,
                                                       "run_id": "run-2"}, {"doc": "1"})
    await saver.aput_writes(written, [("doc", big), ("small", "x")], task_id="task-1")
    got = await saver.aget_tuple(written)
    assert got is not None and got.checkpoint["channel_values"]["doc"] == big
    assert got.pending_writes and got.pending_writes[0][2] == big
    listed = [t async for t in saver.alist(cfg("t1"), limit=3)]
    assert len(listed) == 3
    assert [t async for t in saver.alist(None, filter={"source": "input"}, limit=2)]
    await saver.aget_delta_channel_history(config=history[0].config, channels=["messages"])
    await saver.acopy_thread("t2", "t2-copy")
    assert await saver.aget_tuple(cfg("t2-copy")) is not None
    await saver.adelete_for_runs(["run-2"])
    await saver.aprune(["t1"], strategy="keep_latest")
    await app.ainvoke({"messages": [HumanMessage("more")]}, cfg("t1"))
    await app.ainvoke({"messages": [HumanMessage(big)]}, cfg("t3"))
    await app.ainvoke({"messages": [HumanMessage("and more")]}, cfg("t3"))

    # archive and restore
    later = time.time() + LATER
    demoted = await HistoryDemotion(saver, TieringPolicy(archive_after=60,
                                                         archive_idle_after=None)
                                    ).run_once(now=later)
    assert demoted.checkpoints > 0, demoted
    idle = await IdleArchival(saver, TieringPolicy(archive_after=None, archive_idle_after=60)
                              ).run_once(now=later)
    assert idle.threads > 0, idle
    archived = [s async for s in app.aget_state_history(cfg("t3"))]
    assert any(any(m.content == big for m in s.values.get("messages", [])) for s in archived)
    await request_restore(saver, "t3")
    await Rehydrate(saver).run_once()

    # export, import, delete
    export = root / "t3.tsx"
    await export_thread(saver, "t3", export)
    imported = await import_file(saver, export, as_thread="t3-imported")
    assert imported["checkpoints"] > 0
    again = await app.aget_state(cfg("t3-imported"))
    assert any(m.content == big for m in again.values["messages"])
    for thread in ("t1", "t2-copy", "t3", "t3-imported"):
        await saver.adelete_thread(thread)
    assert await saver.aget_tuple(cfg("t1")) is None


async def test_embedded_stack_never_blocks_the_loop(tmp_path: Path, detector: Seen) -> None:
    root = tmp_path / "fresh" / uuid.uuid4().hex
    try:
        async with saver_for(root) as saver:
            await drive(saver, root)
    finally:
        assert not detector.calls, (
            f"{len(detector.calls)} blocking call(s) on the event loop:\n{detector.report()}")
    assert await asyncio.to_thread((root / "warm" / "warm.db").exists)


async def test_setup_alone_never_blocks_the_loop(tmp_path: Path, detector: Seen) -> None:
    """Opening and closing, nothing else: what every Agent Server run does first."""
    root = tmp_path / "fresh" / uuid.uuid4().hex
    try:
        saver = saver_for(root)
        await saver.open()
        await saver.aclose()
    finally:
        assert not detector.calls, (
            f"{len(detector.calls)} blocking call(s) on the event loop:\n{detector.report()}")


@pytest.fixture
async def redis_hot(redis_url: str) -> AsyncIterator[str]:
    """The hot tier's URL, with a key prefix of its own purged after the detector is off."""
    from tests.servers.redis import purge, unique_prefix, with_query

    prefix = unique_prefix()
    yield with_query(redis_url, prefix=prefix)
    await purge(redis_url, prefix)


async def test_server_stack_never_blocks_the_loop(tmp_path: Path, redis_hot: str,
                                                  detector: Seen, postgres_url: str,
                                                  moto_endpoint: str) -> None:
    """Redis + PostgreSQL + S3: connecting reads no password file, certificate or
    botocore model on the loop, and nothing else does either."""
    run = uuid.uuid4().hex[:10]
    sep = "&" if "?" in postgres_url else "?"
    keyring = Keyring(current="k1", keys={"k1": bytes(range(32))})
    try:
        async with TieredSaver.from_urls(
            hot=redis_hot,
            warm=f"{postgres_url}{sep}schema=loop_{run}",
            cold=f"s3://loop-{run}/cold?endpoint_url={moto_endpoint}&region=us-east-1",
            encryption=keyring, offload_threshold=64 * 1024, hot_write_delay=0,
        ) as saver:
            await drive(saver, tmp_path)
    finally:
        assert not detector.calls, (
            f"{len(detector.calls)} blocking call(s) on the event loop:\n{detector.report()}")


@pytest.fixture
def passfile_only(tmp_path: Path, postgres_cluster: PrivateCluster,
                  monkeypatch: pytest.MonkeyPatch) -> str:
    """A URL without the password its role needs; ``PGPASSFILE`` names a file holding it."""
    good = postgres_cluster.require_password("loop_pw", "s3cret-Pa55")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{postgres_cluster.port}:*:loop_pw:s3cret-Pa55\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    return good.replace(":s3cret-Pa55@", "@")


async def test_postgres_password_from_the_passfile_read_off_the_loop(
        passfile_only: str, detector: Seen) -> None:
    """A password asyncpg finds in the password file, read in a thread once: every
    connection the pool opens (two here) authenticates with it."""
    warm = PostgresWarm.from_url(StoreUrl.parse(passfile_only),
                                 min_size=2, schema=f"pw_{uuid.uuid4().hex[:8]}")
    try:
        await warm.setup()
        try:
            assert await warm.head("none", "") is None
        finally:
            await warm.aclose()
    finally:
        assert not detector.calls, (
            f"{len(detector.calls)} blocking call(s) on the event loop:\n{detector.report()}")


@pytest.mark.parametrize(("query", "attempts"), [
    ("", ["tls", "plain"]),  # prefer: asyncpg's default over TCP
    ("?sslmode=prefer", ["tls", "plain"]),
    ("?sslmode=allow", ["plain", "tls"]),
    ("?sslmode=disable", ["plain"]),
    ("?sslmode=require", ["tls"]),
    ("?sslmode=verify-full&sslrootcert=" + certifi.where(), ["tls"]),
])
def test_sslmode_keeps_its_meaning(query: str, attempts: list[str]) -> None:
    connector = resolve(f"postgresql://u:p@127.0.0.1:5432/db{query}", {})
    assert connector is not None
    assert ["tls" if a else "plain" for a in connector.attempts] == attempts


async def test_sslmode_require_is_not_downgraded(postgres_url: str) -> None:
    """The local server speaks no TLS: ``require`` refuses it, ``allow`` connects."""
    sep = "&" if "?" in postgres_url else "?"
    required = PostgresWarm.from_url(StoreUrl.parse(f"{postgres_url}{sep}sslmode=require"),
                                     connect_timeout=5)
    with pytest.raises(TierstoreError):
        await required.setup()
    allowed = PostgresWarm.from_url(StoreUrl.parse(f"{postgres_url}{sep}sslmode=allow"),
                                    schema=f"allow_{uuid.uuid4().hex[:8]}")
    await allowed.setup()
    await allowed.aclose()
