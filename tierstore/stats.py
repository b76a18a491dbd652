"""Saver-wide event counters, shared by every region's caches and the read/write path."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Stats"]


@dataclass(slots=True)
class Stats:
    """Counters of one saver; cheap enough to bump on every call."""

    hot_hits: int = 0
    hot_misses: int = 0
    hot_stale: int = 0
    hot_errors: int = 0
    warm_reads: int = 0
    conflicts: int = 0
    offloaded: int = 0
    cold_reads: int = 0
    rehydrated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}
