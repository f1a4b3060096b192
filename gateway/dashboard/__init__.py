"""The dashboard: runs, workflows and deliveries, live in a browser, served by the gateway.

Server-rendered pages (Jinja2 templates through Starlette) and one small
script of our own; nothing is fetched from anywhere else. A page's script
listens to ``/dashboard/stream`` (Server-Sent Events) and, when something the
page shows has changed, fetches the page's live part again.
"""

from __future__ import annotations

import hashlib
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.dashboard import actions, pages
from gateway.dashboard.render import is_fragment, redirect, render, templates
from gateway.dashboard.session import PREFIX, SignInRequired, session_middleware
from gateway.dashboard.stream import live_feed
from gateway.errors import APIError, error_response
from gateway.settings import Settings

__all__ = ["PREFIX", "dashboard_routes"]

STATIC = Path(__file__).parent / "static"
Endpoint = Callable[[Request], Awaitable[Response]]


def _asset_version() -> str:
    """Changes whenever a static file does, so browsers never run an old script."""
    digest = hashlib.sha256()
    for path in sorted(STATIC.iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


templates.env.globals["asset_version"] = _asset_version()


def _html(endpoint: Endpoint) -> Endpoint:
    """Errors as pages: sign in first, or a page that says what went wrong."""

    async def page(request: Request) -> Response:
        try:
            return await endpoint(request)
        except APIError as exc:
            if is_fragment(request):
                return error_response(exc.status_code, exc.code, exc.message, exc.details)
            if isinstance(exc, SignInRequired):
                back = request.url.path if request.method == "GET" else PREFIX + "/runs"
                if request.method == "GET" and request.url.query:
                    back += "?" + request.url.query
                return redirect(f"{PREFIX}/login?next={urllib.parse.quote(back)}")
            return render(request, "error", {"error": exc}, status_code=exc.status_code)

    page.__name__ = page.__qualname__ = endpoint.__name__
    return page


def dashboard_routes(settings: Settings) -> list[BaseRoute]:
    """``/dashboard`` and everything under it (and ``/`` leads there)."""
    get, post = ["GET"], ["POST"]
    routes = [
        Route("/", _html(pages.home), methods=get),
        Route("/login", _html(pages.login_page), methods=get),
        Route("/login", _html(actions.login), methods=post),
        Route("/logout", _html(actions.logout), methods=post),
        Route("/runs", _html(pages.runs_page), methods=get),
        Route("/trigger", _html(pages.trigger_page), methods=get),
        Route("/trigger", _html(actions.trigger_run), methods=post),
        Route("/runs/{run_id}", _html(pages.run_page), methods=get),
        Route("/runs/{run_id}/cancel", _html(actions.cancel_run), methods=post),
        Route("/runs/{run_id}/replay", _html(actions.replay_run), methods=post),
        Route("/deliveries/{delivery_id}/resend", _html(actions.resend_delivery), methods=post),
        Route(
            "/waitpoints/{waitpoint_id}/complete",
            _html(actions.complete_waitpoint),
            methods=post,
        ),
        Route("/schedules", _html(pages.schedules_page), methods=get),
        Route("/schedules/{schedule_id}/{action}", _html(actions.schedule_action), methods=post),
        Route("/queues", _html(pages.queues_page), methods=get),
        Route("/queues/{name}/{action}", _html(actions.queue_action), methods=post),
        Route("/endpoints", _html(pages.endpoints_page), methods=get),
        Route("/endpoints", _html(actions.create_endpoint), methods=post),
        Route("/endpoints/{endpoint_id}", _html(pages.endpoint_page), methods=get),
        Route("/endpoints/{endpoint_id}/{action}", _html(actions.endpoint_action), methods=post),
        Route("/workers", _html(pages.workers_page), methods=get),
        Route("/stream", live_feed, methods=get),
        Mount("/static", app=StaticFiles(directory=STATIC), name="dashboard-static"),
    ]
    return [
        Route("/", pages.home, methods=get, include_in_schema=False),
        Route(PREFIX, pages.home, methods=get, include_in_schema=False),
        Mount(PREFIX, routes=routes, middleware=[session_middleware(settings)]),
    ]
