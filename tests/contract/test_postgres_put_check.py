"""PostgreSQL's check that a put names only channel versions warm holds, path by path.

tierstore_put_checkpoint answers from the live parent first, then the new blobs, then
blob rows, and only then the namespace's other live checkpoints (0007). Each test
makes one of those the only holder of a version, so every path is taken on its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest

from tests.builders import cid, record
from tests.servers.postgres import with_query
from tierstore.codec.pipeline import EMPTY
from tierstore.errors import MissingBlobs
from tierstore.records import BlobRecord, Payload
from tierstore.settings import StoreUrl
from tierstore.tiers.postgres import PostgresWarm


@pytest.fixture
async def warm(postgres_url: str) -> AsyncIterator[PostgresWarm]:
    url = with_query(postgres_url, schema=f"t_{uuid.uuid4().hex[:10]}")
    store = PostgresWarm.from_url(StoreUrl.parse(url))
    await store.setup()
    try:
        yield store
    finally:
        await store.aclose()


def value(channel: str, version: str) -> BlobRecord:
    return BlobRecord(channel, version, Payload("msgpack", f"{channel}{version}".encode()))


async def archive(warm: PostgresWarm, thread: str, *ns: int) -> None:
    now = time.time()
    await warm.claim(owner="me", now=now, lease_seconds=60, limit=1000, idle_before=now + 1,
                     thread_id=thread)
    assert await warm.mark_archived(thread, "", [cid(n) for n in ns], archive_key="seg",
                                    owner="me", now=now) == len(ns)
    await warm.release(thread, "", owner="me")


async def test_unchanged_channels_are_held_by_the_live_parent(warm: PostgresWarm) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1, versions={"a": "1", "e": "1"}),
                              [value("a", "1"), BlobRecord("e", "1", EMPTY)], strict=False)
    # the empty channel has no row: only the parent names it
    result = await warm.put_checkpoint(record(t, 2, parent=1, versions={"a": "1", "e": "1"}),
                                       [], strict=False)
    assert result.head.checkpoint_id == cid(2)


async def test_a_blob_row_holds_a_version_an_archived_parent_named(warm: PostgresWarm) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1, versions={"a": "1"}), [value("a", "1")],
                              strict=False)
    await warm.put_checkpoint(record(t, 2, parent=1, versions={"a": "1", "b": "2"}),
                              [value("b", "2")], strict=False)
    await archive(warm, t, 1)  # cid(2) is live and names a:1, so its row stays
    fork = record(t, 3, parent=1, versions={"a": "1", "c": "3"})
    await warm.put_checkpoint(fork, [value("c", "3")], strict=False)
    got = await warm.get(t, "", cid(3))
    assert got is not None and got.blobs["a"].data == b"a1" and got.missing == ()


async def test_an_empty_channel_named_by_another_live_checkpoint_is_held(
    warm: PostgresWarm,
) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1, versions={"a": "1"}), [value("a", "1")],
                              strict=False)
    await warm.put_checkpoint(record(t, 2, parent=1, versions={"a": "1", "e": "2"}),
                              [BlobRecord("e", "2", EMPTY)], strict=False)
    # a fork of cid(1) naming the empty version only cid(2) names (no row, not the parent)
    await warm.put_checkpoint(record(t, 3, parent=1, versions={"a": "1", "e": "2"}), [],
                              strict=False)
    # and a checkpoint with no parent at all
    await warm.put_checkpoint(record(t, 4, versions={"e": "2"}), [], strict=False)
    head = await warm.head(t, "")
    assert head is not None and head.checkpoint_id == cid(4)


async def test_versions_no_tier_holds_are_refused_together(warm: PostgresWarm) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1, versions={"a": "1", "e": "1", "k": "1"}),
                              [value("a", "1"), BlobRecord("e", "1", EMPTY), value("k", "1")],
                              strict=False)
    await warm.put_checkpoint(record(t, 2, parent=1, versions={"k": "1"}), [], strict=False)
    await archive(warm, t, 1)  # a:1 and e:1 are gone; k:1 is still named by cid(2)
    child = record(t, 3, parent=1, versions={"a": "1", "e": "1", "k": "1", "n": "3"})
    with pytest.raises(MissingBlobs) as refused:
        await warm.put_checkpoint(child, [value("n", "3")], strict=False)
    assert sorted(refused.value.missing) == [("a", "1"), ("e", "1")]
    assert await warm.get(t, "", cid(3)) is None
    # a checkpoint rewritten in place does not hold its own versions
    again = record(t, 2, parent=1, versions={"a": "1", "k": "1"})
    with pytest.raises(MissingBlobs) as refused_again:
        await warm.put_checkpoint(again, [], strict=False)
    assert refused_again.value.missing == (("a", "1"),)
