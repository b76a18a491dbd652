"""Redis servers for the tests: the shared one, private ones, and a 3-node cluster.

- ``redis_url`` (session): ``TIERSTORE_TEST_REDIS_URL``, else 127.0.0.1:6379 if it
  answers PING, else a private ``redis-server`` started for the session.
- ``redis_cluster_url`` (session): ``TIERSTORE_TEST_REDIS_CLUSTER_URL``, else three
  private ``--cluster-enabled`` nodes joined with ``redis-cli --cluster create``.
- ``redis_servers`` (per test): a factory of private servers that a test may kill
  and restart; all of them are killed when the test ends.

Private servers listen on 127.0.0.1 only, keep nothing on disk and are bounded in
time: a server that does not answer within ``START_TIMEOUT`` fails the test.
``redis-server`` is installed with apt-get when it is missing and we are root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from tests.servers.apt import apt_install

START_TIMEOUT = 20.0
HOST = "127.0.0.1"


def ping(host: str, port: int, *, timeout: float = 0.5, tls: bool = False) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock = raw
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(raw)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, valid for a day: ``(cert.pem, key.pem)``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def free_port(*, with_bus: bool = False) -> int:
    """A free TCP port on 127.0.0.1; with ``with_bus`` also port + 10000 (cluster bus)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            apt_install("redis-server", installed=lambda: shutil.which(name) is not None)
        path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed and could not be installed "
                    "(apt-get install redis-server, or set TIERSTORE_TEST_REDIS_URL)")
    return path


def with_query(url: str, **params: str) -> str:
    """``url`` with query parameters added (replacing any of the same name)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return parts._replace(query=urlencode(query)).geturl()


class RedisServer:
    """One private ``redis-server`` on 127.0.0.1 that a test can kill and restart."""

    def __init__(self, directory: Path, *, port: int | None = None,
                 cluster: bool = False, tls: bool = False) -> None:
        self.directory = directory
        self.cluster = cluster
        self.tls: tuple[Path, Path] | None = self_signed(directory / "tls") if tls else None
        self.port = port or free_port(with_bus=cluster)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://{HOST}:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [binary("redis-server"), "--port", str(self.port), "--bind", HOST,
                "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                "--logfile", str(self.directory / f"redis-{self.port}.log")]
        if self.tls is not None:
            cert, key = self.tls
            args[2] = "0"  # no plain port
            args += ["--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                     "--tls-auth-clients", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes",
                     "--cluster-config-file", f"nodes-{self.port}.conf",
                     "--cluster-node-timeout", "3000"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not ping(HOST, self.port, tls=self.tls is not None):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log = self.directory / f"redis-{self.port}.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything cleanly."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    named = os.environ.get("TIERSTORE_TEST_REDIS_URL")
    if named:
        yield named
        return
    if ping(HOST, 6379):
        yield f"redis://{HOST}:6379/0"
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


def _cluster_ok(port: int) -> bool:
    try:
        out = subprocess.run([binary("redis-cli"), "-h", HOST, "-p", str(port), "cluster",
                              "info"], capture_output=True, timeout=5, check=False).stdout
    except subprocess.TimeoutExpired:
        return False
    return b"cluster_state:ok" in out


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    named = os.environ.get("TIERSTORE_TEST_REDIS_CLUSTER_URL")
    if named:
        yield named
        return
    directory = tmp_path_factory.mktemp("redis-cluster")
    nodes: list[RedisServer] = []
    try:
        for i in range(3):
            nodes.append(RedisServer(directory / f"node-{i}", cluster=True).start())
        create = subprocess.run(
            [binary("redis-cli"), "--cluster", "create",
             *(f"{HOST}:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60, check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout!r} "
                               f"{create.stderr!r}")
        deadline = time.monotonic() + START_TIMEOUT
        while not all(_cluster_ok(n.port) for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the private Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        seeds = ",".join(f"{HOST}:{n.port}" for n in nodes[1:])
        yield with_query(f"redis+cluster://{HOST}:{nodes[0].port}", seeds=seeds)
    finally:
        for node in nodes:
            node.kill()


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start private servers on demand; every one is killed when the test ends."""
    started: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{uuid.uuid4().hex[:8]}").start()
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(Exception):
            server.kill()


def unique_prefix() -> str:
    return f"tstest-{uuid.uuid4().hex[:12]}:"


def plain_client(url: str) -> Any:
    """A plain redis-py client for ``url`` (any tierstore Redis scheme), for bookkeeping."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    parts = urlsplit(url)
    if parts.scheme.endswith("+cluster"):
        return RedisCluster(host=parts.hostname or HOST, port=parts.port or 6379,
                            username=parts.username, password=parts.password,
                            ssl=parts.scheme.startswith("rediss"))
    scheme = "rediss" if parts.scheme == "rediss" else "redis"
    return Redis.from_url(parts._replace(query="", scheme=scheme).geturl())


def _pattern(prefix: str) -> str:
    escaped = "".join("\\" + c if c in "\\*?[]" else c for c in prefix)
    return escaped + "*"


async def purge(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (on every primary of a cluster); returns the count."""
    client = plain_client(url)
    deleted = 0
    try:
        async for key in client.scan_iter(match=_pattern(prefix), count=500):
            deleted += await client.delete(key)
    finally:
        await client.aclose()
    return deleted


async def keys_under(url: str, prefix: str) -> list[bytes]:
    """The keys under ``prefix`` (single server or every primary of a cluster)."""
    client = plain_client(url)
    try:
        return [k async for k in client.scan_iter(match=_pattern(prefix), count=500)]
    finally:
        await client.aclose()
