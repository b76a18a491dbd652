"""The payload pipeline and its type tags.

::

    encode:  obj ──serde.dumps_typed──► (type, bytes), then by size:
               below compress_min         ─► Payload("msgpack", …)
               below DICTIONARY_BELOW     ─► zstd with dictionary d1 ─► "msgpack+zstd.d1"
               larger                     ─► zstd                    ─► "msgpack+zstd"
             (a stage is kept only when it makes the payload smaller)
    decode:  "msgpack+zstd.d1" ──strip "+zstd.d1" (zstd with d1)──► ("msgpack", bytes)
             ──serde.loads_typed──► obj
    link:    ChainLink ──serde──► ("msgpack+delta", bytes) ──zstd──► … (``codec.chain``);
             decoding a ``+delta`` tag returns the ``ChainLink``, never a plain value

A tag is the serde's type followed by one ``+stage`` per transformation, applied
left to right. Decoding strips known stages from the right, so every tag ever
written stays readable: an untagged ``msgpack`` payload from an earlier version
decodes as is, and a serde whose own type carries a ``+`` (LangGraph's
``EncryptedSerializer`` writes ``msgpack+aes``) composes by wrapping.

Small payloads repeat the same structure (LangChain class paths and field names,
LangGraph checkpoint keys) that zstd alone cannot find in a few hundred bytes, so they
are compressed with a pinned dictionary (``tierstore.codec.dictionaries``) whose id is
in the stage: ``zstd.d1``. Past a few tens of KiB a payload holds that structure
itself and the dictionary no longer pays (measured), so it gets plain ``zstd``. Every
dictionary id ever written stays readable; an id this version does not know is a
``CorruptPayload``.

Every zstd stage is bounded (``tierstore.codec.limits``), and a codec built with
``untrusted()`` decodes through ``SafeDecoder`` (``tierstore.codec.safe``): bytes of
outside origin never import a type outside the msgpack allowlist.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from typing import Any

import zstandard
from langgraph.checkpoint.serde.base import SerializerProtocol

from tierstore.codec import dictionaries
from tierstore.codec.chain import DELTA, ChainLink
from tierstore.codec.crypto import Keyring, is_encrypted
from tierstore.codec.limits import Budget, DecodeLimits, bounded_decompress, charge_msgpack
from tierstore.codec.safe import SafeDecoder
from tierstore.errors import ConfigurationError, CorruptPayload, DecompressionLimit
from tierstore.offthread import OffLoop
from tierstore.offthread import check as check_size
from tierstore.offthread import room as offthread_room
from tierstore.records import Payload

__all__ = ["EMPTY", "Codec"]

ZSTD = "zstd"
DICTIONARY_BELOW = 32 * 1024
"""Payloads smaller than this are compressed with the dictionary. Measured on LangChain
message lists at level 3: it saves some 140 bytes a payload up to 16 KiB, 60 at 44 KiB,
and loses from about 64 KiB on (its parameters suit small inputs); CPU is the same."""
EMPTY = Payload("empty", b"")
"""Marks a channel that has a version but no value (LangGraph's empty channel)."""


class Codec:
    """Encodes Python values into tagged payloads and back, through a LangGraph serde.

    zstd contexts are costly to create, so each thread keeps one compressor and one
    decompressor per stage (they are not safe to share between threads); a dictionary
    is digested once per thread, not per payload. ``dictionary=None`` writes plain zstd
    only (every stage is still read).
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
        dictionary: str | None = dictionaries.CURRENT,
    ) -> None:
        if dictionary is not None and dictionary not in dictionaries.SHA256:
            raise ConfigurationError(f"no zstd dictionary {dictionary!r} ships with tierstore")
        if dictionary is not None:
            dictionaries.load(dictionary)  # a damaged or missing file fails here, not mid-write
        self.serde = serde
        self.level = level
        self.compress_min = compress_min
        self.dictionary = dictionary
        self.keyring = keyring
        self.limits = limits or DecodeLimits()
        self.safe = safe
        self._local = threading.local()

    def untrusted(self, allowed: Iterable[tuple[str, ...]] = ()) -> Codec:
        """The same pipeline, decoding under the safe msgpack allowlist plus ``allowed``."""
        return Codec(self.serde, level=self.level, compress_min=self.compress_min,
                     keyring=self.keyring, limits=self.limits,
                     safe=SafeDecoder(self.serde, allowed), dictionary=self.dictionary)

    def budget(self) -> Budget:
        """What one record (a checkpoint with its blobs and writes) may decode to."""
        return Budget(self.limits.max_record_bytes, "record")

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        return compressor

    def _dict_compressor(self, dict_id: str) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "dict_compressor", None)
        if compressor is None:  # one per thread: the codec's dictionary never changes
            zdict = _zstd_dict(dict_id)
            zdict.precompute_compress(level=self.level)  # else digested again per payload
            compressor = self._local.dict_compressor = zstandard.ZstdCompressor(
                level=self.level, dict_data=zdict)
        return compressor

    def _decompressor(self, stage: str, *, where: str) -> zstandard.ZstdDecompressor:
        """The decompressor for a zstd stage (``zstd`` or ``zstd.<dictionary id>``)."""
        decompressors: dict[str, zstandard.ZstdDecompressor] | None = getattr(
            self._local, "decompressors", None)
        if decompressors is None:
            decompressors = self._local.decompressors = {}
        decompressor = decompressors.get(stage)
        if decompressor is None:
            dict_id = stage[len(ZSTD) + 1:]
            if stage == ZSTD:
                decompressor = zstandard.ZstdDecompressor()
            elif dict_id in dictionaries.SHA256:
                decompressor = zstandard.ZstdDecompressor(dict_data=_zstd_dict(dict_id))
            else:
                known = ", ".join(sorted(dictionaries.SHA256))
                raise CorruptPayload(
                    f"{where}: the payload was compressed with zstd dictionary {dict_id!r}, "
                    f"which this version of tierstore does not have (it has {known}); was "
                    "it written by a newer version?", where=where,
                )
            decompressors[stage] = decompressor
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
        if (type_ == EMPTY.tag or type_.endswith("+" + DELTA) or _zstd_stage(type_)
                or is_encrypted(type_)):
            raise ConfigurationError(f"serde produced a reserved type tag {type_!r}")
        return type_, bytes(data)

    def _seal(self, type_: str, data: bytes) -> Payload:
        check_size(len(data))
        payload = self.compress(Payload(type_, data))
        if self.keyring is not None:
            return Payload(*self.keyring.encrypt(payload.tag, payload.data))
        return payload

    def compress(self, payload: Payload) -> Payload:
        """Add a zstd stage when it makes the payload smaller: with the dictionary below
        ``DICTIONARY_BELOW`` bytes, plain above (one compression either way)."""
        size = len(payload.data)
        if size < self.compress_min:
            return payload
        # its bytes were counted by ``_seal``, its one caller
        if self.dictionary is not None and size < DICTIONARY_BELOW:
            stage = f"{ZSTD}.{self.dictionary}"
            packed = self._dict_compressor(self.dictionary).compress(payload.data)
        else:
            stage = ZSTD
            packed = self._compressor().compress(payload.data)
        if len(packed) >= size:
            return payload
        return Payload(f"{payload.tag}+{stage}", packed)

    def portable(self, payload: Payload, *, where: str = "payload") -> Payload:
        """``payload`` as every release reads it: a dictionary stage becomes plain zstd
        (decompressed and compressed again, never decoded), for files that leave the
        stores (exports). Other payloads are returned as they are."""
        tag = payload.tag
        check_size(len(payload.data))
        if is_encrypted(tag):
            if self.keyring is None:
                return payload  # opaque here; a keyring-less export cannot use it anyway
            tag = self.keyring.decrypt(payload.tag, payload.data, where=where)[0]
        stage = _zstd_stage(tag)
        if stage is None or stage == ZSTD:
            return payload
        inner = self.decompress(payload, where=where)
        packed = self._compressor().compress(inner.data)
        plain = (Payload(f"{inner.tag}+{ZSTD}", packed) if len(packed) < len(inner.data)
                 else inner)
        if self.keyring is not None:
            return Payload(*self.keyring.encrypt(plain.tag, plain.data))
        return plain

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
        # its bytes were counted by ``decompress``, which every ``decode`` runs first
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
        check_size(len(data))
        if is_encrypted(tag):
            if self.keyring is None:
                raise ConfigurationError(
                    f"{where}: the payload is encrypted ({tag!r}) and no keyring is configured"
                )
            tag, data = self.keyring.decrypt(tag, data, where=where)
        stage = _zstd_stage(tag)
        if stage is not None:
            # what it decompresses to beyond what was counted, when the frame says (the
            # writer's always does); not a frame: bounded_decompress names it. A payload's
            # bytes count once: its decompressed size (what decoding it then works on)
            counted = len(data)
            with contextlib.suppress(zstandard.ZstdError):
                declared = zstandard.frame_content_size(data)
                check_size(max(0, declared - counted))
                counted = max(counted, declared)
            limit = self.limits.max_payload_bytes
            left = offthread_room()
            if left is not None and counted + left < limit:
                # on the loop, output beyond what the call may still do there (a frame that
                # does not say its size, or more frames after the first: never the writer's)
                # stops the work at once and sends the call to a thread
                try:
                    data = bounded_decompress(data, limit=counted + left, where=where,
                                              dctx=self._decompressor(stage, where=where))
                except DecompressionLimit:
                    raise OffLoop from None
            else:
                data = bounded_decompress(data, limit=limit, where=where,
                                          dctx=self._decompressor(stage, where=where))
            check_size(max(0, len(data) - counted))
            tag = tag[: -len(stage) - 1]
            if _zstd_stage(tag) is not None:
                # the writer compresses once; each stage would be bounded on its own, so a
                # tag stacking stages could make a tiny payload cost unbounded work
                raise CorruptPayload(f"{where}: payload tag {payload.tag!r} has more than "
                                     "one zstd stage", where=where)
        if not tag:
            raise CorruptPayload(f"{where}: payload has no type tag", where=where)
        if budget is not None:
            budget.spend(len(data), where=where)
        return Payload(tag, data)


def payload_work(payload: Payload) -> int:
    """The bytes ``decode`` will work on for ``payload`` (its decompressed size when the
    zstd frame says so), read from headers only: what ``offthread.check`` will count."""
    data = payload.data
    if _zstd_stage(payload.tag) is not None and not is_encrypted(payload.tag):
        with contextlib.suppress(zstandard.ZstdError):
            return max(len(data), zstandard.frame_content_size(data))
    return len(data)


def _zstd_stage(tag: str) -> str | None:
    """The last stage of ``tag`` if it is a zstd stage (``zstd``, ``zstd.<id>``)."""
    stage = tag.rpartition("+")[2]
    return stage if "+" in tag and (stage == ZSTD or stage.startswith(ZSTD + ".")) else None


def _zstd_dict(dict_id: str) -> zstandard.ZstdCompressionDict:
    """A fresh dictionary object (it caches digested state, so it is not shared)."""
    return zstandard.ZstdCompressionDict(dictionaries.load(dict_id),
                                         dict_type=zstandard.DICT_TYPE_RAWCONTENT)
