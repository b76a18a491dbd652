"""The one sync bridge, and the saver's lifecycle state.

The core is async. Sync callers (``graph.invoke``, ``saver.get_tuple``) reach it
through ``LoopBridge.run``, which hands the coroutine to the loop the saver was
opened on and blocks for the answer::

    caller thread ──run_coroutine_threadsafe──► saver loop ──► result / exception

Called *on* that loop it would wait for itself forever, so it refuses with
``LifecycleError`` instead. A saver opened with ``with`` (no loop of its own)
starts a private loop in a daemon thread and stops it on exit.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from tierstore.errors import LifecycleError
from tierstore.lifecycle import Lifecycle, State

__all__ = ["LoopBridge"]

T = TypeVar("T")


class LoopBridge:
    """Runs coroutines on the saver's loop for sync callers; holds the saver's ``Lifecycle``."""

    def __init__(self) -> None:
        self.lifecycle = Lifecycle(
            "the saver",
            open_hint="use `async with TieredSaver.from_urls(...) as saver` "
                      "(or `with` in sync code)",
            closed_hint="open a new one",
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @state.setter
    def state(self, value: State) -> None:
        """The saver moves its own state: a failed open closes a saver for good (its
        stores were closed with it), which ``Lifecycle.failed`` would not do."""
        self.lifecycle.state = value

    def require_open(self) -> None:
        self.lifecycle.require()

    def bind_running_loop(self) -> None:
        if self.state == "closed":
            raise LifecycleError("a closed saver cannot be reopened; create a new one")
        if self.state in ("opening", "opened") and self._thread is None:
            raise LifecycleError("the saver is already open")
        if self._thread is None:
            self.loop = asyncio.get_running_loop()

    def start_private_loop(self) -> None:
        if self.state != "unopened":
            raise LifecycleError(f"cannot open a saver that is {self.state}")
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def _serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=_serve, name="tierstore-loop", daemon=True)
        thread.start()
        ready.wait()
        self.loop, self._thread = loop, thread

    def stop_private_loop(self) -> None:
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._thread = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the saver's loop from any other thread and wait for it."""
        loop = self.loop
        if loop is None or loop.is_closed():
            coro.close()
            self.require_open()
            raise LifecycleError("the saver has no event loop")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise LifecycleError(
                "a sync tierstore method was called on the event loop the saver runs on; "
                "this would deadlock. Use the async method (aget_tuple, aput, ainvoke, …) "
                "or call the sync one from another thread."
            )
        # The task starts in a copy of this thread's context (call_soon_threadsafe copies
        # it): a lease's fencing token and the caller's current span reach the call.
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result()
