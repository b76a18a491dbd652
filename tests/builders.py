"""Records as the tiers receive them, for tests that talk to a store directly.

The contract suites and the backend internals build the same records; one set of
builders keeps them comparable (a payload that differs between suites would make a
backend pass one suite on data the other never sends). Payloads are small, distinct
per checkpoint, and recognisable in a failure message (``cp-3``, ``md-3``).
"""

from __future__ import annotations

from typing import Any

from tierstore.records import BlobRecord, CheckpointRecord, Payload, StoredCheckpoint, WriteRecord


def cid(n: int) -> str:
    """Checkpoint ids that sort as their numbers do, as LangGraph's time-ordered ids do."""
    return f"1ef-{n:08d}"


def record(
    thread: str,
    n: int,
    *,
    parent: int | None = None,
    ns: str = "",
    run_id: str | None = None,
    versions: dict[str, str] | None = None,
    checkpoint: bytes | None = None,
    metadata: bytes | None = None,
    doc: dict[str, Any] | None = None,
) -> CheckpointRecord:
    """Checkpoint ``n`` of a thread, as the router hands it to a warm store."""
    return CheckpointRecord(
        thread_id=thread,
        checkpoint_ns=ns,
        checkpoint_id=cid(n),
        parent_id=cid(parent) if parent is not None else None,
        checkpoint=Payload("msgpack", checkpoint if checkpoint is not None else f"cp-{n}".encode()),
        metadata=Payload("msgpack", metadata if metadata is not None else f"md-{n}".encode()),
        # a copy: callers keep bumping their dict for the next checkpoint
        channel_versions=dict(versions) if versions else {},
        filter_doc=doc if doc is not None else {"step": n},
        run_id=run_id,
    )


def blob(channel: str, version: str, data: bytes, tag: str = "msgpack+zstd") -> BlobRecord:
    return BlobRecord(channel, version, Payload(tag, data))


def write(task: str, idx: int, value: str | bytes = b"v", channel: str = "ch",
          path: str = "") -> WriteRecord:
    data = value.encode() if isinstance(value, str) else value
    return WriteRecord(task, idx, channel, Payload("msgpack", data), path)


def cached_write(task: str, idx: int, value: bytes = b"v") -> WriteRecord:
    """A pending write as a cached entry carries it: with a task path the hot tier must keep."""
    return write(task, idx, value, path="path")


def entry(thread: str, checkpoint_id: str, *, ns: str = "", body: bytes = b"cp",
          writes: tuple[WriteRecord, ...] = (), version: int | None = None) -> StoredCheckpoint:
    """A cached checkpoint with every kind of field a hot tier must keep (a compressed
    body, an empty channel, a parent). Numeric ids get the warm version id + 1 unless one
    is given, so later checkpoints replace earlier ones as they would in a run."""
    if version is None:
        version = int(checkpoint_id) + 1 if checkpoint_id.isdigit() else 1
    return StoredCheckpoint(
        thread_id=thread,
        checkpoint_ns=ns,
        checkpoint_id=checkpoint_id,
        parent_id="parent",
        checkpoint=Payload("msgpack+zstd", body),
        metadata=Payload("msgpack", b"md"),
        blobs={"messages": Payload("msgpack", b"hello"), "empty": Payload("empty", b"")},
        writes=writes,
        version=version,
    )
