"""What a request costs must not depend on how many other threads the store holds.

The suites ``test_store_size_*`` run every request-path operation of the saver on one
thread of a known shape, first in a store holding a few other threads, then in one
holding thousands, and compare what each operation cost the store (buffers, VM steps,
documents examined, directory listings: counted, never timed). A cost that follows
the thread stays the same; one that follows the store grows a hundredfold.

The thread (``build_thread``), written through ``aput``/``aput_writes`` as LangGraph
writes it, has what makes a request path leave the thread's own rows: archived
history (stubs naming segments), run ids, pending writes, offloaded payloads, an
unchanged channel named by every checkpoint, a delta-style channel whose history is
walked back to its seed, and a second namespace.

The other threads are copies of a few such threads, made by bulk statements on the
store (each suite's ``_fill``) with archive keys and run ids of their own, so every
index a request might wrongly scan (run ids, archive keys, metadata filters, segments
and offloaded objects on disk) grows with them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6

import tierstore
from tierstore import TieredSaver
from tierstore.codec.segment import thread_prefix
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion
from tierstore.offload import thread_space

CHECKPOINTS = 10
"""Checkpoints of the thread's root namespace."""
KEEP_LIVE = 3
"""The newest checkpoints history demotion leaves in warm; the older ones are stubs."""
SUB_NS = "child:1"
RUN_EVERY = 4
"""Checkpoints per run id: a run holds archived and live checkpoints alike."""
BIG = 3000
"""Bytes of the channel value that is offloaded (incompressible, over the threshold)."""
OFFLOAD_THRESHOLD = 1024
OPTIONS: dict[str, Any] = {"offload_threshold": OFFLOAD_THRESHOLD, "offload_grace": 0.0}
"""Saver options of the suites: payloads over a kilobyte go to the object store."""

DEMOTE = TieringPolicy(archive_after=0, archive_idle_after=None, keep_latest=KEEP_LIVE,
                       segment_size=3)

FEW = 12
"""Other threads in the small store."""
MANY = 3000
"""Other threads in the large store (x ~12 checkpoints each)."""


def cfg(thread: str, checkpoint_id: str | None = None, ns: str | None = "") -> RunnableConfig:
    """A config naming the thread (and the namespace unless None, the checkpoint if given)."""
    configurable: dict[str, Any] = {"thread_id": thread}
    if ns is not None:
        configurable["checkpoint_ns"] = ns
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


@dataclass
class Thread:
    """A thread ``build_thread`` wrote: its checkpoint ids (oldest first) and runs."""

    thread_id: str
    ids: list[str] = field(default_factory=list)
    sub_ids: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.ids[-1]

    @property
    def archived(self) -> list[str]:
        return self.ids[:-KEEP_LIVE]

    @property
    def live(self) -> list[str]:
        return self.ids[-KEEP_LIVE:]


async def _write_step(saver: TieredSaver, thread: str, ns: str, parent: str | None, *,
                      step: int, versions: dict[str, str], values: dict[str, Any],
                      fresh: dict[str, str]) -> str:
    checkpoint: dict[str, Any] = dict(empty_checkpoint())
    checkpoint_id = str(uuid6())
    checkpoint["id"] = checkpoint_id
    checkpoint["channel_versions"] = dict(versions)
    checkpoint["channel_values"] = dict(values)
    metadata: dict[str, Any] = {"source": "input" if step == 0 else "loop", "step": step,
                                "parents": {}, "run_id": f"{thread}/run-{step // RUN_EVERY}"}
    await saver.aput(cfg(thread, parent, ns), checkpoint, metadata,  # type: ignore[arg-type]
                     dict[str, str | int | float](fresh))
    await saver.aput_writes(cfg(thread, checkpoint_id, ns),
                            [("items", f"w-{step}"), ("counter", step)], task_id=f"task-{step}")
    return checkpoint_id


async def build_thread(saver: TieredSaver, thread_id: str) -> Thread:
    """Write the thread, then archive its history but the newest ``KEEP_LIVE``."""
    built = Thread(thread_id)
    versions: dict[str, str] = {}

    def bump(channel: str) -> str:
        versions[channel] = saver.get_next_version(versions.get(channel), None)
        return versions[channel]

    parent: str | None = None
    for step in range(CHECKPOINTS):
        fresh = {"items": bump("items"), "counter": bump("counter")}
        # ``items`` has a value only at the root (its seed) and is written by every
        # step: a delta channel's history. ``static`` never changes after the root.
        values: dict[str, Any] = {"counter": step}
        if step == 0:
            fresh["static"] = bump("static")
            values["items"] = "seed"
            values["static"] = "unchanged"
        if step in (2, 7):
            fresh["big"] = bump("big")
            values["big"] = os.urandom(BIG)
        parent = await _write_step(saver, thread_id, "", parent, step=step,
                                   versions=versions, values=values, fresh=fresh)
        built.ids.append(parent)
    built.runs = sorted({f"{thread_id}/run-{s // RUN_EVERY}" for s in range(CHECKPOINTS)})
    sub_parent: str | None = None
    sub_versions: dict[str, str] = {}
    for step in range(2):
        sub_versions["counter"] = saver.get_next_version(sub_versions.get("counter"), None)
        sub_parent = await _write_step(saver, thread_id, SUB_NS, sub_parent, step=step,
                                       versions=sub_versions, values={"counter": step},
                                       fresh={"counter": sub_versions["counter"]})
        built.sub_ids.append(sub_parent)
    report = await HistoryDemotion(saver, DEMOTE, thread_id=thread_id).run_once(
        now=time.time() + 1)
    assert not report.errors, report.errors
    assert report.checkpoints == CHECKPOINTS - KEEP_LIVE, report
    return built


# -- the operations -------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """One saver call on a fresh thread: ``prepare`` (not counted) hands ``run`` what it
    needs, ``check`` (not counted) looks at the outcome."""

    run: Callable[[TieredSaver, Thread, Any], Awaitable[Any]]
    prepare: Callable[[TieredSaver, Thread], Awaitable[Any]] | None = None
    check: Callable[[TieredSaver, Thread, Any], Awaitable[None]] | None = None


async def _drain(it: Any) -> list[Any]:
    return [t async for t in it]


def _ids(tuples: Any) -> list[str]:
    return [t.config["configurable"]["checkpoint_id"] for t in tuples]


async def _get(saver: TieredSaver, thread: str, checkpoint_id: str | None = None,
               ns: str = "") -> Any:
    return await saver.aget_tuple(cfg(thread, checkpoint_id, ns))


async def _check_latest(saver: TieredSaver, t: Thread, got: Any) -> None:
    assert got is not None and got.config["configurable"]["checkpoint_id"] == t.head
    assert got.checkpoint["channel_values"]["static"] == "unchanged"
    assert len(got.checkpoint["channel_values"]["big"]) == BIG


async def _check_live(saver: TieredSaver, t: Thread, got: Any) -> None:
    assert got is not None and got.config["configurable"]["checkpoint_id"] == t.live[0]
    assert got.checkpoint["channel_values"]["counter"] == CHECKPOINTS - KEEP_LIVE


async def _check_archived(saver: TieredSaver, t: Thread, got: Any) -> None:
    assert got is not None and got.checkpoint["channel_values"]["counter"] == 2
    assert len(got.checkpoint["channel_values"]["big"]) == BIG
    assert [w[2] for w in got.pending_writes] == ["w-2", 2]


async def _check_sub(saver: TieredSaver, t: Thread, got: Any) -> None:
    assert got is not None and got.config["configurable"]["checkpoint_id"] == t.sub_ids[-1]


async def _check_count(saver: TieredSaver, t: Thread, got: Any, n: int) -> None:
    assert len(got) == n, _ids(got)


async def _put_prepare(saver: TieredSaver, t: Thread) -> tuple[Any, Any, str]:
    """The child LangGraph writes next: the head read back, one channel bumped."""
    head = await _get(saver, t.thread_id)
    assert head is not None
    checkpoint = dict(head.checkpoint)
    checkpoint["id"] = str(uuid6())
    versions = dict(checkpoint["channel_versions"])
    versions["counter"] = saver.get_next_version(versions["counter"], None)
    checkpoint["channel_versions"] = versions
    checkpoint["channel_values"] = {**checkpoint["channel_values"], "counter": 99}
    return head.config, checkpoint, versions["counter"]


async def _put(saver: TieredSaver, t: Thread, prepared: tuple[Any, Any, str]) -> Any:
    config, checkpoint, version = prepared
    return await saver.aput(config, checkpoint, {"source": "loop", "step": 99, "parents": {}},
                            {"counter": version})


async def _put_check(saver: TieredSaver, t: Thread, got: Any) -> None:
    head = await _get(saver, t.thread_id)
    assert head is not None and head.checkpoint["channel_values"]["counter"] == 99
    assert head.checkpoint["channel_values"]["static"] == "unchanged"


async def _put_writes_check(saver: TieredSaver, t: Thread, got: Any) -> None:
    head = await _get(saver, t.thread_id)
    assert head is not None and ("late-task", "items", "more") in head.pending_writes


async def _gone(saver: TieredSaver, t: Thread, got: Any) -> None:
    assert await _get(saver, t.thread_id) is None
    assert await _drain(saver.alist(cfg(t.thread_id, ns=None))) == []


async def _runs_check(saver: TieredSaver, t: Thread, got: Any) -> None:
    left = _ids(await _drain(saver.alist(cfg(t.thread_id))))
    assert left == [*t.ids[:4], *t.ids[8:]][::-1], [t.ids.index(i) for i in left]


async def _pruned(saver: TieredSaver, t: Thread, got: Any) -> None:
    left = _ids(await _drain(saver.alist(cfg(t.thread_id, ns=None))))
    assert sorted(left) == sorted([t.head, t.sub_ids[-1]])


async def _copied(saver: TieredSaver, t: Thread, got: Any) -> None:
    copy = await _get(saver, f"{t.thread_id}-copy", t.archived[1])
    assert copy is not None and copy.checkpoint["channel_values"]["counter"] == 1


async def _history_check(saver: TieredSaver, t: Thread, got: Any) -> None:
    assert got["items"].get("seed") == "seed"
    assert [w[2] for w in got["items"]["writes"]] == [f"w-{s}" for s in range(CHECKPOINTS - 1)]


def _counted(n: int) -> Callable[[TieredSaver, Thread, Any], Awaitable[None]]:
    async def check(saver: TieredSaver, t: Thread, got: Any) -> None:
        await _check_count(saver, t, got, n)

    return check


OPERATIONS: dict[str, Operation] = {
    "aget_tuple-latest": Operation(
        lambda s, t, _: _get(s, t.thread_id), check=_check_latest),
    "aget_tuple-latest-subgraph": Operation(
        lambda s, t, _: _get(s, t.thread_id, ns=SUB_NS), check=_check_sub),
    "aget_tuple-by-id-live": Operation(
        lambda s, t, _: _get(s, t.thread_id, t.live[0]), check=_check_live),
    "aget_tuple-by-id-archived": Operation(
        lambda s, t, _: _get(s, t.thread_id, t.archived[2]), check=_check_archived),
    "alist-thread": Operation(
        lambda s, t, _: _drain(s.alist(cfg(t.thread_id, ns=None))),
        check=_counted(CHECKPOINTS + 2)),
    "alist-namespace": Operation(
        lambda s, t, _: _drain(s.alist(cfg(t.thread_id))), check=_counted(CHECKPOINTS)),
    "alist-limit": Operation(
        lambda s, t, _: _drain(s.alist(cfg(t.thread_id), limit=2)), check=_counted(2)),
    "alist-before": Operation(
        lambda s, t, _: _drain(s.alist(cfg(t.thread_id), before=cfg(t.thread_id, t.ids[5]),
                                       limit=3)),
        check=lambda s, t, got: _check_ids(got, t.ids[4:1:-1])),
    "alist-filter": Operation(
        lambda s, t, _: _drain(s.alist(cfg(t.thread_id), filter={"source": "loop", "step": 4})),
        check=lambda s, t, got: _check_ids(got, [t.ids[4]])),
    "alist-filter-thread": Operation(
        lambda s, t, _: _drain(s.alist(cfg(t.thread_id, ns=None), filter={"step": 1})),
        check=lambda s, t, got: _check_ids(got, [t.sub_ids[1], t.ids[1]])),
    "alist-filter-no-match": Operation(
        lambda s, t, _: _drain(s.alist(cfg(t.thread_id, ns=None), filter={"step": 1000})),
        check=_counted(0)),
    "aget_delta_channel_history": Operation(
        lambda s, t, _: s.aget_delta_channel_history(config=cfg(t.thread_id),
                                                     channels=["items"]),
        check=_history_check),
    "aput": Operation(_put, prepare=_put_prepare, check=_put_check),
    "aput_writes": Operation(
        lambda s, t, _: s.aput_writes(cfg(t.thread_id, t.head),
                                      [("items", "more"), ("counter", 1)], task_id="late-task"),
        check=_put_writes_check),
    "adelete_thread": Operation(lambda s, t, _: s.adelete_thread(t.thread_id), check=_gone),
    "adelete_for_runs": Operation(  # steps 4..7: archived and live checkpoints
        lambda s, t, _: s.adelete_for_runs([t.runs[1]]), check=_runs_check),
    "aprune-keep_latest": Operation(
        lambda s, t, _: s.aprune([t.thread_id], strategy="keep_latest"), check=_pruned),
    "aprune-delete": Operation(
        lambda s, t, _: s.aprune([t.thread_id], strategy="delete"), check=_gone),
    "acopy_thread": Operation(
        lambda s, t, _: s.acopy_thread(t.thread_id, f"{t.thread_id}-copy"), check=_copied),
}


async def _check_ids(got: Any, expected: list[str]) -> None:
    assert _ids(got) == expected


async def run_operation(saver: TieredSaver, name: str, t: Thread,
                        counted: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]
                        ) -> Any:
    """Prepare, run the operation inside ``counted``, check what it did."""
    op = OPERATIONS[name]
    prepared = await op.prepare(saver, t) if op.prepare is not None else None
    got = await counted(lambda: op.run(saver, t, prepared))
    if op.check is not None:
        await op.check(saver, t, got)
    return got


# -- counting ---------------------------------------------------------------------------


class DirectoryListings:
    """Directories listed by this process while armed (``os.scandir`` / ``os.listdir``
    audit events): what walking an object store's directory tree costs.

    One hook for the process, installed on first use (audit hooks cannot be removed);
    it only counts while a test holds ``counting()``.
    """

    _installed: DirectoryListings | None = None

    def __init__(self) -> None:
        self.count = 0
        self.armed = False

    @classmethod
    def get(cls) -> DirectoryListings:
        if cls._installed is None:
            counter = cls()
            sys.addaudithook(counter._hook)
            cls._installed = counter
        return cls._installed

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.armed and event in ("os.scandir", "os.listdir"):
            self.count += 1

    @contextmanager
    def counting(self) -> Iterator[DirectoryListings]:
        self.count = 0
        self.armed = True
        try:
            yield self
        finally:
            self.armed = False


class PythonLines:
    """Lines of tierstore's own Python run on the calling thread while counting (a line
    run again by a loop counts again): the work done in Python, such as walking a
    cache's entries, which no store counts."""

    def __init__(self) -> None:
        self.count = 0
        self._root = str(Path(tierstore.__file__).parent)

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename.startswith(self._root):
            return self._line
        return None

    def _line(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self.count += 1
        return self._line

    @contextmanager
    def counting(self) -> Iterator[PythonLines]:
        self.count = 0
        previous = sys.gettrace()
        sys.settrace(self._call)
        try:
            yield self
        finally:
            sys.settrace(previous)


def fill_object_dirs(root: Path, thread_ids: list[str]) -> None:
    """Give each thread a segment and an offloaded object on disk (contents unread)."""
    from tierstore.tiers.file import FileStore

    store = FileStore(root)
    for thread_id in thread_ids:
        for prefix in (thread_prefix(thread_id), thread_space(thread_id)):
            path = store._path(f"{prefix}0123456789abcdef/object")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")


# -- measuring and comparing --------------------------------------------------------------

StoreMeter = Callable[[Callable[[], Awaitable[Any]]], Awaitable[tuple[Any, int]]]
"""Runs a call and returns its result and what it cost the warm store (buffers, VM
steps, documents examined: each suite counts its own)."""


@dataclass(frozen=True)
class Cost:
    """What one operation cost: the warm store's own count, directories the file cold
    tier listed, lines of tierstore's Python run."""

    store: int
    listings: int
    lines: int | None


Figures = dict[str, dict[str, Cost]]
"""Operation -> phase ("few", then the larger stores) -> its cost."""


async def measure_operation(saver: TieredSaver, name: str, t: Thread,
                            meter: StoreMeter, *, python: bool = True) -> Cost:
    """Run one operation on ``t`` (``run_operation``), counting only the call itself;
    ``python``: count the lines of tierstore's Python too (tracing slows every Python
    call of the process, an emulated store's included)."""
    seen: list[Cost] = []

    async def counted(call: Callable[[], Awaitable[Any]]) -> Any:
        lines = PythonLines()
        with DirectoryListings.get().counting() as listings, \
                lines.counting() if python else nullcontext(lines):
            result, n = await meter(call)
        seen.append(Cost(n, listings.count, lines.count if python else None))
        return result

    await run_operation(saver, name, t, counted)
    return seen[0]


SLACK = 1.3
"""A cost may grow by this factor in the large store (a btree one level deeper adds a
page per probe; caches and statistics shift a little). An O(store) step grows with
the hundredfold number of threads."""
FLOORS = {"store": 20, "listings": 2, "lines": 50}
"""Absolute growth allowed on top of ``SLACK``, for costs too small for a ratio."""


def bounded(few: int, many: int, *, floor: int) -> bool:
    """Whether ``many`` stays within ``SLACK`` of ``few`` (plus ``floor`` for small costs)."""
    return many <= few * SLACK + floor


def report(figures: Figures, unit: str) -> None:
    """Print the figures (``pytest -s``): operation, then each phase's costs."""
    for name, phases in figures.items():
        print(f"{name:28} " + "  ".join(
            f"{phase}: {c.store} {unit}, {c.listings} listings"
            + (f", {c.lines} lines" if c.lines is not None else "")
            for phase, c in phases.items()))


def assert_flat(figures: Figures, name: str, *, unit: str, sizes: Mapping[str, int]) -> None:
    """Every phase of ``name`` costs what the small store's did, counter by counter."""
    few = figures[name]["few"]
    assert few.store > 0
    for phase, cost in figures[name].items():
        for counter, floor in FLOORS.items():
            small, large = getattr(few, counter), getattr(cost, counter)
            if small is None or large is None:
                continue  # not counted by this suite
            what = unit if counter == "store" else \
                "directory listings" if counter == "listings" else "lines of tierstore Python"
            assert bounded(small, large, floor=floor), (
                f"{name}: {small} {what} with {sizes['few']} other threads, {large} with "
                f"{sizes[phase]} ({phase})")
