"""``jobs.tracing`` with a real OpenTelemetry SDK tracer that keeps its spans in
memory: a new run's span starts a trace of its own wherever it is made."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jobs import tracing


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    kept = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("unit"))
    yield kept
    provider.shutdown()


def test_a_new_runs_span_is_a_root_even_inside_another_span(
    exporter: InMemorySpanExporter,
) -> None:
    """A child run's span made while a report's span is current (a database
    writer that took on its first caller's context) is not that report's
    child: it starts a new trace, linked to the parent run's."""
    parent = tracing.mint("new run parent")
    with tracing.span("report started", parent=parent) as current:
        outer = tracing.traceparent_of(current)
        minted = tracing.mint("new run echo", links=[parent])
    assert tracing.trace_id_of(minted) not in (
        tracing.trace_id_of(outer),
        tracing.trace_id_of(parent),
    )
    [made] = [s for s in exporter.get_finished_spans() if s.name == "new run echo"]
    assert made.parent is None
    assert [f"{link.context.span_id:016x}" for link in made.links] == [parent.split("-")[2]]


def test_a_new_runs_span_with_a_parent_is_its_child(exporter: InMemorySpanExporter) -> None:
    parent = tracing.mint("trigger echo")
    minted = tracing.mint("new run echo", parent=parent)
    assert tracing.trace_id_of(minted) == tracing.trace_id_of(parent)
    [made] = [s for s in exporter.get_finished_spans() if s.name == "new run echo"]
    assert made.parent is not None and f"{made.parent.span_id:016x}" == parent.split("-")[2]
