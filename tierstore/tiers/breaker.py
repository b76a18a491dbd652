"""The Redis hot tier's circuit breaker: pure decisions, the caller passes ``now``.

A call that cannot reach the server opens it; calls then fail at once until a backoff
has passed, when one call goes through as the probe. See ``tierstore.tiers.redis``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierstore.policy import backoff

__all__ = ["Breaker", "backoff_delay", "breaker_admit", "breaker_failure", "breaker_success"]


@dataclass(frozen=True, slots=True)
class Breaker:
    """Consecutive failures, the time before which calls fail fast, and whether a probe is out.

    ``failures == 0`` is closed. ``now < open_until`` is open. Otherwise half-open:
    the next call is admitted as the probe and holds the others off while it runs.
    """

    failures: int = 0
    open_until: float = 0.0
    probing: bool = False


def backoff_delay(failures: int, *, base: float, cap: float) -> float:
    """Seconds to wait after ``failures`` consecutive failures: base, 2·base, 4·base… ≤ cap.

    No jitter: the breaker is per process, so there is no crowd to spread out.
    """
    return backoff(failures - 1, base=base, cap=cap)


def breaker_admit(
    state: Breaker, now: float, *, base: float, cap: float
) -> tuple[bool, Breaker]:
    """May a call go to the server now? Admitting a half-open call makes it the probe."""
    if state.failures == 0:
        return True, state
    if now < state.open_until:
        return False, state
    wait = backoff_delay(state.failures, base=base, cap=cap)
    return True, Breaker(state.failures, now + wait, probing=True)


def breaker_failure(state: Breaker, now: float, *, base: float, cap: float) -> Breaker:
    """A call could not reach the server. A failed call that started before the breaker
    opened (not the probe) does not push the next probe further out."""
    if state.failures and not state.probing:
        return state
    failures = state.failures + 1
    return Breaker(failures, now + backoff_delay(failures, base=base, cap=cap), probing=False)


def breaker_success(state: Breaker) -> Breaker:
    """Any answer from the server proves it is back."""
    return state if state.failures == 0 else Breaker()
