"""The measured phases of one saver: write, latest reads, lists, size.

The write phase is the only one timed under concurrency; reads and lists run one at a
time after it, so their latency is the saver's, not the event loop's queue.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bench_stores import (
    NETWORKED,
    Admin,
    Saver,
    Servers,
    Settings,
    ms,
    open_saver,
    percentile,
    server_cpu_ms,
    server_cpu_ticks,
    servers_of,
)
from langgraph.graph import StateGraph
from workload import build_chat_agent, build_delta_agent, thread_config, turn_input

# -- results -------------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    saver: str
    turns: int
    seconds: float
    turns_per_s: float
    turn_p50_ms: float
    turn_p99_ms: float
    read_p50_ms: float
    read_p99_ms: float
    list_p50_ms: float
    list_p99_ms: float
    checkpoints: int
    warm_bytes: int | None
    bytes_per_checkpoint: float | None
    client_cpu_ms_per_turn: float
    server_cpu_ms_per_turn: float | None
    total_cpu_ms_per_turn: float | None
    state_p50_ms: float | None = None
    server_cpu_split: dict[str, float] = field(default_factory=dict)
    warm_detail: dict[str, int] = field(default_factory=dict)
    hot_bytes: int | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)


MEDIAN_FIELDS = ("seconds", "turns_per_s", "turn_p50_ms", "turn_p99_ms", "read_p50_ms",
                 "read_p99_ms", "list_p50_ms", "list_p99_ms", "client_cpu_ms_per_turn",
                 "server_cpu_ms_per_turn", "total_cpu_ms_per_turn", "bytes_per_checkpoint",
                 "state_p50_ms")


def combine(runs: Sequence[Result]) -> Result:
    """One row from several rounds: the median of each timing; sizes of the median run."""
    middle = sorted(runs, key=lambda r: r.turns_per_s)[(len(runs) - 1) // 2]
    merged = replace(middle)
    for name in MEDIAN_FIELDS:
        values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        setattr(merged, name, statistics.median(values) if values else None)
    merged.server_cpu_split = {
        k: statistics.median(r.server_cpu_split.get(k, 0.0) for r in runs)
        for k in middle.server_cpu_split}
    merged.rounds = [{k: getattr(r, k) for k in ("turns_per_s", "read_p50_ms", "list_p50_ms")}
                     for r in runs] if len(runs) > 1 else []
    return merged


# -- the phases ----------------------------------------------------------------------------


@dataclass(slots=True)
class Phase:
    seconds: float
    latencies: list[float]


async def write_phase(app: Any, thread_ids: Sequence[str], turns: int, concurrency: int,
                      message_bytes: int, *, lease: Callable[[str], Any] | None = None
                      ) -> Phase:
    """Every thread runs its turns in order; at most ``concurrency`` threads at a time.

    With ``lease``, each turn runs inside ``async with lease(thread_id)``.
    """
    inputs = {t: [turn_input(t, k, message_bytes) for k in range(turns)] for t in thread_ids}
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def conversation(thread_id: str) -> None:
        config = thread_config(thread_id)
        async with gate:
            for message in inputs[thread_id]:
                started = time.perf_counter()
                if lease is None:
                    await app.ainvoke(message, config)
                else:
                    async with lease(thread_id):
                        await app.ainvoke(message, config)
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(conversation(t) for t in thread_ids))
    return Phase(time.perf_counter() - started, latencies)


async def read_phase(saver: Saver, thread_ids: Sequence[str], samples: int,
                     rng: random.Random) -> list[float]:
    out: list[float] = []
    for _ in range(samples):
        config = thread_config(rng.choice(thread_ids))
        started = time.perf_counter()
        found = await saver.aget_tuple(config)
        out.append(time.perf_counter() - started)
        if found is None:
            raise RuntimeError(f"{type(saver).__name__} lost the latest checkpoint of {config}")
    return out


async def state_phase(app: Any, thread_ids: Sequence[str], samples: int,
                      rng: random.Random) -> list[float]:
    """``aget_state``: the latest checkpoint with its DeltaChannels rebuilt from history."""
    out: list[float] = []
    for _ in range(samples):
        config = thread_config(rng.choice(thread_ids))
        started = time.perf_counter()
        state = await app.aget_state(config)
        out.append(time.perf_counter() - started)
        if not state.values.get("messages"):
            raise RuntimeError(f"no messages in the state of {config}")
    return out


async def list_phase(saver: Saver, thread_ids: Sequence[str], samples: int,
                     rng: random.Random, expect: int) -> list[float]:
    out: list[float] = []
    for _ in range(samples):
        config = thread_config(rng.choice(thread_ids))
        started = time.perf_counter()
        got = [item async for item in saver.alist(config, limit=10)]
        out.append(time.perf_counter() - started)
        if len(got) != expect:
            raise RuntimeError(f"{type(saver).__name__} listed {len(got)} of {expect}")
    return out


async def count_checkpoints(saver: Saver) -> int:
    return sum([1 async for _ in saver.alist(None)])


def build_agent(settings: Settings) -> StateGraph[Any]:
    """The graph of ``--workload``: chat, or chat with its messages in a DeltaChannel."""
    build = build_delta_agent if settings.workload == "delta" else build_chat_agent
    return build(settings.message_bytes)  # type: ignore[return-value]


def thread_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(count)]


async def warm_up(app: Any, saver: Saver, settings: Settings, rng: random.Random) -> None:
    ids = thread_ids("warmup", settings.warmup_threads)
    await write_phase(app, ids, settings.warmup_turns, settings.concurrency,
                      settings.message_bytes)
    await read_phase(saver, ids, 100, rng)
    await list_phase(saver, ids, 20, rng, min(10, 4 * settings.warmup_turns + 1))


async def run_saver(name: str, settings: Settings, servers: Servers, admin: Admin,
                    log: Callable[[str], None]) -> Result:
    rng = random.Random(settings.seed)
    log(f"[{name}] setup")
    async with open_saver(name, servers, admin, settings) as opened:
        saver = opened.saver
        app = build_agent(settings).compile(checkpointer=saver)
        log(f"[{name}] warm-up")
        await warm_up(app, saver, settings, rng)
        if name in NETWORKED:
            await admin.checkpoint()
        ids = thread_ids("chat", settings.threads)
        gc.collect()
        log(f"[{name}] write {settings.threads} threads x {settings.turns} turns, "
            f"{settings.concurrency} at a time")
        cpu0, srv0 = time.process_time(), server_cpu_ticks()
        lease = saver.lease if name.endswith("-leased") else None
        write = await write_phase(app, ids, settings.turns, settings.concurrency,
                                  settings.message_bytes, lease=lease)
        cpu1, srv1 = time.process_time(), server_cpu_ticks()
        log(f"[{name}] read latest x{settings.read_samples}, list x{settings.list_samples}")
        reads = await read_phase(saver, ids, settings.read_samples, rng)
        lists = await list_phase(saver, ids, settings.list_samples, rng,
                                 min(10, 4 * settings.turns + 1))
        states = None
        if settings.workload == "delta":
            log(f"[{name}] aget_state x{settings.list_samples}")
            states = await state_phase(app, ids, settings.list_samples, rng)
        log(f"[{name}] size")
        checkpoints = await count_checkpoints(saver)
        warm = await opened.warm_size()
        hot = await opened.hot_size()
    turns = settings.threads * settings.turns
    # a server this saver does not talk to is doing someone else's work
    used = servers_of(name)
    split = {k: v / turns for k, v in server_cpu_ms(srv0, srv1).items() if k in used}
    return Result(
        saver=name,
        turns=turns,
        seconds=write.seconds,
        turns_per_s=turns / write.seconds,
        turn_p50_ms=ms(percentile(write.latencies, 50)),
        turn_p99_ms=ms(percentile(write.latencies, 99)),
        read_p50_ms=ms(percentile(reads, 50)),
        read_p99_ms=ms(percentile(reads, 99)),
        list_p50_ms=ms(percentile(lists, 50)),
        list_p99_ms=ms(percentile(lists, 99)),
        checkpoints=checkpoints,
        warm_bytes=warm.bytes if warm else None,
        bytes_per_checkpoint=warm.bytes / checkpoints if warm and checkpoints else None,
        client_cpu_ms_per_turn=ms(cpu1 - cpu0) / turns,
        server_cpu_ms_per_turn=sum(split.values()) if split else None,
        total_cpu_ms_per_turn=(ms(cpu1 - cpu0) / turns + sum(split.values())
                               if split or not used else None),
        state_p50_ms=ms(percentile(states, 50)) if states else None,
        server_cpu_split=split,
        warm_detail=warm.detail if warm else {},
        hot_bytes=hot,
    )
