"""Region tables read from TOML: placement rules, ${VAR} secrets, one-region views."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierstore import ConfigurationError
from tierstore.policy import resolve_region
from tierstore.settings import RegionTable, regions_file_from_env

GOOD = """
default_region = "eu"
[[rules]]
match = "us-*"
region = "us"
[[rules]]
match = "tenant:acme:*"
region = "us"
[regions.eu]
warm = "postgresql://app:${PG_EU_PASSWORD}@pg-eu/ts"
hot = "redis://redis-eu:6379/0"
[regions.us]
warm = "sqlite:///us.db"
hot = "none"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "regions.toml"
    path.write_text(text)
    return path


def test_a_table_reads_rules_urls_and_secrets_from_the_environment(tmp_path: Path) -> None:
    table = RegionTable.from_file(write(tmp_path, GOOD))
    urls = table.served_urls({"PG_EU_PASSWORD": "s3cr3t"})
    assert urls["eu"] == {"hot": "redis://redis-eu:6379/0",
                          "warm": "postgresql://app:s3cr3t@pg-eu/ts", "cold": None}
    assert urls["us"] == {"hot": None, "warm": "sqlite:///us.db", "cold": None}
    assert table.rules == (("us-*", "us"), ("tenant:acme:*", "us"))
    assert [resolve_region(t, table.rules, table.default_region)
            for t in ("us-1", "tenant:acme:42", "x")] == ["us", "us", "eu"]
    assert table.serves is None and table.only("us").serves == frozenset({"us"})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[regions.eu]\nhot = 'redis://x'\n", "needs a warm URL"),
        ("[regions.eu]\nwarm = 'sqlite:///x.db'\n[[rules]]\nmatch = 'x'\nregion = 'us'\n",
         "unknown region 'us'"),
        ("default_region = 'mars'\n[regions.eu]\nwarm = 'sqlite:///x.db'\n", "'mars'"),
        ("[regions.eu]\nwarm = 'sqlite:///x.db'\nlukewarm = 'x'\n", "takes hot, warm and cold"),
        ("[regions.eu]\nwarm = 'sqlite:///x.db'\n[[rules]]\nmatch = 'x'\n", "rule 1 must be"),
        ("regions = 1\n", "[regions.<name>]"),
        ("colour = 'blue'\n[regions.eu]\nwarm = 'sqlite:///x.db'\n", "unknown keys"),
        ("[regions.eu\n", "not valid TOML"),
    ],
)
def test_bad_tables_are_refused_with_the_reason(tmp_path: Path, text: str,
                                                fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RegionTable.from_file(write(tmp_path, text))
    assert fragment in str(info.value)


def test_secrets_are_needed_only_for_the_regions_served(tmp_path: Path) -> None:
    table = RegionTable.from_file(write(tmp_path, GOOD))
    with pytest.raises(ConfigurationError, match=r"region 'eu' warm URL: \$\{PG_EU_PASSWORD\}"):
        table.served_urls({})
    assert set(table.only("us").served_urls({})) == {"us"}


def test_unknown_region_and_unreadable_file(tmp_path: Path) -> None:
    table = RegionTable.from_file(write(tmp_path, GOOD))
    with pytest.raises(ConfigurationError, match="unknown region 'mars'"):
        table.only("mars")
    with pytest.raises(ConfigurationError, match="cannot read it"):
        RegionTable.from_file(tmp_path / "missing.toml")


def test_the_table_file_comes_from_one_variable() -> None:
    assert regions_file_from_env({"TIERSTORE_REGIONS_FILE": " r.toml "}) == "r.toml"
    assert regions_file_from_env({}) is None
