"""The one open/close state machine every store and the saver share."""

from __future__ import annotations

import pytest

from tierstore.errors import LifecycleError
from tierstore.lifecycle import Lifecycle


def test_a_store_opens_once_and_setup_is_idempotent() -> None:
    life = Lifecycle("test store")
    assert life.state == "unopened"
    assert life.begin() is True
    assert life.state == "opening"
    life.opened()
    assert life.is_open
    assert life.begin() is False  # a second setup() has nothing to do
    life.require()


def test_a_failed_open_can_be_retried() -> None:
    life = Lifecycle("test store")
    life.begin()
    life.failed()
    assert life.state == "unopened"
    assert life.begin() is True


def test_a_second_open_while_one_is_under_way_is_refused() -> None:
    life = Lifecycle("test store")
    life.begin()
    with pytest.raises(LifecycleError, match="already being opened"):
        life.begin()


def test_a_closed_store_is_never_reopened() -> None:
    life = Lifecycle("test store", closed_hint="build a new store")
    life.begin()
    life.opened()
    assert life.close() is True
    assert life.close() is False  # aclose is idempotent: release things once
    with pytest.raises(LifecycleError, match="closed and cannot be reopened; build a new store"):
        life.begin()


def test_closing_before_opening_still_forbids_opening() -> None:
    life = Lifecycle("test store")
    assert life.close() is True
    with pytest.raises(LifecycleError, match="closed"):
        life.begin()


def test_a_close_racing_an_open_wins() -> None:
    life = Lifecycle("test store")
    life.begin()
    life.close()
    life.opened()
    assert life.is_closed
    life.failed()
    assert life.is_closed


def test_use_outside_the_open_state_names_the_store_and_the_remedy() -> None:
    life = Lifecycle("sqlite warm tier x.db")
    with pytest.raises(LifecycleError, match=r"x.db is not open \(get\); call setup\(\) first"):
        life.require("get")
    life.begin()
    with pytest.raises(LifecycleError, match="not open"):
        life.require()
    life.opened()
    life.close()
    with pytest.raises(LifecycleError, match=r"x\.db is closed; build a new one"):
        life.require()
