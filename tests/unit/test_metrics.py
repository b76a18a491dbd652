"""Metrics: counts by outcome, cumulative histograms, and text Prometheus can parse."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tierstore.errors import TierUnavailable
from tierstore.metrics import BUCKETS, Metrics


class Store:
    backend = "fake"


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return out


def test_histograms_are_cumulative_and_counts_split_by_outcome() -> None:
    m = Metrics()
    for seconds in (0.0001, 0.003, 0.003, 0.2, 30.0):
        m.observe("warm", "sqlite", "get", seconds)
    m.observe("warm", "sqlite", "get", 0.001, "TierUnavailable")
    parsed = families(m.render({"hot_hits": 7, "conflicts": 0}))
    calls = {(s[1]["op"], s[1]["outcome"]): s[2] for s in parsed["tierstore_store_calls"]}
    assert calls == {("get", "ok"): 5, ("get", "TierUnavailable"): 1}
    buckets = {s[1]["le"]: s[2] for s in parsed["tierstore_store_seconds"]
               if s[0].endswith("_bucket")}
    assert buckets["0.0005"] == 1 and buckets["0.001"] == 2 and buckets["0.005"] == 4
    assert buckets["0.25"] == 5 and buckets["10"] == 5 and buckets["+Inf"] == 6
    assert len(buckets) == len(BUCKETS) + 1
    sums = {s[0]: s[2] for s in parsed["tierstore_store_seconds"] if not s[0].endswith("_bucket")}
    assert sums["tierstore_store_seconds_count"] == 6
    assert sums["tierstore_store_seconds_sum"] == pytest.approx(30.2071)
    events = {s[1]["event"]: s[2] for s in parsed["tierstore_events"]}
    assert events == {"hot_hits": 7, "conflicts": 0}


async def test_timed_records_the_error_class_and_reraises() -> None:
    m = Metrics()

    async def ok() -> int:
        return 3

    async def down() -> int:
        raise TierUnavailable("no answer")

    assert await m.timed("hot", Store(), "get", ok()) == 3
    with pytest.raises(TierUnavailable):
        await m.timed("hot", Store(), "get", down())
    assert m.calls("hot", "get", "ok") == 1 and m.calls("hot", "get", "TierUnavailable") == 1
    assert m.snapshot()["calls"][0]["backend"] == "fake"


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.observe("warm", 'we"ird\\back\nend', "get", 0.01)
    parsed = families(m.render())
    assert parsed["tierstore_store_calls"][0][1]["backend"] == 'we"ird\\back\nend'
