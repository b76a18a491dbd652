"""The S3 object store on moto's server: storage classes, Glacier restores, multipart, URLs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.servers.s3 import manual_restores, s3_url
from tierstore.errors import (
    CheckpointArchived,
    ConfigurationError,
    InvalidInput,
    LifecycleError,
)
from tierstore.settings import StoreUrl
from tierstore.tiers import ObjectStore
from tierstore.tiers import s3 as s3_module
from tierstore.tiers.s3 import S3Store, restore_state


def store_for(url: str) -> S3Store:
    return S3Store.from_url(StoreUrl.parse(url))


@pytest.fixture
async def open_store(moto_endpoint: str) -> AsyncIterator[Any]:
    """``await open_store(storage_class=…, …)`` → a set-up store on a fresh bucket."""
    opened: list[S3Store] = []

    async def factory(**options: str) -> S3Store:
        store = store_for(s3_url(moto_endpoint, prefix="pre/fix/", **options))
        await store.setup()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.aclose()


async def head(client: Any, store: S3Store, key: str) -> dict[str, Any]:
    answer: dict[str, Any] = await client.head_object(Bucket=store.bucket,
                                                      Key=store.prefix + key)
    return answer


# -- storage classes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "storage_class", ["STANDARD", "STANDARD_IA", "GLACIER_IR", "GLACIER", "DEEP_ARCHIVE"]
)
async def test_the_url_storage_class_is_applied(open_store: Any, s3_client: Any,
                                                storage_class: str) -> None:
    store = await open_store(storage_class=storage_class)
    await store.put("seg/1", b"bundle")
    # S3 omits the header for STANDARD objects.
    assert (await head(s3_client, store, "seg/1")).get("StorageClass", "STANDARD") \
        == storage_class
    info = await store.info("seg/1")
    assert info is not None
    assert (info.key, info.size, info.storage_class) == ("seg/1", 6, storage_class)
    archived = storage_class in ("GLACIER", "DEEP_ARCHIVE")
    assert info.readable is not archived
    assert info.restore_state == ("not-started" if archived else "not-needed")


async def test_the_default_class_is_standard_ia_and_a_put_may_override_it(
        open_store: Any, s3_client: Any) -> None:
    store = await open_store()
    assert store.storage_class == "STANDARD_IA"
    await store.put("a", b"1")
    await store.put("b", b"2", storage_class="DEEP_ARCHIVE")
    await store.put("c", b"3", storage_class="glacier_ir")
    assert (await head(s3_client, store, "a"))["StorageClass"] == "STANDARD_IA"
    assert (await head(s3_client, store, "b"))["StorageClass"] == "DEEP_ARCHIVE"
    assert (await head(s3_client, store, "c"))["StorageClass"] == "GLACIER_IR"


async def test_an_offload_put_in_standard_reads_at_once_from_a_glacier_store(
        open_store: Any, s3_client: Any) -> None:
    store = await open_store(storage_class="GLACIER")
    data = os.urandom(4096)
    await store.put("offload/ab/abcdef", data, storage_class="STANDARD")
    assert (await head(s3_client, store, "offload/ab/abcdef")).get("StorageClass",
                                                                   "STANDARD") == "STANDARD"
    assert await store.get("offload/ab/abcdef") == data
    info = await store.info("offload/ab/abcdef")
    assert info is not None and info.readable and info.restore_state == "not-needed"
    assert await store.restore("offload/ab/abcdef") == "not-needed"


async def test_a_bad_storage_class_in_a_put_is_refused(open_store: Any) -> None:
    store = await open_store()
    with pytest.raises(InvalidInput, match="REDUCED_REDUNDANCY"):
        await store.put("k", b"x", storage_class="REDUCED_REDUNDANCY")
    assert await store.get("k") is None


# -- Glacier restores --------------------------------------------------------------------


@pytest.mark.parametrize("storage_class", ["GLACIER", "DEEP_ARCHIVE"])
async def test_archived_objects_need_a_restore_then_read(open_store: Any,
                                                         storage_class: str) -> None:
    store = await open_store(storage_class=storage_class)
    await store.put("seg/old", b"old checkpoints")
    with pytest.raises(CheckpointArchived) as caught:
        await store.get("seg/old")
    assert caught.value.key == "seg/old"
    assert caught.value.storage_class == storage_class
    assert caught.value.restore_state == "not-started"
    assert isinstance(caught.value.__cause__, ClientError)  # the driver error, chained

    # moto completes restores at once unless told otherwise.
    assert await store.restore("seg/old", days=1) == "in-progress"
    assert await store.get("seg/old") == b"old checkpoints"
    info = await store.info("seg/old")
    assert info is not None and info.readable and info.restore_state == "ready"
    assert info.storage_class == storage_class
    assert await store.restore("seg/old", days=1) == "ready"


@pytest.mark.parametrize("storage_class", ["GLACIER", "DEEP_ARCHIVE"])
async def test_a_restore_in_progress_is_reported_until_it_finishes(
        open_store: Any, moto_endpoint: str, storage_class: str) -> None:
    store = await open_store(storage_class=storage_class, restore_tier="Bulk")
    await store.put("seg/slow", b"payload")
    with manual_restores(moto_endpoint, times=5):
        assert await store.restore("seg/slow") == "in-progress"
        with pytest.raises(CheckpointArchived) as caught:
            await store.get("seg/slow")
        assert caught.value.restore_state == "in-progress"
        assert caught.value.storage_class == storage_class
        # While it runs, asking again starts nothing new and says so.
        assert await store.restore("seg/slow") == "in-progress"
        # moto advances the restore on each request that reads its state.
        states: list[str] = []
        for _ in range(10):
            try:
                data = await store.get("seg/slow")
                break
            except CheckpointArchived as exc:
                states.append(exc.restore_state)
        else:
            pytest.fail(f"the restore never finished: {states}")
    assert data == b"payload"
    assert set(states) <= {"in-progress"}


async def test_a_restore_of_a_missing_object_is_refused(open_store: Any) -> None:
    store = await open_store(storage_class="GLACIER")
    with pytest.raises(InvalidInput, match="no such object"):
        await store.restore("nothing-here", days=1)


@pytest.mark.parametrize(
    ("storage_class", "header", "archive_status", "expected"),
    [
        ("STANDARD_IA", None, None, "not-needed"),
        ("GLACIER_IR", None, None, "not-needed"),
        ("GLACIER", None, None, "not-started"),
        ("DEEP_ARCHIVE", 'ongoing-request="true"', None, "in-progress"),
        ("GLACIER", 'ongoing-request="false", expiry-date="Fri, 23 Dec 2012 00:00:00 GMT"',
         None, "ready"),
        ("INTELLIGENT_TIERING", None, "ARCHIVE_ACCESS", "not-started"),
        ("INTELLIGENT_TIERING", None, None, "not-needed"),
        ("GLACIER", "garbled", None, "not-started"),
    ],
)
def test_restore_state_is_read_from_the_head_response(
        storage_class: str, header: str | None, archive_status: str | None,
        expected: str) -> None:
    assert restore_state(storage_class, header, archive_status) == expected


# -- multipart, listing, deletion --------------------------------------------------------


async def test_a_large_object_goes_up_in_parts_and_round_trips(open_store: Any,
                                                               s3_client: Any) -> None:
    store = await open_store(storage_class="GLACIER_IR")
    data = os.urandom(20 * 1024 * 1024 + 123)
    await store.put("big/segment", data)
    answer = await head(s3_client, store, "big/segment")
    assert answer["ETag"].strip('"').endswith("-3")  # three 8 MiB parts
    assert answer["StorageClass"] == "GLACIER_IR"
    assert answer["ContentLength"] == len(data)
    assert await store.get("big/segment") == data
    uploads = await s3_client.list_multipart_uploads(Bucket=store.bucket)
    assert not uploads.get("Uploads")


async def test_an_object_at_the_threshold_is_one_put(open_store: Any, s3_client: Any) -> None:
    store = await open_store(multipart_threshold="5MiB", part_size="5MiB")
    data = os.urandom(5 * 1024 * 1024)
    await store.put("edge", data)
    assert "-" not in (await head(s3_client, store, "edge"))["ETag"]
    await store.put("edge+1", data + b"!")
    assert (await head(s3_client, store, "edge+1"))["ETag"].strip('"').endswith("-2")
    assert await store.get("edge+1") == data + b"!"


async def test_a_one_request_put_is_checked_by_s3_and_its_digest_reported(
    open_store: Any, s3_client: Any
) -> None:
    """S3 checks the SHA-256 sent with a put against the bytes it received and keeps it:
    ``info`` reports it, so a segment is verified without reading it back. A multipart
    upload's checksum covers its parts' checksums, not the bytes: none is reported."""
    store = await open_store()
    data = os.urandom(100_000)
    await store.put("one", data)
    answer = await s3_client.head_object(Bucket=store.bucket, Key=store.prefix + "one",
                                         ChecksumMode="ENABLED")
    assert base64.b64decode(answer["ChecksumSHA256"]) == hashlib.sha256(data).digest()
    info = await store.info("one")
    assert info is not None and info.sha256 == hashlib.sha256(data).hexdigest()
    big = await open_store(multipart_threshold="5MiB", part_size="5MiB")
    await big.put("parts", data * 60)
    info = await big.info("parts")
    assert info is not None and info.size == len(data) * 60 and info.sha256 is None


@pytest.mark.parametrize("answer", [
    {"ChecksumSHA256": "YWJj"},  # not 32 bytes
    {"ChecksumSHA256": "not base64!"},
    {"ChecksumSHA256": base64.b64encode(bytes(32)).decode() + "-3"},
    {"ChecksumSHA256": base64.b64encode(bytes(32)).decode(), "ChecksumType": "COMPOSITE"},
    {"ChecksumCRC32": "AAAAAA=="},
    {},
])
def test_only_a_whole_object_sha256_is_taken_from_a_head_answer(answer: dict[str, str]) -> None:
    assert s3_module._whole_object_sha256(answer) is None
    whole = {"ChecksumSHA256": base64.b64encode(bytes(range(32))).decode(),
             "ChecksumType": "FULL_OBJECT"}
    assert s3_module._whole_object_sha256(whole) == bytes(range(32)).hex()


async def test_listing_pages_and_deletion_batches(open_store: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # S3 caps both at 1000; small caps exercise the same loops with a few keys.
    monkeypatch.setattr(s3_module, "_LIST_PAGE", 3)
    monkeypatch.setattr(s3_module, "_DELETE_BATCH", 2)
    store = await open_store()
    keys = [f"many/{i:02d}" for i in range(11)]
    for key in keys:
        await store.put(key, b"")
    await store.put("other/1", b"")
    calls: list[int] = []
    pages: list[int] = []
    real_delete, real_list = store._client.delete_objects, store._client.list_objects_v2

    async def counting_delete(**kwargs: Any) -> Any:
        calls.append(len(kwargs["Delete"]["Objects"]))
        return await real_delete(**kwargs)

    async def counting_list(**kwargs: Any) -> Any:
        answer = await real_list(**kwargs)
        pages.append(len(answer.get("Contents", [])))
        return answer

    monkeypatch.setattr(store._client, "delete_objects", counting_delete)
    monkeypatch.setattr(store._client, "list_objects_v2", counting_list)
    assert [k async for k in store.iter_keys("many/")] == keys
    assert pages == [3, 3, 3, 2]
    await store.delete([*keys, *keys[:5]])  # duplicates are fine
    assert calls == [2, 2, 2, 2, 2, 1]
    assert [k async for k in store.iter_keys("")] == ["other/1"]


async def test_keys_xml_cannot_carry_still_list_and_delete(open_store: Any) -> None:
    store = await open_store()
    keys = ["ctl/\x01bell", "ctl/tab\there", "ctl/plain"]
    for key in keys:
        await store.put(key, key.encode())
    assert sorted([k async for k in store.iter_keys("ctl/")]) == sorted(keys)
    assert await store.get(keys[0]) == keys[0].encode()
    await store.delete(keys)
    assert [k async for k in store.iter_keys("ctl/")] == []


async def test_the_prefix_isolates_stores_on_one_bucket(moto_endpoint: str) -> None:
    bucket = f"tierstore-{uuid.uuid4().hex[:16]}"
    one = store_for(s3_url(moto_endpoint, bucket=bucket, prefix="//one//"))
    two = store_for(s3_url(moto_endpoint, bucket=bucket))
    await one.setup()
    await two.setup()
    try:
        assert one.prefix == "one/" and two.prefix == ""
        await one.put("k", b"1")
        await two.put("k", b"2")
        assert await one.get("k") == b"1"
        assert [k async for k in one.iter_keys("")] == ["k"]
        assert sorted([k async for k in two.iter_keys("")]) == ["k", "one/k"]
    finally:
        await one.aclose()
        await two.aclose()


async def test_invalid_keys_are_refused(open_store: Any) -> None:
    store = await open_store()
    with pytest.raises(InvalidInput):
        await store.put("", b"x")
    with pytest.raises(InvalidInput, match="1024"):
        await store.put("k" * 1100, b"x")
    with pytest.raises(InvalidInput):
        await store.get("\ud800")


# -- URL, setup and lifecycle ------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("storage_class=ARCHIVE_OF_DOOM", "ARCHIVE_OF_DOOM"),
        ("storage_class=REDUCED_REDUNDANCY", "REDUCED_REDUNDANCY"),
        ("restore_tier=Instant", "Instant"),
        ("create_bucket=maybe", "maybe"),
        ("part_size=1MiB", "part_size"),
        ("multipart_threshold=lots", "lots"),
        ("connect_timeout=-1", "connect_timeout"),
        ("storage_clas=GLACIER", "storage_clas"),
        ("endpoint_url=ftp://x", "ftp://x"),
        ("restore_days=0", "restore_days"),
    ],
)
def test_bad_url_options_are_configuration_errors(query: str, named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        store_for(f"s3://bucket/prefix?{query}")


def test_it_is_an_object_store() -> None:
    store: ObjectStore = store_for("s3://bucket")  # mypy checks the method signatures
    assert isinstance(store, ObjectStore)
    assert store.backend == "s3"


def test_url_parts_are_parsed_and_the_secret_is_masked() -> None:
    store = store_for(
        "s3://AKIDEXAMPLE:s3cr3t%2Fvalue@my-bucket/a/b/?storage_class=glacier"
        "&endpoint_url=http://127.0.0.1:9&region=eu-west-1&restore_days=3&restore_tier=Bulk"
        "&multipart_threshold=16MiB&part_size=6MiB&create_bucket=false"
    )
    assert (store.bucket, store.prefix, store.storage_class) == ("my-bucket", "a/b/", "GLACIER")
    assert (store.endpoint_url, store.region) == ("http://127.0.0.1:9", "eu-west-1")
    assert (store.restore_days, store.restore_tier) == (3, "Bulk")
    assert (store.multipart_threshold, store.part_size) == (16 << 20, 6 << 20)
    assert store.create_bucket is False
    assert "s3cr3t" not in repr(store) and "AKIDEXAMPLE" not in repr(store)
    with pytest.raises(ConfigurationError) as caught:
        store_for("s3://AKID:s3cr3t@/prefix")
    assert "s3cr3t" not in str(caught.value)
    with pytest.raises(ConfigurationError, match=r"\.\."):
        store_for("s3://bucket/a/../b")
    with pytest.raises(ConfigurationError, match="endpoint_url"):
        store_for("s3://bucket:9000/a")


async def test_credentials_in_the_url_are_used(moto_endpoint: str) -> None:
    url = s3_url(moto_endpoint).replace("s3://", "s3://AKIDEXAMPLE:s3cr3t@")
    store = store_for(url)
    await store.setup()
    try:
        await store.put("k", b"v")
        assert await store.get("k") == b"v"
    finally:
        await store.aclose()


async def test_a_missing_bucket_is_created_once_or_refused(moto_endpoint: str,
                                                           s3_client: Any) -> None:
    bucket = f"tierstore-{uuid.uuid4().hex[:16]}"
    refused = store_for(s3_url(moto_endpoint, bucket=bucket, create_bucket="false"))
    with pytest.raises(ConfigurationError, match=bucket) as caught:
        await refused.setup()
    assert isinstance(caught.value.__cause__, ClientError)
    await refused.aclose()

    stores = [store_for(s3_url(moto_endpoint, bucket=bucket)) for _ in range(3)]
    await asyncio.gather(*(s.setup() for s in stores))  # racing creators all succeed
    await stores[0].setup()  # and setup is idempotent
    await stores[0].put("k", b"v")
    assert await stores[2].get("k") == b"v"
    for store in stores:
        await store.aclose()

    regional = store_for(s3_url(moto_endpoint, bucket=f"{bucket}-eu", region="eu-west-1"))
    await regional.setup()
    await regional.aclose()
    location = await s3_client.get_bucket_location(Bucket=f"{bucket}-eu")
    assert location["LocationConstraint"] == "eu-west-1"


async def test_lifecycle_is_explicit(moto_endpoint: str) -> None:
    store = store_for(s3_url(moto_endpoint))
    states = [store.state]
    with pytest.raises(LifecycleError):
        await store.get("k")
    await store.setup()
    states.append(store.state)
    await store.aclose()
    await store.aclose()
    states.append(store.state)
    assert states == ["unopened", "opened", "closed"]
    with pytest.raises(LifecycleError):
        await store.put("k", b"v")
    with pytest.raises(LifecycleError):
        await store.setup()
