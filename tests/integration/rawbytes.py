"""Every raw byte a store holds, read with the server's own client (not through tierstore).

Residency and encryption tests scan these dumps for strings that must not be there.
"""

from __future__ import annotations

from pathlib import Path


def disk_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


async def postgres_bytes(url: str, schema: str) -> bytes:
    """Every value of every row of every table in ``schema``."""
    import asyncpg

    conn = await asyncpg.connect(url.split("?", maxsplit=1)[0])
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)]
        out: list[bytes] = []
        for table in tables:
            for row in await conn.fetch(f'SELECT * FROM "{schema}"."{table}"'):
                for value in row.values():
                    out.append(value if isinstance(value, bytes) else str(value).encode())
        return b"".join(out)
    finally:
        await conn.close()


async def redis_bytes(url: str, prefix: str, *, delete: bool = True) -> bytes:
    """Every key under ``prefix`` with its fields and values (then deleted, by default)."""
    from redis.asyncio import Redis

    client = Redis.from_url(url.split("?", maxsplit=1)[0])
    try:
        out: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}*"):
            out.append(key)
            kind = await client.type(key)
            if kind == b"hash":
                for field, value in (await client.hgetall(key)).items():
                    out.extend([field, value])
            elif kind == b"set":
                out.extend(await client.smembers(key))
            elif kind == b"string":
                out.append(await client.get(key) or b"")
            if delete:
                await client.delete(key)
        return b"".join(out)
    finally:
        await client.aclose()


async def s3_bytes(endpoint: str, bucket: str) -> bytes:
    """Every key and body in ``bucket``."""
    import aioboto3

    session = aioboto3.Session()
    out: list[bytes] = []
    async with session.client("s3", endpoint_url=endpoint, region_name="us-east-1") as s3:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        async for page in pages:
            for item in page.get("Contents", []):
                body = await s3.get_object(Bucket=bucket, Key=item["Key"])
                out.append(item["Key"].encode())
                out.append(await body["Body"].read())
    return b"".join(out)


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def unpacked(raw: bytes, *, depth: int = 4) -> bytes:
    """``raw`` followed by the output of every zstd frame found in it, recursively.

    Stored payloads and segments are compressed (nested: a segment holds compressed
    payloads), so a plain scan would miss a canary that is still there. A frame is tried
    without a dictionary and with every dictionary tierstore ships (a small payload's
    frame needs its ``zstd.<id>`` dictionary). Anything that merely looks like a frame
    and does not decompress is skipped.
    """
    import zstandard

    from tierstore.codec.dictionaries import SHA256, load

    out = [raw]
    if depth <= 0:
        return raw
    decompressors = [zstandard.ZstdDecompressor()] + [
        zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(
            load(dict_id), dict_type=zstandard.DICT_TYPE_RAWCONTENT))
        for dict_id in sorted(SHA256)]
    start = raw.find(ZSTD_MAGIC)
    while start != -1:
        for dctx in decompressors:
            try:
                inner = dctx.decompressobj().decompress(raw[start:])
            except zstandard.ZstdError:
                continue
            if inner:
                out.append(unpacked(inner, depth=depth - 1))
                break
        start = raw.find(ZSTD_MAGIC, start + 1)
    return b"".join(out)
