"""Adopting tierstore: migrate a LangGraph AsyncPostgresSaver database without losing history."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

from tests.servers.postgres import scratch_database
from tierstore import TieredSaver
from tierstore.demo import build_agent
from tierstore.ops import import_langgraph_postgres

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def langgraph_db(postgres_server: str) -> Iterator[str]:
    with scratch_database(postgres_server, "lgsource") as url:
        yield url


def cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


async def history(app: Any, thread: str) -> list[tuple[str, Any, Any]]:
    return [(s.config["configurable"]["checkpoint_id"], s.values, s.next)
            async for s in app.aget_state_history(cfg(thread))]


async def seed(url: str) -> dict[str, list[tuple[str, Any, Any]]]:
    async with AsyncPostgresSaver.from_conn_string(url) as source:
        await source.setup()
        app = build_agent().compile(checkpointer=source)
        for thread, turns in {"ann": ["remember blue", "what is 2 x 21"],
                              "ben": ["hello", "remember tea"]}.items():
            for text in turns:
                await app.ainvoke({"messages": [HumanMessage(text)]}, cfg(thread))
        return {t: await history(app, t) for t in ("ann", "ben")}


async def test_import_keeps_every_checkpoint_and_write(langgraph_db: str, tmp_path: Path) -> None:
    expected = await seed(langgraph_db)
    async with TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{tmp_path}/w.db",
                                     cold=None) as saver:
        report = await import_langgraph_postgres(saver, langgraph_db)
        assert report == {"threads": 2,
                          "checkpoints": sum(len(h) for h in expected.values())}
        app = build_agent().compile(checkpointer=saver)
        for thread, states in expected.items():
            assert await history(app, thread) == states
        out = await app.ainvoke({"messages": [HumanMessage("what do you remember")]}, cfg("ann"))
        assert out["messages"][-1].content == "I remember: blue."
        again = await import_langgraph_postgres(saver, langgraph_db)  # idempotent
        assert again == report
        assert len(await history(app, "ben")) == len(expected["ben"])


async def test_import_as_a_command(langgraph_db: str, tmp_path: Path) -> None:
    expected = await seed(langgraph_db)
    env = {**os.environ, "TIERSTORE_HOT_URL": "none",
           "TIERSTORE_WARM_URL": f"sqlite:///{tmp_path}/w.db", "TIERSTORE_COLD_URL": "none",
           "PYTHONPATH": str(ROOT)}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tierstore", "import", "--from-langgraph-postgres", langgraph_db,
         "--json"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["checkpoints"] == sum(len(h) for h in expected.values())
    bad = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tierstore", "import", "--from-langgraph-postgres",
         "postgresql://postgres@127.0.0.1:1/nothing"], capture_output=True, text=True, env=env,
        timeout=120, check=False)
    assert bad.returncode == 2
    assert "cannot read the LangGraph Postgres database" in bad.stderr
    assert "Traceback" not in bad.stderr
