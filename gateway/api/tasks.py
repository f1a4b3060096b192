"""``/api/v1/tasks``: the registered tasks, and triggering runs of them (one, or a batch)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from db.ids import new_id
from gateway.api import views
from gateway.api.bodies import json_object
from gateway.api.routing import ApiRoute, Operation, Param
from gateway.api.views import BatchCreated, RunView, TaskList, shaped
from gateway.errors import NotFound, ValidationFailed
from gateway.runs.requests import BatchRequest, TriggerRequest
from gateway.services import Services, services_of
from jobs import tracing
from jobs.tasks.registry import TaskDefinition

__all__ = ["check_task_payload", "routes", "traced_trigger"]


def _definition(services: Services, task: str) -> TaskDefinition:
    definition = services.registry.get(task)
    if definition is None:
        known = ", ".join(services.registry.names())
        raise NotFound(f"no task named {task!r}; known tasks: {known}", code="task_not_found")
    return definition


def check_task_payload(services: Services, task: str, payload: Any) -> TaskDefinition:
    """The task's definition, once ``payload`` fits it (a trigger's, a schedule's).

    :raises NotFound: no such task (``task_not_found``)
    :raises ValidationFailed: the payload does not fit (``invalid_payload``)
    """
    definition = _definition(services, task)
    details = definition.payload_errors(payload, "payload")
    if details:
        raise ValidationFailed(
            f"the payload does not fit task {task!r}", code="invalid_payload", details=details
        )
    return definition


async def list_tasks(request: Request, project_id: str) -> Response:
    return shaped(TaskList, {"data": services_of(request).registry.describe()})


async def traced_trigger(
    request: Request, project_id: str, task: str, body: TriggerRequest
) -> tuple[dict[str, Any], bool]:
    """A trigger in its ``trigger <task>`` span, a child of the request's
    ``traceparent`` (``jobs.tracing``); the run, and whether it was cached."""
    with tracing.span(
        f"trigger {task}",
        parent=request.headers.get(tracing.HEADER),
        kind="server",
        attributes={"gateway.task": task, "gateway.project_id": project_id},
    ) as span:
        run, cached = await services_of(request).runs.trigger(
            project_id, task, body, traceparent=tracing.traceparent_of(span)
        )
        if span is not None:
            span.set_attribute("gateway.run_id", run["id"])
            span.set_attribute("gateway.cached", cached)
    return run, cached


async def trigger(request: Request, project_id: str) -> Response:
    services = services_of(request)
    task = request.path_params["task"]
    _definition(services, task)  # 404 before the body is read
    body = await json_object(request, services.settings.max_body_bytes, TriggerRequest)
    check_task_payload(services, task, body.payload)
    header_key = request.headers.get("idempotency-key")
    if header_key and not body.options.idempotency_key:
        if len(header_key) > 200:
            raise ValidationFailed(
                details=[
                    {
                        "path": "header.idempotency-key",
                        "message": "at most 200 characters",
                        "type": "string_too_long",
                    }
                ]
            )
        body.options.idempotency_key = header_key
    run, cached = await traced_trigger(request, project_id, task, body)
    run["public_access_token"] = services.tokens.issue(run["id"])
    return shaped(
        RunView,
        run,
        status_code=200 if cached else 202,
        headers={"location": f"/api/v1/runs/{run['id']}"},
    )


async def batch_trigger(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, BatchRequest)
    details: list[dict[str, Any]] = []
    for i, item in enumerate(body.items):
        definition = services.registry.get(item.task)
        if definition is None:
            details.append(
                {
                    "path": f"items.{i}.task",
                    "message": f"no task {item.task!r}",
                    "type": "task_not_found",
                }
            )
            continue
        details.extend(definition.payload_errors(item.payload, f"items.{i}.payload"))
    if details:
        raise ValidationFailed(
            "some items do not fit their task", code="invalid_payload", details=details
        )
    new = [
        services.runs.new_row(
            project_id, item.task, item.payload, item.options, field=f"items.{i}.options"
        )
        for i, item in enumerate(body.items)
    ]
    batch_id = new_id("batch")
    created = await services.runs.create(new, batch_id=batch_id)
    for view, _ in created:
        view["public_access_token"] = services.tokens.issue(view["id"])
    return shaped(
        BatchCreated,
        {"batch_id": batch_id, "runs": [view for view, _ in created]},
        status_code=202,
        headers={"location": f"/api/v1/batches/{batch_id}"},
    )


async def reset_idempotency_key(request: Request, project_id: str) -> Response:
    services = services_of(request)
    task = request.path_params["task"]
    _definition(services, task)
    await services.runs.reset_idempotency_key(project_id, task, request.path_params["key"])
    return Response(status_code=204)


routes = [
    # Before "/api/v1/tasks/{task}/trigger", which would not match it anyway.
    ApiRoute(
        "POST",
        "/api/v1/tasks/batch",
        batch_trigger,
        Operation(
            "Trigger up to 500 runs at once",
            "runs",
            {202: views.BatchCreated},
            BatchRequest,
            errors=(400, 413, 422),
        ),
    ),
    ApiRoute(
        "POST",
        "/api/v1/tasks/{task}/trigger",
        trigger,
        Operation(
            "Trigger a run",
            "runs",
            {202: views.RunView, 200: views.RunView},
            TriggerRequest,
            params=(
                Param("task", "path", "the task's name", required=True),
                Param("idempotency-key", "header", "same as options.idempotency_key"),
            ),
            errors=(400, 404, 413, 422),
        ),
    ),
    ApiRoute(
        "GET",
        "/api/v1/tasks",
        list_tasks,
        Operation("List the tasks and their payload schemas", "tasks", {200: views.TaskList}),
    ),
    ApiRoute(
        "DELETE",
        "/api/v1/tasks/{task}/idempotency-keys/{key}",
        reset_idempotency_key,
        Operation(
            "Forget an idempotency key: the next trigger with it makes a new run",
            "runs",
            {204: "no body"},
            params=(
                Param("task", "path", "the task's name", required=True),
                Param("key", "path", "the idempotency key", required=True),
            ),
            errors=(404,),
        ),
    ),
]
