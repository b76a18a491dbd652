"""PgBouncer in transaction mode, in front of the test PostgreSQL server.

``pgbouncer`` (session scope) starts Debian's ``pgbouncer`` (installed with apt-get
when missing and running as root; the tests that need it are skipped, saying why,
only when it cannot be installed) on a free port, with ``pool_mode = transaction``,
a small ``default_pool_size`` so that clients share server connections, and no
``ignore_startup_parameters``: a store that sends a startup parameter PgBouncer does
not know is refused, as a stock PgBouncer refuses it.

``Bouncer.through(url)`` is ``url`` (a database of the test server) reached through
PgBouncer instead.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import pytest

from tests.servers.apt import apt_install
from tests.servers.postgres import free_port

POOL_SIZE = 3
"""Server connections per (database, user): fewer than the store's pool, on purpose."""


def _binary() -> str:
    """The pgbouncer executable, installing Debian's package if we may; skips if not."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("pgbouncer is not installed and installing it needs root "
                    "(apt-get install pgbouncer)")
    try:
        apt_install("pgbouncer", installed=lambda: bool(
            shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")))
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"pgbouncer could not be installed with apt-get: {exc}")
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if not found:
        pytest.skip("apt-get install pgbouncer left no pgbouncer executable behind")
    return found


class Bouncer:
    """One PgBouncer process in a temporary directory, in front of ``server``."""

    def __init__(self, server: str, *, pool_size: int = POOL_SIZE,
                 ignore_startup_parameters: str = "") -> None:
        self.binary = _binary()
        self.server = urlsplit(server)
        self.root = Path(tempfile.mkdtemp(prefix="tierstore-pgbouncer-"))
        self.port = free_port()
        self.log = self.root / "pgbouncer.log"
        user = unquote(self.server.username or "postgres")
        password = unquote(self.server.password or "")
        target = (f"host={self.server.hostname or '127.0.0.1'} "
                  f"port={self.server.port or 5432} user={user}"
                  + (f" password={password}" if password else ""))
        (self.root / "userlist.txt").write_text(f'"{user}" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = {target}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            "max_client_conn = 500\n"
            "max_db_connections = 0\n"
            f"ignore_startup_parameters = {ignore_startup_parameters}\n"
            f"logfile = {self.log}\n"
            f"pidfile = {self.root / 'pgbouncer.pid'}\n"
        )
        command = [self.binary, str(self.root / "pgbouncer.ini")]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            entry = pwd.getpwnam("postgres")
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            command = [*command[:1], "-u", "postgres", *command[1:]]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                pytest.fail(f"pgbouncer exited at start: {err.decode(errors='replace')} "
                            f"{self.log.read_text() if self.log.exists() else ''}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        self.stop()
        pytest.fail("pgbouncer did not listen within 30 s")

    def through(self, url: str) -> str:
        """``url`` (same server, any database and query) reached through PgBouncer."""
        parts = urlsplit(url)
        user = parts.username or "postgres"
        return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{self.port}"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pgbouncer(postgres_server: str) -> Iterator[Bouncer]:
    bouncer = Bouncer(postgres_server)
    try:
        yield bouncer
    finally:
        bouncer.stop()
