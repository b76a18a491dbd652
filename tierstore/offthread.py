"""Keeping CPU-heavy byte work off the event loop.

LangGraph's Agent Server refuses blocking calls on its loop, and a loop that spends
milliseconds compressing a large state stalls every other run it serves. File
system and SQLite calls always run in a thread; zstd, AES-GCM, SHA-256 and msgpack
work runs inline while its input is small and in a thread from ``LARGE`` bytes on::

    codec call on the loop ──inline()──► payload < LARGE ─► done inline
                                     └─► payload ≥ LARGE ─► OffLoop ─► whole call again
                                                             in a worker thread

The codec raises ``OffLoop`` (only inside ``inline()``, only on the thread that
entered it) before it touches a large payload, so the call is retried whole in a
thread; what ran before it is pure and is simply done again. A caller that knows the
size up front (a stored record's payload headers) passes it, and a large call goes to
the thread at once. A payload's bytes count once: its decompressed size.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["LARGE", "OffLoop", "check", "inline", "room", "run"]

T = TypeVar("T")

LARGE = 64 * 1024
"""Bytes from which zstd, AES-GCM, SHA-256 and msgpack work leaves the loop. Measured
on this project's 2-core machine (LangChain message lists, zstd level 3): a thread hop
costs ~110 µs (p50); compressing 64 KiB takes ~85 µs and 128 KiB ~190 µs, decompressing
and decrypting stay below the hop until ~256 KiB. Below 64 KiB the hop would cost more
than the work it moves; above it the loop would stall for longer than a hop."""

_local = threading.local()


class OffLoop(BaseException):
    """Raised inside ``inline()`` before large byte work; never escapes ``run``.

    A ``BaseException`` so that no ``except Exception`` on the way (a serde wrapper,
    an error translation) turns it into an error.
    """


@contextmanager
def inline() -> Iterator[None]:
    """Mark this thread as the event loop for ``check`` while the block runs."""
    before = getattr(_local, "inline", False), getattr(_local, "seen", 0)
    _local.inline, _local.seen = True, 0
    try:
        yield
    finally:
        _local.inline, _local.seen = before


def check(size: int) -> None:
    """Called before byte work of ``size`` bytes: refuses it inside ``inline()`` once the
    call's byte work so far reaches ``LARGE`` (one large payload, or many that are not)."""
    if not getattr(_local, "inline", False):
        return
    _local.seen = seen = getattr(_local, "seen", 0) + size
    if seen >= LARGE:
        raise OffLoop


def room() -> int | None:
    """Bytes of work left before ``LARGE`` inside ``inline()``; None outside it."""
    if not getattr(_local, "inline", False):
        return None
    return max(0, LARGE - getattr(_local, "seen", 0))


async def run(fn: Callable[[], T], *, size: int = 0) -> T:
    """``fn()`` on the loop if it only meets small payloads, else in a worker thread.

    ``size``: the bytes the caller knows ``fn`` will work on; from ``LARGE`` on, ``fn``
    goes to the thread at once instead of starting on the loop and being redone there."""
    if size < LARGE:
        try:
            with inline():
                return fn()
        except OffLoop:
            pass
    return await asyncio.to_thread(fn)
