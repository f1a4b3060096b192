"""A real webhook receiver on loopback that verifies each call with `standardwebhooks`
(and serves files to GET, for tasks that download images).

Each test uses paths of its own, scripts the answers per path, and waits on
the calls it expects (a condition variable, not sleeps).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.cli.embedded_redis import free_port


@dataclasses.dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    #: The secrets (of those registered for the path) that verify this call.
    verified_by: list[str]
    #: When it arrived (``time.monotonic()``).
    at: float = dataclasses.field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def signatures(self) -> list[str]:
        return self.headers.get("webhook-signature", "").split()


@dataclasses.dataclass
class Answer:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Seconds to wait before answering (to test timeouts); the call is
    #: recorded at once, so a test can wait on its arrival.
    delay: float = 0.0
    #: Called in the receiver's thread as the call arrives, before the answer
    #: (to act while the sender is certain to be waiting for it).
    arrived: Callable[[], None] | None = None


class Receiver:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self.calls: list[Call] = []
        self.scripts: dict[str, list[Answer]] = {}
        self.defaults: dict[str, Answer] = {}
        self.secrets: dict[str, list[str]] = {}
        #: Files served to GET requests: path → (body, content type).
        self.files: dict[str, tuple[bytes, str]] = {}
        #: Seconds to wait before serving a file (a slow download).
        self.slow: dict[str, float] = {}
        self._changed = threading.Condition()
        # Set on stop, so a delayed answer never outlives the receiver.
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    # what to answer ------------------------------------------------------------

    def script(self, path: str, *answers: Answer | int) -> None:
        """Answer the next calls to ``path`` with these, in order."""
        self.scripts[path] = [a if isinstance(a, Answer) else Answer(a) for a in answers]

    def default(self, path: str, answer: Answer | int) -> None:
        self.defaults[path] = answer if isinstance(answer, Answer) else Answer(answer)

    def verify_with(self, path: str, *secrets: str) -> None:
        self.secrets[path] = list(secrets)

    def _answer(self, path: str) -> Answer:
        script = self.scripts.get(path)
        if script:
            return script.pop(0)
        return self.defaults.get(path, Answer())

    # what came in --------------------------------------------------------------

    def calls_to(self, path: str) -> list[Call]:
        with self._changed:
            return [c for c in self.calls if c.path == path]

    def wait_for(
        self, predicate: Callable[[list[Call]], bool], path: str, timeout: float = 20.0
    ) -> list[Call]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                calls = [c for c in self.calls if c.path == path]
                if predicate(calls):
                    return calls
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{path}: the expected calls did not come; got {calls}")
                self._changed.wait(remaining)

    def wait_calls(self, path: str, count: int, timeout: float = 20.0) -> list[Call]:
        return self.wait_for(lambda calls: len(calls) >= count, path, timeout)

    def _record(self, call: Call) -> None:
        with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    # the server ----------------------------------------------------------------

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                if len(body) < length:
                    # The sender went away mid-request (a killed worker): no
                    # receiver acts on half a request, so none is recorded.
                    self.close_connection = True
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified = []
                for secret in receiver.secrets.get(self.path, []):
                    try:
                        Webhook(secret).verify(body, headers)
                        verified.append(secret)
                    except WebhookVerificationError:
                        pass
                answer = receiver._answer(self.path)
                receiver._record(Call(self.path, headers, body, verified))
                if answer.arrived is not None:
                    answer.arrived()
                if answer.delay:
                    receiver._release.wait(answer.delay)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def do_GET(self) -> None:
                if self.path in receiver.slow:
                    receiver._release.wait(receiver.slow[self.path])
                found = receiver.files.get(self.path)
                body, content_type = found or (b"not found", "text/plain")
                self.send_response(200 if found else 404)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._release.clear()
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
