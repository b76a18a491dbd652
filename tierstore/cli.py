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
``restore --wait`` timed out, ``doctor`` found something to fix), 2 misuse (bad flag, bad
URL, unknown thread), 3 a store refused or could not be reached.
"""

import asyncio
import json
import math
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
from tierstore.settings import (
    PRICES_FILE_VARIABLE,
    PRICES_VARIABLE,
    REGIONS_FILE_VARIABLE,
    URL_VARIABLES,
    parse_duration,
    parse_interval,
    prices_from_env,
    resolve_spec,
)

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
    "doctor",
    "export_",
    "import_",
    "inspect",
    "main",
    "migrate",
    "plan",
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


def _json(data: Any, **options: Any) -> str:
    """JSON as RFC 8259 has it: a NaN or infinite number is an error, not output."""
    return json.dumps(data, allow_nan=False, default=str, **options)


def _emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        print(_json(data, indent=2, sort_keys=True))
    else:
        render(data)


class _Bar:
    """``_progress``'s: called with (done, total); ``phase`` relabels it (count from 0)."""

    def __init__(self, label: str, update: Callable[[str, int, int | None], None]) -> None:
        self._base = self._label = label
        self._update = update

    def __call__(self, done: int, total: int | None) -> None:
        self._update(self._label, done, total)

    def phase(self, name: str) -> None:
        self._label = f"{self._base}: {name}"
        self._update(self._label, 0, None)


@contextmanager
def _progress(label: str, enabled: bool) -> Iterator[_Bar]:
    """A rich progress bar on a terminal; silent when piped or with --json."""
    if not enabled or not sys.stderr.isatty():
        yield _Bar(label, lambda text, done, total: None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(text: str, done: int, total: int | None) -> None:
            relabelled = text != bar.tasks[0].description
            bar.update(task, description=text, completed=done, total=total)
            if relabelled:  # a phase shows as it starts, however short it is
                bar.refresh()

        yield _Bar(label, update)


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
    return ", ".join(f"{k}={v}" for k, v in data.items()
                     if k not in ("backend", "claims", "by_class"))


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


PricesFile = Annotated[Path | None, _option(
    "--prices",
    help=f"price file (TOML) over the shipped list prices (env {PRICES_FILE_VARIABLE})")]
PriceFlags = Annotated[list[str] | None, _option(
    "--price", help="KEY=VALUE, one price (e.g. warm.postgres.storage_gb_month=0.23); "
                    f"repeatable (env {PRICES_VARIABLE}, comma-separated)")]


def _prices(file: Path | None, pairs: list[str] | None) -> Any:
    from tierstore.ops import load_prices

    env_file, env_pairs = prices_from_env()
    return load_prices(file, env_file=env_file, env_pairs=env_pairs, flag_pairs=pairs or ())


def _money(value: float) -> str:
    return f"${value:,.2f}" if value >= 1 or not value else f"${value:.4f}"


def _render_bill(title: str, bills: Mapping[str, Any]) -> None:
    rows = [(name, line["tier"], line["item"], _money(line["monthly"]), line["driver"])
            for name, bill in bills.items() for line in bill["lines"]]
    _table(title, rows, ("", "tier", "item", "a month", "what drives it"))


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
            report = asyncio.run(store.partition(partitions, tuning=tuning, progress=progress,
                                                 phase=progress.phase))
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
           as_json: Json = False,
           cost: Annotated[bool, _option(
               "--cost", help="also what the stores cost a month at their present size "
                              "(lists every cold object: mind the requests on a big bucket)")
           ] = False,
           prices: PricesFile = None, price: PriceFlags = None,
           metrics: Annotated[Path | None, _option(
               help="with --cost: the saver's metrics text (saver.metrics_text()), to price "
                    "cold reads")] = None,
           metrics_period: Annotated[str | None, _option(
               help="how long the --metrics counters ran (e.g. 7d)")] = None) -> int:
    """Threads, checkpoints and bytes per tier (and per region); claims workers hold;
    with --cost, what each tier costs a month."""
    from tierstore.ops import status as run_status
    from tierstore.ops import status_cost

    if not cost and (prices or price or metrics or metrics_period):
        raise InvalidInput("--prices, --price, --metrics and --metrics-period go with --cost")
    if (metrics is None) != (metrics_period is None):
        raise InvalidInput("--metrics and --metrics-period go together")
    body: Callable[[TieredSaver], Awaitable[dict[str, Any]]] = run_status
    reads: float | None = None
    if cost:
        from tierstore.cost import calls_from_metrics, cold_reads

        table = _prices(prices, price)
        if metrics is not None and metrics_period is not None:
            try:
                text = metrics.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidInput(f"cannot read --metrics {metrics}: {exc}") from exc
            period = _parsed(metrics_period, "--metrics-period", parse_interval)
            reads = cold_reads(calls_from_metrics(text, where=f"--metrics {metrics}"),
                               period_seconds=period)

    with _progress("looking at cold objects", cost and not as_json) as progress:
        if cost:
            def body(s: TieredSaver) -> Awaitable[dict[str, Any]]:
                return status_cost(s, table, cold_reads_per_month=reads, progress=progress)

        data = _run(_Where(hot, warm, cold, regions, region), body)

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
        if "cost" in d:
            bills = d["cost"]["regions"]
            _render_bill("tierstore status --cost (a month)", bills)
            for name, bill in bills.items():
                for note in bill["notes"]:
                    print(f"region {name}: {note}")
            print(f"total: {_money(d['cost']['total'])} a month ({d['cost']['requests']}); "
                  + _source(d["cost"]["prices"]))

    _emit(data, as_json, render)
    return EXIT_OK


def doctor(hot: Hot = None, warm: Warm = None, cold: Cold = None,
           regions: RegionsFile = None, region: RegionName = None,
           as_json: Json = False) -> int:
    """Check the configuration end to end without changing anything: each tier answers,
    the schema is current, Redis can evict, the bucket's lifecycle, clocks, writable
    directories; exit 1 when something must be fixed."""
    from tierstore.doctor import run_doctor

    spec = resolve_spec(hot=hot, warm=warm, cold=cold, regions_file=regions, region=region)
    findings = asyncio.run(run_doctor(spec))
    failed = [f for f in findings if f.status == "fail"]
    data = {"ok": not failed, "findings": [f.as_dict() for f in findings]}

    def render(d: dict[str, Any]) -> None:
        marks = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}
        _table("tierstore doctor", [
            (f["region"], f["tier"], f["backend"], f["check"], marks[f["status"]], f["detail"])
            for f in d["findings"]], ("region", "tier", "backend", "check", "", "found"))
        fixes = [f for f in d["findings"] if f["fix"]]
        for f in fixes:
            print(f"{marks[f['status']]} {f['region']}/{f['tier']} {f['check']}: {f['fix']}")
        print("nothing to fix" if not fixes else
              f"{sum(f['status'] == 'fail' for f in fixes)} to fix, "
              f"{sum(f['status'] == 'warn' for f in fixes)} to look at")

    _emit(data, as_json, render)
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def _source(source: Mapping[str, str]) -> str:
    return (f"prices: {source.get('region', '?')} {source.get('currency', '')}, taken "
            f"{source.get('taken', '?')}: {source.get('check', '')}")


def _amount(text: str, option: str) -> float:
    """``50M``, ``1.5B``, ``2500``, ``12k`` → a number; refused naming the option."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(text.strip()[-1:].lower(), 1.0)
    number = text.strip()[:-1] if scale != 1.0 else text.strip()
    try:
        value = float(number) * scale
    except ValueError:
        raise InvalidInput(f"{option}: not a number: {text!r} (e.g. 500M, 2.5k)") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(f"{option}: must be a finite number >= 0, got {text!r}")
    return value


def _optional(text: str | None, option: str, parse: Callable[[str], float]) -> float | None:
    """``parse(text)``, or None for ``none``; an error names the option."""
    if text is None or text.strip().lower() == "none":
        return None
    return _parsed(text, option, parse)


def _parsed(text: str, option: str, parse: Callable[[str], float]) -> float:
    """``parse(text)``; an error names the option."""
    try:
        return parse(text)
    except TierstoreError as exc:
        raise InvalidInput(f"{option}: {exc}") from exc


def plan(
    threads: Annotated[str, _option(help="threads stored today")] = "50M",
    checkpoints: Annotated[str, _option(help="checkpoints stored today")] = "500M",
    checkpoints_per_month: Annotated[str, _option(help="checkpoints written a month")] = "100M",
    threads_per_month: Annotated[str | None, _option(
        help="threads written a month, each then left (default: as many as keep today's "
             "checkpoints per thread)")] = None,
    reads_per_month: Annotated[str | None, _option(
        help="state reads a month (default: one per checkpoint written)")] = None,
    latest_read_share: Annotated[float, _option(
        help="share of reads on a thread's latest state")] = 0.95,
    cold_read_share: Annotated[float | None, _option(
        help="share of the other reads that reach cold (default: cold's share of "
             "checkpoints)")] = None,
    bytes_per_checkpoint: Annotated[str | None, _option(
        help="warm bytes per checkpoint (default: tierstore's, measured: 2876)")] = None,
    baseline_bytes: Annotated[str | None, _option(
        help="bytes per checkpoint of the saver to compare with, or none (default: "
             "AsyncPostgresSaver's, measured: 6701)")] = None,
    stub_bytes: Annotated[str | None, _option(
        help="warm bytes an archived checkpoint leaves (default: measured, 935)")] = None,
    head_bytes: Annotated[str | None, _option(
        help="warm bytes of an idle thread's head (default: measured, 12404)")] = None,
    hot_bytes: Annotated[str | None, _option(
        help="Redis bytes of a cached thread (default: measured, 11064)")] = None,
    cold_bytes: Annotated[str | None, _option(
        help="segment bytes per archived checkpoint (default: measured, 1123)")] = None,
    hot_ttl: Annotated[str, _option(help="hot TTL, or none for no hot tier")] = "1h",
    archive_after: Annotated[str, _option(
        help="history older than this moves to cold (none: never)")] = "30d",
    archive_idle_after: Annotated[str, _option(
        help="threads idle this long move to cold whole (none: never)")] = "90d",
    storage_class: Annotated[str, _option(help="cold storage class")] = "STANDARD_IA",
    segments_per_thread: Annotated[float, _option(
        help="history segments per thread (more when a thread's turns span worker runs)")
    ] = 1.0,
    threads_per_segment: Annotated[float, _option(
        help="what if a segment held several threads (tierstore writes one)")] = 1.0,
    segment_size: Annotated[int, _option(help="checkpoints per segment at most")] = 200,
    gc_interval: Annotated[str, _option(
        help="how often the worker runs cold-gc, which lists the bucket (none: never)")
    ] = "1d",
    warm_backend: Annotated[str, _option(help="postgres, mongodb or sqlite")] = "postgres",
    months: Annotated[int, _option(help="months to project")] = 12,
    prices: PricesFile = None, price: PriceFlags = None, as_json: Json = False,
) -> int:
    """Project what a workload costs a month: tiered, all in warm, all in hot."""
    from tierstore import cost

    def amount(text: str | None, option: str, default: float) -> float:
        return default if text is None else _amount(text, option)

    def count(option: str) -> Callable[[str], float]:
        return lambda text: _amount(text, option)

    workload = cost.Workload(
        threads=_amount(threads, "--threads"), checkpoints=_amount(checkpoints, "--checkpoints"),
        checkpoints_per_month=_amount(checkpoints_per_month, "--checkpoints-per-month"),
        threads_per_month=_optional(threads_per_month, "--threads-per-month",
                                    count("--threads-per-month")),
        reads_per_month=_optional(reads_per_month, "--reads-per-month",
                                  count("--reads-per-month")),
        latest_read_share=latest_read_share, cold_read_share=cold_read_share,
        bytes_per_checkpoint=amount(bytes_per_checkpoint, "--bytes-per-checkpoint",
                                    cost.BYTES_PER_CHECKPOINT),
        baseline_bytes_per_checkpoint=(
            cost.ASYNC_POSTGRES_BYTES_PER_CHECKPOINT if baseline_bytes is None else
            _optional(baseline_bytes, "--baseline-bytes", count("--baseline-bytes"))),
        stub_bytes=amount(stub_bytes, "--stub-bytes", cost.STUB_BYTES_PER_CHECKPOINT),
        head_bytes=amount(head_bytes, "--head-bytes", cost.HEAD_BYTES_PER_THREAD),
        hot_bytes=amount(hot_bytes, "--hot-bytes", cost.HOT_BYTES_PER_THREAD),
        cold_bytes=amount(cold_bytes, "--cold-bytes", cost.COLD_BYTES_PER_CHECKPOINT),
    )
    ttl = _optional(hot_ttl, "--hot-ttl", parse_duration)
    policy = cost.Policy(
        hot=None if ttl is None else "redis", warm=warm_backend,
        hot_ttl=0.0 if ttl is None else ttl,
        archive_after=_optional(archive_after, "--archive-after", parse_duration),
        archive_idle_after=_optional(archive_idle_after, "--archive-idle-after",
                                     parse_duration),
        storage_class=storage_class.strip().upper(), segment_size=segment_size,
        segments_per_thread=segments_per_thread, threads_per_segment=threads_per_segment,
        gc_interval=_optional(gc_interval, "--gc-interval", parse_interval),
    )
    table = _prices(prices, price)
    data = {**cost.plan(workload, policy, table, months=months).as_dict(),
            "prices": dict(table.source)}

    def render(d: dict[str, Any]) -> None:
        last = d["months"][-1]
        _render_bill(f"month {last['month']}: {last['checkpoints']:,.0f} checkpoints of "
                     f"{last['threads']:,.0f} threads, a month", d["final"])
        names = list(d["final"])
        _table("a month, by month", [
            (str(m["month"]), f"{m['checkpoints']:,.0f}",
             *(_money(m["totals"][n]) for n in names)) for m in d["months"]],
            ("month", "checkpoints", *names))
        for name, ratio in d["ratios"].items():
            print(f"tiered / {name}: {ratio:.3f}x")
        for line in d["one_off"]:
            print(f"once: {_money(line['monthly'])} for {line['driver']}")
        for note in d["final"]["tiered"]["notes"]:
            print(f"note: {note}")
        print(_source(d["prices"]) + "; storage and requests only (database and "
              "application compute are left out)")

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
        jobs: list[Any] = [HistoryDemotion(saver, policy, thread_id=thread, dry_run=dry_run,
                                           progress=progress)]
        if idle_after:
            jobs.append(IdleArchival(saver, policy, thread_id=thread, dry_run=dry_run,
                                     progress=progress))
        # one run visits every eligible head once and ends (see tierstore.jobs.tiering)
        out = []
        for job in jobs:
            progress.phase(f"{job.name}, threads")
            out.append((await job.run_once()).as_dict())
        return out

    with _progress("archiving", not as_json) as progress:
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
    interval: Annotated[str, _option(help="time between runs of each job but cold-gc")] = "5m",
    gc_interval: Annotated[str, _option(
        help="time between runs of cold-gc, which lists the whole cold store")] = "1d",
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
    every = _parsed(interval, "--interval", parse_interval)
    gc_every = _parsed(gc_interval, "--gc-interval", parse_interval)

    async def body(saver: TieredSaver) -> dict[str, Any]:
        jobs = [HotExpiry(saver, policy), HistoryDemotion(saver, policy),
                IdleArchival(saver, policy), Retention(saver, policy),
                Rehydrate(saver, policy), ColdGC(saver, policy)]
        scheduler = Scheduler([(job, gc_every if isinstance(job, ColdGC) else every)
                               for job in jobs])

        def write_health() -> None:
            if health_file is not None:
                health_file.write_text(_json(scheduler.health()))

        if once:
            await scheduler.tick()
            write_health()
            return scheduler.health()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        scheduler.on_report = lambda report: write_health()
        print(f"tierstore worker: {len(jobs) - 1} jobs every {interval}, cold-gc every "
              f"{gc_interval}", file=sys.stderr)
        await scheduler.run(stop)
        write_health()
        return scheduler.health()

    health = _run(_Where(hot, warm, cold, regions, region), body)
    if once:
        print(_json(health, indent=2))
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
    ("demo", demo), ("migrate", migrate), ("status", status), ("doctor", doctor),
    ("plan", plan),
    ("archive", archive),
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
