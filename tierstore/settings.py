"""Typed, frozen settings. This is the only module that reads the environment.

A store is named by a URL; ``StoreUrl`` parses it once, masks its password in
``repr`` and names the bad part when it is malformed. ``SaverOptions`` carries the
knobs of the saver; every default is documented in README.md.

Every way of naming a saver's stores ends in one checked ``StackSpec``, so the saver's
factory methods and the command line cannot disagree on what a configuration means::

    TieredSaver.from_urls ──────► StackSpec.single ─────┐
    TieredSaver.from_regions ───► StackSpec.of_regions ─┤
    TieredSaver.from_region_table ► StackSpec.of_table ─┼──► StackSpec ──► TieredSaver.from_spec
    TieredSaver.from_env ─┐                             │    (checked)     (opens the stores)
    tierstore CLI flags ──┴─────► resolve_spec ─────────┘
                                  flag/argument > TIERSTORE_* environment > embedded default
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from tierstore.codec import dictionaries
from tierstore.errors import ConfigurationError
from tierstore.policy import resolve_region

__all__ = [
    "DEFAULT_COLD_URL",
    "DEFAULT_HOT_URL",
    "DEFAULT_REGION",
    "DEFAULT_WARM_URL",
    "PRICES_FILE_VARIABLE",
    "PRICES_VARIABLE",
    "REGIONS_FILE_VARIABLE",
    "URL_VARIABLES",
    "RegionTable",
    "SaverOptions",
    "StackSpec",
    "StoreUrl",
    "TierUrls",
    "prices_from_env",
    "resolve_options",
    "resolve_spec",
]

DEFAULT_HOT_URL = "memory://"
DEFAULT_WARM_URL = "sqlite:///.tierstore/warm.db"
DEFAULT_COLD_URL = "file://./.tierstore/cold"
DEFAULT_REGION = "default"
"""The one region of a saver built from three URLs (or from store objects)."""

TIERS = ("hot", "warm", "cold")
URL_VARIABLES = {tier: f"TIERSTORE_{tier.upper()}_URL" for tier in TIERS}
REGIONS_FILE_VARIABLE = "TIERSTORE_REGIONS_FILE"
PRICES_FILE_VARIABLE = "TIERSTORE_PRICES_FILE"
PRICES_VARIABLE = "TIERSTORE_PRICES"

RegionResolver = Callable[[str], str | None]
"""Thread id → region name, or None when the thread has no region."""

Concurrency = Literal["permissive", "strict"]
HotCheck = Literal["verify", "trusted"]
OnArchived = Literal["raise", "restore"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreUrl:
    """A parsed store URL. ``repr`` never shows the password."""

    raw: str = field(repr=False)
    scheme: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    host: str | None = None
    port: int | None = None
    path: str = ""
    query: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str) -> StoreUrl:
        if not isinstance(url, str) or not url.strip():
            raise ConfigurationError(f"store URL must be a non-empty string, got {url!r}")
        try:
            parts = urlsplit(url.strip())
            multi_host = parts.scheme.lower().startswith("mongodb") and "," in parts.netloc
            port = None if multi_host else parts.port
        except ValueError as exc:
            raise ConfigurationError(f"malformed URL {mask(url)!r}: {exc}") from exc
        if not parts.scheme:
            raise ConfigurationError(
                f"URL {mask(url)!r} has no scheme (expected e.g. sqlite:///path or redis://host)"
            )
        query: dict[str, str] = {}
        repeatable = parts.scheme.lower().startswith("mongodb")  # e.g. readPreferenceTags
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in query and not repeatable:
                raise ConfigurationError(f"URL {mask(url)!r} repeats query parameter {key!r}")
            query[key] = value
        return cls(
            raw=url.strip(),
            scheme=parts.scheme.lower(),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            host=None if multi_host else parts.hostname,
            port=port,
            path=parts.path,
            query=query,
        )

    @property
    def masked(self) -> str:
        return mask(self.raw)

    def local_path(self) -> str:
        """The filesystem path of a ``file://`` or ``sqlite:///`` URL.

        ``file:///abs``, ``file://./rel``; ``sqlite:///rel.db``, ``sqlite:////abs.db``
        (SQLAlchemy's convention: three slashes are relative, four absolute).
        """
        parts = urlsplit(self.raw)
        if self.scheme == "sqlite":
            if parts.netloc not in ("", "localhost"):
                raise ConfigurationError(
                    f"{self.masked!r}: a sqlite URL has no host; use sqlite:///relative.db "
                    "or sqlite:////absolute/path.db"
                )
            path = unquote(parts.path)
            path = path[1:] if path.startswith("/") else path
        else:
            netloc = parts.netloc
            path = unquote(parts.path)
            if netloc not in ("", "localhost"):
                path = unquote(netloc) + path
        if not path or (path in (".", "/") and self.scheme == "sqlite"):
            raise ConfigurationError(f"{self.masked!r}: the URL names no path")
        return path

    def option(self, name: str, default: str | None = None) -> str | None:
        return self.query.get(name, default)


def mask(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``30d`` → seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    text = text.strip().lower()
    scale = units.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        value = float(number) * (scale or 1.0)
    except ValueError as exc:
        raise ConfigurationError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 30d)") from exc
    if not math.isfinite(value):
        raise ConfigurationError(f"a duration must be a finite number: {text!r}")
    if value < 0:
        raise ConfigurationError(f"a duration cannot be negative: {text!r}")
    return value


def parse_interval(text: str) -> float:
    """``parse_duration`` of a time between runs or a period counters ran: above 0
    seconds (0 would be a loop that never waits, or a division by nothing)."""
    value = parse_duration(text)
    if not value > 0:
        raise ConfigurationError(f"must be above 0 seconds, got {text.strip()!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class SaverOptions:
    """Behaviour of a ``TieredSaver``.

    concurrency: ``permissive`` keeps LangGraph's semantics (any parent accepted,
        conflicts counted); ``strict`` refuses a write whose parent is not the head.
    hot_ttl: seconds an idle thread's cached latest checkpoint lives in the hot tier.
    hot_check: ``verify`` compares every hot hit with the warm head (one indexed
        lookup, issued in parallel); ``trusted`` skips it and may serve a cached
        entry up to ``hot_ttl`` old if a hot write failed.
    offload_threshold: payloads larger than this many bytes go to the object store.
    offload_grace: seconds an offloaded object that no row names is kept after a delete,
        prune or copy (a put writes its objects before its row, so a younger one may
        belong to a put still in flight); ``ColdGC`` collects it later.
    compression_level: zstd level for payloads.
    compress_min: payloads smaller than this are stored uncompressed.
    on_archived: ``raise`` CheckpointArchived for a checkpoint that needs a restore,
        or ``restore`` to start the restore and then raise.
    hot_write_delay: seconds the hot tier's update of a (thread, ns) waits so that a
        burst of writes (one LangGraph turn) costs one hot round trip; 0 writes through.
    hot_local_entries: latest checkpoints this process keeps a copy of in front of the
        hot tier (with ``hot_check="verify"`` only: each use is still checked against
        the warm head); 0 turns the local copy off.
    encryption: a ``tierstore.Keyring``; every payload in every tier is then encrypted
        (AES-256-GCM), metadata included.
    filterable_metadata: with encryption, the metadata keys kept in clear so that list
        filters can use them (their values are visible to whoever reads the store).
    max_payload_bytes: the most one decompressed payload (one zstd frame) may hold.
    max_record_bytes: the most all payloads of one checkpoint may decode to together.
    max_bundle_bytes: the most one archive segment or export file body may decode to.
    safe_decode: decode what every tier returns as untrusted bytes (LangGraph's safe
        msgpack types plus ``allowed_msgpack_modules``; anything else is
        ``UnsafePayload``), for stores that parties other than this saver can write.
        Import files are always decoded this way.
    allowed_msgpack_modules: ``(module, name)`` pairs trusted on top of LangGraph's
        safe types wherever untrusted bytes are decoded.
    checkpoint_id_skew: seconds a written checkpoint id's timestamp may lie ahead of this
        machine's clock (clock differences between writers, a clock stepped back).
    delta: store a new version of a list channel that extends one this saver wrote or
        read (``add_messages``, ``operator.add``) as the items appended, in bounded
        chains (``tierstore.codec.chain``), instead of the whole list again.
    compression_dictionary: the pinned zstd dictionary payloads under 32 KiB are
        compressed with (``tierstore.codec.dictionaries``), or None for plain zstd. Every
        dictionary is always read; None is for fleets where releases that predate the
        dictionary still read the same stores (a rolling upgrade, a rollback).
    """

    concurrency: Concurrency = "permissive"
    hot_ttl: float = 3600.0
    hot_check: HotCheck = "verify"
    offload_threshold: int = 1 << 20
    offload_grace: float = 300.0
    compression_level: int = 3
    compress_min: int = 256
    on_archived: OnArchived = "raise"
    hot_write_delay: float = 0.2
    hot_local_entries: int = 1024
    encryption: Any = field(default=None, repr=False)
    filterable_metadata: tuple[str, ...] = ("source", "step")
    max_payload_bytes: int = 256 << 20
    max_record_bytes: int = 1024 << 20
    max_bundle_bytes: int = 2048 << 20
    safe_decode: bool = False
    allowed_msgpack_modules: tuple[tuple[str, ...], ...] = ()
    checkpoint_id_skew: float = 60.0
    delta: bool = True
    compression_dictionary: str | None = dictionaries.CURRENT

    def __post_init__(self) -> None:
        self._check_types()
        if (self.compression_dictionary is not None
                and self.compression_dictionary not in dictionaries.SHA256):
            raise ConfigurationError(
                f"compression_dictionary must be None or one of "
                f"{', '.join(sorted(dictionaries.SHA256))}, got {self.compression_dictionary!r}")
        if not 0 <= self.offload_grace <= 86400:
            raise ConfigurationError(
                f"offload_grace must be within 0..86400 seconds, got {self.offload_grace!r}")
        if not 0 <= self.checkpoint_id_skew <= 86400:
            raise ConfigurationError(
                f"checkpoint_id_skew must be within 0..86400 seconds, got "
                f"{self.checkpoint_id_skew!r}")
        for name in ("max_payload_bytes", "max_record_bytes", "max_bundle_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
        for entry in self.allowed_msgpack_modules:
            if (not isinstance(entry, tuple) or len(entry) < 2
                    or not all(isinstance(part, str) and part for part in entry)):
                raise ConfigurationError(
                    "allowed_msgpack_modules takes (module, name) tuples of strings, "
                    f"got {entry!r}")
        if self.hot_local_entries < 0:
            raise ConfigurationError(
                f"hot_local_entries cannot be negative: {self.hot_local_entries!r}")
        if not 0 <= self.hot_write_delay <= 60:
            raise ConfigurationError(
                f"hot_write_delay must be within 0..60 seconds, got {self.hot_write_delay!r}"
            )
        if self.concurrency not in ("permissive", "strict"):
            raise ConfigurationError(
                f"concurrency must be 'permissive' or 'strict', got {self.concurrency!r}"
            )
        if self.hot_check not in ("verify", "trusted"):
            raise ConfigurationError(
                f"hot_check must be 'verify' or 'trusted', got {self.hot_check!r}"
            )
        if self.on_archived not in ("raise", "restore"):
            raise ConfigurationError(
                f"on_archived must be 'raise' or 'restore', got {self.on_archived!r}"
            )
        if not self.hot_ttl > 0:
            raise ConfigurationError(f"hot_ttl must be positive, got {self.hot_ttl!r}")
        if self.offload_threshold < 1024:
            raise ConfigurationError(
                f"offload_threshold must be at least 1024 bytes, got {self.offload_threshold!r}"
            )
        if not 1 <= self.compression_level <= 22:
            raise ConfigurationError(
                f"compression_level must be within 1..22, got {self.compression_level!r}"
            )
        if self.compress_min < 0:
            raise ConfigurationError(f"compress_min cannot be negative: {self.compress_min!r}")

    def _check_types(self) -> None:
        """Refuse a value of the wrong type by the option's name, before any comparison.

        ``bool`` is refused where a number is expected (``True`` is an ``int`` to Python,
        but ``hot_ttl=True`` is a mistake), floats must be finite (an infinite TTL does
        not fit a Redis expiry), and counts must be integers.
        """
        for name in ("hot_ttl", "hot_write_delay", "checkpoint_id_skew", "offload_grace"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value)):
                raise ConfigurationError(
                    f"{name} must be a finite number of seconds, got {value!r}")
        for name in ("offload_threshold", "compression_level", "compress_min",
                     "hot_local_entries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigurationError(f"{name} must be an integer, got {value!r}")
        for name in ("safe_decode", "delta"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    f"{name} must be True or False, got {getattr(self, name)!r}")
        keys = self.filterable_metadata
        if isinstance(keys, str | bytes) or not isinstance(keys, tuple | list | frozenset | set):
            raise ConfigurationError(
                f"filterable_metadata must be a tuple of metadata keys, got {keys!r}")
        if not all(isinstance(k, str) for k in keys):
            raise ConfigurationError(f"filterable_metadata keys must be strings, got {keys!r}")
        object.__setattr__(self, "filterable_metadata", tuple(keys))
        if self.encryption is not None:
            from tierstore.codec.crypto import Keyring

            if not isinstance(self.encryption, Keyring):
                raise ConfigurationError(
                    f"encryption must be a tierstore.Keyring or None, got "
                    f"{type(self.encryption).__name__}")

    def with_(self, **changes: Any) -> SaverOptions:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigurationError(f"unknown saver option(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)


_ENV_OPTIONS: dict[str, tuple[str, type]] = {
    "TIERSTORE_CONCURRENCY": ("concurrency", str),
    "TIERSTORE_HOT_TTL": ("hot_ttl", float),
    "TIERSTORE_HOT_CHECK": ("hot_check", str),
    "TIERSTORE_OFFLOAD_THRESHOLD": ("offload_threshold", int),
    "TIERSTORE_COMPRESSION_LEVEL": ("compression_level", int),
    "TIERSTORE_ON_ARCHIVED": ("on_archived", str),
    "TIERSTORE_HOT_WRITE_DELAY": ("hot_write_delay", float),
    "TIERSTORE_HOT_LOCAL_ENTRIES": ("hot_local_entries", int),
    "TIERSTORE_OFFLOAD_GRACE": ("offload_grace", float),
    "TIERSTORE_MAX_PAYLOAD_BYTES": ("max_payload_bytes", int),
    "TIERSTORE_MAX_RECORD_BYTES": ("max_record_bytes", int),
    "TIERSTORE_MAX_BUNDLE_BYTES": ("max_bundle_bytes", int),
    "TIERSTORE_COMPRESSION_DICTIONARY": ("compression_dictionary", str),
}


def resolve_options(options: Mapping[str, Any] | SaverOptions | None = None) -> SaverOptions:
    """Options given by name, checked: an unknown name or a bad value is refused here."""
    if isinstance(options, SaverOptions):
        return options
    return SaverOptions().with_(**(options or {}))


def urls_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """``TIERSTORE_HOT_URL`` / ``TIERSTORE_WARM_URL`` / ``TIERSTORE_COLD_URL``.

    A variable that is unset falls back to the embedded default; one set to the
    empty string or ``none`` disables that tier (hot and cold only).
    """
    env = os.environ if environ is None else environ
    out: dict[str, str | None] = {}
    for tier, default in (
        ("hot", DEFAULT_HOT_URL),
        ("warm", DEFAULT_WARM_URL),
        ("cold", DEFAULT_COLD_URL),
    ):
        variable = URL_VARIABLES[tier]
        value = env.get(variable)
        if value is None:
            out[tier] = default
        elif _disabled(value):
            if tier == "warm":
                raise ConfigurationError(f"{variable} cannot be disabled: warm is required")
            out[tier] = None
        else:
            out[tier] = value
    return out


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for var, (name, kind) in _ENV_OPTIONS.items():
        if var not in env:
            continue
        raw = env[var]
        try:
            if name == "hot_ttl":
                out[name] = parse_duration(raw)
            elif name == "compression_dictionary":
                out[name] = None if raw.strip().lower() in ("", "none") else raw.strip()
            else:
                out[name] = kind(raw)
        except ValueError as exc:
            raise ConfigurationError(f"{var}={raw!r}: {exc}") from exc
    return out


def regions_file_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """``TIERSTORE_REGIONS_FILE``: a region table to use instead of the three URLs."""
    env = os.environ if environ is None else environ
    value = env.get(REGIONS_FILE_VARIABLE, "").strip()
    return value or None


def prices_from_env(environ: Mapping[str, str] | None = None
                    ) -> tuple[str | None, list[str]]:
    """The price file (``TIERSTORE_PRICES_FILE``) and the single prices set in
    ``TIERSTORE_PRICES`` (``KEY=VALUE`` pairs, comma-separated) that ``tierstore status
    --cost`` and ``tierstore plan`` lay over the shipped prices (``tierstore.cost``)."""
    env = os.environ if environ is None else environ
    path = env.get(PRICES_FILE_VARIABLE, "").strip() or None
    pairs = [item.strip() for item in env.get(PRICES_VARIABLE, "").split(",") if item.strip()]
    return path, pairs


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(text: str, env: Mapping[str, str], where: str) -> str:
    """``${NAME}`` from the environment, so secrets stay out of the file; unset is an error."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ConfigurationError(f"{where}: ${{{name}}} is not set in the environment")
        return env[name]

    return _ENV_REF.sub(sub, text)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegionTable:
    """Regions, their store URLs and the rules that place threads, as a file holds them.

    ::

        default_region = "eu"                    # optional
        [[rules]]                                # first match wins
        match = "eu-*"                           # a glob over the thread id
        region = "eu"
        [regions.eu]
        hot = "redis://redis-eu:6379/0"
        warm = "postgresql://app:${PG_EU_PASSWORD}@pg-eu/tierstore"
        cold = "s3://archive-eu/tierstore?region=eu-central-1"

    ``${NAME}`` is read from the environment when the URLs are used (``served_urls``),
    and only for the regions served, inserted verbatim (percent-encode what a URL needs
    encoded). A tier set to ``""`` or ``"none"`` is disabled. ``only(name)`` keeps one
    region's stores but every rule, so a thread of another region is refused by name
    rather than placed wrongly: a worker deployed in one region opens only that
    region's stores and needs only that region's secrets.
    """

    regions: Mapping[str, Mapping[str, str | None]]
    rules: tuple[tuple[str, str], ...] = ()
    default_region: str | None = None
    serves: frozenset[str] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> RegionTable:
        where = f"regions file {str(path)!r}"
        try:
            doc = tomllib.loads(Path(path).read_text("utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"{where}: cannot read it ({exc.strerror})") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{where}: not valid TOML ({exc})") from exc
        unknown = set(doc) - {"regions", "rules", "default_region"}
        if unknown:
            raise ConfigurationError(f"{where}: unknown keys {sorted(unknown)}")
        raw_regions = doc.get("regions")
        if not isinstance(raw_regions, dict) or not raw_regions:
            raise ConfigurationError(f"{where}: needs a [regions.<name>] table per region")
        regions: dict[str, dict[str, str | None]] = {}
        for name, urls in raw_regions.items():
            if not isinstance(urls, dict) or set(urls) - set(TIERS) or not all(
                    isinstance(v, str) for v in urls.values()):
                raise ConfigurationError(
                    f"{where}: [regions.{name}] takes hot, warm and cold URL strings")
            regions[name] = {tier: _tier_url(urls.get(tier)) for tier in TIERS}
            if regions[name]["warm"] is None:
                raise ConfigurationError(f"{where}: [regions.{name}] needs a warm URL")
        rules: list[tuple[str, str]] = []
        for i, rule in enumerate(doc.get("rules", [])):
            if (not isinstance(rule, dict) or set(rule) != {"match", "region"}
                    or not all(isinstance(v, str) for v in rule.values())):
                raise ConfigurationError(
                    f"{where}: rule {i + 1} must be {{match = \"glob\", region = \"name\"}}")
            rules.append((rule["match"], rule["region"]))
        default = doc.get("default_region")
        if default is not None and not isinstance(default, str):
            raise ConfigurationError(f"{where}: default_region must be a region name")
        table = cls(regions=regions, rules=tuple(rules), default_region=default)
        table.check()
        return table

    def check(self) -> None:
        _check_placement(self.regions, self.rules, self.default_region)

    def served_urls(self, environ: Mapping[str, str] | None = None
                    ) -> dict[str, dict[str, str | None]]:
        """The URLs of the regions served, with ``${NAME}`` taken from the environment."""
        env = os.environ if environ is None else environ
        return {
            name: {tier: None if url is None else
                   _expand(url, env, f"region {name!r} {tier} URL")
                   for tier, url in urls.items()}
            for name, urls in self.regions.items()
            if self.serves is None or name in self.serves
        }

    def only(self, name: str) -> RegionTable:
        """The same placement, serving one region only."""
        if name not in self.regions:
            raise ConfigurationError(
                f"unknown region {name!r}; the table has {', '.join(sorted(self.regions))}")
        return replace(self, serves=frozenset({name}))


def _tier_url(value: str | None) -> str | None:
    return None if value is None or _disabled(value) else value


def _disabled(value: str) -> bool:
    """``""`` and ``none`` switch an optional tier off wherever text names a URL."""
    return value.strip().lower() in ("", "none")


@dataclass(frozen=True, slots=True, kw_only=True)
class TierUrls:
    """The store URLs of one region, parsed: a malformed one is refused before any store
    is built. Whether a scheme has a backend is the business of ``tierstore.tiers``."""

    warm: StoreUrl
    hot: StoreUrl | None = None
    cold: StoreUrl | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StackSpec:
    """Everything a saver is built from, checked, and nothing opened yet.

    ``regions`` holds the stores this saver opens, by region; ``rules`` and
    ``default_region`` (or ``resolver``, when given) place every thread, and may name
    regions this saver does not open (a table narrowed with ``RegionTable.only``): such
    a thread is then refused by name instead of being placed in the wrong stores.
    Build one with ``resolve_spec`` or the ``single`` / ``of_regions`` / ``of_table``
    constructors, which refuse what they cannot use with ``ConfigurationError``.
    """

    regions: Mapping[str, TierUrls]
    rules: tuple[tuple[str, str], ...] = ()
    default_region: str | None = None
    resolver: RegionResolver | None = None
    options: SaverOptions = field(default_factory=SaverOptions)

    def region_of(self, thread_id: str) -> str | None:
        if self.resolver is not None:
            return self.resolver(thread_id)
        return resolve_region(thread_id, self.rules, self.default_region)

    @classmethod
    def single(
        cls,
        *,
        hot: str | None = DEFAULT_HOT_URL,
        warm: str | None = DEFAULT_WARM_URL,
        cold: str | None = DEFAULT_COLD_URL,
        options: Mapping[str, Any] | SaverOptions | None = None,
    ) -> StackSpec:
        """One stack of stores, the region every thread belongs to; None disables hot or
        cold (warm is the system of record, so it cannot be)."""
        opts = resolve_options(options)
        if warm is None:
            raise ConfigurationError("a warm tier is required: it is the system of record")
        urls = TierUrls(warm=StoreUrl.parse(warm), hot=_parse_optional(hot),
                        cold=_parse_optional(cold))
        return cls(regions={DEFAULT_REGION: urls}, default_region=DEFAULT_REGION,
                   options=opts)

    @classmethod
    def of_regions(
        cls,
        regions: Mapping[str, Mapping[str, str | None]],
        *,
        rules: Sequence[tuple[str, str]] = (),
        resolver: RegionResolver | None = None,
        default_region: str | None = None,
        options: Mapping[str, Any] | SaverOptions | None = None,
    ) -> StackSpec:
        """Several regions placed by ``resolver``, else by ``rules`` then ``default_region``.

        Every name a rule or the default gives must be a region of ``regions``; a
        resolver's answers are judged when a thread is used (``ResidencyError``).
        """
        opts = resolve_options(options)
        _check_region_shapes(regions, rules, default_region, resolver)
        if not regions:
            raise ConfigurationError("from_regions needs at least one region")
        _check_placement(regions, rules, default_region)
        return cls(regions=_region_urls(regions), rules=tuple(rules),
                   default_region=default_region, resolver=resolver, options=opts)

    @classmethod
    def of_table(
        cls,
        table: RegionTable,
        *,
        options: Mapping[str, Any] | SaverOptions | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> StackSpec:
        """The regions a table serves, their ``${NAME}`` taken from ``environ``.

        A table narrowed with ``only(name)`` keeps every rule of the whole table, so a
        thread of a region it does not serve is refused naming that region.
        """
        table.check()
        served = table.served_urls(environ)
        if table.serves is None:
            return cls.of_regions(served, rules=table.rules,
                                  default_region=table.default_region, options=options)
        opts = resolve_options(options)
        if not served:
            raise ConfigurationError("from_regions needs at least one region")
        return cls(regions=_region_urls(served), rules=table.rules,
                   default_region=table.default_region, options=opts)


def resolve_spec(
    *,
    hot: str | None = None,
    warm: str | None = None,
    cold: str | None = None,
    regions_file: str | Path | None = None,
    region: str | None = None,
    options: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> StackSpec:
    """The stack named by flags (or arguments), then the environment, then the defaults.

    Each of ``hot`` / ``warm`` / ``cold`` / ``regions_file`` / ``options`` is None when
    not given; a URL given as ``""`` or ``none`` disables its tier. A URL given wins
    over ``TIERSTORE_REGIONS_FILE``, which wins over ``TIERSTORE_*_URL``; each tier
    not given comes from its variable, else the embedded default. ``options`` win over
    ``TIERSTORE_*`` options. ``region`` narrows a region table to one region's stores.
    """
    env = os.environ if environ is None else environ
    urls_given = any(url is not None for url in (hot, warm, cold))
    if regions_file is not None and urls_given:
        raise ConfigurationError("give either --hot/--warm/--cold or --regions, not both")
    merged = {**options_from_env(env), **(options or {})}
    if regions_file is None and warm is None and (hot is not None or cold is not None) \
            and regions_file_from_env(env) is not None:
        # the flags win over the variable's table, so the warm tier would fall back to
        # TIERSTORE_WARM_URL or the embedded default: a store nobody meant to open
        raise ConfigurationError(
            f"{REGIONS_FILE_VARIABLE} is set: --hot/--cold alone would open the default warm "
            "store instead of the table's; give --warm too, or --region NAME")
    table_file = regions_file or (None if urls_given else regions_file_from_env(env))
    if table_file is not None:
        table = RegionTable.from_file(table_file)
        if region is not None:
            table = table.only(region)
        return StackSpec.of_table(table, options=merged, environ=env)
    if region is not None:
        raise ConfigurationError(
            f"--region needs a region table (--regions FILE or {REGIONS_FILE_VARIABLE})")
    fallback = urls_from_env(env)
    return StackSpec.single(hot=_given(hot, fallback["hot"]),
                            warm=_given(warm, fallback["warm"]),
                            cold=_given(cold, fallback["cold"]), options=merged)


def _given(value: str | None, fallback: str | None) -> str | None:
    if value is None:
        return fallback
    return None if _disabled(value) else value


def _parse_optional(url: str | None) -> StoreUrl | None:
    return None if url is None else StoreUrl.parse(url)


def _check_region_shapes(regions: object, rules: object, default_region: object,
                         resolver: object) -> None:
    """The shapes ``TieredSaver.from_regions`` takes, refused by name before any use.

    ``regions`` maps names to ``{"hot"|"warm"|"cold": url}``; ``rules`` is a sequence
    (read twice, so not a one-shot iterator) of ``(glob, region)`` string pairs;
    ``default_region`` is a name or None and ``resolver`` a callable or None. Whether
    the names exist is checked after.
    """
    if not isinstance(regions, Mapping):
        raise ConfigurationError(
            f"regions must map region names to their URLs, got {type(regions).__name__}")
    for name, urls in regions.items():
        if not isinstance(name, str) or not isinstance(urls, Mapping):
            raise ConfigurationError(
                f"region {name!r} must be a name mapped to {{'hot'|'warm'|'cold': url}}")
    if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
        raise ConfigurationError(f"rules must be a sequence of (glob, region) pairs, "
                                 f"got {type(rules).__name__}")
    for i, rule in enumerate(rules):
        if (not isinstance(rule, tuple | list) or len(rule) != 2
                or not all(isinstance(part, str) for part in rule)):
            raise ConfigurationError(f"rule {i} must be a (glob, region) pair of strings, "
                                     f"got {rule!r}"[:200])
    if default_region is not None and not isinstance(default_region, str):
        raise ConfigurationError(
            f"default_region must be a region name, got {type(default_region).__name__}")
    if resolver is not None and not callable(resolver):
        raise ConfigurationError(
            f"resolver must be a callable, got {type(resolver).__name__}")


def _check_placement(regions: Mapping[str, object], rules: Sequence[tuple[str, str]],
                     default_region: str | None) -> None:
    """Every region a rule or the default names is one of ``regions``."""
    for pattern, region in rules:
        if region not in regions:
            raise ConfigurationError(f"rule {pattern!r} names unknown region {region!r}")
    if default_region is not None and default_region not in regions:
        raise ConfigurationError(f"default_region {default_region!r} is not a region")


def _region_urls(regions: Mapping[str, Mapping[str, str | None]]) -> dict[str, TierUrls]:
    """Each region's URLs, parsed; a hot or cold URL that is empty disables its tier."""
    out: dict[str, TierUrls] = {}
    for name, urls in regions.items():
        warm = urls.get("warm")
        if set(urls) - set(TIERS) or not warm:
            raise ConfigurationError(
                f"region {name!r} needs a warm URL and takes only hot/warm/cold")
        out[name] = TierUrls(warm=StoreUrl.parse(warm),
                             hot=_parse_optional(urls.get("hot") or None),
                             cold=_parse_optional(urls.get("cold") or None))
    return out
