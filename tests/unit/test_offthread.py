"""Large byte work of a saver call runs off the event loop, however the bytes come:
one payload that is small only while compressed, or many payloads each below the
threshold (``tierstore.offthread``): at most ``LARGE`` bytes of it per call run on the
loop. Checked by where the serde decodes the values."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import zstandard
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from tierstore import TieredSaver
from tierstore.codec import Codec, pipeline
from tierstore.offthread import LARGE, OffLoop, inline
from tierstore.records import Payload


class WhereDecoded(JsonPlusSerializer):
    """LangGraph's serde, noting the thread each channel value is decoded on (the
    checkpoint's own small metadata is decoded where the call runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoded: list[tuple[str, int]] = []

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        if len(data[1]) >= 1024:
            self.decoded.append((threading.current_thread().name, len(data[1])))
        return super().loads_typed(data)


async def read_back(tmp_path: Path, values: dict[str, str]) -> int:
    """Store ``values`` as one checkpoint; the bytes a fresh saver decodes on the loop."""
    warm = f"sqlite:///{tmp_path}/warm.db"
    async with TieredSaver.from_urls(hot=None, warm=warm, cold=None) as saver:
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = values
        checkpoint["channel_versions"] = dict.fromkeys(values, "1")
        await saver.aput({"configurable": {"thread_id": "t", "checkpoint_ns": ""}},
                         checkpoint, {}, dict.fromkeys(values, "1"))
    serde = WhereDecoded()
    async with TieredSaver.from_urls(hot=None, warm=warm, cold=None, serde=serde) as reader:
        got = await reader.aget_tuple({"configurable": {"thread_id": "t"}})
        assert got is not None and got.checkpoint["channel_values"] == values
    loop = threading.current_thread().name
    assert serde.decoded, "no channel value decoded"
    return sum(size for name, size in serde.decoded if name == loop)


async def test_a_value_large_only_once_decompressed_is_decoded_off_the_loop(
        tmp_path: Path) -> None:
    assert await read_back(tmp_path, {"notes": "x" * (50 * LARGE)}) == 0


async def test_many_values_below_the_threshold_are_decoded_off_the_loop(
        tmp_path: Path) -> None:
    each = LARGE // 3  # each below it, together above it
    values = {f"ch{i}": str(i) * each for i in range(6)}
    # the record's size is known from its headers: none of it starts on the loop only to
    # be decoded again in the thread
    assert await read_back(tmp_path, values) == 0


async def test_a_record_below_the_threshold_is_decoded_on_the_loop_whole(
        tmp_path: Path) -> None:
    """A hop to a thread costs more than the work below ``LARGE``: each payload's bytes
    count once (decompressing and decoding them), not once per step."""
    each = LARGE // 8
    values = {f"ch{i}": str(i) * each for i in range(4)}  # LARGE / 2 in all
    assert await read_back(tmp_path, values) == sum(
        len(v) + 3 for v in values.values())  # every value, as msgpack, on the loop


def test_a_frame_that_hides_its_size_is_counted_before_it_is_decoded() -> None:
    """tierstore's frames say their size; a crafted one that does not is still counted
    (once decompressed) before the serde decodes it on the loop."""
    serde = WhereDecoded()
    tag, data = serde.dumps_typed("x" * (4 * LARGE))
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert zstandard.frame_content_size(frame) == -1 and len(frame) < LARGE
    with pytest.raises(OffLoop), inline():
        Codec(serde).decode(Payload(f"{tag}+zstd", frame))
    assert serde.decoded == []


def test_frames_after_a_small_first_frame_are_not_decompressed_on_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A crafted payload whose first frame says 8 bytes and whose next holds the rest:
    the loop stops at what the call may still do there."""
    serde = WhereDecoded()
    tag, data = serde.dumps_typed("x" * (50 * LARGE))
    compressor = zstandard.ZstdCompressor()
    frames = compressor.compress(data[:8]) + compressor.compress(data[8:])
    assert zstandard.frame_content_size(frames) == 8
    produced: list[int] = []  # output each decompression handed back
    real = pipeline.bounded_decompress

    def spy(data: bytes, **options: Any) -> bytes:
        out = real(data, **options)
        produced.append(len(out))
        return out

    monkeypatch.setattr(pipeline, "bounded_decompress", spy)
    with pytest.raises(OffLoop), inline():
        Codec(serde).decode(Payload(f"{tag}+zstd", frames))
    assert serde.decoded == [] and produced == []
    assert Codec(serde).decode(Payload(f"{tag}+zstd", frames)) == "x" * (50 * LARGE)


async def test_metadata_a_filter_reads_is_decoded_off_the_loop_when_large(
        tmp_path: Path) -> None:
    """A filter the store cannot evaluate is checked on decoded metadata (the router)."""
    warm = f"sqlite:///{tmp_path}/warm.db"
    serde = WhereDecoded()
    async with TieredSaver.from_urls(hot=None, warm=warm, cold=None, serde=serde) as saver:
        checkpoint = empty_checkpoint()
        await saver.aput({"configurable": {"thread_id": "t", "checkpoint_ns": ""}},
                         checkpoint, {"tags": ["x"], "notes": "y" * (4 * LARGE)}, {})  # type: ignore[typeddict-unknown-key]
        serde.decoded.clear()
        found = [t async for t in saver.alist({"configurable": {"thread_id": "t"}},
                                              filter={"tags": ["x"]})]
    assert len(found) == 1
    loop = threading.current_thread().name
    assert serde.decoded and not [size for name, size in serde.decoded if name == loop]
