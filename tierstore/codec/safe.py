"""Decoding bytes that did not come from this saver's own writes.

LangGraph's default serializer imports and calls any ``module.name`` a msgpack ext
payload names, so bytes an attacker wrote can run code when they are decoded. Its
strict mode (``allowed_msgpack_modules``) stops the call but silently returns the raw
arguments instead, which would let a crafted import be written as if it were fine.
``SafeDecoder`` decodes with LangGraph's own allowlist mechanism and turns every
refusal into ``UnsafePayload``::

    bytes ─► ext hook ─► inner payload decoded first (nested types checked first)
                    ├─► (module, name) in SAFE_MSGPACK_TYPES or allowlist ─► LangGraph's hook
                    └─► anything else ─► refused: nothing imported, UnsafePayload

Only the ``msgpack`` family of tags (and ``null`` / ``bytes`` / ``bytearray``) is
accepted: ``pickle`` and the legacy ``json`` constructor format are refused outright.
A LangGraph ``EncryptedSerializer`` keeps its cipher and gets the safe serde inside.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import ormsgpack
from langgraph.checkpoint.serde._msgpack import SAFE_MSGPACK_METHODS, SAFE_MSGPACK_TYPES
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.serde.encrypted import EncryptedSerializer
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer, _create_msgpack_ext_hook

from tierstore.errors import CorruptPayload, UnsafePayload

__all__ = ["SAFE_TAGS", "SafeDecoder", "allowlist_of"]

SAFE_TAGS = frozenset({"msgpack", "null", "bytes", "bytearray"})
"""Serde type tags (before any ``+stage``) accepted from bytes of outside origin."""

_CONSTRUCTORS = frozenset({0, 1, 2, 4, 5})  # LangGraph's EXT_CONSTRUCTOR_* / EXT_PYDANTIC_*
_METHOD = 3  # EXT_METHOD_SINGLE_ARG
_NESTED = frozenset({0, 1, 2, 3, 4, 5, 7})  # ext codes whose payload is msgpack itself

AllowList = frozenset[tuple[str, ...]]


class _Refused(Exception):
    pass


def allowlist_of(serde: SerializerProtocol) -> AllowList:
    """The explicit msgpack allowlist a LangGraph serde carries (``with_allowlist``)."""
    inner = serde.serde if isinstance(serde, EncryptedSerializer) else serde
    allowed = getattr(inner, "_allowed_msgpack_modules", None)
    return frozenset(allowed) if isinstance(allowed, set | frozenset) else frozenset()


class SafeDecoder:
    """Decodes serde payloads under an allowlist and refuses everything outside it."""

    def __init__(self, serde: SerializerProtocol, allowed: Iterable[tuple[str, ...]] = ()) -> None:
        self.allowed: AllowList = frozenset(tuple(k) for k in allowed) | allowlist_of(serde)
        self._local = threading.local()
        modules = tuple(self.allowed) or None  # None: LangGraph's strict mode (safe types)
        self._langgraph_hook: Callable[[int, bytes], Any] = _create_msgpack_ext_hook(
            set(modules) if modules else None
        )
        inner = JsonPlusSerializer(allowed_msgpack_modules=modules,
                                   __unpack_ext_hook__=self._hook)
        self.serde: SerializerProtocol = (
            EncryptedSerializer(serde.cipher, inner) if isinstance(serde, EncryptedSerializer)
            else inner
        )

    def _hook(self, code: int, data: bytes) -> Any:
        if code in _NESTED:
            tup = ormsgpack.unpackb(data, ext_hook=self._hook, option=ormsgpack.OPT_NON_STR_KEYS)
            if code in _CONSTRUCTORS:
                key: tuple[str, ...] = (str(tup[0]), str(tup[1]))
                ok = key in SAFE_MSGPACK_TYPES or key in self.allowed
            elif code == _METHOD:
                key = (str(tup[0]), str(tup[1]), str(tup[3]))
                ok = key in SAFE_MSGPACK_METHODS
            else:
                ok = True
            if not ok:
                self._local.refused = ".".join(key)
                raise _Refused(self._local.refused)
        return self._langgraph_hook(code, data)

    def loads(self, tag: str, data: bytes, *, where: str) -> Any:
        base = tag.split("+", 1)[0]
        if base not in SAFE_TAGS:
            raise UnsafePayload(
                f"{where}: payload type {tag!r} is not accepted from untrusted bytes "
                f"(only {', '.join(sorted(SAFE_TAGS))})", where=where, type_name=tag,
            )
        self._local.refused = None
        try:
            value = self.serde.loads_typed((tag, data))
        except Exception as exc:
            refused = self._local.refused
            if refused is not None:
                raise self._unsafe(refused, where) from None
            raise CorruptPayload(
                f"{where}: bytes do not decode as {tag!r} ({type(exc).__name__}: {exc})",
                where=where,
            ) from exc
        if self._local.refused is not None:
            raise self._unsafe(self._local.refused, where)
        return value

    @staticmethod
    def _unsafe(name: str, where: str) -> UnsafePayload:
        return UnsafePayload(
            f"{where}: the bytes name {name!r}, which is not in the msgpack allowlist; "
            "refused without importing it (add it to allowed_msgpack_modules if it is "
            "a type you trust)", where=where, type_name=name,
        )
