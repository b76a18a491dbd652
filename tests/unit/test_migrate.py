"""What every migration runner shares: pending migrations, their order, SQL splitting."""

from __future__ import annotations

import pytest

from tierstore.errors import ConfigurationError
from tierstore.migrate import Migration, apply_pending, migrations_for, pending, sql_statements


def test_pending_skips_what_the_store_recorded_and_keeps_the_order() -> None:
    shipped = migrations_for("sqlite")
    assert [m.version for m in shipped] == list(range(1, len(shipped) + 1))
    assert pending("sqlite", set()) == shipped
    assert pending("sqlite", {1, 3}) == [m for m in shipped if m.version not in (1, 3)]
    assert pending("sqlite", {m.version for m in shipped}) == []


def test_a_backend_without_migrations_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="no migrations shipped"):
        pending("nosuchbackend", set())


async def test_apply_pending_applies_in_order_and_counts() -> None:
    seen: list[int] = []

    async def apply(migration: Migration) -> None:
        seen.append(migration.version)

    latest = len(migrations_for("postgres"))
    assert await apply_pending("postgres", applied={1}, apply=apply) == latest - 1
    assert seen == list(range(2, latest + 1))
    seen.clear()
    assert await apply_pending("postgres", applied=set(range(1, latest + 1)), apply=apply) == 0
    assert seen == []


async def test_a_failed_migration_stops_the_run() -> None:
    seen: list[int] = []

    async def apply(migration: Migration) -> None:
        seen.append(migration.version)
        if migration.version == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await apply_pending("sqlite", applied=set(), apply=apply)
    assert seen == [1, 2]


def test_sql_splits_at_statement_ends() -> None:
    script = (
        "-- header comment;\n"
        "CREATE TABLE a (x int);\n"
        "CREATE INDEX i\n  ON a (x);\n"
        ";\n"
        "SELECT 1"
    )
    assert sql_statements(script) == [
        "CREATE TABLE a (x int);",
        "CREATE INDEX i\n  ON a (x);",
        "SELECT 1",
    ]


def test_sql_keeps_dollar_quoted_bodies_whole() -> None:
    script = (
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\n"
        "BEGIN\n"
        "  -- inside the body;\n"
        "  RETURN 1;\n"
        "END\n"
        "$body$;\n"
        "SELECT 2;"
    )
    assert sql_statements(script) == [
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\nBEGIN\n"
        "  -- inside the body;\n  RETURN 1;\nEND\n$body$;",
        "SELECT 2;",
    ]


def test_every_shipped_sql_migration_splits_into_statements() -> None:
    for backend in ("sqlite", "postgres"):
        for migration in migrations_for(backend):
            statements = sql_statements(migration.text)
            assert statements, migration.name
            assert all(s.strip() for s in statements)
