"""Living with optimistic locking: re-run a turn that lost a version race.

In ``concurrency="strict"`` a write whose parent is no longer the head raises
``VersionConflict``. Usually that is the turn's first write and nothing of it is
stored; if another writer slipped in mid-turn, the steps already stored stay in the
history (visible, never silently dropped) and the retry applies the input again on
top of the new head. Each attempt gets a fresh deep copy of the arguments, because
LangGraph stamps ids onto input messages and a re-sent message with the same id
would replace, not append.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from tierstore.errors import ConfigurationError, VersionConflict
from tierstore.policy import retry_delay

__all__ = ["retry_on_conflict"]

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger("tierstore")


async def retry_on_conflict(
    fn: Callable[P, Awaitable[T]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``await fn(*args, **kwargs)``, re-run on ``VersionConflict`` (up to 50 attempts).

    Typical use: ``await retry_on_conflict(app.ainvoke, inputs, config)``. The
    config must not pin a ``checkpoint_id``: a retry has to start from the new head.
    """
    configurable = {}
    for value in (*args, *kwargs.values()):
        if isinstance(value, dict) and isinstance(value.get("configurable"), dict):
            configurable = value["configurable"]
    if configurable.get("checkpoint_id"):
        raise ConfigurationError(
            "retry_on_conflict re-runs from the thread's latest checkpoint; the config pins "
            "checkpoint_id, so a retry would fork instead"
        )
    attempts = 50
    pristine = copy.deepcopy((args, kwargs))
    for attempt in range(attempts):
        call_args, call_kwargs = copy.deepcopy(pristine)
        try:
            return await fn(*call_args, **call_kwargs)
        except VersionConflict as exc:
            if attempt == attempts - 1:
                raise
            delay = retry_delay(attempt, jitter=random.random())
            log.info("version conflict on %r (head %r, version %d); retrying in %.3fs",
                     exc.thread_id, exc.head_id, exc.version, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
