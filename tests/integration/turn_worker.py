"""One OS process of the cross-process strict-mode race (run by test_concurrency).

Usage: ``python -m tests.integration.turn_worker SPEC N`` where SPEC is a JSON object
with the stack URLs, the thread and the number of turns; process N sends
``remember pN item 0`` … concurrently, each through ``retry_on_conflict``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from langchain_core.messages import HumanMessage

from tierstore import TieredSaver, retry_on_conflict
from tierstore.demo import build_agent


async def main(spec: dict[str, object], n: int) -> None:
    async with TieredSaver.from_urls(hot=spec["hot"], warm=spec["warm"],  # type: ignore[arg-type]
                                     cold=spec["cold"], concurrency="strict") as saver:
        app = build_agent().compile(checkpointer=saver)
        config = {"configurable": {"thread_id": spec["thread"]}}
        await asyncio.gather(*(
            retry_on_conflict(app.ainvoke, {"messages": [HumanMessage(f"remember p{n} item {i}")]},
                              config)
            for i in range(int(spec["turns"]))  # type: ignore[call-overload]
        ))


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1]), int(sys.argv[2])))
