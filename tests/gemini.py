"""A local stand-in for the Gemini REST API (``models/{model}:generateContent``).

The real google-genai SDK is pointed at it (``GEMINI_BASE_URL``). It records
what the SDK sent and answers as scripted: by default a short text made from
the prompt, so a test can tell which call an answer came from.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gateway.cli.embedded_redis import free_port

_PATH = re.compile(r"^/[^/]+/models/(?P<model>[^/:]+):generateContent$")


@dataclasses.dataclass
class Request:
    model: str
    api_key: str | None
    body: dict[str, Any]

    @property
    def user_text(self) -> str:
        parts = self.body["contents"][0]["parts"]
        return " ".join(p["text"] for p in parts if "text" in p)

    @property
    def system_text(self) -> str | None:
        instruction = self.body.get("systemInstruction")
        if not instruction:
            return None
        return " ".join(p.get("text", "") for p in instruction["parts"])

    @property
    def images(self) -> list[tuple[str, bytes]]:
        out = []
        for part in self.body["contents"][0]["parts"]:
            inline = part.get("inlineData") or part.get("inline_data")
            if inline:
                mime = inline.get("mimeType") or inline.get("mime_type")
                data = inline["data"]
                # The SDK sends URL-safe base64; accept both alphabets.
                out.append(
                    (mime, base64.urlsafe_b64decode(data.replace("+", "-").replace("/", "_")))
                )
        return out


class GeminiStandIn:
    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[Request] = []
        #: Status codes to answer with, per marker found in the prompt, in order.
        self.failures: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_with(self, marker: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if marker in r.user_text]

    def fail(self, marker: str, *codes: int) -> None:
        """Answer the next calls whose prompt holds ``marker`` with these codes."""
        with self._lock:
            self.failures[marker] = list(codes)

    def _status_for(self, text: str) -> int:
        with self._lock:
            for marker, codes in self.failures.items():
                if marker in text and codes:
                    return codes.pop(0)
        return 200

    def start(self) -> GeminiStandIn:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                match = _PATH.match(self.path.split("?")[0])
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                if match is None:
                    return self._send(
                        404,
                        {"error": {"code": 404, "message": "no such route", "status": "NOT_FOUND"}},
                    )
                request = Request(match["model"], self.headers.get("x-goog-api-key"), body)
                with stand_in._lock:
                    stand_in.requests.append(request)
                status = stand_in._status_for(request.user_text)
                if status != 200:
                    names = {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
                    message = f"stand-in says {status}"
                    if status == 400:
                        message = "API key not valid. Please pass a valid API key."
                    return self._send(
                        status,
                        {
                            "error": {
                                "code": status,
                                "message": message,
                                "status": names.get(status, "ERROR"),
                            }
                        },
                    )
                images = len(request.images)
                text = f"seen: {request.user_text[:60]} ({images} image(s))"
                self._send(
                    200,
                    {
                        "candidates": [
                            {
                                "content": {"role": "model", "parts": [{"text": text}]},
                                "finishReason": "STOP",
                            }
                        ],
                        "usageMetadata": {
                            "promptTokenCount": 11,
                            "candidatesTokenCount": 5,
                            "totalTokenCount": 16,
                        },
                        "modelVersion": request.model,
                    },
                )

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.gemini [--port N]``: the stand-in on its own, so the
    ``llm`` task and workflows with ``llm`` nodes can be tried without a key."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m tests.gemini", description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    args = parser.parse_args(argv)
    stand_in = GeminiStandIn()
    if args.port:
        stand_in.port = args.port
    stand_in.start()
    print(f"Gemini stand-in on {stand_in.url}: it answers every prompt with 'seen: <prompt>'.")
    print("Run the gateway with it:")
    print(f"  GEMINI_BASE_URL={stand_in.url} GEMINI_API_KEY=stand-in make run", flush=True)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    stand_in.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
