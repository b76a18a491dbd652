"""Untrusted bytes: the safe allowlist never runs code, every decompression is bounded,
and checkpoint ids written are LangGraph's time-ordered UUIDs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import zstandard
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from tests.bombs import GiB, rle_frame, shell_payload, v6_at
from tests.unit.golden_values import Ticket
from tierstore.codec import Codec
from tierstore.codec.limits import DecodeLimits, bounded_decompress
from tierstore.codec.segment import unpack_segment
from tierstore.errors import CorruptPayload, DecompressionLimit, InvalidInput, UnsafePayload
from tierstore.policy import validate_checkpoint_id
from tierstore.records import Payload

ROOT = Path(__file__).resolve().parents[2]
TICKET = (Ticket.__module__, Ticket.__name__)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


# -- the safe allowlist ----------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["top", "in-list", "in-set", "in-dict"])
def test_untrusted_codec_refuses_code_and_runs_none(marker: Path, wrap: str) -> None:
    evil = shell_payload(str(marker))
    # the same ext, at the top or nested inside containers and an allowed type (a set)
    nested = {
        "top": evil,
        "in-list": b"\x92\x01" + evil,
        "in-set": _set_of(evil),
        "in-dict": b"\x81\xa1k" + evil,
    }[wrap]
    codec = Codec(JsonPlusSerializer()).untrusted()
    with pytest.raises(UnsafePayload, match=r"os\.system") as info:
        codec.decode(Payload("msgpack", nested), where="import")
    assert info.value.type_name == "os.system"
    assert not marker.exists()


def _set_of(item: bytes) -> bytes:
    """msgpack for LangGraph's ``set([item])`` ext (EXT_CONSTRUCTOR_SINGLE_ARG)."""
    import ormsgpack

    inner = b"\x93" + ormsgpack.packb("builtins") + ormsgpack.packb("set") + b"\x91" + item
    return ormsgpack.packb(ormsgpack.Ext(0, inner))


def test_untrusted_codec_keeps_safe_types_and_the_allowlist() -> None:
    serde = JsonPlusSerializer()
    trusted = Codec(serde)
    ticket = Ticket(id=7, title="t", tags=["a"])
    value = {"s": {1, 2}, "id": uuid.uuid4(), "ticket": ticket}
    payload = trusted.encode(value)
    with pytest.raises(UnsafePayload, match="Ticket"):
        trusted.untrusted().decode(payload)
    assert trusted.untrusted([TICKET]).decode(payload) == value
    # a strict serde's own allowlist (LangGraph's with_msgpack_allowlist) counts too
    strict = JsonPlusSerializer(allowed_msgpack_modules=None).with_msgpack_allowlist([TICKET])
    assert Codec(strict).untrusted().decode(payload) == value


@pytest.mark.parametrize("tag", ["pickle", "json", "upperjson"])
def test_untrusted_codec_accepts_only_msgpack_family_tags(tag: str) -> None:
    with pytest.raises(UnsafePayload, match=tag):
        Codec(JsonPlusSerializer(pickle_fallback=True)).untrusted().decode(Payload(tag, b"x"))


def test_untrusted_codec_works_inside_langgraphs_encrypted_serde(marker: Path) -> None:
    from langgraph.checkpoint.serde.encrypted import EncryptedSerializer

    class Xor:  # a stand-in cipher; what matters is the serde wrapping
        def encrypt(self, plaintext: bytes) -> tuple[str, bytes]:
            return "xor", bytes(b ^ 0x5A for b in plaintext)

        def decrypt(self, ciphername: str, ciphertext: bytes) -> bytes:
            return bytes(b ^ 0x5A for b in ciphertext)

    serde = EncryptedSerializer(Xor())
    typ, data = serde.dumps_typed({"x": 1})
    codec = Codec(serde).untrusted()
    assert typ == "msgpack+xor" and codec.decode(Payload(typ, data)) == {"x": 1}
    evil_type, evil = Xor().encrypt(shell_payload(str(marker)))
    with pytest.raises(UnsafePayload):
        codec.decode(Payload(f"msgpack+{evil_type}", evil))
    assert not marker.exists()


# -- bounded decompression -------------------------------------------------------------------


def test_payload_stage_refuses_a_declared_bomb_from_its_header() -> None:
    codec = Codec(JsonPlusSerializer())
    with pytest.raises(DecompressionLimit, match="declares"):
        codec.decode(Payload("msgpack+zstd", rle_frame(GiB)), where="blob")


def test_payload_stage_streams_an_undeclared_frame_up_to_the_bound() -> None:
    codec = Codec(JsonPlusSerializer(), limits=DecodeLimits(max_payload_bytes=1 << 20))
    with pytest.raises(DecompressionLimit, match="passes"):
        codec.decode(Payload("bytes+zstd", rle_frame(64 << 20, declare=False)), where="blob")
    small = rle_frame(1 << 20, declare=False)
    assert codec.decode(Payload("bytes+zstd", small)) == b"a" * (1 << 20)


def test_record_bound_counts_every_payload_of_a_record() -> None:
    codec = Codec(JsonPlusSerializer(), limits=DecodeLimits(max_record_bytes=250_000))
    budget = codec.budget()
    for _ in range(2):
        codec.decode(Payload("bytes+zstd", rle_frame(100_000)), budget=budget)
    with pytest.raises(DecompressionLimit, match="record"):
        codec.decode(Payload("bytes+zstd", rle_frame(100_000)), budget=budget)


def test_segment_body_is_bounded() -> None:
    body = rle_frame(4 * GiB)

    data = b"TSEG" + bytes([1]) + hashlib.sha256(body).digest() + body
    with pytest.raises(DecompressionLimit, match="segment"):
        unpack_segment(data, key="segments/x", max_bytes=1 << 20)


@pytest.mark.parametrize("declare", [True, False])
def test_frames_after_a_declared_one_are_decoded_under_the_same_bound(declare: bool) -> None:
    small = zstandard.ZstdCompressor().compress(b"small")
    with pytest.raises(DecompressionLimit):
        bounded_decompress(small + rle_frame(64 << 20, declare=declare), limit=1 << 20,
                           where="x")
    tail = zstandard.ZstdCompressor(write_content_size=declare).compress(b" and more")
    assert bounded_decompress(small + tail, limit=1 << 20, where="x") == b"small and more"
    assert bounded_decompress(tail + small, limit=1 << 20, where="x") == b" and moresmall"
    with pytest.raises(CorruptPayload):
        bounded_decompress(small + b"trailing junk", limit=1 << 20, where="x")


def test_garbage_is_still_corrupt_payload() -> None:
    with pytest.raises(CorruptPayload):
        bounded_decompress(b"nope", limit=10, where="x")


def test_decoders_stay_within_a_memory_cap(tmp_path: Path) -> None:
    """Under RLIMIT_AS (300 MiB above what the process holds), 6 GiB bombs are refused."""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.bombs import GiB, bundle, rle_frame
        from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
        from tierstore.codec import Codec
        from tierstore.errors import DecompressionLimit
        from tierstore.ops import read_export
        from tierstore.records import Payload

        def vm() -> int:
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
            raise SystemExit("no VmSize")

        cap = vm() + 300 * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        outcomes = []
        for declare in (True, False):
            try:
                Codec(JsonPlusSerializer()).decode(
                    Payload("msgpack+zstd", rle_frame(6 * GiB, declare=declare)))
            except DecompressionLimit:
                outcomes.append("refused")
        try:
            read_export(bundle("t", [], body=rle_frame(6 * GiB)), max_bytes=128 << 20)
        except DecompressionLimit:
            outcomes.append("refused")
        print(",".join(outcomes))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "refused,refused,refused"


def maps(n: int) -> bytes:
    """msgpack: one array of ``n`` empty maps (one byte each, some 64 bytes as objects)."""
    return b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n


def test_msgpack_elements_are_charged_before_anything_is_built() -> None:
    codec = Codec(JsonPlusSerializer(), limits=DecodeLimits(max_payload_bytes=1 << 20)).untrusted()
    assert codec.decode(Payload("msgpack", maps(1000))) == [{}] * 1000
    with pytest.raises(DecompressionLimit, match="payload"):
        codec.decode(Payload("msgpack", maps(20_000)), where="blob")  # 20 KB of bytes
    record = Codec(JsonPlusSerializer(), limits=DecodeLimits(max_record_bytes=200_000)).untrusted()
    budget = record.budget()
    record.decode(Payload("msgpack", maps(2_000)), budget=budget)
    with pytest.raises(DecompressionLimit, match="record"):
        record.decode(Payload("msgpack", maps(2_000)), budget=budget)
    # the elements inside LangGraph's ext bodies count too
    import ormsgpack

    nested = ormsgpack.packb(ormsgpack.Ext(0, b"\x93" + ormsgpack.packb("builtins")
                                           + ormsgpack.packb("set") + b"\x91" + maps(20_000)))
    with pytest.raises(DecompressionLimit):
        codec.decode(Payload("msgpack", nested), where="blob")


def test_msgpack_amplification_stays_within_a_memory_cap(tmp_path: Path) -> None:
    """8 MiB of msgpack that would build ~600 MB of objects, as a payload, as an export
    body, as an export frame and as a segment body: refused under a 300 MiB cap."""
    script = textwrap.dedent(f"""
        import hashlib, resource, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import msgpack, zstandard
        from tests.bombs import bundle
        from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
        from tierstore.codec import Codec
        from tierstore.codec.segment import unpack_segment
        from tierstore.errors import DecompressionLimit
        from tierstore.ops import read_export
        from tierstore.records import Payload

        N = 8 << 20
        maps = b"\\xdd" + N.to_bytes(4, "big") + b"\\x80" * N
        z = zstandard.ZstdCompressor().compress
        body = z(msgpack.packb({{"format": 1, "thread_id": "t", "exported_at": time.time(),
                               "checkpoints": []}})[:-1] + maps)
        frame = z(msgpack.packb({{"format": 1, "thread_id": "t", "exported_at": time.time(),
                                "checkpoints": [maps]}}, use_bin_type=True))
        seg = z(b"\\x83" + msgpack.packb("thread_id") + msgpack.packb("t")
                + msgpack.packb("checkpoint_ns") + msgpack.packb("") + msgpack.packb("entries")
                + maps)

        def vm() -> int:
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
            raise SystemExit("no VmSize")

        cap = vm() + 300 * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        outcomes = []
        for attempt in (
            lambda: Codec(JsonPlusSerializer()).untrusted().decode(
                Payload("msgpack+zstd", z(maps))),
            lambda: read_export(bundle("t", [], body=body), max_bytes=128 << 20),
            lambda: read_export(bundle("t", [], body=frame), max_bytes=128 << 20),
            lambda: unpack_segment(b"TSEG" + bytes([1]) + hashlib.sha256(seg).digest() + seg,
                                   max_bytes=128 << 20),
        ):
            try:
                attempt()
                outcomes.append("decoded")
            except DecompressionLimit:
                outcomes.append("refused")
        print(",".join(outcomes))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "refused,refused,refused,refused"


# -- checkpoint ids ----------------------------------------------------------------------------


NOW = 1_800_000_000.0


def test_langgraph_ids_are_accepted() -> None:
    real = str(uuid6(clock_seq=-1))
    import time

    assert validate_checkpoint_id(real, time.time()) == real
    assert validate_checkpoint_id(v6_at(NOW - 86400 * 365), NOW)
    assert validate_checkpoint_id(v6_at(NOW + 30), NOW)  # within the skew


@pytest.mark.parametrize("bad", [
    "not-a-uuid", "", "ffffffff-ffff-6fff-8fff-ffffffffffff", str(uuid.uuid4()),
    str(uuid.uuid1()), v6_at(NOW).upper(), v6_at(NOW + 3600), "\x00", 7,
    "{" + v6_at(NOW) + "}",
], ids=["not-a-uuid", "empty", "max-v6", "uuid4", "uuid1", "upper-case", "an-hour-ahead",
        "nul", "int", "braces"])
def test_other_ids_are_invalid_input(bad: object) -> None:
    with pytest.raises(InvalidInput):
        validate_checkpoint_id(bad, NOW)
