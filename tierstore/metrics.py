"""Store calls per tier and operation: counts by outcome, latency histograms, Prometheus text.

::

    router ──► metrics.timed("warm", "postgres", "put_checkpoint", call) ──► store
                 ├─ tierstore_store_calls_total{tier,backend,op,outcome}   outcome: ok | error class
                 └─ tierstore_store_seconds{tier,backend,op}               histogram, seconds

The request path (reads, writes, cache fills, archive fetches, offload) is timed
where the router calls a store; with a tracer provider set (``tierstore.tracing``)
the same place opens a span ``tierstore.store.<tier>.<op>`` with these labels.
``render`` writes the Prometheus text format (0.0.4) with no client library,
together with the saver's event counters (``tierstore_events_total{event="hot_hits"}``
…); serve it from the app that owns the saver, e.g.
``return PlainTextResponse(saver.metrics_text())``.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tierstore.tracing import Tracing, finish, store_span

__all__ = ["BUCKETS", "Metrics"]

T = TypeVar("T")

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0)
"""Upper bounds (seconds) of the latency buckets: a Redis hit to a Glacier-class fetch."""

_Series = tuple[str, str, str]  # tier, backend, op


@dataclass(slots=True)
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    count: int = 0


class Metrics:
    """Counters and histograms of one saver; cheap enough for every call (no lock: one loop)."""

    def __init__(self, tracing: Tracing | None = None) -> None:
        self.tracing = tracing if tracing is not None else Tracing()
        self._calls: dict[tuple[str, str, str, str], int] = {}
        self._latency: dict[_Series, _Histogram] = {}

    def observe(self, tier: str, backend: str, op: str, seconds: float,
                outcome: str = "ok") -> None:
        key = (tier, backend, op, outcome)
        self._calls[key] = self._calls.get(key, 0) + 1
        hist = self._latency.get((tier, backend, op))
        if hist is None:
            hist = self._latency[(tier, backend, op)] = _Histogram()
        position = bisect.bisect_left(BUCKETS, seconds)
        if position < len(BUCKETS):
            hist.buckets[position] += 1
        hist.total += seconds
        hist.count += 1

    async def timed(self, tier: str, store: Any, op: str, call: Awaitable[T]) -> T:
        """Await ``call`` (a call on ``store``) and record its latency and outcome."""
        backend = str(getattr(store, "backend", "unknown"))
        tracer = self.tracing.tracer()
        if tracer is not None:
            return await self._traced(tracer, tier, backend, op, call)
        started = time.perf_counter()
        try:
            result = await call
        except BaseException as exc:
            self.observe(tier, backend, op, time.perf_counter() - started, type(exc).__name__)
            raise
        self.observe(tier, backend, op, time.perf_counter() - started)
        return result

    async def _traced(self, tracer: Any, tier: str, backend: str, op: str,
                      call: Awaitable[T]) -> T:
        """``timed`` inside a span ``tierstore.store.<tier>.<op>`` of the same labels."""
        with store_span(tracer, tier, backend, op) as span:
            started = time.perf_counter()
            try:
                result = await call
            except BaseException as exc:
                self.observe(tier, backend, op, time.perf_counter() - started,
                             type(exc).__name__)
                finish(span, exc)
                raise
            self.observe(tier, backend, op, time.perf_counter() - started)
            finish(span, None)
            return result

    def calls(self, tier: str | None = None, op: str | None = None,
              outcome: str | None = None) -> int:
        """How many calls match (every argument left None matches anything)."""
        return sum(n for (t, _b, o, out), n in self._calls.items()
                   if (tier is None or t == tier) and (op is None or o == op)
                   and (outcome is None or out == outcome))

    def snapshot(self) -> dict[str, Any]:
        """The same numbers as plain data (``tierstore status --json`` style)."""
        return {
            "calls": [{"tier": t, "backend": b, "op": o, "outcome": out, "count": n}
                      for (t, b, o, out), n in sorted(self._calls.items())],
            "latency": [{"tier": t, "backend": b, "op": o, "count": h.count,
                         "seconds": h.total}
                        for (t, b, o), h in sorted(self._latency.items())],
        }

    def render(self, events: Mapping[str, int] | None = None) -> str:
        """Prometheus text exposition of every series (and ``events`` as counters)."""
        lines = ["# HELP tierstore_store_calls_total Store calls by tier, backend, "
                 "operation and outcome.",
                 "# TYPE tierstore_store_calls_total counter"]
        for (tier, backend, op, outcome), n in sorted(self._calls.items()):
            labels = _labels(tier=tier, backend=backend, op=op, outcome=outcome)
            lines.append(f"tierstore_store_calls_total{{{labels}}} {n}")
        lines += ["# HELP tierstore_store_seconds Latency of store calls.",
                  "# TYPE tierstore_store_seconds histogram"]
        for (tier, backend, op), hist in sorted(self._latency.items()):
            base = _labels(tier=tier, backend=backend, op=op)
            running = 0
            for bound, n in zip(BUCKETS, hist.buckets, strict=True):
                running += n
                lines.append(f'tierstore_store_seconds_bucket{{{base},le="{bound:g}"}} {running}')
            lines.append(f'tierstore_store_seconds_bucket{{{base},le="+Inf"}} {hist.count}')
            lines.append(f"tierstore_store_seconds_sum{{{base}}} {hist.total!r}")
            lines.append(f"tierstore_store_seconds_count{{{base}}} {hist.count}")
        if events:
            lines += ["# HELP tierstore_events_total Router events (hot hits, conflicts, …).",
                      "# TYPE tierstore_events_total counter"]
            lines += [f"tierstore_events_total{{{_labels(event=name)}}} {n}"
                      for name, n in sorted(events.items())]
        return "\n".join(lines) + "\n"


def _labels(**values: str) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in values.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
