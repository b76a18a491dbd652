"""What tracing costs per call: a store call timed by ``Metrics.timed`` and a saver read.

Each mode runs in a fresh interpreter, so one mode's imports cannot touch another's; the
times are CPU time (``time.process_time``), steadier than wall time on a shared machine:

- ``no-otel``     the ``opentelemetry`` package hidden (``tierstore[otel]`` not installed)
- ``no-provider`` the API installed, no tracer provider set (the API's default)
- ``sdk``         the SDK's provider with a span processor that drops every span
- ``sdk-memory``  the SDK's provider exporting to an ``InMemorySpanExporter``

``python loadtest/trace_overhead.py [--calls 200000] [--reads 20000] [--repeat 5]``;
give ``--baseline /path/to/checkout`` to run the ``no-otel`` and ``no-provider`` modes
against another tree too (the code before tracing, say) for the ratio against it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("no-otel", "no-provider", "sdk", "sdk-memory")

CHILD = r"""
import asyncio, json, sys, time
mode, calls, reads, repeat, tmp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5]
if mode == "no-otel":
    sys.modules["opentelemetry"] = None
if mode.startswith("sdk"):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, \
        SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    exporter = InMemorySpanExporter() if mode == "sdk-memory" else Drop()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
else:
    exporter = None
from tierstore import TieredSaver
from tierstore.metrics import Metrics

class Store:
    backend = "memory"

async def nothing():
    return None

async def timed_calls():
    m, store = Metrics(), Store()
    started = time.process_time()
    for _ in range(calls):
        await m.timed("warm", store, "get", nothing())
    return (time.process_time() - started) / calls

async def saver_reads():
    async with TieredSaver.from_urls(hot="memory://", warm=f"sqlite:///{tmp}/w.db",
                                     cold=None, hot_write_delay=0) as saver:
        config = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
        checkpoint = {"v": 4, "id": "1f0c0a00-0000-6000-8000-000000000001", "ts": "x",
                      "channel_values": {"a": 1}, "channel_versions": {"a": "1"},
                      "versions_seen": {}, "updated_channels": None}
        await saver.aput(config, checkpoint, {"source": "input", "step": 0}, {"a": "1"})
        started = time.process_time()
        for _ in range(reads):
            await saver.aget_tuple(config)
            if exporter is not None and hasattr(exporter, "clear"):
                exporter.clear()
        return (time.process_time() - started) / reads

best_timed = min(asyncio.run(timed_calls()) for _ in range(repeat))
best_read = min(asyncio.run(saver_reads()) for _ in range(repeat))
print(json.dumps({"timed_us": best_timed * 1e6, "read_us": best_read * 1e6}))
"""


def run(tree: Path, mode: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(args.calls), str(args.reads),
             str(args.repeat), tmp], env=env, cwd=tree, capture_output=True, text=True,
            check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    rows: list[tuple[str, dict[str, float]]] = []
    if args.baseline is not None:
        rows += [(f"baseline {mode}", run(args.baseline, mode, args))
                 for mode in ("no-otel", "no-provider")]
    rows += [(mode, run(here, mode, args)) for mode in MODES]
    base = rows[0][1]
    print(f"{'mode':<22} {'timed µs':>9} {'ratio':>6} {'aget_tuple µs':>14} {'ratio':>6}")
    for name, r in rows:
        print(f"{name:<22} {r['timed_us']:>9.3f} {r['timed_us'] / base['timed_us']:>6.2f} "
              f"{r['read_us']:>14.2f} {r['read_us'] / base['read_us']:>6.2f}")


if __name__ == "__main__":
    main()
