"""Encryption at rest: an AES-GCM stage in the payload pipeline, with key rotation.

::

    encode:  … ─► zstd ─► AES-256-GCM(key of the keyring's current id) ─► "msgpack+zstd+aesgcm.k2"
    decode:  "…+aesgcm.k2" ─► look up key "k2" ─► decrypt (authenticated) ─► zstd ─► serde

The key id travels in the tag, so rotating keys is adding a new current key and
keeping the old ones for reading; payloads written under an old key stay readable
until they are rewritten. Each payload gets a fresh 96-bit random nonce, stored in
front of the ciphertext. The tag is bound to the ciphertext as associated data, so
moving bytes between payloads of different pipelines is detected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tierstore.errors import ConfigurationError, CorruptPayload

__all__ = ["STAGE", "Keyring"]

STAGE = "aesgcm"
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NONCE = 12


@dataclass(frozen=True)
class Keyring:
    """Encryption keys by id; ``current`` encrypts, every key decrypts.

    ``keys`` maps ids (letters, digits, ``_``, ``-``) to 32-byte AES-256 keys, or give a
    ``provider`` callable that returns the key for an id (a KMS or secret store),
    consulted for ids not in ``keys``. ``repr`` never shows key material.
    """

    current: str
    keys: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    provider: Callable[[str], bytes | None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: F401
        except ModuleNotFoundError as exc:
            raise ConfigurationError(
                "encryption needs the 'cryptography' package: pip install 'tierstore[crypto]'"
            ) from exc
        for key_id, key in self.keys.items():
            self._check(key_id, key)
        if not _KEY_ID.match(self.current):
            raise ConfigurationError(f"bad key id {self.current!r}: use [A-Za-z0-9_-]{{1,64}}")
        if self.current not in self.keys and self.provider is None:
            raise ConfigurationError(f"the keyring has no key {self.current!r}")

    @staticmethod
    def _check(key_id: str, key: bytes) -> None:
        if not _KEY_ID.match(key_id):
            raise ConfigurationError(f"bad key id {key_id!r}: use [A-Za-z0-9_-]{{1,64}}")
        if not isinstance(key, bytes | bytearray) or len(key) != 32:
            raise ConfigurationError(f"key {key_id!r} must be 32 bytes (AES-256)")

    @classmethod
    def generate_key(cls) -> bytes:
        return os.urandom(32)

    def key(self, key_id: str) -> bytes:
        key = self.keys.get(key_id)
        if key is None and self.provider is not None:
            key = self.provider(key_id)
            if key is not None:
                self._check(key_id, key)
        if key is None:
            raise ConfigurationError(
                f"a payload is encrypted with key {key_id!r}, which the keyring does not have"
            )
        return bytes(key)

    def encrypt(self, tag: str, data: bytes) -> tuple[str, bytes]:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        new_tag = f"{tag}+{STAGE}.{self.current}"
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(self.key(self.current)).encrypt(nonce, data, new_tag.encode())
        return new_tag, nonce + sealed

    def decrypt(self, tag: str, data: bytes, *, where: str) -> tuple[str, bytes]:
        """``tag`` ends with ``+aesgcm.<id>``; returns the inner tag and plaintext."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        inner, _, stage = tag.rpartition("+")
        key_id = stage[len(STAGE) + 1:]
        if len(data) < _NONCE + 16:
            raise CorruptPayload(f"{where}: encrypted payload is truncated", where=where)
        try:
            plain = AESGCM(self.key(key_id)).decrypt(data[:_NONCE], data[_NONCE:],
                                                     tag.encode())
        except InvalidTag as exc:
            raise CorruptPayload(
                f"{where}: cannot decrypt with key {key_id!r}: wrong key, or the bytes "
                "were altered", where=where,
            ) from exc
        return inner, plain


def is_encrypted(tag: str) -> bool:
    return tag.rpartition("+")[2].startswith(STAGE + ".")
