"""Hash partitioning of the per-thread tables by ``sid``: the layout, its creation, and the
online conversion of a store that already holds data.

``tierstore_checkpoints``, ``tierstore_blobs`` and ``tierstore_writes`` are keyed by ``sid``
first (one thread namespace), so ``PARTITION BY HASH (sid)`` puts every row of a namespace
in one partition, and every per-thread statement (``sid = $1``, or a probe by a ``sid``
the statement already read) is pruned to that partition, at planning or at execution.
``tierstore_heads`` and ``tierstore_fences`` stay as they are: their unique keys are
digests of the ids, not ``sid``. Partitions are named ``<table>_p00`` … ``_p15``.

A store is created partitioned (``?partitions=N``: the tables are empty, so it is one
short transaction right after the migrations) or converted online::

    prepare   triggers on the three tables note the sid of every row changed from now on
              (tierstore_partitioning_log); empty partitioned copies are created
              (<table>_partitioned), primary keys only
    copy      each table in primary-key order, batch_rows rows per transaction, resumable
              (a batch starts after the greatest key already copied); then the secondary
              indexes are built and the copies analysed
    catch up  the noted sids, a chunk per transaction: their rows in the copies are
              replaced by the rows the tables hold now; rounds until few are noted
    swap      one transaction: tierstore_heads in EXCLUSIVE mode (writers stop at their
              first statement; plain reads go on), the three tables in ACCESS EXCLUSIVE
              mode (reads wait too), the last noted sids caught up, the old tables dropped,
              the copies renamed into place; lock_timeout bounds each wait, and a swap that
              cannot get its locks rolls back, catches up and tries again

The whole conversion holds the migration lock, so no release changes the schema halfway.
A conversion that stopped (a crash, Ctrl-C) resumes where it was when run again with the
same count; run with another count, it starts over; ``abandon`` removes what it made.
Only the rows of the noted sids are copied again, and whatever was noted before the swap's
lock is caught up under it, so the copies equal the tables when they take their place.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from tierstore.errors import ConfigurationError, TierUnavailable
from tierstore.tiers.postgres.sql import Conn, quote_ident

TABLES: Final = ("tierstore_checkpoints", "tierstore_blobs", "tierstore_writes")
"""The tables partitioned by sid, in the order they are copied."""
MAX_PARTITIONS: Final = 64
"""A per-thread read sets up and locks a scan of every partition before it prunes them
(README: Partitioning, cost by count), and creating or swapping in the partitions takes
locks on all of them in one transaction: more would outgrow a default PostgreSQL's lock
table (``max_locks_per_transaction`` = 64) and cost every read more than it saves."""

_STATE: Final = "tierstore_partitioning"
_LOG: Final = "tierstore_partitioning_log"
_NOTE: Final = "tierstore_partitioning_note"
_COPY_SUFFIX: Final = "_partitioned"
_INDEX_SUFFIX: Final = "_new"
_LOCK_REFUSED: Final = ("55P03", "40P01")  # lock_not_available, deadlock_detected
_OUT_OF_LOCKS: Final = "53200"  # out_of_memory: "out of shared memory", the lock table full

Progress = Callable[[int, int | None], None]
Phase = Callable[[str], None]


def check_count(partitions: int) -> int:
    """``partitions`` if it is a usable count, else ``ConfigurationError``."""
    if isinstance(partitions, bool) or not isinstance(partitions, int) \
            or not 2 <= partitions <= MAX_PARTITIONS:
        raise ConfigurationError(
            f"postgres partitions must be a whole number from 2 to {MAX_PARTITIONS}, "
            f"got {partitions!r} (every per-thread read sets up a scan of each partition, "
            "and laying them out locks them all in one transaction: README, Partitioning)")
    return partitions


def _out_of_locks(exc: asyncpg.PostgresError, partitions: int) -> ConfigurationError | None:
    """The ``ConfigurationError`` a full lock table (SQLSTATE 53200) means here, else None."""
    if exc.sqlstate != _OUT_OF_LOCKS:
        return None
    return ConfigurationError(
        f"PostgreSQL ran out of lock slots laying out {partitions} partitions "
        f"({getattr(exc, 'message', exc)}): "
        "one transaction locks every partition of the three tables and their indexes; "
        "raise max_locks_per_transaction on the server (a restart applies it), or use "
        "fewer partitions")


def partition_name(table: str, remainder: int, partitions: int) -> str:
    """``tierstore_checkpoints_p07``: zero-padded, so the names sort by remainder."""
    return f"{table}_p{remainder:0{len(str(partitions - 1))}d}"


# -- what the store is now -----------------------------------------------------------------


async def layout(conn: Conn) -> int | None:
    """How many hash partitions the tables have; None while they are plain tables."""
    rows = await conn.fetch(
        "SELECT c.relname, c.relkind::text, p.partstrat::text, "
        "       (SELECT count(*) FROM pg_inherits AS i WHERE i.inhparent = c.oid) "
        "  FROM unnest($1::text[]) AS t(name) "
        "  JOIN pg_class AS c ON c.oid = to_regclass(quote_ident(t.name)) "
        "  LEFT JOIN pg_partitioned_table AS p ON p.partrelid = c.oid",
        list(TABLES))
    kinds = {(r[1], r[2], int(r[3])) for r in rows}
    if len(rows) != len(TABLES):
        raise ConfigurationError("the tierstore schema is missing a table; run setup() first")
    if kinds == {("r", None, 0)}:
        return None
    if len(kinds) == 1:
        kind, strategy, count = next(iter(kinds))
        if kind == "p" and strategy == "h" and count > 0:
            return count
    found = ", ".join(f"{r[0]}: {_describe(r[1], r[2], int(r[3]))}" for r in rows)
    raise ConfigurationError(f"the tierstore tables are not laid out alike ({found}); "
                             "tierstore did not make this layout")


def _describe(kind: str, strategy: str | None, count: int) -> str:
    if kind == "r":
        return "a plain table"
    if kind == "p":
        return f"partitioned by {'hash' if strategy == 'h' else strategy} into {count}"
    return f"relation kind {kind}"


async def conversion_underway(conn: Conn) -> int | None:
    """The count an unfinished conversion is heading for, or None."""
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", _STATE):
        return None
    value = await conn.fetchval(f"SELECT partitions FROM {_STATE}")
    return None if value is None else int(value)


async def holds_rows(conn: Conn) -> bool:
    """Whether any of the partitioned-to-be tables holds a row."""
    return bool(await conn.fetchval(
        "SELECT " + " OR ".join(f"EXISTS (SELECT 1 FROM {t})" for t in TABLES)))


# -- the tables' definitions, read from the catalog -------------------------------------------


@dataclass(frozen=True, slots=True)
class _Index:
    name: str
    definition: str  # "USING btree (run_id) WHERE …": what follows the table's name
    unique: bool
    constraint: str | None  # "PRIMARY KEY (sid, checkpoint_id)" when it backs one


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    columns: tuple[str, ...]  # quoted, in order
    key: tuple[tuple[str, str], ...]  # primary key: quoted column, type
    indexes: tuple[_Index, ...]
    options: tuple[str, ...]  # storage parameters, given to every partition
    owner: str
    grants: tuple[tuple[str, str, bool], ...]  # grantee (quoted or PUBLIC), privilege, option

    @property
    def copy(self) -> str:
        return self.name + _COPY_SUFFIX


_INDEX_HEAD = re.compile(r"^CREATE (UNIQUE )?INDEX \S+ ON (?:ONLY )?")


async def _read_table(conn: Conn, name: str) -> _Table:
    oid = await conn.fetchval("SELECT to_regclass(quote_ident($1))::oid", name)
    columns = await conn.fetch(
        "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum", oid)
    key = await conn.fetch(
        "SELECT quote_ident(a.attname), format_type(a.atttypid, a.atttypmod) "
        "  FROM pg_index AS i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, n), "
        "       pg_attribute AS a "
        " WHERE i.indrelid = $1 AND i.indisprimary AND a.attrelid = i.indrelid "
        "   AND a.attnum = k.attnum ORDER BY k.n", oid)
    if not key or key[0][0] != "sid":
        raise ConfigurationError(f"{name} has no primary key starting with sid; "
                                 "tierstore did not make this table")
    indexes = []
    for index_name, definition, unique, constraint in await conn.fetch(
            "SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisunique, "
            "       pg_get_constraintdef(k.oid) "
            "  FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
            "  LEFT JOIN pg_constraint AS k ON k.conindid = i.indexrelid "
            "   AND k.conrelid = i.indrelid "
            " WHERE i.indrelid = $1 ORDER BY c.relname", oid):
        head = _INDEX_HEAD.match(definition)
        using = definition.find(" USING ", head.end() if head else 0)
        if head is None or using < 0:
            raise ConfigurationError(f"cannot read the definition of index {index_name}: "
                                     f"{definition}")
        indexes.append(_Index(index_name, definition[using + 1:], unique, constraint))
    row = await conn.fetchrow(
        "SELECT pg_get_userbyid(relowner), coalesce(reloptions, '{}') FROM pg_class "
        "WHERE oid = $1", oid)
    assert row is not None
    grants = await conn.fetch(
        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' "
        "            ELSE quote_ident(pg_get_userbyid(a.grantee)) END, "
        "       a.privilege_type, a.is_grantable "
        "  FROM pg_class AS c, aclexplode(c.relacl) AS a "
        " WHERE c.oid = $1 AND a.grantee <> c.relowner", oid)
    return _Table(name, tuple(r[0] for r in columns), tuple((r[0], r[1]) for r in key),
                  tuple(indexes), tuple(row[1]), row[0],
                  tuple((g[0], g[1], bool(g[2])) for g in grants))


async def _blockers(conn: Conn) -> list[str]:
    """What a swap could not carry over: views, rules, foreign keys, policies, triggers
    on the tables that tierstore did not create."""
    rows = await conn.fetch(
        """
        WITH t AS (SELECT to_regclass(quote_ident(n)) AS oid FROM unnest($1::text[]) AS n)
        SELECT DISTINCT 'view or rule ' || r.ev_class::regclass::text
          FROM t JOIN pg_depend AS d ON d.refobjid = t.oid
                  AND d.classid = 'pg_rewrite'::regclass
          JOIN pg_rewrite AS r ON r.oid = d.objid
        UNION ALL
        SELECT 'foreign key ' || k.conname FROM t JOIN pg_constraint AS k
            ON k.contype = 'f' AND (k.confrelid = t.oid OR k.conrelid = t.oid)
        UNION ALL
        SELECT 'policy ' || p.polname FROM t JOIN pg_policy AS p ON p.polrelid = t.oid
        UNION ALL
        SELECT 'trigger ' || g.tgname FROM t JOIN pg_trigger AS g ON g.tgrelid = t.oid
           AND NOT g.tgisinternal AND g.tgname NOT LIKE 'tierstore_partitioning%'
        """, list(TABLES))
    return sorted(r[0] for r in rows)


def _temporary(name: str) -> str:
    return name[:63 - len(_INDEX_SUFFIX)] + _INDEX_SUFFIX


# -- the partitioned copies ----------------------------------------------------------------


def _copy_ddl(table: _Table, partitions: int, *, owner: str) -> list[str]:
    """The empty partitioned copy of ``table``: columns, defaults, storage, constraints and
    comments as the table has them (``LIKE``), its storage parameters on every partition,
    its owner (``owner`` is who creates it) and grants, and the indexes that back its
    constraints (its primary key), under temporary names."""
    copy = quote_ident(table.copy)
    ddl = [f"CREATE TABLE {copy} (LIKE {quote_ident(table.name)} "
           "INCLUDING ALL EXCLUDING INDEXES) PARTITION BY HASH (sid)"]
    options = f" WITH ({', '.join(table.options)})" if table.options else ""
    parts = [partition_name(table.name, r, partitions) for r in range(partitions)]
    ddl += [f"CREATE TABLE {quote_ident(part)} PARTITION OF {copy} "
            f"FOR VALUES WITH (MODULUS {partitions}, REMAINDER {remainder}){options}"
            for remainder, part in enumerate(parts)]
    if table.owner != owner:
        ddl += [f"ALTER TABLE {quote_ident(relation)} OWNER TO {quote_ident(table.owner)}"
                for relation in (table.copy, *parts)]
    ddl += [f"GRANT {privilege} ON {copy} TO {grantee}"
            + (" WITH GRANT OPTION" if grantable else "")
            for grantee, privilege, grantable in table.grants]
    ddl += [f"ALTER TABLE {copy} ADD CONSTRAINT {quote_ident(_temporary(index.name))} "
            f"{index.constraint}" for index in table.indexes if index.constraint is not None]
    return ddl


def _index_ddl(table: _Table, *, existing: Collection[str] = ()) -> list[str]:
    """The copy's indexes that back no constraint, but for the ``existing`` ones."""
    return [f"CREATE {'UNIQUE ' if index.unique else ''}INDEX "
            f"{quote_ident(_temporary(index.name))} ON {quote_ident(table.copy)} "
            f"{index.definition}"
            for index in table.indexes
            if index.constraint is None and _temporary(index.name) not in existing]


def _put_in_place_ddl(tables: Sequence[_Table]) -> list[str]:
    """Drop the tables and give their copies, and the copies' indexes, their names."""
    ddl = ["DROP TABLE " + ", ".join(quote_ident(t.name) for t in tables)]
    for table in tables:
        name = quote_ident(table.name)
        ddl.append(f"ALTER TABLE {quote_ident(table.copy)} RENAME TO {name}")
        for index in table.indexes:
            temporary, final = quote_ident(_temporary(index.name)), quote_ident(index.name)
            ddl.append(f"ALTER TABLE {name} RENAME CONSTRAINT {temporary} TO {final}"
                       if index.constraint is not None
                       else f"ALTER INDEX {temporary} RENAME TO {final}")
    return ddl


async def _run_ddl(conn: Conn, ddl: Sequence[str], *,
                   ddl_timeout: float | None = None) -> None:
    """Statements in one round trip (they carry no parameters), bounded by
    ``ddl_timeout`` seconds (None: the connection's command timeout)."""
    if ddl:
        await conn.execute(";\n".join(ddl), timeout=ddl_timeout)


async def _build_indexes(conn: Conn, tables: Sequence[_Table]) -> None:
    """The copies' indexes that back no constraint and do not exist yet (resumable)."""
    existing = {r[0] for r in await conn.fetch(
        "SELECT relname FROM pg_class WHERE oid = ANY(ARRAY("
        "SELECT to_regclass(quote_ident(n)) FROM unnest($1::text[]) AS n))",
        [_temporary(i.name) for t in tables for i in t.indexes])}
    await _run_ddl(conn, [s for t in tables for s in _index_ddl(t, existing=existing)])


async def create(conn: Conn, partitions: int, *, ddl_timeout: float | None = None) -> None:
    """Partition the tables of a store that holds no rows yet, in one transaction whose
    DDL is bounded by ``ddl_timeout`` seconds (the store's ``setup_timeout``).

    The caller holds the migration lock. Under the tables' locks the store is checked
    again: a process that wrote meanwhile makes this a ``ConfigurationError``. A lock
    table too small for the partitions' locks is a ``ConfigurationError`` too.
    """
    check_count(partitions)
    try:
        await _create(conn, partitions, ddl_timeout=ddl_timeout)
    except asyncpg.PostgresError as exc:
        error = _out_of_locks(exc, partitions)
        if error is None:
            raise
        raise error from exc


async def _create(conn: Conn, partitions: int, *, ddl_timeout: float | None) -> None:
    async with conn.transaction():
        await conn.execute("LOCK TABLE " + ", ".join(TABLES) + " IN ACCESS EXCLUSIVE MODE",
                           timeout=ddl_timeout)
        if await holds_rows(conn):
            raise ConfigurationError("the store received rows while its tables were being "
                                     "partitioned; convert it with tierstore migrate "
                                     f"--partitions {partitions}")
        blockers = await _blockers(conn)
        if blockers:
            raise ConfigurationError(_blocked(blockers))
        tables = [await _read_table(conn, name) for name in TABLES]
        owner = await conn.fetchval("SELECT current_user")
        await _run_ddl(conn, [
            *(s for t in tables for s in _copy_ddl(t, partitions, owner=owner)),
            *(s for t in tables for s in _index_ddl(t)),
            *_put_in_place_ddl(tables),
        ], ddl_timeout=ddl_timeout)


def _blocked(blockers: Sequence[str]) -> str:
    return ("the tierstore tables carry objects a conversion cannot move along ("
            + ", ".join(blockers) + "); drop them first and create them again afterwards")


# -- the online conversion ------------------------------------------------------------------


@dataclass(slots=True)
class Conversion:
    """What one run of ``convert`` did (``as_dict`` for the command line)."""

    partitions: int
    converted: bool = False  # False: the store already had this layout
    resumed: bool = False
    discarded: int | None = None  # the count of an unfinished conversion started over
    rows_copied: int = 0
    threads_caught_up: int = 0
    catch_up_rounds: int = 0
    swap_attempts: int = 0
    lock_seconds: float = 0.0  # how long the swap held the tables' locks

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True, kw_only=True)
class Tuning:
    """How a conversion paces itself; the defaults suit a busy store."""

    batch_rows: int = 2000
    chunk_threads: int = 500  # sids caught up per transaction
    swap_below: int = 200  # catch up until a round finds at most this many sids noted
    max_rounds: int = 20
    lock_timeout: float = 0.5  # seconds a lock request waits before it is tried again
    lock_attempts: int = 30
    statement_timeout: float | None = 300.0

    def __post_init__(self) -> None:
        for name in ("batch_rows", "chunk_threads", "max_rounds", "lock_attempts"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"partitioning {name} must be at least 1")
        if not self.lock_timeout > 0:
            raise ConfigurationError("partitioning lock_timeout must be positive")


async def convert(conn: Conn, partitions: int, *, tuning: Tuning | None = None,
                  progress: Progress | None = None, phase: Phase | None = None,
                  ddl_timeout: float | None = None) -> Conversion:
    """Convert the store to ``partitions`` hash partitions while it stays in use.

    The caller holds the migration lock and has brought the schema up to date. A store
    already partitioned into ``partitions`` is left alone; into another count, refused.
    ``ddl_timeout`` bounds each statement that creates or swaps in the partitions (the
    store's ``setup_timeout``); a lock table too small for them is a
    ``ConfigurationError``. ``phase`` is told each phase's name as it starts (``copy``,
    ``index``, ``catch up``, ``swap``); ``progress`` the copy's rows.
    """
    check_count(partitions)
    try:
        return await _convert(conn, partitions, tuning=tuning or Tuning(), progress=progress,
                              phase=phase or (lambda name: None), ddl_timeout=ddl_timeout)
    except asyncpg.PostgresError as exc:
        error = _out_of_locks(exc, partitions)
        if error is None:
            raise
        raise error from exc


async def _convert(conn: Conn, partitions: int, *, tuning: Tuning, progress: Progress | None,
                   phase: Phase, ddl_timeout: float | None) -> Conversion:
    report = Conversion(partitions)
    current = await layout(conn)
    if current == partitions:
        return report
    if current is not None:
        raise ConfigurationError(
            f"the store is already hash-partitioned into {current} partitions, not "
            f"{partitions}; tierstore does not change the count of a partitioned store")
    blockers = await _blockers(conn)
    if blockers:
        raise ConfigurationError(_blocked(blockers))
    underway = await conversion_underway(conn)
    if underway is not None and (underway != partitions or not await _copies_match(conn)):
        report.discarded = underway
        await abandon(conn, tuning=tuning)
        underway = None
    tables = [await _read_table(conn, name) for name in TABLES]
    if underway is None:
        phase("prepare")
        await _locked(conn, tuning, lambda: _prepare(conn, tables, partitions, ddl_timeout))
    else:
        report.resumed = True
    if not await conn.fetchval(f"SELECT copied FROM {_STATE}"):
        phase("copy")
        await _copy(conn, tables, tuning, report, progress, phase=phase)
    phase("index")
    await _build_indexes(conn, tables)  # a release between two runs may have added one
    report.converted = True
    phase("catch up")
    await _catch_up(conn, tables, tuning, report)
    phase("swap")
    await _swap(conn, tables, tuning, report, ddl_timeout)
    return report


async def abandon(conn: Conn, *, tuning: Tuning | None = None) -> bool:
    """Remove what an unfinished conversion made (triggers, copies, its notes); the tables
    stay as they are. Returns whether there was one."""
    if await conversion_underway(conn) is None:
        return False
    tuning = tuning or Tuning()

    async def drop() -> None:
        for name in TABLES:
            for event in ("insert", "update", "delete"):
                await conn.execute(f"DROP TRIGGER IF EXISTS {_NOTE}_{event} ON {name}")
            await conn.execute(f"DROP TABLE IF EXISTS {quote_ident(name + _COPY_SUFFIX)}")
        await conn.execute(f"DROP FUNCTION IF EXISTS {_NOTE}()")
        await conn.execute(f"DROP TABLE IF EXISTS {_LOG}, {_STATE}")

    await _locked(conn, tuning, drop)
    return True


async def _copies_match(conn: Conn) -> bool:
    """Whether the copies of an unfinished conversion have the tables' columns (a release
    in between may have added one: then the conversion starts over)."""
    for name in TABLES:
        same = await conn.fetchval(
            "SELECT array_agg((attname, atttypid, atttypmod, attcollation) ORDER BY attnum) "
            "       FILTER (WHERE attrelid = to_regclass(quote_ident($1))) "
            "       IS NOT DISTINCT FROM "
            "       array_agg((attname, atttypid, atttypmod, attcollation) ORDER BY attnum) "
            "       FILTER (WHERE attrelid = to_regclass(quote_ident($2))) "
            "  FROM pg_attribute WHERE attnum > 0 AND NOT attisdropped "
            "   AND attrelid IN (to_regclass(quote_ident($1)), to_regclass(quote_ident($2)))",
            name, name + _COPY_SUFFIX)
        if not same:
            return False
    return True


async def _prepare(conn: Conn, tables: Sequence[_Table], partitions: int,
                   ddl_timeout: float | None) -> None:
    await conn.execute(f"CREATE TABLE {_STATE} (partitions integer NOT NULL, "
                       "copied boolean NOT NULL DEFAULT false)")
    await conn.execute(f"INSERT INTO {_STATE} (partitions) VALUES ($1)", partitions)
    await conn.execute(f"CREATE TABLE {_LOG} (sid bigint NOT NULL)")
    await conn.execute(f"CREATE INDEX {_LOG}_sid ON {_LOG} (sid)")
    await conn.execute(f"""
        CREATE FUNCTION {_NOTE}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                INSERT INTO {_LOG} (sid) SELECT DISTINCT sid FROM gone;
            ELSIF TG_OP = 'UPDATE' THEN
                INSERT INTO {_LOG} (sid)
                SELECT sid FROM gone UNION SELECT sid FROM came;
            ELSE
                INSERT INTO {_LOG} (sid) SELECT DISTINCT sid FROM came;
            END IF;
            RETURN NULL;
        END
        $$""")
    for table in tables:
        for event, tables_seen in (("insert", "NEW TABLE AS came"),
                                   ("update", "OLD TABLE AS gone NEW TABLE AS came"),
                                   ("delete", "OLD TABLE AS gone")):
            await conn.execute(
                f"CREATE TRIGGER {_NOTE}_{event} AFTER {event.upper()} ON "
                f"{quote_ident(table.name)} REFERENCING {tables_seen} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {_NOTE}()")
    owner = await conn.fetchval("SELECT current_user")
    await _run_ddl(conn, [s for t in tables for s in _copy_ddl(t, partitions, owner=owner)],
                   ddl_timeout=ddl_timeout)


async def _copy(conn: Conn, tables: Sequence[_Table], tuning: Tuning, report: Conversion,
                progress: Progress | None, *, phase: Phase) -> None:
    total = int(await conn.fetchval(
        "SELECT sum(greatest(reltuples, 0))::bigint FROM pg_class "
        "WHERE oid = ANY(ARRAY(SELECT to_regclass(quote_ident(n)) FROM unnest($1::text[]) n))",
        [t.name for t in tables]) or 0) or None
    for table in tables:
        key = ", ".join(k for k, _ in table.key)
        backwards = ", ".join(f"{k} DESC" for k, _ in table.key)
        columns = ", ".join(table.columns)
        found = await conn.fetchrow(
            f"SELECT {key} FROM {quote_ident(table.copy)} ORDER BY {backwards} LIMIT 1")
        last: tuple[Any, ...] | None = None if found is None else tuple(found)
        after = ", ".join(f"${i}::{t}" for i, (_, t) in enumerate(table.key, start=2))
        batch = (f"WITH b AS (SELECT {columns} FROM {quote_ident(table.name)} {{where}} "
                 f"ORDER BY {key} LIMIT $1), "
                 f"i AS (INSERT INTO {quote_ident(table.copy)} ({columns}) "
                 f"SELECT {columns} FROM b) "
                 f"SELECT (SELECT count(*) FROM b), l.* "
                 f"FROM (SELECT {key} FROM b ORDER BY {backwards} LIMIT 1) AS l")
        first = batch.format(where="")
        then = batch.format(where=f"WHERE ({key}) > ({after})")
        while True:
            if last is None:
                row = await conn.fetchrow(first, tuning.batch_rows,
                                          timeout=tuning.statement_timeout)
            else:
                row = await conn.fetchrow(then, tuning.batch_rows, *last,
                                          timeout=tuning.statement_timeout)
            if row is None:
                break
            report.rows_copied += int(row[0])
            last = tuple(row)[1:]
            if progress is not None:
                progress(report.rows_copied, max(total or 0, report.rows_copied) or None)
            if int(row[0]) < tuning.batch_rows:
                break
    phase("index")
    async with conn.transaction():
        await _build_indexes(conn, tables)
        await conn.execute(f"UPDATE {_STATE} SET copied = true")
    phase("analyse")
    for table in tables:  # autovacuum analyses partitions, never a partitioned table
        await conn.execute(f"ANALYZE {quote_ident(table.copy)}", timeout=None)


async def _catch_up_chunk(conn: Conn, tables: Sequence[_Table], limit: int | None) -> int:
    """Copy again the rows of up to ``limit`` noted sids (all of them with None); returns
    how many sids. A note made after this chunk's delete stays for the next one."""
    sids = [r[0] for r in await conn.fetch(
        f"SELECT DISTINCT sid FROM {_LOG} ORDER BY sid"
        + ("" if limit is None else f" LIMIT {int(limit)}"))]
    if not sids:
        return 0
    await conn.execute(f"DELETE FROM {_LOG} WHERE sid = ANY($1::bigint[])", sids)
    for table in tables:
        columns = ", ".join(table.columns)
        await conn.execute(f"DELETE FROM {quote_ident(table.copy)} "
                           "WHERE sid = ANY($1::bigint[])", sids)
        await conn.execute(f"INSERT INTO {quote_ident(table.copy)} ({columns}) "
                           f"SELECT {columns} FROM {quote_ident(table.name)} "
                           "WHERE sid = ANY($1::bigint[])", sids)
    return len(sids)


async def _catch_up(conn: Conn, tables: Sequence[_Table], tuning: Tuning,
                    report: Conversion) -> None:
    for _ in range(tuning.max_rounds):
        noted = int(await conn.fetchval(f"SELECT count(DISTINCT sid) FROM {_LOG}"))
        if noted <= tuning.swap_below:
            return
        report.catch_up_rounds += 1
        done = 0
        while done < noted:
            async with conn.transaction():
                n = await _catch_up_chunk(conn, tables, tuning.chunk_threads)
            if n == 0:
                break
            done += n
            report.threads_caught_up += n


async def _swap(conn: Conn, tables: Sequence[_Table], tuning: Tuning,
                report: Conversion, ddl_timeout: float | None) -> None:
    async def swap() -> None:
        await conn.execute("LOCK TABLE tierstore_heads IN EXCLUSIVE MODE")
        await conn.execute("LOCK TABLE " + ", ".join(TABLES) + " IN ACCESS EXCLUSIVE MODE")
        locked = time.monotonic()
        while n := await _catch_up_chunk(conn, tables, None):
            report.threads_caught_up += n
        # the triggers go with the tables
        await _run_ddl(conn, _put_in_place_ddl(tables), ddl_timeout=ddl_timeout)
        await conn.execute(f"DROP FUNCTION {_NOTE}()")
        await conn.execute(f"DROP TABLE {_LOG}, {_STATE}")
        report.lock_seconds = time.monotonic() - locked

    async def caught_up() -> None:
        await _catch_up(conn, tables, tuning, report)

    report.swap_attempts = await _locked(conn, tuning, swap, between=caught_up)


async def _locked(conn: Conn, tuning: Tuning, body: Callable[[], Awaitable[None]], *,
                  between: Callable[[], Awaitable[None]] | None = None) -> int:
    """Run ``body`` in a transaction whose lock waits are bounded by ``lock_timeout``,
    trying again (after ``between``) while a lock is refused; returns the attempts made.

    A bounded wait keeps writers from queueing behind a lock request for long, and gives
    way first in a deadlock with a statement of the store (deadlock_timeout is 1 s).
    """
    for attempt in range(1, tuning.lock_attempts + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {int(tuning.lock_timeout * 1000)}")
                await body()
            return attempt
        except asyncpg.PostgresError as exc:
            if exc.sqlstate not in _LOCK_REFUSED:
                raise
        await asyncio.sleep(min(5.0, 0.1 * attempt))
        if between is not None:
            await between()
    raise TierUnavailable(
        f"the tierstore tables stayed locked by other transactions through "
        f"{tuning.lock_attempts} attempts of {tuning.lock_timeout:g}s; run the conversion "
        "again when the store is quieter (it resumes where it stopped)",
        tier="warm", backend="postgres")
