"""Tiering decisions with a fake clock: what moves, what stays, when."""

from __future__ import annotations

import pytest

from tierstore.errors import ConfigurationError
from tierstore.jobs.plan import (
    DAY,
    TieringPolicy,
    backoff,
    chunks,
    delta_depth,
    is_expired,
    is_idle,
    plan_demotion,
    protected_ancestors,
)
from tierstore.records import CheckpointMeta

NOW = 1_800_000_000.0


def chain(n: int, *, age_days: float = 40, location: str = "warm") -> list[CheckpointMeta]:
    """n checkpoints, c00 oldest, each a day newer than the previous, newest first."""
    out = []
    for i in range(n):
        created = NOW - (age_days - i) * DAY
        out.append(CheckpointMeta("t", "", f"c{i:02d}", f"c{i - 1:02d}" if i else None, created,
                                  location, None, 100))  # type: ignore[arg-type]
    return list(reversed(out))


def test_history_older_than_archive_after_moves_except_head_and_latest() -> None:
    index = chain(20)  # ages 40 .. 21 days
    policy = TieringPolicy(archive_after=30 * DAY, keep_latest=3)
    ids = plan_demotion(index, head_id="c19", policy=policy, now=NOW)
    assert ids == [f"c{i:02d}" for i in range(10)]  # strictly older than 30 days: c00..c09


def test_keep_latest_and_head_always_stay() -> None:
    index = chain(5, age_days=400)
    ids = plan_demotion(index, head_id="c04", policy=TieringPolicy(archive_after=0, keep_latest=1),
                        now=NOW)
    assert ids == ["c00", "c01", "c02", "c03"]
    ids = plan_demotion(index, head_id="c04", policy=TieringPolicy(archive_after=0, keep_latest=5),
                        now=NOW)
    assert ids == []


def test_nothing_moves_when_disabled_or_young_or_already_archived() -> None:
    assert plan_demotion(chain(5), head_id="c04", policy=TieringPolicy(archive_after=None),
                         now=NOW) == []
    assert plan_demotion(chain(5, age_days=3), head_id="c04", policy=TieringPolicy(),
                         now=NOW) == []
    assert plan_demotion(chain(5, location="archived"), head_id="c04",
                         policy=TieringPolicy(archive_after=0), now=NOW) == []


def test_delta_channel_ancestors_are_protected() -> None:
    index = chain(10, age_days=100)
    metadata = {"counters_since_delta_snapshot": {"messages": [2, 3], "other": (1, 1)}}
    depth = delta_depth(metadata)
    assert depth == 3
    protect = protected_ancestors(index, "c09", depth)
    assert protect == {"c09", "c08", "c07", "c06"}
    ids = plan_demotion(index, head_id="c09", policy=TieringPolicy(archive_after=0),
                        now=NOW, protect=protect)
    assert ids == [f"c{i:02d}" for i in range(6)]
    assert delta_depth({}) == 0
    assert delta_depth({"counters_since_delta_snapshot": {"x": "junk"}}) == 0


def test_idle_and_expiry_use_the_last_write() -> None:
    policy = TieringPolicy(archive_idle_after=90 * DAY, expire_after=365 * DAY)
    assert is_idle(NOW - 91 * DAY, policy=policy, now=NOW)
    assert not is_idle(NOW - 89 * DAY, policy=policy, now=NOW)
    assert is_expired(NOW - 366 * DAY, policy=policy, now=NOW)
    assert not is_expired(NOW - 364 * DAY, policy=policy, now=NOW)
    assert not is_expired(0, policy=TieringPolicy(expire_after=None), now=NOW)


def test_chunks_are_oldest_first_and_stable() -> None:
    ids = [f"c{i:02d}" for i in range(7)]
    assert chunks(list(reversed(ids)), 3) == [ids[0:3], ids[3:6], ids[6:7]]
    assert chunks([*ids, "c07", "c08"], 3)[:2] == chunks(ids, 3)[:2]  # history grows at the end


def test_backoff_grows_and_caps() -> None:
    assert backoff(10, 0) == 10
    assert backoff(10, 1) == 20
    assert backoff(10, 3) == 80
    assert backoff(10, 50) == 600


@pytest.mark.parametrize("kwargs", [{"keep_latest": 0}, {"archive_after": -1},
                                    {"storage_class": "COLD"}, {"segment_size": 0},
                                    {"parallel_moves": 0},
                                    {"expire_strategy": "shred"}])
def test_policy_refuses_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        TieringPolicy(**kwargs)  # type: ignore[arg-type]
