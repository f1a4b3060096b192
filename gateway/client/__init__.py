"""A Python client for the gateway: ``Client`` (sync) and ``AsyncClient``, on httpx.

    from gateway.client import Client

    with Client("http://127.0.0.1:8000", "gw_sk_...") as gw:
        run = gw.trigger("echo", {"hello": "world"})
        done = gw.wait(run["id"])
        print(done["status"], done["output"])

Both read ``GATEWAY_URL`` and ``GATEWAY_API_KEY`` when not given them.

Errors::

    GatewayError                 any error answer; .status_code, .code, .message, .details
     ├── AuthenticationError     401
     ├── NotFoundError           404
     ├── ConflictError           409
     ├── ValidationError         400, 413, 422
     ├── RateLimitError          429; .retry_after
     └── ServerError             5xx
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import httpx

from webhooks.verify import verify

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "GatewayError",
    "NotFoundError",
    "RateLimitError",
    "ServerError",
    "ValidationError",
    "default_url",
]

Run = dict[str, Any]
R = TypeVar("R")


class GatewayError(Exception):
    """An error answer from the gateway.

    :param status_code: the HTTP status
    :param code: the API's error code (``run_not_found``, ``validation_error``, …)
    :param message: what went wrong
    :param details: more, such as the field paths of a 422
    """

    def __init__(
        self, status_code: int, code: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details or []
        super().__init__(f"{status_code} {code}: {message}")


class AuthenticationError(GatewayError):
    """401: no API key, a bad one, or a bad or expired public token."""


class NotFoundError(GatewayError):
    """404: no such run, task, endpoint or delivery (or not this project's)."""


class ConflictError(GatewayError):
    """409: the run is in a status that does not allow this (cancel a final run)."""


class ValidationError(GatewayError):
    """400, 413 or 422: the request does not fit; ``details`` name the fields."""


class RateLimitError(GatewayError):
    """429: slow down; retry after ``retry_after`` seconds."""

    def __init__(self, *args: Any, retry_after: float = 1.0) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


class ServerError(GatewayError):
    """5xx: the gateway failed; the call may be tried again."""


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message, details = error["code"], error["message"], error.get("details")
    except (ValueError, KeyError, TypeError):
        code, message, details = "http_error", response.text[:500], None
    status = response.status_code
    if status == 429:
        raise RateLimitError(
            status,
            code,
            message,
            details,
            retry_after=float(response.headers.get("retry-after", "1")),
        )
    kind: type[GatewayError] = {
        401: AuthenticationError,
        404: NotFoundError,
        409: ConflictError,
    }.get(status, GatewayError)
    if status in (400, 413, 422):
        kind = ValidationError
    elif status >= 500:
        kind = ServerError
    raise kind(status, code, message, details)


def default_url() -> str:
    """``GATEWAY_URL``, else ``http://127.0.0.1:$PORT`` (8000): where the server
    listens with the same environment."""
    return os.environ.get("GATEWAY_URL") or f"http://127.0.0.1:{os.environ.get('PORT') or 8000}"


def _http_options(base_url: str | None, api_key: str | None, timeout: float) -> dict[str, Any]:
    """What both clients give httpx; the URL and key default to the environment.
    With no key the calls go without one, and the gateway's 401 says why."""
    api_key = (api_key or os.environ.get("GATEWAY_API_KEY") or "").strip()
    return {
        "base_url": (base_url or default_url()).rstrip("/"),
        # Reads wait longer than a long-poll can hold a request (60 s).
        "timeout": httpx.Timeout(timeout, read=75.0),
        "headers": {"authorization": f"Bearer {api_key}"} if api_key else {},
    }


def _poll_seconds(deadline: float | None) -> float:
    """How long the next long-poll may hold, given ``wait(within=…)``'s deadline."""
    if deadline is None:
        return 60.0
    return max(0.0, min(60.0, deadline - time.monotonic()))


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


class _RunEvents:
    """Reads a run's event stream line by line: each ``status`` event's run;
    ``log`` events are passed over; an ``error`` event (the key was revoked,
    the token expired, while the stream was open) raises."""

    def __init__(self) -> None:
        self.event = "message"

    def read(self, line: str) -> Run | None:
        if line.startswith("event: "):
            self.event = line[len("event: ") :]
            return None
        if not line.startswith("data: "):
            return None
        event, self.event = self.event, "message"
        data = json.loads(line[len("data: ") :])
        if event == "error":
            error = data["error"]
            raise AuthenticationError(401, error["code"], error["message"], error.get("details"))
        return data if event in ("status", "message") else None


def _sse_events(lines: Iterator[str]) -> Iterator[Run]:
    events = _RunEvents()
    for line in lines:
        run = events.read(line)
        if run is not None:
            yield run


class _Calls(Generic[R]):
    """The calls both clients share; ``_call`` does the HTTP (sync or async)."""

    def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> R:
        raise NotImplementedError

    # runs ---------------------------------------------------------------

    def trigger(
        self,
        task: str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        delay: float | str | None = None,
        ttl: float | str | None = None,
        max_attempts: int | None = None,
        max_duration: float | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        callback_url: str | None = None,
        queue: str | None = None,
        concurrency_key: str | None = None,
        priority: int | None = None,
        debounce: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> R:
        """Start a run of ``task``; returns the run (``is_cached`` if an
        idempotency key gave back an earlier one, ``debounced`` if a debounce
        key, ``{"key", "delay", "mode", "max_delay"}``, pushed an earlier
        DELAYED run back). ``queue`` and ``concurrency_key`` say whose limit
        its starts obey; ``priority`` is seconds of head start."""
        body_options = _options(
            {
                "idempotency_key": idempotency_key,
                "delay": delay,
                "ttl": ttl,
                "max_attempts": max_attempts,
                "max_duration": max_duration,
                "tags": tags,
                "metadata": metadata,
                "callback_url": callback_url,
                "queue": queue,
                "concurrency_key": concurrency_key,
                "priority": priority,
                "debounce": dict(debounce) if debounce is not None else None,
                **options,
            }
        )
        return self._call(
            "POST",
            f"/api/v1/tasks/{task}/trigger",
            json_body={"payload": payload, "options": body_options},
        )

    def batch_trigger(self, items: list[Mapping[str, Any]]) -> R:
        """Start up to 500 runs: ``[{"task", "payload", "options"}]``."""
        return self._call("POST", "/api/v1/tasks/batch", json_body={"items": list(items)})

    def get_run(self, run_id: str) -> R:
        return self._call("GET", f"/api/v1/runs/{run_id}")

    def cancel(self, run_id: str) -> R:
        return self._call("POST", f"/api/v1/runs/{run_id}/cancel")

    def replay(self, run_id: str, *, from_node: str | None = None) -> R:
        """Run it again; a workflow ``from_node`` reuses its other nodes' outputs."""
        body = {"from_node": from_node} if from_node is not None else None
        return self._call("POST", f"/api/v1/runs/{run_id}/replay", json_body=body)

    def reschedule(self, run_id: str, delay: float | str) -> R:
        return self._call("POST", f"/api/v1/runs/{run_id}/reschedule", json_body={"delay": delay})

    def get_batch(self, batch_id: str) -> R:
        return self._call("GET", f"/api/v1/batches/{batch_id}")

    def bulk_cancel(self, *, ids: list[str] | None = None, **filter: Any) -> R:
        """Cancel, in the background, the runs with these ``ids`` or those
        that match the filter (``status``, ``task``, ``tag``, ``queue``,
        ``created_after``, ``created_before``); returns ``bulk_id`` and ``count``."""
        return self._call("POST", "/api/v1/runs/bulk/cancel", json_body=_bulk_body(ids, filter))

    def bulk_replay(self, *, ids: list[str] | None = None, **filter: Any) -> R:
        """Replay, in the background, the runs a filter or ``ids`` select."""
        return self._call("POST", "/api/v1/runs/bulk/replay", json_body=_bulk_body(ids, filter))

    def get_bulk(self, bulk_id: str) -> R:
        """A bulk action and how far it has got (``processed`` of ``count``)."""
        return self._call("GET", f"/api/v1/bulk/{bulk_id}")

    # schedules ----------------------------------------------------------

    def create_schedule(
        self,
        task: str,
        cron: str,
        *,
        timezone: str = "UTC",
        payload: Any = None,
        options: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ) -> R:
        """Run ``task`` on a cron clock (five fields, or six with leading seconds)."""
        return self._call(
            "POST",
            "/api/v1/schedules",
            json_body={
                "task": task,
                "cron": cron,
                "timezone": timezone,
                "payload": payload,
                "options": dict(options or {}),
                "enabled": enabled,
            },
        )

    def list_schedules(self) -> R:
        return self._call("GET", "/api/v1/schedules")

    def get_schedule(self, schedule_id: str) -> R:
        return self._call("GET", f"/api/v1/schedules/{schedule_id}")

    def update_schedule(self, schedule_id: str, **changes: Any) -> R:
        """Change ``cron``, ``timezone``, ``payload``, ``options`` or ``enabled``."""
        return self._call("PATCH", f"/api/v1/schedules/{schedule_id}", json_body=changes)

    def delete_schedule(self, schedule_id: str) -> R:
        return self._call("DELETE", f"/api/v1/schedules/{schedule_id}")

    def run_logs(self, run_id: str, *, limit: int | None = None, cursor: str | None = None) -> R:
        """One page of the lines the run's task logged (``data``, ``next_cursor``)."""
        return self._call("GET", f"/api/v1/runs/{run_id}/logs", params=_page_params(limit, cursor))

    # waitpoints ---------------------------------------------------------

    def create_waitpoint(
        self,
        *,
        timeout: float | str | None = None,
        idempotency_key: str | None = None,
        tags: list[str] | None = None,
    ) -> R:
        """A waitpoint and its signed ``url``: a POST of any JSON there (no
        API key) completes it, so a third party can be handed the URL."""
        return self._call(
            "POST",
            "/api/v1/waitpoints",
            json_body=_options(
                {"timeout": timeout, "idempotency_key": idempotency_key, "tags": tags}
            ),
        )

    def get_waitpoint(self, waitpoint_id: str) -> R:
        return self._call("GET", f"/api/v1/waitpoints/{waitpoint_id}")

    def complete_waitpoint(self, waitpoint_id: str, output: Any = None) -> R:
        """Complete it with ``output`` (once: a second time is a ``ConflictError``)."""
        return self._call(
            "POST", f"/api/v1/waitpoints/{waitpoint_id}/complete", json_body={"output": output}
        )

    # queues -------------------------------------------------------------

    def list_queues(self, *, limit: int = 100, cursor: str | None = None) -> R:
        """A page of queues (``next_cursor`` for the next)."""
        return self._call(
            "GET", "/api/v1/queues", params=_options({"limit": limit, "cursor": cursor})
        )

    def get_queue(self, name: str) -> R:
        return self._call("GET", f"/api/v1/queues/{name}")

    def create_queue(
        self, name: str, *, concurrency_limit: int | None = None, paused: bool = False
    ) -> R:
        return self._call(
            "POST",
            "/api/v1/queues",
            json_body={"name": name, "concurrency_limit": concurrency_limit, "paused": paused},
        )

    def update_queue(self, name: str, **changes: Any) -> R:
        """Change ``concurrency_limit`` (``None`` lifts it) or ``paused``."""
        return self._call("PATCH", f"/api/v1/queues/{name}", json_body=changes)

    def pause_queue(self, name: str) -> R:
        """Stop the queue's new starts; runs already executing finish."""
        return self.update_queue(name, paused=True)

    def resume_queue(self, name: str) -> R:
        return self.update_queue(name, paused=False)

    def run_deliveries(
        self, run_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> R:
        """One page of the run's callback messages (``data``, ``next_cursor``)."""
        return self._call(
            "GET", f"/api/v1/runs/{run_id}/deliveries", params=_page_params(limit, cursor)
        )

    # webhooks -----------------------------------------------------------

    def create_webhook(
        self,
        url: str,
        *,
        events: list[str] | None = None,
        tasks: list[str] | None = None,
        description: str = "",
    ) -> R:
        """Register an endpoint; the answer holds its ``secret``."""
        return self._call(
            "POST",
            "/api/v1/webhooks",
            json_body=_options(
                {"url": url, "events": events, "tasks": tasks, "description": description}
            ),
        )

    def list_webhooks(self) -> R:
        return self._call("GET", "/api/v1/webhooks")

    def get_webhook(self, endpoint_id: str) -> R:
        return self._call("GET", f"/api/v1/webhooks/{endpoint_id}")

    def update_webhook(self, endpoint_id: str, **changes: Any) -> R:
        return self._call("PATCH", f"/api/v1/webhooks/{endpoint_id}", json_body=changes)

    def delete_webhook(self, endpoint_id: str) -> R:
        return self._call("DELETE", f"/api/v1/webhooks/{endpoint_id}")

    def rotate_webhook_secret(self, endpoint_id: str, grace_period: float | None = None) -> R:
        return self._call(
            "POST",
            f"/api/v1/webhooks/{endpoint_id}/rotate-secret",
            json_body=_options({"grace_period": grace_period}),
        )

    def test_webhook(self, endpoint_id: str) -> R:
        return self._call("POST", f"/api/v1/webhooks/{endpoint_id}/test")

    def webhook_deliveries(
        self, endpoint_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> R:
        """One page of the endpoint's messages, newest first (``data``,
        ``next_cursor``); ``iter_webhook_deliveries`` walks every page."""
        return self._call(
            "GET",
            f"/api/v1/webhooks/{endpoint_id}/deliveries",
            params=_page_params(limit, cursor),
        )

    def resend_delivery(self, delivery_id: str) -> R:
        return self._call("POST", f"/api/v1/deliveries/{delivery_id}/resend")

    def recover_webhook(self, endpoint_id: str, since: str, *, include_pending: bool = False) -> R:
        """Send again every message since ``since`` that failed, and with
        ``include_pending`` those still waiting for a retry; the answer says
        which were which (``failed``, ``pending``)."""
        return self._call(
            "POST",
            f"/api/v1/webhooks/{endpoint_id}/recover",
            json_body={"since": since, "include_pending": include_pending},
        )

    @staticmethod
    def verify_webhook(body: bytes | str, headers: Mapping[str, str], secret: str) -> Any:
        """Check a callback's signature (Standard Webhooks); returns the event.

        :raises standardwebhooks.WebhookVerificationError: forged or stale
        """
        return verify(body, headers, secret)


def _bulk_body(ids: list[str] | None, filter: Mapping[str, Any]) -> dict[str, Any]:
    if ids is not None:
        if filter:
            raise TypeError("give ids= or filter keywords, not both")
        return {"ids": list(ids)}
    return {"filter": {k: v for k, v in filter.items() if v is not None}}


def _page_params(limit: int | None, cursor: str | None) -> dict[str, Any]:
    return _options({"limit": limit, "cursor": cursor})


def _deadline(within: float | None, timeout: float | None) -> float | None:
    if within is not None and timeout is not None:
        raise TypeError("give within= or timeout= (the same thing), not both")
    seconds = within if within is not None else timeout
    return None if seconds is None else time.monotonic() + seconds


def _list_params(filters: Mapping[str, Any], limit: int, cursor: str | None) -> dict[str, Any]:
    params = {
        k: (",".join(v) if isinstance(v, list | tuple) else v)
        for k, v in filters.items()
        if v is not None
    }
    params["limit"] = limit
    if cursor:
        params["cursor"] = cursor
    return params


class Client(_Calls[Any]):
    """A synchronous client (one ``httpx.Client``; use it as a context manager)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(transport=transport, **_http_options(base_url, api_key, timeout))

    def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        response = self._http.request(method, path, json=json_body, params=params, headers=headers)
        _raise_for(response)
        return response.json() if response.content else None

    def wait(
        self, run_id: str, *, within: float | None = None, timeout: float | None = None
    ) -> Run:
        """Long-poll until the run is final, or ``within`` (or ``timeout``)
        seconds pass; the run as it is then (check ``is_final``)."""
        deadline = _deadline(within, timeout)
        while True:
            params = {"wait": _poll_seconds(deadline)}
            run: Run = self._call("GET", f"/api/v1/runs/{run_id}", params=params)
            if run["is_final"] or (deadline is not None and time.monotonic() >= deadline):
                return run

    def stream(self, run_id: str) -> Iterator[Run]:
        """The run's status changes as they happen (Server-Sent Events), to the final one."""
        with self._http.stream(
            "GET", f"/api/v1/runs/{run_id}/events", timeout=httpx.Timeout(30.0, read=None)
        ) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            yield from _sse_events(response.iter_lines())

    def list_runs(self, *, limit: int = 100, **filters: Any) -> Iterator[Run]:
        """Every run that fits the filters (``status``, ``task``, ``tag``,
        ``created_after``, ``created_before``), newest first, page after page."""
        cursor = None
        while True:
            page = self._call("GET", "/api/v1/runs", params=_list_params(filters, limit, cursor))
            yield from page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def iter_webhook_deliveries(self, endpoint_id: str, *, limit: int = 100) -> Iterator[Run]:
        """Every message of the endpoint, newest first, page after page."""
        cursor = None
        while True:
            page = self.webhook_deliveries(endpoint_id, limit=limit, cursor=cursor)
            yield from page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Calls[Awaitable[Any]]):
    """The same calls, awaited (one ``httpx.AsyncClient``; ``async with`` it)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            transport=transport, **_http_options(base_url, api_key, timeout)
        )

    def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Awaitable[Any]:
        async def call() -> Any:
            response = await self._http.request(
                method, path, json=json_body, params=params, headers=headers
            )
            _raise_for(response)
            return response.json() if response.content else None

        return call()

    async def wait(
        self,
        run_id: str,
        *,
        within: float | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (as the sync client takes it)
    ) -> Run:
        deadline = _deadline(within, timeout)
        while True:
            params = {"wait": _poll_seconds(deadline)}
            run: Run = await self._call("GET", f"/api/v1/runs/{run_id}", params=params)
            if run["is_final"] or (deadline is not None and time.monotonic() >= deadline):
                return run

    async def stream(self, run_id: str) -> AsyncIterator[Run]:
        async with self._http.stream(
            "GET", f"/api/v1/runs/{run_id}/events", timeout=httpx.Timeout(30.0, read=None)
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                _raise_for(response)
            events = _RunEvents()
            async for line in response.aiter_lines():
                run = events.read(line)
                if run is not None:
                    yield run

    async def list_runs(self, *, limit: int = 100, **filters: Any) -> AsyncIterator[Run]:
        cursor = None
        while True:
            page = await self._call(
                "GET", "/api/v1/runs", params=_list_params(filters, limit, cursor)
            )
            for run in page["data"]:
                yield run
            cursor = page["next_cursor"]
            if cursor is None:
                return

    async def iter_webhook_deliveries(
        self, endpoint_id: str, *, limit: int = 100
    ) -> AsyncIterator[Run]:
        cursor = None
        while True:
            page = await self.webhook_deliveries(endpoint_id, limit=limit, cursor=cursor)
            for delivery in page["data"]:
                yield delivery
            cursor = page["next_cursor"]
            if cursor is None:
                return

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
