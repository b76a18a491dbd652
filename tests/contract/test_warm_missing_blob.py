"""A live checkpoint whose channel value is gone is flagged by the store (the router
then refuses it), and an empty channel is not mistaken for a lost one. A link of a delta
chain (``codec.chain``) is never empty, so a lost one is flagged on every backend,
PostgreSQL (which keeps no row for an empty channel) included."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from tests.builders import cid, record
from tierstore.codec.pipeline import EMPTY
from tierstore.records import BlobRecord, ListQuery, Payload

from .test_warm import collect


async def drop_blob(warm: Any, thread: str, channel: str) -> None:
    """Lose one stored value behind the store's back (a bug, a bad restore, a hand edit)."""
    if warm.backend == "sqlite":
        await warm._run(lambda conn: conn.execute(
            "DELETE FROM blobs WHERE thread_id = ? AND channel = ?", (thread, channel)))
    elif warm.backend == "mongodb":
        await warm._c("blobs").delete_many({"thread_id": thread, "channel": channel})
    else:
        pytest.skip("PostgreSQL stores no row for an empty channel: a missing row is "
                    "not evidence of loss (tierstore verify tells them apart)")


async def test_a_missing_channel_value_is_named_on_the_record(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    blobs = [BlobRecord("profile", "1", Payload("msgpack", b"vip")),
             BlobRecord("log", "1", Payload("msgpack", b"hi"))]
    await warm.put_checkpoint(record(t, 1, versions={"profile": "1", "log": "1"}), blobs,
                              strict=False)
    await drop_blob(warm, t, "profile")
    for got in (await warm.get(t, "", cid(1)), await warm.get(t, "", None),
                *await collect(warm, thread_id=t)):
        assert got is not None and got.missing == ("profile",)
        assert set(got.blobs) == {"log"}


async def drop_any_blob(warm: Any, thread: str, channel: str) -> None:
    """``drop_blob`` on every backend (a link's row is evidence on PostgreSQL too)."""
    if warm.backend != "postgres":
        await drop_blob(warm, thread, channel)
        return
    status = await warm._run("test", lambda conn: conn.execute(
        "DELETE FROM tierstore_blobs AS b USING tierstore_heads AS h "
        "WHERE h.sid = b.sid AND h.thread_id = $1 AND b.channel = $2", thread, channel))
    assert status.split()[-1] != "0"


CHAIN = {"~0~items": ("4", b"snapshot"), "~1~items": ("7@0f1e2d3c4b5a", b"delta")}


@pytest.mark.parametrize("links", [1, 2])
async def test_a_lost_delta_link_is_named_on_every_backend(warm: Any, links: int) -> None:
    """The chain's only link, or the deepest of two: either way the chain cannot be
    replayed, and an empty channel beside it still reads as empty."""
    t = f"t-{uuid.uuid4()}"
    chain = dict(list(CHAIN.items())[:links])
    versions = {"log": "1", "branch:to:n": "1", **{n: v for n, (v, _) in chain.items()}}
    blobs = [BlobRecord("log", "1", Payload("msgpack", b"hi")),
             BlobRecord("branch:to:n", "1", EMPTY),
             *(BlobRecord(n, v, Payload("msgpack+delta", d)) for n, (v, d) in chain.items())]
    await warm.put_checkpoint(record(t, 1, versions=versions), blobs, strict=False)
    await warm.put_checkpoint(record(t, 2, parent=1, versions=versions), [], strict=False)
    intact = await warm.get(t, "", cid(1))
    assert intact is not None and intact.missing == ()
    assert {n for n, p in intact.blobs.items() if p != EMPTY} == {"log", *chain}
    lost = list(chain)[-1]
    await drop_any_blob(warm, t, lost)
    for got in (await warm.get(t, "", cid(1)), await warm.get(t, "", None),
                *await collect(warm, thread_id=t)):
        assert got is not None and got.missing == (lost,)
        assert {n for n, p in got.blobs.items() if p != EMPTY} == {"log", *chain} - {lost}


async def test_a_stub_is_not_missing_the_links_it_moved_to_cold(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(
        record(t, 1, versions={"~0~items": "1"}),
        [BlobRecord("~0~items", "1", Payload("msgpack+delta", b"s1"))], strict=False)
    await warm.put_checkpoint(
        record(t, 2, parent=1, versions={"~0~items": "2"}),
        [BlobRecord("~0~items", "2", Payload("msgpack+delta", b"s2"))], strict=False)
    now = time.time()
    await warm.claim(owner="w", now=now, lease_seconds=60, limit=10, idle_before=now + 1,
                     thread_id=t)
    assert await warm.mark_archived(t, "", [cid(1)], archive_key="seg", owner="w",
                                    now=now) == 1
    for got in (await warm.get(t, "", cid(1)),
                *[r for r in await collect(warm, thread_id=t) if r.checkpoint_id == cid(1)]):
        assert got is not None and got.location == "archived" and got.missing == ()


async def test_an_empty_channel_reads_back_on_every_backend(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    blobs = [BlobRecord("log", "1", Payload("msgpack", b"hi")),
             BlobRecord("branch:to:n", "1", EMPTY)]
    await warm.put_checkpoint(record(t, 1, versions={"log": "1", "branch:to:n": "1"}),
                              blobs, strict=False)
    got = await warm.get(t, "", cid(1))
    assert got is not None and got.blobs["log"] == Payload("msgpack", b"hi")
    assert got.missing == ()
    assert got.blobs.get("branch:to:n", EMPTY) == EMPTY
    assert [r.checkpoint_id async for r in warm.list(ListQuery(thread_id=t))] == [cid(1)]


async def test_a_checkpoint_archived_while_mongodb_reads_it_reads_as_a_stub(warm: Any) -> None:
    """MongoDB has no snapshot: a checkpoint read as live can become a stub, its
    blobs collected, before the blobs are fetched. That is a stub, not a loss."""
    if warm.backend != "mongodb":
        pytest.skip("SQLite and PostgreSQL read a checkpoint and its blobs in one snapshot")
    from tierstore.tiers.mongo.documents import READ_FIELDS

    warm.orphan_grace = -1.0  # collect the stub's blobs at once
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 1, versions={"log": "1"}),
                              [BlobRecord("log", "1", Payload("msgpack", b"hi"))], strict=False)
    live = await warm._c("checkpoints").find_one({"thread_id": t}, dict(READ_FIELDS))
    now = time.time()
    await warm.claim(owner="w", now=now, lease_seconds=60, limit=10, idle_before=now + 1,
                     thread_id=t)
    assert await warm.mark_archived(t, "", [cid(1)], archive_key="seg", owner="w",
                                    now=now) == 1
    assert await warm._c("blobs").count_documents({"thread_id": t}) == 0
    [got] = await warm._assemble([live])  # the read that started before the move
    assert got.location == "archived" and got.archive_key == "seg" and got.missing == ()
