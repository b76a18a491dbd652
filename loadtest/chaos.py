"""A fault soak: servers die and come back while users chat and a tiering worker runs.

::

    python loadtest/chaos.py --minutes 10 --users 20 --fault-every 30 \\
        [--faults redis,postgres,s3,cut,terminate] [--seed N] [--json out.json]

Needs ``pip install -e ".[load,test]"``: the private servers are started with the
test suite's launchers (``tests/servers``), which import pytest. Nothing shared is
touched: Redis, PostgreSQL and the S3 server (moto) are private instances on free
127.0.0.1 ports, removed at the end, so the servers on 5432/6379 are never stopped.

What runs, for ``--minutes``::

    users (asyncio tasks, one process) ──► ONE TieredSaver ──► redis (hot, private)
      turn / latest read / list /                            ──► postgresql (warm, private cluster)
      read of an archived conversation                       ──► s3 = moto over HTTP (cold)
    tiering worker (another OS process, its own saver on the same stores):
      HistoryDemotion + IdleArchival with an aggressive policy, in a loop
    fault loop: --fault-every seconds after the previous fault healed, the next one of
                --faults (a seeded cycle)

Faults (``--faults``):

=========  ==========  ==================================================================
name       server      what happens
=========  ==========  ==================================================================
redis      redis       SIGKILL, restarted empty on the same port after ``--downtime`` s
cut        each in     every open connection of the users' saver reset (TCP RST) by
           turn        the relay in front of the server; new ones are accepted at once
postgres   postgresql  ``pg_ctl stop -m fast`` then start, alternating with
                       ``-m immediate`` (a crash: recovery replays the WAL)
terminate  postgresql  ``pg_terminate_backend`` of every backend named ``tierstore``
s3         s3 (moto)   the server stopped, started again on the same port (moto keeps
                       its buckets across a restart in one process: its state is global)
=========  ==========  ==================================================================

The users' saver reaches each server through a TCP relay (``tests/servers/proxy.py``)
so that ``cut`` can break its connections; the worker connects directly, as a worker
on another machine would (a cut does not reach it).

Report: calls by kind; failures by exception type and by kind; per fault the server,
kind, start, downtime and recovery time, i.e. the time from the server being back until
the first successful call that needed it and started after it was back (warm: a turn;
cold: a call that fetched an archive segment from S3; hot: the first hot hit, sampled every
0.1 s; the worker: its first clean run); the worker's runs and failures; and the
durability verdict of ``loadtest/ledger.py`` (every acknowledged turn stored, nothing
else), read after every fault healed through every tier. ``--json PATH`` writes it all.

Exit code: 0 only if the verdict is OK and every failure, of a user call or of the
worker, is ``TierUnavailable``; any other exception type is a defect (exit 1, listed
with a traceback sample). A verdict of NOT SHOWN (no turn was acknowledged, so nothing
was shown) is not OK: exit 1. 2: interrupted (Ctrl-C, SIGTERM, SIGHUP, at any moment,
from the first import on); the servers, the worker and the temporary directories are
removed, even when the signal comes while a server starts or a fault is under way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import queue
import random
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def _interrupted_early(signum: int, frame: object) -> None:
    """SIGTERM or SIGHUP before the soak's own handlers are in place: nothing runs yet."""
    del frame
    print(f"chaos: interrupted ({signal.Signals(signum).name}) before anything started",
          file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":  # first thing, before the slow imports: exit 2, never 143
    for _sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(_sig, _interrupted_early)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: loadtest/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

from loadtest.ledger import Ledger, Verdict  # noqa: E402
from loadtest.workload import build_chat_agent, thread_config, turn_input  # noqa: E402

__all__ = ["Options", "main", "soak"]

ALL_FAULTS = ("redis", "postgres", "s3", "cut", "terminate")
CALL_TIMEOUT = 60.0  # a call still running after this is a hang: TimeoutError, a defect
HEARTBEAT = 15.0
INTERRUPT_GRACE = 5.0  # seconds the worker gets to stop when the soak is interrupted
SAMPLE_EVERY = 0.1
TRACEBACK_CHARS = 4000

# A fault must surface as TierUnavailable within a few seconds, yet a loaded 2-core
# machine must not time out a healthy server (values from tests/faults/).
REDIS_OPTIONS = "timeout=5&socket_timeout=2&connect_timeout=2&backoff=0.05&backoff_max=0.5"
POSTGRES_OPTIONS = "command_timeout=5&connect_timeout=3&max_size=10"
S3_OPTIONS = "connect_timeout=1&read_timeout=5&max_attempts=1&region=us-east-1"

log = logging.getLogger("chaos")


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """The soak's knobs; the defaults suit a 2-core machine."""

    minutes: float = 10.0
    users: int = 20
    fault_every: float = 30.0
    faults: tuple[str, ...] = ALL_FAULTS
    downtime: float = 3.0
    seed: int = 0
    conversations: int = 3  # live conversations per user
    turns_per_conversation: int = 6  # then it is left idle (the worker archives it)
    message_bytes: int = 500
    think: tuple[float, float] = (0.2, 1.0)  # seconds a user waits between calls
    archive_after: float = 5.0  # history older than this moves to cold
    idle_after: float = 10.0  # a thread idle this long moves to cold, head included
    worker_pause: float = 1.0  # between two worker runs
    json_path: Path | None = None


# -- the record ---------------------------------------------------------------------------


@dataclass(slots=True)
class Call:
    kind: str  # turn, latest, list, restore (a read of an archived conversation)
    start: float  # time.time()
    end: float
    error: str | None = None  # exception type name; None = success
    cold: bool = False  # the saver fetched an archive segment from S3 in the call (not its cache)


@dataclass
class Fault:
    number: int
    name: str
    server: str
    kind: str
    tiers: tuple[str, ...]  # which tiers' recovery is measured
    down_at: float = 0.0
    back_at: float | None = None
    detail: str = ""
    error: str | None = None  # the fault itself could not be injected or healed


@dataclass
class WorkerRun:
    start: float
    end: float
    error: str | None  # exception raised by a job run, else None
    error_types: dict[str, int]
    moved: int
    threads: int
    failed: int
    sample: str = ""  # traceback or the job's error lines


@dataclass
class Record:
    """Everything the soak saw; the report is computed from it at the end."""

    started: float = field(default_factory=time.time)
    calls: list[Call] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    runs: list[WorkerRun] = field(default_factory=list)
    hot_hits: list[tuple[float, int]] = field(default_factory=list)
    verify_cold_reads: int = 0  # archive segments fetched from S3 while verifying
    worker_exit: int | None = None  # the worker process's exit code (negative: a signal)
    samples: dict[str, str] = field(default_factory=dict)  # first traceback per defect type

    def failure(self, call: Call, exc: BaseException) -> None:
        name = type(exc).__name__
        call.error = name
        if name != "TierUnavailable" and name not in self.samples:
            self.samples[name] = "".join(
                traceback.format_exception(exc))[-TRACEBACK_CHARS:]


class ReadMismatch(AssertionError):
    """A read returned less than the acknowledged turns imply (a loss seen live)."""


# -- private servers ----------------------------------------------------------------------


class Servers:
    """Private Redis, PostgreSQL and moto on free 127.0.0.1 ports, and the faults on them.

    ``close`` is final: it takes the same lock as every server start, and once it has run
    no start does anything. So a start, fault or restart thread still running after its
    awaiting task was cancelled (``asyncio.to_thread`` cannot stop a thread) can never
    bring a server back after cleanup, and a start in progress finishes before ``close``
    removes what it started.
    """

    def __init__(self, root: Path) -> None:
        from tests.servers.postgres import PrivateCluster, free_port
        from tests.servers.redis import RedisServer

        self.root = root
        self.redis = RedisServer(root / "redis")
        self.postgres = PrivateCluster()
        self.moto_port = free_port()
        self.moto: Any = None
        self.bucket = f"chaos-{secrets.token_hex(6)}"
        self.proxies: dict[str, Any] = {}  # server -> TcpProxy, for the users' saver
        self._lock = threading.Lock()  # held by every start and by close
        self._closed = False

    async def start_proxies(self) -> None:
        from tests.servers.proxy import TcpProxy

        for server, port in (("redis", self.redis.port), ("postgresql", self.postgres.port),
                             ("s3", self.moto_port)):
            self.proxies[server] = await TcpProxy("127.0.0.1", port).start()

    async def close_proxies(self) -> None:
        for proxy in self.proxies.values():
            await proxy.aclose()

    def start(self) -> None:
        self.start_redis()
        self.start_postgres()
        self.start_moto()

    def start_redis(self) -> None:
        """Start Redis, unless ``close`` has run (then nothing happens)."""
        with self._lock:
            if not self._closed:
                self.redis.start()

    def start_postgres(self) -> None:
        """Start PostgreSQL, unless ``close`` has run (then nothing happens)."""
        with self._lock:
            if not self._closed:
                self.postgres.start()

    def start_moto(self) -> None:
        """Start moto, unless ``close`` has run (then nothing happens)."""
        from moto.server import ThreadedMotoServer

        with self._lock:
            if self._closed:
                return
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port,
                                        verbose=False)
            server.start()
            self.moto = server

    def stop_moto(self) -> None:
        server, self.moto = self.moto, None
        if server is not None:
            server.stop()

    def urls(self, prefix: str, *, proxied: bool) -> dict[str, str]:
        """Store URLs of the private servers; ``proxied``: through the relays."""
        ports = {"redis": self.redis.port, "postgresql": self.postgres.port,
                 "s3": self.moto_port}
        if proxied:
            ports = {server: proxy.port for server, proxy in self.proxies.items()}
        return {
            "hot": f"redis://127.0.0.1:{ports['redis']}/0?prefix={prefix}&{REDIS_OPTIONS}",
            "warm": f"postgresql://postgres@127.0.0.1:{ports['postgresql']}/postgres?"
                    f"{POSTGRES_OPTIONS}",
            "cold": f"s3://{self.bucket}/chaos?endpoint_url=http://127.0.0.1:{ports['s3']}"
                    f"&{S3_OPTIONS}",
        }

    def close(self) -> None:
        """Remove every server and directory; final (later starts do nothing). Idempotent."""
        with self._lock:
            self._closed = True
            with contextlib.suppress(Exception):
                self.redis.kill()
            with contextlib.suppress(Exception):
                self.postgres.destroy()
            with contextlib.suppress(Exception):
                self.stop_moto()
            shutil.rmtree(self.root, ignore_errors=True)

    # faults: blocking, run in a thread; each leaves its server up again

    def redis_kill(self, downtime: float) -> str:
        self.redis.kill()
        try:
            time.sleep(downtime)
        finally:
            self.start_redis()
        return "SIGKILL; restarted empty on the same port"

    def cut(self, server: str) -> str:
        """Reset every connection the users' saver has open to ``server``."""
        return f"{self.proxies[server].cut()} connections reset"

    def postgres_restart(self, mode: str, downtime: float) -> str:
        self.postgres.stop(mode)
        try:
            time.sleep(downtime)
        finally:
            self.start_postgres()
        return f"pg_ctl stop -m {mode}; start"

    def s3_restart(self, downtime: float) -> str:
        self.stop_moto()
        try:
            time.sleep(downtime)
        finally:
            self.start_moto()
        return "moto stopped; started on the same port"

    async def terminate(self) -> str:
        import asyncpg

        conn = await asyncpg.connect(self.postgres.url, timeout=10)
        try:
            n = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'tierstore' AND pid <> pg_backend_pid()")
        finally:
            await conn.close()
        return f"pg_terminate_backend of {n} backends"


FAULTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # name: (server, kind, tiers whose recovery is measured)
    "redis": ("redis", "SIGKILL+restart", ("hot",)),
    "cut-redis": ("redis", "connections cut", ("hot",)),
    "cut-postgresql": ("postgresql", "connections cut", ("warm",)),
    "cut-s3": ("s3", "connections cut", ("cold",)),
    "postgres": ("postgresql", "graceful restart", ("warm",)),
    "postgres-immediate": ("postgresql", "crash restart (-m immediate)", ("warm",)),
    "terminate": ("postgresql", "pg_terminate_backend", ("warm",)),
    "s3": ("s3", "endpoint down+up", ("cold",)),
}


def schedule(faults: tuple[str, ...], seed: int) -> Iterator[str]:
    """The faults in a seeded order, cycled; postgres alternates fast and immediate stops,
    cut goes round the servers."""
    order = list(faults)
    random.Random(seed).shuffle(order)
    postgres, cuts = 0, ("cut-redis", "cut-postgresql", "cut-s3")
    for cycle in itertools.count():
        for name in order:
            if name == "postgres":
                postgres += 1
                yield "postgres" if postgres % 2 else "postgres-immediate"
            elif name == "cut":
                yield cuts[cycle % len(cuts)]
            else:
                yield name


async def inject(servers: Servers, fault: Fault, downtime: float) -> None:
    """Run one fault to its end: the server is back (or the error recorded) on return."""
    fault.down_at = time.time()
    try:
        if fault.name == "redis":
            fault.detail = await asyncio.to_thread(servers.redis_kill, downtime)
        elif fault.name.startswith("cut-"):
            fault.detail = servers.cut(fault.server)
        elif fault.name in ("postgres", "postgres-immediate"):
            mode = "fast" if fault.name == "postgres" else "immediate"
            fault.detail = await asyncio.to_thread(servers.postgres_restart, mode, downtime)
        elif fault.name == "terminate":
            fault.detail = await servers.terminate()
        elif fault.name == "s3":
            fault.detail = await asyncio.to_thread(servers.s3_restart, downtime)
        else:
            raise ValueError(f"unknown fault {fault.name!r}")
    except Exception as exc:  # reported, never fatal
        fault.error = f"{type(exc).__name__}: {exc}"
    fault.back_at = time.time()


# -- the tiering worker (another OS process) -----------------------------------------------


def _worker_main(urls: dict[str, str], policy: dict[str, Any], pause: float,
                 stop: Any, out: Any) -> None:
    """The worker process: archive in a loop until ``stop``; one message per run on ``out``."""
    logging.basicConfig(level=logging.CRITICAL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it through ``stop``

    async def main() -> None:
        from tierstore import TieredSaver
        from tierstore.jobs.plan import TieringPolicy
        from tierstore.jobs.tiering import HistoryDemotion, IdleArchival

        rules = TieringPolicy(**policy)
        async with TieredSaver.from_urls(hot=urls["hot"], warm=urls["warm"],
                                         cold=urls["cold"]) as saver:
            out.put({"ready": True})
            while not stop.is_set():
                out.put(asdict(await _worker_run(saver, rules, HistoryDemotion, IdleArchival)))
                await asyncio.sleep(pause)

    asyncio.run(main())


async def _worker_run(saver: Any, policy: Any, *jobs: Any) -> WorkerRun:
    """One run of every archiving job; an exception ends the run and is its failure."""
    start = time.time()
    run = WorkerRun(start, start, None, {}, 0, 0, 0)
    try:
        for job in jobs:
            report = await asyncio.wait_for(job(saver, policy).run_once(), CALL_TIMEOUT)
            run.moved += report.checkpoints
            run.threads += report.threads
            run.failed += report.failed
            for name, n in report.error_types.items():
                run.error_types[name] = run.error_types.get(name, 0) + n
            if report.errors and not run.sample:
                run.sample = "\n".join(report.errors[:3])
    except Exception as exc:
        run.error = type(exc).__name__
        run.sample = "".join(traceback.format_exception(exc))[-TRACEBACK_CHARS:]
    run.end = time.time()
    return run


class Worker:
    """Handle on the worker process."""

    def __init__(self, urls: dict[str, str], options: Options) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stop_event = ctx.Event()
        self.out: Any = ctx.Queue()
        policy = {"archive_after": options.archive_after,
                  "archive_idle_after": options.idle_after,
                  "keep_latest": 1, "segment_size": 20, "lease_seconds": 30.0}
        self.process = ctx.Process(target=_worker_main, daemon=True,
                                   args=(urls, policy, options.worker_pause,
                                         self.stop_event, self.out))

    async def start(self) -> None:
        self.process.start()
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(queue.Empty):
                if self.out.get_nowait().get("ready"):
                    return
            if not self.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the tiering worker did not start ({self.process.exitcode})")
            await asyncio.sleep(0.1)

    def drain(self, record: Record) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                message = self.out.get_nowait()
                if "start" in message:
                    record.runs.append(WorkerRun(**message))

    async def stop(self, record: Record) -> None:
        """Ask the worker to stop, wait for it (killed after two call timeouts, or after
        ``INTERRUPT_GRACE`` seconds when the soak is being interrupted); never raises."""
        self.stop_event.set()
        if self.process.pid is None:  # never started
            return
        task = asyncio.current_task()
        interrupted = task is not None and task.cancelling() > 0
        deadline = time.monotonic() + (INTERRUPT_GRACE if interrupted else CALL_TIMEOUT * 2 + 10)
        while self.process.is_alive() and time.monotonic() < deadline:
            self.drain(record)
            await asyncio.sleep(0.1)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
        self.drain(record)
        record.worker_exit = self.process.exitcode


# -- users --------------------------------------------------------------------------------


class User:
    """One chat user: a few live conversations, older ones left idle for the worker."""

    def __init__(self, number: int, run: str, app: Any, saver: Any, *, ledger: Ledger,
                 record: Record, options: Options) -> None:
        self.number, self.run_id, self.app, self.saver = number, run, app, saver
        self.ledger, self.record, self.options = ledger, record, options
        self.rng = random.Random(options.seed * 1000 + number)
        self.made = 0
        self.live: list[str] = []
        self.idle: list[tuple[str, float]] = []  # (thread, idle since)
        self.acked: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()

    def _new(self) -> str:
        self.made += 1
        thread = f"chaos-{self.run_id}-u{self.number}-c{self.made}"
        self.live.append(thread)
        return thread

    async def _call(self, kind: str, body: Callable[[], Awaitable[None]]) -> None:
        call = Call(kind, time.time(), 0.0)
        cold_before = self.saver.stats.cold_reads
        try:
            await asyncio.wait_for(body(), CALL_TIMEOUT)
        except Exception as exc:
            self.record.failure(call, exc)
        call.end = time.time()
        call.cold = self.saver.stats.cold_reads > cold_before
        self.record.calls.append(call)

    async def turn(self, thread: str) -> None:
        n = self.ledger.next_turn(thread)
        message = turn_input(thread, n, self.options.message_bytes)
        self.ledger.sent(thread, n, str(message["messages"][0].content))
        self.sent[thread] += 1

        async def body() -> None:
            try:
                await self.app.ainvoke(message, thread_config(thread))
            except BaseException as exc:
                self.ledger.failed(thread, n, exc)
                raise
            self.ledger.acked(thread, n)
            self.acked[thread] += 1

        await self._call("turn", body)

    async def latest(self, thread: str, kind: str) -> None:
        async def body() -> None:
            got = await self.saver.aget_tuple(thread_config(thread))
            messages = [] if got is None else got.checkpoint["channel_values"].get("messages", [])
            if len(messages) < 2 * self.acked[thread]:
                raise ReadMismatch(f"{thread}: {len(messages)} messages after "
                                   f"{self.acked[thread]} acknowledged turns")
            if kind == "restore":  # the whole history, from the archive segments
                history = [c async for c in self.saver.alist(thread_config(thread))]
                if not history:
                    raise ReadMismatch(f"{thread}: no history")

        await self._call(kind, body)

    async def listing(self, thread: str) -> None:
        async def body() -> None:
            items = [c async for c in self.saver.alist(thread_config(thread), limit=10)]
            if self.acked[thread] and not items:
                raise ReadMismatch(f"{thread}: empty history after acknowledged turns")

        await self._call("list", body)

    def _archived(self, now: float) -> list[str]:
        settle = self.options.idle_after + 2 * self.options.worker_pause + 2
        return [t for t, since in self.idle if now - since > settle and self.acked[t]]

    async def step(self) -> None:
        while len(self.live) < self.options.conversations:
            self._new()
        thread = self.rng.choice(self.live)
        archived = self._archived(time.time())
        action = self.rng.choices(["turn", "latest", "list", "restore", "resume"],
                                  weights=[5, 3, 1, 1.5, 0.5])[0]
        if action in ("restore", "resume") and not archived:
            action = "turn"
        if action in ("latest", "list") and not self.acked[thread]:
            action = "turn"
        if action == "turn":
            await self.turn(thread)
            if self.sent[thread] >= self.options.turns_per_conversation:
                self.live.remove(thread)
                self.idle.append((thread, time.time()))
        elif action == "latest":
            await self.latest(thread, "latest")
        elif action == "list":
            await self.listing(thread)
        elif action == "restore":
            await self.latest(self.rng.choice(archived), "restore")
        else:  # a turn on an archived conversation; it goes idle again afterwards
            old = self.rng.choice(archived)
            await self.turn(old)
            self.idle = [(t, s) for t, s in self.idle if t != old] + [(old, time.time())]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(*self.options.think))


# -- the soak -----------------------------------------------------------------------------


def _say(record: Record, text: str) -> None:
    print(f"[{time.time() - record.started:6.1f}s] {text}", flush=True)


def _failures(calls: list[Call]) -> Counter[str]:
    return Counter(c.error for c in calls if c.error)


async def _heartbeat(record: Record, worker: Worker, saver: Any, stop: asyncio.Event) -> None:
    next_beat = time.time() + HEARTBEAT
    while not stop.is_set():
        worker.drain(record)
        record.hot_hits.append((time.time(), saver.stats.hot_hits))
        if time.time() >= next_beat:
            next_beat += HEARTBEAT
            failed = _failures(record.calls)
            types = ", ".join(f"{t} {n}" for t, n in failed.items())
            runs = record.runs
            _say(record, f"heartbeat: {len(record.calls)} calls, {sum(failed.values())} failed"
                         f"{f' ({types})' if types else ''}; worker {len(runs)} runs "
                         f"({sum(_run_failed(r) for r in runs)} failed), "
                         f"{sum(r.moved for r in runs)} checkpoints archived; "
                         f"{len(record.faults)} faults")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)


async def _faults(servers: Servers, record: Record, options: Options, end: float) -> None:
    order = schedule(options.faults, options.seed)
    # leave the last fault time to heal before the users stop
    while time.time() + options.fault_every + options.downtime + 5 < end:
        await asyncio.sleep(options.fault_every)
        name = next(order)
        server, kind, tiers = FAULTS[name]
        fault = Fault(len(record.faults) + 1, name, server, kind, tiers)
        record.faults.append(fault)
        await inject(servers, fault, options.downtime)
        assert fault.back_at is not None
        status = f"FAILED TO INJECT/HEAL: {fault.error}" if fault.error else fault.detail
        _say(record, f"fault {fault.number}: {server} {kind} — down "
                     f"{fault.back_at - fault.down_at:.1f}s ({status})")


def _run_failed(run: WorkerRun) -> bool:
    return run.error is not None or run.failed > 0


def _recovery(fault: Fault, record: Record, tier: str) -> float | None:
    """Seconds from ``back_at`` to the first success that needed ``tier`` and began after it."""
    back = fault.back_at
    if back is None:
        return None
    if tier == "hot":
        base = next((hits for t, hits in record.hot_hits if t >= back), None)
        if base is None:
            return None
        return next((t - back for t, hits in record.hot_hits if t >= back and hits > base),
                    None)
    if tier == "worker":
        return next((r.end - back for r in sorted(record.runs, key=lambda r: r.end)
                     if r.start >= back and not _run_failed(r)), None)

    def needed(call: Call) -> bool:  # a turn needs warm; cold: the call loaded a segment
        return call.kind == "turn" if tier == "warm" else call.cold

    return next((c.end - back for c in sorted(record.calls, key=lambda c: c.end)
                 if c.start >= back and c.error is None and needed(c)), None)


def _fault_rows(record: Record) -> list[dict[str, Any]]:
    rows = []
    for i, fault in enumerate(record.faults):
        until = (record.faults[i + 1].down_at if i + 1 < len(record.faults)
                 else float("inf"))
        window = [c for c in record.calls if fault.down_at <= c.end < until]
        rows.append({
            "number": fault.number, "server": fault.server, "kind": fault.kind,
            "fault": fault.name, "at": round(fault.down_at - record.started, 1),
            "downtime": round((fault.back_at or fault.down_at) - fault.down_at, 2),
            "detail": fault.detail, "error": fault.error,
            "recovery": {tier: _round(_recovery(fault, record, tier))
                         for tier in (*fault.tiers, "worker")},
            "failed_calls": dict(_failures(window)),
        })
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def build_report(record: Record, verdict: Verdict | None, options: Options,
                 verify_error: str | None) -> dict[str, Any]:
    kinds = sorted({c.kind for c in record.calls})
    by_kind = {k: {"calls": sum(c.kind == k for c in record.calls),
                   "failed": dict(_failures([c for c in record.calls if c.kind == k]))}
               for k in kinds}
    worker_types: Counter[str] = Counter()
    for run in record.runs:
        if run.error:
            worker_types[run.error] += 1
        worker_types.update(run.error_types)
    samples = dict(record.samples)
    for run in record.runs:
        names = ([run.error] if run.error else []) + list(run.error_types)
        for name in names:
            if name != "TierUnavailable" and f"worker {name}" not in samples:
                samples[f"worker {name}"] = run.sample
    if record.worker_exit != 0:
        samples["worker process"] = (f"exited {record.worker_exit} (negative: killed by a "
                                     "signal, e.g. after not stopping within two minutes)")
    defects = sorted(samples)
    ok = verdict is not None and verdict.ok and not defects
    return {
        "options": {k: (str(v) if isinstance(v, Path) else v)
                    for k, v in asdict(options).items()},
        "seconds": round(max((c.end for c in record.calls), default=record.started)
                         - record.started, 1),
        "calls": {"total": len(record.calls), "by_kind": by_kind,
                  "failed_by_type": dict(_failures(record.calls)),
                  "archive_reads": sum(c.cold for c in record.calls if c.error is None)},
        "faults": _fault_rows(record),
        "worker": {"runs": len(record.runs),
                   "failed_runs": sum(_run_failed(r) for r in record.runs),
                   "checkpoints_archived": sum(r.moved for r in record.runs),
                   "exit_code": record.worker_exit,
                   "failures_by_type": dict(worker_types)},
        "defects": {name: samples[name] for name in defects},
        "verdict": verdict.as_dict() if verdict is not None else None,
        "verdict_summary": verdict.summary() if verdict is not None else verify_error,
        "verify_archive_reads": record.verify_cold_reads,
        "exit_code": 0 if ok else 1,
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"chaos soak: {report['seconds']}s, {report['options']['users']} users, "
             f"faults {','.join(report['options']['faults'])} every "
             f"{report['options']['fault_every']}s, seed {report['options']['seed']}", "",
             f"calls: {report['calls']['total']} "
             f"(successful calls that fetched an archive segment from S3: "
             f"{report['calls']['archive_reads']})"]
    for kind, row in report["calls"]["by_kind"].items():
        failed = ", ".join(f"{n} {t}" for t, n in row["failed"].items()) or "none failed"
        lines.append(f"  {kind:<9} {row['calls']:>7}  {failed}")
    failed = report["calls"]["failed_by_type"]
    lines.append("failures by type: " + (", ".join(f"{t} {n}" for t, n in failed.items())
                                         or "none"))
    w = report["worker"]
    lines += ["", f"tiering worker: {w['runs']} runs, {w['failed_runs']} failed, "
                  f"{w['checkpoints_archived']} checkpoints archived; failures by type: "
                  + (", ".join(f"{t} {n}" for t, n in w["failures_by_type"].items()) or "none"),
              "", "faults (recovery: seconds from the server back to the first success that "
                  "needed it)",
              f"  {'#':>3} {'at':>6}  {'server':<10} {'kind':<29} {'down':>5}  recovery"]
    for f in report["faults"]:
        recovery = ", ".join(f"{tier} {'-' if s is None else f'{s:.2f}'}"
                             for tier, s in f["recovery"].items())
        failed = ", ".join(f"{n} {t}" for t, n in f["failed_calls"].items())
        lines.append(f"  {f['number']:>3} {f['at']:>6.1f}  {f['server']:<10} {f['kind']:<29} "
                     f"{f['downtime']:>5.1f}  {recovery}"
                     + (f"; failed calls: {failed}" if failed else "")
                     + (f"; FAULT ERROR {f['error']}" if f["error"] else ""))
    lines += ["", report["verdict_summary"] or "durability: not verified",
              f"  (read back through every tier: {report['verify_archive_reads']} archive "
              "segments fetched from S3)"]
    if report["defects"]:
        lines += ["", f"DEFECTS: {len(report['defects'])} exception types other than "
                      "TierUnavailable"]
        for name, sample in report["defects"].items():
            lines.append(f"--- {name} (first traceback) ---")
            lines.append(sample.rstrip())
    lines += ["", f"exit code {report['exit_code']}: "
                  + ("OK" if report["exit_code"] == 0 else "FAILED")]
    return "\n".join(lines)


def _dummy_aws() -> None:
    """No real credentials or endpoints reach the S3 client, as in tests/servers/s3.py."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        del os.environ[name]
    os.environ["AWS_ACCESS_KEY_ID"] = "chaos"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "chaos"


async def _load(servers: Servers, saver: Any, worker: Worker, record: Record, *,
                options: Options, run: str) -> Ledger:
    """Users, faults and the heartbeat until the time is up and the last fault healed."""
    record.started = time.time()
    _say(record, f"servers up (redis :{servers.redis.port}, postgresql "
                 f":{servers.postgres.port}, moto :{servers.moto_port}); worker "
                 f"pid {worker.process.pid}; {options.users} users for {options.minutes} min")
    ledger = Ledger()
    app = build_chat_agent(options.message_bytes).compile(checkpointer=saver)
    end = record.started + options.minutes * 60
    stop = asyncio.Event()
    users = [User(i, run, app, saver, ledger=ledger, record=record, options=options)
             for i in range(options.users)]
    tasks = [asyncio.create_task(u.run(stop)) for u in users]
    beat = asyncio.create_task(_heartbeat(record, worker, saver, stop))
    faults = asyncio.create_task(_faults(servers, record, options, end))
    try:
        await asyncio.sleep(max(0.0, end - time.time()))
        await faults  # a fault in progress heals before anyone stops
    finally:
        faults.cancel()
        stop.set()
        await asyncio.gather(*tasks, beat, return_exceptions=True)
    return ledger


async def soak(options: Options) -> dict[str, Any]:
    """Run the soak; returns the report (see ``build_report``). Servers are removed at the end."""
    from tierstore import TieredSaver

    _dummy_aws()
    run = secrets.token_hex(4)
    root = Path(tempfile.mkdtemp(prefix="tierstore-chaos-"))
    try:
        servers = Servers(root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    record = Record()
    try:
        await asyncio.to_thread(servers.start)
        await servers.start_proxies()
        urls = servers.urls(f"chaos-{run}:", proxied=True)
        async with TieredSaver.from_urls(hot=urls["hot"], warm=urls["warm"],
                                         cold=urls["cold"]) as saver:
            worker = Worker(servers.urls(f"chaos-{run}:", proxied=False), options)
            try:
                await worker.start()
                ledger = await _load(servers, saver, worker, record, options=options, run=run)
            finally:
                await worker.stop(record)
            _say(record, f"load stopped; verifying {len(ledger.threads())} threads through "
                         "every tier")
            verdict, verify_error = None, None
            segments = saver.stats.cold_reads
            try:
                verdict = await ledger.verify(saver, concurrency=8, read_timeout=30,
                                              attempts=5)
            except Exception as exc:
                verify_error = f"durability: NOT VERIFIED — {type(exc).__name__}: {exc}"
                record.samples.setdefault(f"verify {type(exc).__name__}",
                                          "".join(traceback.format_exception(exc)))
            record.verify_cold_reads = saver.stats.cold_reads - segments
        return build_report(record, verdict, options, verify_error)
    finally:
        await servers.close_proxies()
        await asyncio.to_thread(servers.close)


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Kill and restart Redis, PostgreSQL and S3 (all private) while users "
                    "chat and a tiering worker runs; report failures, recovery and durability.")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--fault-every", type=float, default=30.0, help="seconds")
    parser.add_argument("--faults", default=",".join(ALL_FAULTS),
                        help=f"comma-separated, of {','.join(ALL_FAULTS)}")
    parser.add_argument("--downtime", type=float, default=3.0,
                        help="seconds a killed or stopped server stays down")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--message-bytes", type=int, default=500)
    parser.add_argument("--archive-after", type=float, default=5.0,
                        help="the worker archives history older than this (seconds)")
    parser.add_argument("--idle-after", type=float, default=10.0,
                        help="the worker archives threads idle this long (seconds)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument("--verbose", action="store_true", help="show tierstore's log")
    args = parser.parse_args(argv)
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    unknown = sorted(set(faults) - set(ALL_FAULTS))
    if unknown or not faults:
        parser.error(f"unknown faults {unknown}; choose from {','.join(ALL_FAULTS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # a dead hot tier is a logged miss per call, a pool logs each reconnection attempt
    # with a traceback, moto logs every request: the report counts all of it
    for name in ("tierstore", "werkzeug", "asyncpg"):
        logging.getLogger(name).setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    return Options(minutes=args.minutes, users=args.users, fault_every=args.fault_every,
                   faults=faults, downtime=args.downtime, seed=args.seed,
                   message_bytes=args.message_bytes, archive_after=args.archive_after,
                   idle_after=args.idle_after, json_path=args.json)


async def _until_signal(options: Options) -> dict[str, Any]:
    """``soak``, cancelled by SIGTERM or SIGHUP as by Ctrl-C: its cleanup runs either way."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def interrupt() -> None:  # once: a second signal must not cut the cleanup short
        if not task.cancelling():
            task.cancel()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, interrupt)
    return await soak(options)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        report = asyncio.run(_until_signal(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("chaos: interrupted; servers removed", file=sys.stderr)
        return 2
    print()
    print(render(report), flush=True)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(report, indent=2, sort_keys=True))
    return int(report["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
