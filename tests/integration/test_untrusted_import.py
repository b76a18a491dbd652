"""Import files are untrusted: validated whole before any write, never run code, never
hijack a thread; ``aput`` only stores LangGraph's time-ordered checkpoint ids."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.conformance.test_utils import (
    generate_checkpoint,
    generate_config,
    generate_metadata,
)
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from tests.bombs import GiB, bundle, chain, record, rle_frame, shell_payload
from tests.stacks import STACKS
from tests.unit.golden_values import Ticket
from tierstore import (
    CorruptPayload,
    DecompressionLimit,
    InvalidInput,
    TieredSaver,
    UnsafePayload,
)
from tierstore.demo import build_agent
from tierstore.ops import export_thread, import_file
from tierstore.records import Payload, WriteRecord
from tierstore.threads import Threads

TICKET = (Ticket.__module__, Ticket.__name__)


def embedded(tmp_path: Path, **options: Any) -> TieredSaver:
    return TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{tmp_path}/warm.db",
                                 cold=f"file://{tmp_path}/cold", **options)


def cfg(thread: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ""}
    if checkpoint_id is not None:
        c["checkpoint_id"] = checkpoint_id
    return {"configurable": c}


async def history(saver: TieredSaver, thread: str) -> list[str]:
    return [t.config["configurable"]["checkpoint_id"] async for t in saver.alist(cfg(thread))]


def write(tmp_path: Path, data: bytes, name: str = "in.tsexport") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- code execution ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["checkpoint", "metadata", "channel", "pending-write"])
async def test_import_never_runs_code_named_by_the_file(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    evil = Payload("msgpack", shell_payload(str(marker)))
    async with embedded(tmp_path) as saver:
        codec = saver.codec
        good = chain(codec, "victim", 2)
        kwargs: dict[str, Any] = {
            "checkpoint": {"checkpoint": evil},
            "metadata": {"metadata": evil},
            "channel": {"values": {"a": evil}},
            "pending-write": {"writes": (WriteRecord("task", 0, "a", evil, ""),)},
        }[where]
        bad = record(codec, "victim", parent_id=good[-1].checkpoint_id, **kwargs)
        path = write(tmp_path, bundle("victim", [*good, bad]))
        with pytest.raises(UnsafePayload, match=r"os\.system"):
            await import_file(saver, path)
        assert not marker.exists()
        assert await history(saver, "victim") == []  # nothing written, not even the good two
        # and nothing a later read or verify could trip over
        from tierstore.ops import verify

        assert (await verify(saver))["checked"] == 0
    assert not marker.exists()


async def test_types_outside_the_allowlist_need_allowed_msgpack_modules(tmp_path: Path) -> None:
    ticket = Ticket(id=1, title="t", tags=[])
    async with embedded(tmp_path) as saver:
        path = write(tmp_path, bundle("t", [record(saver.codec, "t",
                                                   values={"a": saver.codec.encode(ticket)})]))
        with pytest.raises(UnsafePayload, match="Ticket"):
            await import_file(saver, path)
        assert await history(saver, "t") == []
    async with embedded(tmp_path, allowed_msgpack_modules=(TICKET,)) as saver:
        await import_file(saver, path)
        got = await saver.aget_tuple(cfg("t"))
        assert got is not None and got.checkpoint["channel_values"]["a"] == ticket


async def test_with_allowlist_reaches_every_codec_stage(tmp_path: Path) -> None:
    """A strict serde (LangGraph's strict msgpack) and ``with_allowlist`` on top of it."""
    ticket = Ticket(id=2, title="u", tags=["x"])
    strict = JsonPlusSerializer(allowed_msgpack_modules=None)
    async with TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{tmp_path}/warm.db",
                                     cold=f"file://{tmp_path}/cold", serde=strict) as saver:
        path = write(tmp_path, bundle("t", [record(saver.codec, "t",
                                                   values={"a": saver.codec.encode(ticket)})]))
        with pytest.raises(UnsafePayload):
            await import_file(saver, path)
        allowed = saver.with_allowlist([TICKET])
        assert isinstance(allowed, TieredSaver) and allowed is not saver
        await import_file(allowed, path)
        got = await allowed.aget_tuple(cfg("t"))
        assert got is not None and got.checkpoint["channel_values"]["a"] == ticket
        # the strict saver itself keeps LangGraph's strict answer: the raw fields, no Ticket
        raw = await saver.aget_tuple(cfg("t"))
        assert raw is not None and not isinstance(raw.checkpoint["channel_values"]["a"], Ticket)


async def test_safe_decode_guards_what_the_stores_return(tmp_path: Path) -> None:
    """An operator who does not trust a store's writers reads it under the allowlist."""
    marker = tmp_path / "pwned"
    async with TieredSaver.from_urls(hot=None, warm=f"sqlite:///{tmp_path}/warm.db",
                                     cold=None) as saver:
        cp = generate_checkpoint(channel_values={"a": "fine"})
        cp["channel_versions"] = {"a": 1}
        stored = await saver.aput(generate_config("t"), cp, generate_metadata(), {"a": 1})
    conn = sqlite3.connect(tmp_path / "warm.db")
    with conn:
        conn.execute("UPDATE blobs SET tag = 'msgpack', data = ?", (shell_payload(str(marker)),))
    conn.close()
    async with TieredSaver.from_urls(hot=None, warm=f"sqlite:///{tmp_path}/warm.db",
                                     cold=None, safe_decode=True) as saver:
        with pytest.raises(UnsafePayload):
            await saver.aget_tuple(stored)
    assert not marker.exists()


# -- bounds ------------------------------------------------------------------------------------


async def test_import_refuses_a_bundle_that_inflates_past_its_bound(tmp_path: Path) -> None:
    async with embedded(tmp_path) as saver:
        path = write(tmp_path, bundle("t", [], body=rle_frame(6 * GiB)))
        with pytest.raises(DecompressionLimit, match="declares"):
            await import_file(saver, path)


async def test_import_refuses_values_that_would_break_every_read(tmp_path: Path) -> None:
    """Three 1 GiB channel values in a few hundred bytes: refused before any write."""
    async with embedded(tmp_path) as saver:
        huge = {ch: Payload("bytes+zstd", rle_frame(GiB)) for ch in ("a", "b", "c")}
        path = write(tmp_path, bundle("t", [record(saver.codec, "t", values=huge)]))
        assert path.stat().st_size < 1024
        with pytest.raises(DecompressionLimit):
            await import_file(saver, path)
        assert await history(saver, "t") == []
    async with embedded(tmp_path, max_record_bytes=150_000) as saver:
        mid = {ch: Payload("bytes+zstd", rle_frame(60_000)) for ch in ("a", "b", "c")}
        path = write(tmp_path, bundle("t", [record(saver.codec, "t", values=mid)]))
        with pytest.raises(DecompressionLimit, match="record"):
            await import_file(saver, path)
        assert await history(saver, "t") == []


# -- validation and thread safety ---------------------------------------------------------------


@pytest.mark.parametrize("thread", ["a\x00b", "x" * 200_000, ""])
async def test_import_refuses_thread_ids_the_api_cannot_reach(tmp_path: Path,
                                                              thread: str) -> None:
    async with embedded(tmp_path) as saver:
        path = write(tmp_path, bundle(thread, [record(saver.codec, thread)]))
        with pytest.raises(InvalidInput):
            await import_file(saver, path)
        assert [t async for t in saver.alist(None)] == []


async def test_import_refuses_a_channel_named_like_a_delta_link(tmp_path: Path) -> None:
    """The stores would take it for a link of the list ``notes`` (``codec.chain``)."""
    async with embedded(tmp_path) as saver:
        values = {"notes": saver.codec.encode(["a"]), "~1~notes": saver.codec.encode(["b"])}
        path = write(tmp_path, bundle("t", [record(saver.codec, "t", values=values)]))
        with pytest.raises(InvalidInput, match=r"'~1~notes'.*reserves"):
            await import_file(saver, path)
        assert await history(saver, "t") == []


@pytest.mark.parametrize("stack", sorted(STACKS))
async def test_a_bad_fourth_checkpoint_writes_nothing(request: pytest.FixtureRequest,
                                                      tmp_path: Path, stack: str) -> None:
    async with STACKS[stack](request, tmp_path).open() as saver:
        thread = f"t-{uuid.uuid4().hex}"
        records = chain(saver.codec, thread, 4)
        broken = records[3].blobs | {"a": Payload("msgpack", b"\xc1")}
        bad = [*records[:3], record(saver.codec, thread, checkpoint_id=records[3].checkpoint_id,
                                    parent_id=records[2].checkpoint_id, values=broken)]
        with pytest.raises(CorruptPayload):
            await import_file(saver, write(tmp_path, bundle(thread, bad)))
        assert await history(saver, thread) == []
        result = await import_file(saver, write(tmp_path, bundle(thread, records), "ok"))
        assert result["checkpoints"] == 4
        assert await history(saver, thread) == [r.checkpoint_id for r in reversed(records)]
        threads = {t.config["configurable"]["thread_id"] async for t in saver.alist(None)}
        assert threads == {thread}  # the staging copy is gone


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "ffffffff-ffff-6fff-8fff-ffffffffffff",
                                    str(uuid.uuid4())], ids=["not-a-uuid", "max-v6", "uuid4"])
async def test_import_refuses_ids_langgraph_does_not_generate(tmp_path: Path,
                                                              bad_id: str) -> None:
    async with embedded(tmp_path) as saver:
        path = write(tmp_path, bundle("t", [record(saver.codec, "t", checkpoint_id=bad_id)]))
        with pytest.raises(InvalidInput, match="checkpoint id"):
            await import_file(saver, path)
        assert await history(saver, "t") == []


async def test_import_never_takes_over_an_existing_thread_unless_told(tmp_path: Path) -> None:
    async with embedded(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({"messages": [HumanMessage("remember mine")]}, cfg("alice"))
        before = await history(saver, "alice")
        path = write(tmp_path, bundle("alice", chain(saver.codec, "alice", 2)))
        with pytest.raises(InvalidInput, match="already exists"):
            await import_file(saver, path)
        assert await history(saver, "alice") == before
        # later turns of the owner stay visible: the import did not become the head
        await app.ainvoke({"messages": [HumanMessage("remember more")]}, cfg("alice"))
        state = await app.aget_state(cfg("alice"))
        assert state.values["notes"] == ["mine", "more"]
        copy = await import_file(saver, path, as_thread="alice-copy")
        assert copy["thread_id"] == "alice-copy" and len(await history(saver, "alice-copy")) == 2
        replaced = await import_file(saver, path, replace=True)
        assert replaced["replaced"] is True and len(await history(saver, "alice")) == 2


async def test_a_write_that_fails_midway_leaves_no_part_of_the_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tierstore import TierUnavailable

    async with embedded(tmp_path) as saver:
        records = chain(saver.codec, "t", 4)
        real_put = saver.router.put
        calls = 0

        async def flaky_put(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise TierUnavailable("warm went away", tier="warm")
            return await real_put(*args, **kwargs)

        monkeypatch.setattr(saver.router, "put", flaky_put)
        with pytest.raises(TierUnavailable):
            await import_file(saver, write(tmp_path, bundle("t", records)))
        assert calls == 3 and await history(saver, "t") == []
        assert [t async for t in saver.alist(None)] == []  # no staging thread left either


async def test_a_replace_that_fails_to_publish_keeps_the_import(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tierstore import TierUnavailable

    async with embedded(tmp_path) as saver:
        await import_file(saver, write(tmp_path, bundle("t", chain(saver.codec, "t", 1))))
        records = chain(saver.codec, "t", 3)

        async def broken_copy(source: str, target: str) -> None:
            raise TierUnavailable("warm went away", tier="warm")

        before = await history(saver, "t")

        async def broken_publish(_threads: Threads, source: str, target: str, *,
                                 replace: bool) -> None:
            raise TierUnavailable("warm went away", tier="warm")

        monkeypatch.setattr(Threads, "publish_thread", broken_publish)
        with pytest.raises(TierUnavailable):
            await import_file(saver, write(tmp_path, bundle("t", records), "new"), replace=True)
        # the swap is one transaction: the old thread is whole, the staging copy gone
        kept = {t.config["configurable"]["thread_id"] async for t in saver.alist(None)}
        assert kept == {"t"} and await history(saver, "t") == before


async def test_export_import_round_trip_keeps_everything(tmp_path: Path) -> None:
    async with embedded(tmp_path) as saver:
        app = build_agent().compile(checkpointer=saver)
        for text in ("remember a", "what is 2 + 3", "remember b"):
            await app.ainvoke({"messages": [HumanMessage(text)]}, cfg("src"))
        await export_thread(saver, "src", tmp_path / "src.tsexport")
        await import_file(saver, tmp_path / "src.tsexport", as_thread="dst")
        a, b = await app.aget_state(cfg("src")), await app.aget_state(cfg("dst"))
        assert a.values == b.values and len(await history(saver, "dst")) == len(
            await history(saver, "src"))


# -- aput ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "", "ffffffff-ffff-6fff-8fff-ffffffffffff",
                                    str(uuid.uuid4())], ids=["not-a-uuid", "empty", "max-v6",
                                                             "uuid4"])
async def test_aput_refuses_ids_that_would_stay_latest(tmp_path: Path, bad_id: str) -> None:
    async with embedded(tmp_path) as saver:
        good = generate_checkpoint()
        first = await saver.aput(generate_config("t"), good, generate_metadata(), {})
        bad = generate_checkpoint()
        bad["id"] = bad_id
        with pytest.raises(InvalidInput, match="checkpoint id"):
            await saver.aput(generate_config("t"), bad, generate_metadata(), {})
        later = await saver.aput(first, generate_checkpoint(), generate_metadata(), {})
        latest = await saver.aget_tuple(generate_config("t"))
        assert latest is not None and latest.config == later
        assert await saver.aget_tuple(cfg("t", str(uuid.uuid4()))) is None  # reads: any id


async def test_the_clock_skew_allowed_for_new_ids_is_a_setting(tmp_path: Path) -> None:
    import time

    from tests.bombs import v6_at

    ahead = generate_checkpoint()
    ahead["id"] = v6_at(time.time() + 600)
    async with embedded(tmp_path) as saver:
        with pytest.raises(InvalidInput, match="future"):
            await saver.aput(generate_config("t"), ahead, generate_metadata(), {})
    async with embedded(tmp_path, checkpoint_id_skew=3600) as saver:
        stored = await saver.aput(generate_config("t"), ahead, generate_metadata(), {})
        assert stored["configurable"]["checkpoint_id"] == ahead["id"]


# -- publishing: never merged, never written directly, old data kept until the swap ----------------


@pytest.mark.parametrize("stack", sorted(STACKS))
async def test_a_thread_created_while_the_import_runs_is_never_merged(
        request: pytest.FixtureRequest, tmp_path: Path, stack: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with STACKS[stack](request, tmp_path).open() as saver:
        thread = f"victim-{uuid.uuid4().hex}"
        records = chain(saver.codec, thread, 3)
        real_put = saver.router.put
        mine: list[str] = []

        async def put_then_the_app_writes(*args: Any, **kwargs: Any) -> Any:
            result = await real_put(*args, **kwargs)
            if not mine:  # the application starts the conversation meanwhile
                mine.append("busy")
                stored = await saver.aput(generate_config(thread), generate_checkpoint(),
                                          generate_metadata(), {})
                mine[0] = stored["configurable"]["checkpoint_id"]
            return result

        monkeypatch.setattr(saver.router, "put", put_then_the_app_writes)
        with pytest.raises(InvalidInput, match="already exists"):
            await import_file(saver, write(tmp_path, bundle(thread, records)))
        monkeypatch.setattr(saver.router, "put", real_put)
        assert await history(saver, thread) == mine
        threads = {t.config["configurable"]["thread_id"] async for t in saver.alist(None)}
        assert threads == {thread}  # no staging thread left
        # --replace swaps the thread for the import, nothing of the old one stays
        await import_file(saver, write(tmp_path, bundle(thread, records), "again"), replace=True)
        assert await history(saver, thread) == [r.checkpoint_id for r in reversed(records)]


@pytest.mark.parametrize("thread", ["L" * 65_500, "short"])
async def test_an_import_never_writes_under_the_target_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread: str) -> None:
    """Whatever the id's length, every write goes to a staging thread (a crash mid-way
    leaves no part of the target visible)."""
    from tierstore import TierUnavailable

    async with embedded(tmp_path) as saver:
        records = chain(saver.codec, thread, 5)
        real_put = saver.router.put
        written: list[str] = []

        async def put_then_die(record: Any, *args: Any, **kwargs: Any) -> Any:
            written.append(record.thread_id)
            if len(written) == 3:
                raise TierUnavailable("killed", tier="warm")
            return await real_put(record, *args, **kwargs)

        monkeypatch.setattr(saver.router, "put", put_then_die)
        with pytest.raises(TierUnavailable):
            await import_file(saver, write(tmp_path, bundle(thread, records)))
        assert len(written) == 3 and thread not in written
        assert [t async for t in saver.alist(None)] == []
        monkeypatch.setattr(saver.router, "put", real_put)
        await import_file(saver, write(tmp_path, bundle(thread, records), "ok"))
        assert len(await history(saver, thread)) == 5


async def test_an_import_is_refused_when_no_staging_lands_in_the_target_region(
        tmp_path: Path) -> None:
    from tierstore.region import Regions

    async with embedded(tmp_path) as saver:
        stack = saver.regions.by_name["default"]
        records = chain(saver.codec, "t", 2)
        saver.router.regions = Regions(
            {"default": stack, "elsewhere": stack.__class__(warm=stack.warm)},
            resolve=lambda t: "default" if t == "t" else "elsewhere")
        with pytest.raises(InvalidInput, match="staging"):
            await import_file(saver, write(tmp_path, bundle("t", records)))
        saver.router.regions = Regions({"default": stack})
        assert [t async for t in saver.alist(None)] == []


@pytest.mark.parametrize("bad", ["idx", "task_path", "channel_version", "channel_name"])
async def test_everything_a_store_holds_is_checked_before_the_first_write(
        tmp_path: Path, bad: str) -> None:
    """A value no store can hold in the 4th checkpoint: refused up front, and with
    --replace the existing thread (with a maximal id) is left whole."""
    thread = "L" * 65_500
    async with embedded(tmp_path) as saver:
        codec = saver.codec
        await import_file(saver, write(tmp_path, bundle(thread, chain(codec, thread, 2)), "old"))
        before = await history(saver, thread)
        records = chain(codec, thread, 3)
        last = records[-1].checkpoint_id
        if bad in ("idx", "task_path"):
            w = WriteRecord("task", 2**64 - 1 if bad == "idx" else 0, "a", codec.encode(1),
                            "p\x00" if bad == "task_path" else "")
            fourth = record(codec, thread, parent_id=last, writes=(w,))
        else:
            from tests.bombs import checkpoint_body, v6_at

            cid = v6_at(time.time())
            versions = ({"a": "1\x00"} if bad == "channel_version" else {"a\x00": "1"})
            fourth = record(codec, thread, checkpoint_id=cid, parent_id=last,
                            checkpoint=codec.encode(checkpoint_body(cid, versions)))
        path = write(tmp_path, bundle(thread, [*records, fourth]))
        with pytest.raises(InvalidInput) as info:
            await import_file(saver, path, as_thread="fresh")
        assert "already exists" not in str(info.value)
        with pytest.raises(InvalidInput):
            await import_file(saver, path, replace=True)
        assert await history(saver, thread) == before
        threads = {t.config["configurable"]["thread_id"] async for t in saver.alist(None)}
        assert threads == {thread}


async def test_an_import_is_stored_under_the_savers_encryption(tmp_path: Path) -> None:
    from tierstore import Keyring

    canary = "import-canary-" + uuid.uuid4().hex
    async with embedded(tmp_path / "src") as clear:
        records = [record(clear.codec, "t", values={"a": clear.codec.encode(canary * 20)},
                          writes=(WriteRecord("task", 0, "a", clear.codec.encode(canary)),))]
        path = write(tmp_path, bundle("t", records))
    keyring = Keyring(current="k1", keys={"k1": Keyring.generate_key()})
    async with embedded(tmp_path / "dst", encryption=keyring) as saver:
        await import_file(saver, path)
        got = await saver.aget_tuple(cfg("t"))
        assert got is not None and got.checkpoint["channel_values"]["a"] == canary * 20
        assert got.pending_writes == [("task", "a", canary)]
    conn = sqlite3.connect(tmp_path / "dst" / "warm.db")
    try:
        tags = {r[0] for r in conn.execute("SELECT tag FROM blobs UNION ALL SELECT tag FROM "
                                           "writes UNION ALL SELECT metadata_tag FROM "
                                           "checkpoints")}
    finally:
        conn.close()
    assert tags and all("aesgcm" in t for t in tags), tags
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "dst").rglob("*") if p.is_file())
    assert canary.encode() not in on_disk


# -- with_allowlist ------------------------------------------------------------------------------


async def test_with_allowlist_decodes_every_read_safely_on_a_default_saver(tmp_path: Path) -> None:
    """A planted code-running value in warm: the allowlisted view refuses it on every read."""
    from tierstore.ops import verify

    marker = tmp_path / "pwned"
    async with embedded(tmp_path) as saver:
        cp = generate_checkpoint(channel_values={"a": "fine"})
        cp["channel_versions"] = {"a": 1}
        stored = await saver.aput(generate_config("t"), cp, generate_metadata(), {"a": 1})
    conn = sqlite3.connect(tmp_path / "warm.db")
    with conn:
        conn.execute("UPDATE blobs SET tag = 'msgpack', data = ?", (shell_payload(str(marker)),))
        conn.execute("UPDATE checkpoints SET metadata_tag = 'msgpack', metadata = ?",
                     (shell_payload(str(marker)),))
    conn.close()
    async with embedded(tmp_path) as saver:
        view = saver.with_allowlist([("json", "loads")])
        assert isinstance(view, TieredSaver) and view is not saver
        with pytest.raises(UnsafePayload, match=r"os\.system"):
            await view.aget_tuple(stored)
        with pytest.raises(UnsafePayload):
            _ = [t async for t in view.alist(cfg("t"))]
        report = await verify(view)
        assert not report["ok"] and "os.system" in " ".join(report["problems"])
    assert not marker.exists()


async def test_with_allowlist_admits_what_it_names_under_safe_decode(tmp_path: Path) -> None:
    ticket = Ticket(id=3, title="v", tags=[])
    async with embedded(tmp_path, safe_decode=True) as saver:
        cp = generate_checkpoint(channel_values={"a": ticket})
        cp["channel_versions"] = {"a": 1}
        stored = await saver.aput(generate_config("t"), cp, generate_metadata(), {"a": 1})
    async with embedded(tmp_path, safe_decode=True) as saver:
        with pytest.raises(UnsafePayload, match="Ticket"):
            await saver.aget_tuple(stored)
        got = await saver.with_allowlist([TICKET]).aget_tuple(stored)
        assert got is not None and got.checkpoint["channel_values"]["a"] == ticket
        with pytest.raises(UnsafePayload, match="Ticket"):  # the saver itself is unchanged
            await saver.aget_tuple(stored)


async def test_closing_an_allowlisted_view_leaves_the_shared_stores_open(tmp_path: Path) -> None:
    async with embedded(tmp_path) as saver:
        stored = await saver.aput(generate_config("t"), generate_checkpoint(),
                                  generate_metadata(), {})
        async with saver.with_allowlist([TICKET]) as view:
            assert await view.aget_tuple(stored) is not None
        await view.aclose()
        assert saver.state == "opened" and await saver.aget_tuple(stored) is not None
    assert saver.state == "closed"
    # a view of a saver nobody opened opens it, and closes it again
    async with embedded(tmp_path).with_allowlist([TICKET]) as view:
        assert await view.aget_tuple(stored) is not None
    assert view.state == "closed"
    with embedded(tmp_path) as sync_saver:
        with sync_saver.with_allowlist([TICKET]) as sync_view:
            assert sync_view.get_tuple(stored) is not None
        assert sync_saver.get_tuple(stored) is not None



async def test_replace_leaves_nothing_of_the_old_thread_in_any_tier(tmp_path: Path) -> None:
    """--replace swaps the rows in one step, then the old thread's segments and
    offloaded values go too: its canary is found in no tier afterwards."""
    from tests.integration.rawbytes import disk_bytes, unpacked
    from tests.integration.test_deletion import (
        THRESHOLD,
        archive_everything,
        canary,
        large,
        write_chain,
    )
    from tierstore.ops import verify

    def scan() -> bytes:
        return unpacked(disk_bytes(tmp_path))

    secret = canary()
    # offload_grace=0: no put is in flight here, so the old thread's offloaded objects
    # may go at once (with the default grace they go with ColdGC: see test_offload)
    async with TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{tmp_path}/warm.db",
                                     cold=f"file://{tmp_path}/cold", offload_grace=0,
                                     offload_threshold=THRESHOLD, hot_write_delay=0) as saver:
        await write_chain(saver, "bob", [{"note": secret, "doc": large(secret)},
                                         {"note": secret + "-2", "doc": large(secret)}],
                          run_id="r1")
        await archive_everything(saver)
        await write_chain(saver, "bob", [{"note": secret + "-live", "doc": large(secret)}],
                          run_id="r2", parent=generate_config("bob"), first_version=10)
        assert secret.encode() in scan()
        records = chain(saver.codec, "bob", 2)
        await import_file(saver, write(tmp_path, bundle("bob", records), "new.bin"),
                          replace=True)
        assert await history(saver, "bob") == [r.checkpoint_id for r in reversed(records)]
        assert (await verify(saver))["ok"]
        assert secret.encode() not in scan()
