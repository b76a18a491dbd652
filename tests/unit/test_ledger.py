"""The load-test durability ledger: each rule of ``Ledger.verify``, on fake savers and states."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, CheckpointTuple, empty_checkpoint

from loadtest.ledger import Ledger, Verdict


class FakeSaver(BaseCheckpointSaver[str]):
    """Serves ``states[thread_id]`` as the latest checkpoint's messages (absent: no checkpoint).

    ``errors[thread_id]`` reads of a thread raise before it is served; ``hang`` never answers;
    ``stubborn`` never answers and ignores the first cancellation (a driver that swallows it).
    """

    def __init__(self, states: dict[str, list[AnyMessage]], *, errors: dict[str, int] | None = None,
                 hang: bool = False, stubborn: bool = False) -> None:
        super().__init__()
        self.states = states
        self.errors = dict(errors or {})
        self.hang = hang
        self.stubborn = stubborn
        self.reads = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        thread_id = config["configurable"]["thread_id"]
        self.reads += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if self.hang:
                await asyncio.Event().wait()
            if self.stubborn:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    await asyncio.sleep(0.5)  # then gives up, so the test loop can close
            if self.errors.get(thread_id, 0) > 0:
                self.errors[thread_id] -= 1
                raise ConnectionError(f"{thread_id}: connection refused")
            if thread_id not in self.states:
                return None
            checkpoint = empty_checkpoint()
            checkpoint["channel_values"] = {"messages": list(self.states[thread_id])}
            return CheckpointTuple(config, checkpoint, {})
        finally:
            self.in_flight -= 1


def text(thread_id: str, turn: int) -> str:
    return f"{thread_id} says hello for the {turn}th time"


def record(ledger: Ledger, thread_id: str, outcomes: str) -> None:
    """One turn per letter: ``a`` acknowledged, ``f`` failed, ``s`` sent and never resolved."""
    for outcome in outcomes:
        turn = ledger.next_turn(thread_id)
        ledger.sent(thread_id, turn, text(thread_id, turn))
        if outcome == "a":
            ledger.acked(thread_id, turn)
        elif outcome == "f":
            ledger.failed(thread_id, turn, ConnectionError("refused"))


def chat(thread_id: str, turns: Sequence[int]) -> list[AnyMessage]:
    """The messages of ``turns`` answered in that order, as the chat agent stores them."""
    messages: list[AnyMessage] = []
    for turn in turns:
        messages += [HumanMessage(text(thread_id, turn)), AIMessage(f"reply {turn}")]
    return messages


async def verify(ledger: Ledger, saver: FakeSaver, **options: Any) -> Verdict:
    return await asyncio.wait_for(ledger.verify(saver, **options), 10)


async def test_every_acknowledged_turn_present_is_ok() -> None:
    ledger = Ledger()
    record(ledger, "t1", "aaa")
    record(ledger, "t2", "aa")
    tool_turn: list[AnyMessage] = [HumanMessage(text("t3", 0)),
                 AIMessage("", tool_calls=[{"name": "calc", "args": {}, "id": "c1"}]),
                 ToolMessage("42", tool_call_id="c1"), AIMessage("The answer is 42.")]
    record(ledger, "t3", "a")
    saver = FakeSaver({"t1": chat("t1", [0, 1, 2]), "t2": chat("t2", [0, 1]), "t3": tool_turn})
    verdict = await verify(ledger, saver)
    assert verdict.ok, verdict.summary()
    assert verdict.state == "OK"
    assert (verdict.threads, verdict.acked, verdict.failed, verdict.failed_landed) == (3, 6, 0, 0)
    assert verdict.summary() == ("durability: OK — 6 acknowledged turns on 3 threads all present; "
                                 "0 failed turns (0 landed anyway)")


async def test_an_acknowledged_turn_missing_is_lost() -> None:
    ledger = Ledger()
    record(ledger, "t1", "aaa")
    verdict = await verify(ledger, FakeSaver({"t1": chat("t1", [0, 1])}))
    assert not verdict.ok
    assert verdict.lost == ("t1 turn 2: acknowledged, missing",)
    assert verdict.unexpected == verdict.unreadable == ()


async def test_an_acknowledged_turn_without_its_reply_is_lost() -> None:
    ledger = Ledger()
    record(ledger, "t1", "aaa")
    # turn 0 is followed by turn 1's human message, turn 2 by nothing
    messages = [HumanMessage(text("t1", 0)), *chat("t1", [1]), HumanMessage(text("t1", 2))]
    verdict = await verify(ledger, FakeSaver({"t1": messages}))
    assert verdict.lost == ("t1 turn 0: acknowledged, stored without its reply",
                            "t1 turn 2: acknowledged, stored without its reply")


async def test_a_thread_with_acknowledged_turns_and_no_checkpoint_lost_them_all() -> None:
    ledger = Ledger()
    record(ledger, "gone", "afa")
    record(ledger, "never-acked", "ff")  # no checkpoint and nothing acknowledged: fine
    verdict = await verify(ledger, FakeSaver({}))
    assert verdict.lost == ("gone turn 0: acknowledged, but the thread has no checkpoint",
                            "gone turn 2: acknowledged, but the thread has no checkpoint")
    assert (verdict.acked, verdict.failed) == (2, 3)


async def test_a_human_message_never_sent_on_the_thread_is_unexpected() -> None:
    ledger = Ledger()
    record(ledger, "t1", "a")
    record(ledger, "t2", "a")
    # t2's text stored in t1: sent, but not on this thread
    messages = [*chat("t1", [0]), HumanMessage(text("t2", 0)), AIMessage("r")]
    verdict = await verify(ledger, FakeSaver({"t1": messages, "t2": chat("t2", [0])}))
    assert verdict.lost == ()
    assert len(verdict.unexpected) == 1
    assert verdict.unexpected[0].startswith("t1 message #2: a human message never sent")


async def test_a_turn_stored_twice_is_unexpected() -> None:
    ledger = Ledger()
    record(ledger, "t1", "aa")
    verdict = await verify(ledger, FakeSaver({"t1": chat("t1", [0, 1, 1])}))
    assert verdict.unexpected == ("t1 message #4: turn 1 stored twice",)
    assert verdict.lost == ()


async def test_turns_stored_out_of_the_order_sent_are_unexpected() -> None:
    ledger = Ledger()
    record(ledger, "t1", "aaa")
    verdict = await verify(ledger, FakeSaver({"t1": chat("t1", [0, 2, 1])}))
    assert verdict.unexpected == ("t1 message #4: turn 1 stored after turn 2, sent before it",)
    assert verdict.lost == ()


async def test_failed_turns_may_be_stored_or_not() -> None:
    ledger = Ledger()
    record(ledger, "t1", "afafa")  # turns 1 and 3 failed; 1 landed (without a reply), 3 did not
    messages = [*chat("t1", [0]), HumanMessage(text("t1", 1)), *chat("t1", [2, 4])]
    verdict = await verify(ledger, FakeSaver({"t1": messages}))
    assert verdict.ok, verdict.summary()
    assert (verdict.acked, verdict.failed, verdict.failed_landed) == (3, 2, 1)
    assert verdict.summary().endswith("2 failed turns (1 landed anyway)")


async def test_a_turn_still_in_flight_counts_as_failed() -> None:
    ledger = Ledger()
    record(ledger, "t1", "as")
    landed = await verify(ledger, FakeSaver({"t1": chat("t1", [0, 1])}))
    absent = await verify(ledger, FakeSaver({"t1": chat("t1", [0])}))
    assert landed.ok and absent.ok
    assert (landed.failed, landed.failed_landed, absent.failed_landed) == (1, 1, 0)


async def test_a_run_with_no_acknowledged_turn_is_not_shown_rather_than_ok() -> None:
    ledger = Ledger()
    record(ledger, "t1", "ff")  # every call failed: nothing was promised, nothing proved
    record(ledger, "t2", "s")
    verdict = await verify(ledger, FakeSaver({"t1": chat("t1", [1])}))
    assert not verdict.ok
    assert verdict.state == "NOT SHOWN"
    assert (verdict.acked, verdict.failed, verdict.failed_landed) == (0, 3, 1)
    assert verdict.summary() == ("durability: NOT SHOWN — no turn was acknowledged; 2 threads; "
                                 "3 failed turns (1 landed anyway)")
    assert verdict.as_dict()["state"] == "NOT SHOWN"
    empty = await verify(Ledger(), FakeSaver({}))
    assert (empty.ok, empty.state, empty.threads) == (False, "NOT SHOWN", 0)


async def test_a_failure_outranks_not_shown() -> None:
    ledger = Ledger()
    record(ledger, "t1", "f")
    verdict = await verify(ledger, FakeSaver({"t1": [HumanMessage("never sent")]}))
    assert verdict.state == "FAILED"
    assert verdict.summary().startswith("durability: FAILED — 0 lost, 1 unexpected")


async def test_a_read_is_retried_before_the_thread_is_unreadable() -> None:
    ledger = Ledger()
    record(ledger, "flaky", "a")
    record(ledger, "down", "a")
    saver = FakeSaver({"flaky": chat("flaky", [0]), "down": chat("down", [0])},
                      errors={"flaky": 2, "down": 3})
    verdict = await verify(ledger, saver, attempts=3)
    assert verdict.unreadable == (
        "down: 3 reads failed, last: ConnectionError: down: connection refused",)
    assert verdict.lost == ()
    assert saver.reads == 6


async def test_a_read_that_hangs_is_bounded_and_unreadable() -> None:
    ledger = Ledger()
    record(ledger, "t1", "a")
    verdict = await verify(ledger, FakeSaver({}, hang=True), read_timeout=0.05, attempts=2)
    assert verdict.unreadable == ("t1: 2 reads failed, last: TimeoutError: no answer within 0.05s",)
    assert not verdict.ok


async def test_a_read_that_ignores_cancellation_is_left_behind_not_waited_for() -> None:
    ledger = Ledger()
    record(ledger, "t1", "a")
    verdict = await verify(ledger, FakeSaver({}, stubborn=True), read_timeout=0.05, attempts=2)
    assert verdict.unreadable == ("t1: 2 reads failed, last: TimeoutError: no answer within 0.05s",)


async def test_the_whole_check_is_bounded_by_its_budget() -> None:
    ledger = Ledger()
    states = {}
    for n in range(6):
        record(ledger, f"t{n}", "a")
        states[f"t{n}"] = chat(f"t{n}", [0])
    saver = FakeSaver(states, stubborn=True)
    verdict = await verify(ledger, saver, concurrency=2, read_timeout=60, budget=0.2)
    assert verdict.state == "FAILED"
    assert verdict.unreadable == tuple(
        f"t{n}: not read within the check's budget of 0.2s" for n in range(6))
    assert saver.reads == 2  # the other four never got a read slot


async def test_reads_are_bounded_by_concurrency() -> None:
    ledger = Ledger()
    states = {}
    for n in range(20):
        record(ledger, f"t{n}", "a")
        states[f"t{n}"] = chat(f"t{n}", [0])
    saver = FakeSaver(states)
    verdict = await verify(ledger, saver, concurrency=3)
    assert verdict.ok
    assert saver.reads == 20
    assert 1 < saver.most_in_flight <= 3


def test_turn_numbers_are_never_reused_and_misuse_is_refused() -> None:
    ledger = Ledger()
    assert ledger.next_turn("t1") == 0
    record(ledger, "t1", "af")
    assert ledger.next_turn("t1") == 2  # the failed turn 1 keeps its number
    with pytest.raises(ValueError, match="already sent"):
        ledger.sent("t1", 1, "other text")
    with pytest.raises(ValueError, match="repeats the text"):
        ledger.sent("t1", 2, text("t1", 0))
    with pytest.raises(ValueError, match="never sent"):
        ledger.acked("t1", 7)
    with pytest.raises(ValueError, match="already acked"):
        ledger.failed("t1", 0, TimeoutError())
    ledger.sent("t1", 9, "skipped ahead")
    assert ledger.next_turn("t1") == 10
    record(ledger, "t2", "f")
    record(ledger, "t3", "s")
    assert ledger.threads() == ["t1", "t2", "t3"]
    assert ledger.acked_threads() == ["t1"]


async def test_the_summary_caps_its_listing_and_as_dict_is_json() -> None:
    ledger = Ledger()
    record(ledger, "t1", "a" * 30)
    verdict = await verify(ledger, FakeSaver({"t1": []}))
    assert len(verdict.lost) == 30
    lines = verdict.summary().splitlines()
    assert lines[0].startswith("durability: FAILED — 30 lost, 0 unexpected, 0 unreadable")
    assert lines[1] == "  lost:"
    assert len(lines) == 2 + 20 + 1
    assert lines[-1] == "    … and 10 more"
    data = json.loads(json.dumps(verdict.as_dict()))
    assert data["ok"] is False
    assert data["state"] == "FAILED"
    assert data["acked"] == 30
    assert len(data["lost"]) == 30


def test_the_ledger_imports_neither_locust_nor_gevent_nor_the_workload() -> None:
    code = ("import sys, loadtest.ledger; "
            "print(sorted(m for m in sys.modules if m == 'loadtest.workload' or "
            "m.split('.')[0] in {'locust', 'gevent', 'workload'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]"
