"""The run state machine: units of work on runs.

Each unit is one sync ``fn(conn, ...)`` that the database runs in one
transaction (``db.engine``). Every change of a run's status goes through
:func:`gateway.runs.runs_table.transition`, a compare-and-set on (status, attempt,
step); what a unit sets in motion (jobs, callbacks, wake-ups, aborts) comes
back as :class:`~gateway.runs.effects.Effects`, done once the transaction has
committed (docs/architecture.md, invariants 1, 3 and 4).

- ``runs_table``: the compare-and-set and the statements built once
- ``read``: runs as the API shows them, lists, pages and counts
- ``create``: new runs and idempotency keys
- ``reports``: a worker's reports (started, completed, failed, waiting,
  heartbeat), one by one and, the common ones of a batch, as sets
- ``workflow``: a workflow's steps, nodes and children
- ``timers``: delays, retries with backoff, TTLs, rescheduling
- ``recovery``: attempts whose worker went away
- ``cancel``: canceling a run and its children
- ``requests``: the request bodies of runs, queues, schedules and waitpoints
- ``effects``, ``errors``: what a unit sets in motion; the errors it raises

Beside it, one package per idea: ``gateway.queues`` (flow control),
``gateway.schedules``, ``gateway.waitpoints``, ``gateway.runlogs``; the
services that run their units are in ``gateway.services``.
"""
