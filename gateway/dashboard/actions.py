"""What the dashboard's buttons do: each a form POST with the session's CSRF
token, answered by a redirect to the page that shows the result (a GET)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from db.types import utcnow
from gateway.api.bodies import parse_json, validate
from gateway.dashboard.pages import trigger_form
from gateway.dashboard.render import flash, redirect, render, safe_next
from gateway.dashboard.session import PREFIX, Viewer, read_form, sign_in, sign_out, viewer_of
from gateway.errors import APIError, NotFound, Unauthorized, ValidationFailed
from gateway.runs.requests import ScheduleUpdate, TriggerRequest
from gateway.services import services_of
from webhooks.models import EndpointCreate, EndpointUpdate, RecoverRequest, RotateRequest

__all__ = [
    "cancel_run",
    "create_endpoint",
    "endpoint_action",
    "login",
    "logout",
    "replay_run",
    "resend_delivery",
    "trigger_run",
]

ENDPOINT_ACTIONS = ("test", "rotate", "enable", "disable", "recover")
#: How far back "recover" may reach, in hours (the retry schedule's span).
RECOVER_HOURS = (1, 6, 24, 72, 120)


def _lines(details: Sequence[Mapping[str, Any]]) -> list[str]:
    """An error's details, one ``path: message`` line each."""
    return [
        f"{d.get('path')}: {d.get('message')}" if d.get("path") else str(d.get("message"))
        for d in details
    ]


def _problem(exc: APIError) -> str:
    """An API error as one line for a flash message."""
    details = "; ".join(_lines(exc.details))
    return f"{exc.message} ({details})" if details else exc.message


def _secret_page(
    request: Request,
    viewer: Viewer,
    endpoint: dict[str, Any],
    secret: str,
    title: str,
    *,
    previous_until: str | None = None,
) -> Response:
    """The endpoint's new signing secret, shown once, in answer to the POST
    (never put in a redirect or the session cookie)."""
    context = {
        "viewer": viewer,
        "active": "endpoints",
        "endpoint": endpoint,
        "secret": secret,
        "title": title,
        "note": previous_until,
    }
    return render(request, "secret", context)


async def login(request: Request) -> Response:
    fields = await read_form(request)
    target = safe_next(fields.get("next"))
    try:
        await sign_in(request, fields.get("api_key", ""))
    except Unauthorized as exc:
        return render(request, "login", {"next": target, "error": exc.message}, status_code=401)
    return redirect(target)


async def logout(request: Request) -> Response:
    await read_form(request)
    await sign_out(request)
    return redirect(PREFIX + "/login")


async def cancel_run(request: Request) -> Response:
    viewer = await viewer_of(request)
    await read_form(request)
    run_id = request.path_params["run_id"]
    try:
        run = await services_of(request).runs.cancel(viewer.project_id, run_id)
        flash(request, f"Canceled; the run is {run['status']}.")
    except APIError as exc:
        flash(request, _problem(exc), "error")
    return redirect(f"{PREFIX}/runs/{run_id}")


async def replay_run(request: Request) -> Response:
    viewer = await viewer_of(request)
    await read_form(request)
    run_id = request.path_params["run_id"]
    try:
        run = await services_of(request).runs.replay(viewer.project_id, run_id)
    except APIError as exc:
        flash(request, _problem(exc), "error")
        return redirect(f"{PREFIX}/runs/{run_id}")
    flash(request, f"Replay of {run_id}: a new run with the same task, payload and options.")
    return redirect(f"{PREFIX}/runs/{run['id']}")


QUEUE_ACTIONS = ("pause", "resume", "limit")


async def queue_action(request: Request) -> Response:
    """``pause``, ``resume`` or ``limit`` (a whole number, or empty for none) one queue."""
    viewer = await viewer_of(request)
    action = request.path_params["action"]
    if action not in QUEUE_ACTIONS:
        raise NotFound(f"no queue action {action!r}; there are {', '.join(QUEUE_ACTIONS)}")
    fields = await read_form(request)
    name = request.path_params["name"]
    back = f"{PREFIX}/queues"
    changes: dict[str, Any] = {}
    if action == "limit":
        raw = (fields.get("limit") or "").strip()
        if raw and not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 100_000):
            flash(
                request,
                f"a limit is a whole number from 1 to 100000, or empty for none: {raw!r}",
                "error",
            )
            return redirect(back)
        changes["concurrency_limit"] = int(raw) if raw else None
    else:
        changes["paused"] = action == "pause"
    try:
        queue = await services_of(request).flow.update_queue(viewer.project_id, name, changes)
    except APIError as exc:
        flash(request, _problem(exc), "error")
        return redirect(back)
    if action == "limit":
        limit = queue["concurrency_limit"]
        flash(request, f"{name}: {'no limit' if limit is None else f'{limit} at once'}.")
    else:
        flash(request, f"{name} {'paused' if queue['paused'] else 'resumed'}.")
    return redirect(back)


async def schedule_action(request: Request) -> Response:
    """``enable``, ``disable`` or ``delete`` one schedule."""
    viewer = await viewer_of(request)
    action = request.path_params["action"]
    if action not in ("enable", "disable", "delete"):
        raise NotFound(f"no schedule action {action!r}; there are enable, disable, delete")
    await read_form(request)
    schedule_id = request.path_params["schedule_id"]
    schedules = services_of(request).schedules
    try:
        if action == "delete":
            await schedules.delete_schedule(viewer.project_id, schedule_id)
            flash(request, f"Schedule {schedule_id} deleted; its runs stay.")
        else:
            await schedules.update_schedule(
                viewer.project_id, schedule_id, ScheduleUpdate(enabled=action == "enable")
            )
            flash(request, f"Schedule {schedule_id} {action}d.")
    except APIError as exc:
        flash(request, _problem(exc), "error")
    return redirect(f"{PREFIX}/schedules")


async def complete_waitpoint(request: Request) -> Response:
    """Complete a waiting ``wait`` node's waitpoint by hand, with a JSON body."""
    viewer = await viewer_of(request)
    fields = await read_form(request)
    waitpoint_id = request.path_params["waitpoint_id"]
    back = safe_next(fields.get("next"))
    raw = (fields.get("output") or "").strip()
    try:
        output = parse_json(raw.encode()) if raw else None
        await services_of(request).waitpoints.complete_waitpoint(
            viewer.project_id, waitpoint_id, output
        )
    except APIError as exc:
        flash(request, _problem(exc), "error")
        return redirect(back)
    flash(request, f"Waitpoint {waitpoint_id} completed; the workflow goes on.")
    return redirect(back)


async def resend_delivery(request: Request) -> Response:
    viewer = await viewer_of(request)
    fields = await read_form(request)
    delivery_id = request.path_params["delivery_id"]
    try:
        await services_of(request).webhooks.resend(viewer.project_id, delivery_id)
        flash(request, f"Sending {delivery_id} again.")
    except APIError as exc:
        flash(request, _problem(exc), "error")
    return redirect(safe_next(fields.get("next")))


async def create_endpoint(request: Request) -> Response:
    viewer = await viewer_of(request)
    fields = await read_form(request)
    events = [e.strip() for e in fields.get("events", "").split(",") if e.strip()] or ["*"]
    try:
        body = validate(
            EndpointCreate,
            {
                "url": fields.get("url", "").strip(),
                "events": events,
                "description": fields.get("description", "").strip(),
            },
        )
        endpoint = await services_of(request).webhooks.create_endpoint(viewer.project_id, body)
    except APIError as exc:
        flash(request, _problem(exc), "error")
        return redirect(PREFIX + "/endpoints")
    return _secret_page(request, viewer, endpoint, endpoint["secret"], "Endpoint added")


async def endpoint_action(request: Request) -> Response:
    """``test``, ``rotate``, ``enable``, ``disable`` or ``recover`` one endpoint."""
    viewer = await viewer_of(request)
    action = request.path_params["action"]
    if action not in ENDPOINT_ACTIONS:
        raise NotFound(f"no endpoint action {action!r}; there are {', '.join(ENDPOINT_ACTIONS)}")
    fields = await read_form(request)
    webhooks = services_of(request).webhooks
    endpoint_id = request.path_params["endpoint_id"]
    back = f"{PREFIX}/endpoints/{endpoint_id}"
    try:
        if action == "test":
            delivery = await webhooks.send_test(viewer.project_id, endpoint_id)
            flash(request, f"Test event sent as {delivery['id']}.")
        elif action in ("enable", "disable"):
            await webhooks.update_endpoint(
                viewer.project_id, endpoint_id, EndpointUpdate(enabled=action == "enable")
            )
            flash(request, "Endpoint enabled." if action == "enable" else "Endpoint disabled.")
        elif action == "recover":
            hours = next((h for h in RECOVER_HOURS if str(h) == fields.get("hours")), 0)
            if not hours:
                flash(request, f"choose how far back to recover: {RECOVER_HOURS} hours", "error")
                return redirect(back)
            since = utcnow() - dt.timedelta(hours=hours)
            include_pending = fields.get("include_pending") == "1"
            answer = await webhooks.recover(
                viewer.project_id,
                endpoint_id,
                RecoverRequest(since=since, include_pending=include_pending),
            )
            sent = f"{len(answer['failed'])} failed"
            if include_pending:
                sent += f" and {len(answer['pending'])} pending"
            flash(request, f"{sent} deliveries of the last {hours} h sent again.")
        else:  # rotate
            rotated = await webhooks.rotate_secret(viewer.project_id, endpoint_id, RotateRequest())
            endpoint = await webhooks.get_endpoint(viewer.project_id, endpoint_id)
            return _secret_page(
                request,
                viewer,
                endpoint,
                rotated["secret"],
                "Secret rotated",
                previous_until=rotated["previous_expires_at"],
            )
    except APIError as exc:
        flash(request, _problem(exc), "error")
    return redirect(back)


async def trigger_run(request: Request) -> Response:
    """Start a run from the form: the same checks as ``POST …/trigger``."""
    viewer = await viewer_of(request)
    services = services_of(request)
    fields = await read_form(request, services.settings.max_body_bytes)
    task = fields.get("task", "")
    form = {
        "task": task,
        "payload": fields.get("payload", ""),
        "tags": fields.get("tags", ""),
        "delay": fields.get("delay", "").strip(),
    }
    errors: list[str] = []
    definition = services.registry.get(task)
    if definition is None:
        errors.append(f"choose a task; there is no task {task!r}")
    try:
        payload = parse_json(form["payload"].encode()) if form["payload"].strip() else None
    except APIError as exc:
        errors.append(f"payload: {exc.message}")
        payload = None
    options: dict[str, Any] = {
        "tags": [t.strip() for t in form["tags"].split(",") if t.strip()],
    }
    if form["delay"]:
        options["delay"] = form["delay"]
    try:
        body = validate(TriggerRequest, {"payload": payload, "options": options})
    except ValidationFailed as exc:
        errors.extend(_lines(exc.details))
    if definition is not None and not errors:
        errors.extend(_lines(definition.payload_errors(payload, "payload")))
    if errors:
        return trigger_form(request, viewer, **form, errors=errors, status_code=422)
    try:
        run, _ = await services.runs.trigger(viewer.project_id, task, body)
    except APIError as exc:
        return trigger_form(request, viewer, **form, errors=[_problem(exc)], status_code=422)
    flash(request, f"Triggered {task}.")
    return redirect(f"{PREFIX}/runs/{run['id']}")
