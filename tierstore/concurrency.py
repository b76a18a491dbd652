"""Living with optimistic locking: finish a turn that lost a version race, exactly once.

A *turn* is one ``app.ainvoke(input, config)``. In ``concurrency="strict"`` its input
lands at most once and the thread's history stays one chain:

- the saver refuses a write whose parent is not the head (``VersionConflict``), and a
  turn's input that would discard another turn's pending steps (``TurnInProgress``),
  before anything of it is stored;
- the helper here stamps every checkpoint of a turn with a turn id (config metadata,
  which LangGraph copies into each checkpoint's metadata) and, after a conflict, asks
  the checkpointer whether any checkpoint of the turn was stored::

      attempt ── fn(input, config + turn id) ──► done
         │ VersionConflict
         ▼
      a checkpoint with this turn id in the thread?   (alist(filter=…, limit=1), warm)
         ├─ no  ─► back off, send the input again (a fresh deep copy: new message ids)
         └─ yes ─► back off, fn(None, config): continue the thread from its head,
                   which runs the steps still pending there; the input is never re-sent

A caller may choose the turn id (``config["metadata"][TURN_KEY]``, e.g. a request id):
then a request submitted twice, even from two processes, is applied once, because the
helper checks before the first attempt too. Permissive mode raises no conflicts, so
there the helper calls ``fn`` once, with LangGraph's semantics.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from tierstore.errors import ConfigurationError, VersionConflict
from tierstore.policy import TURN_KEY, retry_delay

__all__ = ["TURN_KEY", "retry_on_conflict", "retry_on_conflict_sync"]

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger("tierstore")
MAX_ATTEMPTS = 50


@dataclass(frozen=True)
class _Turn:
    """One turn's arguments with its turn id stamped in, and how to ask about it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    turn_id: str
    chosen_by_caller: bool
    thread: dict[str, Any]
    """The config ``alist`` gets to look for the turn's checkpoints."""
    filter: dict[str, Any]

    def call(self, *, resend: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Fresh arguments for one attempt: the input, or ``None`` to continue the thread."""
        args, kwargs = copy.deepcopy((self.args, self.kwargs))
        if resend:
            return args, kwargs
        if "input" in kwargs:
            kwargs["input"] = None
        elif args:
            args = (None, *args[1:])
        return args, kwargs


def _is_config(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("configurable"), Mapping)


def _prepare(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Turn:
    """Copy the arguments once and stamp the turn id into the copy's config metadata."""
    pristine_args, pristine_kwargs = copy.deepcopy((args, kwargs))
    configs = [v for v in (*pristine_args, *pristine_kwargs.values()) if _is_config(v)]
    if not configs or configs[-1]["configurable"].get("thread_id") is None:
        raise ConfigurationError(
            "retry_on_conflict needs the run's config among the arguments, with "
            "configurable.thread_id: it identifies the turn's thread"
        )
    config: dict[str, Any] = configs[-1]
    configurable = config["configurable"]
    if configurable.get("checkpoint_id"):
        raise ConfigurationError(
            "retry_on_conflict re-runs from the thread's latest checkpoint; the config pins "
            "checkpoint_id, so a retry would fork instead"
        )
    metadata = dict(config.get("metadata") or {})
    given = metadata.get(TURN_KEY)
    if given is not None and not isinstance(given, str):
        raise ConfigurationError(f"metadata {TURN_KEY!r} must be a string, got {given!r}")
    turn_id = given or uuid.uuid4().hex
    metadata[TURN_KEY] = turn_id
    config["metadata"] = metadata
    thread = {"configurable": {"thread_id": configurable["thread_id"]}}
    if configurable.get("checkpoint_ns"):
        thread["configurable"]["checkpoint_ns"] = configurable["checkpoint_ns"]
    return _Turn(pristine_args, pristine_kwargs, turn_id, given is not None, thread,
                 {TURN_KEY: turn_id})


def _checkpointer(fn: Callable[..., Any]) -> Any:
    """The checkpointer of the graph whose bound method ``fn`` is (``app.ainvoke``)."""
    owner = getattr(fn, "__self__", None)
    saver = getattr(owner, "checkpointer", None)
    if saver is None or not hasattr(saver, "alist"):
        raise ConfigurationError(
            "retry_on_conflict needs a method of a graph compiled with a checkpointer "
            "(app.ainvoke / app.invoke): it asks that checkpointer whether a turn's input "
            "was stored before it sends the input again"
        )
    return saver


def _log_retry(exc: VersionConflict, delay: float, landed: bool) -> None:
    log.info("version conflict on %r (head %r, version %d); %s in %.3fs",
             exc.thread_id, exc.head_id, exc.version,
             "input stored, continuing the thread" if landed else "re-sending the input",
             delay)


async def retry_on_conflict(
    fn: Callable[P, Awaitable[T]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``await fn(*args, **kwargs)`` as one turn whose input lands exactly once.

    Typical use: ``await retry_on_conflict(app.ainvoke, inputs, config)``. ``fn`` must be
    a method of a graph compiled with a checkpointer; the config must name the thread
    and must not pin a ``checkpoint_id`` (a retry starts from the head). On
    ``VersionConflict`` (up to 50 attempts, exponential backoff) the input is sent
    again only if no checkpoint of this turn was stored; otherwise the thread is
    continued with ``None`` (see the module docstring). The result is that of the
    last attempt: after a continuation, the thread's state at its end.
    """
    saver = _checkpointer(fn)
    turn = _prepare(args, kwargs)

    async def landed() -> bool:
        async for _ in saver.alist(turn.thread, filter=turn.filter, limit=1):
            return True
        return False

    resend = not (turn.chosen_by_caller and await landed())
    for attempt in range(MAX_ATTEMPTS):
        call_args, call_kwargs = turn.call(resend=resend)
        try:
            return await fn(*call_args, **call_kwargs)
        except VersionConflict as exc:
            if attempt == MAX_ATTEMPTS - 1:
                raise
            resend = resend and not await landed()
            delay = retry_delay(attempt, jitter=random.random())
            _log_retry(exc, delay, not resend)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def retry_on_conflict_sync(
    fn: Callable[P, T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """The same turn semantics for sync apps.

    Typical use: ``retry_on_conflict_sync(app.invoke, inputs, config)``; the backoff sleeps
    the calling thread.
    """
    saver = _checkpointer(fn)
    turn = _prepare(args, kwargs)

    def landed() -> bool:
        return any(True for _ in saver.list(turn.thread, filter=turn.filter, limit=1))

    resend = not (turn.chosen_by_caller and landed())
    for attempt in range(MAX_ATTEMPTS):
        call_args, call_kwargs = turn.call(resend=resend)
        try:
            return fn(*call_args, **call_kwargs)
        except VersionConflict as exc:
            if attempt == MAX_ATTEMPTS - 1:
                raise
            resend = resend and not landed()
            delay = retry_delay(attempt, jitter=random.random())
            _log_retry(exc, delay, not resend)
            time.sleep(delay)
    raise AssertionError("unreachable")
