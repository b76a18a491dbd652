"""The pure parts of loadtest/scale.py: sizes, percentiles, flatness, ages, ids, replicas,
the jobs phase's ratios and its arguments."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import CheckpointTuple, empty_checkpoint

from loadtest.scale import (
    JOB_STEPS,
    POSTGRES_LAYOUT,
    SQLITE_LAYOUT,
    Layout,
    Rows,
    Template,
    checkpoint_id_at,
    compare,
    drift_corrected,
    flatness,
    parse_args,
    parse_sizes,
    percentile,
    replica_rows,
    reuse_summary,
    thread_age,
    threads_for,
)
from tierstore.policy import validate_checkpoint_id

NOW = 1_790_000_000.0


def test_sizes_parse_ascending_and_distinct() -> None:
    assert parse_sizes("1e5, 1e4,10000,1e6") == [10_000, 100_000, 1_000_000]
    assert parse_sizes("2000") == [2000]
    for bad in ("", "abc", "0", "1.5", "-1e4", "inf"):
        with pytest.raises(ValueError, match=r"size|whole|no sizes"):
            parse_sizes(bad)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_flatness_is_largest_size_over_smallest() -> None:
    assert flatness({10_000: 2.0, 100_000: 2.2, 1_000_000: 3.0}) == pytest.approx(1.5)
    assert flatness({1_000_000: 3.0, 10_000: 2.0}) == pytest.approx(1.5)
    assert flatness({10_000: 2.0}) is None
    assert flatness({10_000: None, 100_000: 2.0}) is None
    assert flatness({10_000: 1.0, 100_000: None, 1_000_000: 1.1}) == pytest.approx(1.1)


def test_drift_corrected_flatness_divides_out_what_slowed_both_stores() -> None:
    # the machine got twice as slow at 1e6: both stores show it, the store's size adds 10%
    store = {10_000: 1.0, 100_000: 1.0, 1_000_000: 2.2}
    control = {10_000: 1.0, 100_000: 1.0, 1_000_000: 2.0}
    assert flatness(store) == pytest.approx(2.2)
    assert drift_corrected(store, control) == pytest.approx(1.1)
    assert drift_corrected(store, {}) is None
    assert drift_corrected(store, {10_000: 1.0, 1_000_000: None}) is None


def test_thread_ages_cover_the_range_evenly_in_any_prefix() -> None:
    max_age = 120.0
    for count in (100, 1000):
        ages = [thread_age(i, max_age, offset=0.3) for i in range(count)]
        assert all(0 <= a < max_age for a in ages)
        per_decile = [sum(1 for a in ages if d * 12 <= a < (d + 1) * 12) for d in range(10)]
        assert min(per_decile) >= count // 10 - 2, per_decile
        assert max(per_decile) <= count // 10 + 2, per_decile


def test_checkpoint_ids_are_langgraph_v6_ids_ordered_by_time() -> None:
    ids = [checkpoint_id_at(NOW - 3600 + 60 * k, clock_seq=k, node=0xABCDEF) for k in range(5)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    for value in ids:
        assert uuid.UUID(value).version == 6
        assert validate_checkpoint_id(value, NOW) == value
    # the same time on two replicas: the node tells them apart
    assert (checkpoint_id_at(NOW, clock_seq=0, node=1)
            != checkpoint_id_at(NOW, clock_seq=0, node=2))


# -- replicas ---------------------------------------------------------------------------------

T_IDS = ("1f000000-0000-6000-8000-000000000001", "1f000000-0000-6000-8000-000000000002",
         "1f000000-0000-6000-8000-000000000003")
RUNS = ("run-a-0000-0000-0000-000000000000", "run-b-0000-0000-0000-000000000000")


def encode(value: Mapping[str, Any]) -> tuple[str, bytes]:
    return "json", json.dumps(value, sort_keys=True).encode()


def template(layout: Layout) -> Template:
    """Three checkpoints in a chain (two runs), two blobs, a write against the head."""
    key = "sid" if layout is POSTGRES_LAYOUT else "thread_id"
    key_value: Any = 7 if key == "sid" else "template-0"
    head_cols: tuple[str, ...] = (
        "sid", "version", "updated_at", "lease_until", "n_writes", "thread_id", "checkpoint_ns",
        "head_id", "lease_owner", "settled_until", "settled_head")
    if key == "thread_id":
        head_cols = tuple(c for c in head_cols if c != "sid")
    head = {"sid": 7, "version": 41, "updated_at": layout.stamp(NOW), "lease_until": 5.0,
            "n_writes": 1, "thread_id": "template-0", "checkpoint_ns": "", "head_id": T_IDS[2],
            "lease_owner": "w1", "settled_until": 3.0, "settled_head": T_IDS[1]}
    ck_cols = (key, "checkpoint_ns", "created_at", "accessed_at", "size_bytes", "checkpoint_id",
               "parent_id", "run_id", "checkpoint_tag", "checkpoint", "metadata_tag", "metadata",
               "channel_versions", "filter_doc", "archive_key")
    bodies: list[dict[str, Any]] = []
    metadata: list[dict[str, Any]] = []
    ckpts = []
    for k, cid in enumerate(T_IDS):
        run = RUNS[0] if k < 2 else RUNS[1]
        body = {"v": 4, "id": cid, "ts": f"t{k}", "channel_versions": {"messages": f"{k}.x"}}
        md = {"source": "loop", "step": k, "run_id": run}
        bodies.append(body)
        metadata.append(md)
        b_tag, b_data = encode(body)
        m_tag, m_data = encode(md)
        ckpts.append((key_value, "", layout.stamp(NOW + k), None, len(b_data) + len(m_data), cid,
                      T_IDS[k - 1] if k else None, run, b_tag, b_data, m_tag, m_data,
                      json.dumps({"messages": f"{k}.x"}),
                      json.dumps({"run_id": run, "source": "loop", "step": k}), None))
    blob_cols = (key, "checkpoint_ns", "channel", "version", "tag", "data")
    blobs = [(key_value, "", "messages", f"{k}.x", "msgpack", b"m%d" % k) for k in range(2)]
    write_cols = (key, "checkpoint_ns", "idx", "checkpoint_id", "task_id", "channel", "tag",
                  "data", "task_path")
    writes = [(key_value, "", 0, T_IDS[2], "task-1", "messages", "msgpack", b"w", "")]
    return Template(
        thread_id="template-0",
        tables={
            "heads": Rows(head_cols, (tuple(head[c] for c in head_cols),)),
            "checkpoints": Rows(ck_cols, tuple(ckpts)),
            "blobs": Rows(blob_cols, tuple(blobs)),
            "writes": Rows(write_cols, tuple(writes)),
        },
        bodies=tuple(bodies), metadata=tuple(metadata), runs=RUNS, turns=2)


def as_dicts(rows: Rows | list[tuple[Any, ...]], columns: tuple[str, ...]) -> list[dict[str, Any]]:
    seq = rows.rows if isinstance(rows, Rows) else rows
    return [dict(zip(columns, r, strict=True)) for r in seq]


@pytest.mark.parametrize("layout", [POSTGRES_LAYOUT, SQLITE_LAYOUT], ids=["postgres", "sqlite"])
def test_a_replica_is_its_template_under_a_new_thread_with_its_own_ids_times_and_runs(
        layout: Layout) -> None:
    tpl = template(layout)
    head_at = NOW - 10 * 86400
    out = replica_rows(tpl, layout, thread_id="thread-new", sid=501, head_at=head_at,
                       spacing=60.0, runs=["run-x-1111-1111-1111-111111111111",
                                           "run-y-1111-1111-1111-111111111111"],
                       node=0x123456, encode=encode)
    cols = {t: tpl.tables[t].columns for t in tpl.tables}
    heads = as_dicts(out["heads"], cols["heads"])
    ckpts = as_dicts(out["checkpoints"], cols["checkpoints"])
    blobs = as_dicts(out["blobs"], cols["blobs"])
    writes = as_dicts(out["writes"], cols["writes"])
    old = {t: as_dicts(tpl.tables[t], cols[t]) for t in tpl.tables}
    key = layout.keys["checkpoints"][0]
    want_key = 501 if key == "sid" else "thread-new"
    for rows in (heads, ckpts, blobs, writes):
        assert {r[key] for r in rows} == {want_key}
    assert heads[0]["thread_id"] == "thread-new"

    # new ids, time-ordered, one per checkpoint; the chain, the head and the write follow them
    ids = [r["checkpoint_id"] for r in ckpts]
    assert ids == sorted(ids) and len(set(ids)) == 3 and not set(ids) & set(T_IDS)
    assert [r["parent_id"] for r in ckpts] == [None, ids[0], ids[1]]
    assert heads[0]["head_id"] == ids[2]
    assert writes[0]["checkpoint_id"] == ids[2]
    # times: the head at head_at, the others spacing apart; leases and settled marks gone
    stamps = [layout.stamp(head_at - 120), layout.stamp(head_at - 60), layout.stamp(head_at)]
    assert [r["created_at"] for r in ckpts] == stamps
    assert heads[0]["updated_at"] == layout.stamp(head_at)
    for name in ("lease_owner", "lease_until", "settled_head", "settled_until"):
        assert heads[0][name] is None
    if layout.accessed:
        assert [r["accessed_at"] for r in ckpts] == stamps
    # each checkpoint's body names its own new id; its runs are the replica's
    runs = ["run-x-1111-1111-1111-111111111111"] * 2 + ["run-y-1111-1111-1111-111111111111"]
    for k, row in enumerate(ckpts):
        body = json.loads(row["checkpoint"])
        assert body["id"] == ids[k]
        assert {**body, "id": T_IDS[k], "ts": f"t{k}"} == tpl.bodies[k]
        md = json.loads(row["metadata"])
        assert md == {**(tpl.metadata[k] or {}), "run_id": runs[k]}
        assert row["run_id"] == runs[k]
        assert json.loads(row["filter_doc"])["run_id"] == runs[k]
        assert row["size_bytes"] == len(row["checkpoint"]) + len(row["metadata"])
        assert row["channel_versions"] == old["checkpoints"][k]["channel_versions"]
    # everything else is the template's, byte for byte
    assert [{k: v for k, v in r.items() if k != key} for r in blobs] == [
        {k: v for k, v in r.items() if k != key} for r in old["blobs"]]
    assert writes[0]["data"] == b"w" and writes[0]["task_id"] == "task-1"
    assert heads[0]["version"] == 41 and heads[0]["n_writes"] == 1
    # the template itself is untouched
    assert old["checkpoints"][0]["checkpoint_id"] == T_IDS[0]


def test_two_replicas_of_one_template_never_share_a_checkpoint_id() -> None:
    tpl = template(SQLITE_LAYOUT)
    made = [replica_rows(tpl, SQLITE_LAYOUT, thread_id=f"t{n}", sid=None, head_at=NOW,
                         spacing=60.0, runs=list(RUNS), node=node, encode=encode)
            for n, node in enumerate((1, 2))]
    col = tpl.tables["checkpoints"].columns.index("checkpoint_id")
    first, second = ({r[col] for r in m["checkpoints"]} for m in made)
    assert not first & second


def test_a_replica_needs_one_run_id_per_template_run() -> None:
    with pytest.raises(ValueError, match="runs"):
        replica_rows(template(SQLITE_LAYOUT), SQLITE_LAYOUT, thread_id="t", sid=None,
                     head_at=NOW, spacing=60.0, runs=["only-one"], node=1, encode=encode)


def test_threads_for_counts_replicas_until_the_checkpoints_are_held() -> None:
    tpl = template(SQLITE_LAYOUT)  # 3 checkpoints
    assert threads_for([tpl], 0, 1) == 1
    assert threads_for([tpl], 0, 9) == 3
    assert threads_for([tpl], 5, 10) == 4


# -- the read-back check -------------------------------------------------------------------


def _tuple(cid: str, parent: str | None, *, run: str, value: str,
           writes: list[tuple[str, str, Any]] | None = None) -> CheckpointTuple:
    checkpoint = {**empty_checkpoint(), "id": cid, "channel_values": {"messages": value}}
    conf: RunnableConfig = {"configurable": {"thread_id": "t", "checkpoint_ns": "",
                                             "checkpoint_id": cid}}
    parent_conf: RunnableConfig | None = (
        None if parent is None else
        {"configurable": {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": parent}})
    return CheckpointTuple(conf, checkpoint, {"source": "loop", "step": 1, "run_id": run},  # type: ignore[arg-type]
                           parent_conf, writes or [])


def test_compare_accepts_a_faithful_replica_and_names_each_difference() -> None:
    ids = {"a1": "b1", "a2": "b2"}
    want = _tuple("a2", "a1", run="r-template", value="hi", writes=[("task", "ch", 1)])
    good = _tuple("b2", "b1", run="r-replica", value="hi", writes=[("task", "ch", 1)])
    assert compare(want, good, ids, {"r-template"}) == []
    assert compare(want, None, ids, {"r-template"}) == ["missing"]
    assert compare(want, _tuple("b2", "b1", run="r-replica", value="bye",
                                writes=[("task", "ch", 1)]), ids, {"r-template"}) == [
        "checkpoint (channel values, versions)"]
    assert compare(want, _tuple("b2", "b1", run="r-template", value="hi",
                                writes=[("task", "ch", 1)]), ids, {"r-template"}) == [
        "run id 'r-template' is not the replica's own"]
    assert compare(want, _tuple("b2", "a1", run="r-replica", value="hi",
                                writes=[("task", "ch", 1)]), ids, {"r-template"}) == ["parent"]
    assert compare(want, _tuple("b2", "b1", run="r-replica", value="hi"), ids,
                   {"r-template"}) == ["pending writes"]
    wrong_id = _tuple("b1", "b1", run="r-replica", value="hi", writes=[("task", "ch", 1)])
    assert "checkpoint id" in compare(want, wrong_id, ids, {"r-template"})


def _step(name: str, used: int, free: int, *, live: int, stubs: int, threads: int
          ) -> dict[str, Any]:
    return {"step": name, "bytes": used + free, "free": free, "used": used, "dead_rows": 0,
            "live_checkpoints": live, "stubs": stubs, "threads": threads, "seconds": 1.0}


def test_reuse_summary_compares_each_step_with_the_bytes_before_the_jobs() -> None:
    steps = [
        _step(JOB_STEPS[0], 1000, 0, live=100, stubs=0, threads=10),
        _step(JOB_STEPS[1], 1200, 0, live=30, stubs=70, threads=10),  # dead versions
        _step(JOB_STEPS[2], 700, 500, live=30, stubs=70, threads=10),  # VACUUM: 500 free
        _step(JOB_STEPS[3], 1600, 0, live=130, stubs=70, threads=20),  # 400 more bytes
        _step(JOB_STEPS[4], 1800, 0, live=60, stubs=140, threads=20),
        _step(JOB_STEPS[5], 1400, 400, live=60, stubs=140, threads=20),
    ]
    summary = reuse_summary(steps)
    assert summary["after_jobs"] == pytest.approx(1.2)
    assert summary["after_vacuum"] == pytest.approx(1.2)
    assert summary["used_after_vacuum"] == pytest.approx(0.7)
    assert summary["new_history_growth"] == pytest.approx(0.4)
    assert summary["second_round"] == pytest.approx(1800 / 1200)
    assert summary["threads_ratio"] == pytest.approx(2.0)
    assert summary["history_ratio"] == pytest.approx(2.0)
    assert summary["live_ratio"] == pytest.approx(2.0)
    assert reuse_summary(steps[:5]) == {}  # an unfinished phase has no ratios


def test_jobs_at_must_be_the_largest_size(capsys: pytest.CaptureFixture[str]) -> None:
    settings, _ = parse_args(["--sizes", "1e4,1e5", "--jobs-at", "1e5"])
    assert settings.jobs_at == 100_000
    assert parse_args(["--sizes", "1e4"])[0].jobs_at is None
    with pytest.raises(SystemExit):
        parse_args(["--sizes", "1e4,1e5", "--jobs-at", "1e4"])
    assert "largest" in capsys.readouterr().err
