"""``file:///dir`` — the embedded object store, and the reference ``ObjectStore``.

Keys are mapped to paths by percent-encoding every byte outside ``[A-Za-z0-9._-]``
per segment, so no key (``..``, ``/``, NUL, 10 KB of text) can escape the root;
over-long segments are replaced by their SHA-256. Writes go to a temporary file,
are fsynced and renamed into place, so a crash never leaves a half object under
its final name. Every object is instantly readable (storage class ``FILE``).
The URL takes no options; any given is refused by name.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from urllib.parse import quote, unquote

from tierstore.errors import ConfigurationError, InvalidInput, TierUnavailable
from tierstore.lifecycle import Lifecycle
from tierstore.records import ObjectInfo
from tierstore.settings import StoreUrl
from tierstore.tiers.base import ObjectStore

__all__ = ["FileStore"]

_MAX_SEGMENT = 200
_HASHED = "~h~"


def _encode_segment(segment: str) -> str:
    if not segment:
        raise InvalidInput("object key has an empty path segment")
    encoded = quote(segment, safe="_-.")
    if encoded in (".", ".."):
        encoded = encoded.replace(".", "%2E")
    if len(encoded) > _MAX_SEGMENT:
        return _HASHED + hashlib.sha256(segment.encode("utf-8")).hexdigest()
    return encoded


class FileStore(ObjectStore):
    """Objects as files under a root directory."""

    backend = "file"
    storage_class = "FILE"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._life = Lifecycle(f"file object store {self.root}")

    @classmethod
    def from_url(cls, url: StoreUrl) -> FileStore:
        if url.query:
            raise ConfigurationError(
                f"{url.masked!r}: file:// takes no options, got {', '.join(sorted(url.query))}")
        return cls(url.local_path())

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"object key must be a non-empty string, got {key!r}")
        return self.root.joinpath(*(_encode_segment(s) for s in key.split("/")))

    def _key(self, path: Path) -> str | None:
        parts = path.relative_to(self.root).parts
        if any(p.startswith(_HASHED) for p in parts) or path.name.endswith(".tmp"):
            return None
        return "/".join(unquote(p) for p in parts)

    async def setup(self) -> None:
        if not self._life.begin():
            return
        try:
            await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            self._life.failed()
            raise ConfigurationError(f"cannot create object directory {self.root}: {exc}") from exc
        self._life.opened()

    async def aclose(self) -> None:
        self._life.close()

    def _check(self) -> None:
        """A directory needs no opening, so only a closed store refuses: whoever closed
        it expects no more files to appear."""
        if self._life.is_closed:
            self._life.require()

    async def put(self, key: str, data: bytes, *, storage_class: str | None = None) -> None:
        self._check()
        path = self._path(key)
        await asyncio.to_thread(self._write, path, data)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{id(data):x}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise TierUnavailable(f"cannot write {path}: {exc}", tier="cold",
                                  backend="file") from exc

    async def get(self, key: str) -> bytes | None:
        self._check()
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TierUnavailable(f"cannot read {path}: {exc}", tier="cold",
                                  backend="file") from exc

    async def info(self, key: str) -> ObjectInfo | None:
        self._check()
        path = self._path(key)
        try:
            stat = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            return None
        return ObjectInfo(key=key, size=stat.st_size, storage_class=self.storage_class,
                          readable=True, restore_state="not-needed", modified=stat.st_mtime)

    async def delete(self, keys: Sequence[str]) -> None:
        self._check()

        def _unlink_all() -> None:
            for key in keys:
                self._path(key).unlink(missing_ok=True)

        await asyncio.to_thread(_unlink_all)

    def _prefix_dir(self, prefix: str) -> Path | None:
        """The directory that holds every key starting with ``prefix``: the one its whole
        segments name (a thread's objects are one directory, so listing them never
        walks the other threads'). None when no key can start with ``prefix``."""
        *dirs, _partial = prefix.split("/")
        if any(not d for d in dirs):
            return None  # keys have no empty segments
        encoded = [_encode_segment(d) for d in dirs]
        if any(e.startswith(_HASHED) for e in encoded):
            return None  # an over-long segment is hashed: its keys are not listed
        return self.root.joinpath(*encoded)

    async def iter_keys(self, prefix: str) -> AsyncIterator[str]:
        self._check()

        def _walk() -> list[str]:
            top = self._prefix_dir(prefix)
            if top is None or not top.is_dir():
                return []
            found = []
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    key = self._key(Path(dirpath) / name)
                    if key is not None and key.startswith(prefix):
                        found.append(key)
            return sorted(found)

        for key in await asyncio.to_thread(_walk):
            yield key

    async def restore(self, key: str, *, days: int | None = None) -> str:
        return "not-needed"
