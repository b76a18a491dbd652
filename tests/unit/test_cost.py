"""The cost model: prices and their checks, the bill of a store, the plan.

Expected figures are worked out by hand from round test prices (written out next to
each assertion), never by calling the code under test a second way.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from tierstore import cost
from tierstore.errors import ConfigurationError, InvalidInput
from tierstore.jobs.plan import STORAGE_CLASSES
from tierstore.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "tierstore" / "prices.toml"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MONTH = 730 * 3600  # seconds
DAY = 86400


def _class(storage: float, *, put: float = 0.0, get: float = 0.0, listing: float = 0.005,
           retrieval: float = 0.0, restore: float = 0.0, restore_gb: float = 0.0,
           minimum: float = 0.0, overhead: float = 0.0, overhead_standard: float = 0.0,
           needs_restore: bool = False) -> dict[str, Any]:
    return {"name": "test class", "url": "https://example.test/", "storage_gb_month": storage,
            "put_per_1000": put, "get_per_1000": get, "list_per_1000": listing,
            "retrieval_per_gb": retrieval, "restore_per_1000": restore,
            "restore_per_gb": restore_gb, "min_object_kb": minimum, "overhead_kb": overhead,
            "overhead_standard_kb": overhead_standard, "min_days": 0.0,
            "needs_restore": needs_restore}


# Round prices: Redis $10/GB-month (a $1/h node of 73 GB, all usable: 730 / 73),
# PostgreSQL $0.10/GB-month, S3 Standard $0.02, ...
ROUND: dict[str, Any] = {
    "source": {"taken": "2026-01-01", "region": "test", "currency": "USD", "check": "test"},
    "hot": {"redis": {"name": "node", "url": "https://example.test/", "node": "test.node",
                      "node_hourly": 1.0, "node_memory_gb": 73.0, "usable_fraction": 1.0}},
    "warm": {"postgres": {"name": "pg", "url": "https://example.test/",
                          "storage_gb_month": 0.10},
             "sqlite": {"name": "disk", "url": "https://example.test/",
                        "storage_gb_month": 0.05}},
    "cold": {
        "STANDARD": _class(0.02, put=0.005, get=0.0004),
        "GLACIER_IR": _class(0.004, put=0.02, get=0.01, retrieval=0.03, minimum=128),
        "GLACIER": _class(0.004, put=0.03, get=0.0004, restore=0.05, restore_gb=0.01,
                          overhead=32, overhead_standard=8, needs_restore=True),
    },
}


def round_prices() -> cost.Prices:
    return cost.merge_prices([("test prices", ROUND)])


def shipped() -> cost.Prices:
    return cost.merge_prices([("prices.toml", cost.parse_price_file(
        SHIPPED.read_text("utf-8"), "prices.toml"))])


# -- prices ---------------------------------------------------------------------------------


def test_the_shipped_prices_are_dated_sourced_and_complete() -> None:
    prices = shipped()
    assert prices.source["taken"] == "2026-12-01" and prices.source["region"] == "us-east-1"
    assert "check" in prices.source["check"]
    assert set(prices.cold) == {*STORAGE_CLASSES, "FILE"}
    assert set(prices.warm) == {"postgres", "mongodb", "sqlite"}
    entries: list[cost.HotPrice | cost.WarmPrice | cost.ColdPrice] = [
        *prices.hot.values(), *prices.warm.values(), *prices.cold.values()]
    assert all(e.url.startswith("https://") and e.name for e in entries)
    # the figures the README quotes
    assert prices.warm["postgres"].storage_gb_month == 0.115
    assert prices.cold["GLACIER_IR"].storage_gb_month == 0.004
    assert prices.cold["GLACIER_IR"].min_object_kb == 128
    assert prices.cold["DEEP_ARCHIVE"].needs_restore is True
    # cache.r7g.large: $0.219/h x 730 h / (13.07 GB x 0.75 usable) = $16.309.../GB-month
    assert prices.hot["redis"].gb_month == pytest.approx(159.87 / 9.8025)


def test_a_later_layer_changes_only_the_keys_it_names() -> None:
    base = ("prices.toml", cost.parse_price_file(SHIPPED.read_text("utf-8"), "prices.toml"))
    mine = ("mine.toml", cost.parse_price_file(
        "[warm.postgres]\nstorage_gb_month = 0.23\n[source]\ntaken = '2027-01-01'\n",
        "mine.toml"))
    flags = ("--price", cost.parse_assignments(
        ["cold.GLACIER_IR.storage_gb_month=0.0036", "cold.GLACIER.needs_restore=false"],
        "--price"))
    prices = cost.merge_prices([base, mine, flags])
    assert prices.warm["postgres"].storage_gb_month == 0.23
    assert prices.warm["postgres"].url == "https://aws.amazon.com/rds/postgresql/pricing/"
    assert prices.cold["GLACIER_IR"].storage_gb_month == 0.0036
    assert prices.cold["GLACIER_IR"].put_per_1000 == 0.02
    assert prices.cold["GLACIER"].needs_restore is False
    assert prices.source["taken"] == "2027-01-01" and prices.source["region"] == "us-east-1"


@pytest.mark.parametrize(("layer", "named"), [
    ({"warm": {"postgres": {"storage_gb_month": -0.1}}}, "warm.postgres.storage_gb_month"),
    ({"warm": {"postgres": {"storage_gb_month": "cheap"}}}, "warm.postgres.storage_gb_month"),
    ({"warm": {"postgres": {"storage_gb_month": True}}}, "warm.postgres.storage_gb_month"),
    ({"warm": {"postgres": {"storage_gb_month": float("inf")}}},
     "warm.postgres.storage_gb_month"),
    ({"warm": {"postgres": {"storage_per_gb": 0.1}}}, "warm.postgres.storage_per_gb"),
    ({"warm": {"postgress": {"storage_gb_month": 0.1}}}, "warm.postgress"),
    ({"lukewarm": {}}, "lukewarm"),
    ({"source": {"date": "2026"}}, "source.date"),
    ({"cold": {"GLACIER": {"needs_restore": "sometimes"}}}, "cold.GLACIER.needs_restore"),
    ({"cold": {"GLACIER": {"name": 3}}}, "cold.GLACIER.name"),
    ({"hot": {"redis": "cheap"}}, "hot.redis"),
])
def test_a_bad_price_is_refused_naming_its_key_and_where_it_came_from(
        layer: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=r"mine\.toml") as caught:
        cost.merge_prices([("test prices", ROUND), ("mine.toml", layer)])
    assert named in str(caught.value)


def test_overrides_from_the_environment_or_flags_are_checked_like_a_file() -> None:
    layer = cost.parse_assignments(["warm.postgres.storage_gb_month=abc"], "TIERSTORE_PRICES")
    with pytest.raises(ConfigurationError,
                       match=r"TIERSTORE_PRICES: warm\.postgres\.storage_gb_month"):
        cost.merge_prices([("test prices", ROUND), ("TIERSTORE_PRICES", layer)])
    for bad in ("warm.postgres.storage_gb_month", "=0.1", "warm..x=1"):
        with pytest.raises(ConfigurationError, match="KEY=VALUE"):
            cost.parse_assignments([bad], "--price")
    with pytest.raises(ConfigurationError, match="not a TOML price file"):
        cost.parse_price_file("[warm\n", "broken.toml")


def test_a_redis_node_without_usable_memory_is_refused() -> None:
    layer = {"hot": {"redis": {"usable_fraction": 0.0}}}
    with pytest.raises(ConfigurationError, match=r"hot\.redis"):
        cost.merge_prices([("test prices", ROUND), ("mine", layer)])


def test_the_price_file_is_toml_users_can_copy() -> None:
    """Every key of the shipped file is one a user's file may set (the file is the docs)."""
    table = tomllib.loads(SHIPPED.read_text("utf-8"))
    assert cost.merge_prices([("a copy", table)]) == shipped()


# -- the plan ----------------------------------------------------------------------------------

# 1,000 threads and 10,000 checkpoints today, 2,000 checkpoints a month (so 200 threads a
# month, 10 checkpoints each); history moves after half a month, idle threads after one.
WORKLOAD = cost.Workload(threads=1000, checkpoints=10_000, checkpoints_per_month=2000,
                         bytes_per_checkpoint=MiB, baseline_bytes_per_checkpoint=2 * MiB,
                         stub_bytes=KiB, head_bytes=4 * MiB, hot_bytes=MiB,
                         cold_bytes=512 * KiB)
POLICY = cost.Policy(hot_ttl=0.01 * MONTH, archive_after=0.5 * MONTH,
                     archive_idle_after=1.0 * MONTH, storage_class="STANDARD",
                     gc_interval=DAY)


def lines(bill: cost.Bill) -> dict[str, cost.Line]:
    return {line.item: line for line in bill.lines}


def test_where_the_checkpoints_are_after_a_month() -> None:
    at = cost.layout(WORKLOAD, POLICY, 1)
    # 12,000 checkpoints of 1,200 threads; 2,000 x 0.5 written in the last half month;
    # 200 x 0.5 = 100 threads written in it, 200 in the last month: 100 idle heads.
    assert (at.checkpoints, at.threads) == (12_000, 1200)
    assert at.recent == pytest.approx(1000)
    assert at.idle_heads == pytest.approx(100)
    assert at.archived == pytest.approx(12_000 - 1000 - 100)
    # a history segment for each of the 1,100 threads older than half a month, a whole-
    # thread segment for each of the 1,000 older than a month
    assert at.segments == pytest.approx(1100 + 1000)
    assert at.cached_threads == pytest.approx(200 * 0.01)


def test_the_tiered_bill_by_hand() -> None:
    result = cost.plan(WORKLOAD, POLICY, round_prices(), months=1)
    got = lines(result.final["tiered"])
    assert got["Redis memory"].monthly == pytest.approx(2 * MiB / GiB * 10)
    assert got["recent history"].monthly == pytest.approx(1000 * MiB / GiB * 0.10)
    assert got["idle heads"].monthly == pytest.approx(100 * 4 * MiB / GiB * 0.10)
    assert got["archive stubs"].monthly == pytest.approx(10_900 * KiB / GiB * 0.10)
    assert got["STANDARD storage"].monthly == pytest.approx(10_900 * 512 * KiB / GiB * 0.02)
    # 200 threads a month, each a history and a whole-thread segment: 400 PUTs, each
    # read back with a HEAD and a GET
    assert got["segment writes"].quantity == pytest.approx(400)
    assert got["segment writes"].monthly == pytest.approx(400 / 1000 * (0.005 + 2 * 0.0004))
    # 2,000 reads, 5% of them history, 10,900 / 12,000 of those in cold
    assert got["segment reads"].quantity == pytest.approx(100 * 10_900 / 12_000)
    assert got["segment reads"].monthly == pytest.approx(100 * 10_900 / 12_000 / 1000 * 0.0004)
    # 730 h / 24 h runs, each three LISTs for 2,100 objects
    assert got["cold-gc listings"].quantity == pytest.approx(730 / 24 * 3)
    assert got["cold-gc listings"].monthly == pytest.approx(730 / 24 * 3 / 1000 * 0.005)
    assert result.final["tiered"].total == pytest.approx(
        sum(line.monthly for line in got.values()))


def test_the_other_ways_of_storing_by_hand() -> None:
    result = cost.plan(WORKLOAD, POLICY, round_prices(), months=2)
    assert [at.checkpoints for at in result.months] == [12_000, 14_000]
    final = result.final
    assert final["all-in-warm"].total == pytest.approx(14_000 * MiB / GiB * 0.10)
    assert final["all-in-warm, baseline bytes"].total == pytest.approx(
        14_000 * 2 * MiB / GiB * 0.10)
    assert final["all-in-hot"].total == pytest.approx(14_000 * MiB / GiB * 10)
    ratios = result.ratios()
    assert ratios["all-in-warm"] == pytest.approx(
        final["tiered"].total / (14_000 * MiB / GiB * 0.10))
    # the existing store archived once: of its 1,000 threads, 900 were last written more
    # than half a month ago (a history segment each), 800 more than a month ago (a
    # whole-thread segment each); every segment a PUT, a HEAD and a GET
    assert [line.quantity for line in result.one_off] == [pytest.approx(900 + 800)]
    assert result.one_off[0].monthly == pytest.approx(1700 / 1000 * (0.005 + 2 * 0.0004))


def test_small_segments_are_billed_at_the_class_minimum() -> None:
    workload = cost.Workload(**{**_fields(WORKLOAD), "cold_bytes": KiB})
    policy = cost.Policy(**{**_fields(POLICY), "storage_class": "GLACIER_IR"})
    got = lines(cost.plan(workload, policy, round_prices(), months=1).final["tiered"])
    # 10,900 KiB in 2,100 segments is about 5 KiB each: each billed as 128 KiB
    assert got["GLACIER_IR storage"].monthly == pytest.approx(2100 * 128 * KiB / GiB * 0.004)
    # writes: PUT + HEAD + GET, and the GET's retrieval of 10,900 / 2,100 KiB a segment
    segment = 10_900 * KiB / 2100
    assert got["segment writes"].monthly == pytest.approx(
        400 / 1000 * (0.02 + 2 * 0.01) + 400 * segment / GiB * 0.03)


def test_archive_classes_add_their_index_and_restores() -> None:
    policy = cost.Policy(**{**_fields(POLICY), "storage_class": "GLACIER"})
    bill = cost.plan(WORKLOAD, policy, round_prices(), months=1).final["tiered"]
    got = lines(bill)
    # 32 KiB per object at the class's rate, 8 KiB at S3 Standard's
    assert got["GLACIER storage"].monthly == pytest.approx(
        (10_900 * 512 * KiB + 2100 * 32 * KiB) / GiB * 0.004 + 2100 * 8 * KiB / GiB * 0.02)
    # nothing to GET back at once: a PUT and a HEAD each
    assert got["segment writes"].monthly == pytest.approx(400 / 1000 * (0.03 + 0.0004))
    reads = 100 * 10_900 / 12_000
    segment = 10_900 * 512 * KiB / 2100
    assert got["segment reads"].monthly == pytest.approx(
        reads / 1000 * (0.0004 + 0.05) + reads * segment / GiB * 0.01)
    assert any("restore" in note for note in bill.notes)


def test_with_no_moves_and_no_hot_tier_tiered_is_all_in_warm() -> None:
    policy = cost.Policy(hot=None, archive_after=None, archive_idle_after=None,
                         storage_class="STANDARD")
    result = cost.plan(WORKLOAD, policy, round_prices(), months=3)
    assert result.final["tiered"].total == pytest.approx(result.final["all-in-warm"].total)
    assert [line.item for line in result.final["tiered"].lines] == ["recent history"]
    assert result.one_off == ()


def test_idle_archival_alone_writes_one_segment_per_thread() -> None:
    policy = cost.Policy(**{**_fields(POLICY), "archive_after": None})
    at = cost.layout(WORKLOAD, policy, 1)
    # everything a thread wrote in the last month stays: 2,000 checkpoints; the
    # 1,000 older threads are archived whole, one segment each
    assert at.recent == pytest.approx(2000)
    assert (at.idle_heads, at.segments) == (0, 1000)


def test_packing_threads_into_segments_divides_the_objects() -> None:
    policy = cost.Policy(**{**_fields(POLICY), "threads_per_segment": 10})
    assert cost.layout(WORKLOAD, policy, 1).segments == pytest.approx(2100 / 10)


def test_a_thread_longer_than_a_segment_takes_several() -> None:
    policy = cost.Policy(**{**_fields(POLICY), "segment_size": 4})
    # 10 checkpoints a thread, 4 a segment: 3 history segments a thread
    assert cost.layout(WORKLOAD, policy, 1).segments == pytest.approx(1100 * 3 + 1000)


@pytest.mark.parametrize(("change", "named"), [
    ({"threads": -1}, "threads"),
    ({"checkpoints": float("nan")}, "checkpoints"),
    ({"latest_read_share": 1.5}, "latest_read_share"),
    ({"cold_read_share": -0.1}, "cold_read_share"),
    ({"stub_bytes": "1k"}, "stub_bytes"),
    ({"threads": 20_000}, "threads"),  # more threads than checkpoints
])
def test_a_bad_workload_is_refused_naming_the_field(change: dict[str, Any], named: str
                                                     ) -> None:
    with pytest.raises(InvalidInput, match=named):
        cost.Workload(**{**_fields(WORKLOAD), **change})


@pytest.mark.parametrize(("change", "named"), [
    ({"archive_after": -1.0}, "archive_after"),
    ({"gc_interval": 0.0}, "gc_interval"),
    ({"segment_size": 0}, "segment_size"),
    ({"threads_per_segment": 0.5}, "threads_per_segment"),
])
def test_a_bad_policy_is_refused_naming_the_field(change: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidInput, match=named):
        cost.Policy(**{**_fields(POLICY), **change})


def test_a_plan_needs_months_and_a_priced_class() -> None:
    with pytest.raises(InvalidInput, match="months"):
        cost.plan(WORKLOAD, POLICY, round_prices(), months=0)
    policy = cost.Policy(**{**_fields(POLICY), "storage_class": "DEEP_ARCHIVE"})
    with pytest.raises(InvalidInput, match="DEEP_ARCHIVE"):
        cost.plan(WORKLOAD, policy, round_prices())


def test_an_empty_store_needs_its_thread_rate() -> None:
    empty = cost.Workload(threads=0, checkpoints=0, checkpoints_per_month=100)
    with pytest.raises(InvalidInput, match="threads_per_month"):
        cost.plan(empty, POLICY, round_prices())
    started = cost.Workload(threads=0, checkpoints=0, checkpoints_per_month=100,
                            threads_per_month=10)
    assert cost.plan(started, POLICY, round_prices(), months=1).months[0].checkpoints == 100


def _fields(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name in value.__dataclass_fields__}


# -- the bill of a store as it is --------------------------------------------------------------


def test_status_bill_by_hand() -> None:
    sizes = cost.StoreSizes(
        hot_backend="redis", hot_bytes=3 * MiB, warm_backend="postgres", warm_bytes=GiB,
        warm_checkpoints=10, warm_archived=90, cold_backend="s3",
        cold=(cost.ColdUsage(storage_class="GLACIER_IR", objects=4, bytes=40 * KiB,
                             floored_bytes=4 * 128 * KiB),))
    bill = cost.status_cost(sizes, round_prices(), cold_reads_per_month=1000)
    got = lines(bill)
    assert got["Redis memory"].monthly == pytest.approx(3 * MiB / GiB * 10)
    # 1 GiB of live payload as it sits on disk, and the 90 stubs the payload leaves out
    factor = cost.WARM_DISK_PER_PAYLOAD["postgres"]
    assert got["postgres storage"].monthly == pytest.approx(
        (factor * GiB + 90 * cost.STUB_BYTES_PER_CHECKPOINT) / GiB * 0.10)
    assert got["GLACIER_IR storage"].monthly == pytest.approx(4 * 128 * KiB / GiB * 0.004)
    # 1,000 reads of a 10 KiB segment: GETs and their retrieval
    assert got["segment reads"].monthly == pytest.approx(
        1000 / 1000 * 0.01 + 1000 * 10 * KiB / GiB * 0.03)
    assert bill.total == pytest.approx(sum(line.monthly for line in got.values()))
    assert not any(note.startswith("storage only") for note in bill.notes)


def test_status_without_request_counts_says_it_is_storage_only() -> None:
    sizes = cost.StoreSizes(hot_backend="memory", warm_backend="sqlite", warm_bytes=GiB)
    bill = cost.status_cost(sizes, round_prices())
    assert [line.item for line in bill.lines] == ["sqlite storage"]
    assert any(note.startswith("storage only") for note in bill.notes)
    assert any("memory://" in note for note in bill.notes)


def test_cold_reads_come_from_the_savers_metrics_text() -> None:
    metrics = Metrics()
    for outcome in ("ok", "ok", "ok", "CheckpointArchived"):
        metrics.observe("cold", "s3", "get_segment", 0.01, outcome)
    metrics.observe("warm", "postgres", "get", 0.001)
    text = metrics.render({"hot_hits": 5})
    calls = cost.calls_from_metrics(text + text)  # two processes' texts add up
    assert calls[("cold", "get_segment", "ok")] == 6
    # 6 reads in a day: 6 x 730 / 24 a month
    assert cost.cold_reads(calls, period_seconds=DAY) == pytest.approx(6 * 730 / 24)
    with pytest.raises(InvalidInput, match="period"):
        cost.cold_reads(calls, period_seconds=0)
