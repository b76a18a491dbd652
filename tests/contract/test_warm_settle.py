"""Claims that end: settled heads are skipped until they change; held claims are visible."""

from __future__ import annotations

import time
import uuid
from typing import Any

from tests.builders import cid, record

from .test_warm import chain


async def claimed(warm: Any, thread: str, now: float, **kw: Any) -> list[str]:
    return [c.head_id for c in await warm.claim(owner=f"w-{uuid.uuid4()}", now=now,
                                                lease_seconds=60, limit=1000,
                                                thread_id=thread, **kw)]


async def test_a_settled_head_is_skipped_until_its_head_changes(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 3)
    now = time.time() + 1000
    [claim] = await warm.claim(owner="a", now=now, lease_seconds=60, limit=10, thread_id=t,
                               warm_before=now)
    await warm.release(t, "", owner="a", settled_head=claim.head_id)
    assert await claimed(warm, t, now + 1, warm_before=now + 1) == []
    assert await claimed(warm, t, now + 2, warm_before=now + 10**6) == []
    # idle archival moves everything: a demotion marker never hides a head from it
    assert await claimed(warm, t, now + 3, idle_before=now) == [cid(2)]
    await warm.release(t, "", owner="nobody-holds-it")
    await warm.put_checkpoint(record(t, 3, parent=2), [], strict=False)
    assert await claimed(warm, t, now + 200, warm_before=now + 200) == [cid(3)]


async def test_a_settled_head_comes_back_once_its_next_candidate_is_old(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 3)
    now = time.time() + 1000
    [claim] = await warm.claim(owner="a", now=now, lease_seconds=60, limit=10, thread_id=t,
                               warm_before=now)
    await warm.release(t, "", owner="a", settled_head=claim.head_id, settled_until=now + 50)
    assert await claimed(warm, t, now + 1, warm_before=now + 50) == []
    assert await claimed(warm, t, now + 2, warm_before=now + 51) == [cid(2)]


async def test_release_by_another_owner_settles_nothing(warm: Any) -> None:
    t = f"t-{uuid.uuid4()}"
    await chain(warm, t, 2)
    now = time.time() + 1000
    [claim] = await warm.claim(owner="a", now=now, lease_seconds=60, limit=10, thread_id=t,
                               warm_before=now)
    await warm.release(t, "", owner="b", settled_head=claim.head_id)
    await warm.release(t, "", owner="a")
    assert await claimed(warm, t, now + 1, warm_before=now + 1) == [cid(1)]


async def test_held_claims_report_count_and_expiry(warm: Any) -> None:
    threads = [f"t-{uuid.uuid4()}" for _ in range(3)]
    for t in threads:
        await chain(warm, t, 2)
    now = time.time() + 1000
    for i, t in enumerate(threads):
        assert await warm.claim(owner="dead-worker", now=now, lease_seconds=60 + i, limit=10,
                                thread_id=t, warm_before=now)
    mine = await warm.held_claims(now=now + 1, thread_id=threads[0])
    assert (mine.count, mine.earliest_until, mine.latest_until) == (1, now + 60, now + 60)
    every = await warm.held_claims(now=now + 1)
    assert every.count >= 3 and every.latest_until is not None
    assert every.latest_until >= now + 62
    assert (await warm.held_claims(now=now + 1, thread_id=threads[2],
                                   exclude_owner="dead-worker")).count == 0
    expired = await warm.held_claims(now=now + 61, thread_id=threads[0])
    assert (expired.count, expired.earliest_until) == (0, None)
