"""Hostile bytes for the untrusted-input tests: zstd bombs, code-running msgpack, bundles.

Built by hand so that no test has to spend the memory it proves is never spent: a
zstd frame made of RLE blocks is four bytes per 128 KiB of output.
"""

from __future__ import annotations

import hashlib
import struct
import time
import uuid
from typing import Any

import msgpack
import ormsgpack
import zstandard
from langgraph.checkpoint.base.id import uuid6

from tierstore.codec import Codec
from tierstore.codec.frames import pack_stored
from tierstore.ops import EXPORT_FORMAT, EXPORT_MAGIC
from tierstore.records import Payload, StoredCheckpoint, WriteRecord

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BLOCK = 128 * 1024
GiB = 1 << 30


def rle_frame(size: int, *, declare: bool = True, byte: int = 0x61) -> bytes:
    """A zstd frame producing ``size`` bytes of ``byte``; with ``declare`` its header says so."""
    if declare:
        header = ZSTD_MAGIC + bytes([0xE0]) + struct.pack("<Q", size)  # single segment, 8-byte FCS
    else:
        header = ZSTD_MAGIC + bytes([0x00, 0x38])  # no FCS, window 128 KiB
    blocks = []
    left = size
    while left > 0:
        n = min(BLOCK, left)
        left -= n
        last = 1 if left == 0 else 0
        blocks.append(struct.pack("<I", last | (1 << 1) | (n << 3))[:3] + bytes([byte]))
    return header + b"".join(blocks)


def ext_call(module: str, name: str, *args: Any) -> bytes:
    """msgpack bytes LangGraph's default serde turns into ``module.name(*args)``."""
    return ormsgpack.packb(ormsgpack.Ext(1, ormsgpack.packb([module, name, list(args)])))


def shell_payload(marker: str) -> bytes:
    return ext_call("os", "system", f"touch {marker}")


def v6_at(seconds: float) -> str:
    """A version 6 UUID stamped at ``seconds`` (Unix time), as LangGraph's uuid6 lays it out."""
    stamp = int(seconds * 1e7) + 0x01B21DD213814000
    value = ((stamp >> 12) << 80) | ((stamp & 0xFFF) << 64) | (0x8000 << 48) | 0x1234
    return str(uuid.UUID(int=value | (6 << 76)))


def checkpoint_body(checkpoint_id: str, channels: dict[str, str]) -> dict[str, Any]:
    return {"v": 4, "id": checkpoint_id, "ts": "2026-11-30T00:00:00+00:00",
            "channel_versions": channels, "versions_seen": {}, "updated_channels": None}


def record(codec: Codec, thread_id: str, *, checkpoint_id: str | None = None,
           parent_id: str | None = None, values: dict[str, Payload] | None = None,
           checkpoint: Payload | None = None, metadata: Payload | None = None,
           writes: tuple[WriteRecord, ...] = (), ns: str = "") -> StoredCheckpoint:
    """One exported checkpoint; ``values`` are channel payloads exactly as stored."""
    checkpoint_id = checkpoint_id or str(uuid6(clock_seq=-1))
    values = values if values is not None else {"a": codec.encode("hello")}
    versions = {ch: f"{1:032}.0" for ch in values}
    return StoredCheckpoint(
        thread_id=thread_id, checkpoint_ns=ns, checkpoint_id=checkpoint_id, parent_id=parent_id,
        checkpoint=checkpoint or codec.encode(checkpoint_body(checkpoint_id, versions)),
        metadata=metadata or codec.encode({"source": "input", "step": -1}),
        blobs=values, writes=writes,
    )


def chain(codec: Codec, thread_id: str, n: int) -> list[StoredCheckpoint]:
    out: list[StoredCheckpoint] = []
    for i in range(n):
        parent = out[-1].checkpoint_id if out else None
        out.append(record(codec, thread_id, parent_id=parent,
                          values={"a": codec.encode(f"value {i}")}))
        time.sleep(0.001)
    return out


def bundle(thread_id: Any, records: list[StoredCheckpoint], *, body: bytes | None = None) -> bytes:
    """An export file (checksum recomputed, as an attacker would)."""
    if body is None:
        body = zstandard.ZstdCompressor().compress(msgpack.packb({
            "format": EXPORT_FORMAT, "thread_id": thread_id, "exported_at": time.time(),
            "checkpoints": [pack_stored(r) for r in records],
        }, use_bin_type=True))
    return EXPORT_MAGIC + bytes([EXPORT_FORMAT]) + hashlib.sha256(body).digest() + body
