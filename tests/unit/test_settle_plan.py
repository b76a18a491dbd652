"""When a demoted head next has work: the pure half of "skipped until something changes"."""

from __future__ import annotations

from tierstore.jobs.plan import TieringPolicy, next_demotion, plan_demotion
from tierstore.records import CheckpointMeta, Location


def meta(n: int, parent: int | None, created: float, location: Location = "warm") -> CheckpointMeta:
    return CheckpointMeta("t", "", f"{n:04d}", None if parent is None else f"{parent:04d}",
                          created, location, None, 10)


def test_nothing_left_to_wait_for_settles_for_good() -> None:
    index = [meta(2, 1, 300.0), meta(1, 0, 200.0), meta(0, None, 100.0)]
    policy = TieringPolicy(archive_after=50)
    protect = {"0002", "0001", "0000"}
    assert plan_demotion(index, head_id="0002", policy=policy, now=1000, protect=protect) == []
    assert next_demotion(index, head_id="0002", policy=policy, protect=protect) is None


def test_a_young_fork_is_what_the_head_waits_for() -> None:
    # 0003 forks off 0000 and is not on the head's chain: it becomes movable once old
    index = [meta(4, 1, 500.0), meta(3, 0, 400.0), meta(1, 0, 200.0), meta(0, None, 100.0)]
    policy = TieringPolicy(archive_after=300)
    protect = {"0004", "0001"}
    moved = plan_demotion(index, head_id="0004", policy=policy, now=550, protect=protect)
    assert moved == ["0000"]
    assert next_demotion(index, head_id="0004", policy=policy, protect=protect,
                         exclude=set(moved)) == 400.0


def test_archived_and_kept_checkpoints_are_never_waited_for() -> None:
    index = [meta(3, 2, 400.0), meta(2, 1, 300.0), meta(1, 0, 200.0, "archived")]
    policy = TieringPolicy(archive_after=10, keep_latest=2)
    assert next_demotion(index, head_id="0003", policy=policy, protect={"0003"}) is None
