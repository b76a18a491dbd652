"""OpenTelemetry spans of a saver, read back from the SDK's in-memory exporter."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tests.servers.redis import free_port
from tierstore import TieredSaver
from tierstore.demo import build_agent
from tierstore.errors import InvalidInput
from tierstore.tracing import Tracing, thread_hash

THREAD = "customer-42@example.com"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    out = InMemorySpanExporter()
    yield out
    out.shutdown()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    yield p
    p.shutdown()


def embedded(tmp_path: Path, hot: str = "memory://") -> TieredSaver:
    return TieredSaver.from_urls(hot=hot, warm=f"sqlite:///{tmp_path}/warm.db",
                                 cold=f"file://{tmp_path}/cold", hot_write_delay=0)


def by_id(spans: tuple[ReadableSpan, ...]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in spans if s.context is not None}


def every_value(span: ReadableSpan) -> list[str]:
    """Everything a span says, as text: its name, attributes, events and status."""
    values = [span.name, str(span.status.description or "")]
    values += [str(v) for v in (span.attributes or {}).values()]
    for event in span.events:
        values.append(event.name)
        values += [str(v) for v in (event.attributes or {}).values()]
    return values


async def test_a_turn_yields_saver_spans_with_store_children(
        tmp_path: Path, provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    async with embedded(tmp_path).trace_with(provider) as saver:
        app = build_agent().compile(checkpointer=saver)
        tracer = provider.get_tracer("app")
        with tracer.start_as_current_span("turn"):
            await app.ainvoke({"messages": [HumanMessage("remember tea")]},
                              {"configurable": {"thread_id": THREAD}})
        [_ async for _ in saver.alist({"configurable": {"thread_id": THREAD}}, limit=1)]
    spans = exporter.get_finished_spans()
    index = by_id(spans)
    turn = next(s for s in spans if s.name == "turn")
    saver_spans = [s for s in spans if s.name.startswith("tierstore.saver.")]
    store_spans = [s for s in spans if s.name.startswith("tierstore.store.")]
    names = {s.name for s in saver_spans}
    assert {"tierstore.saver.aget_tuple", "tierstore.saver.aput",
            "tierstore.saver.aput_writes", "tierstore.saver.alist"} <= names
    hashed = thread_hash(THREAD)
    for span in saver_spans:
        attrs = span.attributes or {}
        assert attrs["tierstore.op"] == span.name.removeprefix("tierstore.saver.")
        assert attrs["tierstore.thread"] == hashed
        assert attrs["tierstore.outcome"] == "ok"
        assert span.status.status_code is StatusCode.UNSET
    # the graph's calls hang under the app's span
    assert all(s.parent is not None and s.parent.span_id == turn.context.span_id
               for s in saver_spans if s.name != "tierstore.saver.alist")
    # every store call of the turn is a child of the saver call that made it
    for span in store_spans:
        assert span.parent is not None, span.name
        parent = index[span.parent.span_id]
        assert parent.name.startswith("tierstore.saver."), (span.name, parent.name)
        attrs = span.attributes or {}
        tier, op = str(attrs["tierstore.tier"]), str(attrs["tierstore.op"])
        assert span.name == f"tierstore.store.{tier}.{op}"
        assert attrs["tierstore.thread"] == hashed
        assert attrs["tierstore.outcome"] == "ok"
    puts = [s for s in store_spans if s.name == "tierstore.store.warm.put_checkpoint"]
    assert puts
    assert all(index[s.parent.span_id].name == "tierstore.saver.aput"  # type: ignore[union-attr]
               for s in puts)
    assert {(s.attributes or {})["tierstore.backend"] for s in puts} == {"sqlite"}
    assert any(s.name == "tierstore.store.hot.put" for s in store_spans)
    listing = [s for s in store_spans if s.name == "tierstore.store.warm.list"]
    assert listing
    assert index[listing[0].parent.span_id].name == "tierstore.saver.alist"  # type: ignore[union-attr]
    # as many store spans as the metrics counted calls (the same places time them)
    assert len(store_spans) == saver.metrics.calls()
    assert not any(THREAD in value for s in spans for value in every_value(s))


async def test_an_unreachable_hot_tier_shows_in_the_spans(
        tmp_path: Path, provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0?connect_timeout=0.2&timeout=0.3"
    async with embedded(tmp_path, hot=dead).trace_with(provider) as saver:
        app = build_agent().compile(checkpointer=saver)
        out = await app.ainvoke({"messages": [HumanMessage("what is 2 + 2")]},
                                {"configurable": {"thread_id": THREAD}})
    assert out["messages"]  # the turn went through on warm
    spans = exporter.get_finished_spans()
    index = by_id(spans)
    hot = [s for s in spans if s.name.startswith("tierstore.store.hot.")]
    assert hot
    for span in hot:
        assert span.status.status_code is StatusCode.ERROR
        attrs = span.attributes or {}
        assert attrs["error.type"] == attrs["tierstore.outcome"] == "TierUnavailable"
        assert attrs["tierstore.backend"] == "redis"
    # the saver calls succeeded, and say that the hot tier failed under them
    parents = {index[s.parent.span_id].name for s in hot if s.parent is not None}
    assert parents <= {s.name for s in spans if s.name.startswith("tierstore.saver.")}
    for span in spans:
        if span.name in parents:
            assert span.status.status_code is StatusCode.UNSET
            assert (span.attributes or {})["tierstore.outcome"] == "ok"
    events = [e for s in spans for e in s.events if e.name == "tierstore.hot_error"]
    assert events
    assert {(e.attributes or {})["error.type"] for e in events} == {"TierUnavailable"}
    assert not any(THREAD in value for s in spans for value in every_value(s))


async def test_a_refused_call_is_an_error_span_without_its_message(
        tmp_path: Path, provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    async with embedded(tmp_path).trace_with(provider) as saver:
        with pytest.raises(InvalidInput, match="checkpoint_id"):
            await saver.aput_writes({"configurable": {"thread_id": THREAD}},
                                    [("a", 1)], "task")
    [span] = exporter.get_finished_spans()
    assert span.name == "tierstore.saver.aput_writes"
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "InvalidInput"
    assert not span.events  # no exception event: its message may name the thread
    assert not any(THREAD in value for value in every_value(span))


async def test_a_listing_read_in_part_ends_its_spans_ok(
        tmp_path: Path, provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    async with embedded(tmp_path).trace_with(provider) as saver:
        app = build_agent().compile(checkpointer=saver)
        config: RunnableConfig = {"configurable": {"thread_id": THREAD}}
        await app.ainvoke({"messages": [HumanMessage("hello")]}, config)
        exporter.clear()
        async for _ in saver.alist(config):
            break
    names = {s.name: s for s in exporter.get_finished_spans()}
    assert set(names) == {"tierstore.saver.alist", "tierstore.store.warm.list"}
    for span in names.values():
        assert (span.attributes or {})["tierstore.outcome"] == "ok"


def test_no_provider_no_spans() -> None:
    """The API's default (no provider set) records nothing: the saver does not trace."""
    assert Tracing().tracer() is None


def run_python(code: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=300)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_without_the_opentelemetry_package_the_saver_works(tmp_path: Path) -> None:
    out = run_python(f"""
import sys, json, asyncio
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
from tierstore import TieredSaver
from tierstore.tracing import available, Tracing
from tierstore.demo import build_agent
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig

async def main():
    async with TieredSaver.from_urls(hot="memory://", warm="sqlite:///{tmp_path}/w.db",
                                     cold=None) as saver:
        app = build_agent().compile(checkpointer=saver)
        await app.ainvoke({{"messages": [HumanMessage("hi")]}},
                          {{"configurable": {{"thread_id": "t"}}}})
        return saver.metrics.calls("warm", "put_checkpoint")
puts = asyncio.run(main())
print(json.dumps({{"available": available(), "tracer": Tracing().tracer() is None,
                  "puts": puts}}))
""")
    assert out == {"available": False, "tracer": True, "puts": out["puts"]}
    assert isinstance(out["puts"], int)
    assert out["puts"] > 0


def test_the_global_provider_is_used_once_set(tmp_path: Path) -> None:
    out = run_python(f"""
import json, asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tierstore import TieredSaver

async def main():
    async with TieredSaver.from_urls(hot=None, warm="sqlite:///{tmp_path}/w.db",
                                     cold=None) as saver:
        await saver.aget_tuple({{"configurable": {{"thread_id": "a"}}}})
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        await saver.aget_tuple({{"configurable": {{"thread_id": "b"}}}})
        return sorted(s.name for s in exporter.get_finished_spans())
print(json.dumps({{"names": asyncio.run(main())}}))
""")
    assert out == {"names": ["tierstore.saver.aget_tuple", "tierstore.store.warm.get"]}


def test_a_sync_call_joins_the_callers_trace(tmp_path: Path, provider: TracerProvider,
                                             exporter: InMemorySpanExporter) -> None:
    """``invoke`` runs the saver on its own loop; its spans still belong to the caller's."""
    with embedded(tmp_path).trace_with(provider) as saver:
        app = build_agent().compile(checkpointer=saver)
        with provider.get_tracer("app").start_as_current_span("request") as request:
            app.invoke({"messages": [HumanMessage("remember sync")]},
                       {"configurable": {"thread_id": THREAD}})
    spans = exporter.get_finished_spans()
    saver_spans = [s for s in spans if s.name.startswith("tierstore.saver.")]
    assert {s.name for s in saver_spans} >= {"tierstore.saver.aput", "tierstore.saver.aget_tuple"}
    for span in saver_spans:
        assert span.parent is not None and span.parent.span_id == request.get_span_context().span_id
        assert span.context is not None
        assert span.context.trace_id == request.get_span_context().trace_id
