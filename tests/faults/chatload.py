"""Users chatting over one saver while a server misbehaves; every call's outcome kept.

``ChatLoad`` runs ``users`` conversations of the load test's chat agent, each turn
after the last, until told to stop. Each turn is written down in a durability
ledger before it is sent and marked acknowledged only when ``ainvoke`` returned,
so that, once the fault is over, ``ledger.verify`` can say whether any
acknowledged turn was lost (or anything never sent appeared). Every exception a
call raised is kept, so a test can require that all of them are ``TierUnavailable``.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver

from loadtest.ledger import Ledger
from loadtest.workload import build_chat_agent, thread_config, turn_input

MESSAGE_BYTES = 200
PAUSE = 0.005  # between two calls of one user, so a dead server is not spun on


class ChatLoad:
    """``users`` conversations over ``saver``; ``run()`` until ``stop()``."""

    def __init__(self, saver: BaseCheckpointSaver[Any], *, users: int, tag: str,
                 pause: float = PAUSE) -> None:
        self.saver = saver
        self.app = build_chat_agent(MESSAGE_BYTES).compile(checkpointer=saver)
        self.ledger = Ledger()
        self.threads = [f"{tag}-u{n}" for n in range(users)]
        self.pause = pause
        self.failures: list[BaseException] = []
        self.acked = 0
        self._stopping = asyncio.Event()

    async def turn(self, thread_id: str) -> bool:
        """One turn of ``thread_id``; True when it was acknowledged."""
        turn = self.ledger.next_turn(thread_id)
        message = turn_input(thread_id, turn, MESSAGE_BYTES)
        self.ledger.sent(thread_id, turn, str(message["messages"][0].content))
        try:
            await self.app.ainvoke(message, thread_config(thread_id))
        except Exception as exc:
            self.ledger.failed(thread_id, turn, exc)
            self.failures.append(exc)
            return False
        self.ledger.acked(thread_id, turn)
        self.acked += 1
        return True

    async def _user(self, thread_id: str) -> None:
        while not self._stopping.is_set():
            await self.turn(thread_id)
            try:
                await self.saver.aget_tuple(thread_config(thread_id))
            except Exception as exc:
                self.failures.append(exc)
            await asyncio.sleep(self.pause)

    async def run(self) -> None:
        await asyncio.gather(*(self._user(t) for t in self.threads))

    def stop(self) -> None:
        self._stopping.set()

    async def until_acked(self, more: int, deadline: float) -> None:
        """Wait until ``more`` further turns were acknowledged (bounded by ``deadline``)."""
        target = self.acked + more
        async with asyncio.timeout(deadline):
            for _ in itertools.count():
                if self.acked >= target:
                    return
                await asyncio.sleep(0.05)

    def unexpected(self, allowed: type[BaseException]) -> list[BaseException]:
        """The failures that are not ``allowed``."""
        return [exc for exc in self.failures if not isinstance(exc, allowed)]
