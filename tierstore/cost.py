"""What a store costs a month: prices, the bill of a store as it is, and a plan.

Pure: no I/O, no clock, no driver. The CLI reads the price files, the environment
(through ``settings``) and the stores, and hands plain values in::

    prices.toml (shipped) ─┐
    --prices FILE / TIERSTORE_PRICES_FILE ─┼─► merge_prices ─► Prices   (every key checked)
    TIERSTORE_PRICES, --price KEY=VALUE ───┘

    sizes from ``tierstore status`` ─► status_cost ─► Bill        (``status --cost``)
    Workload + Policy ───────────────► plan ─────────► Plan        (``tierstore plan``)

A ``Bill`` is a list of ``Line``s, each with the quantity billed and what drives it,
so a reader can check every figure by hand. Storage is priced at the size a store
has (status) or will have at the end of a month (plan); compute (database instances,
application servers) is the same whichever tier holds the bytes and is left out.

The plan models a store in steady state: threads are written for a while and then
left, ``threads_per_month`` new ones each month, and the existing store grew the same
way. At the end of month ``m`` it holds ``C = checkpoints + m * checkpoints_per_month``
checkpoints of ``T = threads + m * threads_per_month`` threads, and with a policy
``A = archive_after``, ``I = archive_idle_after``, ``month`` = 730 hours:

    warm, recent history   R = min(C, checkpoints_per_month * A / month)   x bytes/checkpoint
    warm, idle heads       H = threads last written between A and I ago    x head bytes
    warm, stubs            C - R - H archived checkpoints                   x stub bytes
    cold                   C - R - H checkpoints in segments: one history segment per
                           thread older than A, one more per thread older than I, each
                           billed at least the class's minimum object size
    hot                    threads_per_month * hot_ttl / month cached threads (Little's
                           law: each thread's last write keeps it cached one TTL) x hot bytes

Requests a month: each segment written costs a PUT and its read-back (a HEAD, and a
GET with its retrieval for classes read at once); each history read that reaches
cold costs a GET (or a restore) of one segment; every run of the worker's cold-gc
lists the whole bucket, one LIST per 1,000 objects.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tierstore.errors import ConfigurationError, InvalidInput
from tierstore.finite import check_finite, numbers, overflowed

__all__ = [
    "ASYNC_POSTGRES_BYTES_PER_CHECKPOINT",
    "BYTES_PER_CHECKPOINT",
    "COLD_BYTES_PER_CHECKPOINT",
    "GB",
    "HEAD_BYTES_PER_THREAD",
    "HOT_BYTES_PER_THREAD",
    "HOURS_PER_MONTH",
    "STUB_BYTES_PER_CHECKPOINT",
    "WARM_DISK_PER_PAYLOAD",
    "Bill",
    "ColdPrice",
    "ColdUsage",
    "HotPrice",
    "Line",
    "Plan",
    "Policy",
    "Prices",
    "StoreSizes",
    "WarmPrice",
    "Workload",
    "Layout",
    "calls_from_metrics",
    "cold_reads",
    "layout",
    "merge_prices",
    "parse_assignments",
    "parse_price_file",
    "plan",
    "status_cost",
]

GB = 1 << 30
"""A billed GB: 2^30 bytes, as AWS bills storage."""
KB = 1 << 10
HOURS_PER_MONTH = 730.0
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600.0
DAY = 86400.0

# -- measured figures (tierstore's own bytes; see README "What it costs") -----------------
# loadtest/bench.py, chat workload (LangGraph agent, ~500-byte messages, a tool step every
# fourth turn, 20 threads x 20 turns), redis + postgres, tables + TOAST + indexes:
BYTES_PER_CHECKPOINT = 2876
"""tierstore's warm bytes per checkpoint (PostgreSQL, chat workload, loadtest/bench.py)."""
ASYNC_POSTGRES_BYTES_PER_CHECKPOINT = 6701
"""LangGraph's AsyncPostgresSaver on the same workload, same run."""
# loadtest/costsizes.py, the same workload and stack, after VACUUM FULL:
STUB_BYTES_PER_CHECKPOINT = 935
"""Warm bytes left per archived checkpoint: its row (ids, metadata, channel versions,
filter document, segment key) and its index entries."""
HEAD_BYTES_PER_THREAD = 12404
"""Warm bytes of a thread whose history went to cold: its head checkpoint with the
values it names (a 20-turn conversation's messages) and pending writes."""
COLD_BYTES_PER_CHECKPOINT = 1123
"""Segment bytes per archived checkpoint (compressed, checksummed)."""
HOT_BYTES_PER_THREAD = 11064
"""Redis memory (MEMORY USAGE) of one cached thread: its latest checkpoint assembled."""
WARM_DISK_PER_PAYLOAD = {"postgres": 2.3, "sqlite": 3.2, "mongodb": 1.0}
"""Bytes on disk (rows, indexes, pages) per payload byte a warm store reports in
``status``, measured on the chat workload (loadtest/costsizes.py); MongoDB's is
unmeasured (no server runs here), so its payload is billed as it is."""


# -- prices ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HotPrice:
    """A Redis node: memory for data is priced per GB-month from its hourly price."""

    name: str
    url: str
    node: str
    node_hourly: float
    node_memory_gb: float
    usable_fraction: float

    @property
    def gb_month(self) -> float:
        return self.node_hourly * HOURS_PER_MONTH / (self.node_memory_gb * self.usable_fraction)


@dataclass(frozen=True, slots=True, kw_only=True)
class WarmPrice:
    name: str
    url: str
    storage_gb_month: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ColdPrice:
    """One object storage class (the keys are explained in prices.toml)."""

    name: str
    url: str
    storage_gb_month: float
    put_per_1000: float
    get_per_1000: float
    list_per_1000: float
    retrieval_per_gb: float
    restore_per_1000: float
    restore_per_gb: float
    min_object_kb: float
    overhead_kb: float
    overhead_standard_kb: float
    min_days: float
    needs_restore: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Prices:
    source: Mapping[str, str]
    hot: Mapping[str, HotPrice]
    warm: Mapping[str, WarmPrice]
    cold: Mapping[str, ColdPrice]

    def as_dict(self) -> dict[str, Any]:
        return {"source": dict(self.source),
                "hot": {k: {**asdict(v), "gb_month": v.gb_month} for k, v in self.hot.items()},
                "warm": {k: asdict(v) for k, v in self.warm.items()},
                "cold": {k: asdict(v) for k, v in self.cold.items()}}


_TEXT, _NUMBER, _FLAG = "text", "number", "flag"
_KINDS: dict[str, tuple[type, dict[str, str], tuple[str, ...]]] = {
    "hot": (HotPrice, {"name": _TEXT, "url": _TEXT, "node": _TEXT, "node_hourly": _NUMBER,
                       "node_memory_gb": _NUMBER, "usable_fraction": _NUMBER}, ("redis",)),
    "warm": (WarmPrice, {"name": _TEXT, "url": _TEXT, "storage_gb_month": _NUMBER},
             ("postgres", "mongodb", "sqlite")),
    "cold": (ColdPrice, {
        "name": _TEXT, "url": _TEXT, "storage_gb_month": _NUMBER, "put_per_1000": _NUMBER,
        "get_per_1000": _NUMBER, "list_per_1000": _NUMBER, "retrieval_per_gb": _NUMBER,
        "restore_per_1000": _NUMBER, "restore_per_gb": _NUMBER, "min_object_kb": _NUMBER,
        "overhead_kb": _NUMBER, "overhead_standard_kb": _NUMBER, "min_days": _NUMBER,
        "needs_restore": _FLAG,
    }, ("FILE", "STANDARD", "STANDARD_IA", "GLACIER_IR", "GLACIER", "DEEP_ARCHIVE")),
}
_SOURCE_KEYS = ("taken", "region", "currency", "check")


def parse_price_file(text: str, where: str) -> dict[str, Any]:
    """A price file's TOML as a table (checked when merged)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{where}: not a TOML price file: {exc}") from exc


def parse_assignments(items: Sequence[str], where: str) -> dict[str, Any]:
    """``KEY=VALUE`` overrides (``cold.GLACIER_IR.storage_gb_month=0.0036``) as a table.

    Values stay text here; ``merge_prices`` converts them by the key's kind.
    """
    table: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigurationError(
                f"{where}: {item.strip()!r} is not KEY=VALUE (e.g. "
                "warm.postgres.storage_gb_month=0.23)")
        node = table
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigurationError(f"{where}: {key.strip()!r} is set twice")
            node = child
        node[parts[-1]] = value.strip()
    return table


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigurationError(f"{where}: {key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{where}: {key} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ConfigurationError(f"{where}: {key} must be a finite number >= 0, got {value!r}")
    return number


def _flag(value: Any, key: str, where: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigurationError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{where}: {key} must be text, got {value!r}")
    return value


def _table(value: Any, key: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{where}: {key} must be a table, got {value!r}")
    return value


def merge_prices(layers: Sequence[tuple[str, Mapping[str, Any]]]) -> Prices:
    """Prices from ``(where, table)`` layers, each key of a later layer over an earlier.

    The first layer (the shipped prices.toml) names every key; later ones (a user's
    file, ``TIERSTORE_PRICES``, ``--price`` flags) only those they change. An unknown
    key, a negative or non-numeric price is a ``ConfigurationError`` naming the key
    and the layer it came from.
    """
    merged: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in _KINDS}
    source: dict[str, str] = {}
    for where, layer in layers:
        for section, body in layer.items():
            if section == "source":
                for key, value in _table(body, "source", where).items():
                    if key not in _SOURCE_KEYS:
                        raise ConfigurationError(
                            f"{where}: unknown key source.{key} (known: "
                            f"{', '.join(_SOURCE_KEYS)})")
                    source[key] = _text(value, f"source.{key}", where)
                continue
            if section not in _KINDS:
                raise ConfigurationError(f"{where}: unknown section {section!r} (known: "
                                         f"source, {', '.join(_KINDS)})")
            _cls, keys, names = _KINDS[section]
            for name, entry in _table(body, section, where).items():
                if name not in names:
                    raise ConfigurationError(f"{where}: unknown entry {section}.{name} "
                                             f"(known: {', '.join(names)})")
                target = merged[section].setdefault(name, {})
                for key, value in _table(entry, f"{section}.{name}", where).items():
                    dotted = f"{section}.{name}.{key}"
                    kind = keys.get(key)
                    if kind is None:
                        raise ConfigurationError(f"{where}: unknown key {dotted}")
                    target[key] = (_number(value, dotted, where) if kind == _NUMBER else
                                   _flag(value, dotted, where) if kind == _FLAG else
                                   _text(value, dotted, where))
    built: dict[str, dict[str, Any]] = {}
    for section, (cls, keys, _names) in _KINDS.items():
        built[section] = {}
        for name, values in merged[section].items():
            missing = [k for k in keys if k not in values]
            if missing:
                raise ConfigurationError(
                    f"prices: {section}.{name} lacks {', '.join(missing)}")
            built[section][name] = cls(**values)
    for name, hot in built["hot"].items():
        if hot.node_memory_gb <= 0 or not 0 < hot.usable_fraction <= 1:
            raise ConfigurationError(f"prices: hot.{name}: node_memory_gb must be above 0 "
                                     "and usable_fraction in (0, 1]")
    if "STANDARD" not in built["cold"]:
        raise ConfigurationError("prices: cold.STANDARD is needed (Glacier's per-object "
                                 "overhead and every LIST are billed at its rate)")
    return Prices(source=source, hot=built["hot"], warm=built["warm"], cold=built["cold"])


# -- bills ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    """One item of a monthly bill: how much of what, what it costs, and why."""

    tier: str
    item: str
    quantity: float
    unit: str
    monthly: float
    driver: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Bill:
    name: str
    lines: tuple[Line, ...]
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return sum(line.monthly for line in self.lines)

    def by_tier(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in self.lines:
            out[line.tier] = out.get(line.tier, 0.0) + line.monthly
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "total": self.total, "by_tier": self.by_tier(),
                "lines": [asdict(line) for line in self.lines], "notes": list(self.notes)}


def _gb(nbytes: float) -> float:
    return nbytes / GB


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _price(prices: Prices, kind: str, name: str) -> Any:
    table: Mapping[str, Any] = getattr(prices, kind)
    if name not in table:
        raise ConfigurationError(f"prices: no entry {kind}.{name} (known: "
                                 f"{', '.join(sorted(table))})")
    return table[name]


def _object_storage(prices: Prices, storage_class: str, *, objects: float, nbytes: float,
                    floored: float | None = None) -> Line:
    """Storage of ``objects`` objects of ``nbytes`` bytes in all: each billed at least
    the class's minimum size (``floored``: that sum, when the sizes are known one by
    one; else every object is taken to be of the mean size), plus per-object overhead."""
    price: ColdPrice = _price(prices, "cold", storage_class)
    standard: ColdPrice = prices.cold["STANDARD"]
    minimum = price.min_object_kb * KB
    if floored is None:
        floored = objects * max(nbytes / objects, minimum) if objects else 0.0
    billed = floored + objects * price.overhead_kb * KB
    extra = objects * price.overhead_standard_kb * KB
    monthly = _gb(billed) * price.storage_gb_month + _gb(extra) * standard.storage_gb_month
    why = [f"{_gb(nbytes):,.1f} GB in {_n(objects)} objects"]
    if floored > nbytes:
        why.append(f"billed as {_gb(floored):,.1f} GB: objects under "
                   f"{price.min_object_kb:g} KB count as {price.min_object_kb:g} KB")
    if price.overhead_kb or price.overhead_standard_kb:
        why.append(f"+{price.overhead_kb + price.overhead_standard_kb:g} KB of index "
                   "per object")
    return Line(tier="cold", item=f"{storage_class} storage", quantity=_gb(billed + extra),
                unit="GB-month", monthly=monthly,
                driver="; ".join(why) + f" at ${price.storage_gb_month:g}/GB-month")


def _segment_reads(prices: Prices, storage_class: str, reads: float, segment_bytes: float,
                   why: str) -> Line:
    """``reads`` reads of a whole segment each (a restore first where the class needs one)."""
    price: ColdPrice = _price(prices, "cold", storage_class)
    gigabytes = _gb(reads * segment_bytes)
    monthly = reads / 1000 * price.get_per_1000 + gigabytes * price.retrieval_per_gb
    detail = f"GET ${price.get_per_1000:g}/1,000" + (
        f" + ${price.retrieval_per_gb:g}/GB" if price.retrieval_per_gb else "")
    if price.needs_restore:
        monthly += reads / 1000 * price.restore_per_1000 + gigabytes * price.restore_per_gb
        detail += (f" + restore ${price.restore_per_1000:g}/1,000 + "
                   f"${price.restore_per_gb:g}/GB (hours before the read)")
    return Line(tier="cold", item="segment reads", quantity=reads, unit="requests",
                monthly=monthly, driver=f"{why}; {_n(segment_bytes)} B each; {detail}")


# -- status --cost ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ColdUsage:
    """Objects of one storage class as the cold store lists them."""

    storage_class: str
    objects: int
    bytes: int
    floored_bytes: int
    """Each object's size raised to the class's minimum billed size, summed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSizes:
    """One region's stores as ``status`` measures them."""

    hot_backend: str | None = None
    hot_bytes: int | None = None
    """Redis memory of the tier's keys; None when the backend cannot tell (memory://)."""
    warm_backend: str = "sqlite"
    warm_bytes: int = 0
    """Payload bytes of the live checkpoints, as the warm store reports them (rows and
    indexes add to it on disk; archive stubs are not in it)."""
    warm_checkpoints: int = 0
    warm_archived: int = 0
    cold_backend: str | None = None
    cold: tuple[ColdUsage, ...] = ()


def cold_reads(calls: Mapping[tuple[str, str, str], float], *, period_seconds: float
               ) -> float:
    """Cold segment reads a month, from the saver's call counters over ``period_seconds``
    (``(tier, op, outcome) -> count``, as ``Metrics.snapshot`` or its text give them)."""
    if not (math.isfinite(period_seconds) and period_seconds > 0):
        raise InvalidInput("the period the metrics cover must be a finite number of "
                           f"seconds above 0, got {period_seconds!r}")
    done = sum(n for (tier, op, outcome), n in calls.items()
               if tier == "cold" and op == "get_segment" and outcome == "ok")
    if not (math.isfinite(done) and done >= 0):
        raise InvalidInput(f"the cold reads counted must be a finite number >= 0, got {done!r}")
    monthly = done * SECONDS_PER_MONTH / period_seconds
    if not math.isfinite(monthly):
        raise InvalidInput(f"{done:g} cold reads in {period_seconds:g}s make more reads a "
                           "month than a number holds")
    return monthly


def status_cost(sizes: StoreSizes, prices: Prices, *, region: str = "default",
                cold_reads_per_month: float | None = None) -> Bill:
    """The monthly bill of a store at its present size (``tierstore status --cost``).

    Without ``cold_reads_per_month`` the bill is storage only, and says so.
    """
    lines: list[Line] = []
    notes: list[str] = []
    if sizes.hot_backend == "redis":
        hot: HotPrice = _price(prices, "hot", "redis")
        if sizes.hot_bytes is None:
            notes.append("hot: the Redis tier did not report its memory")
        else:
            lines.append(Line(
                tier="hot", item="Redis memory", quantity=_gb(sizes.hot_bytes),
                unit="GB-month", monthly=_gb(sizes.hot_bytes) * hot.gb_month,
                driver=f"{_gb(sizes.hot_bytes):,.3f} GB of keys (MEMORY USAGE) at "
                       f"${hot.gb_month:.2f}/GB-month ({hot.node}: ${hot.node_hourly:g}/h "
                       f"for {hot.node_memory_gb:g} GB x {hot.usable_fraction:g} usable); "
                       "nodes are bought whole"))
    elif sizes.hot_backend is not None:
        notes.append(f"hot: {sizes.hot_backend}:// lives in each application process's "
                     "own memory: no separate bill")
    warm: WarmPrice = _price(prices, "warm", sizes.warm_backend)
    factor = WARM_DISK_PER_PAYLOAD.get(sizes.warm_backend, 1.0)
    stubs = sizes.warm_archived * STUB_BYTES_PER_CHECKPOINT
    on_disk = sizes.warm_bytes * factor + stubs
    lines.append(Line(
        tier="warm", item=f"{sizes.warm_backend} storage", quantity=_gb(on_disk),
        unit="GB-month", monthly=_gb(on_disk) * warm.storage_gb_month,
        driver=f"{_n(sizes.warm_checkpoints)} live checkpoints: {_gb(sizes.warm_bytes):,.3f} "
               f"GB of payload x {factor:g} on disk (rows and indexes), and "
               f"{_n(sizes.warm_archived)} archive stubs x {STUB_BYTES_PER_CHECKPOINT} B "
               f"(both measured on the chat workload) at ${warm.storage_gb_month:g}/GB-month"))
    if sizes.cold_backend is not None:
        for usage in sizes.cold:
            if usage.storage_class not in prices.cold:
                notes.append(f"cold: no price for storage class {usage.storage_class!r}; "
                             f"{usage.objects} objects not counted")
                continue
            lines.append(_object_storage(prices, usage.storage_class, objects=usage.objects,
                                         nbytes=usage.bytes, floored=usage.floored_bytes))
    if cold_reads_per_month is None:
        notes.append("storage only: give --metrics (the saver's metrics text) and "
                     "--metrics-period to add the cost of cold reads")
    elif sizes.cold:
        biggest = max(sizes.cold, key=lambda u: u.bytes)
        if biggest.storage_class in prices.cold:
            mean = biggest.bytes / biggest.objects if biggest.objects else 0.0
            lines.append(_segment_reads(
                prices, biggest.storage_class, cold_reads_per_month, mean,
                f"{_n(cold_reads_per_month)} segment reads a month (from the metrics)"))
    notes.append("cold-tier writes (one PUT per segment, by the tiering jobs) and the "
                 "worker's cold-gc listings are not in the saver's metrics: see "
                 "`tierstore plan`")
    bill = Bill(name=f"region {region}", lines=tuple(lines), notes=tuple(notes))
    check_finite(bill.as_dict(), f"the bill of region {region}",
                  {**numbers("prices", prices.as_dict()),
                   "cold reads a month": cold_reads_per_month})
    return bill


# -- plan -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """What the application stores and reads. Bytes default to tierstore's measured figures."""

    threads: float
    checkpoints: float
    checkpoints_per_month: float
    threads_per_month: float | None = None
    """Threads written in a month, each then left; None: as many as keep today's
    checkpoints per thread (``checkpoints_per_month * threads / checkpoints``)."""
    reads_per_month: float | None = None
    """State reads a month; None: one per checkpoint written."""
    latest_read_share: float = 0.95
    cold_read_share: float | None = None
    """Share of history reads that reach cold; None: the share of checkpoints in cold."""
    bytes_per_checkpoint: float = BYTES_PER_CHECKPOINT
    baseline_bytes_per_checkpoint: float | None = ASYNC_POSTGRES_BYTES_PER_CHECKPOINT
    stub_bytes: float = STUB_BYTES_PER_CHECKPOINT
    head_bytes: float = HEAD_BYTES_PER_THREAD
    hot_bytes: float = HOT_BYTES_PER_THREAD
    cold_bytes: float = COLD_BYTES_PER_CHECKPOINT

    def __post_init__(self) -> None:
        for name in ("threads", "checkpoints", "checkpoints_per_month", "threads_per_month",
                     "reads_per_month", "bytes_per_checkpoint", "baseline_bytes_per_checkpoint",
                     "stub_bytes", "head_bytes", "hot_bytes", "cold_bytes"):
            _check_amount(getattr(self, name), name)
        for name in ("latest_read_share", "cold_read_share"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 <= value <= 1):
                raise InvalidInput(f"{name} must be a share between 0 and 1, got {value!r}")
        if self.checkpoints < self.threads:
            raise InvalidInput(f"checkpoints ({self.checkpoints:g}) cannot be fewer than "
                               f"threads ({self.threads:g}): every thread has one")

    @property
    def new_threads(self) -> float:
        if self.threads_per_month is not None:
            return self.threads_per_month
        if not self.checkpoints:
            raise InvalidInput("threads_per_month is needed when the store is empty")
        return self.checkpoints_per_month * self.threads / self.checkpoints

    @property
    def reads(self) -> float:
        return self.checkpoints_per_month if self.reads_per_month is None else self.reads_per_month


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Where the bytes go. Durations in seconds; None disables a move (or the hot tier)."""

    hot: str | None = "redis"
    warm: str = "postgres"
    hot_ttl: float = 3600.0
    archive_after: float | None = 30 * DAY
    archive_idle_after: float | None = 90 * DAY
    storage_class: str = "STANDARD_IA"
    segment_size: int = 200
    segments_per_thread: float = 1.0
    """History segments per thread: 1 when a thread's history ages out in one worker
    run; more when its turns span several runs (one segment per run that finds some)."""
    threads_per_segment: float = 1.0
    """Threads whose checkpoints share one segment. tierstore writes one (thread,
    namespace) per segment: above 1 is a what-if for packing several into one object."""
    gc_interval: float | None = 86400.0
    """How often the worker's cold-gc lists the bucket; None: never."""

    def __post_init__(self) -> None:
        for name in ("hot_ttl", "archive_after", "archive_idle_after", "gc_interval"):
            _check_amount(getattr(self, name), name)
        if self.gc_interval is not None and self.gc_interval <= 0:
            raise InvalidInput("gc_interval must be above 0 seconds")
        if not isinstance(self.segment_size, int) or self.segment_size < 1:
            raise InvalidInput(f"segment_size must be a positive integer, got "
                               f"{self.segment_size!r}")
        _check_amount(self.segments_per_thread, "segments_per_thread")
        _check_amount(self.threads_per_segment, "threads_per_segment")
        if self.segments_per_thread < 1 or self.threads_per_segment < 1:
            raise InvalidInput("segments_per_thread and threads_per_segment must be at least 1")


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _check_amount(value: Any, name: str) -> None:
    if value is not None and not (_is_number(value) and value >= 0):
        raise InvalidInput(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """Where a store's checkpoints sit at the end of one month of the plan."""

    month: int
    checkpoints: float
    threads: float
    recent: float
    idle_heads: float
    archived: float
    segments: float
    cached_threads: float


def _window(seconds: float | None, total: float, per_month: float) -> float:
    """What ``per_month`` a month adds up to over ``seconds`` (all of ``total`` if None)."""
    return total if seconds is None else min(total, per_month * seconds / SECONDS_PER_MONTH)


def _kept(policy: Policy) -> float | None:
    """How long a checkpoint stays in warm: until its history or its whole thread moves."""
    moves = [d for d in (policy.archive_after, policy.archive_idle_after) if d is not None]
    return min(moves) if moves else None


def layout(workload: Workload, policy: Policy, month: int) -> Layout:
    """Where every checkpoint is at the end of ``month`` under ``policy`` (steady state)."""
    new_threads = workload.new_threads
    total = workload.checkpoints + month * workload.checkpoints_per_month
    threads = workload.threads + month * new_threads
    idle = policy.archive_idle_after
    keep = _kept(policy)
    recent = _window(keep, total, workload.checkpoints_per_month)
    written_recently = _window(keep, threads, new_threads)
    not_idle = _window(idle, threads, new_threads)
    idle_heads = max(0.0, not_idle - written_recently)
    archived = max(0.0, total - recent - idle_heads)
    segments = 0.0
    if archived:
        if policy.archive_after is not None:
            segments += (threads - written_recently) * _history_segments(workload, policy)
        if idle is not None:
            segments += threads - not_idle
        segments /= policy.threads_per_segment
    cached = (0.0 if policy.hot is None else
              min(threads, new_threads * policy.hot_ttl / SECONDS_PER_MONTH))
    return Layout(month=month, checkpoints=total, threads=threads, recent=recent,
                  idle_heads=idle_heads, archived=archived, segments=segments,
                  cached_threads=cached)


def _history_segments(workload: Workload, policy: Policy) -> float:
    """Segments one thread's history is archived in: ``segments_per_thread``, or more
    when the thread has more checkpoints than one segment holds."""
    new_threads = workload.new_threads
    per_thread = workload.checkpoints_per_month / new_threads if new_threads else 0.0
    return max(policy.segments_per_thread, math.ceil(per_thread / policy.segment_size))


def _segments_a_month(workload: Workload, policy: Policy) -> float:
    """Segments written a month once the store is in steady state."""
    history = _history_segments(workload, policy)
    return workload.new_threads / policy.threads_per_segment * (
        (history if policy.archive_after is not None else 0.0)
        + (1.0 if policy.archive_idle_after is not None else 0.0))


def _writes(prices: Prices, storage_class: str, segments: float, segment_bytes: float,
            why: str) -> Line:
    """PUT each segment, then read it back before the warm copy goes (HEAD, and a GET
    for classes read at once: a byte-for-byte check)."""
    price: ColdPrice = _price(prices, "cold", storage_class)
    reads_back = 1.0 if price.needs_restore else 2.0
    monthly = (segments / 1000 * (price.put_per_1000 + reads_back * price.get_per_1000)
               + (0.0 if price.needs_restore else
                  _gb(segments * segment_bytes) * price.retrieval_per_gb))
    check = "HEAD" if price.needs_restore else "HEAD + GET back"
    return Line(tier="cold", item="segment writes", quantity=segments, unit="requests",
                monthly=monthly,
                driver=f"{why}; each a PUT (${price.put_per_1000:g}/1,000) and a {check} "
                       f"(${price.get_per_1000:g}/1,000"
                       + ("" if price.needs_restore or not price.retrieval_per_gb else
                          f" + ${price.retrieval_per_gb:g}/GB") + ")")


def _tiered(workload: Workload, policy: Policy, prices: Prices, at: Layout) -> Bill:
    warm: WarmPrice = _price(prices, "warm", policy.warm)
    lines: list[Line] = []
    notes: list[str] = []
    if policy.hot is not None:
        hot: HotPrice = _price(prices, "hot", policy.hot)
        nbytes = at.cached_threads * workload.hot_bytes
        lines.append(Line(
            tier="hot", item="Redis memory", quantity=_gb(nbytes), unit="GB-month",
            monthly=_gb(nbytes) * hot.gb_month,
            driver=f"{_n(at.cached_threads)} threads cached ({_n(workload.new_threads)} "
                   f"threads a month x {policy.hot_ttl / 3600:g} h TTL) x "
                   f"{_n(workload.hot_bytes)} B at ${hot.gb_month:.2f}/GB-month"))
    keep = _kept(policy)
    for item, count, size, why in (
        ("recent history", at.recent, workload.bytes_per_checkpoint,
         f"checkpoints younger than {keep / DAY:g} days" if keep is not None else
         "checkpoints (nothing moves to cold)"),
        ("idle heads", at.idle_heads, workload.head_bytes,
         "threads idle between archive_after and archive_idle_after, each its head "
         "with its values"),
        ("archive stubs", at.archived, workload.stub_bytes,
         "archived checkpoints, a row each for history reads and listings"),
    ):
        if count:
            lines.append(Line(
                tier="warm", item=item, quantity=_gb(count * size), unit="GB-month",
                monthly=_gb(count * size) * warm.storage_gb_month,
                driver=f"{_n(count)} {why} x {_n(size)} B at "
                       f"${warm.storage_gb_month:g}/GB-month"))
    if at.archived:
        cold_total = at.archived * workload.cold_bytes
        mean = cold_total / at.segments if at.segments else 0.0
        lines.append(_object_storage(prices, policy.storage_class, objects=at.segments,
                                     nbytes=cold_total))
        written = _segments_a_month(workload, policy)
        lines.append(_writes(prices, policy.storage_class, written, mean,
                             f"{_n(written)} segments a month ({_n(workload.new_threads)} "
                             "threads aging out)"))
        share = (workload.cold_read_share if workload.cold_read_share is not None
                 else at.archived / at.checkpoints)
        history_reads = workload.reads * (1 - workload.latest_read_share)
        reads = history_reads * share
        if reads:
            lines.append(_segment_reads(
                prices, policy.storage_class, reads, mean,
                f"{_n(history_reads)} history reads a month, {share:.0%} of them in cold"))
        if policy.gc_interval is not None and at.segments:
            runs = SECONDS_PER_MONTH / policy.gc_interval
            listed = runs * math.ceil(at.segments / 1000)
            standard = prices.cold["STANDARD"]
            lines.append(Line(
                tier="cold", item="cold-gc listings", quantity=listed, unit="requests",
                monthly=listed / 1000 * standard.list_per_1000,
                driver=f"{_n(runs)} cold-gc runs a month (every "
                       f"{policy.gc_interval / 60:g} min), each listing "
                       f"{_n(at.segments)} objects, 1,000 per LIST at "
                       f"${standard.list_per_1000:g}/1,000"))
        price: ColdPrice = prices.cold[policy.storage_class]
        if price.needs_restore:
            notes.append(f"{policy.storage_class}: reading archived history needs a "
                         "restore first (hours)")
    return Bill(name="tiered", lines=tuple(lines), notes=tuple(notes))


def _all_in(name: str, *, tier: str, count: float, size: float, per_gb: float, what: str
            ) -> Bill:
    nbytes = count * size
    return Bill(name=name, lines=(Line(
        tier=tier, item=what, quantity=_gb(nbytes), unit="GB-month",
        monthly=_gb(nbytes) * per_gb,
        driver=f"{_n(count)} checkpoints x {_n(size)} B at ${per_gb:.4g}/GB-month"),))


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    workload: Workload
    policy: Policy
    months: tuple[Layout, ...]
    bills: tuple[dict[str, Bill], ...]
    """Per month: the bill of each way of storing (tiered, all-in-warm, …)."""
    one_off: tuple[Line, ...] = field(default=())

    @property
    def final(self) -> dict[str, Bill]:
        return self.bills[-1]

    def ratios(self) -> dict[str, float]:
        """The tiered bill of the last month over each other way's."""
        last = self.final
        tiered = last["tiered"].total
        return {name: tiered / bill.total for name, bill in last.items()
                if name != "tiered" and bill.total}

    def as_dict(self) -> dict[str, Any]:
        return {
            "workload": {**asdict(self.workload), "threads_per_month": self.workload.new_threads,
                         "reads_per_month": self.workload.reads},
            "policy": asdict(self.policy),
            "months": [{**asdict(at), "totals": {n: b.total for n, b in bills.items()}}
                       for at, bills in zip(self.months, self.bills, strict=True)],
            "final": {name: bill.as_dict() for name, bill in self.final.items()},
            "ratios": self.ratios(),
            "one_off": [asdict(line) for line in self.one_off],
        }


def plan(workload: Workload, policy: Policy, prices: Prices, *, months: int = 12) -> Plan:
    """Monthly cost for ``months`` months: tiered, all in warm (at tierstore's bytes and at
    the baseline's), all in hot. Each month's bill is priced at its end-of-month sizes.

    Inputs so large that a figure overflows (infinite, or not a number) are
    ``InvalidInput`` naming the largest of them."""
    inputs = {**numbers("", asdict(workload)), **numbers("", asdict(policy)),
              **numbers("prices", prices.as_dict())}
    try:
        done = _plan(workload, policy, prices, months=months)
        check_finite(done.as_dict(), "the projection", inputs)
    except (OverflowError, ValueError) as exc:  # int() of an infinite or NaN figure
        if isinstance(exc, InvalidInput):
            raise
        raise overflowed(f"the projection ({exc})", inputs) from exc
    return done


def _plan(workload: Workload, policy: Policy, prices: Prices, *, months: int) -> Plan:
    if not isinstance(months, int) or isinstance(months, bool) or not 1 <= months <= 600:
        raise InvalidInput(f"months must be a whole number from 1 to 600, got {months!r}")
    if policy.storage_class not in prices.cold:
        raise InvalidInput(f"no price for storage class {policy.storage_class!r} (known: "
                           f"{', '.join(prices.cold)})")
    warm: WarmPrice = _price(prices, "warm", policy.warm)
    hot: HotPrice = _price(prices, "hot", policy.hot or "redis")
    layouts = tuple(layout(workload, policy, m) for m in range(1, months + 1))
    bills: list[dict[str, Bill]] = []
    for at in layouts:
        month = {"tiered": _tiered(workload, policy, prices, at),
                 "all-in-warm": _all_in("all-in-warm", tier="warm", count=at.checkpoints,
                                        size=workload.bytes_per_checkpoint,
                                        per_gb=warm.storage_gb_month,
                                        what=f"{policy.warm} storage")}
        if workload.baseline_bytes_per_checkpoint is not None:
            month["all-in-warm, baseline bytes"] = _all_in(
                "all-in-warm, baseline bytes", tier="warm", count=at.checkpoints,
                size=workload.baseline_bytes_per_checkpoint, per_gb=warm.storage_gb_month,
                what=f"{policy.warm} storage")
        month["all-in-hot"] = _all_in("all-in-hot", tier="hot", count=at.checkpoints,
                                      size=workload.bytes_per_checkpoint, per_gb=hot.gb_month,
                                      what="Redis memory (at least: no per-key overhead)")
        bills.append(month)
    start = layout(workload, policy, 0)
    one_off: list[Line] = []
    if start.segments:
        mean = start.archived * workload.cold_bytes / start.segments
        one_off.append(_writes(prices, policy.storage_class, start.segments, mean,
                               f"{_n(start.segments)} segments to archive the store as it "
                               "is today"))
    return Plan(workload=workload, policy=policy, months=layouts, bills=tuple(bills),
                one_off=tuple(one_off))


_METRIC = re.compile(r'^tierstore_store_calls_total\{(?P<labels>[^}]*)\}\s+(?P<n>\S+)\s*$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def calls_from_metrics(text: str, *, where: str = "metrics"
                       ) -> dict[tuple[str, str, str], float]:
    """``(tier, op, outcome) -> count`` from the Prometheus text ``saver.metrics_text()``
    writes (several processes' texts may be concatenated: their counts add up). A count
    that is not a finite number >= 0, or a sum that overflows, is ``InvalidInput`` naming
    ``where`` and the line."""
    out: dict[tuple[str, str, str], float] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        found = _METRIC.match(raw.strip())
        if found is None:
            continue
        line = f"{where} line {number}: {raw.strip()[:200]!r}"
        labels = dict(_LABEL.findall(found["labels"]))
        try:
            count = float(found["n"])
        except ValueError:
            raise InvalidInput(f"{line}: not a count") from None
        if not (math.isfinite(count) and count >= 0):
            raise InvalidInput(f"{line}: a counter must be a finite number >= 0")
        key = (labels.get("tier", ""), labels.get("op", ""), labels.get("outcome", ""))
        out[key] = out.get(key, 0.0) + count
        if not math.isfinite(out[key]):
            raise InvalidInput(f"{line}: the counts add up past what a number holds")
    return out
