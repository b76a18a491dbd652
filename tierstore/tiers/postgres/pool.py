"""The connection pool, the store's lifecycle, and the one place driver errors are translated.

URL options (removed before the URL reaches asyncpg; the rest, e.g. ``sslmode``,
is asyncpg's): ``min_size=1``, ``max_size=10`` (pool size), ``command_timeout=30``
(seconds a statement or a wait for a pooled connection may take),
``connect_timeout=10``, ``setup_timeout=300`` (migrations), ``schema=NAME`` (tables
live in this schema, created if missing), ``statement_cache_size=100`` (named
prepared statements kept per connection), ``pooler=transaction`` (behind a pooler in
transaction mode, such as PgBouncer's ``pool_mode = transaction``: see below),
``pooler_settings=transaction`` (or ``server``: see below), ``partitions=N`` (2..64:
the checkpoint, blob and write tables are hash-partitioned by thread into N when the
schema is created; a store already holding data in plain tables is refused and
converted with ``tierstore migrate --partitions N``, one partitioned into another
count is refused; see ``partitions.py``).

Connections plan with sequential scans off. Every statement of a request finds its
rows through an index; but a plan made while a table holds a page or two reads it
whole instead, and a prepared statement may keep that plan as the table grows until
the next ``ANALYZE``: each read would then cost the whole store. With sequential
scans off, a statement an index serves probes it whatever the statistics say (as
``tierstore_ancestors`` does, 0008). A statement that reads a whole table still does:
``usage`` scans it as before; a claim's pass over the heads walks their primary key
instead (about twice the pages of that pass).

``pooler=transaction``: a pooler in transaction mode hands each transaction to any of
its server connections, so nothing may outlive a transaction. The store then

- prepares no named statement (``statement_cache_size`` is 0, and any other value is
  refused): each statement is parsed again with its parameters, in one round trip;
- sends no startup parameter but ``application_name`` (PgBouncer refuses the others
  unless listed in ``ignore_startup_parameters``, and would then drop them): every call
  runs in a transaction of its own that starts with ``SET LOCAL`` of
  ``enable_seqscan``, ``search_path`` and ``jit_above_cost = -1`` (JIT off): three
  round trips more than a one-statement call (``BEGIN``, the settings, ``COMMIT``; a
  call that opened a transaction opens a savepoint instead). With
  ``pooler_settings=server`` the server applies them instead, as the defaults of the
  store's role or database (``ALTER ROLE … IN DATABASE … SET``): calls run as they
  do without a pooler, and ``setup()`` checks the settings, refusing with a
  ``ConfigurationError`` that spells out the statements when they differ;
- migrates under a transaction-level advisory lock, every pending migration in one
  transaction. A migration that must run outside a transaction
  (``-- tierstore:no-transaction``) and a conversion to partitions hold the lock across
  transactions: both are refused through the pooler with a ``ConfigurationError``;
  run ``tierstore migrate`` with the server's own URL (without ``pooler``) instead.

Without the option, a server that answers like a transaction pooler (a named
statement missing or already there, a startup parameter refused) fails with a
``ConfigurationError`` that names ``pooler=transaction``.

A pool of your own: ``PostgresWarm.from_pool(pool, schema=…, partitions=…,
setup_timeout=…, command_timeout=…)``. The store runs on it as it is and never closes
it. Its sessions keep the settings they were made with, so make the pool with
``server_settings=server_settings(schema)`` for the plans and the schema above
(setup refuses a pool whose ``search_path`` does not start with ``schema``, and one whose
connections encode ``jsonb`` with a codec of their own); the store takes a connection
per call and keeps none between calls, so the rest of your application shares the pool.
``command_timeout`` then bounds the wait for a pooled connection only; statements run
under the pool's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, Final, Self, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from tierstore.errors import (
    ConfigurationError,
    InvalidInput,
    LifecycleError,
    PayloadTooLarge,
    TierstoreError,
    TierUnavailable,
)
from tierstore.lifecycle import Lifecycle
from tierstore.settings import StoreUrl, mask
from tierstore.tiers.postgres.connect import resolve
from tierstore.tiers.postgres.migrations import migrate
from tierstore.tiers.postgres.partitions import check_count
from tierstore.tiers.postgres.sql import Conn, quote_ident

T = TypeVar("T")

_OPTIONS: Final = frozenset({
    "min_size", "max_size", "command_timeout", "connect_timeout", "setup_timeout", "schema",
    "statement_cache_size", "partitions", "pooler", "pooler_settings",
})
POOL_OPTIONS: Final = ("schema", "partitions", "setup_timeout", "command_timeout")
"""The options that still apply to a pool the caller made (``from_pool``)."""


def server_settings(schema: str | None = None) -> dict[str, str]:
    """The session settings the store's own pool runs with, for ``asyncpg.create_pool(…,
    server_settings=server_settings(schema))`` of a pool you hand to ``from_pool``."""
    settings = {
        "jit": "off",  # planning JIT costs more than these short statements
        # Plans that stay key probes whatever the tables' statistics say (see above).
        "enable_seqscan": "off",
    }
    if schema is not None:
        settings["search_path"] = quote_ident(schema)
    return settings

POOLERS: Final = ("transaction",)
"""The values of the ``pooler`` URL option."""
POOLER_SETTINGS: Final = ("transaction", "server")
"""Where the session settings come from behind a pooler: ``SET LOCAL`` in a transaction
around every call, or the server (the role's or database's defaults, checked at setup)."""


class PostgresPool:
    """What every part of the store runs on: options, pool, lifecycle, ``_run``."""

    backend = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        masked: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        setup_timeout: float = 300.0,
        schema: str | None = None,
        statement_cache_size: int | None = None,
        partitions: int | None = None,
        pool: asyncpg.Pool[asyncpg.Record] | None = None,
        pooler: str | None = None,
        pooler_settings: str | None = None,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigurationError(
                f"postgres pool needs 0 <= min_size <= max_size and max_size >= 1, "
                f"got min_size={min_size} max_size={max_size}"
            )
        for name, value in (("command_timeout", command_timeout),
                            ("connect_timeout", connect_timeout),
                            ("setup_timeout", setup_timeout)):
            if not value > 0 or math.isinf(value):
                raise ConfigurationError(f"postgres {name} must be a positive number, "
                                         f"got {value!r}")
        if pooler is not None and pooler not in POOLERS:
            raise ConfigurationError(
                f"postgres pooler must be one of {', '.join(POOLERS)} (the pooler's mode, "
                f"e.g. PgBouncer's pool_mode = transaction), got {pooler!r}")
        if pooler_settings is not None and pooler is None:
            raise ConfigurationError("postgres pooler_settings applies behind a pooler: "
                                     "give pooler=transaction too")
        if pooler_settings is not None and pooler_settings not in POOLER_SETTINGS:
            raise ConfigurationError(
                f"postgres pooler_settings must be one of {', '.join(POOLER_SETTINGS)}, "
                f"got {pooler_settings!r}")
        if statement_cache_size is None:
            statement_cache_size = 0 if pooler is not None else 100
        if statement_cache_size < 0:
            raise ConfigurationError("postgres statement_cache_size cannot be negative")
        if pooler is not None and statement_cache_size:
            raise ConfigurationError(
                f"postgres pooler={pooler} prepares no named statement: a transaction "
                "pooler may run the next transaction on a server connection that never "
                f"saw it; leave statement_cache_size out (got {statement_cache_size})")
        if schema is not None and not 0 < len(schema.encode("utf-8")) <= 63:
            raise ConfigurationError(f"postgres schema name must be 1..63 bytes, got {schema!r}")
        if partitions is not None:
            check_count(partitions)
        self._dsn = dsn
        self._secret = urlsplit(dsn).password
        self.url = masked if masked is not None else mask(dsn)
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.setup_timeout = setup_timeout
        self.schema = schema
        self.statement_cache_size = statement_cache_size
        self.partitions = partitions
        self.pooler = pooler
        self.pooler_settings = pooler_settings or ("transaction" if pooler else None)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._given = pool
        """The caller's pool (``from_pool``): used, never closed."""
        self._life = Lifecycle(f"postgres warm tier {self.url}", closed_hint="build a new store")
        self._releasing: set[asyncio.Task[None]] = set()
        # Connections kept between calls (see ``_keep``), newest last. None of a pool the
        # application shares: the store would hold connections the application waits for.
        self._kept: list[Conn] = []
        self._keep_at_most = max_size - 1 if pool is None else 0
        self._waiting = 0  # calls waiting for the pool: a connection that ends a call is theirs

    def __repr__(self) -> str:
        return f"PostgresWarm({self.url!r}, state={self._life.state!r})"

    @property
    def identity(self) -> tuple[str, str, str | None]:
        """The database and schema (stores with the same identity hold the same rows)."""
        return ("postgres", self.url, self.schema)

    @classmethod
    def from_url(cls, url: StoreUrl, **kw: Any) -> Self:
        """Options come from the URL query; keyword arguments override them."""
        unknown = set(kw) - _OPTIONS
        if unknown:
            raise ConfigurationError(f"unknown postgres option(s): {', '.join(sorted(unknown))}")
        options: dict[str, Any] = {k: v for k, v in url.query.items() if k in _OPTIONS}
        options.update(kw)
        parsed: dict[str, Any] = {}
        try:
            for name in ("min_size", "max_size", "statement_cache_size", "partitions"):
                if name in options and options[name] is not None:
                    parsed[name] = int(options[name])
            for name in ("command_timeout", "connect_timeout", "setup_timeout"):
                if name in options:
                    parsed[name] = float(options[name])
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{url.masked!r}: bad pool option: {exc}") from exc
        for name in ("schema", "pooler", "pooler_settings"):
            if options.get(name):
                parsed[name] = str(options[name])
        parts = urlsplit(url.raw)
        kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                if k not in _OPTIONS]
        dsn = urlunsplit(parts._replace(query=urlencode(kept)))
        return cls(dsn, masked=url.masked, **parsed)

    @classmethod
    def from_pool(cls, pool: object, **options: Any) -> Self:
        """A store on the caller's ``asyncpg.Pool`` (options: ``POOL_OPTIONS``)."""
        if not isinstance(pool, asyncpg.Pool):
            raise ConfigurationError(
                f"the PostgreSQL warm tier takes an asyncpg.Pool, got "
                f"{type(pool).__module__}.{type(pool).__qualname__}"
            )
        unknown = sorted(set(options) - set(POOL_OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) for an asyncpg pool: {', '.join(unknown)}; known: "
                f"{', '.join(POOL_OPTIONS)} (sizes and timeouts belong to the pool)"
            )
        parsed: dict[str, Any] = {}
        try:
            if options.get("partitions") is not None:
                parsed["partitions"] = int(options["partitions"])
            for name in ("setup_timeout", "command_timeout"):
                if name in options:
                    parsed[name] = float(options[name])
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"bad option for an asyncpg pool: {exc}") from exc
        if options.get("schema"):
            parsed["schema"] = str(options["schema"])
        size = pool.get_max_size()
        return cls("", masked="asyncpg pool (caller's)", min_size=0, max_size=max(1, size),
                   pool=pool, **parsed)

    @property
    def owns_pool(self) -> bool:
        """Whether the store made its pool (and so closes it)."""
        return self._given is None

    # -- lifecycle ----------------------------------------------------------------------

    async def setup(self) -> None:
        """Open the pool and bring the schema up to date. Idempotent while open."""
        if not self._life.begin():
            return
        settings = {} if self.pooler is not None else server_settings(self.schema)
        if "application_name=" not in self._dsn:
            settings["application_name"] = "tierstore"
        try:
            if self._given is not None:
                made_on = getattr(self._given, "_loop", None)  # asyncpg binds a pool to one loop
                if made_on is not None and made_on is not asyncio.get_running_loop():
                    raise ConfigurationError(
                        f"postgres warm tier {self.url}: the pool was made on another event "
                        "loop; enter the saver with `async with` on the pool's loop"
                    )
                self._pool = self._given
            else:
                # asyncpg reads files to work out a connection's parameters: do it once, here
                connector = await asyncio.to_thread(resolve, self._dsn, settings)
                hook: dict[str, Any] = {} if connector is None else {"connect": connector}
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    **hook,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    command_timeout=self.command_timeout,
                    timeout=self.connect_timeout,
                    statement_cache_size=self.statement_cache_size,
                    server_settings=settings,
                    reset=_keep_session,
                )
            async with self._pool.acquire(timeout=self.connect_timeout) as conn:
                if self._given is not None:
                    await self._check_session(conn)
                if self.pooler_settings == "server":
                    await self._check_server_settings(conn)
                await migrate(conn, url=self.url, schema=self.schema,
                              setup_timeout=self.setup_timeout, partitions=self.partitions,
                              pooled=self.pooler is not None,
                              local_settings=self._local_settings())
        except BaseException as exc:
            pool, self._pool = self._pool, None
            if pool is not None and pool is not self._given:
                pool.terminate()
            self._life.failed()
            if isinstance(exc, Exception) and not isinstance(exc, TierstoreError):
                raise self._translate(exc, "setup") from exc
            raise
        self._life.opened()
        if self._life.is_closed:  # aclose() ran before the pool existed: close it here
            pool, self._pool = self._pool, None
            if pool is not None and pool is not self._given:
                pool.terminate()
            self._life.require("setup")

    async def _check_session(self, conn: Conn) -> None:
        """Refuse a caller's pool whose sessions would put the tables elsewhere or mangle
        the store's ``jsonb`` (a codec set by the pool's ``init``)."""
        if self.schema is not None:
            path = await conn.fetchval("SELECT current_setting('search_path')")
            first = str(path).split(",")[0].strip().strip('"')
            if first != self.schema:
                raise ConfigurationError(
                    f"postgres warm tier {self.url}: the pool's search_path is {path!r}, "
                    f"not schema {self.schema!r} first; make the pool with server_settings="
                    f"tierstore.tiers.postgres.server_settings({self.schema!r})"
                )
        sample = '{"a": 1}'
        try:
            back = await conn.fetchval("SELECT $1::jsonb::text", sample)
        except (asyncpg.DataError, TypeError, ValueError) as exc:
            back = exc
        if back != sample:
            raise ConfigurationError(
                f"postgres warm tier {self.url}: the pool's connections encode jsonb with a "
                "codec of their own (set_type_codec in the pool's init); the store sends "
                "jsonb as text: give it a pool without that codec"
            )

    def session_settings(self) -> dict[str, str]:
        """What every statement of the store runs with (see the module's docstring)."""
        return server_settings(self.schema)

    def _local_settings(self) -> str | None:
        """With ``pooler``: the ``SET LOCAL`` statements each transaction starts with."""
        if self.pooler_settings != "transaction":
            return None
        settings = self.session_settings()
        # JIT off through its threshold: asyncpg, when it looks a type up, turns ``jit``
        # off for the session and back on only if it found it on; a ``SET LOCAL jit``
        # would make it leave the server connection's session with JIT off.
        del settings["jit"]
        settings["jit_above_cost"] = "-1"
        return "; ".join(f"SET LOCAL {name} = {value}" for name, value in settings.items())

    async def _check_server_settings(self, conn: Conn) -> None:
        """``pooler_settings=server``: refuse to open unless the server connection runs
        with the store's settings, naming the statements that would make it so."""
        row = await conn.fetchrow(
            "SELECT current_setting('search_path'), current_setting('enable_seqscan'), "
            "current_setting('jit'), current_setting('jit_above_cost')::float8, "
            "current_user, current_database()", timeout=self.setup_timeout)
        assert row is not None
        search_path, seqscan, jit, jit_above_cost, user, database = row
        wrong = []
        if self.schema is not None and _first_schema(search_path) != self.schema:
            wrong.append(f"search_path = {quote_ident(self.schema)}")
        if seqscan != "off":
            wrong.append("enable_seqscan = off")
        if jit != "off" and jit_above_cost >= 0:
            wrong.append("jit = off")
        if wrong:
            statements = "; ".join(f"ALTER ROLE {quote_ident(user)} IN DATABASE "
                                   f"{quote_ident(database)} SET {item}" for item in wrong)
            raise ConfigurationError(
                f"postgres warm tier {self.url}: pooler_settings=server, but the server "
                f"runs the store's sessions with search_path={search_path!r}, "
                f"enable_seqscan={seqscan}, jit={jit}; run {statements}; then let the "
                "pooler open new server connections (PgBouncer: RECONNECT), or drop "
                "pooler_settings to have every call set them")

    async def aclose(self) -> None:
        """Close the pool: wait for calls in flight (bounded), then cut what is left.

        A caller's pool is left open: only the releases this store started are awaited.
        """
        pool, self._pool = self._pool, None
        self._life.close()
        if pool is None:
            return
        await self._give_back(pool)
        if pool is self._given:
            if self._releasing:
                await asyncio.wait(set(self._releasing), timeout=self.command_timeout)
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self.command_timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None and getattr(self, "_given", None) is None:
            warnings.warn(f"{self!r} was never closed; call aclose()", ResourceWarning,
                          stacklevel=1)

    # -- the one place driver errors are translated ---------------------------------------

    def _translate(self, exc: BaseException, action: str) -> TierstoreError:
        where = f"postgres warm tier {self.url}"
        detail = _one_line(exc)
        if self._secret:
            detail = detail.replace(self._secret, "***")
        if self.pooler is None and _pooler_answered(exc):
            return ConfigurationError(
                f"{where}: {action} failed as behind a pooler in transaction mode "
                f"({detail}); add pooler=transaction to the URL (README: Behind PgBouncer)")
        if action == "setup" and isinstance(exc, (asyncpg.SyntaxOrAccessError,
                                                  asyncpg.DataError,
                                                  asyncpg.FeatureNotSupportedError)):
            # A refused startup parameter, schema name or missing privilege: the
            # URL or the server's configuration must change, retrying will not help.
            return ConfigurationError(f"{where}: setup refused ({detail})")
        if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
            return ConfigurationError(f"{where}: authentication failed ({detail})")
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            return ConfigurationError(f"{where}: {detail}; create the database first")
        if isinstance(exc, asyncpg.InsufficientPrivilegeError):
            return ConfigurationError(f"{where}: {action} not permitted ({detail})")
        if isinstance(exc, (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError,
                            asyncpg.InvalidSchemaNameError)):
            return ConfigurationError(
                f"{where}: the tierstore schema is missing ({detail}); run setup() first"
            )
        if isinstance(exc, asyncpg.ClientConfigurationError):
            return ConfigurationError(f"{where}: {detail}")
        if isinstance(exc, asyncpg.ProgramLimitExceededError):
            return PayloadTooLarge(f"{where}: {action} exceeds a PostgreSQL limit ({detail})")
        if isinstance(exc, (asyncpg.DataError, UnicodeError)):
            return InvalidInput(f"{where}: {action} refused the data ({detail})")
        if isinstance(exc, (TimeoutError, asyncpg.QueryCanceledError)):
            return TierUnavailable(f"{where}: {action} timed out", tier="warm",
                                   backend=self.backend)
        if isinstance(exc, asyncpg.InterfaceError) and self._life.is_closed:
            return LifecycleError(f"{where}: the store was closed during {action}")
        return TierUnavailable(f"{where}: {action} failed ({detail})", tier="warm",
                               backend=self.backend)

    def _require_pool(self, action: str) -> asyncpg.Pool[asyncpg.Record]:
        self._life.require(action)
        assert self._pool is not None  # opened only with a pool; aclose drops both at once
        return self._pool

    async def _run(self, action: str, body: Callable[[Conn], Awaitable[T]], *,
                   read: bool = False) -> T:
        """Run ``body`` on a pooled connection, translating every driver error.

        A connection that fails at the connection level (the server restarted, its
        backend was terminated, a failover cut the socket, or asyncpg found it still
        consuming a dead operation's error) is terminated rather than returned to the
        pool, and every other connection opened before the failure is expired: they
        point at the same server, so each is replaced at its next acquire instead of
        failing one call apiece. A read retries once on a fresh connection. A write
        retries once only when it never reached the server (no connection could be
        acquired, or the driver refused to start the statement), so a retry can never
        apply it twice; a write cut while it ran fails with ``TierUnavailable``, and
        whether it landed is for the caller to read back.
        """
        pool = self._require_pool(action)
        local = self._local_settings()
        if local is not None:
            body = _in_transaction(local, body)
        for attempt in range(2):
            acquired = False
            try:
                conn = self._take_kept()
                if conn is None:
                    self._waiting += 1
                    try:
                        conn = await pool.acquire(timeout=self.command_timeout)
                    finally:
                        self._waiting -= 1
                acquired = True
                try:
                    result = await body(conn)
                except BaseException as exc:
                    if _broken(exc):
                        _discard(conn)  # never hand a half-dead session to the next call
                    if isinstance(exc, asyncio.CancelledError | TimeoutError):
                        # asyncpg's release waits (up to command_timeout) for the server
                        # to confirm the statement's cancel: the caller must not
                        self._release_later(pool, conn)
                    else:
                        await pool.release(conn)
                    raise
                if not self._keep(pool, conn):
                    await pool.release(conn)
                return result
            except TierstoreError:
                raise
            except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                    OSError, UnicodeError) as exc:
                if not _broken(exc):
                    raise self._translate(exc, action) from exc
                await self._give_back(pool)  # opened before the failure, like the rest
                await pool.expire_connections()
                unsent = not acquired or _refused_before_sending(exc)
                if attempt == 0 and not isinstance(exc, TimeoutError) and (read or unsent):
                    continue
                raise self._translate(exc, action) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- connections kept between calls ------------------------------------------------
    #
    # A pool round (acquire, then release) costs more event-loop work than many a
    # statement it wraps: a task for the shielded release, two timeouts, an
    # inactivity timer armed and cancelled, a proxy and a future. A connection that
    # ends a call cleanly is kept instead, for the next call to take at once:
    #
    #     _run ─► _take_kept() ── a kept, open connection? ─► use it
    #               │ none                                      │ call succeeded
    #               ▼                                           ▼
    #             pool.acquire ─► use it ─► _keep(): nobody waiting, room, ── yes ─► kept
    #                                            open, idle?
    #                                                  │ no (or the call failed)
    #                                                  ▼
    #                                               pool.release (as before)
    #
    # While calls wait for the pool, every connection goes back to it: kept, it would
    # serve the calls that come next and leave the waiting ones waiting (up to the
    # whole pool's worth of calls behind them).
    # One connection of the pool is never kept, so other users of the pool (setup,
    # maintenance run by hand) always find one in it. A kept connection is still the
    # pool's: expiring the pool's connections, and closing the store, give every kept
    # one back first.

    def _take_kept(self) -> Conn | None:
        kept = self._kept
        while kept:
            conn = kept.pop()
            try:
                if not conn.is_closed():
                    return conn
                conn.terminate()  # finishes asyncpg's cleanup: the pool gets it back
            except asyncpg.InterfaceError:
                pass  # its loss gave it back to the pool already (the proxy is detached)
        return None

    def _keep(self, pool: asyncpg.Pool[asyncpg.Record], conn: Conn) -> bool:
        """Keep ``conn`` for the next call if it is as the pool would hand it out."""
        if (self._waiting or len(self._kept) >= self._keep_at_most or self._pool is not pool
                or conn.is_closed() or conn.is_in_transaction()):
            return False
        self._kept.append(conn)
        return True

    async def _give_back(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        """Return every kept connection to the pool (before it expires or closes them)."""
        kept, self._kept = self._kept, []
        for conn in kept:
            with contextlib.suppress(Exception):
                await pool.release(conn)

    def _release_later(self, pool: asyncpg.Pool[asyncpg.Record], conn: Conn) -> None:
        """Give ``conn`` back to the pool from a task of its own.

        The release of a connection whose statement was cancelled (or timed out) waits
        for the server to confirm the cancel, and terminates the connection when it does
        not within the pool's timeout; ``aclose`` waits for it like any other release.
        """
        task = asyncio.get_running_loop().create_task(_release_quietly(pool, conn))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)


# Server states that end every session of a server, not one statement: a shutdown,
# a crash restart, a server still starting up.
_SERVER_GONE = (asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
                asyncpg.CannotConnectNowError)


def _first_schema(search_path: str) -> str:
    """The first schema a ``search_path`` setting names, unquoted."""
    first = search_path.split(",", maxsplit=1)[0].strip() if search_path else ""
    if first.startswith('"') and first.endswith('"') and len(first) > 1:
        return first[1:-1].replace('""', '"')
    return first


def _pooler_answered(exc: BaseException) -> bool:
    """Whether ``exc`` is what a transaction pooler answers to a store that expects a
    session of its own: a named prepared statement missing from, or already on, the
    server connection this transaction got, or a startup parameter refused."""
    if isinstance(exc, (asyncpg.InvalidSQLStatementNameError,
                        asyncpg.DuplicatePreparedStatementError)):
        return "__asyncpg_" in str(exc)
    return (isinstance(exc, asyncpg.PostgresError)
            and "unsupported startup parameter" in str(exc))


def _in_transaction(local: str, body: Callable[[Conn], Awaitable[T]]
                    ) -> Callable[[Conn], Awaitable[T]]:
    """``body`` in a transaction that starts with the ``SET LOCAL`` statements ``local``.

    A statement's own failure rolls it back here. A cancelled or timed-out call, or a
    broken connection, leaves it to the connection's end: the connection is terminated
    (the server rolls back; a pooler drops that server connection), so the caller does
    not wait for the server to confirm a cancel before it may roll back.
    """

    async def run(conn: Conn) -> T:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(local)
            result = await body(conn)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError | TimeoutError) or _broken(exc):
                _discard(conn)
            else:
                await transaction.rollback()
            raise
        await transaction.commit()
        return result

    return run


def _broken(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection (not the statement) is gone or unusable.

    A statement's own failure (a constraint, a timeout that cancelled the query)
    leaves the session usable and is not a broken connection.
    """
    if isinstance(exc, TimeoutError):
        return False
    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                            asyncpg.InternalClientError, OSError, *_SERVER_GONE))


async def _release_quietly(pool: asyncpg.Pool[asyncpg.Record], conn: Conn) -> None:
    """Release ``conn``; asyncpg terminates a connection it cannot reset, so a failure
    here has nothing left to clean up and no caller to tell."""
    with contextlib.suppress(Exception):
        await pool.release(conn)


def _discard(conn: Conn) -> None:
    """Terminate a pooled connection, unless its loss already gave it back to the pool."""
    with contextlib.suppress(asyncpg.InterfaceError):  # the proxy is detached once released
        if not conn.is_closed():
            conn.terminate()


def _refused_before_sending(exc: BaseException) -> bool:
    """Whether the driver refused to start a statement, so nothing of it reached the server.

    asyncpg raises ``InternalClientError("cannot switch to state …")`` before writing
    a byte when the connection is still consuming an earlier operation's error (the
    server's FATAL arrived while the connection sat idle in the pool, and the socket's
    close has not been processed yet). Every write body is one statement or one
    transaction, so a body refused at any statement has committed nothing.
    """
    return (isinstance(exc, asyncpg.InternalClientError)
            and str(exc).startswith("cannot switch to state"))


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Return a connection to the pool as it is.

    asyncpg's default reset costs a round trip on every release (``RESET ALL``,
    ``UNLISTEN *``, …), doubling the round trips of a one-statement call. This
    store never changes session state (its transactions are rolled back by the
    pool when a call fails), so there is nothing to reset.
    """


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

