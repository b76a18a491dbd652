"""``WarmRequests.ancestors``: a checkpoint's parent chain cut down to some channels,
on every warm backend."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from tests.builders import cid, record, write
from tierstore.codec.chain import channel_of
from tierstore.codec.pipeline import EMPTY
from tierstore.records import BlobRecord, Payload


def value(n: int) -> Payload:
    return Payload("msgpack", f"snap-{n}".encode())


async def put_link(warm: Any, thread: str, i: int, *, parent: int | None,
                   snapshot: bool = False, ns: str = "") -> None:
    """Checkpoint ``i``: channel ``d`` stores a value only if ``snapshot`` (else the empty
    marker), channel ``p`` always; writes to both, and to a third channel, stored out of
    order."""
    d = value(i) if snapshot else EMPTY
    await warm.put_checkpoint(
        record(thread, i, parent=parent, ns=ns, versions={"d": f"{i:04d}", "p": f"{i:04d}"}),
        [BlobRecord("d", f"{i:04d}", d), BlobRecord("p", f"{i:04d}", value(i))],
        strict=False,
    )
    await warm.put_writes(thread, ns, cid(i), [
        write("task-b", 0, f"d{i}b", channel="d", path="~b"),
        write("task-a", 1, f"p{i}", channel="p", path="~a"),
        write("task-a", 0, f"d{i}a", channel="d", path="~a"),
        write("task-c", 0, f"x{i}", channel="x", path=""),
    ])


async def delta_chain(warm: Any, thread: str, n: int, *, snapshots: set[int],
                      ns: str = "") -> None:
    """Checkpoints 0..n-1, each the parent of the next (see ``put_link``)."""
    for i in range(n):
        await put_link(warm, thread, i, parent=i - 1 if i else None, snapshot=i in snapshots,
                       ns=ns)


def written(links: Any) -> list[bytes]:
    """The payloads of the links' writes, newest link first."""
    return [w.payload.data for link in links for w in link.writes]


def ids(links: Any) -> list[str]:
    return [link.checkpoint_id for link in links]


async def test_ancestors_walk_back_to_the_seed(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 8, snapshots={2})
    links = await warm.ancestors(t, "", cid(7), ["d"], limit=100)
    # the start is left out; the walk stops at the first link storing a value for d
    assert ids(links) == [cid(6), cid(5), cid(4), cid(3), cid(2)]
    assert [dict(link.values) for link in links] == [{}, {}, {}, {}, {"d": value(2)}]
    assert all(link.location == "warm" and link.missing == () for link in links)
    assert [link.parent_id for link in links] == [cid(5), cid(4), cid(3), cid(2), cid(1)]
    # only the asked channels' writes, in writes_sort_key order (task_path, task_id, idx)
    assert [(w.task_id, w.idx, w.payload.data) for w in links[0].writes] == [
        ("task-a", 0, b"d6a"), ("task-b", 0, b"d6b")]
    assert links[0].writes[1].task_path == "~b"


async def test_ancestors_stop_when_every_channel_is_seeded(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 6, snapshots={1})
    links = await warm.ancestors(t, "", cid(5), ["d", "p"], limit=100)
    # p is seeded by the first link, d only at 1: writes of p stop with its seed
    assert ids(links) == [cid(4), cid(3), cid(2), cid(1)]
    assert dict(links[0].values) == {"p": value(4)}
    assert {w.channel for w in links[0].writes} == {"d", "p"}
    assert {w.channel for w in links[1].writes} == {"d"}
    assert dict(links[-1].values) == {"d": value(1)}


async def test_ancestors_reach_the_root_without_a_seed(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 4, snapshots=set())
    links = await warm.ancestors(t, "", cid(3), ["d", "nope"], limit=100)
    assert ids(links) == [cid(2), cid(1), cid(0)]
    assert all(dict(link.values) == {} for link in links)
    assert links[-1].parent_id is None


async def test_ancestors_page_with_limit(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 7, snapshots=set())
    first = await warm.ancestors(t, "", cid(6), ["d"], limit=3)
    assert ids(first) == [cid(5), cid(4), cid(3)]
    rest = await warm.ancestors(t, "", first[-1].checkpoint_id, ["d"], limit=3)
    assert ids(rest) == [cid(2), cid(1), cid(0)]
    assert await warm.ancestors(t, "", cid(0), ["d"], limit=3) == []


async def test_ancestors_follow_the_parent_chain_not_the_ids(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 4, snapshots=set())
    # a fork off 1, and a sibling branch off 3 in between
    await warm.put_checkpoint(record(t, 10, parent=1, versions={"d": "0001"}), [],
                              strict=False)
    await warm.put_checkpoint(record(t, 11, parent=3), [], strict=False)
    await warm.put_checkpoint(record(t, 12, parent=10, versions={"d": "0001"}), [],
                              strict=False)
    links = await warm.ancestors(t, "", cid(12), ["d"], limit=100)
    assert ids(links) == [cid(10), cid(1), cid(0)]


async def test_ancestors_end_at_a_parent_not_stored(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await warm.put_checkpoint(record(t, 5, parent=4), [], strict=False)
    await warm.put_checkpoint(record(t, 6, parent=5), [], strict=False)
    assert ids(await warm.ancestors(t, "", cid(6), ["d"], limit=100)) == [cid(5)]
    assert await warm.ancestors(t, "", cid(9), ["d"], limit=100) == []
    assert await warm.ancestors(f"other-{t}", "", cid(6), ["d"], limit=100) == []
    assert await warm.ancestors(t, "", cid(6), [], limit=100) == []


async def test_ancestors_keep_to_their_namespace(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 3, snapshots=set(), ns="")
    await delta_chain(warm, t, 3, snapshots={0}, ns="child")
    root = await warm.ancestors(t, "", cid(2), ["d"], limit=100)
    child = await warm.ancestors(t, "child", cid(2), ["d"], limit=100)
    assert ids(root) == ids(child) == [cid(1), cid(0)]
    assert dict(root[-1].values) == {}
    assert dict(child[-1].values) == {"d": value(0)}


async def test_stubs_carry_no_values_and_the_walk_goes_through_them(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 5, snapshots={0, 2})
    now = time.time()
    [claim] = [c for c in await warm.claim(owner="me", now=now, lease_seconds=60, limit=1000,
                                           warm_before=now + 1) if c.thread_id == t]
    assert claim.head_id == cid(4)
    assert await warm.mark_archived(t, "", [cid(1), cid(2)], archive_key="seg", owner="me",
                                    now=now, writes={}) == 2
    links = await warm.ancestors(t, "", cid(4), ["d"], limit=100)
    # 2 stores d's snapshot, but as a stub its values are in cold: on to 0
    assert ids(links) == [cid(3), cid(2), cid(1), cid(0)]
    assert [(link.location, link.archive_key) for link in links] == [
        ("warm", None), ("archived", "seg"), ("archived", "seg"), ("warm", None)]
    assert dict(links[1].values) == {}
    # writes the segment does not hold stay on the stub, and come with it
    assert [w.payload.data for w in links[1].writes] == [b"d2a", b"d2b"]
    assert dict(links[-1].values) == {"d": value(0)}


# -- the walk follows parent ids whatever the order of the ids around it ---------------


async def test_a_branch_written_in_between_neither_seeds_nor_joins_the_walk(warm: Any) -> None:
    """A fork that ran meanwhile leaves checkpoints whose ids sort between the start and
    its ancestors, one of them a snapshot: a walk in id order would take them in, and
    stop at that snapshot."""
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 3, snapshots=set())
    await put_link(warm, t, 5, parent=2)
    await put_link(warm, t, 6, parent=5, snapshot=True)
    await put_link(warm, t, 9, parent=2)
    links = await warm.ancestors(t, "", cid(9), ["d"], limit=100)
    assert ids(links) == [cid(2), cid(1), cid(0)]
    assert all(dict(link.values) == {} for link in links)
    assert written(links) == [b"d2a", b"d2b", b"d1a", b"d1b", b"d0a", b"d0b"]
    # and a start on that branch walks it, seeded by its snapshot
    links = await warm.ancestors(t, "", cid(9 - 2), ["d"], limit=100)
    assert ids(links) == []  # 7 is not stored
    await put_link(warm, t, 7, parent=6)
    links = await warm.ancestors(t, "", cid(7), ["d"], limit=100)
    assert ids(links) == [cid(6)]
    assert dict(links[0].values) == {"d": value(6)}


async def test_a_parent_whose_id_sorts_above_its_child_is_followed(warm: Any) -> None:
    """Ids are time-ordered only within one writer: a process whose clock runs behind
    writes a child whose id sorts below its parent's."""
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 2, snapshots={0})
    await put_link(warm, t, 3, parent=1, snapshot=True)  # a sibling below the parent
    await put_link(warm, t, 8, parent=1)
    await put_link(warm, t, 5, parent=8)
    links = await warm.ancestors(t, "", cid(5), ["d"], limit=100)
    assert ids(links) == [cid(8), cid(1), cid(0)]
    assert dict(links[-1].values) == {"d": value(0)}
    assert written(links) == [b"d8a", b"d8b", b"d1a", b"d1b", b"d0a", b"d0b"]


async def test_a_parent_not_stored_ends_the_walk_though_older_ones_are(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 3, snapshots={0})
    await put_link(warm, t, 4, parent=3)  # 3 was never stored (or was pruned)
    await put_link(warm, t, 5, parent=4)
    links = await warm.ancestors(t, "", cid(5), ["d"], limit=100)
    assert ids(links) == [cid(4)]
    assert written(links) == [b"d4a", b"d4b"]


async def test_pages_cut_at_the_limit_and_go_on_across_a_branch(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 4, snapshots={1})
    await put_link(warm, t, 6, parent=3, snapshot=True)
    await put_link(warm, t, 7, parent=6)
    await put_link(warm, t, 9, parent=3)
    walked: list[str] = []
    cursor = cid(9)
    while page := await warm.ancestors(t, "", cursor, ["d"], limit=1):
        assert len(page) == 1
        walked += ids(page)
        cursor = page[-1].checkpoint_id
        if page[-1].values:
            break
    assert walked == [cid(3), cid(2), cid(1)]
    # a page that ends on the seed holds it; the next starts below it
    first = await warm.ancestors(t, "", cid(9), ["d"], limit=3)
    assert ids(first) == [cid(3), cid(2), cid(1)]
    assert dict(first[-1].values) == {"d": value(1)}
    assert ids(await warm.ancestors(t, "", cid(1), ["d"], limit=3)) == [cid(0)]


async def test_a_channel_seeded_first_stops_counting_its_writes(warm: Any) -> None:
    """Two channels, seeded at different depths, across a page boundary."""
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 6, snapshots={1})
    first = await warm.ancestors(t, "", cid(5), ["p", "d"], limit=2)
    assert ids(first) == [cid(4), cid(3)]
    assert dict(first[0].values) == {"p": value(4)}
    assert {w.channel for w in first[0].writes} == {"d", "p"}
    assert {w.channel for w in first[1].writes} == {"d"}
    rest = await warm.ancestors(t, "", cid(3), ["d"], limit=2)
    assert ids(rest) == [cid(2), cid(1)]
    assert dict(rest[-1].values) == {"d": value(1)}


async def test_a_list_stored_as_a_delta_chain_is_a_seed(warm: Any) -> None:
    """The saver stores a list channel as links (``~0~d`` the snapshot, ``~1~d`` …) and the
    checkpoint names the links instead of the channel: a value all the same, handed over
    by the links' names."""
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 2, snapshots=set())
    links = {"~0~d": ("0001", value(10)), "~1~d": ("0002@ab", value(11))}
    await warm.put_checkpoint(
        record(t, 2, parent=1, versions={name: v for name, (v, _) in links.items()}),
        [BlobRecord(name, v, p) for name, (v, p) in links.items()], strict=False)
    await put_link(warm, t, 3, parent=2)
    await put_link(warm, t, 4, parent=3)
    walked = await warm.ancestors(t, "", cid(4), ["d"], limit=100)
    assert ids(walked) == [cid(3), cid(2)]
    assert dict(walked[-1].values) == {"~0~d": value(10), "~1~d": value(11)}


async def drop_blob_rows(warm: Any, thread: str, channel: str) -> None:
    """Lose the stored values of one stored channel name behind the store's back."""
    if warm.backend == "sqlite":
        await warm._run(lambda conn: conn.execute(
            "DELETE FROM blobs WHERE thread_id = ? AND channel = ?", (thread, channel)))
    elif warm.backend == "mongodb":
        await warm._c("blobs").delete_many({"thread_id": thread, "channel": channel})
    else:
        await warm._run("test", lambda conn: conn.execute(
            "DELETE FROM tierstore_blobs WHERE channel = $1 AND sid IN "
            "(SELECT sid FROM tierstore_heads WHERE thread_id = $2)", channel, thread))


@pytest.mark.parametrize("lost", ["~2~d", "~1~d", "~0~d"])
async def test_a_lost_link_of_a_delta_chain_is_reported_missing(warm: Any, lost: str) -> None:
    """A chain is a value only whole: a link the checkpoint names but warm no longer
    holds (the deepest one too, which nothing else would notice) makes the channel
    missing at that link, with none of its links handed over."""
    t = f"t-{uuid.uuid4()}"
    await delta_chain(warm, t, 2, snapshots=set())
    links = {"~0~d": ("0001", value(10)), "~1~d": ("0002@ab", value(11)),
             "~2~d": ("0003@cd", value(12))}
    await warm.put_checkpoint(
        record(t, 2, parent=1, versions={name: v for name, (v, _) in links.items()}),
        [BlobRecord(name, v, p) for name, (v, p) in links.items()], strict=False)
    await put_link(warm, t, 3, parent=2)
    await drop_blob_rows(warm, t, lost)
    walked = await warm.ancestors(t, "", cid(3), ["d"], limit=100)
    assert walked[0].checkpoint_id == cid(2)
    assert walked[0].missing == ("d",)
    assert not [name for name in walked[0].values if channel_of(name) == "d"]
