"""Chat conversations under load for the fault tests, every turn recorded in a ledger.

Each conversation sends its turns one after another (as a chat user does) through a
real LangGraph graph (``loadtest.workload``'s chat agent) until stopped; each turn is
recorded in a ``loadtest.ledger.Ledger`` as sent, then acknowledged or failed, so
``ledger.verify(saver)`` can check afterwards that no acknowledged turn was lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from loadtest.ledger import Ledger
from loadtest.workload import thread_config, turn_input
from tierstore.errors import TierUnavailable

DEADLINE = 90.0  # a bound against hanging, not a speed claim


@dataclass
class Conversations:
    """``threads`` conversing through ``app`` until ``finish()``."""

    app: Any
    threads: list[str]
    message_bytes: int = 300
    pause: float = 0.0  # between a thread's turns
    lease: Callable[[str], Any] | None = None  # e.g. ``saver.lease``: each turn inside one
    reader: Any = None  # a saver: read the thread's latest state after each acknowledged turn
    ledger: Ledger = field(default_factory=Ledger)
    errors: list[BaseException] = field(default_factory=list)
    acked: dict[str, int] = field(default_factory=dict)  # thread -> turns acknowledged
    ended: dict[str, int] = field(default_factory=dict)  # thread -> turns returned or raised
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._converse(t)) for t in self.threads]

    async def _converse(self, thread: str) -> None:
        while not self.stop.is_set():
            if not await self.turn(thread):
                await asyncio.sleep(0.05)
            elif self.reader is not None:
                try:
                    await self.reader.aget_tuple(thread_config(thread))
                except Exception as exc:
                    self.errors.append(exc)
            if self.pause:
                await asyncio.sleep(self.pause)

    async def turn(self, thread: str) -> bool:
        """One turn of ``thread``, recorded; True when it was acknowledged."""
        turn = self.ledger.next_turn(thread)
        message = turn_input(thread, turn, self.message_bytes)
        self.ledger.sent(thread, turn, str(message["messages"][0].content))
        try:
            if self.lease is None:
                await self.app.ainvoke(message, thread_config(thread))
            else:
                async with self.lease(thread):
                    await self.app.ainvoke(message, thread_config(thread))
        except Exception as exc:
            self.ledger.failed(thread, turn, exc)
            self.errors.append(exc)
            return False
        finally:
            self.ended[thread] = self.ended.get(thread, 0) + 1
        self.ledger.acked(thread, turn)
        self.acked[thread] = self.acked.get(thread, 0) + 1
        return True

    def snapshot(self) -> dict[str, int]:
        return dict(self.acked)

    def total(self) -> int:
        return sum(self.acked.values())

    def all_turned_since(self, before: dict[str, int], turns: int = 1) -> bool:
        """Every thread had ``turns`` more turns acknowledged than in ``before``."""
        return all(self.acked.get(t, 0) >= before.get(t, 0) + turns for t in self.threads)

    def all_ended_since(self, before: dict[str, int]) -> bool:
        """Every thread ended (acknowledged or failed) a turn since ``before = dict(ended)``."""
        return all(self.ended.get(t, 0) > before.get(t, 0) for t in self.threads)

    async def finish(self) -> None:
        self.stop.set()
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*self.tasks)


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` until true; fail the test after ``DEADLINE`` seconds."""
    deadline = time.monotonic() + DEADLINE
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting: {what}")
        await asyncio.sleep(0.05)


def untranslated(errors: list[BaseException]) -> list[str]:
    """The errors that are not ``TierUnavailable``, as ``module.Class: message``."""
    return [f"{type(e).__module__}.{type(e).__name__}: {e}" for e in errors
            if not isinstance(e, TierUnavailable)]
