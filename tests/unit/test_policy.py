"""Pure decisions: ids, versions, filters, hot freshness, URLs and options."""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import replace
from typing import Any

import pytest

from tierstore.codec.pipeline import EMPTY
from tierstore.errors import ConfigurationError, InvalidInput
from tierstore.policy import (
    MAX_ID_BYTES,
    before_checkpoint_id,
    chain_writes,
    checked_channel_name,
    checked_checkpoint,
    checked_metadata,
    checked_versions,
    checked_writes,
    checkpoint_ids,
    discards_pending_tasks,
    filter_doc,
    is_hot_fresh,
    matches_filter,
    next_channel_version,
    should_replace_hot,
    split_filter,
    supply_blobs,
    validate_id,
    write_index,
)
from tierstore.records import BlobRecord, Head, Payload, StoredCheckpoint, WriteRecord
from tierstore.settings import SaverOptions, StoreUrl, mask, options_from_env, urls_from_env


def test_validate_id_accepts_text_ints_and_uuids() -> None:
    u = uuid.uuid4()
    assert validate_id(u) == str(u)
    assert validate_id(12) == "12"
    assert validate_id("线程 / * ..") == "线程 / * .."
    assert validate_id("x" * MAX_ID_BYTES) == "x" * MAX_ID_BYTES


@pytest.mark.parametrize("bad", ["", "a\x00b", "\udc80", None, True, 1.5, b"x",
                                 "x" * (MAX_ID_BYTES + 1)])
def test_validate_id_refuses(bad: object) -> None:
    with pytest.raises(InvalidInput):
        validate_id(bad)


def test_checkpoint_ids_reads_a_config() -> None:
    assert checkpoint_ids({"configurable": {"thread_id": "t"}}) == ("t", "", None)
    assert checkpoint_ids(
        {"configurable": {"thread_id": "t", "checkpoint_ns": "a:b", "checkpoint_id": "c"}}
    ) == ("t", "a:b", "c")
    with pytest.raises(InvalidInput, match="thread_id"):
        checkpoint_ids({"configurable": {"checkpoint_id": "c"}})


def test_channel_versions_increase_and_sort_as_text() -> None:
    v1 = next_channel_version(None)
    v2 = next_channel_version(v1)
    v3 = next_channel_version(7)
    assert v1 < v2 < v3
    assert int(v2.split(".")[0]) == 2 and int(v3.split(".")[0]) == 8
    assert next_channel_version(v1) != next_channel_version(v1)  # racing writers differ
    random.seed(7)
    one = next_channel_version(v1)
    random.seed(7)  # replicas of an app that seeds the random module alike
    assert next_channel_version(v1) != one
    # LangGraph's savers read the counter as int(version.split(".")[0])
    assert re.fullmatch(r"0{31}1\.[0-9a-z]{10}", v1)
    old = "00000000000000000000000000000007.0.8348112871893528"  # LangGraph's own form
    assert next_channel_version(old).startswith(f"{8:032}.") and next_channel_version(old) > old


def test_special_writes_take_fixed_negative_indices() -> None:
    assert write_index("__error__", 3) == -1
    assert write_index("__interrupt__", 0) == -3
    assert write_index("messages", 4) == 4


def test_filters_split_and_match_with_json_types() -> None:
    pushdown, residual = split_filter({"source": "loop", "step": 1, "parents": {}})
    assert pushdown == {"source": "loop", "step": 1} and residual == {"parents": {}}
    md = {"source": "loop", "step": 1, "flag": True, "score": None, "parents": {"": "x"}}
    assert filter_doc(md) == {"source": "loop", "step": 1, "flag": True, "score": None}
    assert matches_filter(md, {"step": 1, "parents": {"": "x"}})
    assert not matches_filter(md, {"step": True})
    assert not matches_filter(md, {"flag": 1})
    assert not matches_filter(md, {"step": "1"})
    assert matches_filter(md, {"score": None})
    assert not matches_filter(md, {"missing": None})


def _cached(cid: str, n_writes: int, version: int = 5) -> StoredCheckpoint:
    writes = tuple(WriteRecord(f"t{i}", 0, "c", Payload("m", b""), "") for i in range(n_writes))
    return StoredCheckpoint("t", "", cid, None, Payload("m", b""), Payload("m", b""), {}, writes,
                            version=version)


def _interrupt(answer: bytes, version: int) -> StoredCheckpoint:
    write = WriteRecord("node", -3, "__interrupt__", Payload("m", answer), "")
    return replace(_cached("c2", 0, version), writes=(write,))


def test_hot_is_fresh_only_when_warm_agrees() -> None:
    assert is_hot_fresh(_cached("c2", 1), Head("c2", 5, 1))
    assert not is_hot_fresh(_cached("c2", 1), Head("c3", 6, 0))  # newer head elsewhere
    assert not is_hot_fresh(_cached("c2", 0), Head("c2", 5, 1))  # a write never reached hot
    assert not is_hot_fresh(_cached("c2", 0), None)  # thread deleted


def test_hot_is_not_fresh_when_a_write_replaced_another() -> None:
    """Negative-index writes replace each other: the count stays, the version moves."""
    assert not is_hot_fresh(_interrupt(b"answer-1", 5), Head("c2", 6, 1))
    assert is_hot_fresh(_interrupt(b"answer-2", 6), Head("c2", 6, 1))


def test_hot_copy_of_unknown_or_other_version_is_never_fresh() -> None:
    assert not is_hot_fresh(_cached("c2", 0, version=0), Head("c2", 0, 0))
    assert not is_hot_fresh(_cached("c2", 0, version=4), Head("c2", 5, 0))  # archived since
    assert not is_hot_fresh(_cached("c2", 0, version=6), Head("c2", 5, 0))  # recreated


def test_hot_replacement_rule() -> None:
    assert should_replace_hot(None, _cached("c1", 0, 1))
    assert should_replace_hot(_cached("c1", 3, 1), _cached("c2", 0, 2))
    assert not should_replace_hot(_cached("c2", 0, 2), _cached("c1", 5, 1))
    assert should_replace_hot(_cached("c2", 1, 2), _cached("c1", 0, 3))  # head moved back
    assert not should_replace_hot(_cached("c2", 1, 2), _cached("c2", 1, 2))
    assert not should_replace_hot(_cached("c2", 2, 2), _cached("c2", 1, 1))


def test_an_older_flush_never_replaces_a_newer_entry_with_the_same_count() -> None:
    assert not should_replace_hot(_interrupt(b"answer-2", 7), _interrupt(b"answer-1", 6))
    assert should_replace_hot(_interrupt(b"answer-1", 6), _interrupt(b"answer-2", 7))
    assert not should_replace_hot(None, _cached("c1", 0, version=0))  # unknown version


def test_chain_writes_merges_only_onto_the_previous_version() -> None:
    write = WriteRecord("node", -3, "__interrupt__", Payload("m", b"answer-2"), "")
    base = _interrupt(b"answer-1", 6)
    merged = chain_writes(base, "c2", [write], 7)
    assert merged is not None and merged.version == 7 and merged.writes == (write,)
    assert chain_writes(base, "c2", [write], 8) is None  # a change in between is missing
    assert chain_writes(base, "c2", [write], 6) is None
    assert chain_writes(base, "c3", [write], 7) is None  # another checkpoint
    assert chain_writes(base, "c2", [write], None) is None  # not the head in warm
    assert chain_writes(None, "c2", [write], 7) is None
    assert chain_writes(replace(base, version=0), "c2", [write], 1) is None


def test_store_url_parsing_and_masking() -> None:
    url = StoreUrl.parse("postgresql://user:s3cret@db.example:5433/app?max_size=5")
    assert (url.scheme, url.host, url.port, url.path) == ("postgresql", "db.example", 5433, "/app")
    assert url.option("max_size") == "5"
    assert "s3cret" not in repr(url) and "s3cret" not in url.masked
    assert mask("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert StoreUrl.parse("sqlite:///rel/w.db").local_path() == "rel/w.db"
    assert StoreUrl.parse("sqlite:////abs/w.db").local_path() == "/abs/w.db"
    assert StoreUrl.parse("file:///abs/cold").local_path() == "/abs/cold"
    assert StoreUrl.parse("file://./rel/cold").local_path() == "./rel/cold"
    with pytest.raises(ConfigurationError, match="repeats"):
        StoreUrl.parse("redis://h?a=1&a=2")
    with pytest.raises(ConfigurationError, match="no host"):
        StoreUrl.parse("sqlite://host/x.db").local_path()


def test_options_validate_and_read_the_environment() -> None:
    assert SaverOptions().concurrency == "permissive"
    with pytest.raises(ConfigurationError):
        SaverOptions(offload_threshold=10)
    env = {"TIERSTORE_HOT_TTL": "15m", "TIERSTORE_CONCURRENCY": "strict",
           "TIERSTORE_HOT_URL": "none", "TIERSTORE_WARM_URL": "sqlite:///x.db"}
    assert options_from_env(env) == {"hot_ttl": 900.0, "concurrency": "strict"}
    assert urls_from_env(env)["hot"] is None
    assert urls_from_env(env)["warm"] == "sqlite:///x.db"
    assert urls_from_env({})["cold"] == "file://./.tierstore/cold"
    with pytest.raises(ConfigurationError, match="warm"):
        urls_from_env({"TIERSTORE_WARM_URL": ""})
    with pytest.raises(ConfigurationError, match="duration"):
        options_from_env({"TIERSTORE_HOT_TTL": "soon"})


def test_mongo_urls_may_name_several_hosts_and_repeat_options() -> None:
    url = StoreUrl.parse("mongodb://u:pw@h1:27017,h2/db?readPreferenceTags=a:1&readPreferenceTags=b:2")
    assert (url.scheme, url.path, url.host) == ("mongodb", "/db", None)
    assert "pw" not in repr(url)
    with pytest.raises(ConfigurationError, match="repeats"):
        StoreUrl.parse("postgresql://h/db?sslmode=a&sslmode=b")


def test_values_no_store_can_hold_stay_out_of_filter_docs_and_filters() -> None:
    md = {"step": 1 << 70, "low": -(1 << 63), "nan": float("nan"), "inf": float("inf"),
          "text": "\ud800", "nul": "a\x00b", "ok": 1.5, 3: "int key", "\udc00": 1}
    assert filter_doc(md) == {"low": -(1 << 63), "ok": 1.5}
    for bad in ({"step": 1 << 63}, {"x": float("nan")}, {"x": float("-inf")}, {"x": "\ud800"},
                {1: "x"}, {"\ud800": 1}):
        with pytest.raises(InvalidInput):
            split_filter(bad)
    assert split_filter({"step": (1 << 63) - 1}) == ({"step": (1 << 63) - 1}, {})


def test_malformed_checkpoints_and_writes_name_the_bad_part() -> None:
    good = {"id": "x", "channel_values": {"a": 1}, "channel_versions": {"a": 2}}
    assert checked_checkpoint(good) == good and checked_checkpoint(good) is not good
    assert checked_versions({"a": 2, "b": "3", "c": 1.5}) == {"a": "2", "b": "3", "c": "1.5"}
    assert checked_writes([("a", 1), ["b", None]]) == [("a", 1), ("b", None)]
    assert checked_writes(()) == []
    cases: list[tuple[Any, Any, str]] = [
        (checked_checkpoint, [], "checkpoint must be a dict"),
        (checked_checkpoint, {"channel_values": []}, "channel_values"),
        (checked_checkpoint, {"channel_versions": "a"}, "channel_versions"),
        (checked_checkpoint, {"channel_values": {1: "x"}}, "channel name"),
        (checked_versions, {"a": None}, "version of channel 'a'"),
        (checked_versions, {"a": True}, "version of channel 'a'"),
        (checked_versions, {"a\x00": "1"}, "channel name"),
        (checked_metadata, None, "metadata"),
        (checked_writes, "ab", "writes"),
        (checked_writes, {"a": 1}, "writes"),
        (checked_writes, [("a", 1), "ab"], "write 1"),
        (checked_writes, [("a", 1, 2)], "write 0"),
        (checked_writes, [(None, 1)], "write 0 channel"),
        (checked_writes, [("\ud800", 1)], "write 0 channel"),
    ]
    for fn, value, fragment in cases:
        with pytest.raises(InvalidInput, match=re.escape(fragment)):
            fn(value)


@pytest.mark.parametrize("name", ["~0~items", "~1~items", "~9999~x", "~0~", "~3~~0~a",
                                  "~0~line\nbreak"])
def test_a_channel_named_like_a_delta_link_is_refused(name: str) -> None:
    """The stores tell a chain's links from channels by the name alone (``codec.chain``):
    a channel of that form would read as a lost link, or as part of another channel."""
    for call in (lambda: checked_versions({"a": "1", name: "2"}),
                 lambda: checked_checkpoint({"channel_values": {name: [1]},
                                             "channel_versions": {"a": "1"}}),
                 lambda: checked_checkpoint({"channel_versions": {name: 1}})):
        with pytest.raises(InvalidInput, match=re.escape(repr(name)) + ".*reserves"):
            call()


@pytest.mark.parametrize("name", ["items", "~items", "~~items", "~01~items", "~10000~items",
                                  "~a~items", "~1items", "x~0~items", " ~0~items", "~-1~x"])
def test_names_that_only_resemble_a_link_are_channels(name: str) -> None:
    assert checked_channel_name(name) == name
    assert checked_versions({name: "1"}) == {name: "1"}


def test_supply_blobs_stores_missing_versions_from_the_checkpoints_values() -> None:
    new = [BlobRecord("notes", "3", Payload("msgpack", b"n3"))]
    values = {"notes": Payload("msgpack", b"n3"), "profile": Payload("msgpack", b"ada")}
    out = supply_blobs([("profile", "1"), ("branch:to:x", "2"), ("notes", "3")], values, new)
    assert out == [
        new[0],
        BlobRecord("profile", "1", Payload("msgpack", b"ada")),
        BlobRecord("branch:to:x", "2", EMPTY),  # no value: the channel is empty there
    ]


def test_an_input_that_marks_pending_tasks_seen_discards_them() -> None:
    settled = {"__input__": {}, "__start__": {"__start__": "1"}, "plan": {"branch:to:plan": "2"}}
    # a new turn on a settled head only adds the input's own empty entry
    assert not discards_pending_tasks(settled, {**settled, "__input__": {}}, ())
    # a new turn on a head whose `respond` step is pending marks it seen: a discard
    cut_in = {**settled, "respond": {"branch:to:respond": "3"}}
    assert discards_pending_tasks(settled, cut_in, ())
    moved = {**settled, "plan": {"branch:to:plan": "4"}}
    assert discards_pending_tasks(settled, moved, ())
    # a head paused on interrupt() or left by an error: its run stopped, moving on is allowed
    assert not discards_pending_tasks(settled, cut_in, ("__interrupt__",))
    assert not discards_pending_tasks(settled, cut_in, ("messages", "__error__"))
    assert discards_pending_tasks(settled, cut_in, ("messages",))


def test_head_versions_start_at_the_clock_and_tombstones_cover_what_was_deleted() -> None:
    from tierstore.policy import first_version, tombstone_version

    assert first_version(1_700_000_000.25) == 1_700_000_000_250_000
    assert first_version(1.0) < first_version(1.000001)
    # a delete's floor is above the versions it saw and below a later recreation's
    floor = tombstone_version(100.0, deleted=first_version(99.0) + 7)
    assert floor == first_version(100.0) < first_version(100.5)
    assert tombstone_version(100.0, deleted=first_version(101.0)) == first_version(101.0)


def test_before_takes_a_config_or_the_agent_servers_checkpoint() -> None:
    assert before_checkpoint_id({"configurable": {"checkpoint_id": "c1"}}) == "c1"
    # POST /threads/{id}/history hands the API's checkpoint object through as it came
    assert before_checkpoint_id(
        {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": "c1"}) == "c1"
    assert before_checkpoint_id(None) is None
    for bad in ({}, "c1", {"checkpoint_id": 1}, {"configurable": "c1"}):
        with pytest.raises(InvalidInput, match="before"):
            before_checkpoint_id(bad)
