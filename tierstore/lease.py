"""Per-thread leases: one run at a time per thread, across processes, fenced by the warm tier.

::

    async with saver.lease(thread_id, ttl=30, wait=10):      # ``with`` in sync code
        await app.ainvoke(inputs, config)

    enter ─► hot   acquire_lease(thread, owner, ttl)   held by another? wait with backoff,
           │                                           up to ``wait`` ─► LeaseBusy
           ├► warm  next_fence(thread) ─► token         every older token is refused from now on
           └► renew every ttl/3 in the background       (a lost lease is logged, see below)
    inside  aput / aput_writes of that thread carry the token (a context variable, so
            the tasks LangGraph starts for the run inherit it); the warm tier checks it
            in the same atomic step as the write ─► LeaseLost, nothing written
    exit  ─► stop renewing; hot release_lease (only if the lease is still ours)

Why two stores. The hot tier's lock keeps honest holders apart cheaply, but a
holder paused past its TTL (a long GC pause, a frozen VM, a partition) wakes up
believing it still holds the lock, and Redis itself may lose a lock on failover.
Safety therefore rests on the token: the durable warm tier issues it and refuses
any write carrying an older one, so an expired holder cannot write once another
holder has the thread. A holder whose lease expired while nobody else took the
thread keeps writing: its token is still the newest.

Leases are cooperative: writes made outside a lease are not checked. Use them
in every process that writes the thread, or use ``concurrency="strict"``, which
needs no lease and refuses any stale parent. They are not re-entrant: a second
lease on a thread inside the first waits for the first and ends in ``LeaseBusy``.
A token belongs to one warm store: the context variable is keyed by the store and
the thread, so another saver writing the same thread id is not affected.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import suppress
from contextvars import ContextVar, Token
from types import MappingProxyType, TracebackType
from typing import Literal, Self

from tierstore.bridge import LoopBridge
from tierstore.errors import ConfigurationError, LeaseBusy, LifecycleError, TierUnavailable
from tierstore.policy import lease_renew_every, retry_delay
from tierstore.region import Region
from tierstore.tiers.base import LeaseStore, WarmStore

__all__ = ["ThreadLease", "current_fence"]

log = logging.getLogger("tierstore")

_Key = tuple[WarmStore, str]  # (the warm store, thread id)
_TOKENS: ContextVar[Mapping[_Key, int]] = ContextVar(
    "tierstore_lease_tokens", default=MappingProxyType({})
)


def current_fence(warm: WarmStore, thread_id: str) -> int | None:
    """The token of the lease this context holds on ``thread_id`` in ``warm``, if any."""
    return _TOKENS.get().get((warm, thread_id))


def _finite_seconds(value: object) -> bool:
    """A real, finite number: an infinite ttl would never expire (nor fit a Redis PX),
    an infinite wait would block forever, and ``True`` is no duration."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


RENEWER_STOP_POLL = 0.5
"""Seconds between cancels of a lease's renewer that has not stopped yet."""


class ThreadLease:
    """A lease on one thread; enter it with ``async with`` (or ``with``) once."""

    thread_id: str
    ttl: float
    wait: float
    owner: str
    token: int | None
    lost: bool
    _warm: WarmStore

    def __init__(
        self,
        *,
        region: Region,
        bridge: LoopBridge,
        thread_id: str,
        ttl: float,
        wait: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not _finite_seconds(ttl) or not ttl > 0:
            raise ConfigurationError(
                f"lease ttl must be a finite number of seconds > 0, got {ttl!r}")
        if not _finite_seconds(wait) or not wait >= 0:
            raise ConfigurationError(
                f"lease wait must be a finite number of seconds >= 0, got {wait!r}")
        if not isinstance(region.hot, LeaseStore):
            raise ConfigurationError(
                "leases need a hot tier that keeps them (memory:// in one process, "
                "redis:// across processes); this stack has none"
            )
        self.thread_id = thread_id
        self.ttl = ttl
        self.wait = wait
        self.owner = uuid.uuid4().hex
        self.token = None
        self.lost = False
        self._locks: LeaseStore = region.hot
        self._warm = region.warm
        self._bridge: LoopBridge = bridge
        self._clock: Callable[[], float] = clock
        self._renewer: asyncio.Task[None] | None = None
        self._stopping: bool = False
        self._reset: Token[Mapping[_Key, int]] | None = None
        self._state: Literal["new", "held", "done"] = "new"

    def __repr__(self) -> str:
        return (f"ThreadLease(thread_id={self.thread_id!r}, token={self.token}, "
                f"state={self._state!r}, lost={self.lost})")

    # -- the async core ---------------------------------------------------------------

    async def _take(self) -> bool:
        try:
            return await self._locks.acquire_lease(self.thread_id, self.owner, self.ttl)
        except TierUnavailable:
            # the server may have applied SET NX and lost only the reply: give it back
            with suppress(TierUnavailable, LifecycleError):
                await self._locks.release_lease(self.thread_id, self.owner)
            raise

    async def _acquire(self) -> int:
        deadline = self._clock() + self.wait
        attempt = 0
        while not await self._take():
            left = deadline - self._clock()
            if left <= 0:
                raise LeaseBusy(
                    f"thread {self.thread_id!r}: its lease stayed with another holder for "
                    f"{self.wait:g}s", thread_id=self.thread_id,
                )
            await asyncio.sleep(min(left, retry_delay(attempt, base=0.01, cap=0.5,
                                                      jitter=random.random())))
            attempt += 1
        try:
            token = await self._warm.next_fence(self.thread_id)
        except BaseException:
            with suppress(TierUnavailable, LifecycleError):
                await self._locks.release_lease(self.thread_id, self.owner)
            raise
        self._renewer = asyncio.get_running_loop().create_task(
            self._renew(), name=f"tierstore-lease-renew:{self.thread_id[:32]}"
        )
        return token

    async def _renew(self) -> None:
        every = lease_renew_every(self.ttl)
        while not self._stopping:
            await asyncio.sleep(every)
            try:
                held = await self._locks.renew_lease(self.thread_id, self.owner, self.ttl)
            except TierUnavailable as exc:
                if self._stopping:  # the cancel that stopped it may have become this error
                    return
                log.warning("cannot renew the lease on thread %r (%s); retrying",
                            self.thread_id, exc)
                continue
            except Exception as exc:  # the store closed under us: stop, never raise later
                self.lost = True
                log.warning("stopped renewing the lease on thread %r (%s)", self.thread_id, exc)
                return
            if not held:
                self.lost = True
                log.warning("the lease on thread %r (token %s) expired; once another holder "
                            "takes the thread, this holder's writes are refused",
                            self.thread_id, self.token)
                return

    async def _release(self) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            # A cancel can be lost: on Python 3.11, ``asyncio.wait_for`` (which drivers use
            # around socket writes) drops one that arrives as its operation completes. The
            # renewer also stops at its next check of ``_stopping``, and it is cancelled
            # again until it ends. wait() never raises the task's outcome, yet lets our
            # own cancellation through.
            self._stopping = True
            while not renewer.done():
                renewer.cancel()
                await asyncio.wait({renewer}, timeout=RENEWER_STOP_POLL)
        try:
            await self._locks.release_lease(self.thread_id, self.owner)
        except (TierUnavailable, LifecycleError) as exc:
            log.warning("cannot release the lease on thread %r (%s); it expires in %gs",
                        self.thread_id, exc, self.ttl)

    # -- entering and leaving -----------------------------------------------------------

    def _begin(self) -> None:
        self._bridge.require_open()
        if self._state != "new":
            raise LifecycleError(f"{self!r} was already entered; take a new lease")

    @property
    def _key(self) -> _Key:
        return (self._warm, self.thread_id)

    def _hold(self, token: int) -> None:
        self.token = token
        self._state = "held"
        self._reset = _TOKENS.set(MappingProxyType({**_TOKENS.get(), self._key: token}))

    def _drop(self) -> None:
        self._state = "done"
        reset, self._reset = self._reset, None
        if reset is not None:
            try:
                _TOKENS.reset(reset)
            except ValueError:  # left in another context than it was entered in
                _TOKENS.set(MappingProxyType({k: v for k, v in _TOKENS.get().items()
                                              if k != self._key}))

    async def __aenter__(self) -> Self:
        self._begin()
        self._hold(await self._acquire())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._drop()
        finally:
            await self._release()

    def __enter__(self) -> Self:
        self._begin()
        self._hold(self._bridge.run(self._acquire()))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._drop()
        finally:
            self._release_sync()

    def _release_sync(self) -> None:
        if self._bridge.state == "opened":
            self._bridge.run(self._release())
        else:  # the saver was closed inside the block; the lock expires by itself
            log.warning("the saver closed while holding the lease on thread %r; it expires "
                        "in %gs", self.thread_id, self.ttl)
