"""OpenTelemetry spans for saver calls and the store calls under them (``tierstore[otel]``).

::

    graph turn (the app's span, if any)
      └─ tierstore.saver.aput            tierstore.op=aput, tierstore.thread=<hash>,
           │                             tierstore.outcome=ok | error class
           ├─ tierstore.store.warm.put_checkpoint
           │      tierstore.tier/backend/op/outcome (the labels of
           │      tierstore_store_calls_total), tierstore.thread=<hash>
           └─ tierstore.store.hot.put    a failed hot call: status ERROR, error.type;
                                         the saver span gets a ``tierstore.hot_error``
                                         event and stays ok (the hot tier is an accelerator)

A store span is opened where ``Metrics.timed`` times the call, so spans and metrics
name the same calls with the same labels. The thread id is never recorded: spans
carry ``thread_hash`` of it (the first 16 hex digits of its BLAKE2b), enough to
find one thread's calls, not to read its id back; nor are exception messages, which
may name a thread: an error is its class (``error.type``) and the span's status.

Off costs nothing measurable: without the ``opentelemetry`` package, or while no
tracer provider is set (the API's default proxy), ``Tracing.tracer()`` is one check
and the call runs as before. A saver uses the global provider unless it was given
one (``TieredSaver.trace_with``).
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

try:
    from opentelemetry import trace as _otel
    from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
    from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, StatusCode
except ModuleNotFoundError:  # pragma: no cover - exercised in a subprocess without the extra
    _otel = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "SPAN_PREFIX", "Tracing", "available", "config_thread", "finish", "first_thread",
    "no_thread", "note_hot_error", "start_store_span",
    "store_span", "thread_hash", "traced", "traced_iter",
]

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")

SPAN_PREFIX = "tierstore"
_SCOPE = "tierstore"
# a provider named in the environment is loaded by the API's first get_tracer_provider()
_NAMED_IN_ENV = _otel is not None and OTEL_PYTHON_TRACER_PROVIDER in os.environ

_thread: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tierstore_trace_thread", default=None)


def available() -> bool:
    """Whether the OpenTelemetry API is importable (``pip install 'tierstore[otel]'``)."""
    return _otel is not None


def thread_hash(thread_id: str) -> str:
    """What spans record of a thread id: 16 hex digits of its BLAKE2b, never the id."""
    return hashlib.blake2b(thread_id.encode("utf-8", "surrogatepass"),
                           digest_size=8).hexdigest()


class Tracing:
    """Where one saver's spans go: an explicit tracer provider, else the global one."""

    __slots__ = ("_global", "_provider", "_tracer")

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._provider = provider
        self._tracer: Tracer | None = None
        self._global: tuple[object, Tracer] | None = None  # (provider, its tracer)
        if provider is not None:
            if _otel is None:  # pragma: no cover - a provider implies the API is there
                raise ModuleNotFoundError("opentelemetry")
            self._tracer = provider.get_tracer(_SCOPE)

    def tracer(self) -> Tracer | None:
        """The tracer to record with, or None when nothing would record the spans."""
        if self._tracer is not None:
            return self._tracer
        if _otel is None:
            return None
        if _unset():
            return None
        provider = _otel.get_tracer_provider()
        if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
            return None
        seen = self._global
        if seen is None or seen[0] is not provider:
            seen = self._global = (provider, provider.get_tracer(_SCOPE))
        return seen[1]


def _unset() -> bool:
    """No global provider yet: the API's module variable, read without the environment
    lookup ``get_tracer_provider`` makes on every call while none is set. Should the
    variable ever go, the public call decides (``False`` is not None)."""
    return getattr(_otel, "_TRACER_PROVIDER", False) is None and not _NAMED_IN_ENV


def _store_attributes(tier: str, backend: str, op: str) -> dict[str, str]:
    attributes = {"tierstore.tier": tier, "tierstore.backend": backend, "tierstore.op": op}
    thread = _thread.get()
    if thread is not None:
        attributes["tierstore.thread"] = thread
    return attributes


@contextmanager
def store_span(tracer: Tracer, tier: str, backend: str, op: str) -> Iterator[Span]:
    """The current span of one store call; the caller records its outcome (``finish``)."""
    with tracer.start_as_current_span(
            f"{SPAN_PREFIX}.store.{tier}.{op}", attributes=_store_attributes(tier, backend, op),
            record_exception=False, set_status_on_exception=False) as span:
        yield span


def start_store_span(tracer: Tracer, tier: str, backend: str, op: str) -> Span:
    """A store span that is not made current: a streamed call (a listing) that yields to
    its caller between rows. The caller ends it, after ``finish``."""
    return tracer.start_span(f"{SPAN_PREFIX}.store.{tier}.{op}",
                             attributes=_store_attributes(tier, backend, op))


def finish(span: Span, error: BaseException | None) -> None:
    """Record the outcome the metrics record: ``ok`` or the error's class (no message)."""
    if error is None:
        span.set_attribute("tierstore.outcome", "ok")
        return
    kind = type(error).__name__
    span.set_attribute("tierstore.outcome", kind)
    span.set_attribute("error.type", kind)
    span.set_status(StatusCode.ERROR, kind)


def note_hot_error(op: str, error: BaseException) -> None:
    """On the current (saver) span: a hot call failed and was served from warm instead."""
    if _otel is None:
        return
    span = _otel.get_current_span()
    if span.is_recording():
        span.add_event("tierstore.hot_error", {"tierstore.op": op,
                                               "error.type": type(error).__name__})


def traced(
    op: str, thread_of: Callable[..., str | None],
) -> Callable[[Callable[Concatenate[S, P], Coroutine[Any, Any, T]]],
              Callable[Concatenate[S, P], Coroutine[Any, Any, T]]]:
    """A saver method as a span ``tierstore.saver.<op>``; ``thread_of(*args, **kwargs)``
    finds the thread id in the call's arguments (None: several or none)."""

    def wrap(method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]]
             ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
        async def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
            tracing: Tracing = self.tracing  # type: ignore[attr-defined]
            tracer = tracing.tracer()
            if tracer is None:
                return await method(self, *args, **kwargs)
            with _saver_span(tracer, op, _safe_thread(thread_of, args, kwargs)) as span:
                try:
                    result = await method(self, *args, **kwargs)
                except BaseException as exc:
                    finish(span, exc)
                    raise
                finish(span, None)
                return result

        # the method's signature too (``__wrapped__``): LangGraph reads it, e.g. to pass
        # ``task_path`` to ``aput_writes`` only to a saver that takes it
        return functools.wraps(method)(run)

    return wrap


def traced_iter(
    op: str, thread_of: Callable[..., str | None],
) -> Callable[[Callable[Concatenate[S, P], AsyncIterator[T]]],
              Callable[Concatenate[S, P], AsyncIterator[T]]]:
    """``traced`` for an async generator: one span from the first item to the end.

    The span is current only while the generator runs (each step), never across a
    ``yield``: the caller's code between items is not inside it, and a generator
    closed from another task detaches nothing it did not attach.
    """

    def wrap(method: Callable[Concatenate[S, P], AsyncIterator[T]]
             ) -> Callable[Concatenate[S, P], AsyncIterator[T]]:
        async def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
            tracing: Tracing = self.tracing  # type: ignore[attr-defined]
            tracer = tracing.tracer()
            inner = method(self, *args, **kwargs)
            if tracer is None:
                async for item in inner:
                    yield item
                return
            thread = _safe_thread(thread_of, args, kwargs)
            span = tracer.start_span(f"{SPAN_PREFIX}.saver.{op}",
                                     attributes=_saver_attributes(op, thread))
            error: BaseException | None = None
            try:
                while True:
                    token = _thread.set(thread)
                    try:
                        with _otel.use_span(span, end_on_exit=False,
                                            record_exception=False,
                                            set_status_on_exception=False):
                            item = await anext(inner)
                    except StopAsyncIteration:
                        break
                    finally:
                        _thread.reset(token)
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                if not isinstance(error, GeneratorExit):
                    finish(span, error)
                else:
                    finish(span, None)  # the caller stopped reading: not an error
                await _aclose(inner)
                span.end()

        # the method's signature too (``__wrapped__``): LangGraph reads it, e.g. to pass
        # ``task_path`` to ``aput_writes`` only to a saver that takes it
        return functools.wraps(method)(run)

    return wrap


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


def config_thread(config: Any = None, *args: Any, **kwargs: Any) -> str | None:
    """The thread a saver call's config names (given by position or as ``config=``)."""
    config = kwargs.get("config", config)
    return config.get("configurable", {}).get("thread_id") if config else None


def first_thread(thread_id: str, *args: Any) -> str:
    """The thread of a call whose first argument is a thread id."""
    return thread_id


def no_thread(*args: Any, **kwargs: Any) -> None:
    """A call over several threads (or runs): its span names none."""


def _safe_thread(thread_of: Callable[..., str | None], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> str | None:
    """The thread hash of a call, or None; a malformed call is the method's to refuse."""
    try:
        thread = thread_of(*args, **kwargs)
    except Exception:
        return None
    return thread_hash(thread) if isinstance(thread, str) else None


def _saver_attributes(op: str, thread: str | None) -> dict[str, str]:
    attributes = {"tierstore.op": op}
    if thread is not None:
        attributes["tierstore.thread"] = thread
    return attributes


@contextmanager
def _saver_span(tracer: Tracer, op: str, thread: str | None) -> Iterator[Span]:
    token = _thread.set(thread)
    try:
        with tracer.start_as_current_span(
                f"{SPAN_PREFIX}.saver.{op}", attributes=_saver_attributes(op, thread),
                record_exception=False, set_status_on_exception=False) as span:
            yield span
    finally:
        _thread.reset(token)
