"""The Redis hot tier reports the memory its keys hold (``tierstore status --cost``):
only keys under its prefix, every page of a SCAN, every primary of a cluster."""

from __future__ import annotations

import pytest

from tests.builders import cached_write as w
from tests.builders import entry
from tests.servers.redis import plain_client, purge, unique_prefix, with_query
from tierstore.settings import StoreUrl
from tierstore.tiers.redis import RedisHot, RedisHotSettings

GENEROUS = {"timeout": "5", "socket_timeout": "2", "connect_timeout": "2"}


def make(url: str, prefix: str) -> RedisHot:
    query = {**GENEROUS, "prefix": prefix}
    return RedisHot(RedisHotSettings.from_url(StoreUrl.parse(with_query(url, **query)),
                                              ttl=60))


async def memory_of(url: str, prefix: str) -> tuple[int, int]:
    """Keys under ``prefix`` and their MEMORY USAGE, asked key by key."""
    client = plain_client(url)
    keys = size = 0
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=100):
            keys += 1
            size += int(await client.memory_usage(key) or 0)
    finally:
        await client.aclose()
    return keys, size


@pytest.mark.parametrize("which", ["plain", "cluster"])
async def test_usage_counts_every_key_under_the_prefix_and_no_other(
        which: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url" if which == "plain" else "redis_cluster_url")
    prefix, neighbour = unique_prefix(), unique_prefix()
    store, other = make(url, prefix), make(url, neighbour)
    await store.setup()
    await other.setup()
    try:
        assert (await store.usage()).objects == 0
        # 1,200 threads: more than one SCAN page, on every node of a cluster
        for i in range(1200):
            await store.put(entry(f"thread-{i}", "1", writes=(w("t", 0),)))
        await other.put(entry("someone-else", "1"))
        await store.acquire_lease("thread-0", "me", 60)
        usage = await store.usage()
        keys, size = await memory_of(url, prefix)
        # an entry and a namespace set per thread, and one lease
        assert (usage.checkpoints, usage.objects) == (1200, 2 * 1200 + 1) == (1200, keys)
        assert usage.bytes == size > 0
    finally:
        await store.aclose()
        await other.aclose()
        await purge(url, prefix)
        await purge(url, neighbour)


async def test_a_prefix_with_glob_characters_matches_only_itself(redis_url: str) -> None:
    base = unique_prefix()
    prefix, lookalike = f"{base}[a]*:", f"{base}a-:"
    store, other = make(redis_url, prefix), make(redis_url, lookalike)
    await store.setup()
    await other.setup()
    try:
        await store.put(entry("mine", "1"))
        await other.put(entry("theirs", "1"))
        await other.put(entry("theirs-too", "1"))
        assert (await store.usage()).checkpoints == 1
    finally:
        await store.aclose()
        await other.aclose()
        await purge(redis_url, base)
