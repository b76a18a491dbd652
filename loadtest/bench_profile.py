"""Profiling passes, never mixed with the measured rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import io
import pstats
import random
import statistics
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench_phases import build_agent, list_phase, read_phase, thread_ids, warm_up, write_phase
from bench_report import table
from bench_stores import PROFILED_METHODS, Admin, Endpoint, Saver, Servers, Settings, ms, open_saver

# -- profiling: calls per turn, round trips per turn, cProfile -----------------------------


class CallMeter:
    """Counts and times a saver's async methods (instance attributes shadow the class's)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.enabled = False

    def install(self, saver: Saver) -> None:
        for method in PROFILED_METHODS:
            original = getattr(saver, method)
            if method == "alist":
                setattr(saver, method, self._wrap_iter(method, original))
            else:
                setattr(saver, method, self._wrap(method, original))

    def _wrap(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                if self.enabled:
                    self.calls[name].append(time.perf_counter() - started)

        return timed

    def _wrap_iter(self, name: str, fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                async for item in fn(*args, **kwargs):
                    yield item
            finally:
                if self.enabled:
                    self.calls[name].append(time.perf_counter() - started)

        return timed

    def reset(self) -> None:
        self.calls.clear()


class RoundTripProxy:
    """A TCP relay that counts round trips: client bytes after server bytes start one."""

    def __init__(self, target: Endpoint) -> None:
        self.target = target
        self.trips = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Endpoint:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = int(self._server.sockets[0].getsockname()[1])
        return Endpoint("127.0.0.1", port)

    async def _relay(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.target.host, self.target.port)
        waiting = [False]  # True once the client spoke and the server has not answered

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       from_client: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if from_client and not waiting[0]:
                        self.trips += 1
                        waiting[0] = True
                    elif not from_client:
                        waiting[0] = False
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pump(client_r, server_w, True), pump(server_r, client_w, False))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


@dataclass(slots=True)
class CallProfile:
    saver: str
    turns: int
    calls_per_turn: dict[str, float]
    call_p50_ms: dict[str, float]
    round_trips_per_turn: dict[str, float] = field(default_factory=dict)
    round_trips_per_read: dict[str, float] = field(default_factory=dict)
    round_trips_per_list: dict[str, float] = field(default_factory=dict)


async def profile_calls(name: str, settings: Settings, servers: Servers, admin: Admin,
                        *, proxied: bool) -> CallProfile:
    """Saver calls (and, when ``proxied``, network round trips) of the write/read/list phases."""
    rng = random.Random(settings.seed)
    proxies: dict[str, RoundTripProxy] = {}
    if proxied:
        proxies = {"postgres": RoundTripProxy(servers.postgres),
                   "redis": RoundTripProxy(servers.redis)}
        servers = replace(servers, postgres=await proxies["postgres"].start(),
                          redis=await proxies["redis"].start())
        admin = Admin(servers, admin.token)
    meter = CallMeter()
    trips: dict[str, dict[str, int]] = {}

    def snapshot(label: str) -> None:
        trips[label] = {k: p.trips for k, p in proxies.items()}

    try:
        async with open_saver(name, servers, admin, settings) as opened:
            saver = opened.saver
            meter.install(saver)
            app = build_agent(settings).compile(checkpointer=saver)
            await warm_up(app, saver, settings, rng)
            ids = thread_ids("chat", settings.threads)
            meter.enabled = True
            snapshot("start")
            await write_phase(app, ids, settings.turns, settings.concurrency,
                              settings.message_bytes)
            snapshot("written")
            write_calls = {k: list(v) for k, v in meter.calls.items()}
            meter.reset()
            await read_phase(saver, ids, settings.read_samples, rng)
            snapshot("read")
            read_calls = list(meter.calls.get("aget_tuple", []))
            meter.reset()
            await list_phase(saver, ids, settings.list_samples, rng,
                             min(10, 4 * settings.turns + 1))
            snapshot("listed")
            list_calls = list(meter.calls.get("alist", []))
            meter.enabled = False
    finally:
        for proxy in proxies.values():
            await proxy.close()
    turns = settings.threads * settings.turns
    calls = {k: len(v) / turns for k, v in sorted(write_calls.items())}
    p50 = {k: ms(statistics.median(v)) for k, v in sorted(write_calls.items()) if v}
    if read_calls:
        p50["aget_tuple (read phase)"] = ms(statistics.median(read_calls))
    if list_calls:
        p50["alist (list phase)"] = ms(statistics.median(list_calls))
    prof = CallProfile(name, turns, calls, p50)
    if proxied:
        for backend in proxies:
            def delta(a: str, b: str, key: str = backend) -> int:
                return trips[b][key] - trips[a][key]

            prof.round_trips_per_turn[backend] = delta("start", "written") / turns
            prof.round_trips_per_read[backend] = delta("written", "read") / settings.read_samples
            prof.round_trips_per_list[backend] = delta("read", "listed") / settings.list_samples
    return prof


AREAS = (
    ("tierstore", ("/tierstore/",)),
    ("langgraph-checkpoint-postgres", ("/langgraph/checkpoint/postgres/",)),
    ("langgraph serde (msgpack)", ("/langgraph/checkpoint/serde/", "ormsgpack")),
    ("langgraph", ("/langgraph/",)),
    ("langchain_core + pydantic", ("/langchain_core/", "/pydantic/", "/pydantic_core/",
                                   "pydantic_core")),
    ("zstd / msgpack", ("zstandard", "zstd", "msgpack")),
    ("redis-py", ("/redis/",)),
    ("asyncpg", ("/asyncpg/",)),
    ("psycopg", ("/psycopg/", "/psycopg_pool/")),
    ("asyncio", ("/asyncio/",)),
    ("workload", ("/loadtest/",)),
)


IDLE = "idle: waiting in epoll (not CPU)"


def area_of(func: tuple[str, int, str]) -> str | None:
    filename, _, name = func
    if filename == "~" and "of 'select.epoll' objects" in name:
        return IDLE
    text = filename if filename != "~" else name
    for area, marks in AREAS:
        if any(mark in text for mark in marks):
            return area
    return None if filename == "~" else "other python"


def attribute(stats: pstats.Stats) -> dict[str, float]:
    """Self time per area; a C function's time goes to the areas of its callers."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    out: dict[str, float] = defaultdict(float)
    for func, (_, _, tottime, _, callers) in raw.items():
        area = area_of(func)
        if area is not None or not callers:
            out[area or "other C"] += tottime
            continue
        weights = {caller: value[2] + 1e-9 for caller, value in callers.items()}
        whole = sum(weights.values())
        for caller, weight in weights.items():
            out[area_of(caller) or "other C"] += tottime * weight / whole
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass(slots=True)
class CpuProfile:
    saver: str
    turns: int
    reads: int
    seconds: float
    cpu_ms_per_turn: float
    write_areas_ms_per_turn: dict[str, float]
    read_areas_us_per_read: dict[str, float]
    top_self: list[dict[str, Any]]
    top_tierstore: list[dict[str, Any]]
    top_tierstore_read: list[dict[str, Any]]
    pstats_paths: list[str]


def _label(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    parts = Path(filename).parts
    for anchor in ("tierstore", "site-packages", "lib"):
        if anchor in parts:
            idx = len(parts) - 1 - parts[::-1].index(anchor)
            short = "/".join(parts[idx + (0 if anchor == "tierstore" else 1):])
            return f"{short}:{line}({name})"
    return f"{Path(filename).name}:{line}({name})"


def _rows(stats: pstats.Stats, per: int, *, area: str | None, key: int,
          count: int) -> list[dict[str, Any]]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    items = [kv for kv in raw.items() if area is None or area_of(kv[0]) == area]
    items.sort(key=lambda kv: -kv[1][key])
    return [{"function": _label(func), "calls": round(entry[1] / per, 2),
             "self_ms": round(ms(entry[2]) / per, 4), "cum_ms": round(ms(entry[3]) / per, 4)}
            for func, entry in items[:count]]


async def profile_cpu(name: str, settings: Settings, servers: Servers, admin: Admin,
                      *, out_dir: Path) -> CpuProfile:
    """cProfile of the write phase and of the read phase, each on its own profiler."""
    rng = random.Random(settings.seed)
    writing, reading = cProfile.Profile(), cProfile.Profile()
    async with open_saver(name, servers, admin, settings) as opened:
        saver = opened.saver
        app = build_agent(settings).compile(checkpointer=saver)
        await warm_up(app, saver, settings, rng)
        ids = thread_ids("chat", settings.threads)
        gc.collect()
        cpu0 = time.process_time()
        writing.enable()
        write = await write_phase(app, ids, settings.turns, settings.concurrency,
                                  settings.message_bytes)
        writing.disable()
        cpu = time.process_time() - cpu0
        reading.enable()
        await read_phase(saver, ids, settings.read_samples, rng)
        reading.disable()
    paths = [out_dir / f"{name}-write.pstats", out_dir / f"{name}-read.pstats"]
    writing.dump_stats(paths[0])
    reading.dump_stats(paths[1])
    wstats, rstats = pstats.Stats(str(paths[0])), pstats.Stats(str(paths[1]))
    turns, reads = settings.threads * settings.turns, settings.read_samples
    return CpuProfile(
        saver=name,
        turns=turns,
        reads=reads,
        seconds=write.seconds,
        cpu_ms_per_turn=ms(cpu) / turns,
        write_areas_ms_per_turn={k: ms(v) / turns for k, v in attribute(wstats).items()},
        read_areas_us_per_read={k: ms(v) * 1000 / reads for k, v in attribute(rstats).items()},
        top_self=_rows(wstats, turns, area=None, key=2, count=25),
        top_tierstore=_rows(wstats, turns, area="tierstore", key=3, count=20),
        top_tierstore_read=_rows(rstats, reads, area="tierstore", key=3, count=10),
        pstats_paths=[str(p) for p in paths],
    )


def render_profile(calls: Sequence[CallProfile], cpus: Sequence[CpuProfile]) -> str:
    out = io.StringIO()
    w = out.write
    if calls:
        w("\nsaver calls per turn (write phase) and their p50 latency\n")
        names = sorted({k for c in calls for k in (*c.calls_per_turn, *c.call_p50_ms)})
        rows: list[Sequence[str]] = [("saver", *names)]
        for c in calls:
            rows.append((c.saver, *(
                (f"{c.calls_per_turn[k]:.2f}/turn " if k in c.calls_per_turn else "")
                + (f"{c.call_p50_ms[k]:.3f}ms" if k in c.call_p50_ms else "")
                for k in names)))
        w(table(rows))
        trips = [c for c in calls if c.round_trips_per_turn]
        if trips:
            w("\nnetwork round trips (counted by a TCP relay; its own latency is not reported)\n")
            rows = [("saver", "pg/turn", "redis/turn", "pg/read", "redis/read", "pg/list",
                     "redis/list")]
            for c in trips:
                rows.append((c.saver, *(
                    f"{d.get(k, 0.0):.2f}" for d in (c.round_trips_per_turn,
                                                     c.round_trips_per_read,
                                                     c.round_trips_per_list)
                    for k in ("postgres", "redis"))))
            w(table(rows))
    if cpus:
        w("\ncProfile, client process only: self time per area (C functions charged to "
          "their callers)\n")
        areas = list(dict.fromkeys(k for c in cpus for k in c.write_areas_ms_per_turn))
        head = [f"{c.saver} write ms/turn" for c in cpus]
        head += [f"{c.saver} read us/read" for c in cpus]
        rows = [("area", *head)]
        for area in areas:
            rows.append((area, *(f"{c.write_areas_ms_per_turn.get(area, 0.0):.3f}"
                                 for c in cpus),
                         *(f"{c.read_areas_us_per_read.get(area, 0.0):.1f}" for c in cpus)))
        def busy(areas: dict[str, float]) -> float:
            return sum(v for k, v in areas.items() if k != IDLE)

        rows.append(("total (without idle)",
                     *(f"{busy(c.write_areas_ms_per_turn):.3f}" for c in cpus),
                     *(f"{busy(c.read_areas_us_per_read):.1f}" for c in cpus)))
        w(table(rows))
        for prof in cpus:
            w(f"\n{prof.saver}: {prof.turns / prof.seconds:.0f} turns/s under the profiler; "
              f"top functions of the write phase by self time (per turn):\n")
            w(_table_of(prof.top_self))
            if prof.saver.startswith("tierstore"):
                w("tierstore functions by cumulative time, write phase (per turn; a coroutine "
                  "counts only while it runs):\n")
                w(_table_of(prof.top_tierstore))
                w("tierstore functions by cumulative time, read phase (per read):\n")
                w(_table_of(prof.top_tierstore_read))
            w(f"raw profiles: {', '.join(prof.pstats_paths)}\n")
    return out.getvalue()


def _table_of(rows: Sequence[dict[str, Any]]) -> str:
    out: list[Sequence[str]] = [("function", "calls", "self ms", "cum ms")]
    out += [(r["function"][:96], str(r["calls"]), f"{r['self_ms']:.3f}", f"{r['cum_ms']:.3f}")
            for r in rows]
    return table(out)
