"""The job contract: one name and one argument shape per job, for both sides."""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest

from jobs.contract import DeliverReport, DeliverWebhook, Job, RunTask
from jobs.deliver import deliver_webhook
from jobs.report import deliver_report
from jobs.runs.attempt import run_task
from jobs.settings import Settings
from jobs.worker import delivery_worker_options, worker_options

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("job", "function"),
    [
        (RunTask("run_x", "echo", {"n": 1}), run_task),
        (DeliverWebhook("msg_x"), deliver_webhook),
        (DeliverReport({"type": "heartbeat"}), deliver_report),
    ],
)
def test_each_job_fits_the_function_that_runs_it(job: Job, function: object) -> None:
    """The worker's function takes exactly the job's fields, by name."""
    parameters = list(inspect.signature(function).parameters)  # type: ignore[arg-type]
    assert parameters[0] == "ctx"
    assert parameters[1:] == list(job.kwargs())
    inspect.signature(function).bind(None, **job.kwargs())  # type: ignore[arg-type]


def test_the_workers_register_each_job_under_its_name() -> None:
    settings = Settings.from_env({"GATEWAY_SECRET_KEY": "x" * 32})
    runs = {f.name for f in worker_options(settings)["functions"]}
    callbacks = {f.name for f in delivery_worker_options(settings)["functions"]}
    assert runs == {RunTask.name, DeliverReport.name}
    assert callbacks == {DeliverWebhook.name, DeliverReport.name}


def test_each_job_name_is_spelled_in_one_module() -> None:
    sources = [
        p for folder in ("gateway", "jobs", "webhooks", "db") for p in (ROOT / folder).rglob("*.py")
    ]
    for name in (RunTask.name, DeliverWebhook.name, DeliverReport.name):
        quoted = re.compile(rf"""["']{name}["']""")
        spelled = {
            str(p.relative_to(ROOT))
            for p in sources
            # A module's __all__ names its function, not the job.
            if quoted.search(re.sub(r"__all__ = \[[^\]]*\]", "", p.read_text()))
        }
        assert spelled == {"jobs/contract.py"}, (name, spelled)


def test_a_run_tasks_job_id_is_its_attempt_and_step() -> None:
    assert RunTask("run_a", "echo", None).job_id == "run_a"
    assert RunTask("run_a", "echo", None, attempt=2).job_id == "run_a:2"
    assert RunTask("run_a", "echo", None, attempt=2, step=3).job_id == "run_a:2:s3"


def test_only_the_task_worker_starts_a_heartbeat_thread() -> None:
    """``gateway worker`` runs both workers in one process: one thread beats."""
    import asyncio
    import threading

    from jobs.worker import shutdown, startup

    settings = Settings.from_env(
        {"GATEWAY_SECRET_KEY": "x" * 32, "GATEWAY_URL": "http://127.0.0.1:9"}
    )

    async def both() -> int:
        contexts = [
            dict(worker_options(settings)["ctx"]),
            dict(delivery_worker_options(settings)["ctx"]),
        ]
        for ctx in contexts:
            await startup(ctx)
        try:
            return sum(t.name == "heartbeats" for t in threading.enumerate())
        finally:
            for ctx in contexts:
                await shutdown(ctx)

    before = sum(t.name == "heartbeats" for t in threading.enumerate())
    assert asyncio.run(both()) - before == 1
