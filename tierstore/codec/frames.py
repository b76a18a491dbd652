"""Framing of whole records as bytes, for stores that keep an assembled checkpoint.

A frame is a msgpack array whose first element is the frame format version; a
reader refuses versions it does not know with ``CorruptPayload`` instead of
guessing. Payload bytes inside a frame are carried as they are (already encoded).
"""

from __future__ import annotations

from typing import Any

import msgpack

from tierstore.codec.limits import Budget, DecodeLimits, charge_msgpack
from tierstore.errors import CorruptPayload
from tierstore.records import Payload, StoredCheckpoint, WriteRecord

__all__ = ["FRAME_VERSION", "pack_stored", "pack_write", "unpack_stored", "unpack_write"]

FRAME_VERSION = 1


def pack_write(write: WriteRecord) -> list[Any]:
    return [write.task_id, write.idx, write.channel, write.payload.tag, write.payload.data,
            write.task_path]


def unpack_write(raw: Any) -> WriteRecord:
    task_id, idx, channel, tag, data, task_path = raw
    return WriteRecord(task_id, int(idx), channel, Payload(tag, bytes(data)), task_path)


def pack_stored(record: StoredCheckpoint, *, with_writes: bool = True) -> bytes:
    body = [
        FRAME_VERSION,
        record.thread_id,
        record.checkpoint_ns,
        record.checkpoint_id,
        record.parent_id,
        [record.checkpoint.tag, record.checkpoint.data],
        [record.metadata.tag, record.metadata.data],
        {ch: [p.tag, p.data] for ch, p in record.blobs.items()},
        [pack_write(w) for w in record.writes] if with_writes else [],
    ]
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def unpack_stored(
    data: bytes, *, writes: tuple[WriteRecord, ...] | None = None, where: str = "frame",
    budget: Budget | None = None,
) -> StoredCheckpoint:
    """Unpack one frame; its bytes and msgpack elements are charged to ``budget`` (by
    default a fresh one of ``max_record_bytes``) before anything is built."""
    budget = budget if budget is not None else Budget(DecodeLimits().max_record_bytes, "record")
    budget.spend(len(data), where=where)
    charge_msgpack(data, budget, where=where)
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
        version = body[0]
        if version != FRAME_VERSION:
            raise CorruptPayload(f"{where}: unknown frame version {version!r}", where=where)
        (_, thread_id, ns, checkpoint_id, parent_id, cp, md, blobs, raw_writes) = body
        return StoredCheckpoint(
            thread_id=thread_id,
            checkpoint_ns=ns,
            checkpoint_id=checkpoint_id,
            parent_id=parent_id,
            checkpoint=Payload(cp[0], bytes(cp[1])),
            metadata=Payload(md[0], bytes(md[1])),
            blobs={ch: Payload(p[0], bytes(p[1])) for ch, p in blobs.items()},
            writes=writes if writes is not None else tuple(unpack_write(w) for w in raw_writes),
        )
    except CorruptPayload:
        raise
    except Exception as exc:
        raise CorruptPayload(f"{where}: damaged frame ({type(exc).__name__}: {exc})",
                             where=where) from exc
