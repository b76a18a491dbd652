"""On a store hash-partitioned by thread, every per-thread statement reads and writes the
thread's partition only, in the plans PostgreSQL really runs.

Each operation runs on a thread of its own in a store of 10,000 other threads (analysed,
so plans are made as on a store in use), several times on one connection so that the
prepared statements and the functions' statements reach their generic plans, whose
partitions are pruned at execution. ``auto_explain`` logs the plan of every statement,
the functions' inner statements included, with the rows each node produced; a partition
the statement touched is one of its scan nodes that ran (``Actual Loops`` > 0).

Not per thread, so not here: ``delete_for_runs`` (a run's checkpoints are found through
every partition's run_id index, one probe each, then only their threads are changed),
claims (they scan the heads), and list without a thread. ``archive_refs(thread)`` is
here: it reads the thread's heads first and probes each namespace's stubs by its sid, so
it is pruned like the others (joined freely it was planned from the stubs' side, every
partition's archive_key index probed).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tests.builders import blob, cid, record, write
from tests.servers.postgres import with_query
from tierstore.records import ListQuery, StoredCheckpoint
from tierstore.settings import StoreUrl
from tierstore.tiers.postgres import PostgresWarm

N = 16
REPEAT = 6  # prepared statements go generic from the sixth run on
_PARTITION = re.compile(r"^tierstore_(checkpoints|blobs|writes)_(p\d+)$")
_OTHER_THREADS = 10_000

_LOAD = f"""
INSERT INTO tierstore_heads (thread_id, checkpoint_ns, head_id, n_writes)
SELECT 'bulk-' || g, '', '{cid(4)}', 1 FROM generate_series(1, {_OTHER_THREADS}) AS g;
INSERT INTO tierstore_checkpoints (sid, size_bytes, checkpoint_id, parent_id, run_id,
    checkpoint_tag, checkpoint, metadata_tag, metadata, channel_versions, filter_doc)
SELECT h.sid, 10, '1ef-' || lpad(i::text, 8, '0'),
       CASE WHEN i > 0 THEN '1ef-' || lpad((i - 1)::text, 8, '0') END, 'run-' || h.sid,
       'msgpack', 'x', 'msgpack', 'm', jsonb_build_object('a', i::text),
       jsonb_build_object('step', i)
  FROM tierstore_heads AS h, generate_series(0, 4) AS i WHERE h.thread_id LIKE 'bulk-%';
INSERT INTO tierstore_blobs (sid, channel, version, tag, data)
SELECT h.sid, 'a', i::text, 'msgpack', 'v'
  FROM tierstore_heads AS h, generate_series(0, 4) AS i WHERE h.thread_id LIKE 'bulk-%';
INSERT INTO tierstore_writes (sid, idx, checkpoint_id, task_id, channel, tag, data)
SELECT h.sid, 0, '1ef-' || lpad(i::text, 8, '0'), 'task', 'a', 'msgpack', 'w'
  FROM tierstore_heads AS h, generate_series(0, 4) AS i WHERE h.thread_id LIKE 'bulk-%';
ANALYZE tierstore_heads, tierstore_checkpoints, tierstore_blobs, tierstore_writes;
"""


@pytest.fixture(scope="module")
async def store(postgres_url: str) -> AsyncIterator[PostgresWarm]:
    url = with_query(postgres_url, schema=f"plan_{uuid.uuid4().hex[:10]}", max_size="2")
    opened = PostgresWarm.from_url(StoreUrl.parse(url), partitions=N)
    await opened.setup()
    try:
        assert opened._pool is not None
        async with opened._pool.acquire() as conn:
            await conn.execute(_LOAD)
        yield opened
    finally:
        await opened.aclose()


async def history(store: PostgresWarm, thread: str) -> None:
    """Four checkpoints with blobs, pending writes and a replacing write; a run id."""
    for n in range(4):
        await store.put_checkpoint(
            record(thread, n, parent=n - 1 if n else None, run_id=f"run-{thread}",
                   versions={"a": f"{n}"}, doc={"step": n}),
            [blob("a", f"{n}", f"{thread}-{n}".encode())], strict=False)
        await store.put_writes(thread, "", cid(n), [write("task", 0, channel="a"),
                                                    write("task", -1, "e")])


async def partition_of(store: PostgresWarm, thread: str) -> str:
    assert store._pool is not None
    async with store._pool.acquire() as conn:
        name = await conn.fetchval(
            "SELECT c.tableoid::regclass::text FROM tierstore_checkpoints AS c "
            "JOIN tierstore_heads AS h ON h.sid = c.sid WHERE h.thread_id = $1 LIMIT 1", thread)
    match = _PARTITION.match(name or "")
    assert match is not None, name
    return match[2]


@asynccontextmanager
async def explained(store: PostgresWarm) -> AsyncIterator[list[str]]:
    """Every call of ``store`` meanwhile runs on one connection whose statements'
    plans, with what each node did, are logged into the list yielded."""
    pool = store._pool
    assert pool is not None
    await store._give_back(pool)
    conn = await pool.acquire()
    logged: list[str] = []

    def listen(_conn: Any, message: Any) -> None:
        logged.append(message.message)

    await conn.execute("LOAD 'auto_explain'")
    for setting in ("auto_explain.log_min_duration = 0", "auto_explain.log_analyze = on",
                    "auto_explain.log_timing = off", "auto_explain.log_format = json",
                    "auto_explain.log_nested_statements = on", "client_min_messages = log"):
        await conn.execute(f"SET {setting}")
    conn.add_log_listener(listen)
    store._kept.append(conn)  # the store's next calls take it, and keep it again
    try:
        yield logged
        assert store._kept == [conn]  # no call ran elsewhere
    finally:
        if conn in store._kept:
            store._kept.remove(conn)
        conn.remove_log_listener(listen)
        await conn.execute("SET auto_explain.log_min_duration = -1; RESET client_min_messages")
        await pool.release(conn)


def touched(logged: list[str]) -> set[str]:
    """Partitions of the three tables whose scans ran, as ``checkpoints_p05``."""
    out: set[str] = set()
    for message in logged:
        if "plan:" not in message:
            continue
        stack = [json.loads(message.split("plan:", 1)[1])["Plan"]]
        while stack:
            node = stack.pop()
            stack.extend(node.get("Plans", ()))
            match = _PARTITION.match(node.get("Relation Name", ""))
            if match and node.get("Actual Loops", 0) > 0:
                out.add(f"{match[1]}_{match[2]}")
    return out


async def _listed(store: PostgresWarm, query: ListQuery) -> list[StoredCheckpoint]:
    return [r async for r in store.list(query)]


async def _claimed(store: PostgresWarm, thread: str) -> None:
    claims = await store.claim(owner="w", now=1e12, lease_seconds=60, limit=5,
                               thread_id=thread)
    assert [c.thread_id for c in claims] == [thread]


async def _archive(store: PostgresWarm, thread: str) -> None:
    await _claimed(store, thread)
    assert await store.mark_archived(thread, "", [cid(0), cid(1)], archive_key=f"seg-{thread}",
                                     owner="w", now=1e12) == 2


async def _expire(store: PostgresWarm, thread: str) -> None:
    claims = await store.claim(owner="w", now=1e12, lease_seconds=60, limit=5,
                               thread_id=thread)
    assert await store.expire_thread(thread, claims, owner="w", now=1e12, keep_latest=True)


async def _rehydrate(store: PostgresWarm, thread: str) -> None:
    stored = [r async for r in store.list(ListQuery(thread_id=thread, checkpoint_ns=""))]
    await _archive(store, thread)
    assert await store.rehydrate([r for r in stored if r.checkpoint_id in (cid(0), cid(1))]) == 2


async def _archive_refs(store: PostgresWarm, thread: str) -> None:
    await _archive(store, thread)
    assert await store.archive_refs(thread) == {f"seg-{thread}": 2}
    assert await store.archive_refs(thread, keys=[f"seg-{thread}", "other"]) == {
        f"seg-{thread}": 2}


Op = Callable[[PostgresWarm, str], Awaitable[Any]]
OPERATIONS: dict[str, Op] = {
    "get latest": lambda s, t: s.get(t, "", None),
    "get by id": lambda s, t: s.get(t, "", cid(1)),
    "list a namespace": lambda s, t: _listed(s, ListQuery(thread_id=t, checkpoint_ns="")),
    "list a thread, filtered": lambda s, t: _listed(s, ListQuery(thread_id=t,
                                                                 filter={"step": 2})),
    "list before, limited": lambda s, t: _listed(s, ListQuery(
        thread_id=t, checkpoint_ns="", before_id=cid(3), limit=2)),
    "ancestors": lambda s, t: s.ancestors(t, "", cid(3), ["a"], limit=10),
    "put": lambda s, t: s.put_checkpoint(record(t, 4, parent=3, versions={"a": "4"}),
                                         [blob("a", "4", b"v4")], strict=True),
    "put naming a version held by an older checkpoint": lambda s, t: s.put_checkpoint(
        record(t, 4, parent=3, versions={"a": "1"}), [], strict=False),
    "put_writes": lambda s, t: s.put_writes(t, "", cid(3), [write("other", 0),
                                                            write("task", -1, "again")]),
    "prune": lambda s, t: s.prune([t], keep_latest=True),
    "delete": lambda s, t: s.delete_thread(t),
    "index": lambda s, t: s.index(t, ""),
    "mark archived": _archive,
    "rehydrate": _rehydrate,
    "archive refs of a thread": _archive_refs,
    "expire keeping the latest": _expire,
}


@pytest.mark.parametrize("name", list(OPERATIONS))
async def test_a_per_thread_statement_touches_its_thread_partition_only(
        store: PostgresWarm, name: str) -> None:
    operation = OPERATIONS[name]
    async with explained(store) as logged:
        for run in range(REPEAT):
            thread = f"{name}-{run}-{uuid.uuid4().hex[:6]}"
            await history(store, thread)
            own = await partition_of(store, thread)
            logged.clear()
            await operation(store, thread)
            seen = touched(logged)
            assert seen, f"{name}: no partition was read"
            assert {p.rsplit("_", 1)[1] for p in seen} == {own}, (name, run, own, seen)


@pytest.mark.parametrize("name", ["copy", "publish"])
async def test_copying_a_thread_touches_the_two_threads_partitions_only(
        store: PostgresWarm, name: str) -> None:
    async with explained(store) as logged:
        for run in range(REPEAT):
            source = f"{name}-from-{run}-{uuid.uuid4().hex[:6]}"
            target = f"{name}-to-{run}-{uuid.uuid4().hex[:6]}"
            await history(store, source)
            logged.clear()
            if name == "copy":
                await store.copy_thread(source, target)
            else:
                await store.publish_thread(source, target, replace=False)
            seen = touched(logged)
            owns = {await partition_of(store, source), await partition_of(store, target)}
            assert seen and {p.rsplit("_", 1)[1] for p in seen} <= owns, (run, owns, seen)
