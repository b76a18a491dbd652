"""Metrics through LangGraph on every stack: each store call is counted once, by tier."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage
from prometheus_client.parser import text_string_to_metric_families

from tests.stacks import STACKS, Urls
from tierstore.demo import build_agent


@pytest.fixture(params=sorted(STACKS))
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Urls:
    return STACKS[request.param](request, tmp_path)


async def test_store_calls_are_counted_per_tier(urls: Urls) -> None:
    async with urls.open(hot_write_delay=0) as saver:
        app = build_agent().compile(checkpointer=saver)
        config = {"configurable": {"thread_id": "metered"}}
        for text in ("hello", "remember tea", "what is 2 + 2"):
            await app.ainvoke({"messages": [HumanMessage(text)]}, config)
        await app.aget_state(config)
        history = [t async for t in saver.alist(config)]
        stack = saver.regions.for_thread("metered")
        m = saver.metrics
        assert m.calls("warm", "put_checkpoint", "ok") == len(history)
        assert m.calls("warm", "put_writes", "ok") > 0
        assert m.calls("warm", "list") >= 1
        if stack.hot is not None:
            # write-behind off: one each (a put that found writes already stored for its
            # checkpoint drops the older entry instead of caching a copy it cannot vouch for)
            assert (m.calls("hot", "put", "ok") + m.calls("hot", "invalidate", "ok")
                    == len(history))
        else:
            assert m.calls("hot") == 0
        samples = [s for family in text_string_to_metric_families(saver.metrics_text())
                   for s in family.samples]
        warm_puts = [s for s in samples if s.name == "tierstore_store_calls_total"
                     and s.labels["op"] == "put_checkpoint"]
        assert [s.labels["backend"] for s in warm_puts] == [stack.warm.backend]
        assert any(s.name == "tierstore_events_total" for s in samples)
