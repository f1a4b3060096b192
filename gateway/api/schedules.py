"""``/api/v1/schedules``: runs of a task on a cron clock."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import views
from gateway.api.bodies import json_object
from gateway.api.routing import ApiRoute, Operation, Param
from gateway.api.tasks import check_task_payload
from gateway.api.views import ScheduleList, ScheduleView, shaped
from gateway.runs.requests import ScheduleCreate, ScheduleUpdate
from gateway.services import services_of

__all__ = ["routes"]


async def create_schedule(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, ScheduleCreate)
    check_task_payload(services, body.task, body.payload)
    schedule = await services.schedules.create_schedule(project_id, body)
    return shaped(
        ScheduleView,
        schedule,
        status_code=201,
        headers={"location": f"/api/v1/schedules/{schedule['id']}"},
    )


async def list_schedules(request: Request, project_id: str) -> Response:
    return shaped(
        ScheduleList, {"data": await services_of(request).schedules.schedules(project_id)}
    )


async def get_schedule(request: Request, project_id: str) -> Response:
    services = services_of(request)
    return shaped(
        ScheduleView,
        await services.schedules.schedule(project_id, request.path_params["schedule_id"]),
    )


async def update_schedule(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, ScheduleUpdate)
    schedule_id = request.path_params["schedule_id"]
    if "payload" in body.model_fields_set:
        task = (await services.schedules.schedule(project_id, schedule_id))["task"]
        check_task_payload(services, task, body.payload)
    return shaped(
        ScheduleView, await services.schedules.update_schedule(project_id, schedule_id, body)
    )


async def delete_schedule(request: Request, project_id: str) -> Response:
    services = services_of(request)
    await services.schedules.delete_schedule(project_id, request.path_params["schedule_id"])
    return Response(status_code=204)


SCHEDULE_ID = Param("schedule_id", "path", "a schedule's ID (sched_…)", required=True)

routes = [
    ApiRoute(
        "POST",
        "/api/v1/schedules",
        create_schedule,
        Operation(
            "Run a task on a cron clock",
            "schedules",
            {201: views.ScheduleView},
            ScheduleCreate,
            errors=(400, 404, 413, 422),
        ),
    ),
    ApiRoute(
        "GET",
        "/api/v1/schedules",
        list_schedules,
        Operation("List the schedules, newest first", "schedules", {200: views.ScheduleList}),
    ),
    ApiRoute(
        "GET",
        "/api/v1/schedules/{schedule_id}",
        get_schedule,
        Operation(
            "A schedule, with its next and last ticks",
            "schedules",
            {200: views.ScheduleView},
            params=(SCHEDULE_ID,),
            errors=(404,),
        ),
    ),
    ApiRoute(
        "PATCH",
        "/api/v1/schedules/{schedule_id}",
        update_schedule,
        Operation(
            "Change a schedule (cron, timezone, payload, options, enabled)",
            "schedules",
            {200: views.ScheduleView},
            ScheduleUpdate,
            params=(SCHEDULE_ID,),
            errors=(400, 404, 413, 422),
        ),
    ),
    ApiRoute(
        "DELETE",
        "/api/v1/schedules/{schedule_id}",
        delete_schedule,
        Operation(
            "Delete a schedule (its runs stay)",
            "schedules",
            {204: "deleted"},
            params=(SCHEDULE_ID,),
            errors=(404,),
        ),
    ),
]
