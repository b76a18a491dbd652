"""Four archiving workers in their own OS processes share one PostgreSQL store with the app.

While the app runs turns on its threads (and deletes some of them), four spawned
workers run history demotion and idle archival with every threshold at zero, in a
loop, each several heads at once. Each worker notes every segment it writes to cold
and which checkpoints it packed. Afterwards:

* no worker threw a segment away (claims are exclusive: two workers moving one head
  at once would both pack its checkpoints, and the one that marks second loses its
  move and deletes its segment);
* every stub names a segment that holds its checkpoint and that a worker packed it
  into, and nothing of a deleted thread is left in cold or brought back;
* every thread reads back, through a saver with nothing cached, exactly as a run of
  the same turns on a store with no tiering stored them (the ledger of writes).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_archive_race import everything, profile_graph, thread_cfg
from tests.stacks import STACKS, Urls, postgres_file
from tierstore import TieredSaver
from tierstore.codec.segment import SEGMENT_PREFIX, unpack_segment
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion, IdleArchival
from tierstore.ops import verify

WORKERS = 4
THREADS, TURNS = 10, 6
DOOMED = ("race-8", "race-9")  # deleted by the app while the workers run
EVERYTHING = TieringPolicy(archive_after=0, archive_idle_after=0, keep_latest=1,
                           segment_size=2, batch=3, parallel_moves=3)
"""Archive all history and every idle thread at once, in small segments and small
claim batches, so the workers meet on the same heads as often as they can."""


def _archive_in_a_loop(urls: Urls, ledger: Path, stop: Any, ready: Any, passes: Any) -> None:
    """A worker process: both archiving jobs until told to stop; writes to ``ledger``
    every segment it put (key, thread, namespace, checkpoint ids)."""
    packed: list[tuple[str, str, str, list[str]]] = []

    async def main() -> None:
        async with urls.open() as saver:
            for region in saver.regions.distinct():
                cold = region.cold
                assert cold is not None
                put = cold.put

                async def noting(key: str, data: bytes, *, storage_class: str | None = None,
                                 put: Any = put) -> None:
                    await put(key, data, storage_class=storage_class)
                    if key.startswith(SEGMENT_PREFIX):
                        segment = unpack_segment(data, key=key)
                        packed.append((key, segment.thread_id, segment.checkpoint_ns,
                                       sorted(segment.records)))

                cold.put = noting  # type: ignore[method-assign]
            jobs = [HistoryDemotion(saver, EVERYTHING), IdleArchival(saver, EVERYTHING)]
            ready.set()
            while not stop.is_set():
                for job in jobs:
                    report = await job.run_once(now=time.time() + 1)
                    assert report.failed == 0, report.errors
                with passes.get_lock():
                    passes.value += 1
                await asyncio.sleep(0.001)

    try:
        asyncio.run(main())
    finally:
        ledger.write_text(json.dumps(packed))


async def passes_done(passes: Any, more: int, procs: list[Any]) -> None:
    """Wait until the workers completed ``more`` passes (of both jobs) from now."""
    target = passes.value + more
    async with asyncio.timeout(60):
        while passes.value < target:
            if not all(p.is_alive() for p in procs):
                raise AssertionError("an archiving worker died")
            await asyncio.sleep(0.005)


async def turns(saver: TieredSaver, passes: Any = None, procs: list[Any] | None = None) -> None:
    """The app: every thread runs its turns at once; with workers, each turn waits
    until the workers completed some passes since the last one, so heads the app
    holds were archived under it."""
    app = profile_graph().compile(checkpointer=saver)

    async def run(thread: str) -> None:
        for i in range(TURNS):
            await app.ainvoke({"notes": [f"input {i}"]}, thread_cfg(thread))
            if passes is not None:
                await passes_done(passes, WORKERS, procs or [])

    await asyncio.gather(*(run(f"race-{k}") for k in range(THREADS)))


async def test_four_worker_processes_archive_each_checkpoint_once_under_live_turns(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    urls = postgres_file(request, tmp_path / "raced")
    reference: Urls = STACKS["postgres"](request, tmp_path / "reference")
    async with reference.open() as saver:
        await turns(saver)
        for thread in DOOMED:
            await saver.adelete_thread(thread)
    async with reference.open() as saver:
        expected = await everything(saver, THREADS)

    ctx = multiprocessing.get_context("spawn")
    stop, passes = ctx.Event(), ctx.Value("q", 0)
    ledgers = [tmp_path / f"worker-{k}.json" for k in range(WORKERS)]
    readies = [ctx.Event() for _ in range(WORKERS)]
    procs = [ctx.Process(target=_archive_in_a_loop, args=(urls, ledgers[k], stop, readies[k],
                                                          passes), daemon=True)
             for k in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        for ready in readies:
            assert await asyncio.to_thread(ready.wait, 120), "a worker did not start"
        async with urls.open() as saver:
            await turns(saver, passes, procs)
            for thread in DOOMED:
                await saver.adelete_thread(thread)
            await passes_done(passes, 2 * WORKERS, procs)  # passes begun after the deletes
    finally:
        stop.set()
        for p in procs:
            await asyncio.to_thread(p.join, 120)
    assert [p.exitcode for p in procs] == [0] * WORKERS

    packed: dict[tuple[str, str, str], list[str]] = {}  # checkpoint -> segments it went into
    written: dict[str, tuple[str, str, list[str]]] = {}
    for ledger in ledgers:
        for key, thread, ns, ids in json.loads(ledger.read_text()):
            written[key] = (thread, ns, ids)
            for checkpoint_id in ids:
                packed.setdefault((thread, ns, checkpoint_id), []).append(key)

    async with urls.open() as fresh:
        stack = fresh.regions.by_name["default"]
        assert stack.cold is not None
        stubs: dict[tuple[str, str, str], str] = {}
        for k in range(THREADS):
            thread = f"race-{k}"
            for meta in await stack.warm.index(thread, ""):
                if meta.archive_key is not None:
                    stubs[(thread, "", meta.checkpoint_id)] = meta.archive_key
        assert len(stubs) > THREADS  # heads and history really went to cold under the turns
        in_cold = {k async for k in stack.cold.iter_keys(SEGMENT_PREFIX)}
        assert in_cold <= set(written)
        # Claims are exclusive: no two workers ever moved a head at once, so no worker
        # lost a move to another and threw its segment away. Only a thread the app
        # deleted takes checkpoints from under a move (which then drops its segment).
        thrown = sorted(k for k, (t, _, _) in written.items()
                        if k not in in_cold and t not in DOOMED)
        assert thrown == [], f"{len(thrown)} of {len(written)} segments thrown away"
        # Each archived checkpoint is in the segment its stub names, one a worker
        # packed it into. (A head the app resumed was rehydrated and archived again
        # later: it went into more than one segment, one after the other.)
        for checkpoint, key in stubs.items():
            assert key in packed[checkpoint]
            assert checkpoint[2] in (await stack.archive.load_segment(key)).records
        # nothing of a deleted thread is left in cold or brought back into warm
        assert [k for k in in_cold if written[k][0] in DOOMED] == []
        for thread in DOOMED:
            assert await stack.warm.index(thread, "") == []
        # every thread reads back exactly as the same turns with no tiering stored them
        got = await everything(fresh, THREADS)
        assert got == expected
        report = await verify(fresh)
        assert report["ok"], report["problems"]
