"""What ``jobs.worker`` takes from arq's ``Worker``, checked against the arq installed.

``NudgedWorker`` copies ``Worker.main`` (to cut the sleep between polls short)
and overrides ``_sleep_until_tasks_complete``; ``run_workers`` drives two
workers through ``handle_sig_wait_for_completion``, ``main_task`` and
``close``. Those are arq's internals, so pyproject pins arq to the versions
checked here, and this test fails naming the method when a new arq changes one.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect

import pytest
from arq.worker import Worker

from jobs.worker import NudgedWorker

#: Each method NudgedWorker copies or leans on, with the SHA-256 (first 16
#: hex digits) of its source in the arq versions pyproject admits.
COPIED = {
    "main": "45ca1591c9717466",
    "_poll_iteration": "f8d39d823a0a59f2",
    "_sleep_until_tasks_complete": "0acab214e9c111cb",
    "_jobs_started": "c5643370c110c7cd",
    "handle_sig_wait_for_completion": "8f161d86834cc74e",
    "_wait_for_tasks_to_complete": "c186389a00b11500",
    "close": "5bcc9cb356680829",
    # Overridden to give a slot back when Redis fails half-way through a start.
    "start_jobs": "b45797cfa40bed7f",
    # Wrapped to take a job's in-progress mark off when Redis fails before the
    # job finishes: the mark is set by start_jobs, and taken off by finish_job.
    "run_job": "589a19059ff84ee7",
}

#: Attributes of a Worker instance that NudgedWorker and run_workers read.
ATTRIBUTES = (
    "burst",
    "ctx",
    "expires_extra_ms",
    "functions",
    "job_counter",
    "job_deserializer",
    "job_serializer",
    "main_task",
    "max_burst_jobs",
    "max_jobs",
    "on_startup",
    "poll_delay_s",
    "queue_name",
    "redis_settings",
    "sem",
    "tasks",
)


@pytest.mark.parametrize("name", COPIED)
def test_the_arq_methods_we_build_on_are_the_ones_we_read(name: str) -> None:
    method = getattr(Worker, name, None)
    assert method is not None, f"arq's Worker has no {name} any more: review jobs/worker.py"
    digest = hashlib.sha256(inspect.getsource(method).encode()).hexdigest()[:16]
    assert digest == COPIED[name], (
        f"arq's Worker.{name} changed: NudgedWorker (jobs/worker.py) copies or relies on it. "
        f"Read the new Worker.{name}, bring NudgedWorker in line, then record {digest} here."
    )


def test_a_worker_has_the_attributes_we_read() -> None:
    async def noop(ctx: dict[str, object]) -> None:
        return None

    loop = asyncio.new_event_loop()  # arq's Worker takes the current loop when made
    asyncio.set_event_loop(loop)
    try:
        worker = NudgedWorker(functions=[noop], handle_signals=False)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    missing = [name for name in ATTRIBUTES if not hasattr(worker, name)]
    assert not missing, f"arq's Worker lost attributes NudgedWorker reads: {missing}"
    assert "handle_signals" in inspect.signature(Worker).parameters
