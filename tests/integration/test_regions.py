"""Residency: a thread's bytes only ever land in its own region's stores."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from tests.integration.rawbytes import disk_bytes, postgres_bytes, redis_bytes, s3_bytes
from tierstore import ConfigurationError, ResidencyError, TieredSaver
from tierstore.demo import build_agent
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion
from tierstore.policy import resolve_region

THREADS = {"eu": ["eu-alice", "eu-bob"], "us": ["us-carol", "us-dave"]}


def cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


def region_urls(root: Path) -> dict[str, dict[str, str | None]]:
    return {
        region: {"hot": "memory://", "warm": f"sqlite:///{root / region}/warm.db",
                 "cold": f"file://{root / region}/cold"}
        for region in THREADS
    }


def test_rules_are_a_table() -> None:
    rules = [("eu-*", "eu"), ("tenant:acme:*", "eu"), ("us-*", "us")]
    assert resolve_region("eu-1", rules, None) == "eu"
    assert resolve_region("tenant:acme:42", rules, None) == "eu"
    assert resolve_region("us-9", rules, "eu") == "us"
    assert resolve_region("asia-1", rules, None) is None
    assert resolve_region("asia-1", rules, "us") == "us"
    assert resolve_region("EU-1", rules, None) is None  # case-sensitive


async def test_mixed_workload_leaves_no_byte_in_the_other_region(tmp_path: Path) -> None:
    saver = TieredSaver.from_regions(
        region_urls(tmp_path), rules=[("eu-*", "eu"), ("us-*", "us")],
        offload_threshold=64 * 1024, hot_write_delay=0,
    )
    async with saver:
        app = build_agent().compile(checkpointer=saver)
        for threads in THREADS.values():
            for thread in threads:
                big = f"canary-of-{thread} " + os.urandom(60 * 1024).hex()  # offloaded
                await app.ainvoke({"messages": [HumanMessage(big)]}, cfg(thread))
                await app.ainvoke({"messages": [HumanMessage(f"remember {thread}-secret")]},
                                  cfg(thread))
        report = await HistoryDemotion(
            saver, TieringPolicy(archive_after=60, archive_idle_after=None)
        ).run_once(now=time.time() + 10 * 86400)
        assert report.checkpoints > 0 and report.errors == []
        for threads in THREADS.values():
            for thread in threads:
                state = await app.aget_state(cfg(thread))
                assert state.values["notes"] == [f"{thread}-secret"]
        # listing without a thread fans out over both regions, newest first
        listed = [t async for t in saver.alist(None)]
        ids = [t.config["configurable"]["checkpoint_id"] for t in listed]
        assert ids == sorted(ids, reverse=True)
        assert {t.config["configurable"]["thread_id"] for t in listed} == {
            t for threads in THREADS.values() for t in threads}
        assert len([t async for t in saver.alist(None, limit=3)]) == 3
    for region, threads in THREADS.items():
        stored = disk_bytes(tmp_path / region)
        for thread in threads:
            assert thread.encode() in stored  # sanity: the scan sees this region's data
        for other, foreign in THREADS.items():
            if other == region:
                continue
            for thread in foreign:
                assert thread.encode() not in stored, f"{thread} found in {region}"
                assert f"canary-of-{thread}".encode() not in stored


async def test_a_thread_without_a_region_is_refused_before_any_write(tmp_path: Path) -> None:
    async with TieredSaver.from_regions(region_urls(tmp_path),
                                        rules=[("eu-*", "eu"), ("us-*", "us")]) as saver:
        app = build_agent().compile(checkpointer=saver)
        with pytest.raises(ResidencyError, match="asia-1"):
            await app.ainvoke({"messages": [HumanMessage("hello")]}, cfg("asia-1"))
        with pytest.raises(ResidencyError):
            await saver.acopy_thread("eu-alice", "us-alice")
        assert [t async for t in saver.alist(None)] == []
    async with TieredSaver.from_regions(region_urls(tmp_path), rules=[("eu-*", "eu")],
                                        default_region="us") as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember home")]}, cfg("asia-1"))
    assert b"asia-1" in disk_bytes(tmp_path / "us")
    assert b"asia-1" not in disk_bytes(tmp_path / "eu")


def test_region_configuration_is_checked() -> None:
    urls = {"eu": {"warm": "sqlite:///x.db"}}
    with pytest.raises(ConfigurationError, match="unknown region"):
        TieredSaver.from_regions(urls, rules=[("us-*", "us")])
    with pytest.raises(ConfigurationError, match="default_region"):
        TieredSaver.from_regions(urls, default_region="us")
    with pytest.raises(ConfigurationError, match="warm URL"):
        TieredSaver.from_regions({"eu": {"hot": "memory://"}})
    with pytest.raises(ConfigurationError):
        TieredSaver.from_regions({})


async def test_residency_on_redis_postgres_and_s3(postgres_url: str, redis_url: str,
                                                  moto_endpoint: str) -> None:
    import uuid

    from tests.servers.redis import with_query

    run = uuid.uuid4().hex[:10]
    stores: dict[str, dict[str, str]] = {}
    urls: dict[str, dict[str, str | None]] = {}
    for region in THREADS:
        schema, prefix, bucket = f"r_{region}_{run}", f"res-{region}-{run}:", f"res-{region}-{run}"
        stores[region] = {"schema": schema, "prefix": prefix, "bucket": bucket}
        sep = "&" if "?" in postgres_url else "?"
        urls[region] = {
            "hot": with_query(redis_url, prefix=prefix),
            "warm": f"{postgres_url}{sep}schema={schema}",
            "cold": f"s3://{bucket}/cold?endpoint_url={moto_endpoint}&region=us-east-1",
        }
    saver = TieredSaver.from_regions(urls, rules=[("eu-*", "eu"), ("us-*", "us")],
                                     offload_threshold=16 * 1024, hot_write_delay=0)
    async with saver:
        app = build_agent().compile(checkpointer=saver)
        for threads in THREADS.values():
            for thread in threads:
                big = f"canary-of-{thread} " + os.urandom(16 * 1024).hex()  # offloaded to S3
                await app.ainvoke({"messages": [HumanMessage(big)]}, cfg(thread))
                await app.ainvoke({"messages": [HumanMessage(f"remember {thread}")]},
                                  cfg(thread))
        report = await HistoryDemotion(
            saver, TieringPolicy(archive_after=60, archive_idle_after=None)
        ).run_once(now=time.time() + 10 * 86400)
        assert report.checkpoints > 0 and report.errors == []
    for region, threads in THREADS.items():
        where = stores[region]
        scanned = {
            "postgres": await postgres_bytes(postgres_url, where["schema"]),
            "redis": await redis_bytes(redis_url, where["prefix"]),
            "s3": await s3_bytes(moto_endpoint, where["bucket"]),
        }
        for name, stored in scanned.items():
            assert stored, f"{region}/{name} holds nothing: the scan would prove nothing"
            if name != "s3":  # object keys are digests; segments are compressed
                assert any(t.encode() in stored for t in threads), f"{region}/{name}"
            for other, foreign in THREADS.items():
                if other == region:
                    continue
                for thread in foreign:
                    assert thread.encode() not in stored, f"{thread} found in {region}/{name}"
                    assert f"canary-of-{thread}".encode() not in stored
        # S3 bodies are compressed, but segment keys name their thread by digest
        from tierstore.codec.segment import thread_prefix

        for thread in threads:
            assert thread_prefix(thread).encode() in scanned["s3"]
        for other, foreign in THREADS.items():
            for thread in foreign if other != region else ():
                assert thread_prefix(thread).encode() not in scanned["s3"]
        assert b"offload/" in scanned["s3"]  # the large states landed in this region too
