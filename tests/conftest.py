"""Shared fixtures. Server fixtures live in ``tests/servers/`` (one module per server).

Every server fixture follows one rule: use the server named by a
``TIERSTORE_TEST_*`` URL, else the one on its 127.0.0.1 default port, else start a
private one from installed binaries (installing them when running as root).
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.servers.postgres",
    "tests.servers.redis",
    "tests.servers.s3",
    "tests.servers.mongo",
    "tests.servers.pgbouncer",
]

# Tests must never talk to a real AWS account by accident.
for _var in [v for v in os.environ if v.startswith("AWS_")]:
    del os.environ[_var]
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"


@pytest.fixture
def embedded_urls(tmp_path: os.PathLike[str]) -> dict[str, str]:
    return {
        "hot": "memory://",
        "warm": f"sqlite:///{tmp_path}/warm.db",
        "cold": f"file://{tmp_path}/cold",
    }


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.integration.test_conformance import REPORTS

    if not REPORTS:
        return
    terminalreporter.section("LangGraph checkpoint conformance")
    for stack, (passed, failed) in sorted(REPORTS.items()):
        terminalreporter.write_line(
            f"conformance[{stack}]: {passed} passed, {failed} failed (8/8 capabilities)"
            if failed == 0 else f"conformance[{stack}]: {passed} passed, {failed} FAILED"
        )
