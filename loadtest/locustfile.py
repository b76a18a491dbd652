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
conversations (4), read the latest state of one with an acknowledged turn (3), list
its last 10 checkpoints (1).

Durability: every turn goes through a ``Ledger`` (``loadtest/ledger.py``): recorded as
sent before the call, acknowledged when it returned, failed when it raised. A failed
call is only a failed call (it may have landed); a read that finds fewer messages than
the acknowledged turns imply is a loss and fails that read. When the test stops, every
thread of this process is read back and checked (``Ledger.verify``); the verdict is
printed, reported as the request ``verify: durability``, written as JSON when
``LOADTEST_VERDICT_JSON`` names a file, and a verdict other than OK makes locust exit 2:
FAILED (something lost, unexpected or unreadable) or NOT SHOWN (no turn was acknowledged,
so the run proved nothing). In distributed mode each worker verifies the threads it wrote.

The end of the run is bounded whatever the stores do: the calls cut by the stop get
``STOP_GRACE`` seconds, the read-back gets the rest of ``VERIFY_TIMEOUT`` (default
``CALL_TIMEOUT``; threads not read by then are reported unreadable, so the verdict is
FAILED), and closing the saver gets ``CLOSE_TIMEOUT`` (then the loop's thread pool as
much again). Locust exits at most about ``VERIFY_TIMEOUT + 2 * CLOSE_TIMEOUT`` seconds
after ``-t`` (40 s with the defaults); a call that does not answer its cancellation is
left behind, not waited for.

    locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 30s --exit-code-on-error 1
"""

from __future__ import annotations

import asyncio
import itertools
import json
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
from ledger import Ledger, Verdict, within
from locust import User, between, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from workload import build_chat_agent, thread_config, turn_input

from tierstore import TieredSaver
from tierstore.settings import mask

T = TypeVar("T")

MESSAGE_BYTES = int(os.environ.get("LOADTEST_MESSAGE_BYTES", "500"))
CALL_TIMEOUT = float(os.environ.get("LOADTEST_CALL_TIMEOUT", "30"))
STOP_GRACE = float(os.environ.get("LOADTEST_STOP_GRACE", "2"))  # s for calls cut by the stop
# the end of the run: settle + read-back, then closing the saver (see the module docstring)
VERIFY_TIMEOUT = float(os.environ.get("LOADTEST_VERIFY_TIMEOUT", str(CALL_TIMEOUT)))
CLOSE_TIMEOUT = float(os.environ.get("LOADTEST_CLOSE_TIMEOUT", "5"))
VERDICT_JSON = os.environ.get("LOADTEST_VERDICT_JSON")
VERIFY_TYPE, VERIFY_NAME = "ledger", "verify: durability"  # the verdict's row in locust's stats
PUMP_INTERVAL = 0.001  # seconds between turns of the loop thread's gevent hub
URL_VARIABLES = ("TIERSTORE_HOT_URL", "TIERSTORE_WARM_URL", "TIERSTORE_COLD_URL")


class AsyncRuntime:
    """One asyncio loop in a real OS thread; greenlets wait on it without blocking the hub."""

    def __init__(self) -> None:
        selector = get_original("selectors", "EpollSelector")()
        self.loop = asyncio.SelectorEventLoop(selector)
        self.calls: set[asyncio.Task[Any]] = set()  # users' calls in flight; loop thread only
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

    async def _tracked(self, coro: Coroutine[Any, Any, T], seconds: float) -> T:
        task = asyncio.current_task()
        assert task is not None
        self.calls.add(task)
        try:
            return await asyncio.wait_for(coro, seconds)
        finally:
            self.calls.discard(task)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT, *,
            track: bool = True) -> T:
        """Run ``coro`` on the loop, cancelled there after ``timeout``; only this greenlet waits.

        A call is listed in ``calls`` while it runs (``track``); if the waiting greenlet is
        killed (locust stopping a user), the call is cancelled on the loop.
        """
        hub = gevent.get_hub()
        watcher = hub.loop.async_()
        waiter = Waiter(hub)
        watcher.start(waiter.switch, None)
        wrapped = self._tracked(coro, timeout) if track else within(coro, timeout)
        future: Future[T] = asyncio.run_coroutine_threadsafe(wrapped, self.loop)
        future.add_done_callback(lambda _: watcher.send())
        try:
            waiter.get()
        finally:
            if future.done() or future.cancel():
                watcher.close()  # no callback can signal it any more
            else:
                # finishing on the loop right now: its callback may still signal the
                # watcher, so stop it but do not free it
                watcher.stop()
        return future.result()

    async def settle(self, grace: float) -> None:
        """Give the calls in flight ``grace`` seconds, then cancel the rest and wait for them
        up to ``grace`` more seconds (a call that ignores its cancellation is left behind)."""
        if not self.calls:
            return
        _, pending = await asyncio.wait(list(self.calls), timeout=grace)
        for call in pending:
            call.cancel()
        if pending:
            await asyncio.wait(pending, timeout=grace)

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
        self.runtime.run(self.saver.open(), timeout=300, track=False)
        self.run_token = secrets.token_hex(4)
        self.ledger = Ledger()
        self.verdict: Verdict | None = None
        self.verify_error: BaseException | None = None

    def describe(self) -> str:
        if self.tempdir is not None:
            return f"embedded stack under {self.tempdir}"
        return "from TIERSTORE_*_URL (" + ", ".join(
            f"{name}={mask(os.environ[name])}" for name in URL_VARIABLES
            if os.environ.get(name)) + ")"

    async def _verify(self) -> Verdict:
        deadline = time.monotonic() + VERIFY_TIMEOUT
        await self.runtime.settle(STOP_GRACE)  # the ledger is final once no call is in flight
        budget = max(1.0, deadline - time.monotonic())
        return await self.ledger.verify(self.saver, read_timeout=min(CALL_TIMEOUT, budget),
                                        budget=budget)

    def verify(self) -> Verdict:
        """Read every thread of this process back and check it against the ledger.

        Calls cut by the stop get ``STOP_GRACE`` seconds, then are cancelled: their
        turns count as failed (may or may not be stored), never as lost. Returns within
        about ``VERIFY_TIMEOUT`` seconds: threads not read by then are unreadable.
        """
        try:
            self.verdict = self.runtime.run(self._verify(), timeout=VERIFY_TIMEOUT + 5,
                                            track=False)
        except Exception as exc:
            self.verify_error = exc
            raise
        self.verify_error = None
        return self.verdict

    async def _shutdown(self) -> None:
        """Cancel the calls of stopped users still running after ``STOP_GRACE``, close the saver.

        Only the users' calls are waited for: waiting for every task of the loop would
        include the task running this very coroutine, and so always last the full timeout.
        """
        await self.runtime.settle(STOP_GRACE)
        try:
            await within(self.saver.aclose(), CLOSE_TIMEOUT)
        finally:
            # the interpreter's exit joins the executor's threads, and under gevent they
            # only run on this loop's thread: they must end before the loop stops
            await within(asyncio.get_running_loop().shutdown_default_executor(),
                          CLOSE_TIMEOUT)

    def close(self) -> None:
        """Close the saver within about ``CLOSE_TIMEOUT`` seconds (given up after that: the
        process is exiting) and the loop's thread pool within as much again, stop the
        loop, remove the embedded stack's directory."""
        try:
            self.runtime.run(self._shutdown(), timeout=2 * (STOP_GRACE + CLOSE_TIMEOUT) + 1,
                             track=False)
        except TimeoutError:
            print(f"tierstore saver not closed within {CLOSE_TIMEOUT:g}s; left to the exit",
                  flush=True)
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


class DurabilityError(AssertionError):
    """Acknowledged turns are missing from what the saver returns: a real loss."""


@events.test_stop.add_listener  # type: ignore[untyped-decorator]
def _verify(environment: Environment, **_: Any) -> None:
    """Check this process's threads once its users are stopped, before the saver closes.

    Runs at ``test_stop`` so that the verdict, reported as a request, is in the final
    statistics (and, on a worker, in the last report sent to the master).
    """
    stack = PROCESS.stack
    if stack is None:
        return
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        verdict = stack.verify()
        print(verdict.summary(), flush=True)
        if not verdict.ok:
            error = DurabilityError(verdict.summary(cap=0).splitlines()[0])
        _write_verdict(environment, verdict.as_dict())
    except Exception as exc:
        error = exc
        print(f"durability: NOT VERIFIED — {type(exc).__name__}: {exc}", flush=True)
        _write_verdict(environment, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    request: Any = environment.events.request  # locust's EventHook.fire is untyped
    request.fire(
        request_type=VERIFY_TYPE,
        name=VERIFY_NAME,
        response_time=(time.perf_counter() - started) * 1000.0,
        response_length=len(stack.ledger.threads()),
        exception=error,
        context={},
    )


def _write_verdict(environment: Environment, data: dict[str, Any]) -> None:
    """To ``LOADTEST_VERDICT_JSON``; a worker appends its pid so that workers do not clash."""
    if not VERDICT_JSON:
        return
    path = Path(VERDICT_JSON)
    if isinstance(environment.runner, WorkerRunner):
        path = path.with_name(f"{path.name}.{os.getpid()}")
    path.write_text(json.dumps(data, indent=2) + "\n")


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _close(environment: Environment, **_: Any) -> None:
    """Exit 2 on a failed verdict (a worker's, on the master, from its report), close the saver."""
    verdicts = environment.stats.entries.get((VERIFY_NAME, VERIFY_TYPE))
    if verdicts is not None and verdicts.num_failures:
        environment.process_exit_code = 2
    stack, PROCESS.stack = PROCESS.stack, None
    if stack is None:
        return
    try:
        if stack.verdict is None and stack.verify_error is None:
            _verify(environment)  # quitting without a test_stop (e.g. never started)
        if stack.verify_error is not None or (stack.verdict is not None and not stack.verdict.ok):
            environment.process_exit_code = 2
    finally:
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
        self.ledger = self.stack.ledger
        self.conversations: list[str] = []
        self.acked: dict[str, int] = {}  # thread -> acknowledged turns

    def _call(self, name: str, coro: Coroutine[Any, Any, int],
              turn: tuple[str, int] | None = None) -> None:
        """Run one call, report it to locust, and (for a turn) record its outcome in the ledger.

        A call cut by locust stopping this user (the greenlet killed) is recorded as a
        failed turn and not reported: it neither succeeded nor failed on its own.
        """
        started = time.perf_counter()
        exception: BaseException | None = None
        size = 0
        try:
            size = self.stack.runtime.run(coro)
        except Exception as exc:
            exception = exc
        except BaseException as exc:
            if turn is not None:
                self.ledger.failed(*turn, exc)
            raise
        if turn is not None:
            if exception is None:
                self.ledger.acked(*turn)
                self.acked[turn[0]] = self.acked.get(turn[0], 0) + 1
            else:
                self.ledger.failed(*turn, exception)
        self.environment.events.request.fire(
            request_type="saver",
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=size,
            exception=exception,
            context={},
        )

    def _send(self, name: str, thread_id: str) -> None:
        """Send the thread's next turn; its number is never reused, even after a failure."""
        turn = self.ledger.next_turn(thread_id)
        state = turn_input(thread_id, turn, MESSAGE_BYTES)
        self.ledger.sent(thread_id, turn, str(state["messages"][0].content))
        self._call(name, self._turn(thread_id, state), turn=(thread_id, turn))

    async def _turn(self, thread_id: str, state: Any) -> int:
        result = await self.stack.app.ainvoke(state, thread_config(thread_id))
        return len(result["messages"])

    def _check(self, thread_id: str, acked: int, messages: int, what: str) -> None:
        """Each acknowledged turn stored at least its human message and its reply."""
        if messages < 2 * acked:
            raise DurabilityError(f"{thread_id}: {what} holds {messages} messages, but "
                                  f"{acked} acknowledged turns imply at least {2 * acked}")

    async def _latest(self, thread_id: str, acked: int) -> int:
        found = await self.stack.saver.aget_tuple(thread_config(thread_id))
        if found is None:
            raise DurabilityError(f"{thread_id}: no checkpoint, after {acked} acknowledged turns")
        messages = len(found.checkpoint["channel_values"].get("messages", []))
        self._check(thread_id, acked, messages, "the latest checkpoint")
        return messages

    async def _history(self, thread_id: str, acked: int) -> int:
        items = [t async for t in self.stack.saver.alist(thread_config(thread_id), limit=10)]
        if not items:
            raise DurabilityError(f"{thread_id}: empty history, after {acked} acknowledged turns")
        messages = len(items[0].checkpoint["channel_values"].get("messages", []))
        self._check(thread_id, acked, messages, "the newest listed checkpoint")
        return len(items)

    def _pick_acked(self) -> tuple[str, int] | None:
        """A conversation with an acknowledged turn, and how many it has (as of now)."""
        if not self.acked:
            return None
        thread_id = self.rng.choice(list(self.acked))
        return thread_id, self.acked[thread_id]

    @task(1)
    def new_conversation(self) -> None:
        thread_id = f"{self.name}-c{len(self.conversations)}"
        self.conversations.append(thread_id)
        self._send("turn: new conversation", thread_id)

    @task(4)
    def resume(self) -> None:
        if not self.conversations:
            return self.new_conversation()
        self._send("turn: resume", self.rng.choice(self.conversations))
        return None

    @task(3)
    def read_latest(self) -> None:
        picked = self._pick_acked()
        if picked is None:
            return self.new_conversation()
        self._call("aget_tuple: latest", self._latest(*picked))
        return None

    @task(1)
    def list_history(self) -> None:
        picked = self._pick_acked()
        if picked is None:
            return self.new_conversation()
        self._call("alist: limit=10", self._history(*picked))
        return None
