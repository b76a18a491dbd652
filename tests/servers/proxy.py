"""A fault-injecting TCP proxy for tests: one backend-agnostic relay in front of any server.

The proxy listens on ``127.0.0.1`` (a free port) and relays bytes, unchanged and in
both directions, to ``host:port``. It knows nothing of the protocol, so it serves
Redis, PostgreSQL, MongoDB and HTTP (S3) alike: point the client at ``proxy.port``
instead of the server's port and break the link at will::

    async with TcpProxy("127.0.0.1", server_port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        ...
        proxy.cut()       # every open connection is reset (RST), as by a failover
        proxy.refuse()    # new connections are reset at once ...
        proxy.accept()    # ... until accepted again
        proxy.stall()     # bytes stop flowing both ways; connections stay open
        proxy.resume()    # held bytes flow again, in order
        proxy.trip_after(2 << 20, "cut")  # break connections that carry 2 MiB upstream

Faults, and what a client sees:

- ``cut()``: every connection open now is closed with ``SO_LINGER`` 0 on both sides,
  so the client and the server each get a TCP reset, not an orderly FIN. New
  connections are still accepted (a server that dropped its clients and is back).
- ``refuse()``: every new connection is accepted and reset at once, before any byte
  is relayed (the listening socket stays bound, so the port is never lost to another
  process). Open connections are not touched; call ``cut()`` as well for a full
  partition. ``accept()`` ends it.
- ``stall()``: nothing is relayed on any connection, new ones included; bytes are
  held, not dropped. The client sees a server that stopped answering (its socket or
  statement timeout fires). ``resume()`` relays what was held.
- ``trip_after(n, action)``: a connection whose client has sent ``n`` bytes in total
  is reset (``"cut"``) or frozen for good (``"stall"``) before those bytes are
  relayed; ``times`` bounds how many connections trip. ``tripped`` is set at the
  first trip.
- A server that is down (refused or failed upstream connect) makes the proxy reset
  the client's connection: the client sees the same error as without the proxy.

Counters (``accepted``, ``refused``, ``resets``, ``upstream_failures``, ``trips``) and
``open`` (connections relayed now) let a test check that a fault really met traffic.
``aclose()`` resets every connection and stops listening; it is idempotent. All
methods must be called from the event loop the proxy was started on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

Action = Literal["cut", "stall"]
CHUNK = 1 << 16
CONNECT_TIMEOUT = 10.0  # a bound against hanging on a black-holed upstream


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s socket with a TCP reset (RST) rather than an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One relayed connection: the client's side, the server's side, and its pumps."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    sent: int = 0  # bytes the client sent upstream
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closed: bool = False

    def __post_init__(self) -> None:
        self.flowing.set()


@dataclass
class _Trip:
    after: int
    action: Action
    times: int | None


class TcpProxy:
    """A TCP relay from ``127.0.0.1:<port>`` to ``host:port`` with faults on demand.

    See the module docstring for what each fault does to a client.
    """

    def __init__(self, host: str, port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self.listen_host = listen_host
        self.port = 0
        self.accepted = 0  # connections relayed (upstream connect succeeded)
        self.refused = 0  # connections reset by ``refuse()``
        self.resets = 0  # relayed connections reset by ``cut()``, a trip or ``aclose()``
        self.upstream_failures = 0  # connections reset because the server was unreachable
        self.trips = 0
        self.tripped = asyncio.Event()
        self._refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._trip: _Trip | None = None
        self._links: set[_Link] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> TcpProxy:
        """Start listening on a free port (``self.port``)."""
        if self._server is not None:
            raise RuntimeError("the proxy is already started")
        self._server = await asyncio.start_server(self._on_connect, self.listen_host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def aclose(self) -> None:
        """Stop listening and reset every connection; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), CONNECT_TIMEOUT)

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    @property
    def address(self) -> str:
        """``host:port`` where clients should connect."""
        return f"{self.listen_host}:{self.port}"

    @property
    def open(self) -> int:
        """Connections being relayed now."""
        return len(self._links)

    # -- faults ----------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every open connection (RST both ways); returns how many were reset."""
        links = list(self._links)
        for link in links:
            self._drop(link)
        return len(links)

    def refuse(self) -> None:
        """Reset every new connection at once, until ``accept()``."""
        self._refusing = True

    def accept(self) -> None:
        """Relay new connections again (after ``refuse()``)."""
        self._refusing = False

    def stall(self) -> None:
        """Hold every byte on every connection, new ones included, until ``resume()``."""
        self._flowing.clear()

    def resume(self) -> None:
        """Relay again what ``stall()`` held, in order."""
        self._flowing.set()

    def trip_after(self, after: int, action: Action = "cut", *, times: int | None = None) -> None:
        """Break each connection whose client has sent ``after`` bytes (at most ``times``)."""
        self._trip = _Trip(after, action, times)

    def clear_trip(self) -> None:
        self._trip = None

    # -- relaying --------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self._refusing or self._closed:
            self.refused += 1
            _reset(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._pending.add(task)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            self.upstream_failures += 1
            _reset(writer)
            return
        finally:
            self._pending.discard(task)
        if self._closed:
            _reset(writer)
            _reset(up_writer)
            return
        self.accepted += 1
        link = _Link(client=writer, server=up_writer)
        self._links.add(link)
        for source, sink, upstream in ((reader, up_writer, True), (up_reader, writer, False)):
            pump = asyncio.create_task(self._pump(link, source, sink, upstream=upstream))
            link.tasks.add(pump)
            pump.add_done_callback(link.tasks.discard)

    async def _pump(self, link: _Link, source: asyncio.StreamReader,
                    sink: asyncio.StreamWriter, *, upstream: bool) -> None:
        try:
            while data := await source.read(CHUNK):
                if upstream:
                    link.sent += len(data)
                    if self._tripped_by(link):
                        return
                await self._flowing.wait()
                await link.flowing.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            # one side reset: pass the reset on to the other side
            self._drop(link, counted=False)
            return
        # an orderly end on one side: half-close the other, close both once both ended
        with contextlib.suppress(OSError, RuntimeError):
            if sink.can_write_eof():
                sink.write_eof()
        if all(task.done() or task is asyncio.current_task() for task in link.tasks):
            self._forget(link)
            for writer in (link.client, link.server):
                writer.close()

    def _tripped_by(self, link: _Link) -> bool:
        trip = self._trip
        if trip is None or link.sent < trip.after or trip.times == 0:
            return False
        if trip.times is not None:
            trip.times -= 1
        self.trips += 1
        self.tripped.set()
        if trip.action == "stall":
            link.flowing.clear()
            return False  # the pump now waits on ``link.flowing`` for good
        self._drop(link)
        return True

    def _drop(self, link: _Link, *, counted: bool = True) -> None:
        """Reset both sides of ``link`` and stop its pumps."""
        if link.closed:
            return
        if counted:
            self.resets += 1
        self._forget(link)
        _reset(link.client)
        _reset(link.server)
        current = asyncio.current_task()
        for task in list(link.tasks):
            if task is not current:
                task.cancel()

    def _forget(self, link: _Link) -> None:
        link.closed = True
        self._links.discard(link)
