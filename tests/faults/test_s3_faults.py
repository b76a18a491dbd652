"""The S3 store when the endpoint misbehaves: every failure leaves as a tierstore error.

Three kinds of bad endpoint, all on 127.0.0.1:
- a port nobody listens on, and one that accepts and never answers;
- a stub speaking S3's error dialect (AccessDenied, SlowDown, …) or no S3 at all;
- a TCP proxy in front of moto that cuts or stalls one connection mid-upload, to
  prove that a failed or cancelled multipart upload is aborted, or stalls the whole
  link, to prove that every request ends within the store's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web
from botocore.exceptions import BotoCoreError, ClientError

from tests.servers.proxy import TcpProxy
from tests.servers.s3 import s3_url
from tierstore.errors import (
    ConfigurationError,
    CorruptPayload,
    TierstoreError,
    TierUnavailable,
)
from tierstore.settings import StoreUrl
from tierstore.tiers.s3 import S3Store, request_deadline

# A guard against hanging, not a speed claim: every case fails within a few seconds.
HANG_GUARD = 60.0
FAST = {"connect_timeout": "0.5", "read_timeout": "0.5", "max_attempts": "1"}


def store_at(endpoint: str, **options: str) -> S3Store:
    url = f"s3://tierstore-faults/p?endpoint_url={endpoint}&region=us-east-1"
    for name, value in {**FAST, **options}.items():
        url += f"&{name}={value}"
    return S3Store.from_url(StoreUrl.parse(url))


async def refused(action: Awaitable[Any], kind: type[TierstoreError]) -> TierstoreError:
    """Await ``action``; it must raise ``kind`` chained to a driver error."""
    with pytest.raises(kind) as caught:
        await asyncio.wait_for(action, HANG_GUARD)
    error = caught.value
    assert isinstance(error.__cause__, BotoCoreError | ClientError | aiohttp.ClientError | OSError
                                        | TimeoutError), (
        f"{error!r} is not chained to the driver error"
    )
    return error


# -- no answer ---------------------------------------------------------------------------


async def test_a_port_nobody_listens_on_is_unavailable() -> None:
    with socket.socket() as held:  # bound but not listening: connections are refused
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        store = store_at(f"http://127.0.0.1:{port}")
        error = await refused(store.setup(), TierUnavailable)
    assert f"127.0.0.1:{port}" in str(error)
    assert store.state == "unopened"
    await store.aclose()


async def test_an_endpoint_that_drops_connection_attempts_times_out() -> None:
    # A listener whose accept queue is full: Linux drops further SYNs, so the
    # connection attempt hangs as it would against a firewalled host.
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        store = store_at(f"http://127.0.0.1:{port}")
        error = await refused(store.setup(), TierUnavailable)
    assert "timeout" in str(error).lower()
    await store.aclose()


async def test_an_endpoint_that_never_answers_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        store = store_at(f"http://127.0.0.1:{port}")
        error = await refused(store.setup(), TierUnavailable)
        assert "Timeout" in str(error) or "timed out" in str(error)
        await store.aclose()
    finally:
        server.close()
        await server.wait_closed()


# -- a stub that speaks S3's error dialect -----------------------------------------------

Rule = Callable[[web.Request], Awaitable[web.StreamResponse]]


def s3_error(status: int, code: str, message: str = "stub") -> Rule:
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.method == "HEAD":  # HEAD answers carry no body: the code is the status
            return web.Response(status=status)
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{message}</Message><RequestId>1</RequestId></Error>")
        return web.Response(status=status, body=body.encode(), content_type="application/xml")
    return answer


async def ok(request: web.Request) -> web.StreamResponse:
    await request.read()
    return web.Response(status=200)


class Stub:
    """An HTTP server whose answers a test picks per method; it counts requests."""

    def __init__(self) -> None:
        self.rules: dict[str, Rule] = {}
        self.seen: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(f"{request.method} {request.path}")
        rule = self.rules.get(request.method) or self.rules.get("*") or ok
        return await rule(request)


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    stub = Stub()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stub.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    stub.url = f"http://127.0.0.1:{port}"
    yield stub
    await runner.cleanup()


@pytest.fixture
async def stub_store(stub: Stub) -> AsyncIterator[S3Store]:
    """A store set up against the stub (HeadBucket answered 200)."""
    store = store_at(stub.url)
    await store.setup()
    yield store
    await store.aclose()


async def test_access_denied_at_setup_is_unavailable_with_a_clear_message(stub: Stub) -> None:
    stub.rules["*"] = s3_error(403, "AccessDenied")
    store = store_at(stub.url)
    error = await refused(store.setup(), TierUnavailable)
    assert "access denied" in str(error) and "policies" in str(error)
    await store.aclose()


async def test_access_denied_on_read_is_unavailable(stub: Stub, stub_store: S3Store) -> None:
    stub.rules["GET"] = s3_error(403, "AccessDenied", "no s3:GetObject")
    error = await refused(stub_store.get("k"), TierUnavailable)
    assert "AccessDenied" in str(error) and "no s3:GetObject" in str(error)


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch"])
async def test_rejected_credentials_are_a_configuration_error(
        stub: Stub, stub_store: S3Store, code: str) -> None:
    stub.rules["PUT"] = s3_error(403, code)
    error = await refused(stub_store.put("k", b"v"), ConfigurationError)
    assert code in str(error) and "credentials" in str(error)


async def test_a_throttled_request_is_retried_then_unavailable(stub: Stub) -> None:
    store = store_at(stub.url, max_attempts="3")
    await store.setup()
    try:
        stub.rules["GET"] = s3_error(503, "SlowDown", "reduce your request rate")
        before = len(stub.seen)
        error = await refused(store.get("k"), TierUnavailable)
        assert "SlowDown" in str(error)
        assert len(stub.seen) - before == 3  # max_attempts is honoured
    finally:
        await store.aclose()


async def test_a_server_error_is_unavailable(stub: Stub, stub_store: S3Store) -> None:
    stub.rules["DELETE"] = s3_error(500, "InternalError")
    stub.rules["POST"] = s3_error(500, "InternalError")
    await refused(stub_store.delete(["a", "b"]), TierUnavailable)


async def test_a_damaged_upload_is_a_corrupt_payload(stub: Stub, stub_store: S3Store) -> None:
    stub.rules["PUT"] = s3_error(400, "BadDigest")
    await refused(stub_store.put("k", b"v"), CorruptPayload)


async def test_a_truncated_read_is_unavailable(stub: Stub, stub_store: S3Store) -> None:
    async def short(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"only a part")
        assert request.transport is not None
        request.transport.close()
        return response

    stub.rules["GET"] = short
    await refused(stub_store.get("k"), TierUnavailable)


async def test_partial_delete_failures_are_reported(stub: Stub, stub_store: S3Store) -> None:
    async def partial(request: web.Request) -> web.StreamResponse:
        await request.read()
        body = ('<?xml version="1.0" encoding="UTF-8"?><DeleteResult><Error><Key>p/a</Key>'
                "<Code>AccessDenied</Code><Message>denied</Message></Error></DeleteResult>")
        return web.Response(status=200, body=body.encode(), content_type="application/xml")

    stub.rules["POST"] = partial
    with pytest.raises(TierUnavailable, match=r"1 of 2 keys not deleted.*p/a"):
        await stub_store.delete(["a", "b"])


async def test_an_endpoint_that_is_not_s3_is_refused(stub: Stub) -> None:
    async def html(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=404, text="<html>nothing here</html>",
                            content_type="text/html")

    stub.rules["*"] = html
    store = store_at(stub.url)
    with pytest.raises(TierstoreError) as caught:
        await asyncio.wait_for(store.setup(), HANG_GUARD)
    assert isinstance(caught.value, TierUnavailable | ConfigurationError)
    assert "404" in str(caught.value)
    await store.aclose()


# -- multipart uploads that fail half-way --------------------------------------------------


@pytest.fixture
async def proxy_factory(
    moto_endpoint: str,
) -> AsyncIterator[Callable[..., Awaitable[TcpProxy]]]:
    """Proxies to moto that break connections carrying ``after`` bytes upstream.

    ``mode="cut"`` resets every such connection (aiohttp retries an idempotent request
    once on a fresh connection, so cutting only one would go unnoticed); ``mode="stall"``
    freezes the first one. Small requests (the abort) always pass.
    """
    host, port = moto_endpoint.removeprefix("http://").split(":")
    async with contextlib.AsyncExitStack() as stack:

        async def make(*, after: int, mode: Literal["cut", "stall"]) -> TcpProxy:
            proxy = await stack.enter_async_context(TcpProxy(host, int(port)))
            proxy.trip_after(after, mode, times=None if mode == "cut" else 1)
            return proxy

        yield make


async def no_uploads_left(client: Any, bucket: str, key: str) -> None:
    uploads = await client.list_multipart_uploads(Bucket=bucket)
    assert not uploads.get("Uploads"), f"multipart uploads left behind: {uploads['Uploads']}"
    listed = await client.list_objects_v2(Bucket=bucket, Prefix=key)
    assert not listed.get("Contents"), "a failed upload left an object"


def store_via(proxy: TcpProxy, moto_endpoint: str) -> S3Store:
    url = s3_url(moto_endpoint, prefix="mp/", read_timeout="5", max_attempts="1",
                 multipart_threshold="5MiB", part_size="5MiB")
    return S3Store.from_url(StoreUrl.parse(url.replace(moto_endpoint,
                                                       f"http://{proxy.address}")))


async def test_a_cut_multipart_upload_is_aborted(proxy_factory: Any, moto_endpoint: str,
                                                 s3_client: Any) -> None:
    proxy = await proxy_factory(after=2 * 1024 * 1024, mode="cut")
    store = store_via(proxy, moto_endpoint)
    await store.setup()
    try:
        await refused(store.put("segment", os.urandom(12 * 1024 * 1024)), TierUnavailable)
        assert proxy.tripped.is_set()
        await no_uploads_left(s3_client, store.bucket, "mp/segment")
        # Requests the proxy lets through still work.
        await store.put("segment", b"small")
        assert await store.get("segment") == b"small"
    finally:
        await store.aclose()


async def test_a_cancelled_multipart_upload_is_aborted(proxy_factory: Any, moto_endpoint: str,
                                                       s3_client: Any) -> None:
    proxy = await proxy_factory(after=2 * 1024 * 1024, mode="stall")
    store = store_via(proxy, moto_endpoint)
    await store.setup()
    try:
        upload = asyncio.create_task(store.put(f"k-{uuid.uuid4().hex}", os.urandom(11 << 20)))
        await asyncio.wait_for(proxy.tripped.wait(), HANG_GUARD)
        upload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await upload
        await no_uploads_left(s3_client, store.bucket, "mp/k-")
    finally:
        await store.aclose()


# -- a stalled link: every request ends within the store's deadline ------------------------


def stalling_store(proxy: TcpProxy, moto_endpoint: str, **options: str) -> S3Store:
    """Short timeouts, so the per-request deadline is a few seconds."""
    url = s3_url(moto_endpoint, prefix="st/", **{
        "connect_timeout": "0.5", "read_timeout": "2", "max_attempts": "2",
        "multipart_threshold": "5MiB", "part_size": "5MiB", **options})
    return S3Store.from_url(StoreUrl.parse(url.replace(moto_endpoint,
                                                       f"http://{proxy.address}")))


async def test_a_put_over_a_stalled_link_times_out(moto_endpoint: str) -> None:
    host, port = moto_endpoint.removeprefix("http://").split(":")
    async with TcpProxy(host, int(port)) as proxy:
        store = stalling_store(proxy, moto_endpoint)
        await store.setup()
        try:
            await store.put("before", b"b" * 1000)
            proxy.stall()
            error = await refused(store.put("small", b"s" * 1000), TierUnavailable)
            assert "timed out" in str(error)
            proxy.resume()
            await store.put("after", b"a" * 1000)
            assert await store.get("after") == b"a" * 1000
            assert await store.get("before") == b"b" * 1000
        finally:
            await store.aclose()


async def test_a_multipart_upload_over_a_stalled_link_times_out_and_is_aborted(
    moto_endpoint: str, s3_client: Any
) -> None:
    # The link stalls once the upload is created, so every part waits on it (parts go
    # out with ``Expect: 100-continue``, and the HTTP client waits for the ``100
    # Continue`` with no timeout of its own); it flows again for the abort.
    host, port = moto_endpoint.removeprefix("http://").split(":")
    async with TcpProxy(host, int(port)) as proxy:
        store = stalling_store(proxy, moto_endpoint)
        await store.setup()
        client = store._client
        create, abort = client.create_multipart_upload, client.abort_multipart_upload

        async def create_then_stall(**params: Any) -> Any:
            answer = await create(**params)
            proxy.stall()
            return answer

        async def resume_then_abort(**params: Any) -> Any:
            proxy.resume()
            return await abort(**params)

        client.create_multipart_upload = create_then_stall
        client.abort_multipart_upload = resume_then_abort
        try:
            error = await refused(store.put("big", os.urandom(11 << 20)), TierUnavailable)
            assert "timed out" in str(error)
            await no_uploads_left(s3_client, store.bucket, "st/big")
            client.create_multipart_upload = create
            data = os.urandom(11 << 20)
            await asyncio.wait_for(store.put("big", data), HANG_GUARD)
            assert await store.get("big") == data
        finally:
            proxy.resume()
            await store.aclose()


def test_the_deadline_covers_every_attempt_and_backoff() -> None:
    # 3 attempts x (2 s to connect + 20 s to read) + backoffs of 1 s and 2 s + 1 s
    assert request_deadline(connect_timeout=2, read_timeout=20, max_attempts=3) == 70
    assert request_deadline(connect_timeout=0.5, read_timeout=2, max_attempts=1) == 3.5


async def test_other_requests_over_a_stalled_link_time_out(moto_endpoint: str) -> None:
    host, port = moto_endpoint.removeprefix("http://").split(":")
    async with TcpProxy(host, int(port)) as proxy:
        store = stalling_store(proxy, moto_endpoint, read_timeout="1", max_attempts="1")
        await store.setup()
        try:
            await store.put("k", b"k")
            proxy.stall()
            await refused(store.info("k"), TierUnavailable)
            await refused(store.delete(["k"]), TierUnavailable)
            await refused(store.restore("k"), TierUnavailable)

            async def listed() -> list[str]:
                return [key async for key in store.iter_keys("")]

            await refused(listed(), TierUnavailable)
            proxy.resume()
            assert [key async for key in store.iter_keys("")] in (["k"], [])
        finally:
            await store.aclose()


async def test_reading_the_drivers_files_slowly_is_not_a_timed_out_request(
        stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setup first reads botocore's model files (local work, seconds on a loaded host);
    only the requests are held to the request deadline."""
    store = store_at(stub.url)
    loaded = S3Store._new_session

    def slowly(self: S3Store) -> Any:
        time.sleep(store.deadline + 0.5)  # a host busy with other work
        return loaded(self)

    monkeypatch.setattr(S3Store, "_new_session", slowly)
    await asyncio.wait_for(store.setup(), HANG_GUARD)
    try:
        assert store.state == "opened"
    finally:
        await store.aclose()


async def test_an_unparsable_aws_config_is_a_configuration_error(
        stub: Stub, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken config file is the operator's to fix, not an outage to retry."""
    config = tmp_path / "config"
    config.write_text("[default\nregion = us-east-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    store = store_at(stub.url)
    error = await refused(store.setup(), ConfigurationError)
    assert "not usable" in str(error)
    await store.aclose()
