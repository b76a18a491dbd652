"""``tierstore verify`` checks referential completeness, not only checksums.

Each test breaks one thing the way a bug or an operator could (a channel value gone
from warm while a live checkpoint names it, a stub pointing at a segment without
it, a pending write that does not decode) and verify must name the checkpoint.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.integration.archiver import archive_everything
from tests.integration.test_archive_race import profile_graph, thread_cfg
from tests.stacks import ARCHIVING_STACKS, Urls
from tierstore import TieredSaver
from tierstore.ops import verify
from tierstore.records import Payload, WriteRecord

VERIFY_STACKS = ["embedded", "postgres+file"]  # one warm keeps rows for empty channels, one not


@pytest.fixture(params=VERIFY_STACKS)
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return ARCHIVING_STACKS[request.param](request, tmp_path)


async def two_turns_with_history_archived(saver: TieredSaver, thread: str) -> None:
    app = profile_graph().compile(checkpointer=saver)
    await app.ainvoke({"notes": ["hello"]}, thread_cfg(thread))
    moved, errors = await archive_everything(saver)
    assert moved > 0 and errors == []
    await app.ainvoke({"notes": ["again"]}, thread_cfg(thread))


async def sql(saver: TieredSaver, statement: str, *args: Any) -> None:
    """Run one statement on the warm store's own connection (to break it on purpose)."""
    warm: Any = saver.regions.for_thread("x").warm
    if warm.backend == "sqlite":
        await warm._run(lambda conn: conn.execute(statement.replace("tierstore_", ""), args))
    else:
        await warm._run("test", lambda conn: conn.execute(
            statement.replace("?", "$1"), *args))


async def ids(saver: TieredSaver, thread: str) -> list[str]:
    return [t.config["configurable"]["checkpoint_id"]
            async for t in saver.alist(thread_cfg(thread))]


async def test_a_clean_store_verifies(urls: Urls) -> None:
    async with urls.open() as saver:
        await two_turns_with_history_archived(saver, "clean")
        report = await verify(saver)
        assert report["ok"], report["problems"]
        assert report["checked"] == len(await ids(saver, "clean"))


async def test_verify_names_checkpoints_whose_channel_value_is_gone(urls: Urls) -> None:
    async with urls.open() as saver:
        await two_turns_with_history_archived(saver, "lost-profile")
        await sql(saver, "DELETE FROM tierstore_blobs WHERE channel = ?", "profile")
        report = await verify(saver)
    assert not report["ok"]
    named = {b["checkpoint_id"] for b in report["broken"] if "'profile'" in b["problem"]}
    assert named  # every live checkpoint from the first turn's write of profile on
    assert all("resolves nowhere" in b["problem"] for b in report["broken"])


async def test_verify_names_a_checkpoint_whose_delta_chain_lost_its_only_link(
        urls: Urls) -> None:
    """A chain's link is never empty: its row gone is a loss on PostgreSQL too."""
    from tests.integration.test_delta_lost_link import (
        cfg,
        lose_link,
        whole_graph,
    )

    async with urls.open() as saver:
        app = whole_graph().compile(checkpointer=saver)
        await app.ainvoke({"items": ["u0"]}, cfg("lost-link"))
        latest = (await ids(saver, "lost-link"))[0]
        await lose_link(saver, "lost-link", latest)
        report = await verify(saver)
    assert not report["ok"]
    assert [(b["checkpoint_id"], "'items'" in b["problem"]) for b in report["broken"]] == [
        (latest, True)]


async def test_verify_names_a_stub_whose_segment_lacks_it(urls: Urls) -> None:
    async with urls.open() as saver:
        await two_turns_with_history_archived(saver, "wrong-segment")
        stack = saver.regions.for_thread("wrong-segment")
        refs = sorted(await stack.warm.archive_refs("wrong-segment"))
        assert len(refs) >= 2
        oldest = (await ids(saver, "wrong-segment"))[-1]
        held = await stack.warm.archive_stubs(keys=refs)
        other = next(k for k in refs if oldest not in held.get(k, set()))
        await sql(saver, f"UPDATE tierstore_checkpoints SET archive_key = '{other}' "
                         "WHERE checkpoint_id = ?", oldest)
        report = await verify(saver)
    assert not report["ok"]
    assert [(b["checkpoint_id"], b["problem"]) for b in report["broken"]] == [
        (oldest, f"segment {other} does not hold it")]


async def test_verify_names_a_checkpoint_with_an_undecodable_write(urls: Urls) -> None:
    async with urls.open() as saver:
        await two_turns_with_history_archived(saver, "bad-write")
        every = await ids(saver, "bad-write")
        garbage = WriteRecord("task", 0, "notes", Payload("msgpack+zstd", b"\x00not zstd"))
        for checkpoint_id in (every[0], every[-1]):  # a live one and an archived one
            await saver.router.put_writes("bad-write", "", checkpoint_id, [garbage])
        report = await verify(saver)
    assert not report["ok"]
    assert sorted(b["checkpoint_id"] for b in report["broken"]) == sorted(
        [every[0], every[-1]])
    assert all("pending write 'task'/0" in b["problem"] for b in report["broken"])


def test_the_cli_exits_nonzero_and_names_the_checkpoint(urls: Urls, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    async def break_one() -> str:
        async with urls.open() as saver:
            await two_turns_with_history_archived(saver, "cli")
            latest = (await ids(saver, "cli"))[0]  # a broken checkpoint no longer reads
            await sql(saver, "DELETE FROM tierstore_blobs WHERE channel = ?", "profile")
            return latest

    latest = asyncio.run(break_one())
    args = ["--warm", str(urls.warm), "--cold", str(urls.cold)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERSTORE_")}
    result = subprocess.run([sys.executable, "-m", "tierstore", "verify", *args, "--json"],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode != 0, result.stderr
    data = json.loads(result.stdout)
    assert latest in {b["checkpoint_id"] for b in data["broken"]}
