"""The S3 cold tier failing under load: turns, archiving, restores and offloads keep going.

Four chat conversations turn at once through a ``TieredSaver`` whose cold tier is a
private moto server reached through a TCP proxy, with a small offload threshold so
their states go to S3 as they grow. Beside them, the tiering jobs archive every
thread (heads included) in a loop, so each next turn restores its thread on demand,
and a reader keeps reading threads back. Meanwhile S3 is cut (connections reset,
then refused for a while), stalled past the read timeout, or stopped and started
again on the same port (moto keeps its buckets in the process, so they survive).

Promised, and checked after each fault:

- every failed turn, read or job unit failed with ``TierUnavailable``: no driver
  error escaped, and no other kind of tierstore error (corruption) appeared;
- later calls succeed without help: every thread turns again, and an archive pass
  then runs without a single failure;
- nothing archived or acknowledged is lost: every acknowledged turn is in its
  thread's latest state (``Ledger.verify``), and through a fresh saver (no cached
  segments) every thread's history lists in full and a sample of its checkpoints
  reads back by id: the oldest, the newest, and every one written while the fault
  was on, so no listed checkpoint refers to a missing or half-written segment or
  offload. (Reading every checkpoint back found nothing more and took most of the run.)

Each fault ends as soon as it met traffic (a call failed on it), and every thread
then needs two acknowledged turns.

Waits poll a condition under a generous deadline; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loadtest.workload import build_chat_agent, thread_config
from tests.faults.conversations import DEADLINE, Conversations, until
from tests.integration.archiver import archive_everything
from tests.servers.proxy import TcpProxy
from tests.servers.redis import free_port
from tests.servers.s3 import s3_url
from tierstore import TieredSaver
from tierstore.errors import TierUnavailable

CONVERSATIONS = 4
MESSAGE_BYTES = 1500  # prose: a few turns of history pass the offload threshold
OFFLOAD_THRESHOLD = 4096
# one attempt and short timeouts, so a fault shows as a failure quickly
S3_OPTIONS = {"connect_timeout": "1", "read_timeout": "1", "max_attempts": "2"}
THINK_SECONDS = 0.1  # between a thread's turns, so the archiver gets its share
ARCHIVE_PAUSE = 0.02  # between two archive passes
CUTS = 2  # connection cuts, each followed by S3 work, before the refusal


class Moto:
    """A private moto server on a fixed port that a test stops and starts again."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port,
                                          verbose=False)
        self._server.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()


@pytest.fixture
def moto() -> Iterator[Moto]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = Moto()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Load:
    """Conversations, an archiver and a reader, until stopped; every outcome recorded."""

    saver: TieredSaver
    chats: Conversations
    errors: list[tuple[str, BaseException]] = field(default_factory=list)  # archiver, reader
    job_failures: dict[str, int] = field(default_factory=dict)  # error class -> count
    archived: int = 0
    reads: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def over(cls, saver: TieredSaver, threads: list[str]) -> Load:
        app = build_chat_agent(MESSAGE_BYTES).compile(checkpointer=saver)
        return cls(saver, Conversations(app, threads, message_bytes=MESSAGE_BYTES,
                                        pause=THINK_SECONDS))

    def start(self) -> None:
        self.chats.start()
        self.tasks = [asyncio.create_task(self._archive()), asyncio.create_task(self._read())]

    def failures(self) -> int:
        return len(self.chats.errors) + len(self.errors) + sum(self.job_failures.values())

    def all_errors(self) -> list[tuple[str, BaseException]]:
        return [("turn", e) for e in self.chats.errors] + self.errors

    async def _archive(self) -> None:
        while not self.chats.stop.is_set():
            try:
                moved, failures = await archive_pass(self.saver)
            except Exception as exc:  # a job must report, not raise
                self.errors.append(("archive job", exc))
                await asyncio.sleep(0.05)
                continue
            self.archived += moved
            for kind, count in failures.items():
                self.job_failures[kind] = self.job_failures.get(kind, 0) + count
            await asyncio.sleep(ARCHIVE_PAUSE)

    async def _read(self) -> None:
        threads = self.chats.threads
        i = 0
        while not self.chats.stop.is_set():
            thread = threads[i % len(threads)]
            i += 1
            try:
                await self.saver.aget_tuple(thread_config(thread))
            except Exception as exc:
                self.errors.append(("read", exc))
                await asyncio.sleep(0.05)
            else:
                self.reads += 1
            await asyncio.sleep(0.01)

    async def finish(self) -> None:
        await self.chats.finish()
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*self.tasks)


async def archive_pass(saver: TieredSaver) -> tuple[int, dict[str, int]]:
    """One pass of history demotion and idle archival over everything; failures by class."""
    moved, lines = await archive_everything(saver)
    failures: dict[str, int] = {}
    for line in lines:
        kind = line.split(": ")[1] if line.count(": ") >= 1 else line
        failures[kind] = failures.get(kind, 0) + 1
    return moved, failures


@dataclass
class Stack:
    moto: Moto
    proxy: TcpProxy
    warm: str
    cold: str

    def open(self, cold: str | None = None) -> TieredSaver:
        return TieredSaver.from_urls(hot=None, warm=self.warm, cold=cold or self.cold,
                                     offload_threshold=OFFLOAD_THRESHOLD)


@pytest.fixture
async def stack(moto: Moto, tmp_path: Path) -> AsyncIterator[Stack]:
    async with TcpProxy("127.0.0.1", moto.port) as proxy:
        cold = s3_url(f"http://{proxy.address}", prefix="load/", **S3_OPTIONS)
        yield Stack(moto, proxy, f"sqlite:///{tmp_path}/warm.db", cold)


async def cut_and_refuse(stack: Stack, load: Load) -> None:
    for _ in range(CUTS):
        done = load.archived + load.reads
        await until(lambda: stack.proxy.open > 0, "S3 connections to cut")
        stack.proxy.cut()
        await until(lambda: load.archived + load.reads > done,  # noqa: B023 (awaited here)
                    "S3 work after the cut")
    stack.proxy.refuse()
    stack.proxy.cut()
    failed = load.failures()
    await until(lambda: load.failures() > failed, "a call meeting the refused endpoint")
    stack.proxy.accept()


async def stall(stack: Stack, load: Load) -> None:
    """Hold every byte until a call has timed out on the stall, then let them through."""
    failed = load.failures()
    stack.proxy.stall()
    await until(lambda: load.failures() > failed, "a call timing out on the stalled endpoint")
    stack.proxy.resume()


async def stop_and_start(stack: Stack, load: Load) -> None:
    await asyncio.to_thread(stack.moto.stop)
    failed = load.failures()
    await until(lambda: load.failures() > failed, "a call meeting the stopped server")
    await asyncio.to_thread(stack.moto.start)


FAULTS: dict[str, Callable[[Stack, Load], Awaitable[None]]] = {
    "connections-cut": cut_and_refuse,
    "stalled": stall,
    "stopped-started": stop_and_start,
}


async def read_sample(saver: TieredSaver, thread: str, during: tuple[int, int]) -> int:
    """List ``thread``'s whole history, then read back by id its oldest and newest
    checkpoints and every one from the ``during`` range of positions (oldest first);
    returns how many are listed (raises on any failure)."""
    ids = [t.config["configurable"]["checkpoint_id"]
           async for t in saver.alist(thread_config(thread))]
    ids.reverse()  # oldest first, as positions count
    first, last = during
    picked = sorted({0, len(ids) - 1, *range(max(first, 0), min(last, len(ids)))})
    for position in picked if ids else []:
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": "",
                                   "checkpoint_id": ids[position]}}
        found = await saver.aget_tuple(config)  # type: ignore[arg-type]
        assert found is not None, f"{thread}: listed checkpoint {ids[position]} unreadable"
    return len(ids)


async def history_length(saver: TieredSaver, thread: str) -> int:
    return len([t async for t in saver.alist(thread_config(thread))])


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_archiving_restores_and_offloads_ride_through_s3_faults(
    stack: Stack, fault: str,
) -> None:
    threads = [f"cold-{fault}-{i}-{uuid.uuid4().hex[:8]}" for i in range(CONVERSATIONS)]
    async with stack.open() as saver:
        load = Load.over(saver, threads)
        chats = load.chats
        load.start()
        try:
            await until(lambda: chats.all_turned_since({}, 3) and load.archived > 0,
                        "first turns and a first archive pass")
            start = {t: await history_length(saver, t) for t in threads}
            await FAULTS[fault](stack, load)
            faulted = load.failures()
            before = chats.snapshot()
            await until(lambda: chats.all_turned_since(before, 2), "every thread turning again")
        finally:
            await load.finish()
        end = {t: await history_length(saver, t) for t in threads}  # the load has stopped
        escaped = [(where, f"{type(e).__module__}.{type(e).__name__}: {e}")
                   for where, e in load.all_errors() if not isinstance(e, TierUnavailable)]
        assert escaped == [], "errors other than TierUnavailable"
        assert set(load.job_failures) <= {"TierUnavailable"}, load.job_failures
        assert faulted > 0, "the fault never met an S3 call"
        assert saver.stats.offloaded > 0, "no state was large enough to offload"
        # later calls succeed: a whole archive pass with no failure
        _, failures = await asyncio.wait_for(archive_pass(saver), DEADLINE)
        assert failures == {}
        verdict = await chats.ledger.verify(saver)
        assert verdict.ok, verdict.summary()
    async with stack.open(cold=stack.cold.replace(stack.proxy.address,
                                                  f"127.0.0.1:{stack.moto.port}")) as fresh:
        verdict = await chats.ledger.verify(fresh)
        assert verdict.ok, verdict.summary()
        for thread in threads:
            assert await read_sample(fresh, thread, (start[thread], end[thread])) > 0
