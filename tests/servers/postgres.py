"""PostgreSQL for the tests.

``postgres_url`` is a fresh database for the session, on the first server found:

1. the one named by ``TIERSTORE_TEST_POSTGRES_URL``;
2. else 127.0.0.1:5432 as user ``postgres`` (trust auth);
3. else a private cluster started from the installed binaries (``apt-get install
   postgresql`` first when running as root and none is installed).

``PrivateCluster`` is a throwaway server of our own, for tests that stop, restart or
freeze it; ``postgres_cluster`` yields one per test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from tests.servers.apt import apt_install

ENV_URL = "TIERSTORE_TEST_POSTGRES_URL"
LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query string."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _install_postgres() -> Path:
    """The binaries' directory, installing the distribution's package if we may."""
    bin_dir = _bin_dir()
    if bin_dir is not None:
        return bin_dir
    if os.geteuid() != 0:
        pytest.fail("no PostgreSQL server reachable and none installed; install postgresql "
                    f"or set {ENV_URL}")
    apt_install("postgresql", installed=lambda: _bin_dir() is not None)
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.fail("apt-get install postgresql left no initdb behind")
    return bin_dir


class PrivateCluster:
    """A PostgreSQL server in a temporary directory, on a free port, with trust auth."""

    def __init__(self) -> None:
        self.bin = _install_postgres()
        self.root = Path(tempfile.mkdtemp(prefix="tierstore-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        self.settings: dict[str, str] = {}
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8", "--locale=C")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)

    def start(self, **settings: str) -> None:
        """Start the server; ``settings`` are extra server settings (``-c name=value``),
        kept for later restarts."""
        self.settings.update(settings)
        extra = "".join(f" -c {name}={value}" for name, value in self.settings.items())
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
                   f"-c fsync=off -c max_connections=60{extra}")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def reload(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "reload")

    def require_password(self, role: str, password: str) -> str:
        """Add a login role that must give ``password`` over TCP; returns its URL."""
        run_sql(self.url, f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
        hba = self.data / "pg_hba.conf"
        rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
        hba.write_text(rule + hba.read_text())
        self.reload()
        return f"postgresql://{role}:{password}@127.0.0.1:{self.port}/postgres"

    def pids(self) -> list[int]:
        """The postmaster and every process it started."""
        postmaster = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        pids = [postmaster]
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(stat.split("/")[2]))
        return pids

    def freeze(self) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGCONT)

    def destroy(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.thaw()
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def run_sql(url: str, *statements: str) -> None:
    """Run statements on ``url`` from a thread of its own: fixtures may be set up
    while the test event loop is running, where ``asyncio.run`` is refused."""

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result(timeout=120)


def reachable(url: str) -> bool:
    try:
        run_sql(url, "SELECT 1")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    return True


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A URL of a server on which the tests may create databases."""
    url = os.environ.get(ENV_URL)
    if url:
        if not reachable(url):
            pytest.fail(f"{ENV_URL} is set but the server does not answer")
        yield url
        return
    if reachable(LOCAL_URL):
        yield LOCAL_URL
        return
    cluster = PrivateCluster()
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.destroy()


@contextlib.contextmanager
def scratch_database(server: str, prefix: str = "tierstore") -> Iterator[str]:
    """The URL of a new, empty database on ``server``, dropped on the way out."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    run_sql(server, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server, name)
    finally:
        run_sql(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A database of its own for this test session, dropped at the end."""
    with scratch_database(postgres_server) as url:
        yield url


@pytest.fixture(scope="module")
def postgres_cluster() -> Iterator[PrivateCluster]:
    """A throwaway server for tests that stop, restart or freeze it."""
    cluster = PrivateCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
