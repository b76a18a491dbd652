"""Segment keys: pure, under the thread's prefix, unique per pack, naming their bytes."""

from __future__ import annotations

import pytest

from tierstore.codec.segment import check_segment_key, segment_key, thread_prefix
from tierstore.errors import CorruptPayload


def test_same_bytes_packed_twice_get_two_keys_under_the_thread_prefix() -> None:
    one = segment_key("../t/\x00", "ns", b"bytes", nonce="a1")
    two = segment_key("../t/\x00", "ns", b"bytes", nonce="b2")
    assert one != two
    assert one.startswith(thread_prefix("../t/\x00")) and two.startswith(thread_prefix("../t/\x00"))
    assert segment_key("../t/\x00", "ns", b"bytes", nonce="a1") == one  # pure


@pytest.mark.parametrize("nonce", ["", "a/b", "a.b", "../x"])
def test_a_nonce_cannot_break_the_key_apart(nonce: str) -> None:
    with pytest.raises(ValueError, match="nonce"):
        segment_key("t", "", b"x", nonce=nonce)


def test_a_key_only_accepts_the_bytes_it_was_made_for() -> None:
    key = segment_key("t", "", b"the segment", nonce="n0")
    check_segment_key(key, b"the segment")
    with pytest.raises(CorruptPayload, match="checksum its key names"):
        check_segment_key(key, b"another segment")
    legacy = f"{thread_prefix('t')}e3b0c44298fc1c14/{'0' * 40}.tseg"
    check_segment_key(legacy, b"anything")  # older keys carry no digest
