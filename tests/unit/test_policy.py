"""Pure decisions: ids, versions, filters, hot freshness, URLs and options."""

from __future__ import annotations

import uuid

import pytest

from tierstore.errors import ConfigurationError, InvalidInput
from tierstore.policy import (
    MAX_ID_BYTES,
    checkpoint_ids,
    discards_pending_tasks,
    filter_doc,
    is_hot_fresh,
    matches_filter,
    next_channel_version,
    should_replace_hot,
    split_filter,
    validate_id,
    write_index,
)
from tierstore.records import Head, Payload, StoredCheckpoint, WriteRecord
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


def _cached(cid: str, n_writes: int) -> StoredCheckpoint:
    writes = tuple(WriteRecord(f"t{i}", 0, "c", Payload("m", b""), "") for i in range(n_writes))
    return StoredCheckpoint("t", "", cid, None, Payload("m", b""), Payload("m", b""), {}, writes)


def test_hot_is_fresh_only_when_warm_agrees() -> None:
    assert is_hot_fresh(_cached("c2", 1), Head("c2", 5, 1))
    assert not is_hot_fresh(_cached("c2", 1), Head("c3", 6, 0))  # newer head elsewhere
    assert not is_hot_fresh(_cached("c2", 0), Head("c2", 5, 1))  # a write never reached hot
    assert not is_hot_fresh(_cached("c2", 0), None)  # thread deleted


def test_hot_replacement_rule() -> None:
    assert should_replace_hot(None, _cached("c1", 0))
    assert should_replace_hot(_cached("c1", 3), _cached("c2", 0))
    assert not should_replace_hot(_cached("c2", 0), _cached("c1", 5))
    assert should_replace_hot(_cached("c2", 1), _cached("c2", 1))
    assert not should_replace_hot(_cached("c2", 2), _cached("c2", 1))


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
