"""A real OTLP/HTTP receiver for the trace tests: it takes what the
OpenTelemetry SDK's exporter posts to ``/v1/traces`` (protobuf), decodes it
with ``opentelemetry-proto``, and keeps every span once.

An exporter may send a batch again when it took the first answer for lost
(its timeout ran out under load, or the connection broke after the body
went): OTLP receivers see the same span twice, and backends keep it once by
its IDs. So does this one, counting the repeats in ``repeated``."""

from __future__ import annotations

import dataclasses
import gzip
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gateway.cli.embedded_redis import free_port

__all__ = ["OtlpReceiver", "Span"]


@dataclasses.dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    #: ``(trace_id, span_id)`` of each link.
    links: list[tuple[str, str]]
    status_code: int


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class OtlpReceiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[Span] = []
        self.repeated = 0
        self._seen: set[tuple[str, str]] = set()
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._keep(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _keep(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found.append(
                        Span(
                            service=str(resource.get("service.name", "")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=[
                                (link.trace_id.hex(), link.span_id.hex()) for link in span.links
                            ],
                            status_code=span.status.code,
                        )
                    )
        with self._changed:
            for span in found:
                if (span.trace_id, span.span_id) in self._seen:
                    self.repeated += 1
                    continue
                self._seen.add((span.trace_id, span.span_id))
                self.spans.append(span)
            self._changed.notify_all()

    def wait_for(
        self, predicate: Callable[[list[Span]], bool], timeout: float = 30.0
    ) -> list[Span]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.spans):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({(s.service, s.name) for s in self.spans})
                    raise AssertionError(f"the expected spans did not come; got {names}")
                self._changed.wait(remaining)
            return list(self.spans)

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
