"""Pinned zstd dictionaries: committed files whose bytes never change.

A payload compressed with a dictionary means nothing without that exact dictionary,
so each one is a file shipped in this package, named by an id that travels in the
payload's tag (``msgpack+zstd.d1``), with its sha256 pinned here and checked when it
is first loaded::

    tag "…+zstd.d1" ─► id "d1" ─► SHA256["d1"] ─► d1.bin, checked ─► zstd (de)compressor

Nothing builds a dictionary at import time: one built from LangChain's classes would
change meaning with a LangChain upgrade. ``build`` documents how d1 was made. A better
dictionary is a new file under a new id, added here; every id ever written stays.
"""

from __future__ import annotations

import functools
import hashlib
from importlib.resources import files

from tierstore.errors import ConfigurationError

__all__ = ["CURRENT", "SHA256", "load", "verified"]

SHA256 = {
    "d1": "bc4931ed7a69ef381e8c0e5e812fe4f17c341b976b39e01c1523041ae48aff50",
}
"""Every dictionary id ever shipped, with the sha256 of its file."""

CURRENT = "d1"
"""The dictionary new payloads are compressed with."""


@functools.cache
def load(dict_id: str) -> bytes:
    """The bytes of dictionary ``dict_id`` (``KeyError`` if no version ever shipped it)."""
    if dict_id not in SHA256:  # before any file is opened: an id is never a path
        raise KeyError(dict_id)
    try:
        data = files(__name__).joinpath(f"{dict_id}.bin").read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"the zstd dictionary {dict_id!r} is missing from this installation of tierstore "
            f"({type(exc).__name__}: {exc}); reinstall tierstore") from exc
    return verified(dict_id, data)


def verified(dict_id: str, data: bytes) -> bytes:
    """``data`` if it is dictionary ``dict_id`` byte for byte, else ``ConfigurationError``.

    A damaged or edited file is refused rather than used: compressing with it would
    write payloads that no correct installation can read, and decompressing with it
    would return wrong bytes for every payload written with the real one.
    """
    digest = SHA256[dict_id]
    if hashlib.sha256(data).hexdigest() != digest:
        raise ConfigurationError(
            f"the zstd dictionary {dict_id!r} shipped with tierstore is damaged (its sha256 "
            f"is not {digest}); reinstall tierstore"
        )
    return data
