"""tierstore as the checkpointer of a real LangGraph Agent Server (``langgraph dev``).

Each server runs once per stack and loop mode (the API's shared loop, or
``BG_JOB_ISOLATED_LOOPS=true``: a saver per background loop besides the API's), from
a temporary project whose ``langgraph.json`` names ``tierstore.agent_server``. It is
driven over HTTP with ``langgraph_sdk``, and what every call left behind is read back
from the stores themselves with a ``TieredSaver`` of the test's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

pytest.importorskip("langgraph_api", reason="needs langgraph-cli[inmem] (the test extra)")

from langgraph_sdk import get_client
from langgraph_sdk.client import LangGraphClient
from langgraph_sdk.errors import NotFoundError

from tests.servers.postgres import free_port
from tests.stacks import postgres_warm_url, redis_hot_url
from tierstore import TieredSaver
from tierstore.records import ListQuery

REPO = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE = 120.0
"""Seconds a server may take to answer /ok on a loaded machine (not an assertion of speed)."""

GRAPH = '''
"""A one-node graph: each run appends one item; ``delay`` keeps a run busy."""
import asyncio
import operator
from typing import Annotated, TypedDict

from langgraph.graph import END, START, StateGraph


class State(TypedDict, total=False):
    items: Annotated[list[str], operator.add]
    delay: float


async def step(state: State) -> dict:
    if state.get("delay"):
        await asyncio.sleep(state["delay"])
    return {"items": [f"item{len(state.get('items') or [])}"]}


builder = StateGraph(State)
builder.add_node("step", step)
builder.add_edge(START, "step")
builder.add_edge("step", END)
graph = builder.compile()
'''

OPAQUE_GRAPH = '''
"""A graph whose state holds a value msgpack cannot encode (the server's serde pickles it).

A Fraction, not a class of this module: the dev server pickles thread values into its
own files too, and reloads them on restart before any graph module is imported.
"""
from fractions import Fraction
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph


class State(TypedDict, total=False):
    n: int
    opaque: Any


def step(state: State) -> dict:
    n = state.get("n", 0) + 1
    return {"opaque": Fraction(1, n), "n": n}


builder = StateGraph(State)
builder.add_node("step", step)
builder.add_edge(START, "step")
builder.add_edge("step", END)
graph = builder.compile()
'''

FACTORY_FILE = "from tierstore.agent_server import checkpointer\n"


@dataclass
class Server:
    """One ``langgraph dev`` process over one stack of stores, restartable."""

    name: str
    project: Path
    urls: dict[str, str | None]
    isolated: bool
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TIERSTORE_", "LANGSMITH_", "LANGCHAIN_"))}
        env.update({
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
            "LANGGRAPH_CLI_NO_ANALYTICS": "1",
            "LANGSMITH_TRACING": "false",
            "BG_JOB_ISOLATED_LOOPS": "true" if self.isolated else "false",
            "BG_JOB_SHUTDOWN_GRACE_PERIOD_SECS": "5",
        })
        for tier, url in self.urls.items():
            env[f"TIERSTORE_{tier.upper()}_URL"] = "none" if url is None else url
        return env

    def start(self) -> None:
        langgraph = Path(sys.executable).parent / "langgraph"
        command = [str(langgraph) if langgraph.exists() else shutil.which("langgraph") or "",
                   "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1",
                   "--port", str(self.port), "--n-jobs-per-worker", "2"]
        self.starts += 1
        log = (self.project / f"server-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(command, cwd=self.project, env=self.env(),
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + STARTUP_DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited at startup:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ok", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise AssertionError(f"the server did not come up:\n{self.log()}")

    def stop(self) -> None:
        """SIGINT, as Ctrl-C: the server shuts down and closes its checkpointer."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"the server did not stop on SIGINT:\n{self.log()}") from None

    def log(self) -> str:
        logs = sorted(self.project.glob("server-*.log"))
        return logs[-1].read_text(errors="replace")[-6000:] if logs else ""

    def saver(self) -> TieredSaver:
        """A saver of the test's own on the server's stores (hot: its own memory)."""
        hot = self.urls["hot"]
        return TieredSaver.from_urls(
            hot=None if hot is None or hot.startswith("memory:") else hot,
            warm=self.urls["warm"] or "", cold=self.urls["cold"])


def embedded(request: pytest.FixtureRequest, tmp: Path) -> dict[str, str | None]:
    return {"hot": "memory://", "warm": f"sqlite:///{tmp}/warm.db", "cold": f"file://{tmp}/cold"}


def redis_postgres(request: pytest.FixtureRequest, tmp: Path) -> dict[str, str | None]:
    return {"hot": redis_hot_url(request), "warm": postgres_warm_url(request), "cold": None}


STACKS = {"embedded": embedded, "redis+postgres": redis_postgres}
MODES = {"shared-loop": False, "isolated-loops": True}


@pytest.fixture(scope="module", params=[(s, m) for s in STACKS for m in MODES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    stack, mode = request.param
    project = tmp_path_factory.mktemp("agent-server")
    (project / "graph.py").write_text(GRAPH)
    (project / "opaque.py").write_text(OPAQUE_GRAPH)
    (project / "checkpointer.py").write_text(FACTORY_FILE)
    # the module path on one stack, a project file on the other: both forms the README gives
    path = ("tierstore.agent_server.checkpointer" if stack == "embedded"
            else "./checkpointer.py:checkpointer")
    (project / "langgraph.json").write_text(json.dumps({
        "dependencies": ["."],
        "graphs": {"agent": "./graph.py:graph", "opaque": "./opaque.py:graph"},
        "checkpointer": {"path": path}}))
    srv = Server(name=f"{stack}-{mode}", project=project,
                 urls=STACKS[stack](request, project / "stores"), isolated=MODES[mode])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[LangGraphClient]:
    c = get_client(url=server.url, api_key=None)
    try:
        yield c
    finally:
        await c.http.client.aclose()


@pytest.fixture
async def saver(server: Server) -> AsyncIterator[TieredSaver]:
    async with server.saver() as s:
        yield s


def conf(thread_id: str, **extra: Any) -> Any:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": "", **extra}}


async def new_thread(client: LangGraphClient) -> str:
    thread = await client.threads.create()
    return str(thread["thread_id"])


async def run(client: LangGraphClient, thread_id: str) -> dict[str, Any]:
    """One run to its end; its output values."""
    out = await client.runs.wait(thread_id, "agent", input={"items": []}, raise_error=True)
    assert isinstance(out, dict)
    return out


def values(state: Any) -> dict[str, Any]:
    """A thread state's values (the SDK types them as a dict or a list)."""
    out = state["values"]
    assert isinstance(out, dict)
    return out


async def stored_ids(saver: TieredSaver, thread_id: str, **kwargs: Any) -> list[str]:
    return [t.config["configurable"]["checkpoint_id"]
            async for t in saver.alist(conf(thread_id), **kwargs)]


async def wait_started(saver: TieredSaver, thread_id: str, run_id: str) -> None:
    """Until the run has stored the checkpoint its node starts from (the node then sleeps)."""
    for _ in range(1200):
        if await stored_ids(saver, thread_id, filter={"run_id": run_id, "source": "loop"}):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never started")


async def test_runs_and_thread_state_are_the_stored_head(
        client: LangGraphClient, saver: TieredSaver) -> None:
    thread_id = await new_thread(client)
    await run(client, thread_id)
    out = await run(client, thread_id)
    assert out["items"] == ["item0", "item1"]
    state = await client.threads.get_state(thread_id)
    head = await saver.aget_tuple(conf(thread_id))
    assert head is not None
    assert state["checkpoint"]["checkpoint_id"] == head.config["configurable"]["checkpoint_id"]
    assert head.checkpoint["channel_values"]["items"] == ["item0", "item1"]
    assert values(state)["items"] == ["item0", "item1"]
    # the server's metadata reaches the store: the run and the graph of each checkpoint
    assert head.metadata.get("graph_id") == "agent"
    assert head.metadata.get("thread_id") == thread_id


async def test_history_with_filters_matches_the_store(
        client: LangGraphClient, saver: TieredSaver) -> None:
    thread_id = await new_thread(client)
    for _ in range(3):
        await run(client, thread_id)
    history = await client.threads.get_history(thread_id, limit=100)
    ids = await stored_ids(saver, thread_id)
    assert [h["checkpoint"]["checkpoint_id"] for h in history] == ids
    assert len(ids) == 3 * 3  # input, loop at start, loop after the node, per run
    loops = await client.threads.get_history(thread_id, limit=100, metadata={"source": "loop"})
    assert [h["checkpoint"]["checkpoint_id"] for h in loops] == await stored_ids(
        saver, thread_id, filter={"source": "loop"})
    assert len(loops) == 2 * 3
    inputs = await client.threads.get_history(thread_id, limit=2, metadata={"source": "input"})
    assert [h["checkpoint"]["checkpoint_id"] for h in inputs] == await stored_ids(
        saver, thread_id, filter={"source": "input"}, limit=2)
    bound: Any = {"thread_id": thread_id, "checkpoint_ns": "", "checkpoint_id": ids[2]}
    before = await client.threads.get_history(thread_id, limit=3, before=bound)
    assert [h["checkpoint"]["checkpoint_id"] for h in before] == ids[3:6]


async def test_copy_thread_copies_the_stored_history(
        client: LangGraphClient, saver: TieredSaver) -> None:
    thread_id = await new_thread(client)
    await run(client, thread_id)
    await run(client, thread_id)
    # the SDK's annotation says None; the API answers with the new thread
    copy: Any = await client.threads.copy(thread_id)  # type: ignore[func-returns-value]
    copy_id = str(copy["thread_id"])
    assert copy_id != thread_id
    source = [t async for t in saver.alist(conf(thread_id))]
    copied = [t async for t in saver.alist(conf(copy_id))]
    assert [t.config["configurable"]["checkpoint_id"] for t in copied] == [
        t.config["configurable"]["checkpoint_id"] for t in source]
    assert [t.checkpoint["channel_values"] for t in copied] == [
        t.checkpoint["channel_values"] for t in source]
    state = await client.threads.get_state(copy_id)
    assert values(state)["items"] == ["item0", "item1"]
    out = await run(client, copy_id)  # the copy goes on by itself
    assert out["items"] == ["item0", "item1", "item2"]
    head = await saver.aget_tuple(conf(thread_id))
    assert head is not None and head.checkpoint["channel_values"]["items"] == ["item0", "item1"]


@pytest.mark.parametrize("strategy", ["interrupt", "rollback"])
async def test_double_texting_interrupts_or_rolls_back_the_first_run(
        client: LangGraphClient, saver: TieredSaver,
        strategy: Literal["interrupt", "rollback"]) -> None:
    thread_id = await new_thread(client)
    await run(client, thread_id)
    busy: dict[str, Any] = {"items": [], "delay": 4.0}  # busy until the second run comes
    first = await client.runs.create(thread_id, "agent", input=busy)
    await wait_started(saver, thread_id, first["run_id"])
    second = await client.runs.create(thread_id, "agent", input={"items": []},
                                      multitask_strategy=strategy)
    await client.runs.join(thread_id, second["run_id"])
    assert (await client.runs.get(thread_id, second["run_id"]))["status"] == "success"
    first_checkpoints = await stored_ids(saver, thread_id, filter={"run_id": first["run_id"]})
    if strategy == "interrupt":
        assert (await client.runs.get(thread_id, first["run_id"]))["status"] == "interrupted"
        assert first_checkpoints  # the interrupted run's input stays in the history
    else:
        with pytest.raises(NotFoundError):
            await client.runs.get(thread_id, first["run_id"])
        assert first_checkpoints == []  # adelete_for_runs removed what it wrote
    head = await saver.aget_tuple(conf(thread_id))
    assert head is not None
    assert head.metadata.get("run_id") == second["run_id"]
    state = await client.threads.get_state(thread_id)
    assert values(state)["items"] == head.checkpoint["channel_values"]["items"]
    assert values(state)["items"][-1] == f"item{len(values(state)['items']) - 1}"


async def test_update_state_writes_a_stored_checkpoint(
        client: LangGraphClient, saver: TieredSaver) -> None:
    thread_id = await new_thread(client)
    await run(client, thread_id)
    result = await client.threads.update_state(thread_id, {"items": ["manual"]}, as_node="step")
    head = await saver.aget_tuple(conf(thread_id))
    assert head is not None
    assert head.config["configurable"]["checkpoint_id"] == result["checkpoint"]["checkpoint_id"]
    assert head.checkpoint["channel_values"]["items"] == ["item0", "manual"]
    assert head.metadata["source"] == "update"
    out = await run(client, thread_id)
    assert out["items"] == ["item0", "manual", "item2"]


async def test_delete_thread_deletes_it_from_the_stores(
        client: LangGraphClient, saver: TieredSaver) -> None:
    thread_id = await new_thread(client)
    keep = await new_thread(client)
    await run(client, thread_id)
    await run(client, keep)
    await client.threads.delete(thread_id)
    assert await saver.aget_tuple(conf(thread_id)) is None
    assert await stored_ids(saver, thread_id) == []
    assert len(await stored_ids(saver, keep)) == 3


async def test_values_are_encoded_by_the_servers_serializer(
        client: LangGraphClient, saver: TieredSaver) -> None:
    """The server's serde pickles what msgpack cannot encode; LangGraph's default refuses it."""
    thread_id = await new_thread(client)
    for _ in range(2):
        await client.runs.wait(thread_id, "opaque", input={"n": 0}, raise_error=True)
    head = [r async for r in saver.alist_records(ListQuery(thread_id=thread_id, limit=1))]
    assert head, "no checkpoint stored"
    assert head[0].blobs["opaque"].tag.split("+")[0] == "pickle"


async def test_state_survives_a_server_restart(
        server: Server, client: LangGraphClient, saver: TieredSaver) -> None:
    thread_id = await new_thread(client)
    await run(client, thread_id)
    await run(client, thread_id)
    before = await client.threads.get_history(thread_id, limit=100)
    await asyncio.to_thread(server.stop)
    await asyncio.to_thread(server.start)
    after = await client.threads.get_history(thread_id, limit=100)
    assert [h["checkpoint"]["checkpoint_id"] for h in after] == [
        h["checkpoint"]["checkpoint_id"] for h in before]
    out = await run(client, thread_id)
    assert out["items"] == ["item0", "item1", "item2"]
    assert len(await stored_ids(saver, thread_id)) == 9


def test_the_factory_opens_one_saver_per_event_loop(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """As the server with isolated loops: two loops in two threads, each entering the
    factory, open at once; each sees what the other wrote, though each has a hot copy."""
    from langgraph.checkpoint.base import empty_checkpoint

    from tierstore.agent_server import checkpointer

    monkeypatch.setenv("TIERSTORE_WARM_URL", f"sqlite:///{tmp_path}/warm.db")
    monkeypatch.setenv("TIERSTORE_COLD_URL", f"file://{tmp_path}/cold")
    monkeypatch.setenv("TIERSTORE_HOT_URL", "memory://")
    thread_id = f"t-{uuid.uuid4().hex}"
    savers: list[TieredSaver] = []
    seen: dict[str, list[int]] = {}
    turns = [threading.Event(), threading.Event()]

    async def append(saver: TieredSaver, step: int) -> list[int]:
        head = await saver.aget_tuple(conf(thread_id))
        steps = [*(head.checkpoint["channel_values"]["steps"] if head else []), step]
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"steps": steps}
        checkpoint["channel_versions"] = {"steps": saver.get_next_version(
            str(head.checkpoint["channel_versions"]["steps"]) if head else None, None)}
        await saver.aput(head.config if head else conf(thread_id), checkpoint,
                         {"source": "loop", "step": step}, checkpoint["channel_versions"])
        return steps

    async def first() -> None:
        async with checkpointer() as saver:
            savers.append(saver)
            seen["a1"] = await append(saver, 1)
            turns[0].set()
            await asyncio.to_thread(turns[1].wait, 60)
            seen["a3"] = await append(saver, 3)

    async def second() -> None:
        await asyncio.to_thread(turns[0].wait, 60)
        async with checkpointer() as saver:
            savers.append(saver)
            seen["b2"] = await append(saver, 2)
            turns[1].set()

    threads = [threading.Thread(target=asyncio.run, args=(job(),)) for job in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert seen == {"a1": [1], "b2": [1, 2], "a3": [1, 2, 3]}
    assert len({id(s) for s in savers}) == 2
    assert all(s.state == "closed" for s in savers)
