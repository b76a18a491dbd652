"""Opening connections without touching the file system on the event loop.

asyncpg works out a connection's parameters each time it opens one, and that reads
files: without a password in the URL it looks for ``~/.pgpass`` (or ``passfile``,
``PGPASSFILE``), with ``service=`` it reads the service file, and for TLS (``prefer``,
the default over TCP, included) it builds an SSL context and probes
``~/.postgresql`` for ``root.crl``, ``postgresql.key`` and ``postgresql.crt``. The
pool opens connections on the event loop, whenever it grows or replaces one.

``resolve`` does that work once, in a worker thread, with asyncpg's own rules and in
asyncpg's order (URL, service file, environment, password file), and returns a
``Connector``: the pool's ``connect`` hook, which hands asyncpg every parameter
already worked out (hosts, user, database, the password even when there is none, the
SSL context), so that opening a connection reads nothing. ``sslmode=prefer`` and
``allow`` keep their meaning: the connector tries TLS then plain (``prefer``) or plain
then TLS (``allow``), on each new connection; with several hosts, every host is tried
in the first mode before any in the second.

Parsing a URL is asyncpg's internal ``_parse_connect_dsn_and_args``: on an asyncpg
whose parser is not the one expected, ``resolve`` returns ``None`` and the pool
connects as asyncpg does by itself.
"""

from __future__ import annotations

import ssl as ssl_module
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import asyncpg
from asyncpg import connect_utils

__all__ = ["Connector", "resolve"]

Attempt = ssl_module.SSLContext | bool


class Connector:
    """The pool's ``connect`` hook: asyncpg's connect with every parameter resolved."""

    def __init__(self, fixed: Mapping[str, Any], attempts: tuple[Attempt, ...]) -> None:
        self._fixed = dict(fixed)
        self.attempts = attempts

    async def __call__(self, *_dsn: object, **kwargs: Any) -> asyncpg.Connection[Any]:
        kwargs.pop("server_settings", None)  # resolved with the URL's own, in ``fixed``
        last = len(self.attempts) - 1
        for i, ssl in enumerate(self.attempts):
            try:
                conn: asyncpg.Connection[Any] = await asyncpg.connect(
                    **self._fixed, **kwargs, ssl=ssl)
                return conn
            except (ConnectionError, asyncpg.PostgresError):
                # a server refusing TLS (prefer) or plain connections (allow, hostssl)
                if i == last:
                    raise
        raise AssertionError("a connector makes at least one attempt")


def _password(value: str | None) -> Callable[[], str | Awaitable[str]]:
    """The password as a callable: asyncpg then reads no password file, even for None."""
    return cast(Callable[[], str], lambda: value)


def resolve(dsn: str, server_settings: Mapping[str, str]) -> Connector | None:
    """Work out ``dsn``'s connection parameters as asyncpg does; blocking, for a thread.

    Raises asyncpg's ``ClientConfigurationError`` for a URL asyncpg refuses.
    """
    parse = getattr(connect_utils, "_parse_connect_dsn_and_args", None)
    if parse is None:
        return None
    try:
        addrs, params = parse(
            dsn=dsn, host=None, port=None, user=None, password=None, passfile=None,
            database=None, ssl=None, service=None, servicefile=None, direct_tls=None,
            server_settings=dict(server_settings), target_session_attrs=None,
            krbsrvname=None, gsslib=None)
        hosts: list[str] = []
        ports: list[int] = []
        for addr in addrs:
            if isinstance(addr, str):  # a Unix socket's path, which names its port
                hosts.append(addr)
                ports.append(5432)
            else:
                hosts.append(addr[0])
                ports.append(int(addr[1]))
        fixed = {
            "host": hosts, "port": ports, "user": params.user,
            "password": _password(params.password), "database": params.database,
            "server_settings": params.server_settings,
            "target_session_attrs": params.target_session_attrs,
            "krbsrvname": params.krbsrvname, "gsslib": params.gsslib,
            "direct_tls": str(getattr(params.ssl_negotiation, "value", "")) == "direct",
        }
        context, mode = params.ssl, str(getattr(params.sslmode, "name", ""))
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, asyncpg.ClientConfigurationError):
            raise
        return None  # an asyncpg whose parser differs: it parses each connection itself
    if not isinstance(context, ssl_module.SSLContext):
        attempts: tuple[Attempt, ...] = (False,)
    elif mode == "prefer":
        attempts = (context, False)
    elif mode == "allow":
        attempts = (False, context)
    else:
        attempts = (context,)
    return Connector(fixed, attempts)
