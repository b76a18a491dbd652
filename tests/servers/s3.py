"""Fixtures for the S3 server used by the tests: moto's server, run in this process.

moto's in-process ``mock_aws`` does not intercept aiobotocore's aiohttp transport,
so the tests talk HTTP to ``ThreadedMotoServer`` on a free 127.0.0.1 port. Set
``TIERSTORE_TEST_S3_ENDPOINT`` to use a moto server that is already running (the
restore fixture needs moto's state-manager API, so it must be moto); such a server is
shared by every test worker, and ``manual_restores`` changes it server-wide, so run
with ``-n 0`` then. Started here, each worker has a moto server of its own.

Restores finish at once on moto by default; ``manual_restores`` makes them pass
through "in-progress" for a few requests, so tests can see that state.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

RESTORE_MODEL = "s3::keyrestore"


def s3_url(endpoint: str, *, bucket: str | None = None, prefix: str = "", **options: str) -> str:
    """An ``s3://`` URL on the test server; a fresh bucket unless one is named."""
    bucket = bucket or f"tierstore-{uuid.uuid4().hex[:16]}"
    query = "&".join(f"{k}={v}" for k, v in {"endpoint_url": endpoint, "region": "us-east-1",
                                             **options}.items())
    return f"s3://{bucket}/{prefix}?{query}"


def _moto_api(endpoint: str, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{endpoint}/moto-api/state-manager/{path}",
        data=json.dumps(body).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert 200 <= response.status < 300, f"moto state manager answered {response.status}"


@contextmanager
def manual_restores(endpoint: str, *, times: int = 3) -> Iterator[None]:
    """Inside the block, a restore stays "in-progress" for ``times`` reads of its state.

    moto advances the restore each time the key's restore status is read (a HEAD or a
    GET counts), so a test sees "in-progress" only within its first ``times`` reads.
    The transition is server-wide: it is undone on exit so other tests see instant
    restores again.
    """
    _moto_api(endpoint, "set-transition",
              {"model_name": RESTORE_MODEL,
               "transition": {"progression": "manual", "times": times}})
    try:
        yield
    finally:
        _moto_api(endpoint, "unset-transition", {"model_name": RESTORE_MODEL})


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    named = os.environ.get("TIERSTORE_TEST_S3_ENDPOINT")
    if named:
        yield named.rstrip("/")
        return
    from moto.server import ThreadedMotoServer

    # One log line per request would drown the test output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_manual_restores(moto_endpoint: str) -> Iterator[None]:
    """The test runs with restores that pass through "in-progress" (see ``manual_restores``)."""
    with manual_restores(moto_endpoint):
        yield


@pytest.fixture
async def s3_client(moto_endpoint: str) -> AsyncIterator[Any]:
    """A raw aioboto3 client on the test server, to check what the store really wrote."""
    import aioboto3

    session = aioboto3.Session()
    async with session.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1") as c:
        yield c
