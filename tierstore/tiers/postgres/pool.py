"""The connection pool, the store's lifecycle, and the one place driver errors are translated.

URL options (removed before the URL reaches asyncpg; the rest, e.g. ``sslmode``,
is asyncpg's): ``min_size=1``, ``max_size=10`` (pool size), ``command_timeout=30``
(seconds a statement or a wait for a pooled connection may take),
``connect_timeout=10``, ``setup_timeout=300`` (migrations), ``schema=NAME`` (tables
live in this schema, created if missing), ``statement_cache_size=100`` (0 behind a
transaction-pooling PgBouncer; run ``setup()`` once against the server itself, as
migrations hold a session-level advisory lock), ``partitions=N`` (2..64: the
checkpoint, blob and write tables are hash-partitioned by thread into N when the
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
instead (about twice the pages of that pass). Behind PgBouncer, list ``jit`` and
``enable_seqscan`` in ``ignore_startup_parameters``: both settings are then lost;
``statement_cache_size=0`` still plans each statement sent for its own call, but the
statements inside the store's functions keep their plans until the next ``ANALYZE``.
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
from tierstore.tiers.postgres.migrations import migrate
from tierstore.tiers.postgres.partitions import check_count
from tierstore.tiers.postgres.sql import Conn, quote_ident

T = TypeVar("T")

_OPTIONS: Final = frozenset({
    "min_size", "max_size", "command_timeout", "connect_timeout", "setup_timeout", "schema",
    "statement_cache_size", "partitions",
})


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
        statement_cache_size: int = 100,
        partitions: int | None = None,
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
        if statement_cache_size < 0:
            raise ConfigurationError("postgres statement_cache_size cannot be negative")
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
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._life = Lifecycle(f"postgres warm tier {self.url}", closed_hint="build a new store")
        self._releasing: set[asyncio.Task[None]] = set()
        # Connections kept between calls (see ``_keep``), newest last.
        self._kept: list[Conn] = []
        self._keep_at_most = max_size - 1
        self._waiting = 0  # calls waiting for the pool: a connection that ends a call is theirs

    def __repr__(self) -> str:
        return f"PostgresWarm({self.url!r}, state={self._life.state!r})"

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
        if options.get("schema"):
            parsed["schema"] = str(options["schema"])
        parts = urlsplit(url.raw)
        kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                if k not in _OPTIONS]
        dsn = urlunsplit(parts._replace(query=urlencode(kept)))
        return cls(dsn, masked=url.masked, **parsed)

    # -- lifecycle ----------------------------------------------------------------------

    async def setup(self) -> None:
        """Open the pool and bring the schema up to date. Idempotent while open."""
        if not self._life.begin():
            return
        settings = {
            "jit": "off",  # planning JIT costs more than these short statements
            # Plans that stay key probes whatever the tables' statistics say (see above).
            "enable_seqscan": "off",
        }
        if "application_name=" not in self._dsn:
            settings["application_name"] = "tierstore"
        if self.schema is not None:
            settings["search_path"] = quote_ident(self.schema)
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                command_timeout=self.command_timeout,
                timeout=self.connect_timeout,
                statement_cache_size=self.statement_cache_size,
                server_settings=settings,
                reset=_keep_session,
            )
            async with self._pool.acquire(timeout=self.connect_timeout) as conn:
                await migrate(conn, url=self.url, schema=self.schema,
                              setup_timeout=self.setup_timeout, partitions=self.partitions)
        except BaseException as exc:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.terminate()
            self._life.failed()
            if isinstance(exc, Exception) and not isinstance(exc, TierstoreError):
                raise self._translate(exc, "setup") from exc
            raise
        self._life.opened()
        if self._life.is_closed:  # aclose() ran before the pool existed: close it here
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.terminate()
            self._life.require("setup")

    async def aclose(self) -> None:
        """Close the pool: wait for calls in flight (bounded), then cut what is left."""
        pool, self._pool = self._pool, None
        self._life.close()
        if pool is None:
            return
        await self._give_back(pool)
        try:
            await asyncio.wait_for(pool.close(), timeout=self.command_timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            warnings.warn(f"{self!r} was never closed; call aclose()", ResourceWarning,
                          stacklevel=1)

    # -- the one place driver errors are translated ---------------------------------------

    def _translate(self, exc: BaseException, action: str) -> TierstoreError:
        where = f"postgres warm tier {self.url}"
        detail = _one_line(exc)
        if self._secret:
            detail = detail.replace(self._secret, "***")
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

