"""The decisions of ``tierstore doctor``: facts in, ok / warn / fail with a fix out."""

from __future__ import annotations

import pytest

from tierstore.doctor import (
    SKEW_WARN_SECONDS,
    judge_lifecycle,
    judge_redis_policy,
    judge_schema,
    judge_skew,
)
from tierstore.migrate import migrations_for


@pytest.mark.parametrize(("policy", "maxmemory", "status"), [
    ("noeviction", 100 << 20, "fail"),
    ("noeviction", 0, "ok"),
    ("allkeys-lru", 100 << 20, "ok"),
    ("allkeys-lfu", 100 << 20, "ok"),
    ("volatile-lru", 100 << 20, "ok"),
    ("volatile-ttl", 100 << 20, "ok"),
    ("allkeys-random", 100 << 20, "warn"),
    ("volatile-random", 100 << 20, "warn"),
    ("something-new", 100 << 20, "warn"),
    (None, None, "warn"),
])
def test_redis_policy(policy: str | None, maxmemory: int | None, status: str) -> None:
    judged, detail, fix = judge_redis_policy(policy, maxmemory)
    assert judged == status
    assert bool(fix) == (status != "ok"), detail


def test_schema() -> None:
    shipped = len(migrations_for("postgres"))
    every = list(range(1, shipped + 1))
    assert judge_schema("postgres", every)[0] == "ok"
    assert judge_schema("postgres", None)[0] == "fail"
    assert judge_schema("postgres", [])[0] == "fail"
    status, detail, fix = judge_schema("postgres", every[:-1])
    assert (status, f"{shipped:04d}" in detail, "migrate" in fix) == ("fail", True, True)
    status, detail, fix = judge_schema("postgres", [*every, shipped + 1])
    assert status == "fail"
    assert "newer" in detail
    assert "upgrade" in fix


def test_skew() -> None:
    assert judge_skew(0.2)[0] == "ok"
    assert judge_skew(-(SKEW_WARN_SECONDS + 0.5))[0] == "warn"
    assert judge_skew(120.0, limit=60.0)[0] == "fail"
    assert "ahead" in judge_skew(2.0)[1]
    assert "behind" in judge_skew(-2.0)[1]
    # an HTTP Date has whole seconds: a second of difference is its resolution
    assert judge_skew(1.9, resolution=1.0)[0] == "ok"


def rule(**extra: object) -> dict[str, object]:
    return {"ID": "r", "Status": "Enabled", "Filter": {"Prefix": ""}, **extra}


def test_lifecycle() -> None:
    [(status, _, _)] = judge_lifecycle(None, prefix="", storage_class="STANDARD_IA")
    assert status == "ok"
    [(status, detail, _)] = judge_lifecycle([rule(Expiration={"Days": 30})], prefix="arch/",
                                            storage_class="STANDARD_IA")
    assert status == "fail"
    assert "deletes archives" in detail
    glacier = [rule(Transitions=[{"Days": 90, "StorageClass": "GLACIER"}])]
    assert judge_lifecycle(glacier, prefix="", storage_class="STANDARD_IA")[0][0] == "warn"
    assert judge_lifecycle(glacier, prefix="", storage_class="GLACIER")[0][0] == "ok"
    elsewhere = [rule(Filter={"Prefix": "logs/"}, Expiration={"Days": 1})]
    assert judge_lifecycle(elsewhere, prefix="arch/", storage_class="STANDARD")[0][0] == "ok"
    disabled = [rule(Status="Disabled", Expiration={"Days": 1})]
    assert judge_lifecycle(disabled, prefix="", storage_class="STANDARD")[0][0] == "ok"
