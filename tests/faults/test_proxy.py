"""The fault-injecting proxy does what its docstring promises, in front of an echo server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.servers.proxy import TcpProxy

GUARD = 10.0  # a bound against hanging, not a speed claim


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        async with TcpProxy("127.0.0.1", server.sockets[0].getsockname()[1]) as started:
            yield started
    finally:
        server.close()
        await server.wait_closed()


async def connect(proxy: TcpProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), GUARD)


async def test_relays_both_ways_and_counts(proxy: TcpProxy) -> None:
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"hello") == b"hello"
    assert proxy.accepted == 1 and proxy.open == 1
    writer.close()


async def test_cut_resets_open_connections_and_accepts_new_ones(proxy: TcpProxy) -> None:
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"a") == b"a"
    assert proxy.cut() == 1
    with pytest.raises(ConnectionResetError):  # an RST, not an orderly end of stream
        await roundtrip(reader, writer, b"b")
    assert proxy.resets == 1 and proxy.open == 0
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"c") == b"c"
    writer.close()


async def test_refuse_resets_new_connections_until_accept(proxy: TcpProxy) -> None:
    proxy.refuse()
    reader, writer = await connect(proxy)
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await roundtrip(reader, writer, b"x")
    assert proxy.refused == 1 and proxy.accepted == 0
    proxy.accept()
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"y") == b"y"
    writer.close()


async def test_stall_holds_bytes_until_resume(proxy: TcpProxy) -> None:
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"1") == b"1"
    proxy.stall()
    writer.write(b"held")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), 0.3)
    proxy.resume()
    assert await asyncio.wait_for(reader.readexactly(4), GUARD) == b"held"
    writer.close()


async def test_trip_after_breaks_a_connection_past_a_byte_count(proxy: TcpProxy) -> None:
    proxy.trip_after(1000, "cut", times=1)
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"x" * 999) == b"x" * 999
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await roundtrip(reader, writer, b"over")
    assert proxy.tripped.is_set() and proxy.trips == 1
    reader, writer = await connect(proxy)  # ``times`` is spent: the next one passes
    assert await roundtrip(reader, writer, b"z" * 2000) == b"z" * 2000
    writer.close()


async def test_a_dead_upstream_resets_the_client(proxy: TcpProxy) -> None:
    proxy.target = ("127.0.0.1", 1)  # nothing listens on port 1
    reader, writer = await connect(proxy)
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await roundtrip(reader, writer, b"x")
    assert proxy.upstream_failures == 1
