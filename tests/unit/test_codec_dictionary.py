"""The zstd dictionary stage (``+zstd.d1``): pinned bytes, readable forever, bounded.

GOLDEN_D1 pins payloads as this version writes them with d1; decoding them must keep
giving the same values whatever LangChain or LangGraph version is installed, so the
dictionary file itself is pinned by its sha256 here, apart from the package's own pin.
"""

from __future__ import annotations

import hashlib
import os
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import zstandard
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from loadtest.workload import filler
from tests.bombs import GiB, rle_frame
from tests.integration.rawbytes import unpacked
from tests.unit.golden_values import golden_values
from tierstore.codec import Codec
from tierstore.codec.chain import ChainLink, link_name, resolve_values
from tierstore.codec.crypto import Keyring
from tierstore.codec.dictionaries import CURRENT, SHA256, load, verified
from tierstore.codec.dictionaries.build import BUILT_WITH, build_d1
from tierstore.codec.limits import DecodeLimits
from tierstore.errors import ConfigurationError, CorruptPayload, DecompressionLimit, UnsafePayload
from tierstore.records import Payload

ROOT = Path(__file__).resolve().parents[2]
D1_SHA256 = "bc4931ed7a69ef381e8c0e5e812fe4f17c341b976b39e01c1523041ae48aff50"

GOLDEN_D1: list[tuple[str, str, str]] = [
    ("messages", "msgpack+zstd.d1",
     "28b52ffd60ac01150200f092c78ca568656c6c6fa26831c80218da016868692074686572"
     "6520a261310a007e250e980b8c479a7080fc3201174b4da1ad68d095f428d20f68349fb2"
     "c2930e01"),
    ("pydantic", "msgpack+zstd.d1",
     "28b52ffd20609502004404c75d0594b874657374732e756e69742e676f6c64656e756573"
     "a65469636b657483a2696407a57469746c65ac6272206275696c64a47461677392a26369"
     "a6757267656e7403100a88a286503c20b48a01"),
    ("nested", "msgpack+zstd.d1",
     "28b52ffd601301250100d885a16e01a166cb400400a173da01f478a16c920192029103a1"
     "74c30200f04015012001"),
]

V1 = "00000000000000000000000000000001.0.25"
V2 = "00000000000000000000000000000002.0.5"
GOLDEN_D1_LINKS = [
    ("msgpack+delta+zstd.d1",
     "28b52ffd20bb550100a89501d925303235c00091c78ca568656c6c6fa2683106009f253d"
     "b5f40370cda70c96ce8ee90a44a005"),
    ("msgpack+delta+zstd.d1",
     "28b52ffd606d01bd0100c0322532350191c80218da0168686920746865726520a2613109"
     "0086230ea0098ce72ad0033d800fe062a9a9941519400e082c0e325b01"),
]
"""The golden messages' first item as a snapshot at V1, then a delta at V2 adding the second."""

MESSAGE_PAYLOAD_MIN_GAIN = 0.15
"""d1 must save at least this share of plain zstd's bytes on a chat message."""


@pytest.fixture
def codec() -> Codec:
    return Codec(JsonPlusSerializer())


def chat_message(seed: int) -> list[Any]:
    """What a messages channel write holds: one AI reply of some 500 bytes of text."""
    return [AIMessage(filler(seed, 500), id=f"{seed:08x}-0000-4000-8000-000000000000")]


# -- the pinned file -------------------------------------------------------------------------


def test_d1_is_the_committed_file_and_its_digest_is_pinned() -> None:
    data = files("tierstore.codec.dictionaries").joinpath("d1.bin").read_bytes()
    assert hashlib.sha256(data).hexdigest() == D1_SHA256
    assert load("d1") == data
    assert CURRENT == "d1"


def test_a_dictionary_file_that_is_not_d1_is_refused() -> None:
    data = load("d1")
    assert verified("d1", data) == data
    for damaged in (data[:-1], data + b"\x00", bytes([data[0] ^ 1]) + data[1:], b""):
        with pytest.raises(ConfigurationError, match="damaged"):
            verified("d1", damaged)


def test_d1_holds_structure_and_no_prose() -> None:
    """Small, no two words in a row, and no 8-byte run of any workload text: a dictionary
    fitted to the benchmark's words would make the benchmark lie."""
    data = load("d1")
    assert 1024 < len(data) <= 4096
    assert re.search(rb"[A-Za-z]{2,} +[A-Za-z]{2,}", data) is None
    windows = {text[i:i + 8] for seed in range(50)
               for text in [filler(seed, 2000).encode()] for i in range(len(text) - 7)}
    assert [w for w in windows if w in data] == []
    for structure in (b"langchain_core.messages.ai", b"AIMessage", b"additional_kwargs",
                      b"response_metadata", b"tool_calls", b"channel_versions",
                      b"versions_seen", b"branch:to:", b"__start__", b"__pregel_pull",
                      b"source", b"parents"):
        assert structure in data


def test_every_dictionary_ships_in_wheel_and_sdist() -> None:
    """Stored bytes depend on these files: the build must carry them even if an ignore
    file would drop them (hatch's ``artifacts``)."""
    import fnmatch
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    artifacts = pyproject["tool"]["hatch"]["build"]["artifacts"]
    for dict_id in SHA256:
        path = f"tierstore/codec/dictionaries/{dict_id}.bin"
        assert (ROOT / path).is_file()
        assert any(fnmatch.fnmatch(path, pattern) for pattern in artifacts), path


def test_the_builder_documents_d1() -> None:
    """Under the versions d1 was built with, its recipe gives it byte for byte (under
    others it may not, and d1 stays as committed: see ``build``)."""
    from importlib.metadata import version

    installed = {name: version(name) for name in BUILT_WITH}
    if installed != BUILT_WITH:
        pytest.skip(f"d1 was built under {BUILT_WITH}; installed: {installed}")
    assert build_d1() == load("d1")


# -- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "tag", "hexdata"), GOLDEN_D1,
                         ids=[f"{n}-{t}" for n, t, _ in GOLDEN_D1])
def test_golden_d1_payloads_stay_readable(codec: Codec, name: str, tag: str,
                                          hexdata: str) -> None:
    assert codec.decode(Payload(tag, bytes.fromhex(hexdata))) == golden_values()[name]


def test_golden_d1_links_stay_readable(codec: Codec) -> None:
    links = {link_name(i, "messages"): codec.decode(Payload(tag, bytes.fromhex(data)))
             for i, (tag, data) in enumerate(GOLDEN_D1_LINKS)}
    resolved = resolve_values({"messages": V2}, links, where="golden")
    assert resolved.values == {"messages": golden_values()["messages"]}


def test_golden_d1_payloads_decode_under_the_untrusted_codec(codec: Codec) -> None:
    safe = codec.untrusted([("tests.unit.golden_values", "Ticket")])
    for name, tag, hexdata in GOLDEN_D1:
        assert safe.decode(Payload(tag, bytes.fromhex(hexdata))) == golden_values()[name]


def test_a_codec_without_the_dictionary_still_reads_it() -> None:
    plain = Codec(JsonPlusSerializer(), dictionary=None)
    name, tag, hexdata = GOLDEN_D1[0]
    assert plain.decode(Payload(tag, bytes.fromhex(hexdata))) == golden_values()[name]
    assert plain.encode(chat_message(1)).tag == "msgpack+zstd"
    with pytest.raises(ConfigurationError, match="d9"):
        Codec(JsonPlusSerializer(), dictionary="d9")


@pytest.mark.parametrize("tag", ["msgpack+zstd.d9", "msgpack+zstd.", "msgpack+zstd.D1",
                                 "msgpack+zstd.d1.d1"])
def test_an_unknown_dictionary_is_a_clear_corrupt_payload(codec: Codec, tag: str) -> None:
    data = bytes.fromhex(GOLDEN_D1[0][2])
    with pytest.raises(CorruptPayload, match="dictionary") as info:
        codec.decode(Payload(tag, data), where="blob")
    assert info.value.where == "blob"


@pytest.mark.parametrize("payload", [
    Payload("msgpack+zstd.d1", b"\x28\xb5\x2f\xfd garbage"),
    Payload("msgpack+zstd.d1", b""),
    Payload("+zstd.d1", bytes.fromhex(GOLDEN_D1[2][2])),
], ids=["garbage", "empty", "stage-only"])
def test_damaged_d1_payloads_raise_corrupt_payload(codec: Codec, payload: Payload) -> None:
    with pytest.raises(CorruptPayload):
        codec.decode(payload, where="test")


def test_d1_frames_are_not_plain_zstd(codec: Codec) -> None:
    """The same bytes under the other stage do not decode: a tag names its dictionary."""
    with pytest.raises(CorruptPayload):
        codec.decode(Payload("msgpack+zstd", bytes.fromhex(GOLDEN_D1[0][2])))


def test_a_declared_bomb_through_the_dictionary_stage_is_refused_from_its_header(
        codec: Codec) -> None:
    with pytest.raises(DecompressionLimit, match="declares"):
        codec.decode(Payload("msgpack+zstd.d1", rle_frame(GiB)), where="blob")


def test_an_undeclared_bomb_through_the_dictionary_stage_is_streamed_to_the_bound() -> None:
    codec = Codec(JsonPlusSerializer(), limits=DecodeLimits(max_payload_bytes=1 << 20))
    with pytest.raises(DecompressionLimit, match="passes"):
        codec.decode(Payload("bytes+zstd.d1", rle_frame(64 << 20, declare=False)),
                     where="blob")


def test_untrusted_code_inside_the_dictionary_stage_is_refused(codec: Codec,
                                                               tmp_path: Any) -> None:
    from tests.bombs import shell_payload

    marker = tmp_path / "pwned"
    d1 = zstandard.ZstdCompressionDict(load("d1"), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    frame = zstandard.ZstdCompressor(dict_data=d1).compress(shell_payload(str(marker)))
    with pytest.raises(UnsafePayload):
        codec.untrusted().decode(Payload("msgpack+zstd.d1", frame), where="import")
    assert not marker.exists()


# -- writing ---------------------------------------------------------------------------------


def test_small_structured_payloads_take_the_dictionary(codec: Codec) -> None:
    plain = Codec(JsonPlusSerializer(), dictionary=None)
    for value in (chat_message(7),
                  [HumanMessage(filler(8, 300), id="h"), ToolMessage("42", tool_call_id="c")],
                  [AIMessage("", id="00000000-0000-4000-8000-00000000000a",
                             tool_calls=[{"name": "search", "args": {"query": "zstd", "limit": 10},
                                          "id": "call_7Qd2mXb"}])]):
        payload = codec.encode(value)
        assert payload.tag == "msgpack+zstd.d1"
        assert codec.decode(payload) == value
        assert payload.size < plain.encode(value).size
    saved = 1 - codec.encode(chat_message(9)).size / plain.encode(chat_message(9)).size
    assert saved >= MESSAGE_PAYLOAD_MIN_GAIN


def test_large_payloads_take_plain_zstd(codec: Codec) -> None:
    """Past some tens of KiB the dictionary no longer pays (measured): plain zstd."""
    big = [AIMessage(filler(seed, 500)) for seed in range(200)]
    payload = codec.encode(big)
    assert payload.tag == "msgpack+zstd"
    assert codec.decode(payload) == big


def test_tiny_and_incompressible_payloads_stay_plain(codec: Codec) -> None:
    """compress_min still governs: the dictionary would shrink checkpoint metadata too,
    but by too little to pay for the call (measured)."""
    assert codec.encode(1) == Payload("msgpack", b"\x01")
    assert codec.encode({"source": "loop", "step": 3, "parents": {}}).tag == "msgpack"
    assert codec.encode(None).tag == "null"
    noise = os.urandom(1000)
    assert codec.encode(noise) == Payload("bytes", noise)


def test_delta_stays_innermost_and_encryption_wraps_the_dictionary_stage() -> None:
    keyring = Keyring(current="k1", keys={"k1": bytes(range(32))})
    codec = Codec(JsonPlusSerializer(), keyring=keyring)
    value = chat_message(3)
    payload = codec.encode(value)
    assert payload.tag == "msgpack+zstd.d1+aesgcm.k1"
    assert codec.decode(payload) == value
    link = ChainLink("00000000000000000000000000000002.0.5", None, 0, value)
    sealed = codec.encode_link(link)
    assert sealed.tag == "msgpack+delta+zstd.d1+aesgcm.k1"
    assert codec.decode(sealed) == link


@pytest.mark.parametrize("tag", ["msgpack+zstd.d1", "json+zstd.d2", "x+zstd."])
def test_a_serde_type_that_looks_like_the_dictionary_stage_is_refused(tag: str) -> None:
    class Rogue:
        def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
            return tag, b"x"

        def loads_typed(self, data: tuple[str, bytes]) -> Any:
            return data

    with pytest.raises(ConfigurationError):
        Codec(Rogue()).encode(1)


def test_raw_byte_scans_see_inside_d1_frames(codec: Codec) -> None:
    """The deletion and residency tests look for canaries inside every zstd frame; a d1
    frame must not hide one from them."""
    canary = b"CANARY-d1-frame"
    payload = codec.encode([AIMessage(canary.decode() + " " + filler(1, 400))])
    assert payload.tag == "msgpack+zstd.d1"
    assert canary not in payload.data
    assert canary in unpacked(b"prefix" + payload.data + b"suffix")
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(payload.data)


@pytest.mark.parametrize("stages", [["zstd", "zstd"], ["zstd.d1", "zstd.d1"],
                                    ["zstd.d1", "zstd"], ["zstd", "zstd.d1"]])
def test_a_payload_compressed_twice_is_refused(stages: list[str]) -> None:
    """Each stage is bounded on its own, so stacked stages would let a tiny payload cost
    unbounded work; the writer compresses once, so a second stage is never genuine."""
    codec = Codec(JsonPlusSerializer())
    tag, data = codec.serde.dumps_typed({"k": "v" * 400})
    d1 = zstandard.ZstdCompressionDict(load("d1"), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    for stage in stages:
        compressor = (zstandard.ZstdCompressor(dict_data=d1) if stage == "zstd.d1"
                      else zstandard.ZstdCompressor())
        tag, data = f"{tag}+{stage}", compressor.compress(data)
    with pytest.raises(CorruptPayload, match="more than one zstd stage"):
        codec.decode(Payload(tag, data))


def test_a_dictionary_id_is_never_a_path() -> None:
    for dict_id in ("../__init__", "d1/../d1", "d2"):
        with pytest.raises(KeyError):
            load(dict_id)


def test_a_missing_dictionary_fails_when_the_codec_is_made(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tierstore.codec import dictionaries

    monkeypatch.setattr(dictionaries, "files", lambda _name: tmp_path)  # an install without it
    load.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match=r"missing.*reinstall"):
            Codec(JsonPlusSerializer())
        Codec(JsonPlusSerializer(), dictionary=None)  # plain zstd needs no file
    finally:
        load.cache_clear()
