"""Output bounds for every decompression.

A zstd frame a few hundred bytes long can declare (or simply produce) gigabytes.
Bytes read back from any tier, or from a file an operator imports, are decoded under
three bounds::

    payload stage  one zstd frame (a channel value, a write, a checkpoint body)  max_payload_bytes
    record         every payload of one checkpoint together                      max_record_bytes
    bundle         one archive segment or export file body                       max_bundle_bytes

A frame that declares its content size is refused from its header, before any memory
is spent; a frame that does not declare it is streamed and refused as soon as the
output passes the bound. Past a bound the error is ``DecompressionLimit`` naming where.
"""

from __future__ import annotations

from dataclasses import dataclass

import zstandard

from tierstore.errors import ConfigurationError, CorruptPayload, DecompressionLimit

__all__ = ["Budget", "DecodeLimits", "bounded_decompress"]

MiB = 1 << 20
_CHUNK = 1 * MiB


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeLimits:
    """The three output bounds (bytes); see the module docstring."""

    max_payload_bytes: int = 256 * MiB
    max_record_bytes: int = 1024 * MiB
    max_bundle_bytes: int = 2048 * MiB

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "max_record_bytes", "max_bundle_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")


class Budget:
    """Bytes still allowed for one record or bundle; every decoded payload spends some."""

    __slots__ = ("limit", "used", "what")

    def __init__(self, limit: int, what: str = "record") -> None:
        self.limit = limit
        self.used = 0
        self.what = what

    def spend(self, size: int, *, where: str) -> None:
        self.used += size
        if self.used > self.limit:
            raise DecompressionLimit(
                f"{where}: the {self.what} decodes to more than {self.limit} bytes "
                f"(max_{self.what}_bytes)", where=where, limit=self.limit,
            )


def bounded_decompress(
    data: bytes,
    *,
    limit: int,
    where: str,
    what: str = "payload",
    dctx: zstandard.ZstdDecompressor | None = None,
) -> bytes:
    """zstd-decompress ``data`` (one or more frames), refusing output past ``limit``."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CorruptPayload(f"{where}: not a zstd frame ({exc})", where=where) from exc
    if declared > limit:
        raise DecompressionLimit(
            f"{where}: a zstd frame declares {declared} bytes of output; the limit is "
            f"{limit} (max_{what}_bytes)", where=where, limit=limit,
        )
    dctx = dctx or zstandard.ZstdDecompressor()
    out = bytearray()
    try:
        if declared >= 0:  # the header's size is checked: one allocation of that size
            return dctx.decompress(data)
        with dctx.stream_reader(data, read_across_frames=True) as reader:
            while True:
                chunk = reader.read(min(_CHUNK, limit + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
                if len(out) > limit:
                    raise DecompressionLimit(
                        f"{where}: zstd output passes {limit} bytes (max_{what}_bytes)",
                        where=where, limit=limit,
                    )
    except zstandard.ZstdError as exc:
        raise CorruptPayload(f"{where}: zstd stage failed ({exc}); the bytes are damaged",
                             where=where) from exc
    return bytes(out)
