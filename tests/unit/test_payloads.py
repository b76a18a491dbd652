"""The payload cache: what a read teaches it, and its bound."""

from __future__ import annotations

from tierstore.codec.pipeline import EMPTY
from tierstore.payloads import PayloadCache
from tierstore.records import Payload, StoredCheckpoint


def read(blobs: dict[str, Payload]) -> StoredCheckpoint:
    return StoredCheckpoint(thread_id="t", checkpoint_ns="", checkpoint_id="c", parent_id=None,
                            checkpoint=EMPTY, metadata=EMPTY, blobs=blobs, writes=())


def test_a_read_teaches_every_version_it_names_an_empty_one_included() -> None:
    cache = PayloadCache()
    value = Payload("msgpack", b"v")
    cache.remember_read(read({"a": value, "~0~items": Payload("msgpack+delta", b"l")}),
                        {"a": "1", "empty": "2", "items": "3"}, skip={"items"})
    assert cache.get(("t", "", "a", "1")) == value
    # named without a payload: a version that stores no value (PostgreSQL keeps no row)
    assert cache.get(("t", "", "empty", "2")) == EMPTY
    # a delta chain is the chain writer's business, and a link is no channel version
    assert cache.get(("t", "", "items", "3")) is None
    assert cache.get(("t", "", "~0~items", "3")) is None


def test_it_keeps_the_versions_used_last() -> None:
    cache = PayloadCache(entries=2)
    one, two, three = (Payload("msgpack", bytes([i])) for i in range(3))
    cache.put(("t", "", "a", "1"), one)
    cache.put(("t", "", "a", "2"), two)
    assert cache.get(("t", "", "a", "1")) == one  # used: kept over "2"
    cache.put(("t", "", "a", "3"), three)
    assert cache.get(("t", "", "a", "2")) is None
    assert cache.get(("t", "", "a", "1")) == one
    assert cache.get(("t", "", "a", "3")) == three
