"""The ``tierstore`` command line.

Stores come from ``--hot/--warm/--cold`` or ``TIERSTORE_HOT_URL`` /
``TIERSTORE_WARM_URL`` / ``TIERSTORE_COLD_URL`` (``none`` disables hot or cold), or
from a region table (``--regions FILE`` or ``TIERSTORE_REGIONS_FILE``), of which
``--region NAME`` opens one region's stores only: a worker or an operator in one
region never needs another region's credentials. Which of them wins is decided in
one place, ``settings.resolve_spec``, the same rule ``TieredSaver.from_env`` follows.
Every command that reports has ``--json``. Long work shows a progress bar on a
terminal. Errors are one clear line on stderr, never a traceback.

Each command is a plain function of this module (``status(warm=..., as_json=True)``
runs ``tierstore status --warm ... --json``) that returns its exit code; ``build_app``
registers them on a typer app.

Exit codes: 0 success, 1 a check failed (``verify`` found a mismatch, ``worker
--once`` had failing jobs or failed moves, ``archive`` failed to move a thread,
``restore --wait`` timed out), 2 misuse (bad flag, bad
URL, unknown thread), 3 a store refused or could not be reached.
"""

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from tierstore.errors import InvalidInput, StorageError, TierstoreError
from tierstore.saver import TieredSaver
from tierstore.settings import REGIONS_FILE_VARIABLE, URL_VARIABLES, parse_duration, resolve_spec

try:
    import typer
except ModuleNotFoundError:  # pragma: no cover - exercised when the cli extra is absent
    typer = None  # type: ignore[assignment]

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_OK",
    "EXIT_STORAGE",
    "EXIT_USAGE",
    "archive",
    "build_app",
    "demo",
    "export_",
    "import_",
    "inspect",
    "main",
    "migrate",
    "restore",
    "status",
    "verify",
    "worker",
]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_STORAGE = 0, 1, 2, 3
T = TypeVar("T")


def _option(*args: Any, **kwargs: Any) -> Any:
    """``typer.Option``; without the cli extra, nothing, so the commands stay importable."""
    return None if typer is None else typer.Option(*args, **kwargs)


def _argument(*args: Any, **kwargs: Any) -> Any:
    """``typer.Argument``; without the cli extra, nothing (see ``_option``)."""
    return None if typer is None else typer.Argument(*args, **kwargs)


Hot = Annotated[str | None, _option("--hot", help=f"hot tier URL [env {URL_VARIABLES['hot']}]")]
Warm = Annotated[str | None, _option("--warm",
                                     help=f"warm tier URL [env {URL_VARIABLES['warm']}]")]
Cold = Annotated[str | None, _option("--cold",
                                     help=f"cold tier URL [env {URL_VARIABLES['cold']}]")]
Json = Annotated[bool, _option("--json", help="machine-readable output")]
RegionsFile = Annotated[Path | None, _option(
    "--regions", help=f"region table (TOML) [env {REGIONS_FILE_VARIABLE}]")]
RegionName = Annotated[str | None, _option(
    "--region", help="open only this region of the table")]


def _fail(exc: TierstoreError) -> int:
    kind = "error" if isinstance(exc, StorageError) else "usage error"
    message = str(exc).replace("\n", " ")
    print(f"tierstore: {kind}: {message}", file=sys.stderr)
    return EXIT_STORAGE if isinstance(exc, StorageError) else EXIT_USAGE


@dataclass(frozen=True, slots=True)
class _Where:
    """The store flags of a command, as given; ``resolve_spec`` decides what they mean."""

    hot: str | None = None
    warm: str | None = None
    cold: str | None = None
    regions: Path | None = None
    region: str | None = None
    options: Mapping[str, Any] | None = None  # option flags given; the rest follow the resolver

    def saver(self) -> TieredSaver:
        return TieredSaver.from_spec(resolve_spec(
            hot=self.hot, warm=self.warm, cold=self.cold, regions_file=self.regions,
            region=self.region, options=self.options))


def _run(where: _Where, body: Callable[[TieredSaver], Awaitable[T]]) -> T:
    saver = where.saver()

    async def go() -> T:
        async with saver:
            return await body(saver)

    return asyncio.run(go())


def _emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        render(data)


@contextmanager
def _progress(label: str, enabled: bool) -> Iterator[Callable[[int, int | None], None]]:
    """A rich progress bar on a terminal; silent when piped or with --json."""
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _table(title: str, rows: Sequence[tuple[str, ...]], headers: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _kv(data: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in data.items() if k not in ("backend", "claims"))


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


# -- commands (the order here is the order of `tierstore --help`) -------------------------


def demo(directory: Annotated[Path | None, _option(
        "--dir", help="keep the demo's stores in this directory")] = None) -> int:
    """Run a deterministic agent on the embedded stack and show the tiers at work."""
    from tierstore.demo import run_demo

    run_demo(directory)
    return EXIT_OK


def migrate(
    hot: Hot = None, warm: Warm = None, cold: Cold = None,
    regions: RegionsFile = None, region: RegionName = None,
    partitions: Annotated[int | None, _option(
        help="hash-partition the PostgreSQL checkpoint tables by thread into N: a new "
             "store is created so, one in use is converted online (resumable)")] = None,
    batch_rows: Annotated[int, _option(
        help="rows copied per transaction by a conversion")] = 2000,
    abandon_partitioning: Annotated[bool, _option(
        "--abandon-partitioning",
        help="remove what an unfinished conversion made; the tables stay plain")] = False,
    as_json: Json = False,
) -> int:
    """Create or upgrade schema, indexes, directories and buckets (idempotent); with
    --partitions, lay out or convert the PostgreSQL tables."""
    where = _Where(hot, warm, cold, regions, region)
    layouts: dict[str, Any] = {}
    if partitions is not None and abandon_partitioning:
        raise InvalidInput("give --partitions or --abandon-partitioning, not both")
    if partitions is not None or abandon_partitioning:
        layouts = _partition(where, partitions, batch_rows=batch_rows, as_json=as_json)

    async def body(saver: TieredSaver) -> None:
        return None

    _run(where, body)
    if as_json:
        _emit({"ok": True, "partitioning": layouts}, True, lambda d: None)
    else:
        for name, report in layouts.items():
            print(f"region {name}: {_layout_line(report)}")
        print("schema and stores are up to date")
    return EXIT_OK


def _partition(where: _Where, partitions: int | None, *, batch_rows: int,
               as_json: bool) -> dict[str, Any]:
    """Convert (or, with None, abandon converting) the PostgreSQL warm store of every region
    the flags name, before any store is opened: one whose URL asks for ``partitions``
    refuses to open until it is converted."""
    from tierstore.tiers import open_store

    spec = resolve_spec(hot=where.hot, warm=where.warm, cold=where.cold,
                        regions_file=where.regions, region=where.region)
    stores = {name: open_store("warm", urls.warm) for name, urls in spec.regions.items()}
    for name, store in stores.items():
        if store.backend != "postgres":
            raise InvalidInput(f"--partitions and --abandon-partitioning apply to a PostgreSQL "
                               f"warm tier; region {name!r} has {store.backend}")
    from tierstore.tiers.postgres import PostgresWarm
    from tierstore.tiers.postgres.partitions import Tuning

    tuning = Tuning(batch_rows=batch_rows)
    out: dict[str, Any] = {}
    for name, store in stores.items():
        assert isinstance(store, PostgresWarm)
        if partitions is None:
            out[name] = {"abandoned": asyncio.run(store.abandon_partitioning())}
            continue
        with _progress(f"partitioning {name}", not as_json) as progress:
            report = asyncio.run(store.partition(partitions, tuning=tuning, progress=progress))
        out[name] = report.as_dict()
    return out


def _layout_line(report: dict[str, Any]) -> str:
    if "abandoned" in report:
        return ("the unfinished conversion was removed" if report["abandoned"]
                else "no conversion was underway")
    n = report["partitions"]
    if not report["converted"]:
        return f"already hash-partitioned into {n}"
    return (f"hash-partitioned into {n}: {report['rows_copied']} rows copied"
            + (" (resumed)" if report["resumed"] else "")
            + f", {report['threads_caught_up']} thread namespaces caught up, tables locked "
            f"for {report['lock_seconds'] * 1000:.0f} ms")


def status(hot: Hot = None, warm: Warm = None, cold: Cold = None,
           regions: RegionsFile = None, region: RegionName = None,
           as_json: Json = False) -> int:
    """Threads, checkpoints and bytes per tier (and per region); claims workers hold."""
    from tierstore.ops import status as run_status

    data = _run(_Where(hot, warm, cold, regions, region), run_status)

    def render(d: dict[str, Any]) -> None:
        rows: list[tuple[str, ...]] = []
        for name, tiers in d["regions"].items():
            for tier in ("hot", "warm", "cold"):
                info = tiers[tier]
                rows.append((name, tier, info["backend"] if info else "-",
                             (_kv(info) or "cache local to each process") if info
                             else "disabled"))
        _table("tierstore status", rows, ("region", "tier", "backend", "holds"))
        for name, tiers in d["regions"].items():
            claims = tiers["warm"]["claims"]
            if claims["count"]:
                print(f"region {name}: {claims['count']} threads claimed by tiering "
                      f"workers, the first until {_when(claims['earliest_until'])}, "
                      f"the last until {_when(claims['latest_until'])} (a worker that "
                      "died keeps its claims until then)")

    _emit(data, as_json, render)
    return EXIT_OK


def archive(
    hot: Hot = None, warm: Warm = None, cold: Cold = None,
    regions: RegionsFile = None, region: RegionName = None,
    older_than: Annotated[str, _option(help="archive history older than this")] = "30d",
    idle_after: Annotated[str | None, _option(
        help="also archive whole threads idle longer than this")] = None,
    thread: Annotated[str | None, _option(help="only this thread")] = None,
    storage_class: Annotated[str | None, _option(help="cold storage class")] = None,
    dry_run: Annotated[bool, _option("--dry-run", help="only report")] = False,
    as_json: Json = False,
) -> int:
    """Move old history (and idle threads) to the cold tier now."""
    from tierstore.jobs.plan import TieringPolicy
    from tierstore.jobs.tiering import HistoryDemotion, IdleArchival

    policy = TieringPolicy(
        archive_after=parse_duration(older_than),
        archive_idle_after=parse_duration(idle_after) if idle_after else None,
        storage_class=storage_class,
    )

    async def body(saver: TieredSaver) -> list[dict[str, Any]]:
        jobs: list[Any] = [HistoryDemotion(saver, policy, thread_id=thread, dry_run=dry_run)]
        if idle_after:
            jobs.append(IdleArchival(saver, policy, thread_id=thread, dry_run=dry_run))
        # one run visits every eligible head once and ends (see tierstore.jobs.tiering)
        return [(await job.run_once()).as_dict() for job in jobs]

    reports = _run(_Where(hot, warm, cold, regions, region), body)

    def render(rs: list[dict[str, Any]]) -> None:
        verb = "would move" if dry_run else "moved"
        for r in rs:
            print(f"{r['job']}: {verb} {r['checkpoints']} checkpoints of {r['threads']} "
                  f"threads in {r['segments']} segments ({r['bytes']} bytes)")
            for err in r["errors"]:
                print(f"  error: {err}", file=sys.stderr)

    _emit(reports, as_json, render)
    busy = max(reports, key=lambda r: r["busy"], default=None)
    if busy is not None and busy["busy"]:
        print(f"tierstore: {busy['busy']} threads are claimed by another worker until "
              f"{_when(busy['busy_until'])}; skipped (a worker that died keeps its "
              "claims until then)", file=sys.stderr)
    if any(r["failed"] or r["errors"] for r in reports):
        return EXIT_CHECK_FAILED
    return EXIT_OK


def restore(
    thread: Annotated[str, _option(help="thread whose archive to restore")],
    hot: Hot = None, warm: Warm = None, cold: Cold = None,
    regions: RegionsFile = None, region: RegionName = None,
    wait: Annotated[bool, _option("--wait", help="wait until rehydrated")] = False,
    timeout: Annotated[str, _option(help="how long --wait waits")] = "12h",
    days: Annotated[int | None, _option(
        help="days the restored copy stays (default: the cold URL's restore_days, else 7)")] = None,
    as_json: Json = False,
) -> int:
    """Request a restore of a thread's archive; with --wait, bring it back to warm."""
    from tierstore.jobs.tiering import Rehydrate, request_restore

    limit = parse_duration(timeout)

    async def body(saver: TieredSaver) -> dict[str, Any]:
        states = await request_restore(saver, thread, days=days)
        result: dict[str, Any] = {"thread_id": thread, "segments": states,
                                  "rehydrated": 0, "done": False}
        deadline = time.monotonic() + limit
        while True:
            report = await Rehydrate(saver).run_once()
            result["rehydrated"] += report.checkpoints
            pending = await saver.regions.for_thread(thread).warm.archive_refs(thread)
            result["done"] = not pending
            if result["done"] or not wait or time.monotonic() > deadline:
                return result
            await asyncio.sleep(min(30.0, max(1.0, limit / 100)))

    result = _run(_Where(hot, warm, cold, regions, region), body)
    _emit(result, as_json, lambda r: print(
        f"thread {r['thread_id']!r}: {len(r['segments'])} segments, "
        f"{r['rehydrated']} checkpoints back in warm"
        + ("" if r["done"] else " (restore in progress; run `tierstore worker`)")))
    if wait and not result["done"]:
        return EXIT_CHECK_FAILED
    return EXIT_OK


def inspect(thread: str, hot: Hot = None, warm: Warm = None, cold: Cold = None,
            regions: RegionsFile = None, region: RegionName = None,
            as_json: Json = False) -> int:
    """The history tree of a thread, with the tier of each checkpoint."""
    from tierstore.ops import inspect_thread

    data = _run(_Where(hot, warm, cold, regions, region),
                lambda s: inspect_thread(s, thread))

    def render(d: dict[str, Any]) -> None:
        from rich.console import Console
        from rich.markup import escape
        from rich.tree import Tree

        root = Tree(f"thread {d['thread_id']!r}")
        for ns, rows in d["namespaces"].items():
            branch = root.add(f"namespace {ns!r} ({len(rows)} checkpoints)")
            for row in rows:
                branch.add(escape(
                    f"{row['checkpoint_id']}  [{row['tier']}]  step={row['step']} "
                    f"source={row['source']} writes={row['writes']} "
                    f"parent={row['parent_id']}"))
        Console().print(root)

    _emit(data, as_json, render)
    return EXIT_OK


def verify(hot: Hot = None, warm: Warm = None, cold: Cold = None,
           regions: RegionsFile = None, region: RegionName = None,
           as_json: Json = False) -> int:
    """Re-check every checksum across tiers and that every checkpoint is complete
    (each channel version, pending write and stub resolves); exit 1 on any problem."""
    from tierstore.ops import verify as run_verify

    with _progress("verifying", not as_json) as progress:
        data = _run(_Where(hot, warm, cold, regions, region),
                    lambda s: run_verify(s, progress))

    def render(d: dict[str, Any]) -> None:
        print(f"checked {d['checked']} checkpoints: "
              + ("all verified" if d["ok"] else f"{len(d['problems'])} problems"))
        for problem in d["problems"]:
            print(f"  {problem}")
        if d["skipped_need_restore"]:
            print(f"  {len(d['skipped_need_restore'])} segments need a restore to be read")

    _emit(data, as_json, render)
    return EXIT_OK if data["ok"] else EXIT_CHECK_FAILED


def worker(
    hot: Hot = None, warm: Warm = None, cold: Cold = None,
    regions: RegionsFile = None, region: RegionName = None,
    interval: Annotated[str, _option(help="time between runs of each job")] = "5m",
    archive_after: Annotated[str, _option()] = "30d",
    archive_idle_after: Annotated[str, _option()] = "90d",
    expire_after: Annotated[str | None, _option()] = None,
    once: Annotated[bool, _option("--once", help="run every job once and exit")] = False,
    health_file: Annotated[Path | None, _option(help="write health JSON here")] = None,
) -> int:
    """Run the tiering jobs on a schedule until SIGINT/SIGTERM."""
    from tierstore.jobs.plan import TieringPolicy
    from tierstore.jobs.scheduler import Scheduler
    from tierstore.jobs.tiering import (
        ColdGC,
        HistoryDemotion,
        HotExpiry,
        IdleArchival,
        Rehydrate,
        Retention,
    )

    policy = TieringPolicy(
        archive_after=parse_duration(archive_after),
        archive_idle_after=parse_duration(archive_idle_after),
        expire_after=parse_duration(expire_after) if expire_after else None,
    )
    every = parse_duration(interval)

    async def body(saver: TieredSaver) -> dict[str, Any]:
        jobs = [HotExpiry(saver, policy), HistoryDemotion(saver, policy),
                IdleArchival(saver, policy), Retention(saver, policy),
                Rehydrate(saver, policy), ColdGC(saver, policy)]
        scheduler = Scheduler([(job, every) for job in jobs])

        def write_health() -> None:
            if health_file is not None:
                health_file.write_text(json.dumps(scheduler.health(), default=str))

        if once:
            await scheduler.tick()
            write_health()
            return scheduler.health()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        scheduler.on_report = lambda report: write_health()
        print(f"tierstore worker: {len(jobs)} jobs every {interval}", file=sys.stderr)
        await scheduler.run(stop)
        write_health()
        return scheduler.health()

    health = _run(_Where(hot, warm, cold, regions, region), body)
    if once:
        print(json.dumps(health, indent=2, default=str))
    return EXIT_OK if health["healthy"] else EXIT_CHECK_FAILED


def export_(thread: str, file: Path, hot: Hot = None, warm: Warm = None, cold: Cold = None,
            regions: RegionsFile = None, region: RegionName = None,
            as_json: Json = False) -> int:
    """Write one thread, with its archived history, to a portable file."""
    from tierstore.ops import export_thread

    with _progress("exporting", not as_json) as progress:
        data = _run(_Where(hot, warm, cold, regions, region),
                    lambda s: export_thread(s, thread, file, progress))
    _emit(data, as_json, lambda d: print(
        f"exported {d['checkpoints']} checkpoints of {d['thread_id']!r} to {d['path']}"))
    return EXIT_OK


def import_(
    file: Annotated[Path | None, _argument(help="a file written by export")] = None,
    from_langgraph_postgres: Annotated[str | None, _option(
        help="migrate a LangGraph AsyncPostgresSaver database from this URL")] = None,
    as_thread: Annotated[str | None, _option(help="import under this thread id")] = None,
    replace: Annotated[bool, _option(
        help="swap an existing thread for the file's checkpoints (else it is refused)")
    ] = False,
    allow_type: Annotated[list[str] | None, _option(
        help="MODULE:NAME of a type the file may hold beyond LangGraph's safe types "
             "(repeatable)")] = None,
    max_payload_bytes: Annotated[int | None, _option(
        help="bound on one decompressed value (default 256 MiB)")] = None,
    max_record_bytes: Annotated[int | None, _option(
        help="bound on one checkpoint's values together (default 1 GiB)")] = None,
    max_bundle_bytes: Annotated[int | None, _option(
        help="bound on the decompressed file (default 2 GiB)")] = None,
    hot: Hot = None, warm: Warm = None, cold: Cold = None,
    regions: RegionsFile = None, region: RegionName = None, as_json: Json = False,
) -> int:
    """Load an export file, or migrate a LangGraph Postgres checkpoint database.

    The file is checked whole (ids, sizes, types, checksums) before anything is
    written; an existing thread is refused unless --replace or --as-thread.
    """
    from tierstore.ops import import_file, import_langgraph_postgres

    if (file is None) == (from_langgraph_postgres is None):
        raise InvalidInput("give either FILE or --from-langgraph-postgres URL")
    allowed: list[tuple[str, ...]] = []
    for entry in allow_type or []:
        module, _, name = entry.partition(":")
        if not module or not name:
            raise InvalidInput(f"--allow-type takes MODULE:NAME, got {entry!r}")
        allowed.append((module, name))
    # each bound given as a flag wins over its TIERSTORE_* variable, which wins over
    # the default: the resolver decides, and the saver's untrusted codec carries them
    bounds = {k: v for k, v in (("max_payload_bytes", max_payload_bytes),
                                ("max_record_bytes", max_record_bytes),
                                ("max_bundle_bytes", max_bundle_bytes)) if v is not None}
    where = _Where(hot, warm, cold, regions, region, options=bounds or None)
    with _progress("importing", not as_json) as progress:
        if file is not None:
            path = file
            data = _run(where, lambda s: import_file(
                s, path, as_thread=as_thread, replace=replace,
                allowed_msgpack_modules=allowed, progress=progress))
        else:
            assert from_langgraph_postgres is not None
            url = from_langgraph_postgres
            data = _run(where, lambda s: import_langgraph_postgres(s, url, progress))
    _emit(data, as_json, lambda d: print(
        f"imported {d['checkpoints']} checkpoints"
        + (f" of {d.get('threads')} threads" if "threads" in d else
           f" into thread {d['thread_id']!r}")))
    return EXIT_OK


COMMANDS: tuple[tuple[str, Callable[..., int]], ...] = (
    ("demo", demo), ("migrate", migrate), ("status", status), ("archive", archive),
    ("restore", restore), ("inspect", inspect), ("verify", verify), ("worker", worker),
    ("export", export_), ("import", import_),
)
"""The commands by name, in the order ``--help`` lists them."""


def build_app() -> "typer.Typer":
    """The typer app over ``COMMANDS``; a command's return value is the exit code."""
    app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="Tiered checkpoint storage for LangGraph.")
    for name, command in COMMANDS:
        app.command(name)(command)
    return app


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if typer is None:
        if args[:1] == ["demo"]:
            from tierstore.demo import run_demo

            run_demo(None)
            return EXIT_OK
        print("tierstore: the command line needs: pip install 'tierstore[cli]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        code = build_app()(args, standalone_mode=False)
    except TierstoreError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return EXIT_USAGE
    except Exception as exc:
        # typer's own exceptions, without importing click (newer typer releases vendor it)
        kind = type(exc).__name__
        if kind == "Exit":
            return int(getattr(exc, "exit_code", EXIT_OK))
        if kind == "Abort":
            return EXIT_USAGE
        show = getattr(exc, "show", None)
        if callable(show) and hasattr(exc, "exit_code"):  # usage errors: bad flag or value
            show()
            return EXIT_USAGE
        print(f"tierstore: error: {kind}: {exc}", file=sys.stderr)  # one line, no traceback
        return EXIT_STORAGE
    return code if isinstance(code, int) else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
