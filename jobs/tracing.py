"""OpenTelemetry traces of runs, shared by the gateway and its workers.

One trace per run. The span that makes a run (a trigger request, or the
making of a child, a scheduled or a replayed run) is its root, and its W3C
``traceparent`` is kept with the run (``runs.traceparent``). Every later span
of the run hangs under it, across processes:

- ``trigger <task>`` (gateway, SERVER): the request; a child of the caller's
  ``traceparent`` header when it sent one;
- ``run <task>`` (worker, CONSUMER): an attempt, with a ``step <name>`` span
  per durable step run in it;
- ``report <type>`` (gateway): a worker's report applied, a child of the
  attempt that sent it;
- ``callback <event>`` (worker, CLIENT): one attempt at one callback, which
  carries its own ``traceparent`` header to the receiver.

A child run starts a trace of its own, linked to its parent's.

Traces are exported over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (the SDK reads the other
standard ``OTEL_*`` variables itself: headers, timeouts, the batch's delay,
``OTEL_SERVICE_NAME``). Otherwise nothing of OpenTelemetry is even imported:
:func:`span` gives a shared no-op and :func:`mint` ``None``, so tracing off
costs one attribute read per call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "HEADER",
    "enabled",
    "error",
    "inject",
    "mint",
    "setup",
    "shutdown",
    "span",
    "spans",
    "trace_id_of",
]

log = logging.getLogger("jobs.tracing")

#: The W3C header a trace context travels in.
HEADER = "traceparent"

_tracer: Tracer | None = None


def enabled() -> bool:
    return _tracer is not None


def wanted(env: Mapping[str, str]) -> bool:
    """Whether ``env`` asks for traces (the standard variables)."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def setup(service_name: str, env: Mapping[str, str]) -> bool:
    """Export this process's spans over OTLP/HTTP if ``env`` asks for it."""
    global _tracer
    if _tracer is not None or not wanted(env):
        return _tracer is not None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("webhook-job-gateway")
    log.info("traces go over OTLP as %s", resource.attributes[SERVICE_NAME])
    return True


def shutdown() -> None:
    """Send what is buffered (a stopping process)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    flush = getattr(provider, "shutdown", None)
    if flush is not None:
        flush()


def _context(traceparent: str | None, *, root: bool = False) -> Any:
    """The context a span starts in: ``traceparent``'s, else the current one
    (``None``), or with ``root`` none at all (a new trace)."""
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not traceparent:
        return Context() if root else None
    return TraceContextTextMapPropagator().extract({HEADER: traceparent})


def _links(traceparents: Sequence[str | None]) -> list[Any]:
    from opentelemetry import trace

    links = []
    for traceparent in traceparents:
        context = _context(traceparent)
        if context is None:
            continue
        linked = trace.get_current_span(context).get_span_context()
        if linked.is_valid:
            links.append(trace.Link(linked))
    return links


def _traceparent(span: Span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[str | None] = (),
    root: bool = False,
) -> Iterator[Span | None]:
    """A span, current while the block runs: a child of ``parent`` (a
    ``traceparent``) if given, else of the current span, or with ``root`` of
    none. ``None`` when tracing is off. An exception out of the block marks
    it an error."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import trace

    with _tracer.start_as_current_span(
        name,
        context=_context(parent, root=root),
        kind=getattr(trace.SpanKind, kind.upper()),
        attributes={k: v for k, v in (attributes or {}).items() if v is not None},
        links=_links(links),
    ) as current:
        yield current


@contextlib.contextmanager
def spans(
    items: Sequence[tuple[str, str | None, Mapping[str, Any]]],
) -> Iterator[list[Span | None]]:
    """Spans side by side, one per ``(name, parent, attributes)`` whose
    parent is given (``None`` for the others), open while the block runs:
    work on many runs done together (a batch of reports in one transaction)."""
    if _tracer is None:
        yield [None] * len(items)
        return
    opened = [
        _tracer.start_span(
            name,
            context=_context(parent),
            attributes={k: v for k, v in attributes.items() if v is not None},
        )
        if parent
        else None
        for name, parent, attributes in items
    ]
    try:
        yield opened
    finally:
        for one in opened:
            if one is not None:
                one.end()


def traceparent_of(current: Span | None) -> str | None:
    """The ``traceparent`` that makes spans children of ``current``."""
    return None if current is None else _traceparent(current)


def mint(name: str, *, parent: str | None = None, links: Sequence[str | None] = ()) -> str | None:
    """The ``traceparent`` of a new run's span ``name``, made and ended now
    (``None`` when tracing is off): a child of ``parent`` if given, else the
    root of a new trace, whatever span is current where it is made (a
    database writer's, say)."""
    if _tracer is None:
        return None
    with span(name, parent=parent, links=links, root=True) as made:
        return traceparent_of(made)


def inject(headers: dict[str, str]) -> None:
    """Put the current span's ``traceparent`` in ``headers``."""
    if _tracer is None:
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    if current.get_span_context().is_valid:
        headers[HEADER] = _traceparent(current)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace ID a ``traceparent`` names (32 hex digits)."""
    if not traceparent or len(traceparent) < 55:
        return None
    return traceparent[3:35]


def error(current: Span | None, code: str, message: str) -> None:
    """Mark ``current`` as failed with an ``error.code``."""
    if current is None:
        return
    from opentelemetry.trace import Status, StatusCode

    current.set_attribute("error.code", code)
    current.set_status(Status(StatusCode.ERROR, message[:500]))
