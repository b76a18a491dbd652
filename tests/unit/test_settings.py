"""One resolver for every way of naming a saver's stores: precedence and checks.

``resolve_spec`` is handed its environment, so nothing here depends on the process's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tierstore import ConfigurationError, TieredSaver
from tierstore.settings import (
    DEFAULT_COLD_URL,
    DEFAULT_HOT_URL,
    DEFAULT_REGION,
    DEFAULT_WARM_URL,
    RegionTable,
    SaverOptions,
    StackSpec,
    resolve_options,
    resolve_spec,
)

TABLE = """
default_region = "eu"
[[rules]]
match = "us-*"
region = "us"
[regions.eu]
hot = "memory://"
warm = "sqlite:///eu.db"
cold = "none"
[regions.us]
warm = "postgresql://app:${US_PASSWORD}@pg-us/ts"
"""


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "regions.toml"
    path.write_text(TABLE)
    return path


def urls(spec: StackSpec, region: str = DEFAULT_REGION) -> tuple[str | None, ...]:
    tiers = spec.regions[region]
    return tuple(None if url is None else url.raw for url in (tiers.hot, tiers.warm, tiers.cold))


# -- precedence: flag or argument > environment > embedded default -----------------------


def test_nothing_given_is_the_embedded_stack() -> None:
    spec = resolve_spec(environ={})
    assert list(spec.regions) == [DEFAULT_REGION]
    assert urls(spec) == (DEFAULT_HOT_URL, DEFAULT_WARM_URL, DEFAULT_COLD_URL)
    assert spec.options == SaverOptions()
    assert spec.region_of("anyone") == DEFAULT_REGION


def test_the_environment_wins_over_the_defaults_tier_by_tier() -> None:
    spec = resolve_spec(environ={"TIERSTORE_WARM_URL": "sqlite:///env.db",
                                 "TIERSTORE_COLD_URL": "none"})
    assert urls(spec) == (DEFAULT_HOT_URL, "sqlite:///env.db", None)


def test_a_flag_wins_over_the_environment_tier_by_tier() -> None:
    env = {"TIERSTORE_HOT_URL": "redis://env", "TIERSTORE_WARM_URL": "sqlite:///env.db",
           "TIERSTORE_COLD_URL": "file:///env"}
    assert urls(resolve_spec(warm="sqlite:///flag.db", environ=env)) == (
        "redis://env", "sqlite:///flag.db", "file:///env")
    assert urls(resolve_spec(hot="none", cold="", environ=env)) == (
        None, "sqlite:///env.db", None)


def test_options_given_win_over_the_environment() -> None:
    env = {"TIERSTORE_HOT_TTL": "15m", "TIERSTORE_CONCURRENCY": "strict"}
    spec = resolve_spec(options={"concurrency": "permissive"}, environ=env)
    assert (spec.options.hot_ttl, spec.options.concurrency) == (900.0, "permissive")


def test_a_region_table_from_the_environment_wins_over_url_variables(table: Path) -> None:
    env = {"TIERSTORE_REGIONS_FILE": str(table), "TIERSTORE_WARM_URL": "sqlite:///env.db",
           "US_PASSWORD": "pw"}
    spec = resolve_spec(environ=env)
    assert set(spec.regions) == {"eu", "us"}
    assert urls(spec, "eu") == ("memory://", "sqlite:///eu.db", None)
    assert urls(spec, "us") == (None, "postgresql://app:pw@pg-us/ts", None)
    assert [spec.region_of(t) for t in ("us-1", "x")] == ["us", "eu"]


def test_a_url_flag_wins_over_a_region_table_from_the_environment(table: Path) -> None:
    spec = resolve_spec(warm="sqlite:///flag.db",
                        environ={"TIERSTORE_REGIONS_FILE": str(table)})
    assert list(spec.regions) == [DEFAULT_REGION]
    assert urls(spec)[1] == "sqlite:///flag.db"


def test_one_region_of_a_table_keeps_the_whole_placement(table: Path) -> None:
    spec = resolve_spec(regions_file=table, region="eu", environ={})  # no US secret needed
    assert set(spec.regions) == {"eu"}
    assert spec.region_of("us-1") == "us"  # refused by name when used, never misplaced


def test_secrets_come_from_the_environment_given(table: Path) -> None:
    spec = StackSpec.of_table(RegionTable.from_file(table), environ={"US_PASSWORD": "s3cr3t"})
    assert urls(spec, "us")[1] == "postgresql://app:s3cr3t@pg-us/ts"
    assert "s3cr3t" not in repr(spec)  # a spec can be logged


def test_a_resolver_wins_over_rules_and_default() -> None:
    spec = StackSpec.of_regions({"eu": {"warm": "sqlite:///eu.db"}}, rules=[("*", "eu")],
                                default_region="eu", resolver=lambda thread: None)
    assert spec.region_of("anything") is None


def test_options_are_taken_whole_or_by_name() -> None:
    options = SaverOptions(hot_ttl=5.0)
    assert resolve_options(options) is options
    assert resolve_options({"hot_ttl": 5.0}) == options
    assert resolve_options(None) == SaverOptions()


def test_a_saver_is_built_from_a_spec_without_connecting(tmp_path: Path) -> None:
    spec = StackSpec.single(hot=None, warm=f"sqlite:///{tmp_path}/w.db", cold=None,
                            options={"hot_write_delay": 0})
    saver = TieredSaver.from_spec(spec)
    assert saver.options.hot_write_delay == 0 and saver.state == "unopened"
    assert not (tmp_path / "w.db").exists()


# -- every rule, refused by name ---------------------------------------------------------

Build = Callable[[Path], Any]

REFUSED: list[tuple[str, Build, str]] = [
    ("flags-and-table", lambda t: resolve_spec(regions_file=t, warm="sqlite:///x.db",
                                               environ={}), "not both"),
    ("region-without-table", lambda t: resolve_spec(region="eu", environ={}),
     "--region needs a region table"),
    ("region-not-in-table", lambda t: resolve_spec(regions_file=t, region="mars", environ={}),
     "unknown region 'mars'"),
    ("table-unreadable", lambda t: resolve_spec(regions_file=t.parent / "nope.toml",
                                                environ={}), "cannot read it"),
    ("table-secret-unset", lambda t: resolve_spec(regions_file=t, environ={}),
     "${US_PASSWORD} is not set"),
    ("warm-variable-disabled", lambda t: resolve_spec(environ={"TIERSTORE_WARM_URL": "none"}),
     "TIERSTORE_WARM_URL cannot be disabled"),
    ("warm-flag-disabled", lambda t: resolve_spec(warm="none", environ={}),
     "a warm tier is required"),
    ("option-variable-malformed",
     lambda t: resolve_spec(environ={"TIERSTORE_HOT_TTL": "soon"}), "not a duration"),
    ("option-variable-out-of-range",
     lambda t: resolve_spec(environ={"TIERSTORE_OFFLOAD_THRESHOLD": "10"}),
     "offload_threshold must be at least 1024"),
    ("option-unknown", lambda t: resolve_spec(options={"hot_tll": 1}, environ={}),
     "unknown saver option(s): hot_tll"),
    ("warm-none", lambda t: StackSpec.single(warm=None), "a warm tier is required"),
    ("url-empty", lambda t: StackSpec.single(hot=""), "must be a non-empty string"),
    ("url-without-scheme", lambda t: StackSpec.single(cold="archive"), "has no scheme"),
    ("url-repeats-a-parameter", lambda t: StackSpec.single(hot="redis://h?a=1&a=2"),
     "repeats query parameter 'a'"),
    ("regions-not-a-mapping", lambda t: StackSpec.of_regions("eu"),  # type: ignore[arg-type]
     "regions must map region names"),
    ("region-not-a-mapping",
     lambda t: StackSpec.of_regions({"eu": "sqlite:///x.db"}),  # type: ignore[dict-item]
     "region 'eu' must be a name mapped"),
    ("rules-not-a-sequence",
     lambda t: StackSpec.of_regions({"eu": {"warm": "sqlite:///x.db"}},
                                    rules="eu-*"),  # type: ignore[arg-type]
     "rules must be a sequence"),
    ("rule-not-a-pair",
     lambda t: StackSpec.of_regions({"eu": {"warm": "sqlite:///x.db"}},
                                    rules=[("eu-*",)]),  # type: ignore[list-item]
     "rule 0 must be a (glob, region) pair"),
    ("default-not-a-name",
     lambda t: StackSpec.of_regions({"eu": {"warm": "sqlite:///x.db"}},
                                    default_region=1),  # type: ignore[arg-type]
     "default_region must be a region name"),
    ("resolver-not-callable",
     lambda t: StackSpec.of_regions({"eu": {"warm": "sqlite:///x.db"}},
                                    resolver="eu"),  # type: ignore[arg-type]
     "resolver must be a callable"),
    ("no-region", lambda t: StackSpec.of_regions({}), "needs at least one region"),
    ("rule-names-unknown-region",
     lambda t: StackSpec.of_regions({"eu": {"warm": "sqlite:///x.db"}}, rules=[("us-*", "us")]),
     "rule 'us-*' names unknown region 'us'"),
    ("default-names-unknown-region",
     lambda t: StackSpec.of_regions({"eu": {"warm": "sqlite:///x.db"}}, default_region="us"),
     "default_region 'us' is not a region"),
    ("region-without-warm", lambda t: StackSpec.of_regions({"eu": {"hot": "memory://"}}),
     "region 'eu' needs a warm URL"),
    ("region-unknown-tier",
     lambda t: StackSpec.of_regions({"eu": {"warm": "sqlite:///x.db", "tepid": "x://"}}),
     "takes only hot/warm/cold"),
    ("table-rule-names-unknown-region",
     lambda t: StackSpec.of_table(RegionTable(regions={"eu": {"warm": "sqlite:///x.db"}},
                                              rules=(("us-*", "us"),))),
     "rule 'us-*' names unknown region 'us'"),
]


@pytest.mark.parametrize(("build", "fragment"), [(b, f) for _, b, f in REFUSED],
                         ids=[name for name, _, _ in REFUSED])
def test_each_rule_is_refused_by_name(table: Path, build: Build, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build(table)
    assert type(info.value) is ConfigurationError
    assert fragment in str(info.value)


def test_the_compression_dictionary_can_be_turned_off_and_only_a_shipped_one_on() -> None:
    assert SaverOptions().compression_dictionary == "d1"
    for off in ("none", "None", ""):
        spec = resolve_spec(environ={"TIERSTORE_COMPRESSION_DICTIONARY": off})
        assert spec.options.compression_dictionary is None
    assert resolve_options({"compression_dictionary": None}).compression_dictionary is None
    for bad in ("d2", "zstd", 1):
        with pytest.raises(ConfigurationError, match="compression_dictionary"):
            SaverOptions(compression_dictionary=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="compression_dictionary"):
        resolve_spec(environ={"TIERSTORE_COMPRESSION_DICTIONARY": "d9"})


async def test_a_saver_without_the_dictionary_writes_plain_zstd_and_reads_both(
        tmp_path: Path) -> None:
    import sqlite3

    from langchain_core.messages import AIMessage
    from langgraph.checkpoint.base import empty_checkpoint

    warm = f"sqlite:///{tmp_path}/w.db"
    text = "a reply long enough to be compressed, " * 20

    async def put(saver: TieredSaver, thread: str) -> None:
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"messages": [AIMessage(text, id="m1")]}
        checkpoint["channel_versions"] = {"messages": f"{1:032}.0"}
        await saver.aput({"configurable": {"thread_id": thread, "checkpoint_ns": ""}},
                         checkpoint, {"source": "loop", "step": 0},
                         {"messages": f"{1:032}.0"})

    async with TieredSaver.from_urls(hot=None, warm=warm, cold=None) as saver:
        await put(saver, "with")
    async with TieredSaver.from_urls(hot=None, warm=warm, cold=None,
                                     compression_dictionary=None) as saver:
        await put(saver, "without")
        for thread in ("with", "without"):  # both read back, whichever wrote them
            got = await saver.aget_tuple({"configurable": {"thread_id": thread}})
            assert got is not None
            assert got.checkpoint["channel_values"]["messages"][0].content == text
    with sqlite3.connect(tmp_path / "w.db") as db:
        tags = dict(db.execute(
            "SELECT thread_id, group_concat(tag) FROM blobs GROUP BY thread_id"))
    assert "zstd.d1" in tags["with"] and "zstd.d1" not in tags["without"]
    assert "zstd" in tags["without"]
