"""A durability ledger for load tests: what was sent, what was acknowledged, and is it all stored.

A load test records every chat turn it sends (``sent`` before the call, then ``acked``
when the call returned or ``failed`` when it raised) and, at the end, ``verify`` reads
each thread's latest checkpoint back and checks it against the record::

    sent(t, k, text) ──► call ──► returned ──► acked(t, k)   must be stored, with its reply
                              └─► raised ───► failed(t, k)  may be stored or not (ambiguous)

A failed call is only a failed call: the request may or may not have landed, so it is
never counted as lost. Loss is an acknowledged turn missing from the latest state.

Rules checked per thread, on ``checkpoint["channel_values"]["messages"]`` of the latest
checkpoint (``aget_tuple({"configurable": {"thread_id": t}})``):

* every acknowledged turn's human text appears exactly once and is followed by at least
  one ``AIMessage`` before the next ``HumanMessage`` (its reply), else the turn is *lost*;
* every ``HumanMessage`` is one that was sent on that thread (matched by text), none
  twice, in the order sent, else it is *unexpected*;
* failed turns (and turns still in flight when the ledger is verified) may be present
  (counted as ``failed_landed``) or absent;
* a thread with acknowledged turns but no checkpoint has lost all of them;
* a thread whose read keeps raising (``attempts`` tries), or is not read within the
  whole check's ``budget``, is *unreadable*.

The verdict is one of three states: ``OK`` (no lost, unexpected or unreadable, and at
least one turn acknowledged), ``FAILED`` (something lost, unexpected or unreadable), or
``NOT SHOWN`` (nothing wrong found, but no turn was acknowledged: a run that stored
nothing proves nothing, so it is not OK either). ``ok`` is true only for ``OK``.

Turns of one thread are expected to be sent one at a time (the next after the previous
call returned or raised), as a chat user does; "in the order sent" relies on it.

The ledger is plain bookkeeping: not thread-safe (record from one thread), no I/O except
in ``verify``. It imports neither locust nor gevent (tests import it as ``loadtest.ledger``).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from langchain_core.messages import AIMessage, HumanMessage
from langgraph.checkpoint.base import BaseCheckpointSaver

__all__ = ["Ledger", "Verdict", "within"]

T = TypeVar("T")

LISTING_CAP = 20  # lines of each kind shown by Verdict.summary
_EXCERPT = 40  # characters of a message quoted in a report line
_RETRY_PAUSE = 0.2  # seconds before the second read of a thread; grows linearly


class _Status(enum.Enum):
    SENT = "sent"  # in flight: neither returned nor raised yet
    ACKED = "acked"
    FAILED = "failed"


@dataclass
class _Turn:
    turn: int
    text: str
    status: _Status = _Status.SENT


@dataclass
class _Thread:
    turns: list[_Turn] = field(default_factory=list)  # in the order sent
    by_text: dict[str, int] = field(default_factory=dict)  # text -> position in turns
    by_turn: dict[int, int] = field(default_factory=dict)  # turn index -> position in turns


@dataclass(frozen=True)
class Verdict:
    """What ``Ledger.verify`` found; ``state`` is ``OK``, ``FAILED`` or ``NOT SHOWN``.

    ``ok`` means no lost, no unexpected, no unreadable *and* at least one acknowledged
    turn: with none acknowledged, durability was not shown (``NOT SHOWN``), whatever
    the reads found.
    """

    threads: int
    acked: int
    failed: int  # turns whose call raised (or never returned)
    failed_landed: int  # failed turns found stored anyway (allowed)
    lost: tuple[str, ...]  # one line per acknowledged turn missing / without its reply
    unexpected: tuple[str, ...]  # human messages never sent, duplicates, wrong order
    unreadable: tuple[str, ...]  # threads whose read-back kept failing

    @property
    def state(self) -> str:
        """``FAILED`` if anything is lost, unexpected or unreadable; else ``NOT SHOWN`` if no
        turn was acknowledged; else ``OK``."""
        if self.lost or self.unexpected or self.unreadable:
            return "FAILED"
        return "OK" if self.acked else "NOT SHOWN"

    @property
    def ok(self) -> bool:
        return self.state == "OK"

    def summary(self, cap: int = LISTING_CAP) -> str:
        """Printable, multi-line; at most ``cap`` lines of each kind of failure are listed."""
        failed = f"{self.failed} failed turns ({self.failed_landed} landed anyway)"
        if self.state == "OK":
            return (f"durability: OK — {self.acked} acknowledged turns on {self.threads} "
                    f"threads all present; {failed}")
        if self.state == "NOT SHOWN":
            return (f"durability: NOT SHOWN — no turn was acknowledged; {self.threads} "
                    f"threads; {failed}")
        lines = [
            f"durability: FAILED — {len(self.lost)} lost, {len(self.unexpected)} unexpected, "
            f"{len(self.unreadable)} unreadable; {self.acked} acknowledged turns on "
            f"{self.threads} threads; {failed}"
        ]
        for title, items in (("lost", self.lost), ("unexpected", self.unexpected),
                             ("unreadable", self.unreadable)):
            if items:
                lines.append(f"  {title}:")
                lines.extend(f"    {item}" for item in items[:cap])
                if len(items) > cap:
                    lines.append(f"    … and {len(items) - cap} more")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every field (tuples as lists) plus ``ok`` and ``state``."""
        data = asdict(self)
        for key in ("lost", "unexpected", "unreadable"):
            data[key] = list(data[key])
        data["ok"] = self.ok
        data["state"] = self.state
        return data


@dataclass
class _Findings:
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    failed_landed: int = 0


class Ledger:
    """Records the turns a load test sends; ``verify`` checks the acknowledged ones are stored."""

    def __init__(self) -> None:
        self._threads: dict[str, _Thread] = {}

    def sent(self, thread_id: str, turn: int, text: str) -> None:
        """Record a turn before its call. ``text`` is the HumanMessage content.

        Raises ``ValueError`` when ``turn`` or ``text`` was already sent on this thread:
        the check matches stored messages to turns by text, so both must be unique.
        """
        thread = self._threads.setdefault(thread_id, _Thread())
        if turn in thread.by_turn:
            raise ValueError(f"{thread_id}: turn {turn} was already sent")
        if text in thread.by_text:
            raise ValueError(f"{thread_id}: turn {turn} repeats the text of an earlier turn")
        thread.by_turn[turn] = thread.by_text[text] = len(thread.turns)
        thread.turns.append(_Turn(turn, text))

    def acked(self, thread_id: str, turn: int) -> None:
        """The call of ``turn`` returned: from now on it must be stored."""
        self._resolve(thread_id, turn, _Status.ACKED)

    def failed(self, thread_id: str, turn: int, error: BaseException) -> None:
        """The call of ``turn`` raised ``error``: it may or may not have been stored."""
        del error  # ambiguous whatever the error; kept in the signature for callers' clarity
        self._resolve(thread_id, turn, _Status.FAILED)

    def _resolve(self, thread_id: str, turn: int, status: _Status) -> None:
        thread = self._threads.get(thread_id)
        if thread is None or turn not in thread.by_turn:
            raise ValueError(f"{thread_id}: turn {turn} was never sent")
        record = thread.turns[thread.by_turn[turn]]
        if record.status is not _Status.SENT:
            raise ValueError(f"{thread_id}: turn {turn} is already {record.status.value}")
        record.status = status

    def next_turn(self, thread_id: str) -> int:
        """The next turn index for ``thread_id``: one past the highest sent, so never reused."""
        thread = self._threads.get(thread_id)
        if thread is None or not thread.by_turn:
            return 0
        return max(thread.by_turn) + 1

    def threads(self) -> list[str]:
        """Every thread with a turn sent, in the order first sent."""
        return list(self._threads)

    def acked_threads(self) -> list[str]:
        """Threads with at least one acknowledged turn, in the order first sent."""
        return [tid for tid, thread in self._threads.items()
                if any(t.status is _Status.ACKED for t in thread.turns)]

    async def verify(self, saver: BaseCheckpointSaver[Any], *, concurrency: int = 8,
                     read_timeout: float = 30.0, attempts: int = 3,
                     budget: float | None = None) -> Verdict:
        """Read every thread's latest checkpoint back through ``saver`` and check the rules.

        At most ``concurrency`` reads run at once; each read is bounded by ``read_timeout``
        seconds and tried up to ``attempts`` times before the thread is reported unreadable.
        With ``budget``, the whole check returns within about ``budget`` seconds whatever
        the saver does: the threads not read by then are reported unreadable. A read that
        outlives its timeout is cancelled and left behind, never waited for, so even a
        read that ignores cancellation cannot stretch these bounds.
        The record is snapshotted first, so turns recorded during the check are not seen.
        """
        if attempts < 1 or concurrency < 1:
            raise ValueError("attempts and concurrency must be at least 1")
        snapshot = {tid: [_Turn(t.turn, t.text, t.status) for t in thread.turns]
                    for tid, thread in self._threads.items()}
        gate = asyncio.Semaphore(concurrency)

        async def one(thread_id: str, turns: list[_Turn]) -> _Findings:
            async with gate:
                return await _verify_thread(saver, thread_id, turns, read_timeout, attempts)

        tasks = {tid: asyncio.ensure_future(one(tid, turns)) for tid, turns in snapshot.items()}
        try:
            if tasks:
                await asyncio.wait(tasks.values(), timeout=budget)
        finally:  # cancelled from outside: the reads go too
            for task in tasks.values():
                task.cancel()
        results = [_collect(tid, task, budget) for tid, task in tasks.items()]
        all_turns = [t for turns in snapshot.values() for t in turns]
        return Verdict(
            threads=len(snapshot),
            acked=sum(t.status is _Status.ACKED for t in all_turns),
            failed=sum(t.status is not _Status.ACKED for t in all_turns),
            failed_landed=sum(r.failed_landed for r in results),
            lost=tuple(line for r in results for line in r.lost),
            unexpected=tuple(line for r in results for line in r.unexpected),
            unreadable=tuple(line for r in results for line in r.unreadable),
        )


def _collect(thread_id: str, task: asyncio.Future[_Findings], budget: float | None) -> _Findings:
    """The findings of a finished check; a check still running is cancelled (not awaited)
    and its thread reported unreadable."""
    if task.done():
        return task.result()
    task.cancel()
    return _Findings(unreadable=[f"{thread_id}: not read within the check's budget of "
                                 f"{budget:g}s"])


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned task's outcome as seen (asyncio would log it as never retrieved)."""
    if not task.cancelled():
        task.exception()


async def within(call: Awaitable[T], seconds: float) -> T:
    """``call``'s result, or ``TimeoutError`` after ``seconds``; the call is then cancelled
    but not waited for (unlike ``asyncio.wait_for``, which waits for a call that ignores
    its cancellation)."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    finally:  # timed out, or this wait cancelled: the call is cancelled and left behind
        if not task.done():
            task.cancel()
            task.add_done_callback(_retrieve)  # its late outcome is not an unretrieved error
    if not done:
        raise TimeoutError(f"no answer within {seconds:g}s")
    return task.result()


async def _read_messages(saver: BaseCheckpointSaver[Any], thread_id: str, read_timeout: float,
                         attempts: int) -> tuple[Sequence[Any] | None, BaseException | None]:
    """The latest checkpoint's messages (``None``: no checkpoint), or the last read error."""
    error: BaseException | None = None
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(_RETRY_PAUSE * attempt)
        try:
            found = await within(
                saver.aget_tuple({"configurable": {"thread_id": thread_id}}), read_timeout)
        except Exception as exc:
            error = exc
            continue
        if found is None:
            return None, None
        messages = found.checkpoint.get("channel_values", {}).get("messages", [])
        return list(messages), None
    return None, error


async def _verify_thread(saver: BaseCheckpointSaver[Any], thread_id: str, turns: list[_Turn],
                         read_timeout: float, attempts: int) -> _Findings:
    findings = _Findings()
    messages, error = await _read_messages(saver, thread_id, read_timeout, attempts)
    if error is not None:
        findings.unreadable.append(
            f"{thread_id}: {attempts} reads failed, last: {type(error).__name__}: {error}")
        return findings
    if messages is None:
        findings.lost.extend(f"{thread_id} turn {t.turn}: acknowledged, but the thread has "
                             f"no checkpoint" for t in turns if t.status is _Status.ACKED)
        return findings
    _check_messages(thread_id, turns, messages, findings)
    return findings


def _check_messages(thread_id: str, turns: list[_Turn], messages: Sequence[Any],
                   findings: _Findings) -> None:
    """Apply the rules to one thread's stored ``messages``; pure, appends to ``findings``."""
    position = {t.text: i for i, t in enumerate(turns)}
    seen: set[int] = set()
    replied: set[int] = set()
    last_position = -1
    current: int | None = None  # position (in turns) of the human message being answered
    for index, message in enumerate(messages):
        if isinstance(message, AIMessage):
            if current is not None:
                replied.add(current)
            continue
        if not isinstance(message, HumanMessage):
            continue
        current = None
        text = message.content if isinstance(message.content, str) else str(message.content)
        where = position.get(text)
        if where is None:
            findings.unexpected.append(
                f"{thread_id} message #{index}: a human message never sent on this thread: "
                f"{_excerpt(text)!r}")
            continue
        turn = turns[where].turn
        if where in seen:
            findings.unexpected.append(
                f"{thread_id} message #{index}: turn {turn} stored twice")
            continue
        seen.add(where)
        if where < last_position:
            findings.unexpected.append(
                f"{thread_id} message #{index}: turn {turn} stored after turn "
                f"{turns[last_position].turn}, sent before it")
        last_position = max(last_position, where)
        current = where
    for where, record in enumerate(turns):
        if record.status is _Status.ACKED:
            if where not in seen:
                findings.lost.append(f"{thread_id} turn {record.turn}: acknowledged, missing")
            elif where not in replied:
                findings.lost.append(
                    f"{thread_id} turn {record.turn}: acknowledged, stored without its reply")
        elif where in seen:
            findings.failed_landed += 1


def _excerpt(text: str) -> str:
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "…"
