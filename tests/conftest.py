"""Shared fixtures. Server fixtures live in ``tests/servers/`` (one module per server).

Every server fixture follows one rule: use the server named by a
``TIERSTORE_TEST_*`` URL, else the one on its 127.0.0.1 default port, else start a
private one from installed binaries (installing them when running as root).
"""

from __future__ import annotations

import os
from typing import Any

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


CONFORMANCE: dict[str, tuple[int, int]] = {}
"""Conformance counts per stack, as reported (from test workers too)."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    if call.when == "call":
        from tests.integration.test_conformance import REPORTS

        report = outcome.get_result()
        while REPORTS:  # carried on the report, so the controlling process sees it
            stack, counts = REPORTS.popitem()
            report.user_properties.append(("conformance", (stack, *counts)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == "conformance" and isinstance(value, (tuple, list)):
            CONFORMANCE[str(value[0])] = (int(value[1]), int(value[2]))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not CONFORMANCE:
        return
    terminalreporter.section("LangGraph checkpoint conformance")
    for stack, (passed, failed) in sorted(CONFORMANCE.items()):
        terminalreporter.write_line(
            f"conformance[{stack}]: {passed} passed, {failed} failed (8/8 capabilities)"
            if failed == 0 else f"conformance[{stack}]: {passed} passed, {failed} FAILED"
        )
