"""Residency: a thread's bytes only ever land in its own region's stores."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

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


def all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


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
        stored = all_bytes(tmp_path / region)
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
    assert b"asia-1" in all_bytes(tmp_path / "us")
    assert b"asia-1" not in all_bytes(tmp_path / "eu")


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
