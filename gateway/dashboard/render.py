"""Turning the dashboard's templates into responses: filters, flashes, headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from db.models import RunStatus
from gateway.client.text import printable
from gateway.dashboard.session import PREFIX, csrf_token

__all__ = ["flash", "is_fragment", "redirect", "render", "safe_next", "templates"]

#: Nothing on a dashboard page comes from anywhere but the gateway itself.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
#: A request for just the live part of a page (the page's script sends it).
FRAGMENT_HEADER = "x-dashboard-fragment"

#: Strings longer than this are cut short in the JSON a page shows.
_LONG_STRING = 400
_JSON_LIMIT = 50_000


def _shortened(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _LONG_STRING:
        return f"{value[:120]}… ({len(value):,} characters)"
    if isinstance(value, dict):
        return {k: _shortened(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shortened(v) for v in value]
    return value


def pretty_json(value: Any) -> str:
    """Indented JSON for reading, long strings (data URIs) cut short."""
    text = json.dumps(_shortened(value), indent=2, ensure_ascii=False, default=str)
    if len(text) > _JSON_LIMIT:
        text = text[:_JSON_LIMIT] + f"\n… ({len(text) - _JSON_LIMIT:,} more characters)"
    return text


def duration(ms: int | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def is_final(status: str) -> bool:
    return status in RunStatus.__members__ and RunStatus(status).is_final


templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.filters["pretty_json"] = pretty_json
templates.env.filters["duration"] = duration
# A task wrote it: shown with its control characters escaped (gateway.client.text).
templates.env.filters["printable"] = printable
templates.env.tests["final"] = is_final
templates.env.globals["statuses"] = [s.value for s in RunStatus]
templates.env.globals["base"] = PREFIX


def is_fragment(request: Request) -> bool:
    return request.headers.get(FRAGMENT_HEADER) == "1"


def flash(request: Request, message: str, kind: str = "info") -> None:
    """A message for the next page this session sees (after a redirect)."""
    messages = list(request.session.get("flash", []))[-4:]
    messages.append({"kind": kind, "message": message[:500]})
    request.session["flash"] = messages


def render(
    request: Request,
    page: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
    live: bool = False,
) -> Response:
    """``{page}.html``; or, when the page's script asks for it and the page has
    one, just its live part, ``{page}_live.html``."""
    full = {"csrf": csrf_token(request), "path": request.url.path, **context}
    if live and is_fragment(request):
        template = f"{page}_live.html"
    else:
        template = f"{page}.html"
        full["flashes"] = request.session.pop("flash", [])
    return templates.TemplateResponse(
        request, template, full, status_code=status_code, headers=SECURITY_HEADERS
    )


def redirect(path: str) -> Response:
    """After a form: see the result with a GET (303), never the POST again."""
    return RedirectResponse(path, status_code=303)


def safe_next(raw: str | None, default: str = PREFIX + "/runs") -> str:
    """A path inside the dashboard to go back to; anything else is ``default``."""
    if raw and raw.startswith(PREFIX + "/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return default
