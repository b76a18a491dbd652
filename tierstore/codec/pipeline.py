"""The payload pipeline and its type tags.

::

    encode:  obj ──serde.dumps_typed──► (type, bytes) ──zstd──► Payload("msgpack+zstd", …)
    decode:  Payload("msgpack+zstd", …) ──strip "+zstd"──► ("msgpack", bytes)
             ──serde.loads_typed──► obj
    link:    ChainLink ──serde──► ("msgpack+delta", bytes) ──zstd──► … (``codec.chain``);
             decoding a ``+delta`` tag returns the ``ChainLink``, never a plain value

A tag is the serde's type followed by one ``+stage`` per transformation, applied
left to right. Decoding strips known stages from the right, so every tag ever
written stays readable: an untagged ``msgpack`` payload from an earlier version
decodes as is, and a serde whose own type carries a ``+`` (LangGraph's
``EncryptedSerializer`` writes ``msgpack+aes``) composes by wrapping.

Every zstd stage is bounded (``tierstore.codec.limits``), and a codec built with
``untrusted()`` decodes through ``SafeDecoder`` (``tierstore.codec.safe``): bytes of
outside origin never import a type outside the msgpack allowlist.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import zstandard
from langgraph.checkpoint.serde.base import SerializerProtocol

from tierstore.codec.chain import DELTA, ChainLink
from tierstore.codec.crypto import Keyring, is_encrypted
from tierstore.codec.limits import Budget, DecodeLimits, bounded_decompress, charge_msgpack
from tierstore.codec.safe import SafeDecoder
from tierstore.errors import ConfigurationError, CorruptPayload
from tierstore.records import Payload

__all__ = ["EMPTY", "Codec"]

ZSTD = "zstd"
EMPTY = Payload("empty", b"")
"""Marks a channel that has a version but no value (LangGraph's empty channel)."""


class Codec:
    """Encodes Python values into tagged payloads and back, through a LangGraph serde.

    zstd contexts are costly to create, so each thread keeps one compressor and one
    decompressor (they are not safe to share between threads).
    """

    def __init__(
        self,
        serde: SerializerProtocol,
        *,
        level: int = 3,
        compress_min: int = 256,
        keyring: Keyring | None = None,
        limits: DecodeLimits | None = None,
        safe: SafeDecoder | None = None,
    ) -> None:
        self.serde = serde
        self.level = level
        self.compress_min = compress_min
        self.keyring = keyring
        self.limits = limits or DecodeLimits()
        self.safe = safe
        self._local = threading.local()

    def untrusted(self, allowed: Iterable[tuple[str, ...]] = ()) -> Codec:
        """The same pipeline, decoding under the safe msgpack allowlist plus ``allowed``."""
        return Codec(self.serde, level=self.level, compress_min=self.compress_min,
                     keyring=self.keyring, limits=self.limits,
                     safe=SafeDecoder(self.serde, allowed))

    def budget(self) -> Budget:
        """What one record (a checkpoint with its blobs and writes) may decode to."""
        return Budget(self.limits.max_record_bytes, "record")

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        return compressor

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor

    def encode(self, value: Any) -> Payload:
        return self._seal(*self._typed(value))

    def encode_link(self, link: ChainLink) -> Payload:
        """A delta link (``tierstore.codec.chain``): its tag gains the ``+delta`` stage
        before compression and encryption, so it can never pass for a whole value."""
        type_, data = self._typed(link.body())
        return self._seal(type_ + "+" + DELTA, data)

    def _typed(self, value: Any) -> tuple[str, bytes]:
        type_, data = self.serde.dumps_typed(value)
        if (type_ == EMPTY.tag or type_.endswith(("+" + ZSTD, "+" + DELTA))
                or is_encrypted(type_)):
            raise ConfigurationError(f"serde produced a reserved type tag {type_!r}")
        return type_, bytes(data)

    def _seal(self, type_: str, data: bytes) -> Payload:
        payload = self.compress(Payload(type_, data))
        if self.keyring is not None:
            return Payload(*self.keyring.encrypt(payload.tag, payload.data))
        return payload

    def compress(self, payload: Payload) -> Payload:
        """Add the zstd stage when it makes the payload smaller."""
        if len(payload.data) < self.compress_min:
            return payload
        packed = self._compressor().compress(payload.data)
        if len(packed) >= len(payload.data):
            return payload
        return Payload(f"{payload.tag}+{ZSTD}", packed)

    def decode(self, payload: Payload, *, where: str = "payload",
               budget: Budget | None = None) -> Any:
        if payload.tag == EMPTY.tag:
            raise CorruptPayload(f"{where}: an empty-channel marker has no value", where=where)
        inner = self.decompress(payload, where=where, budget=budget)
        if inner.tag.endswith("+" + DELTA):
            body = self._loads(Payload(inner.tag[: -len(DELTA) - 1], inner.data),
                               where=where, budget=budget)
            return ChainLink.from_body(body, where=where)
        return self._loads(inner, where=where, budget=budget)

    def _loads(self, inner: Payload, *, where: str, budget: Budget | None) -> Any:
        if self.safe is not None:
            if inner.tag == "msgpack":  # what the objects would cost, before any is built
                own = Budget(self.limits.max_payload_bytes, "payload")
                own.spend(len(inner.data), where=where)
                charge_msgpack(inner.data, own, where=where)
                if budget is not None:
                    budget.spend(own.used - len(inner.data), where=where)
            return self.safe.loads(inner.tag, inner.data, where=where)
        try:
            return self.serde.loads_typed((inner.tag, inner.data))
        except Exception as exc:
            raise CorruptPayload(
                f"{where}: stored bytes do not decode as {inner.tag!r} "
                f"({type(exc).__name__}: {exc})",
                where=where,
            ) from exc

    def decompress(self, payload: Payload, *, where: str = "payload",
                   budget: Budget | None = None) -> Payload:
        tag, data = payload.tag, payload.data
        if is_encrypted(tag):
            if self.keyring is None:
                raise ConfigurationError(
                    f"{where}: the payload is encrypted ({tag!r}) and no keyring is configured"
                )
            tag, data = self.keyring.decrypt(tag, data, where=where)
        while tag.endswith("+" + ZSTD):
            data = bounded_decompress(data, limit=self.limits.max_payload_bytes, where=where,
                                      dctx=self._decompressor())
            tag = tag[: -len(ZSTD) - 1]
        if not tag:
            raise CorruptPayload(f"{where}: payload has no type tag", where=where)
        if budget is not None:
            budget.spend(len(data), where=where)
        return Payload(tag, data)
