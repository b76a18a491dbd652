"""Where the shipped migrations live and how they are numbered.

Migrations are append-only files ``NNNN_name.sql`` (``.json`` for Mongo index
specs) under ``migrations/<backend>/``; the number is the schema version. A shipped
file is never edited: a change is a new file. Each backend applies the files it
has not applied yet, in order, and records them in its own version table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tierstore.errors import ConfigurationError

__all__ = ["Migration", "migrations_for"]

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(sql|json)$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str


def _root() -> Path:
    packaged = Path(__file__).parent / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def migrations_for(backend: str) -> list[Migration]:
    """The migrations of ``backend`` in order; refuses gaps and duplicates."""
    folder = _root() / backend
    if not folder.is_dir():
        raise ConfigurationError(f"no migrations shipped for {backend!r} (looked in {folder})")
    found: list[Migration] = []
    for path in sorted(folder.iterdir()):
        match = _NAME.match(path.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text("utf-8")))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise ConfigurationError(
                f"migrations/{backend}: expected version {expected:04d}, found "
                f"{migration.version:04d}_{migration.name}; files must be numbered without gaps"
            )
    return found
