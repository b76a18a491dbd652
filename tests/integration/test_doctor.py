"""``tierstore doctor`` against real servers: a healthy stack passes, each fault is named."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.integration.test_cli import cli, js
from tests.servers.postgres import run_sql, scratch_database
from tests.servers.redis import RedisServer, free_port, plain_client
from tests.servers.s3 import s3_url

ROOT = Path(__file__).resolve().parents[2]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERSTORE_")}
    return {**env, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def database(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database (never migrated)."""
    with scratch_database(postgres_server, "tierstore_doctor") as url:
        yield url


def redis_config(url: str, **settings: str) -> None:
    async def run() -> None:
        client = plain_client(url)
        try:
            for name, value in settings.items():
                await client.config_set(name, value)
        finally:
            await client.aclose()

    asyncio.run(run())


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody here may write in (root included: immutable while the test runs)."""
    directory = tmp_path / "locked"
    directory.mkdir()
    if os.getuid() != 0:
        directory.chmod(0o500)
        yield directory
        directory.chmod(0o700)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no directory is unwritable")
    subprocess.run(["chattr", "+i", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def findings(data: dict[str, Any], **match: str) -> list[dict[str, str]]:
    return [f for f in data["findings"] if all(f[k] == v for k, v in match.items())]


def doctor(env: dict[str, str], check: int) -> dict[str, Any]:
    result = cli("doctor", "--json", env=env, check=check)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_a_healthy_stack_passes(
        redis_servers: Callable[[], RedisServer], database: str, moto_endpoint: str) -> None:
    redis = redis_servers()
    redis_config(redis.url, maxmemory="100mb", **{"maxmemory-policy": "allkeys-lru"})
    cold = s3_url(moto_endpoint)
    env = {**base_env(), "TIERSTORE_HOT_URL": redis.url, "TIERSTORE_WARM_URL": database,
           "TIERSTORE_COLD_URL": cold}
    js("migrate", env=env)
    data = doctor(env, check=0)
    assert data["ok"] is True
    assert [f for f in data["findings"] if f["status"] != "ok"] == []
    checks = {(f["tier"], f["backend"], f["check"]) for f in data["findings"]}
    assert checks == {
        ("hot", "redis", "reachable"), ("hot", "redis", "clock"), ("hot", "redis", "eviction"),
        ("warm", "postgres", "reachable"), ("warm", "postgres", "schema"),
        ("warm", "postgres", "clock"),
        ("cold", "s3", "reachable"), ("cold", "s3", "clock"), ("cold", "s3", "lifecycle"),
    }
    text = cli("doctor", env=env).stdout
    assert "nothing to fix" in text


def test_each_fault_is_named_with_its_fix(
        redis_servers: Callable[[], RedisServer], database: str, unwritable: Path,
        tmp_path: Path) -> None:
    redis = redis_servers()
    redis_config(redis.url, maxmemory="100mb", **{"maxmemory-policy": "noeviction"})
    env = {**base_env(), "TIERSTORE_HOT_URL": redis.url, "TIERSTORE_WARM_URL": database,
           "TIERSTORE_COLD_URL": f"file://{unwritable}"}
    data = doctor(env, check=1)
    assert data["ok"] is False
    [eviction] = findings(data, check="eviction")
    assert eviction["status"] == "fail"
    assert "noeviction" in eviction["detail"]
    assert "allkeys-lru" in eviction["fix"]
    [schema] = findings(data, tier="warm", check="schema")
    assert schema["status"] == "fail"
    assert "0 of" in schema["detail"]
    assert "tierstore migrate" in schema["fix"]
    [cold] = findings(data, tier="cold")
    assert (cold["check"], cold["status"]) == ("writable", "fail")
    assert str(unwritable) in cold["detail"]
    # a check changes nothing: the database is still not migrated
    assert not asyncio.run(_has_version_table(database))
    text = cli("doctor", env=env, check=1).stdout
    assert "FAIL default/hot eviction: CONFIG SET maxmemory-policy allkeys-lru" in text
    assert "3 to fix" in text


async def _has_version_table(url: str) -> bool:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return bool(await conn.fetchval(
            "SELECT to_regclass('tierstore_migrations') IS NOT NULL"))
    finally:
        await conn.close()


def test_unreachable_stores_fail(tmp_path: Path, postgres_server: str) -> None:
    dead = free_port()
    env = {**base_env(), "TIERSTORE_HOT_URL": f"redis://127.0.0.1:{dead}/0",
           "TIERSTORE_WARM_URL": f"postgresql://postgres@127.0.0.1:{dead}/x?connect_timeout=2",
           "TIERSTORE_COLD_URL": "none"}
    data = doctor(env, check=1)
    hot, warm = findings(data, tier="hot"), findings(data, tier="warm")
    assert [(f["check"], f["status"]) for f in hot] == [("reachable", "fail")]
    assert [(f["check"], f["status"]) for f in warm] == [("reachable", "fail")]
    assert "Connection" in hot[0]["detail"] or "refused" in hot[0]["detail"]
    assert findings(data, tier="cold") == [
        {"region": "default", "tier": "cold", "backend": "-", "check": "configured",
         "status": "ok", "detail": "no cold tier (disabled)", "fix": ""}]


def test_a_schema_behind_the_package_is_named(database: str) -> None:
    env = {**base_env(), "TIERSTORE_HOT_URL": "none", "TIERSTORE_WARM_URL": database,
           "TIERSTORE_COLD_URL": "none"}
    js("migrate", env=env)
    run_sql(database, "DELETE FROM tierstore_migrations WHERE version >= 9")
    [schema] = findings(doctor(env, check=1), check="schema")
    assert schema["status"] == "fail"
    assert "2 migrations pending (0009, 0010)" in schema["detail"]


def test_an_expiring_bucket_rule_and_a_missing_bucket(moto_endpoint: str,
                                                      tmp_path: Path) -> None:
    url = s3_url(moto_endpoint, prefix="archive/")
    bucket = url.split("/")[2]

    async def with_rule() -> None:
        import aioboto3

        async with aioboto3.Session().client("s3", endpoint_url=moto_endpoint,
                                             region_name="us-east-1") as s3:
            await s3.create_bucket(Bucket=bucket)
            await s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={
                "Rules": [{"ID": "tidy", "Status": "Enabled", "Filter": {"Prefix": ""},
                           "Expiration": {"Days": 30}}]})

    asyncio.run(with_rule())
    env = {**base_env(), "TIERSTORE_HOT_URL": "none",
           "TIERSTORE_WARM_URL": f"sqlite:///{tmp_path}/warm.db", "TIERSTORE_COLD_URL": url}
    data = doctor(env, check=1)
    [rule] = findings(data, tier="cold", check="lifecycle")
    assert rule["status"] == "fail"
    assert "'tidy' expires objects" in rule["detail"]
    missing = s3_url(moto_endpoint)
    env["TIERSTORE_COLD_URL"] = missing
    [reach] = findings(doctor(env, check=1), tier="cold")
    assert (reach["check"], reach["status"]) == ("reachable", "fail")
    assert "does not exist" in reach["detail"]


def test_sqlite_and_files_on_a_fresh_host(tmp_path: Path) -> None:
    env = {**base_env(), "TIERSTORE_HOT_URL": "memory://",
           "TIERSTORE_WARM_URL": f"sqlite:///{tmp_path}/new/warm.db",
           "TIERSTORE_COLD_URL": f"file://{tmp_path}/new/cold"}
    data = doctor(env, check=1)
    statuses = {(f["tier"], f["check"]): f["status"] for f in data["findings"]}
    assert statuses == {("hot", "reachable"): "ok", ("warm", "writable"): "warn",
                        ("warm", "schema"): "fail", ("cold", "writable"): "warn"}
    assert not (tmp_path / "new").exists()  # nothing was created
    js("migrate", env=env)
    data = doctor(env, check=0)
    assert {f["status"] for f in data["findings"]} == {"ok"}
