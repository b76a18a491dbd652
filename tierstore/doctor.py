"""``tierstore doctor``: check a configuration end to end and say what to fix.

::

    resolve_spec(flags, env) ─► for each region, each tier:
        probe (I/O, read-only: nothing is created or migrated) ─► facts
        judge_* (pure: facts in, Finding out) ─► ok | warn | fail, with the fix

What is checked:

- every tier answers (connect, ping, open the file);
- the warm schema's version against the migrations this package ships (behind: run
  ``tierstore migrate``; ahead: this package is older than the database);
- Redis ``maxmemory-policy`` (``judge_redis_policy`` explains the choice);
- the cold bucket's lifecycle rules against the storage class tierstore writes;
- clock skew between this host and PostgreSQL, MongoDB, Redis or S3;
- that file and SQLite tiers can write where they keep their data.

A ``fail`` is something that breaks reads, writes or archives (or will, when the
Redis memory fills up); a ``warn`` works but costs or surprises. ``tierstore doctor``
exits 1 when anything fails.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal

from tierstore.errors import TierstoreError
from tierstore.migrate import migrations_for
from tierstore.settings import SaverOptions, StackSpec, StoreUrl
from tierstore.tiers import HOT, OBJECT, WARM

__all__ = [
    "SKEW_WARN_SECONDS",
    "Finding",
    "judge_lifecycle",
    "judge_redis_policy",
    "judge_schema",
    "judge_skew",
    "run_doctor",
]

Status = Literal["ok", "warn", "fail"]

SKEW_WARN_SECONDS = 1.0
"""Above this, lease and claim expiry and archive ages are judged by clocks that
disagree noticeably; above ``checkpoint_id_skew`` a checkpoint id written here is
refused by a host whose clock is behind."""

PROBE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Finding:
    """One check of one tier: what was found and, unless it is ``ok``, what to do."""

    region: str
    tier: str
    backend: str
    check: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


Judged = tuple[Status, str, str]  # status, detail, fix


# -- decisions (pure) --------------------------------------------------------------------

_GOOD_POLICIES = ("allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu", "volatile-ttl")


def judge_redis_policy(policy: str | None, maxmemory: int | None) -> Judged:
    """Whether Redis can make room when its memory is full.

    Every key tierstore writes has a TTL, and every hot entry is a copy that a reader
    checks against the warm head (a lost entry is a miss, never a wrong answer); a
    lease is fenced in warm, so an evicted one cannot let two writers both commit.
    So any policy that evicts by recency or TTL is fine: ``allkeys-lru``/``-lfu``
    (best when the Redis is tierstore's alone), ``volatile-lru``/``-lfu``/``-ttl``
    (evicts only keys with a TTL: all of ours, none of another app's keys without
    one). The random policies evict hot threads as readily as cold ones: they work,
    at a lower hit rate. ``noeviction`` with a ``maxmemory`` refuses every write once
    full: every hot write fails and leases cannot be taken until entries expire.
    """
    if policy is None:
        return ("warn", "the policy could not be read (CONFIG GET refused: a managed "
                "Redis may hide it)",
                "check in the provider's console that maxmemory-policy is allkeys-lru or "
                "volatile-lru, not noeviction")
    limit = f"maxmemory {maxmemory} bytes" if maxmemory else "no maxmemory"
    if policy == "noeviction":
        if maxmemory:
            return ("fail", f"maxmemory-policy noeviction with {limit}: once full, Redis "
                    "refuses every write (hot writes fail, leases cannot be taken)",
                    "CONFIG SET maxmemory-policy allkeys-lru (and persist it in "
                    "redis.conf), or volatile-lru if other apps share this Redis")
        return ("ok", "maxmemory-policy noeviction with no maxmemory: entries leave by "
                "their TTL (hot_ttl); memory is bounded by the threads active within it", "")
    if policy in _GOOD_POLICIES:
        return ("ok", f"maxmemory-policy {policy} ({limit}): a full Redis evicts entries, "
                "which are misses served from warm", "")
    if policy.endswith("-random"):
        return ("warn", f"maxmemory-policy {policy} ({limit}) evicts active threads as "
                "readily as idle ones: a lower hit rate", "use allkeys-lru")
    return ("warn", f"maxmemory-policy {policy!r} is not one this check knows",
            "use allkeys-lru")


def judge_schema(backend: str, applied: Sequence[int] | None) -> Judged:
    """The warm store's recorded migrations against those this package ships.

    ``applied`` None: there is no version table at all (a database never migrated).
    """
    shipped = len(migrations_for(backend))
    if applied is None or not applied:
        return ("fail", f"no tierstore schema (0 of {shipped} migrations applied)",
                "run `tierstore migrate` with the same flags")
    top = max(applied)
    missing = sorted(set(range(1, shipped + 1)) - set(applied))
    if top > shipped:
        return ("fail", f"schema version {top} is newer than this package's {shipped}: "
                "a newer tierstore migrated it",
                "upgrade tierstore here to the version the other hosts run")
    if missing:
        return ("fail", f"schema version {top} of {shipped}: {len(missing)} migrations "
                f"pending ({', '.join(f'{v:04d}' for v in missing)})",
                "run `tierstore migrate` with the same flags (idempotent, online)")
    return ("ok", f"schema version {shipped}, as this package ships", "")


def judge_skew(seconds: float, *, resolution: float = 0.0,
               limit: float = SaverOptions().checkpoint_id_skew) -> Judged:
    """This host's clock against a server's, ``seconds`` apart (server minus local).

    ``resolution`` is what the server's answer cannot tell apart (an HTTP ``Date``
    has whole seconds): a skew within it is not reported.
    """
    skew = max(0.0, abs(seconds) - resolution)
    side = "ahead of" if seconds > 0 else "behind"
    detail = f"server clock {abs(seconds):.3f}s {side} this host"
    if skew > limit:
        return ("fail", detail + f": over checkpoint_id_skew ({limit:g}s), checkpoint ids "
                "written by one side are refused by the other",
                "synchronise both clocks (chrony/NTP)")
    if skew > SKEW_WARN_SECONDS:
        return ("warn", detail + ": lease, claim and archive ages are judged by clocks "
                "that disagree", "synchronise both clocks (chrony/NTP)")
    return ("ok", detail, "")


_ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")


def judge_lifecycle(rules: Sequence[Mapping[str, Any]] | None, *, prefix: str,
                    storage_class: str) -> list[Judged]:
    """The bucket's lifecycle rules as they touch the objects under ``prefix``.

    An expiration there deletes archived checkpoints warm still points to (data loss);
    a transition to a Glacier class makes every read of an archive wait for a restore
    unless tierstore writes that class already (then it restores by itself).
    """
    out: list[Judged] = []
    for rule in rules or ():
        if rule.get("Status") != "Enabled":
            continue
        flt = rule.get("Filter") or {}
        rule_prefix = str(flt.get("Prefix", rule.get("Prefix", "")) or
                          (flt.get("And") or {}).get("Prefix", ""))
        if not (prefix.startswith(rule_prefix) or rule_prefix.startswith(prefix)):
            continue
        name = rule.get("ID") or "(unnamed)"
        expiration = rule.get("Expiration") or {}
        if expiration.get("Days") or expiration.get("Date"):
            out.append(("fail", f"lifecycle rule {name!r} expires objects under "
                        f"{rule_prefix or 'the whole bucket'!r}: it deletes archives warm "
                        "still points to",
                        "remove the expiration for tierstore's prefix; tierstore deletes "
                        "what it no longer needs (cold-gc, retention)"))
        for transition in rule.get("Transitions") or ():
            target = str(transition.get("StorageClass", ""))
            if target in _ARCHIVE_CLASSES and storage_class not in _ARCHIVE_CLASSES:
                out.append(("warn", f"lifecycle rule {name!r} moves objects to {target} "
                            f"after {transition.get('Days', '?')} days: reading such an "
                            "archive waits for a restore (hours)",
                            f"write that class directly (storage_class={target} in the cold "
                            "URL) so tierstore plans restores, or drop the transition"))
    if not out:
        kind = "no lifecycle rules touch the prefix" if rules else "no lifecycle rules"
        out.append(("ok", f"{kind}; tierstore writes {storage_class}", ""))
    return out


# -- probes (I/O) ------------------------------------------------------------------------


class _Report:
    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def add(self, region: str, tier: str, backend: str, check: str, judged: Judged) -> None:
        status, detail, fix = judged
        self.findings.append(Finding(region, tier, backend, check, status, detail, fix))

    def adder(self, region: str, tier: str, backend: str) -> Callable[[str, Judged], None]:
        """``add`` for one tier: ``add(check, judged)``."""
        def add(check: str, judged: Judged) -> None:
            self.add(region, tier, backend, check, judged)

        return add


def _unreachable(exc: BaseException) -> Judged:
    message = str(exc).replace("\n", " ") or type(exc).__name__
    return ("fail", f"{type(exc).__name__}: {message}",
            "check the URL, the server, the network path and credentials")


def _skew_of(before: float, server: float, after: float) -> float:
    """Server time minus this host's, the host's read taken halfway through the call."""
    return server - (before + after) / 2


async def _probe_redis(url: StoreUrl, report: _Report, region: str,
                       options: SaverOptions) -> None:
    from tierstore.tiers.redis import RedisHot

    store = RedisHot.from_url(url, ttl=options.hot_ttl)
    # the hot path's timeouts are a fraction of a second, tuned to give up on a slow
    # server; a check waits as long as a person would
    s = store.settings
    store.settings = replace(s, socket_timeout=max(s.socket_timeout, PROBE_TIMEOUT / 2),
                             connect_timeout=max(s.connect_timeout, PROBE_TIMEOUT / 2))
    client = store._connect()
    add = report.adder(region, "hot", "redis")
    try:
        before = time.time()
        seconds, micros = await client.time()
        after = time.time()
        add("reachable", ("ok", f"{url.masked} answers", ""))
        add("clock", judge_skew(_skew_of(before, seconds + micros / 1e6, after),
                                limit=options.checkpoint_id_skew))
        try:
            policy = await client.config_get("maxmemory-policy")
            memory = await client.config_get("maxmemory")
        except Exception:
            add("eviction", judge_redis_policy(None, None))
        else:
            add("eviction", judge_redis_policy(
                _one(policy, "maxmemory-policy"),
                int(_one(memory, "maxmemory") or 0)))
    except Exception as exc:
        add("reachable", _unreachable(exc))
    finally:
        await client.aclose()


def _one(answer: Any, name: str) -> str | None:
    """A CONFIG GET value (a cluster client answers per node: the first is taken)."""
    if isinstance(answer, Mapping):
        value = answer.get(name)
        if value is None and answer:
            first = next(iter(answer.values()))
            value = first.get(name) if isinstance(first, Mapping) else None
        return None if value is None else str(value)
    return None


async def _probe_postgres(url: StoreUrl, report: _Report, region: str,
                          options: SaverOptions) -> None:
    import asyncpg

    from tierstore.tiers.postgres import PostgresWarm

    store = PostgresWarm.from_url(url)
    add = report.adder(region, "warm", "postgres")
    settings = {"search_path": store.schema} if store.schema else {}
    try:
        conn = await asyncpg.connect(store._dsn, timeout=store.connect_timeout,
                                     server_settings=settings)
    except Exception as exc:
        add("reachable", _unreachable(exc))
        return
    try:
        add("reachable", ("ok", f"{url.masked} answers", ""))
        applied: list[int] | None = None
        if await conn.fetchval("SELECT to_regclass('tierstore_migrations') IS NOT NULL"):
            applied = [r[0] for r in await conn.fetch("SELECT version FROM tierstore_migrations")]
        add("schema", judge_schema("postgres", applied))
        before = time.time()
        server = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
        after = time.time()
        add("clock", judge_skew(_skew_of(before, float(server), after),
                                limit=options.checkpoint_id_skew))
    finally:
        await conn.close()


async def _probe_mongo(url: StoreUrl, report: _Report, region: str,
                       options: SaverOptions) -> None:
    from pymongo import AsyncMongoClient

    from tierstore.tiers.mongo import MongoWarm
    from tierstore.tiers.mongo.connection import client_url
    from tierstore.tiers.mongo.documents import COLLECTIONS

    store = MongoWarm.from_url(url)
    add = report.adder(region, "warm", "mongo")
    client: Any = AsyncMongoClient(client_url(url), serverSelectionTimeoutMS=5000,
                                   appname="tierstore-doctor")
    try:
        before = time.time()
        hello = await client.admin.command("hello")
        after = time.time()
        add("reachable", ("ok", f"{url.masked} answers", ""))
        database = client[store.database_name]
        versions = [int(d["_id"]) async for d in
                    database[COLLECTIONS["migrations"]].find({}, {"_id": 1})]
        add("schema", judge_schema("mongo", versions or None))
        local = hello.get("localTime")
        if local is not None:
            add("clock", judge_skew(_skew_of(before, local.timestamp(), after),
                                    resolution=0.001, limit=options.checkpoint_id_skew))
    except Exception as exc:
        add("reachable", _unreachable(exc))
    finally:
        await client.aclose()


def _writable(directory: Path) -> Judged:
    """Create and remove a file in ``directory`` (or say what stops it)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != directory:
        if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
            return ("warn", f"{directory} does not exist yet",
                    "run `tierstore migrate` to create it (or the first start will)")
        return ("fail", f"{directory} does not exist and {existing} is not writable",
                f"create {directory} writable by this user")
    if not directory.is_dir():
        return ("fail", f"{directory} is not a directory", "point the URL at a directory")
    probe = directory / f".tierstore-doctor-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        return ("fail", f"cannot write in {directory}: {exc.strerror or exc}",
                f"make {directory} writable by this user (uid {os.getuid()})")
    return ("ok", f"{directory} is writable", "")


async def _probe_sqlite(url: StoreUrl, report: _Report, region: str,
                        options: SaverOptions) -> None:
    add = report.adder(region, "warm", "sqlite")
    path = Path(url.local_path())
    add("writable", await asyncio.to_thread(_writable, path.parent))
    if not await asyncio.to_thread(path.exists):
        add("schema", ("fail", f"{path} does not exist",
                       "run `tierstore migrate` with the same flags"))
        return

    def versions() -> list[int] | None:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                 "AND name = 'tierstore_migrations'").fetchone()
            if found is None:
                return None
            return [row[0] for row in conn.execute("SELECT version FROM tierstore_migrations")]
        finally:
            conn.close()

    try:
        applied = await asyncio.to_thread(versions)
    except sqlite3.Error as exc:
        add("reachable", _unreachable(exc))
        return
    add("schema", judge_schema("sqlite", applied))


async def _probe_file(url: StoreUrl, report: _Report, region: str, tier: str) -> None:
    judged = await asyncio.to_thread(_writable, Path(url.local_path()))
    report.add(region, tier, "file", "writable", judged)


async def _probe_s3(url: StoreUrl, report: _Report, region: str, tier: str,
                    options: SaverOptions) -> None:
    from tierstore.tiers.s3 import S3Store

    store = S3Store.from_url(url)
    store.create_bucket = False  # a check creates nothing
    add = report.adder(region, tier, "s3")
    try:
        await store.setup()
    except Exception as exc:
        add("reachable", _unreachable(exc))
        await store.aclose()
        return
    try:
        client = store._opened()
        before = time.time()
        answer = await client.head_bucket(Bucket=store.bucket)
        after = time.time()
        add("reachable", ("ok", f"bucket {store.bucket!r} answers", ""))
        date = (answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}).get("date")
        if date:
            server = parsedate_to_datetime(date).timestamp()
            add("clock", judge_skew(_skew_of(before, server, after), resolution=1.0,
                                    limit=options.checkpoint_id_skew))
        try:
            lifecycle = await client.get_bucket_lifecycle_configuration(Bucket=store.bucket)
            rules: list[Mapping[str, Any]] | None = lifecycle.get("Rules") or []
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code != "NoSuchLifecycleConfiguration":
                add("lifecycle", ("warn", f"could not read the lifecycle rules ({code or exc})",
                                  "allow s3:GetLifecycleConfiguration to check them"))
                return
            rules = None
        for judged in judge_lifecycle(rules, prefix=store.prefix,
                                      storage_class=store.storage_class):
            add("lifecycle", judged)
    except Exception as exc:
        add("reachable", _unreachable(exc))
    finally:
        await store.aclose()


def _backend(table: Mapping[str, tuple[str, str | None]], url: StoreUrl) -> str:
    target = table[url.scheme][0] if url.scheme in table else ""
    return target.rpartition(".")[2].partition(":")[0] or url.scheme


async def _probe_tier(region: str, tier: str, url: StoreUrl, report: _Report,
                      options: SaverOptions) -> None:
    table = {"hot": HOT, "warm": WARM, "cold": OBJECT}[tier]
    module = _backend(table, url)
    probes: dict[str, Callable[[], Awaitable[None]]] = {
        "redis": lambda: _probe_redis(url, report, region, options),
        "postgres": lambda: _probe_postgres(url, report, region, options),
        "mongo": lambda: _probe_mongo(url, report, region, options),
        "sqlite": lambda: _probe_sqlite(url, report, region, options),
        "file": lambda: _probe_file(url, report, region, tier),
        "s3": lambda: _probe_s3(url, report, region, tier, options),
    }
    if module == "memory":
        report.add(region, tier, "memory", "reachable",
                   ("ok", "in-process: a cache local to each process", ""))
        return
    probe = probes.get(module)
    if probe is None:
        report.add(region, tier, url.scheme, "reachable",
                   ("fail", f"no backend for {url.scheme}://", "fix the URL's scheme"))
        return
    try:
        await asyncio.wait_for(probe(), PROBE_TIMEOUT * 3)
    except ModuleNotFoundError as exc:
        report.add(region, tier, module, "reachable",
                   ("fail", f"the {exc.name!r} driver is not installed",
                    f"pip install 'tierstore[{table[url.scheme][1]}]'"))
    except TierstoreError as exc:
        report.add(region, tier, module, "reachable", _unreachable(exc))
    except TimeoutError as exc:
        report.add(region, tier, module, "reachable", _unreachable(exc))


async def run_doctor(spec: StackSpec) -> list[Finding]:
    """Every finding for every tier of every region ``spec`` opens, in a stable order."""
    report = _Report()
    # one tier after another: a probe's clock reading and timeouts are not disturbed by
    # another's driver import or connection set-up running on the same loop
    for name, urls in spec.regions.items():
        for tier, url in (("hot", urls.hot), ("warm", urls.warm), ("cold", urls.cold)):
            if url is None:
                report.add(name, tier, "-", "configured",
                           ("ok", f"no {tier} tier (disabled)", ""))
                continue
            await _probe_tier(name, tier, url, report, spec.options)
    order = {"hot": 0, "warm": 1, "cold": 2}
    return sorted(report.findings, key=lambda f: (f.region, order.get(f.tier, 3)))
