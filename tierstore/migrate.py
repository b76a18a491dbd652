"""Where the shipped migrations live and how they are numbered.

Migrations are append-only files ``NNNN_name.sql`` (``.json`` for Mongo index
specs) under ``migrations/<backend>/``; the number is the schema version. A shipped
file is never edited: a change is a new file. Each backend applies the files it
has not applied yet, in order, and records them in its own version table.

What the runners share lives here: which migrations are pending (``pending``), the
loop that applies them in order (``apply_pending``), and splitting a SQL script
into statements (``sql_statements``). How one migration is applied — in which
transaction, under which lock, how its version is recorded — stays in the backend.

Reading the files is file system work: async callers use ``shipped`` and
``apply_pending``, which read them in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from tierstore.errors import ConfigurationError

__all__ = ["Migration", "apply_pending", "migrations_for", "pending", "shipped",
           "sql_statements"]

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


async def shipped(backend: str) -> list[Migration]:
    """``migrations_for`` read in a worker thread: for code running on the event loop."""
    return await asyncio.to_thread(migrations_for, backend)


def pending(backend: str, applied: Collection[int]) -> list[Migration]:
    """The shipped migrations of ``backend`` whose version is not in ``applied``, in order.

    ``applied`` is the store's version table read as a set: a version another process
    recorded meanwhile is skipped, wherever it falls in the sequence.
    """
    return [m for m in migrations_for(backend) if m.version not in applied]


async def apply_pending(
    backend: str,
    *,
    applied: Collection[int],
    apply: Callable[[Migration], Awaitable[None]],
) -> int:
    """Await ``apply`` on each pending migration in order; returns how many were applied.

    ``apply`` runs one migration and records its version, atomically where the store
    allows, so a crash between two migrations leaves the version table telling the
    truth and the next start resumes after the last one recorded.
    """
    todo = await asyncio.to_thread(pending, backend, applied)
    for migration in todo:
        await apply(migration)
    return len(todo)


_DOLLAR = re.compile(r"\$[A-Za-z_]*\$")


def sql_statements(script: str) -> list[str]:
    """Split a SQL script at ``;`` line ends, keeping dollar-quoted bodies whole.

    For scripts a driver cannot run in one call (SQLite's ``execute``, PostgreSQL
    outside a transaction). Shipped files keep each statement's ``;`` at a line end,
    which is all this relies on: no SQL parser. Whole-line ``--`` comments outside a
    quoted body are dropped; a statement that is only ``;`` is dropped.
    """
    out: list[str] = []
    buf: list[str] = []
    quote: str | None = None
    for line in script.splitlines():
        if quote is None and line.strip().startswith("--"):
            continue
        buf.append(line)
        for tag in _DOLLAR.findall(line):
            if quote is None:
                quote = tag
            elif tag == quote:
                quote = None
        if quote is None and line.rstrip().endswith(";"):
            statement = "\n".join(buf).strip()
            if statement.rstrip(";").strip():
                out.append(statement)
            buf = []
    rest = "\n".join(buf).strip()
    if rest:
        out.append(rest)
    return out
