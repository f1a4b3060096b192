"""The periodic passes every gateway process takes part in, one process per
pass by a lock in Redis: the reconciler (what Redis lost, held queues, stalled
bulk actions), the scheduler (due delays, retries, TTLs, schedules' ticks) and
the judge of lost workers (silent heartbeats). docs/architecture.md, "Liveness
and outages"."""
