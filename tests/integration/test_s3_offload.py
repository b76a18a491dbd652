"""A real LangGraph graph on a saver whose cold tier is a GLACIER bucket.

Large channel values are offloaded to the object store. They must land in STANDARD
(readable at once) whatever the bucket's archive class, and read back byte for byte,
also from a fresh saver that has nothing cached.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph

from tests.servers.s3 import s3_url
from tierstore import TieredSaver
from tierstore.offload import OFFLOAD_PREFIX


class State(TypedDict):
    document: str
    turns: int


def build() -> Any:
    def write(state: State) -> dict[str, Any]:
        # Random text: zstd cannot squeeze it under the offload threshold.
        return {"document": secrets.token_urlsafe(3_750_000), "turns": state["turns"] + 1}

    def count(state: State) -> dict[str, Any]:
        return {"turns": state["turns"] + 1}

    builder = StateGraph(State)
    builder.add_node("write", write)
    builder.add_node("count", count)
    builder.add_edge(START, "write")
    builder.add_edge("write", "count")
    builder.add_edge("count", END)
    return builder


async def test_a_large_value_is_offloaded_in_standard_and_reads_back(
        tmp_path: Path, moto_endpoint: str, s3_client: Any) -> None:
    cold = s3_url(moto_endpoint, prefix="tenant-a/", storage_class="GLACIER")
    warm = f"sqlite:///{tmp_path}/w.db"
    config = {"configurable": {"thread_id": "thread-with-a-big-document"}}

    async with TieredSaver.from_urls(hot="memory://", warm=warm, cold=cold,
                                     offload_threshold=1024 * 1024) as saver:
        graph = build().compile(checkpointer=saver)
        result = await graph.ainvoke({"document": "", "turns": 0}, config)
        document = result["document"]
        assert len(document) == 5_000_000 and result["turns"] == 2
        assert saver.stats.offloaded >= 1

    bucket = cold.split("/")[2]
    listed = await s3_client.list_objects_v2(Bucket=bucket, Prefix="tenant-a/")
    objects = listed.get("Contents", [])
    offloaded = [o for o in objects if o["Key"].startswith(f"tenant-a/{OFFLOAD_PREFIX}")]
    # One content-addressed object, however many checkpoints refer to the value.
    assert len(offloaded) == 1, [o["Key"] for o in objects]
    assert offloaded[0]["Size"] > 1024 * 1024
    assert offloaded[0].get("StorageClass", "STANDARD") == "STANDARD"
    head = await s3_client.head_object(Bucket=bucket, Key=offloaded[0]["Key"])
    assert head.get("StorageClass", "STANDARD") == "STANDARD"

    # A fresh saver has an empty hot tier: the value must come back from S3.
    async with TieredSaver.from_urls(hot="memory://", warm=warm, cold=cold,
                                     offload_threshold=1024 * 1024) as saver:
        graph = build().compile(checkpointer=saver)
        snapshot = await graph.aget_state(config)
        assert snapshot.values["document"] == document
        assert snapshot.values["turns"] == 2
        history = [s async for s in graph.aget_state_history(config)]
        assert any(s.values.get("document") == document for s in history[1:])
