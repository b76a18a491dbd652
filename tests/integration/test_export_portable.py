"""An export file is read by every release: no payload in it needs the zstd dictionary."""

from __future__ import annotations

from pathlib import Path

from langchain_core.messages import AIMessage

from tests.stacks import Stack
from tierstore.ops import export_thread, import_file, read_export


async def test_an_export_carries_no_dictionary_stage(tmp_path: Path) -> None:
    stack = Stack("sqlite", None, f"sqlite:///{tmp_path}/w.db", None)
    text = "a reply long enough to be compressed with the dictionary, " * 12
    async with stack.open() as saver:
        from langgraph.checkpoint.base import empty_checkpoint

        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"messages": [AIMessage(text, id="m1")]}
        checkpoint["channel_versions"] = {"messages": f"{1:032}.0"}
        config = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
        stored = await saver.aput(config, checkpoint, {"source": "loop", "step": 0,
                                                       "note": text}, {"messages": f"{1:032}.0"})
        await saver.aput_writes(stored, [("messages", [AIMessage(text, id="m2")])], "task")
        path = tmp_path / "t.tsx"
        await export_thread(saver, "t", path)
        _, records = read_export(path.read_bytes())
        tags = [p.tag for r in records for p in (r.checkpoint, r.metadata, *r.blobs.values(),
                                                  *(w.payload for w in r.writes))]
        assert tags and all("zstd.d1" not in tag for tag in tags), tags
        assert any(tag.endswith("+zstd") for tag in tags)
        await import_file(saver, path, as_thread="t-copy")
        got = await saver.aget_tuple({"configurable": {"thread_id": "t-copy"}})
        assert got is not None
        assert got.checkpoint["channel_values"]["messages"][0].content == text
        assert got.metadata["note"] == text
        assert [w[2][0].content for w in got.pending_writes or ()] == [text]
