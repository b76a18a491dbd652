"""Deleting removes the bytes from every tier: warm, hot, offloaded objects, cold segments.

Each test plants a canary (in a small inline value and in a value large enough to be
offloaded), archives history to cold, deletes, and then scans the raw bytes of every
store with its own client: the canary must be found nowhere. The same scans find it
before the delete, so the tests can fail.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.conformance.test_utils import (
    generate_checkpoint,
    generate_config,
    generate_metadata,
)

from tests.integration.rawbytes import (
    disk_bytes,
    postgres_bytes,
    redis_bytes,
    s3_bytes,
    unpacked,
)
from tests.integration.test_encryption import mongo_bytes, server_stack
from tierstore import TieredSaver
from tierstore.codec.segment import SEGMENT_PREFIX
from tierstore.jobs.plan import TieringPolicy
from tierstore.jobs.tiering import IdleArchival
from tierstore.offload import OFFLOAD_PREFIX

THRESHOLD = 8 * 1024
FUTURE = 10 * 365 * 86400.0
ARCHIVE_ALL = TieringPolicy(archive_after=None, archive_idle_after=60, segment_size=50)


@dataclass
class Deployment:
    """A saver factory on one stack and a scanner of every raw byte it stores."""

    name: str
    open: Callable[[], TieredSaver]
    scan: Callable[[], Awaitable[dict[str, bytes]]]


def _sqlite_files(tmp: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(tmp.glob("warm.db*")) if p.is_file())


@pytest.fixture(params=["embedded", "redis+postgres+s3", "redis+mongo+s3"])
async def deployment(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> AsyncIterator[Deployment]:
    if request.param == "embedded":
        def open_embedded() -> TieredSaver:
            return TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{tmp_path}/warm.db",
                                         cold=f"file://{tmp_path}/cold",
                                         offload_threshold=THRESHOLD, hot_write_delay=0,
                                         offload_grace=0)

        async def scan_embedded() -> dict[str, bytes]:
            return {"warm": _sqlite_files(tmp_path), "cold": disk_bytes(tmp_path / "cold")}

        yield Deployment("embedded", open_embedded, scan_embedded)
        return
    redis_url: str = request.getfixturevalue("redis_url")
    moto: str = request.getfixturevalue("moto_endpoint")
    if request.param == "redis+postgres+s3":
        postgres_url: str = request.getfixturevalue("postgres_url")
        urls, where = server_stack(postgres_url, redis_url, moto)

        def open_pg() -> TieredSaver:
            return TieredSaver.from_urls(**urls, offload_threshold=THRESHOLD, hot_write_delay=0,
                                         offload_grace=0)

        async def scan_pg() -> dict[str, bytes]:
            return {"warm": await postgres_bytes(postgres_url, where["schema"]),
                    "hot": await redis_bytes(redis_url, where["prefix"], delete=False),
                    "cold": await s3_bytes(moto, where["bucket"])}

        yield Deployment(request.param, open_pg, scan_pg)
        await redis_bytes(redis_url, where["prefix"])  # purge
        return
    from tierstore.tiers import open_store

    mongo = request.getfixturevalue("mongo_db")
    urls, where = server_stack("postgresql://unused", redis_url, moto)

    def open_mongo() -> TieredSaver:
        return TieredSaver.from_stores(
            warm=mongo.store(offload_threshold=THRESHOLD),
            hot=open_store("hot", urls["hot"], ttl=3600.0),
            cold=open_store("cold", urls["cold"]), hot_write_delay=0, offload_grace=0)

    async def scan_mongo() -> dict[str, bytes]:
        return {"warm": await mongo_bytes(mongo),
                "hot": await redis_bytes(redis_url, where["prefix"], delete=False),
                "cold": await s3_bytes(moto, where["bucket"])}

    yield Deployment(request.param, open_mongo, scan_mongo)
    await redis_bytes(redis_url, where["prefix"])


def canary() -> str:
    return f"CANARY-{uuid.uuid4().hex}"


def large(text: str) -> str:
    """A value over the offload threshold that carries ``text`` and does not compress."""
    return f"{text} " + os.urandom(THRESHOLD).hex()


async def write_chain(saver: TieredSaver, thread: str, values: list[dict[str, Any]], *,
                      run_id: str, parent: dict[str, Any] | None = None,
                      first_version: int = 1) -> list[dict[str, Any]]:
    """One checkpoint per entry of ``values`` (each a full channel dict), parent to child."""
    configs: list[dict[str, Any]] = []
    config: dict[str, Any] = parent or generate_config(thread)
    for i, channel_values in enumerate(values):
        version = first_version + i
        cp = generate_checkpoint(channel_values=channel_values,
                                 channel_versions={ch: version for ch in channel_values})
        config = dict(await saver.aput(config, cp, generate_metadata(step=version,
                                                                     run_id=run_id),
                                       {ch: version for ch in channel_values}))
        configs.append(config)
    return configs


async def archive_everything(saver: TieredSaver) -> None:
    report = await IdleArchival(saver, ARCHIVE_ALL).run_once(now=time.time() + FUTURE)
    assert not report.errors and report.checkpoints > 0


async def values_of(saver: TieredSaver, thread: str) -> list[tuple[str, Any]]:
    return [(t.checkpoint["id"], t.checkpoint["channel_values"])
            async for t in saver.alist(generate_config(thread))]


async def cold_keys(saver: TieredSaver) -> list[str]:
    cold = saver.regions.by_name["default"].cold
    assert cold is not None
    return [k async for k in cold.iter_keys("")]


def found_in(scanned: dict[str, bytes], needle: str) -> list[str]:
    """The tiers whose bytes hold ``needle``, compressed or not."""
    return sorted(tier for tier, raw in scanned.items() if needle.encode() in unpacked(raw))


async def test_deleted_thread_is_gone_from_every_tier(deployment: Deployment) -> None:
    secret = canary()
    async with deployment.open() as saver:
        await write_chain(saver, "doomed", [
            {"note": secret, "doc": large(secret)},
            {"note": secret + "-2", "doc": large(secret)},
            {"note": secret + "-3"},
        ], run_id="r1")
        await archive_everything(saver)  # history and head in a cold segment
        await write_chain(saver, "doomed", [{"note": secret + "-live", "doc": large(secret)}],
                          run_id="r2", parent=generate_config("doomed"), first_version=10)
        await write_chain(saver, "bystander", [{"note": "harmless", "doc": large("harmless")}],
                          run_id="r3")
        assert (await saver.aget_tuple(generate_config("doomed"))) is not None
        before = await deployment.scan()
        assert "cold" in found_in(before, secret + "-3")  # archived in a segment
        assert "warm" in found_in(before, secret + "-live")
        kinds = {k.split("/", 1)[0] for k in await cold_keys(saver)}
        assert "segments" in kinds

        await saver.adelete_thread("doomed")

        assert await saver.aget_tuple(generate_config("doomed")) is None
        after = await deployment.scan()
        assert found_in(after, secret) == [], f"{deployment.name}: canary survives"
        # the bystander is untouched, large value included
        got = await saver.aget_tuple(generate_config("bystander"))
        assert got is not None and got.checkpoint["channel_values"]["doc"].startswith("harmless")
        if deployment.name != "redis+mongo+s3":  # GridFS holds the large values there
            assert [k for k in await cold_keys(saver) if k.startswith(OFFLOAD_PREFIX)]
        await saver.adelete_thread("bystander")
        assert [k for k in await cold_keys(saver)
                if k.startswith((OFFLOAD_PREFIX, SEGMENT_PREFIX))] == []


async def test_deleted_run_is_gone_from_a_shared_segment(deployment: Deployment) -> None:
    secret = canary()
    async with deployment.open() as saver:
        kept = await write_chain(saver, "t", [
            {"note": "kept-1", "doc": large("kept-doc-1")},
            {"note": "kept-2", "doc": large("kept-doc-1")},
        ], run_id="keep")
        await write_chain(saver, "t", [
            {"note": secret, "doc": large(secret)},
            {"note": secret + "-2", "doc": large(secret)},
        ], run_id="gone", parent=kept[-1], first_version=3)
        await archive_everything(saver)  # both runs share one segment
        segments = [k for k in await cold_keys(saver) if k.startswith(SEGMENT_PREFIX)]
        assert len(segments) == 1
        expected = [(c, v) for c, v in await values_of(saver, "t")
                    if not str(v["note"]).startswith("CANARY")]
        assert len(expected) == 2
        before = await deployment.scan()
        assert "cold" in found_in(before, secret)

        await saver.adelete_for_runs(["gone"])

        after = await deployment.scan()
        assert found_in(after, secret) == [], f"{deployment.name}: canary survives"
        assert await values_of(saver, "t") == expected  # the kept run reads fully
        latest = await saver.aget_tuple(generate_config("t"))
        assert latest is not None and latest.checkpoint["channel_values"]["note"] == "kept-2"
        assert latest.checkpoint["channel_values"]["doc"].startswith("kept-doc-1")
        # nothing of the run is left for a later GC either: the old segment is gone
        assert segments[0] not in await cold_keys(saver)


async def test_deleting_a_run_that_fills_a_segment_drops_it(deployment: Deployment) -> None:
    async with deployment.open() as saver:
        await write_chain(saver, "a", [{"note": "x"}, {"note": "y"}], run_id="only")
        await archive_everything(saver)
        assert [k for k in await cold_keys(saver) if k.startswith(SEGMENT_PREFIX)]
        await saver.adelete_for_runs(["only"])
        assert [k for k in await cold_keys(saver) if k.startswith(SEGMENT_PREFIX)] == []
        assert await saver.aget_tuple(generate_config("a")) is None


async def test_a_copy_survives_deletion_of_its_source(deployment: Deployment) -> None:
    secret = canary()
    async with deployment.open() as saver:
        await write_chain(saver, "source", [
            {"note": secret, "doc": large(secret)},
            {"note": secret + "-2", "doc": large(secret)},
        ], run_id="r1")
        await archive_everything(saver)  # the copy's stubs will share the source's segment
        await write_chain(saver, "source", [{"note": "live", "doc": large(secret + "-live")}],
                          run_id="r2", parent=generate_config("source"), first_version=5)
        await saver.acopy_thread("source", "copy")
        expected = await values_of(saver, "source")
        assert len(expected) == 3

        await saver.adelete_thread("source")

        assert await values_of(saver, "source") == []
        assert await values_of(saver, "copy") == expected
        latest = await saver.aget_tuple(generate_config("copy"))
        assert latest is not None
        assert latest.checkpoint["channel_values"]["doc"].startswith(secret + "-live")
        assert found_in(await deployment.scan(), secret)  # the copy still holds it

        await saver.adelete_thread("copy")

        assert found_in(await deployment.scan(), secret) == []
        assert [k for k in await cold_keys(saver)
                if k.startswith((OFFLOAD_PREFIX, SEGMENT_PREFIX))] == []


async def test_request_path_looks_up_only_the_segments_concerned(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    async with deployment.open() as saver:
        for thread in ("x", "y"):
            await write_chain(saver, thread, [{"note": "a"}, {"note": "b"}], run_id=thread)
        await archive_everything(saver)
        warm = saver.regions.by_name["default"].warm
        calls: list[tuple[Any, Any]] = []
        real = warm.archive_refs

        async def spy(thread_id: str | None = None, *, keys: Any = None) -> dict[str, int]:
            calls.append((thread_id, keys))
            return await real(thread_id, keys=keys)

        monkeypatch.setattr(warm, "archive_refs", spy)
        await saver.adelete_for_runs(["x"])
        await saver.aprune(["y"], strategy="keep_latest")
        await saver.adelete_thread("y")
        assert calls and all(t is not None or k is not None for t, k in calls), calls
        assert [k for k in await cold_keys(saver) if k.startswith(SEGMENT_PREFIX)] == []


@pytest.mark.parametrize("crash_at", ["after-warm", "before-warm"])
async def test_a_delete_cut_short_is_finished_by_cold_gc(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch, crash_at: str) -> None:
    from tierstore.jobs.tiering import ColdGC
    from tierstore.offload import WORK_PREFIX

    if deployment.name == "redis+mongo+s3":
        pytest.skip("GridFS files go with their documents (and MongoWarm.sweep_gridfs)")
    secret = canary()
    async with deployment.open() as saver:
        await write_chain(saver, "doomed", [{"note": "n", "doc": large(secret)}], run_id="r")
        stack = saver.regions.by_name["default"]

        async def crash(*_args: Any, **_kw: Any) -> None:
            raise RuntimeError("power cut")

        if crash_at == "after-warm":
            monkeypatch.setattr(stack.archive, "purge_thread", crash)
        else:
            monkeypatch.setattr(stack.warm, "delete_thread", crash)
        with pytest.raises(RuntimeError, match="power cut"):
            await saver.adelete_thread("doomed")
        monkeypatch.undo()
        assert [k for k in await cold_keys(saver) if k.startswith(WORK_PREFIX)]
        assert "cold" in found_in(await deployment.scan(), secret)

        early = await ColdGC(saver, grace_seconds=3600).run_once(now=time.time())
        assert early.deleted == 0  # within the grace: the delete may still be running
        await ColdGC(saver, grace_seconds=3600).run_once(now=time.time() + 7200)

        assert [k for k in await cold_keys(saver) if k.startswith(WORK_PREFIX)] == []
        if crash_at == "after-warm":
            assert found_in(await deployment.scan(), secret) == []
        else:  # the thread was never deleted: it keeps every byte and reads whole
            got = await saver.aget_tuple(generate_config("doomed"))
            assert got is not None
            assert got.checkpoint["channel_values"]["doc"].startswith(secret)


async def test_a_copy_cut_short_leaves_objects_cold_gc_collects(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    from tierstore.jobs.tiering import ColdGC
    from tierstore.offload import thread_space

    if deployment.name == "redis+mongo+s3":
        pytest.skip("GridFS copies go with their documents")
    async with deployment.open() as saver:
        await write_chain(saver, "src", [{"doc": large("payload")}], run_id="r")
        stack = saver.regions.by_name["default"]

        async def crash(*_args: Any, **_kw: Any) -> None:
            raise RuntimeError("power cut")

        monkeypatch.setattr(stack.warm, "copy_thread", crash)
        with pytest.raises(RuntimeError):
            await saver.acopy_thread("src", "dst")
        monkeypatch.undo()
        assert stack.cold is not None
        assert [k async for k in stack.cold.iter_keys(thread_space("dst"))]
        await ColdGC(saver, grace_seconds=3600).run_once(now=time.time() + 7200)
        assert [k async for k in stack.cold.iter_keys(thread_space("dst"))] == []
        got = await saver.aget_tuple(generate_config("src"))  # the source is untouched
        assert got is not None and got.checkpoint["channel_values"]["doc"].startswith("payload")


async def test_pruned_history_is_gone_from_its_segment(deployment: Deployment) -> None:
    secret = canary()
    async with deployment.open() as saver:
        await write_chain(saver, "p", [
            {"note": secret, "doc": large(secret)},
            {"note": secret + "-2", "doc": large(secret)},
            {"note": "latest", "doc": large("latest-doc")},
        ], run_id="r")
        await archive_everything(saver)  # all three in one segment, the latest included
        assert "cold" in found_in(await deployment.scan(), secret)

        await saver.aprune(["p"], strategy="keep_latest")

        assert found_in(await deployment.scan(), secret) == []
        [(_id, values)] = await values_of(saver, "p")
        assert values["note"] == "latest" and values["doc"].startswith("latest-doc")
        got = await saver.aget_tuple(generate_config("p"))
        assert got is not None and got.checkpoint["channel_values"]["note"] == "latest"


async def shared_segment_with_two_runs(saver: TieredSaver, secret: str) -> list[Any]:
    """Runs "keep" and "gone" of thread "t" in one segment; what "t" lists without "gone"."""
    await shared_segment_with_two_runs_archived(saver, secret)
    return [(c, v) for c, v in await values_of(saver, "t") if v["note"] != secret]


@pytest.mark.parametrize("crash_in", ["repoint_archive", "delete_for_runs"])
async def test_a_run_delete_cut_short_in_the_rewrite_is_finished_by_a_retry(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch, crash_in: str) -> None:
    secret = canary()
    async with deployment.open() as saver:
        expected = await shared_segment_with_two_runs(saver, secret)
        warm = saver.regions.by_name["default"].warm

        async def crash(*_args: Any, **_kw: Any) -> None:
            raise RuntimeError("power cut")

        monkeypatch.setattr(warm, crash_in, crash)
        with pytest.raises(RuntimeError):
            await saver.adelete_for_runs(["gone"])
        monkeypatch.undo()
        # the segments are rewritten before the warm delete: the run is still whole,
        # so the error tells the caller to retry, and the retry finds its stubs again
        assert len(await values_of(saver, "t")) == 3

        await saver.adelete_for_runs(["gone"])  # the caller saw the error and retries

        assert await values_of(saver, "t") == expected
        assert found_in(await deployment.scan(), secret) == []


async def test_a_run_delete_cut_short_after_warm_is_finished_by_cold_gc(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    from tierstore.jobs.tiering import ColdGC
    from tierstore.offload import WORK_PREFIX

    secret = canary()
    async with deployment.open() as saver:
        expected = await shared_segment_with_two_runs(saver, secret)
        [old] = [k for k in await cold_keys(saver) if k.startswith(SEGMENT_PREFIX)]
        archive = saver.regions.by_name["default"].archive

        async def crash(*_args: Any, **_kw: Any) -> int:
            raise RuntimeError("power cut")

        monkeypatch.setattr(archive, "drop_unreferenced_segments", crash)
        with pytest.raises(RuntimeError):
            await saver.adelete_for_runs(["gone"])
        monkeypatch.undo()
        assert await values_of(saver, "t") == expected  # nothing kept was lost

        await ColdGC(saver, grace_seconds=3600).run_once(now=time.time() + 7200)

        assert await values_of(saver, "t") == expected
        keys = await cold_keys(saver)
        assert old not in keys and [k for k in keys if k.startswith(SEGMENT_PREFIX)]
        assert found_in(await deployment.scan(), secret) == []  # objects swept too
        assert [k for k in keys if k.startswith(WORK_PREFIX)] == []


async def test_a_run_in_a_glacier_segment_is_deleted_without_harm(
        postgres_url: str, redis_url: str, moto_endpoint: str,
        caplog: pytest.LogCaptureFixture) -> None:
    from tierstore import CheckpointArchived

    urls, where = server_stack(postgres_url, redis_url, moto_endpoint)
    urls["cold"] += "&storage_class=GLACIER"
    try:
        async with TieredSaver.from_urls(**urls, offload_threshold=THRESHOLD,
                                         hot_write_delay=0) as saver:
            secret = canary()
            await shared_segment_with_two_runs_archived(saver, secret)
            [old] = [k for k in await cold_keys(saver) if k.startswith(SEGMENT_PREFIX)]
            warm = saver.regions.by_name["default"].warm

            await saver.adelete_for_runs(["gone"])  # the segment cannot be read: kept as is

            assert "cannot be read" in caplog.text
            assert await warm.archive_refs("t") == {old: 2}  # the kept run still names it
            assert "warm" not in found_in({"warm": await postgres_bytes(
                postgres_url, where["schema"])}, secret)
            with pytest.raises(CheckpointArchived):
                await saver.aget_tuple(generate_config("t"))
    finally:
        await redis_bytes(redis_url, where["prefix"])


async def shared_segment_with_two_runs_archived(saver: TieredSaver, secret: str) -> None:
    kept = await write_chain(saver, "t", [{"note": "kept-1", "doc": large("kept-doc")},
                                          {"note": "kept-2"}], run_id="keep")
    await write_chain(saver, "t", [{"note": secret, "doc": large(secret)}], run_id="gone",
                      parent=kept[-1], first_version=3)
    await archive_everything(saver)


@pytest.mark.parametrize("pruned", ["source", "copy"])
async def test_pruning_one_side_of_a_copy_keeps_the_other_whole(
        deployment: Deployment, pruned: str) -> None:
    async with deployment.open() as saver:
        await write_chain(saver, "source", [
            {"note": "one", "doc": large("doc-one")},
            {"note": "two"},
            {"note": "three", "doc": large("doc-three")},
        ], run_id="r")
        await archive_everything(saver)  # the copy's stubs share this segment
        await saver.acopy_thread("source", "copy")
        history = await values_of(saver, "source")
        assert len(history) == 3

        await saver.aprune([pruned], strategy="keep_latest")

        other = "copy" if pruned == "source" else "source"
        assert await values_of(saver, other) == history
        assert await values_of(saver, pruned) == history[:1]
        got = await saver.aget_tuple(generate_config(pruned))
        assert got is not None and got.checkpoint["channel_values"]["doc"].startswith("doc-three")
        await saver.adelete_thread(other)
        assert await values_of(saver, pruned) == history[:1]
        await saver.adelete_thread(pruned)
        assert [k for k in await cold_keys(saver)
                if k.startswith((OFFLOAD_PREFIX, SEGMENT_PREFIX))] == []


async def test_history_a_pruned_copy_let_go_leaves_with_its_source(
        deployment: Deployment) -> None:
    secret = canary()
    async with deployment.open() as saver:
        await write_chain(saver, "source", [
            {"note": secret, "doc": large(secret)},
            {"note": secret + "-2"},
            {"note": "latest", "doc": large("latest-doc")},
        ], run_id="r")
        await archive_everything(saver)  # one segment, named by the copy's stubs too
        await saver.acopy_thread("source", "copy")
        await saver.aprune(["copy"], strategy="keep_latest")  # the source still needs it all
        assert "cold" in found_in(await deployment.scan(), secret)

        await saver.adelete_thread("source")

        assert found_in(await deployment.scan(), secret) == []
        [(_id, values)] = await values_of(saver, "copy")
        assert values["note"] == "latest" and values["doc"].startswith("latest-doc")


async def test_a_damaged_segment_does_not_block_deleting_a_run(
        deployment: Deployment, caplog: pytest.LogCaptureFixture) -> None:
    secret = canary()
    async with deployment.open() as saver:
        await shared_segment_with_two_runs_archived(saver, secret)
        [key] = [k for k in await cold_keys(saver) if k.startswith(SEGMENT_PREFIX)]
        stack = saver.regions.by_name["default"]
        assert stack.cold is not None
        await stack.cold.put(key, b"TSEG damaged")
        stack.archive.forget_segments()

        await saver.adelete_for_runs(["gone"])  # not refused: warm loses the run

        assert "cannot be read" in caplog.text
        assert await stack.warm.archive_stubs(keys=[key]) == {key: {
            m.checkpoint_id for m in await stack.warm.index("t", "")}}
        assert len(await stack.warm.index("t", "")) == 2


async def test_a_run_deleted_while_a_worker_archives_it_leaves_no_bytes(
    deployment: Deployment,
) -> None:
    """``delete_for_runs`` landing between a worker's upload of a segment and its mark:
    the mark moves nothing (all or nothing) and the job drops its segment at once, so
    the deleted run's canary ends up in no tier, and the kept run reads back whole."""
    secret, kept = canary(), canary()
    thread, doomed_run, kept_run = f"race-{uuid.uuid4()}", str(uuid.uuid4()), str(uuid.uuid4())
    async with deployment.open() as saver:
        first = await write_chain(saver, thread, [{"a": secret}], run_id=doomed_run)
        await write_chain(saver, thread, [{"a": kept}, {"a": kept + "!"}], run_id=kept_run,
                          parent=first[-1], first_version=2)
        cold = saver.regions.for_thread(thread).cold
        assert cold is not None
        fired: list[str] = []
        real_put = cold.put

        async def put_then_delete(key: str, data: bytes, **kw: Any) -> None:
            await real_put(key, data, **kw)
            if key.startswith(SEGMENT_PREFIX) and not fired:
                fired.append(key)
                await saver.adelete_for_runs([doomed_run])

        cold.put = put_then_delete  # type: ignore[method-assign]
        try:
            report = await IdleArchival(saver, ARCHIVE_ALL).run_once(now=time.time() + FUTURE)
        finally:
            cold.put = real_put  # type: ignore[method-assign]
        assert fired and report.checkpoints == 0 and not report.errors
        values = [v for _, v in await values_of(saver, thread)]
        assert secret not in str(values) and kept in str(values)
        await archive_everything(saver)  # the next run moves what is left
        values = [v for _, v in await values_of(saver, thread)]
        assert secret not in str(values) and kept in str(values)
    for tier, raw in (await deployment.scan()).items():
        assert secret.encode() not in unpacked(raw), f"deleted run found in {tier}"


async def _planted(saver: Any, docs: dict[str, str]) -> None:
    """Two threads, each with a root and a subgraph namespace and pending writes."""
    for thread, doc in docs.items():
        note = doc.split(" ", 1)[0]
        for ns in ("", "child:1"):
            config: dict[str, Any] = {"configurable": {"thread_id": thread, "checkpoint_ns": ns}}
            for step in (1, 2):
                values = {"note": f"{note}-{ns}-{step}", "doc": doc}
                cp = generate_checkpoint(channel_values=values,
                                         channel_versions={ch: step for ch in values})
                config = dict(await saver.aput(config, cp, generate_metadata(step=step),
                                               {ch: step for ch in values}))
            await saver.aput_writes(config, [("note", f"{note}-pending")], task_id="task-1")


async def _everything(saver: Any, thread: str) -> list[tuple[Any, ...]]:
    """Every checkpoint of a thread, all namespaces, with its values and pending writes."""
    return sorted([
        (t.config["configurable"]["checkpoint_ns"], t.metadata["step"],
         sorted(t.checkpoint["channel_values"].items()), sorted(t.pending_writes or []))
        async for t in saver.alist({"configurable": {"thread_id": thread}})])


async def test_prune_delete_all_deletes_what_langgraph_deletes(deployment: Deployment) -> None:
    """``delete_all`` (what LangGraph's Agent Server prunes with) deletes every
    namespace of the threads named, archived and offloaded data and hot entries
    included, and leaves the others: what InMemorySaver holds after the Agent Server's
    own ``delete_all`` (a delete of each thread)."""
    from langgraph.checkpoint.memory import InMemorySaver

    secret = canary()
    docs = {"doomed": large(secret), "bystander": large("harmless")}
    reference = InMemorySaver()
    await _planted(reference, docs)
    await reference.adelete_thread("doomed")
    async with deployment.open() as saver:
        await _planted(saver, docs)
        await archive_everything(saver)
        await _planted(saver, docs)  # live checkpoints on top of the archived ones
        assert await saver.aget_tuple(generate_config("doomed")) is not None  # hot entry
        assert "cold" in found_in(await deployment.scan(), secret)

        await saver.aprune(["doomed"], strategy="delete_all")

        assert await _everything(saver, "doomed") == await _everything(reference, "doomed")
        assert await _everything(saver, "doomed") == []
        for ns in ("", "child:1"):
            config: RunnableConfig = {"configurable": {"thread_id": "doomed",
                                                       "checkpoint_ns": ns}}
            assert await saver.aget_tuple(config) is None
        # the other thread is whole: written twice here (once archived), once there
        bystander = await _everything(saver, "bystander")
        assert len(bystander) == 8
        assert set(map(repr, bystander)) == set(map(repr,
                                                    await _everything(reference, "bystander")))
        assert found_in(await deployment.scan(), secret) == [], (
            f"{deployment.name}: canary survives")
