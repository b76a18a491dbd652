"""Codec: every tag ever written stays readable; corrupt bytes are a typed error.

GOLDEN pins bytes as earlier versions wrote them (both the compressed and the
plain form of each value); decoding them must keep giving the same values.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from tests.unit.golden_values import golden_values
from tierstore import TieredSaver
from tierstore.codec import Codec
from tierstore.codec.frames import pack_stored, unpack_stored
from tierstore.errors import ConfigurationError, CorruptPayload
from tierstore.records import Payload, StoredCheckpoint, WriteRecord

GOLDEN: list[tuple[str, str, str]] = [
    ("messages", "msgpack+zstd", "28b52ffd60ac01550600424b282b706bd201fc67e23d17ce3d2140eb6b9336d2c4ffda4a349a94d3d7f256f24e0b653e0e90c05ffb6a70b23999759e5020c50a07ce7c42b9db1291e39fc739c7fa818c393618080422f0179526004043970dd0f515e611509eda6611618fc22773ed6ab99c44a12d94f7d5fb1a3ad695f039180a2fe7090728af8b8d4a1db399c72eadd7ba0962a1606042df260cc2b7ce7c0d72ce26a47896963e312a4d43c6430d001f04153604d49bc8de9300efb439f2d4b45c2c2ae1dd86b9da13036fa120e0e6b0262864"),
    ("messages", "msgpack", "92c78c0594bd6c616e67636861696e5f636f72652e6d657373616765732e68756d616eac48756d616e4d65737361676586a7636f6e74656e74a568656c6c6fb16164646974696f6e616c5f6b776172677380b1726573706f6e73655f6d6574616461746180a474797065a568756d616ea46e616d65c0a26964a26831b36d6f64656c5f76616c69646174655f6a736f6ec802180594ba6c616e67636861696e5f636f72652e6d657373616765732e6169a941494d65737361676589a7636f6e74656e74da0168686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520686920746865726520b16164646974696f6e616c5f6b776172677380b1726573706f6e73655f6d6574616461746180a474797065a26169a46e616d65c0a26964a26131aa746f6f6c5f63616c6c7390b2696e76616c69645f746f6f6c5f63616c6c7390ae75736167655f6d65746164617461c0b36d6f64656c5f76616c69646174655f6a736f6e"),
    ("pydantic", "msgpack", "c75d0594b874657374732e756e69742e676f6c64656e5f76616c756573a65469636b657483a2696407a57469746c65ac62726f6b656e206275696c64a47461677392a26369a6757267656e74b36d6f64656c5f76616c69646174655f6a736f6e"),
    ("bytes", "bytes+zstd", "28b52ffd6090005d0000200001feff010089ab8e08"),
    ("bytes", "bytes", "0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff0001feff"),
    ("none", "null", ""),
    ("set", "msgpack", "c7150093a86275696c74696e73a373657493a163a161a162"),
    ("datetime", "msgpack", "c7430394a86461746574696d65a86461746574696d65d920323032362d31312d32325431323a33303a30352e3132333435362b30303a3030ad66726f6d69736f666f726d6174"),
    ("nested", "msgpack+zstd", "28b52ffd601301250100d885a16e01a166cb400400a173da01f478a16c920192029103a174c30200f04015012001"),
    ("nested", "msgpack", "85a16e01a166cb4004000000000000a173da01f47878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878a16c920192029103a174c3"),
]


@pytest.fixture
def codec() -> Codec:
    return Codec(JsonPlusSerializer())


@pytest.mark.parametrize(("name", "tag", "hexdata"), GOLDEN,
                         ids=[f"{n}-{t}" for n, t, _ in GOLDEN])
def test_golden_payloads_stay_readable(codec: Codec, name: str, tag: str, hexdata: str) -> None:
    assert codec.decode(Payload(tag, bytes.fromhex(hexdata))) == golden_values()[name]


@pytest.mark.parametrize("name", sorted(golden_values()))
def test_round_trip(codec: Codec, name: str) -> None:
    value = golden_values()[name]
    assert codec.decode(codec.encode(value)) == value


def test_tag_records_the_pipeline(codec: Codec) -> None:
    small = codec.encode({"a": 1})
    assert small.tag == "msgpack"
    big = codec.encode("text " * 1000)
    assert big.tag == "msgpack+zstd.d1"  # small enough for the dictionary
    assert big.size < 1000
    huge = codec.encode("text " * 10_000)
    assert huge.tag == "msgpack+zstd"  # past the dictionary's range
    assert huge.size < 1000
    assert codec.encode(None).tag == "null"
    assert codec.encode(b"\x00" * 1000).tag == "bytes+zstd.d1"


def test_incompressible_data_is_left_plain(codec: Codec) -> None:
    import os

    noise = os.urandom(4096)
    assert codec.encode(noise) == Payload("bytes", noise)


@pytest.mark.parametrize(
    "payload",
    [
        Payload("msgpack+zstd", b"\x28\xb5\x2f\xfd garbage"),
        Payload("msgpack", b"\xc1"),  # never-used msgpack byte
        Payload("msgpack", b"\x92\x01"),  # truncated array
        Payload("no-such-serde", b"\x01"),
        Payload("+zstd", b""),
        Payload("empty", b""),
    ],
    ids=["zstd-garbage", "bad-msgpack", "truncated", "unknown-tag", "stage-only", "empty"],
)
def test_corrupt_payloads_raise_corrupt_payload(codec: Codec, payload: Payload) -> None:
    with pytest.raises(CorruptPayload):
        codec.decode(payload, where="test")


def test_reserved_tags_from_a_serde_are_refused() -> None:
    class Rogue:
        def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
            return "msgpack+zstd", b"x"

        def loads_typed(self, data: tuple[str, bytes]) -> Any:
            return data

    with pytest.raises(ConfigurationError):
        Codec(Rogue()).encode(1)


class UpperJson:
    """A custom serde: JSON with a tag of its own."""

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        return "upperjson", json.dumps(obj).encode()

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        assert data[0] == "upperjson"
        return json.loads(data[1])


async def test_custom_serde_is_honoured_end_to_end(tmp_path: Path) -> None:
    from langgraph.checkpoint.conformance.test_utils import (
        generate_checkpoint,
        generate_config,
        generate_metadata,
    )

    async with TieredSaver.from_urls(hot=None, warm=f"sqlite:///{tmp_path}/w.db", cold=None,
                                     serde=UpperJson()) as saver:
        cp = generate_checkpoint(channel_values={"text": "y" * 2000})
        cp["channel_versions"] = {"text": 1}
        stored = await saver.aput(generate_config("t"), cp, generate_metadata(), {"text": 1})
        got = await saver.aget_tuple(stored)
        assert got is not None and got.checkpoint["channel_values"] == {"text": "y" * 2000}
    conn = sqlite3.connect(tmp_path / "w.db")
    tags = {row[0] for row in conn.execute("SELECT tag FROM blobs")}
    conn.close()
    assert tags == {"upperjson+zstd.d1"}


def test_frames_round_trip_and_refuse_damage() -> None:
    record = StoredCheckpoint(
        thread_id="t", checkpoint_ns="ns", checkpoint_id="c", parent_id=None,
        checkpoint=Payload("msgpack", b"cp"), metadata=Payload("msgpack", b"md"),
        blobs={"a": Payload("msgpack+zstd", b"\x00")},
        writes=(WriteRecord("task", -1, "__error__", Payload("msgpack", b"e"), "p"),),
    )
    packed = pack_stored(record)
    assert unpack_stored(packed) == record
    with pytest.raises(CorruptPayload):
        unpack_stored(packed[:-3])
    with pytest.raises(CorruptPayload, match="frame version"):
        unpack_stored(b"\x91\x63")
