"""Celery, as the baseline most Python users would pick instead: a no-op task.

``bench/run.py`` starts a worker of this app as a process (prefork, two
processes: one per core of the machine the figures are published for, Redis
as broker and as result backend) and measures it on the same Redis as the
gateway, in the same run:

    celery -A bench.celery_app worker --pool prefork --concurrency 2 -Q bench

The broker and the backend come from ``BENCH_CELERY_BROKER`` and
``BENCH_CELERY_BACKEND`` (two databases of the run's Redis, so counting the
results is one ``DBSIZE``).
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery(
    "bench",
    broker=os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/14"),
    backend=os.environ.get("BENCH_CELERY_BACKEND", "redis://127.0.0.1:6379/15"),
)
app.conf.update(
    task_default_queue="bench",
    # As Celery's documentation recommends for short tasks.
    worker_prefetch_multiplier=4,
    task_acks_late=False,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(n: int) -> int:
    return n
