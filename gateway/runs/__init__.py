"""The run state machine: units of work on runs, and the service that runs them.

Each unit is one sync ``fn(conn, ...)`` that the database runs in one
transaction (``db.engine``). Every change of a run's status goes through
:func:`gateway.runs.cas.transition`, a compare-and-set on (status, attempt,
step); what a unit sets in motion (jobs, callbacks, wake-ups, aborts) comes
back as :class:`~gateway.runs.effects.Effects`, done once the transaction has
committed (docs/architecture.md, invariants 1, 3 and 4).

- ``cas``: the compare-and-set and the statements built once
- ``read``: runs as the API shows them, lists, pages and counts
- ``create``: new runs and idempotency keys
- ``events``: a worker's reports (started, completed, failed, heartbeat)
- ``workflow``: a workflow's steps, nodes and children
- ``timers``: delays, retries with backoff, TTLs, rescheduling
- ``recovery``: attempts whose worker went away
- ``cancel``: canceling a run and its children
- ``service``: :class:`RunService`, which runs the units and their effects
"""
