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

Decompressed size alone does not bound memory: one byte of msgpack (``0x80``, an empty
map) becomes a Python object of some 64 bytes, so a few kilobytes of zstd can inflate
to megabytes of msgpack and then to gigabytes of objects. So msgpack from outside is
walked before it is decoded (``charge_msgpack``: a header scan, nothing built) and
every element it holds is charged ``ELEMENT_COST`` bytes against the same bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import zstandard

from tierstore.errors import ConfigurationError, CorruptPayload, DecompressionLimit

__all__ = ["ELEMENT_COST", "Budget", "DecodeLimits", "bounded_decompress", "charge_msgpack"]

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
    """zstd-decompress ``data`` (one or more frames), refusing output past ``limit``.

    Every frame is decoded, whether its header declares its size or not: frames after
    the first count against the same bound (never silently dropped).
    """
    dctx = dctx or zstandard.ZstdDecompressor()
    out = bytearray()
    rest = data
    while True:
        try:
            declared = zstandard.frame_content_size(rest)
        except zstandard.ZstdError as exc:
            raise CorruptPayload(f"{where}: not a zstd frame ({exc})", where=where) from exc
        if declared < 0:  # undeclared: streamed below, across the frames left
            break
        if len(out) + declared > limit:
            raise DecompressionLimit(
                f"{where}: a zstd frame declares {declared} bytes of output; the limit is "
                f"{limit} (max_{what}_bytes)", where=where, limit=limit,
            )
        try:  # the header's size is checked: one allocation of that size
            frame = dctx.decompressobj()
            chunk = frame.decompress(rest)
        except zstandard.ZstdError as exc:
            raise CorruptPayload(f"{where}: zstd stage failed ({exc}); the bytes are damaged",
                                 where=where) from exc
        if not frame.eof:
            raise CorruptPayload(f"{where}: zstd frame is truncated", where=where)
        rest = frame.unused_data
        if not rest and not out:
            return chunk
        out += chunk
        if not rest:
            return bytes(out)
    try:
        with dctx.stream_reader(rest, read_across_frames=True) as reader:
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


ELEMENT_COST = 64
"""Bytes charged per msgpack element: about what the smallest Python object costs."""

# msgpack header byte -> bytes its header takes: the whole element for scalars; an
# array's or map's children follow it.
_FIXED = {0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5,
          0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9, 0xDC: 3, 0xDD: 5, 0xDE: 3, 0xDF: 5}
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin, str: length bytes
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}  # ext 8/16/32: length bytes (then one type byte)
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


def msgpack_elements(data: bytes, *, stop_after: int) -> int:
    """How many elements ``data`` (msgpack) holds, ext bodies included, counted from
    the headers alone; stops counting once past ``stop_after``.

    msgpack is a prefix code, so every header met in a linear scan starts one element;
    ext bodies (LangGraph nests msgpack in them) are scanned the same way. Damaged
    bytes end the scan: the real decoder then reports them.
    """
    view = memoryview(data)
    count = 0
    spans = [(0, len(view))]
    while spans:
        i, end = spans.pop()
        while i < end:
            b = view[i]
            count += 1
            if count > stop_after:
                return count
            if b <= 0x9F or b >= 0xE0:  # fixints; fixmap, fixarray (children follow)
                i += 1
            elif b <= 0xBF:  # fixstr
                i += 1 + (b & 0x1F)
            elif b in _FIXED:
                i += _FIXED[b]
            elif b in _SIZED:
                n = _SIZED[b]
                i += 1 + n + int.from_bytes(view[i + 1:i + 1 + n], "big")
            elif b in _EXT:
                n = _EXT[b]
                size = int.from_bytes(view[i + 1:i + 1 + n], "big")
                body = i + 2 + n
                spans.append((body, min(body + size, end)))
                i = body + size
            elif b in _FIXEXT:
                body = i + 2
                spans.append((body, min(body + _FIXEXT[b], end)))
                i = body + _FIXEXT[b]
            else:  # 0xc1: never used; the bytes are damaged
                break
    return count


def charge_msgpack(data: bytes, budget: Budget, *, where: str) -> None:
    """Charge ``ELEMENT_COST`` per msgpack element of ``data`` to ``budget`` before the
    bytes are decoded; ``DecompressionLimit`` once the objects would pass its bound."""
    room = max(budget.limit - budget.used, 0) // ELEMENT_COST
    budget.spend(msgpack_elements(data, stop_after=room) * ELEMENT_COST, where=where)
