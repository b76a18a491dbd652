"""Operator actions behind the CLI: status, inspect, verify, export, import, migration.

Each is an async function over an opened ``TieredSaver`` that returns plain data
(the CLI renders it as a table or as JSON) and reports progress through an optional
callback, so long work can show a progress bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from dataclasses import replace as replace_record
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import msgpack
import zstandard

from tierstore import offthread
from tierstore.codec import Codec
from tierstore.codec.chain import ChainLink, channel_of, is_link_name, resolve_values
from tierstore.codec.frames import pack_stored, unpack_stored
from tierstore.codec.limits import Budget, DecodeLimits, bounded_decompress, charge_msgpack
from tierstore.codec.pipeline import EMPTY
from tierstore.codec.segment import SEGMENT_PREFIX
from tierstore.cost import (
    ColdUsage,
    Prices,
    StoreSizes,
    merge_prices,
    parse_assignments,
    parse_price_file,
)
from tierstore.cost import status_cost as cost_of_store
from tierstore.errors import (
    CheckpointArchived,
    ConfigurationError,
    CorruptPayload,
    InvalidInput,
    TierstoreError,
)
from tierstore.offload import OFFLOAD_PREFIX
from tierstore.offthread import check as check_size
from tierstore.policy import (
    CHECKPOINT_ID_SKEW,
    MAX_ID_BYTES,
    checked_channel_name,
    validate_checkpoint_id,
    validate_id,
)
from tierstore.records import (
    BlobRecord,
    CheckpointRecord,
    ListQuery,
    Payload,
    StoredCheckpoint,
    TierUsage,
    WriteRecord,
)
from tierstore.region import Region
from tierstore.saver import TieredSaver
from tierstore.settings import PRICES_FILE_VARIABLE, PRICES_VARIABLE

__all__ = [
    "EXPORT_FORMAT",
    "check_bundle",
    "export_thread",
    "import_file",
    "import_langgraph_postgres",
    "inspect_thread",
    "load_prices",
    "status",
    "status_cost",
    "verify",
]

Progress = Callable[[int, int | None], None]
EXPORT_MAGIC = b"TSEXPORT"
EXPORT_FORMAT = 1


def _noop(done: int, total: int | None) -> None:
    return None


async def status(saver: TieredSaver, *, floors: Mapping[str, int] | None = None,
                 progress: Callable[[int, int | None], None] | None = None
                 ) -> dict[str, Any]:
    """Threads, checkpoints and bytes per tier (per region when there are several), and
    the heads tiering workers hold claimed (a worker killed mid-run leaves its claims).

    Cold objects are also counted per storage class (``by_class``), where
    ``floored_bytes`` raises each object to its class's minimum billed size in
    ``floors`` (bytes by class name). ``progress`` is told how many cold objects have
    been looked at (one request each), with no total (the listing streams).
    """
    out: dict[str, Any] = {"regions": {}}
    looked = 0
    for name, region in saver.regions.by_name.items():
        warm = await region.warm.usage()
        # claims past now: live workers' or those of a worker that died mid-run
        claims = await region.warm.held_claims(now=time.time())
        row: dict[str, Any] = {
            "hot": {"backend": region.hot.backend} if region.hot is not None else None,
            "warm": {"backend": region.warm.backend, **asdict(warm), "claims": asdict(claims)},
            "cold": None,
        }
        if region.cold is not None:
            counts: dict[str, list[int]] = {"segments": [0, 0], "offload": [0, 0],
                                             "restores": [0, 0]}
            by_class: dict[str, dict[str, int]] = {}
            async for key in region.cold.iter_keys(""):
                kind = ("segments" if key.startswith(SEGMENT_PREFIX) else
                        "offload" if key.startswith(OFFLOAD_PREFIX) else "restores")
                info = await region.cold.info(key)
                looked += 1
                if progress is not None:
                    progress(looked, None)
                size = info.size if info is not None else 0
                counts[kind][0] += 1
                counts[kind][1] += size
                if info is not None:
                    held = by_class.setdefault(info.storage_class,
                                               {"objects": 0, "bytes": 0, "floored_bytes": 0})
                    held["objects"] += 1
                    held["bytes"] += size
                    held["floored_bytes"] += max(size, (floors or {}).get(info.storage_class, 0))
            row["cold"] = {
                "backend": region.cold.backend,
                "archived_checkpoints": warm.archived,
                **{f"{kind}_objects": n for kind, (n, _) in counts.items()},
                **{f"{kind}_bytes": b for kind, (_, b) in counts.items()},
                "by_class": by_class,
            }
        out["regions"][name] = row
    return out


async def status_cost(saver: TieredSaver, prices: Prices, *,
                      cold_reads_per_month: float | None = None,
                      progress: Callable[[int, int | None], None] | None = None
                      ) -> dict[str, Any]:
    """``status`` and what each region's stores cost a month at their present size
    (``tierstore.cost.status_cost``). A Redis hot tier is scanned for the memory of its
    keys; a cold tier is listed object by object, as ``status`` does."""
    floors = {name: int(price.min_object_kb * 1024) for name, price in prices.cold.items()}
    out = await status(saver, floors=floors, progress=progress)
    bills: dict[str, Any] = {}
    total = 0.0
    for name, region in saver.regions.by_name.items():
        row = out["regions"][name]
        hot_bytes: int | None = None
        if isinstance(region.hot, _ReportsUsage):
            hot_bytes = (await region.hot.usage()).bytes
            row["hot"]["bytes"] = hot_bytes
        cold = row["cold"]
        sizes = StoreSizes(
            hot_backend=region.hot.backend if region.hot is not None else None,
            hot_bytes=hot_bytes, warm_backend=region.warm.backend,
            warm_bytes=row["warm"]["bytes"], warm_checkpoints=row["warm"]["checkpoints"],
            warm_archived=row["warm"]["archived"],
            cold_backend=cold["backend"] if cold else None,
            cold=tuple(ColdUsage(storage_class=klass, **held)
                       for klass, held in sorted((cold or {}).get("by_class", {}).items())),
        )
        bill = cost_of_store(sizes, prices, region=name,
                             cold_reads_per_month=cold_reads_per_month)
        bills[name] = bill.as_dict()
        total += bill.total
    out["cost"] = {"regions": bills, "total": total, "prices": dict(prices.source),
                   "requests": "storage only" if cold_reads_per_month is None else
                   "storage and cold reads"}
    return out


def load_prices(file: str | Path | None = None, *, env_file: str | None = None,
                env_pairs: Sequence[str] = (), flag_pairs: Sequence[str] = ()) -> Prices:
    """The shipped prices (tierstore/prices.toml), then a price file (``file``, else
    ``env_file``), then ``TIERSTORE_PRICES`` pairs, then ``--price`` pairs: each key
    of a later one over an earlier (``tierstore.cost.merge_prices`` checks them all)."""
    shipped = resources.files("tierstore").joinpath("prices.toml").read_text("utf-8")
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("tierstore/prices.toml", parse_price_file(shipped, "tierstore/prices.toml"))]
    chosen = file if file is not None else env_file
    if chosen is not None:
        where = str(chosen) if file is not None else f"{chosen} ({PRICES_FILE_VARIABLE})"
        try:
            text = _file_path(chosen).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read the price file {where}: {exc}") from exc
        layers.append((where, parse_price_file(text, where)))
    if env_pairs:
        layers.append((PRICES_VARIABLE, parse_assignments(env_pairs, PRICES_VARIABLE)))
    if flag_pairs:
        layers.append(("--price", parse_assignments(flag_pairs, "--price")))
    return merge_prices(layers)


@runtime_checkable
class _ReportsUsage(Protocol):
    """A hot tier that can tell how much memory its keys hold (Redis)."""

    async def usage(self) -> TierUsage: ...


async def inspect_thread(saver: TieredSaver, thread_id: str) -> dict[str, Any]:
    """The checkpoint tree of one thread with the tier of every checkpoint."""
    thread_id = validate_id(thread_id)
    region = saver.regions.for_thread(thread_id)
    namespaces: dict[str, list[dict[str, Any]]] = defaultdict(list)
    cached: dict[str, str | None] = {}
    async for row in region.warm.list(ListQuery(thread_id=thread_id)):
        ns = row.checkpoint_ns
        if ns not in cached:
            cached[ns] = (await region.cache.peek(thread_id, ns)
                          if region.cache is not None else None)
        metadata = saver.codec.decode(row.metadata, where="metadata")
        tier = "warm" if row.location == "warm" else "cold"
        if cached.get(ns) == row.checkpoint_id:
            tier = "hot+warm" if tier == "warm" else "hot+cold"
        namespaces[ns].append({
            "checkpoint_id": row.checkpoint_id,
            "parent_id": row.parent_id,
            "tier": tier,
            "segment": row.archive_key,
            "source": metadata.get("source") if isinstance(metadata, dict) else None,
            "step": metadata.get("step") if isinstance(metadata, dict) else None,
            "writes": len(row.writes),
        })
    if not namespaces:
        raise InvalidInput(f"thread {thread_id!r} has no checkpoints")
    return {"thread_id": thread_id, "namespaces": dict(namespaces)}


EMPTY_WITHOUT_ROWS = frozenset({"postgres"})
"""Warm backends that store no blob for an empty channel (a version with no value):
there, a version without a blob is missing only if a segment shows it had a value, or
if the store reports a link of its delta chain lost (a link is never empty)."""


async def verify(saver: TieredSaver, progress: Progress = _noop) -> dict[str, Any]:
    """Re-check every stored payload and that every checkpoint is complete.

    Checksums (segments, offloaded objects), decodability (checkpoints, metadata,
    blobs, pending writes), and referential completeness: every channel version a
    checkpoint names resolves (a warm blob, an offloaded object, or its segment's
    copy), every pending write decodes, every stub's segment holds it. A checkpoint
    that names a value no tier holds reads back with a channel missing; each one is
    named in ``problems`` (and in ``broken``, by thread, namespace and id).
    """
    checked = 0
    problems: list[str] = []
    broken: list[dict[str, str]] = []
    skipped: list[str] = []

    def bad(row: StoredCheckpoint, why: str) -> None:
        problems.append(f"{row.thread_id!r}/{row.checkpoint_ns!r}/{row.checkpoint_id}: {why}")
        broken.append({"thread_id": row.thread_id, "checkpoint_ns": row.checkpoint_ns,
                       "checkpoint_id": row.checkpoint_id, "problem": why})

    for region in saver.regions.distinct():
        by_segment: dict[str, list[StoredCheckpoint]] = defaultdict(list)
        live: list[StoredCheckpoint] = []
        async for row in region.warm.list(ListQuery()):
            checked += 1
            progress(checked, None)
            if row.location == "archived" and row.archive_key is not None:
                by_segment[row.archive_key].append(row)
            else:
                live.append(row)
        keeps_empty = region.warm.backend not in EMPTY_WITHOUT_ROWS
        # (thread, ns, channel, version) -> whether a segment holds a value for it
        archived_values: dict[tuple[str, str, str, str], bool] = {}
        for key, stubs in by_segment.items():
            try:
                segment = await region.archive.load_segment(key)
            except CheckpointArchived:
                skipped.append(key)
                continue
            except TierstoreError as exc:
                problems.append(f"segment {key}: {exc}")
                for stub in stubs:
                    bad(stub, f"its segment {key} cannot be read ({exc})")
                continue
            for stub in stubs:
                found = segment.records.get(stub.checkpoint_id)
                if found is None:
                    problems.append(f"segment {key}: missing checkpoint {stub.checkpoint_id}")
                    bad(stub, f"segment {key} does not hold it")
                    continue
                record = replace(found, thread_id=stub.thread_id,
                                 checkpoint_ns=stub.checkpoint_ns, writes=stub.writes)
                versions = await _check_record(saver, region, record, bad, keeps_empty,
                                               archived=None, segment_writes=found.writes)
                chained = {channel_of(name) for name in found.blobs if name not in versions}
                for ch, version in versions.items():
                    payload = found.blobs.get(ch)
                    archived_values[(stub.thread_id, stub.checkpoint_ns, ch, version)] = (
                        (payload is not None and payload.tag != EMPTY.tag) or ch in chained)
        for row in live:
            await _check_record(saver, region, row, bad, keeps_empty, archived=archived_values)
    return {"checked": checked, "problems": problems, "broken": broken,
            "skipped_need_restore": skipped, "ok": not problems}


async def _check_record(
    saver: TieredSaver, region: Region, row: StoredCheckpoint,
    bad: Callable[[StoredCheckpoint, str], None], keeps_empty: bool, *,
    archived: dict[tuple[str, str, str, str], bool] | None,
    segment_writes: tuple[Any, ...] = (),
) -> dict[str, str]:
    """Decode one checkpoint (live, or a stub's segment copy) and check it resolves.

    Returns its channel versions. ``archived`` (live rows only) says which versions
    a segment holds a value for: such a version must have a blob in warm too.
    """
    where = f"{row.thread_id!r}/{row.checkpoint_ns!r}/{row.checkpoint_id}"
    try:
        full = await region.expand(replace(
            row, writes=(*row.writes, *segment_writes)))
        body = saver.codec.decode(full.checkpoint, where=where)
        saver.codec.decode(full.metadata, where=where)
    except TierstoreError as exc:
        bad(row, str(exc))
        return {}
    named = body.get("channel_versions") if isinstance(body, dict) else None
    for channel, payload in full.blobs.items():
        if payload.tag == EMPTY.tag or (is_link_name(channel) and channel not in (named or {})):
            continue  # delta links: replayed below (_check_chains)
        try:
            value = saver.codec.decode(payload, where=where)
        except TierstoreError as exc:
            bad(row, f"channel {channel!r} does not decode ({exc})")
            continue
        if isinstance(value, ChainLink):
            bad(row, f"channel {channel!r}: a delta link stored as the channel's value")
    for write in full.writes:
        try:
            saver.codec.decode(write.payload, where=where)
        except TierstoreError as exc:
            bad(row, f"pending write {write.task_id!r}/{write.idx} of channel "
                     f"{write.channel!r} does not decode ({exc})")
    raw = body.get("channel_versions") if isinstance(body, dict) else None
    versions = {str(ch): str(v) for ch, v in (raw or {}).items()}
    chained = _check_chains(saver.codec, full, versions, where, bad)
    # a link the store found no value for (never empty, unlike a channel: lost on
    # every backend, PostgreSQL included)
    lost_links = {channel_of(name) for name in row.missing if name not in versions}
    for channel, version in sorted(versions.items()):
        if channel in full.blobs or channel in chained:
            continue
        key = (row.thread_id, row.checkpoint_ns, channel, version)
        if (keeps_empty or channel in lost_links
                or (archived is not None and archived.get(key, False))):
            bad(row, f"channel {channel!r} version {version} resolves nowhere "
                     "(no warm blob, no offloaded object, no segment copy)")
    return versions


def _check_chains(codec: Codec, row: StoredCheckpoint, versions: Mapping[str, str], where: str,
                  bad: Callable[[StoredCheckpoint, str], None]) -> set[str]:
    """The channels a checkpoint stores as delta chains; a chain that does not replay
    (a link missing, out of order, not a link) is reported as a problem."""
    links = {name: p for name, p in row.blobs.items()
             if name not in versions and is_link_name(name)}
    if not links:
        return set()
    try:
        decoded = {name: codec.decode(p, where=f"{where} {name!r}") for name, p in links.items()}
        return set(resolve_values(versions, decoded, where=where).chains)
    except TierstoreError as exc:
        bad(row, f"a delta chain does not replay ({exc})")
        return {channel_of(name) for name in links}


def whole_values(codec: Codec, record: StoredCheckpoint) -> StoredCheckpoint:
    """The record with its delta chains replayed into whole values, encoded by ``codec``.

    An export carries whole values: any release of tierstore imports it, and an import
    never has to trust a chain it did not write. For the same reason its payloads are
    compressed without a dictionary (``Codec.portable``).
    """
    if not any(is_link_name(name) for name in record.blobs):
        return _portable(codec, record)
    where = f"thread {record.thread_id!r} checkpoint {record.checkpoint_id!r}"
    body = codec.decode(record.checkpoint, where=where)
    versions = body.get("channel_versions") if isinstance(body, dict) else None
    versions = versions if isinstance(versions, dict) else {}
    links = [name for name in record.blobs if name not in versions and is_link_name(name)]
    if not links:
        return _portable(codec, record)
    decoded = {name: codec.decode(record.blobs[name], where=f"{where} {name!r}")
               for name in links}
    resolved = resolve_values(versions, decoded, where=where)
    blobs = {name: p for name, p in record.blobs.items() if name not in decoded}
    for channel, value in resolved.values.items():
        blobs.setdefault(channel, codec.encode(value))
    return _portable(codec, replace(record, blobs=blobs))


def _portable(codec: Codec, record: StoredCheckpoint) -> StoredCheckpoint:
    where = f"thread {record.thread_id!r} checkpoint {record.checkpoint_id!r}"
    return replace(
        record,
        checkpoint=codec.portable(record.checkpoint, where=where),
        metadata=codec.portable(record.metadata, where=f"{where} metadata"),
        blobs={name: codec.portable(p, where=f"{where} {name!r}")
               for name, p in record.blobs.items()},
        writes=tuple(replace(w, payload=codec.portable(w.payload, where=f"{where} write"))
                     for w in record.writes),
    )


# -- export / import ----------------------------------------------------------------------


async def export_thread(saver: TieredSaver, thread_id: str, path: str | Path,
                        progress: Progress = _noop) -> dict[str, Any]:
    """Write one thread (every namespace, archived history included) to a portable file."""
    thread_id = validate_id(thread_id)
    frames: list[bytes] = []
    query = ListQuery(thread_id=thread_id)
    codec = saver.codec
    async for record in saver.alist_records(query):
        frames.append(await offthread.run(partial(_export_frame, codec, record)))
        progress(len(frames), None)
    if not frames:
        raise InvalidInput(f"thread {thread_id!r} has no checkpoints to export")
    frames.reverse()  # oldest first
    target = _file_path(path)
    data = await asyncio.to_thread(_export_bytes, thread_id, frames, time.time())
    await asyncio.to_thread(_write_atomically, target, data)
    return {"thread_id": thread_id, "checkpoints": len(frames), "bytes": len(data),
            "path": str(path)}


def _export_frame(codec: Codec, record: StoredCheckpoint) -> bytes:
    """One checkpoint of an export (decoded and packed: in a thread when large)."""
    frame = whole_values(codec, record)
    check_size(sum(len(p.data) for p in (frame.checkpoint, *frame.blobs.values(),
                                          *(w.payload for w in frame.writes))))
    return pack_stored(frame)


def _export_bytes(thread_id: str, frames: list[bytes], now: float) -> bytes:
    """The export file's bytes: compressed whole, behind a checksum (run in a thread)."""
    body = zstandard.ZstdCompressor(level=9).compress(msgpack.packb({
        "format": EXPORT_FORMAT, "thread_id": thread_id, "exported_at": now,
        "checkpoints": frames,
    }, use_bin_type=True))
    return EXPORT_MAGIC + bytes([EXPORT_FORMAT]) + hashlib.sha256(body).digest() + body


def _file_path(path: Any) -> Path:
    """A filesystem path argument, refused by name when it is not one."""
    if isinstance(path, bool) or not isinstance(path, str | os.PathLike):
        raise InvalidInput(f"file path must be a string or a path, got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InvalidInput(f"not a usable file path: {text!r}")
    try:
        os.fsencode(text)
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"file path {text!r} has no form in the filesystem's encoding"
                           ) from exc
    return Path(text)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it holds the old bytes or the new, never a torn file.

    A temporary file beside the target is written, fsynced and renamed over it; on any
    failure the temporary is removed and the error names the path. A missing directory
    is the caller's mistake (``InvalidInput``), not created on their behalf.
    """
    if not path.parent.is_dir():
        raise InvalidInput(f"cannot write export to {str(path)!r}: directory "
                           f"{str(path.parent)!r} does not exist")
    if path.is_dir():
        raise InvalidInput(f"cannot write export to {str(path)!r}: it is a directory")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise InvalidInput(
            f"cannot write export to {str(path)!r}: {exc.strerror or exc}") from exc


def read_export(data: bytes, *, where: str = "export",
                max_bytes: int = DecodeLimits().max_bundle_bytes
                ) -> tuple[str, list[StoredCheckpoint]]:
    """Check an export file's framing and checksum and unpack its frames (no payload decoded).

    The checksum only proves the file is intact, not who wrote it: anyone can recompute
    it, so what comes out is still untrusted (see ``check_bundle``).
    """
    head = len(EXPORT_MAGIC)
    if data[:head] != EXPORT_MAGIC or len(data) < head + 33:
        raise CorruptPayload(f"{where}: not a tierstore export file", where=where)
    if data[head] != EXPORT_FORMAT:
        raise CorruptPayload(f"{where}: unsupported export format {data[head]}", where=where)
    digest, body = data[head + 1:head + 33], data[head + 33:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptPayload(f"{where}: export file fails its checksum", where=where)
    plain = bounded_decompress(body, limit=max_bytes, where=where, what="bundle")
    budget = Budget(max_bytes, "bundle")
    budget.spend(len(plain), where=where)
    charge_msgpack(plain, budget, where=where)
    try:
        doc = msgpack.unpackb(plain, raw=False)
        frames = doc["checkpoints"]
        raw_thread = doc["thread_id"]
        if not isinstance(frames, list):
            raise TypeError("checkpoints is not a list")
    except Exception as exc:
        raise CorruptPayload(f"{where}: damaged export body ({exc})", where=where) from exc
    thread_id = validate_id(raw_thread)
    return thread_id, [unpack_stored(f, where=f"{where}#{i}", budget=budget)
                       for i, f in enumerate(frames)]


Prepared = tuple[CheckpointRecord, list[BlobRecord], list[WriteRecord]]


INT64_MAX = 2**63 - 1


def _check_write(write: WriteRecord, where: str) -> None:
    """A pending write's fields as every warm store can hold them (``InvalidInput`` if not)."""
    validate_id(write.task_id, what=f"{where}: task_id")
    validate_id(write.channel, what=f"{where}: channel")
    validate_id(write.task_path, what=f"{where}: task_path")
    idx = write.idx
    if isinstance(idx, bool) or not isinstance(idx, int) or not -INT64_MAX - 1 <= idx <= INT64_MAX:
        raise InvalidInput(f"{where}: write index {str(idx)[:40]} is not a 64-bit integer")


def check_bundle(codec: Codec, source: str, thread_id: str, records: Sequence[StoredCheckpoint],
                 *, now: float, filter_doc: Callable[[Mapping[str, Any]], dict[str, Any]],
                 max_bytes: int, skew: float = CHECKPOINT_ID_SKEW,
                 store_codec: Codec | None = None) -> list[Prepared]:
    """Validate every checkpoint of an import and build what will be written.

    Nothing is written until all of it passed: ids are what LangGraph generates, every
    frame belongs to the bundle's thread, every name a store keeps (namespace, channel
    names and versions, task ids and paths, run id) is text the stores accept, write
    indexes fit 64 bits, and every payload (checkpoint, metadata, channel values,
    pending writes) decodes under ``codec`` (the untrusted codec: safe allowlist,
    bounded per payload, per checkpoint and for the whole file). A breach found here
    is a refusal before any write, never a failure half way through one.

    With ``store_codec`` (the saver's own codec) every decoded value is encoded again
    through it, so what lands in the stores follows the saver's compression and
    encryption settings rather than the file's bytes.
    """
    total = Budget(max_bytes, "bundle")
    seen: set[tuple[str, str]] = set()
    out: list[Prepared] = []

    def again(value: Any, payload: Payload) -> Payload:
        return store_codec.encode(value) if store_codec is not None else payload

    for rec in records:
        where = f"checkpoint {str(rec.checkpoint_id)[:80]!r}"
        if rec.thread_id != source:
            raise CorruptPayload(f"{where}: belongs to thread {str(rec.thread_id)[:80]!r}, "
                                 f"not to the bundle's thread", where=where)
        ns = validate_id(rec.checkpoint_ns, what="checkpoint_ns")
        checkpoint_id = validate_checkpoint_id(rec.checkpoint_id, now, skew=skew)
        parent_id = (validate_checkpoint_id(rec.parent_id, now, skew=skew)
                     if rec.parent_id is not None else None)
        if (ns, checkpoint_id) in seen:
            raise CorruptPayload(f"{where}: appears twice in the bundle", where=where)
        seen.add((ns, checkpoint_id))
        budget = codec.budget()
        body = codec.decode(rec.checkpoint, where=where, budget=budget)
        metadata = codec.decode(rec.metadata, where=f"{where} metadata", budget=budget)
        if (not isinstance(body, dict) or not isinstance(metadata, dict)
                or not isinstance(body.get("channel_versions", {}), dict)
                or body.get("id", checkpoint_id) != checkpoint_id):
            raise CorruptPayload(f"{where}: not a checkpoint", where=where)
        versions = {checked_channel_name(validate_id(str(k), what=f"{where}: channel name"),
                                         what=f"{where}: channel name"):
                    validate_id(str(v), what=f"{where}: channel version")
                    for k, v in body.get("channel_versions", {}).items()}
        blobs: list[BlobRecord] = []
        links: dict[str, Any] = {}
        for channel, payload in rec.blobs.items():
            if channel not in versions:
                if is_link_name(channel):  # a delta chain: replayed (checked) below
                    links[channel] = codec.decode(payload, where=f"{where} {channel!r}",
                                                  budget=budget)
                continue
            stored = payload
            if payload.tag != EMPTY.tag:
                value = codec.decode(payload, where=f"{where} channel {channel!r}",
                                     budget=budget)
                if isinstance(value, ChainLink):  # a link passed off as a whole value
                    raise CorruptPayload(f"{where} channel {channel!r}: a delta link stored "
                                         "as the channel's value", where=where)
                stored = again(value, payload)
            blobs.append(BlobRecord(channel, versions[channel], stored))
        if links:
            whole = {b.channel for b in blobs}
            resolved = resolve_values(versions, links, where=where)
            blobs.extend(BlobRecord(channel, versions[channel],
                                    (store_codec or codec).encode(value))
                         for channel, value in resolved.values.items() if channel not in whole)
        writes: list[WriteRecord] = []
        for write in rec.writes:
            _check_write(write, where)
            value = codec.decode(write.payload, where=f"{where} write", budget=budget)
            if isinstance(value, ChainLink):
                raise CorruptPayload(f"{where}: a delta link stored as a pending write",
                                     where=where)
            writes.append(replace(write, payload=again(value, write.payload)))
        total.spend(budget.used, where=where)
        run_id = metadata.get("run_id")
        if isinstance(run_id, str):
            validate_id(run_id, what=f"{where}: run_id")
        try:
            doc = filter_doc(metadata)
            # the stores keep the filter document as JSON text (NUL has no place there)
            _check_text(doc, f"{where}: metadata")
        except TierstoreError:
            raise
        except Exception as exc:
            raise InvalidInput(f"{where}: metadata cannot be stored ({exc})") from exc
        record = CheckpointRecord.new(
            thread_id=thread_id, checkpoint_ns=ns, checkpoint_id=checkpoint_id,
            parent_id=parent_id, checkpoint=again(body, rec.checkpoint),
            metadata=again(metadata, rec.metadata),
            channel_versions=versions, filter_doc=doc, run_id=run_id,
        )
        out.append((record, blobs, writes))
    return out


def _check_text(value: Any, where: str) -> None:
    """Every string (keys included) in a JSON-like document is text the stores accept."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            validate_id(item, what=where)
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


TRANSACTIONAL_PUBLISH = frozenset({"sqlite", "postgres"})
"""Warm backends whose ``publish_thread`` is one transaction (check, delete, copy)."""


async def import_file(saver: TieredSaver, path: str | Path, *, as_thread: str | None = None,
                      replace: bool = False, limits: DecodeLimits | None = None,
                      allowed_msgpack_modules: Sequence[tuple[str, ...]] = (),
                      progress: Progress = _noop) -> dict[str, Any]:
    """Load an export into the saver's stores: all of it, or nothing.

    The file is untrusted whatever its checksum says: every id and every payload is
    checked (``check_bundle``) before the first write, under the saver's bounds (or
    ``limits``) and its safe allowlist plus ``allowed_msgpack_modules``, and every
    value is encoded again through the saver's codec (its compression, its
    encryption). The checkpoints are always written under a staging id first (see
    ``_staging_thread``; never into the target directly) and published with one
    ``publish_thread``, which refuses a target that has checkpoints by then (created
    while the import ran, say) unless ``replace`` is given; with ``replace`` the old
    thread is swapped for the import in that same step, so it is never deleted before
    the import is fully written. If anything fails, what this import wrote is
    deleted again and the target is as it was (MongoDB, which publishes without a
    transaction, keeps the staging thread instead when a replace fails mid-copy).
    """
    try:
        data = await asyncio.to_thread(_file_path(path).read_bytes)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc
    codec = saver.untrusted_codec
    if limits is not None or allowed_msgpack_modules:
        codec = Codec(codec.serde, limits=limits or codec.limits, keyring=codec.keyring,
                      dictionary=codec.dictionary).untrusted(
            [*saver.options.allowed_msgpack_modules, *allowed_msgpack_modules])
    limit = codec.limits.max_bundle_bytes
    source, records = await asyncio.to_thread(read_export, data, where=str(path),
                                              max_bytes=limit)
    del data
    thread_id = validate_id(as_thread) if as_thread is not None else source
    store_codec = saver.codec
    prepared = await asyncio.to_thread(
        partial(check_bundle, codec, source, thread_id, records, now=time.time(),
                filter_doc=saver.filter_doc, max_bytes=limit,
                skew=saver.options.checkpoint_id_skew, store_codec=store_codec))
    if not prepared:
        raise InvalidInput(f"{path}: the file holds no checkpoints")
    region = saver.regions.for_thread(thread_id)
    exists = False
    async for _ in region.warm.list(ListQuery(thread_id=thread_id, limit=1)):
        exists = True
    if exists and not replace:
        raise InvalidInput(
            f"thread {thread_id[:200]!r} already exists; import it under another id "
            "(--as-thread) or replace it (--replace)"
        )
    staging = _staging_thread(saver, thread_id, region)
    try:
        for done, (record, blobs, writes) in enumerate(prepared, start=1):
            await saver.aput_record(replace_record(record, thread_id=staging), blobs, writes)
            progress(done, len(prepared))
    except BaseException:
        await asyncio.shield(saver.threads.delete_thread(staging))
        raise
    try:
        await saver.threads.publish_thread(staging, thread_id, replace=replace)
    except BaseException as exc:
        atomic = region.warm.backend in TRANSACTIONAL_PUBLISH
        if replace and not atomic and not isinstance(exc, InvalidInput):
            # the old thread may be gone already: keep the whole import where it is
            exc.add_note(f"the imported checkpoints are kept in thread {staging!r}")
            raise
        await asyncio.shield(saver.threads.delete_thread(staging))
        raise
    await asyncio.shield(saver.threads.delete_thread(staging))
    return {"thread_id": thread_id, "source_thread_id": source, "checkpoints": len(prepared),
            "replaced": exists}


STAGING_PREFIX = "tierstore-import-"


def _staging_thread(saver: TieredSaver, thread_id: str, region: Region) -> str:
    """A fresh thread id in the target's stores to load an import into before it shows.

    The warm store's ``publish_thread`` then publishes the whole thread in one
    transaction (SQLite, PostgreSQL), so a crash mid-import leaves at worst a staging
    thread, never part of the target. The id always fits the id limit whatever the
    target's length: the target's leading bytes (cut to fit, so prefix-based region
    rules place it alike) plus a random tag, else a fixed prefix plus a random tag.
    When the region rules place neither in the target's region the import is refused
    (``InvalidInput``): it never writes into the target directly.
    """
    tag = f".{STAGING_PREFIX}{uuid.uuid4().hex}"
    head = thread_id.encode("utf-8")[:MAX_ID_BYTES - len(tag)].decode("utf-8", "ignore")
    for candidate in (f"{head}{tag}", f"{STAGING_PREFIX}{uuid.uuid4().hex}"):
        try:
            placed = saver.regions.for_thread(validate_id(candidate))
        except TierstoreError:
            continue
        if placed is region:
            return candidate
    raise InvalidInput(
        f"cannot import into thread {thread_id[:200]!r}: the region rules place no "
        "staging thread in its region, and an import never writes to the target directly"
    )


async def import_langgraph_postgres(saver: TieredSaver, url: str,
                                    progress: Progress = _noop) -> dict[str, Any]:
    """Copy every checkpoint and pending write of a LangGraph AsyncPostgresSaver database.

    Reads through LangGraph's own saver, so whatever it can read is migrated with
    its metadata, parents and pending writes; re-running is idempotent.
    """
    try:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            "importing from LangGraph's Postgres saver needs: pip install 'tierstore[migrate]'"
        ) from exc
    threads: set[str] = set()
    count = 0
    try:
        async with AsyncPostgresSaver.from_conn_string(url) as source:
            async for tup in source.alist(None):
                configurable = tup.config["configurable"]
                thread_id = str(configurable["thread_id"])
                ns = configurable.get("checkpoint_ns", "")
                parent = tup.parent_config or {
                    "configurable": {"thread_id": thread_id, "checkpoint_ns": ns}}
                stored = await saver.aput(parent, tup.checkpoint, tup.metadata,
                                          dict(tup.checkpoint["channel_versions"]))
                by_task: dict[str, list[tuple[str, Any]]] = defaultdict(list)
                for task_id, channel, value in tup.pending_writes or []:
                    by_task[task_id].append((channel, value))
                for task_id, writes in by_task.items():
                    await saver.aput_writes(stored, writes, task_id)
                threads.add(thread_id)
                count += 1
                progress(count, None)
    except TierstoreError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"cannot read the LangGraph Postgres database: {type(exc).__name__}: {exc}"
        ) from exc
    return {"threads": len(threads), "checkpoints": count}
