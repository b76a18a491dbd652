"""The one backoff curve (``policy.backoff``) and the delays built on it."""

from __future__ import annotations

import pytest

from tierstore.policy import backoff, retry_delay


def test_the_curve_doubles_from_base_up_to_cap() -> None:
    assert [backoff(n, base=0.1, cap=1.0) for n in range(6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_a_negative_attempt_waits_nothing() -> None:
    assert backoff(-1, base=5.0, cap=10.0) == 0.0
    assert backoff(-100, base=5.0, cap=10.0, jitter=0.7) == 0.0


def test_huge_attempts_stay_at_the_cap() -> None:
    assert backoff(10**9, base=1e-9, cap=3.0) == 3.0


def test_jitter_is_a_factor_the_caller_draws() -> None:
    assert backoff(2, base=1.0, cap=100.0, jitter=0.25) == 1.0
    assert backoff(10, base=1.0, cap=8.0, jitter=0.5) == 4.0
    assert backoff(3, base=1.0, cap=8.0, jitter=0.0) == 0.0


def test_conflict_retries_spread_around_the_curve() -> None:
    assert retry_delay(0, jitter=0.0) == pytest.approx(0.005)
    assert retry_delay(0, jitter=0.5) == pytest.approx(0.01)
    assert retry_delay(3, jitter=0.5) == pytest.approx(0.08)
    assert retry_delay(50, jitter=0.999) == pytest.approx(1.499)
    assert retry_delay(5, base=0.01, cap=0.5, jitter=0.5) == pytest.approx(0.32)
