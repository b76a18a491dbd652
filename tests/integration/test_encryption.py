"""Encryption at rest: a canary in state and metadata appears in no tier's raw bytes."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from tests.integration.rawbytes import disk_bytes, postgres_bytes, redis_bytes, s3_bytes
from tests.servers.redis import unique_prefix, with_query
from tierstore import ConfigurationError, CorruptPayload, Keyring, TieredSaver
from tierstore.demo import build_agent
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import HistoryDemotion

CANARY = "CANARY-7f3a9c"


def saver_for(tmp_path: Path, keyring: Keyring | None, hot: str = "memory://",
              **options: Any) -> TieredSaver:
    return TieredSaver.from_urls(hot=hot, warm=f"sqlite:///{tmp_path}/warm.db",
                                 cold=f"file://{tmp_path}/cold", encryption=keyring,
                                 offload_threshold=8 * 1024, hot_write_delay=0, **options)


def cfg(thread: str, **extra: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread, **extra}}


async def run_workload(saver: TieredSaver) -> None:
    app = build_agent().compile(checkpointer=saver)
    config = cfg("vault", note=f"metadata {CANARY}")  # config scalars become metadata
    await app.ainvoke({"messages": [HumanMessage(f"remember {CANARY}")]}, config)
    big = f"{CANARY} " + os.urandom(20 * 1024).hex()  # offloaded to the object store
    await app.ainvoke({"messages": [HumanMessage(big)]}, config)
    await app.ainvoke({"messages": [HumanMessage("what do you remember")]}, config)
    report = await HistoryDemotion(saver, TieringPolicy(archive_after=60,
                                                        archive_idle_after=None)
                                   ).run_once(now=time.time() + 86400)
    assert report.checkpoints > 0  # segments in cold hold history too


async def test_canary_is_in_no_tier_when_encrypted(tmp_path: Path, redis_url: str) -> None:
    prefix = unique_prefix()
    hot = with_query(redis_url, prefix=prefix)
    keyring = Keyring(current="k1", keys={"k1": Keyring.generate_key()})
    async with saver_for(tmp_path, keyring, hot=hot) as saver:
        await run_workload(saver)
        app = build_agent().compile(checkpointer=saver)
        state = await app.aget_state(cfg("vault"))
        assert state.values["notes"] == [CANARY]
        # filters on a key that is not filterable still work, checked after decryption
        hits = [t async for t in saver.alist(cfg("vault"), filter={"note": f"metadata {CANARY}"})]
        assert hits and all(t.metadata["note"] == f"metadata {CANARY}" for t in hits)
        assert [t async for t in saver.alist(cfg("vault"), filter={"source": "input"})]
        cached = await redis_bytes(redis_url, prefix)
    assert cached  # the hot tier held entries
    stored = disk_bytes(tmp_path)
    assert b"vault" in stored  # thread ids are keys, not secrets
    for raw in (stored, cached):
        assert CANARY.encode() not in raw


def server_stack(postgres_url: str, redis_url: str, moto_endpoint: str
                 ) -> tuple[dict[str, str], dict[str, str]]:
    """URLs of a Redis + PostgreSQL + S3 stack in a schema, prefix and bucket of its own."""
    run = uuid.uuid4().hex[:10]
    where = {"schema": f"enc_{run}", "prefix": f"enc-{run}:", "bucket": f"enc-{run}"}
    sep = "&" if "?" in postgres_url else "?"
    urls = {
        "hot": with_query(redis_url, prefix=where["prefix"]),
        "warm": f"{postgres_url}{sep}schema={where['schema']}",
        "cold": f"s3://{where['bucket']}/cold?endpoint_url={moto_endpoint}&region=us-east-1",
    }
    return urls, where


async def scan_servers(postgres_url: str, redis_url: str, moto_endpoint: str,
                       where: dict[str, str]) -> dict[str, bytes]:
    return {
        "postgres": await postgres_bytes(postgres_url, where["schema"]),
        "redis": await redis_bytes(redis_url, where["prefix"]),
        "s3": await s3_bytes(moto_endpoint, where["bucket"]),
    }


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "control"])
async def test_canary_on_redis_postgres_and_s3(postgres_url: str, redis_url: str,
                                               moto_endpoint: str, encrypted: bool) -> None:
    urls, where = server_stack(postgres_url, redis_url, moto_endpoint)
    keyring = Keyring(current="k1", keys={"k1": Keyring.generate_key()}) if encrypted else None
    saver = TieredSaver.from_urls(**urls, encryption=keyring, offload_threshold=8 * 1024,
                                  hot_write_delay=0)
    async with saver:
        await run_workload(saver)
        state = await build_agent().compile(checkpointer=saver).aget_state(cfg("vault"))
        assert state.values["notes"] == [CANARY]
        stack = saver.regions.by_name["default"]
        assert stack.cold is not None
        kinds = {key.split("/", 1)[0] async for key in stack.cold.iter_keys("")}
        assert {"segments", "offload"} <= kinds, kinds  # archives and offloaded states
        scanned = await scan_servers(postgres_url, redis_url, moto_endpoint, where)
    for tier, raw in scanned.items():
        assert raw, f"{tier} holds nothing: the scan would prove nothing"
        if encrypted:
            assert CANARY.encode() not in raw, f"the canary is readable in {tier}"
    if not encrypted:  # the same scans do find it in clear: the test can fail
        assert CANARY.encode() in scanned["postgres"]
        assert CANARY.encode() in scanned["redis"]


async def mongo_bytes(target: Any) -> bytes:
    import bson

    out: list[bytes] = []
    async with target.inspect() as db:
        for name in await db.list_collection_names():
            async for doc in db[name].find({}):
                out.append(bson.encode(doc))
    return b"".join(out)


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "control"])
async def test_canary_on_mongodb_with_gridfs(mongo_db: Any, redis_url: str, moto_endpoint: str,
                                             encrypted: bool) -> None:
    from tierstore.tiers import open_store

    urls, where = server_stack("postgresql://unused", redis_url, moto_endpoint)
    keyring = Keyring(current="k1", keys={"k1": Keyring.generate_key()}) if encrypted else None
    # GridFS takes the large states here: the object store only holds archives
    saver = TieredSaver.from_stores(
        warm=mongo_db.store(offload_threshold=8 * 1024), hot=open_store("hot", urls["hot"],
                                                                     ttl=3600.0),
        cold=open_store("cold", urls["cold"]), encryption=keyring, hot_write_delay=0)
    async with saver:
        await run_workload(saver)
        state = await build_agent().compile(checkpointer=saver).aget_state(cfg("vault"))
        assert state.values["notes"] == [CANARY]
        scanned = {
            "mongodb": await mongo_bytes(mongo_db),
            "redis": await redis_bytes(redis_url, where["prefix"]),
            "s3": await s3_bytes(moto_endpoint, where["bucket"]),
        }
    assert b"gridfs" in scanned["mongodb"]  # a large state went to GridFS
    for tier, raw in scanned.items():
        assert raw, f"{tier} holds nothing: the scan would prove nothing"
        if encrypted:
            assert CANARY.encode() not in raw, f"the canary is readable in {tier}"
    if not encrypted:
        assert CANARY.encode() in scanned["mongodb"]


async def test_without_encryption_the_canary_is_visible(tmp_path: Path) -> None:
    # the same scan finds the canary when nothing is encrypted: the test can fail
    async with saver_for(tmp_path, None) as saver:
        await run_workload(saver)
    assert CANARY.encode() in disk_bytes(tmp_path)


async def test_wrong_key_or_missing_keyring_is_a_clear_error(tmp_path: Path) -> None:
    keyring = Keyring(current="k1", keys={"k1": Keyring.generate_key()})
    async with saver_for(tmp_path, keyring) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember x")]}, cfg("t"))
    wrong = Keyring(current="k1", keys={"k1": Keyring.generate_key()})
    async with saver_for(tmp_path, wrong) as saver:
        with pytest.raises(CorruptPayload, match="wrong key"):
            await saver.aget_tuple(cfg("t"))
    other_id = Keyring(current="k9", keys={"k9": Keyring.generate_key()})
    async with saver_for(tmp_path, other_id) as saver:
        with pytest.raises(ConfigurationError, match="'k1'"):
            await saver.aget_tuple(cfg("t"))
    async with saver_for(tmp_path, None) as saver:
        with pytest.raises(ConfigurationError, match="no keyring"):
            await saver.aget_tuple(cfg("t"))


async def test_key_rotation_keeps_old_payloads_readable(tmp_path: Path) -> None:
    k1, k2 = Keyring.generate_key(), Keyring.generate_key()
    async with saver_for(tmp_path, Keyring(current="k1", keys={"k1": k1})) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember old")]}, cfg("rot"))
    rotated = Keyring(current="k2", keys={"k1": k1, "k2": k2})
    async with saver_for(tmp_path, rotated) as saver:
        app = build_agent().compile(checkpointer=saver)
        out = await app.ainvoke({"messages": [HumanMessage("remember new")]}, cfg("rot"))
        assert out["notes"] == ["old", "new"]
    only_new = Keyring(current="k2", keys={"k2": k2}, provider=lambda kid: k1 if kid == "k1"
                       else None)
    async with saver_for(tmp_path, only_new) as saver:  # old key from a provider (a KMS)
        app = build_agent().compile(checkpointer=saver)
        assert (await app.aget_state(cfg("rot"))).values["notes"] == ["old", "new"]


def test_keyring_refuses_bad_keys() -> None:
    with pytest.raises(ConfigurationError, match="32 bytes"):
        Keyring(current="k", keys={"k": b"short"})
    with pytest.raises(ConfigurationError, match="no key"):
        Keyring(current="k", keys={})
    with pytest.raises(ConfigurationError, match="bad key id"):
        Keyring(current="a+b", keys={"a+b": Keyring.generate_key()})
    assert "keys" not in repr(Keyring(current="k", keys={"k": Keyring.generate_key()}))
