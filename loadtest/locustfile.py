"""Locust scenarios: users chatting with the LangGraph agent over one ``TieredSaver``.

The stores come from the environment, as in production (``TieredSaver.from_env``)::

    TIERSTORE_HOT_URL   TIERSTORE_WARM_URL   TIERSTORE_COLD_URL   (and TIERSTORE_* options)

With none of the three set, the embedded stack runs in a new temporary directory
(``memory://``, ``sqlite:///…/warm.db``, ``file:///…/cold``), removed on exit.

Locust runs users as gevent greenlets and monkey-patches the process; the saver is
asyncio. So one asyncio loop runs in a real OS thread (gevent's original
``start_new_thread``, on the original epoll selector), and each user call goes::

    greenlet ── run_coroutine_threadsafe ──► asyncio loop thread ── await saver/graph
        ▲                                               │ done
        └──── gevent async watcher (thread-safe wake) ◄─┘
    then environment.events.request.fire(...) with the call's wall time

Tasks (weights): a new conversation (1), the next turn of one of the user's
conversations (4), read its latest state (3), list its last 10 checkpoints (1).

    locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 30s --exit-code-on-error 1
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import gevent  # type: ignore[import-untyped]
from gevent.hub import Waiter  # type: ignore[import-untyped]
from gevent.monkey import get_original  # type: ignore[import-untyped]
from locust import User, between, events, task
from locust.env import Environment
from locust.runners import MasterRunner
from workload import build_chat_agent, thread_config, turn_input

from tierstore import TieredSaver
from tierstore.settings import mask

T = TypeVar("T")

MESSAGE_BYTES = int(os.environ.get("LOADTEST_MESSAGE_BYTES", "500"))
CALL_TIMEOUT = float(os.environ.get("LOADTEST_CALL_TIMEOUT", "30"))
PUMP_INTERVAL = 0.001  # seconds between turns of the loop thread's gevent hub
URL_VARIABLES = ("TIERSTORE_HOT_URL", "TIERSTORE_WARM_URL", "TIERSTORE_COLD_URL")


class AsyncRuntime:
    """One asyncio loop in a real OS thread; greenlets wait on it without blocking the hub."""

    def __init__(self) -> None:
        selector = get_original("selectors", "EpollSelector")()
        self.loop = asyncio.SelectorEventLoop(selector)
        start_new_thread = get_original("_thread", "start_new_thread")
        start_new_thread(self._serve, ())

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._pump)
        self.loop.run_forever()

    def _pump(self) -> None:
        """Give this thread's gevent hub a turn.

        Under monkey-patching, a thread pool started on this loop (SQLite's worker,
        ``asyncio.to_thread``) is made of greenlets of this OS thread, and they only
        run when this thread yields to its hub, which the real epoll never does.
        """
        gevent.sleep(0)
        self.loop.call_later(PUMP_INTERVAL, self._pump)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        """Run ``coro`` on the loop, cancelled there after ``timeout``; only this greenlet waits."""
        hub = gevent.get_hub()
        watcher = hub.loop.async_()
        waiter = Waiter(hub)
        watcher.start(waiter.switch, None)
        future: Future[T] = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(coro, timeout), self.loop)
        future.add_done_callback(lambda _: watcher.send())
        try:
            waiter.get()
        finally:
            if future.done():
                watcher.close()
            else:
                # this greenlet was killed (locust stopping a user): the call goes on in
                # the loop and may still signal the watcher, so stop it but do not free it
                watcher.stop()
        return future.result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


class Stack:
    """The saver and the compiled agent shared by every user of this process."""

    def __init__(self) -> None:
        self.runtime = AsyncRuntime()
        self.tempdir: Path | None = None
        if not any(os.environ.get(name) for name in URL_VARIABLES):
            self.tempdir = Path(tempfile.mkdtemp(prefix="tierstore-locust-"))
            self.saver = TieredSaver.from_urls(
                hot="memory://",
                warm=f"sqlite:///{self.tempdir}/warm.db",
                cold=f"file://{self.tempdir}/cold",
            )
        else:
            self.saver = TieredSaver.from_env()
        self.app = build_chat_agent(MESSAGE_BYTES).compile(checkpointer=self.saver)
        self.runtime.run(self.saver.open(), timeout=300)
        self.run_token = secrets.token_hex(4)

    def describe(self) -> str:
        if self.tempdir is not None:
            return f"embedded stack under {self.tempdir}"
        return "from TIERSTORE_*_URL (" + ", ".join(
            f"{name}={mask(os.environ[name])}" for name in URL_VARIABLES
            if os.environ.get(name)) + ")"

    async def _shutdown(self) -> None:
        """Let calls of users that locust already stopped finish, then close the saver."""
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        if pending:
            await asyncio.wait(pending, timeout=CALL_TIMEOUT)
        await self.saver.aclose()
        await asyncio.get_running_loop().shutdown_default_executor()

    def close(self) -> None:
        try:
            self.runtime.run(self._shutdown(), timeout=2 * CALL_TIMEOUT)
        finally:
            self.runtime.stop()
            if self.tempdir is not None:
                shutil.rmtree(self.tempdir, ignore_errors=True)


class _Process:
    """What this locust process shares between its users."""

    stack: Stack | None = None


PROCESS = _Process()


@events.init.add_listener  # type: ignore[untyped-decorator]
def _open(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        return  # the master only aggregates; workers open their own saver
    PROCESS.stack = Stack()
    print(f"tierstore saver open: {PROCESS.stack.describe()}", flush=True)


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _close(environment: Environment, **_: Any) -> None:
    stack, PROCESS.stack = PROCESS.stack, None
    if stack is not None:
        stack.close()


_user_ids = itertools.count()


class ChatUser(User):
    """Keeps a handful of conversations and talks in them, reads and scrolls history."""

    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        if PROCESS.stack is None:
            raise RuntimeError("the saver is not open")
        self.stack = PROCESS.stack
        self.rng = random.Random()
        self.name = f"locust-{self.stack.run_token}-u{next(_user_ids)}"
        self.turns: dict[str, int] = {}

    def _call(self, name: str, coro: Coroutine[Any, Any, int]) -> None:
        started = time.perf_counter()
        exception: BaseException | None = None
        size = 0
        try:
            size = self.stack.runtime.run(coro)
        except Exception as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="saver",
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=size,
            exception=exception,
            context={},
        )

    async def _turn(self, thread_id: str, turn: int) -> int:
        state = await self.stack.app.ainvoke(turn_input(thread_id, turn, MESSAGE_BYTES),
                                             thread_config(thread_id))
        messages = state["messages"]
        if len(messages) < 2 * (turn + 1):
            raise AssertionError(f"{thread_id}: {len(messages)} messages after turn {turn}")
        return len(messages)

    async def _latest(self, thread_id: str) -> int:
        found = await self.stack.saver.aget_tuple(thread_config(thread_id))
        if found is None:
            raise AssertionError(f"{thread_id}: no latest checkpoint")
        return len(found.checkpoint["channel_values"].get("messages", []))

    async def _history(self, thread_id: str) -> int:
        items = [t async for t in self.stack.saver.alist(thread_config(thread_id), limit=10)]
        if not items:
            raise AssertionError(f"{thread_id}: empty history")
        return len(items)

    def _pick(self) -> str | None:
        return self.rng.choice(list(self.turns)) if self.turns else None

    @task(1)
    def new_conversation(self) -> None:
        thread_id = f"{self.name}-c{len(self.turns)}"
        self.turns[thread_id] = 1
        self._call("turn: new conversation", self._turn(thread_id, 0))

    @task(4)
    def resume(self) -> None:
        thread_id = self._pick()
        if thread_id is None:
            return self.new_conversation()
        turn = self.turns[thread_id]
        self.turns[thread_id] = turn + 1
        self._call("turn: resume", self._turn(thread_id, turn))
        return None

    @task(3)
    def read_latest(self) -> None:
        thread_id = self._pick()
        if thread_id is None:
            return self.new_conversation()
        self._call("aget_tuple: latest", self._latest(thread_id))
        return None

    @task(1)
    def list_history(self) -> None:
        thread_id = self._pick()
        if thread_id is None:
            return self.new_conversation()
        self._call("alist: limit=10", self._history(thread_id))
        return None
