"""Putting jobs on arq's queue in one round trip to Redis.

``ArqRedis.enqueue_job`` checks for an existing job and writes the new one in
a WATCH/MULTI transaction: three round trips, and the trigger path's largest
cost after the database. This does the same check and the same writes (arq's
keys, arq's job encoding, so arq's worker cannot tell the difference) in one
Lua script, which Redis runs atomically. The script also announces a job
that is due now, which wakes an idle worker at once.
"""

from __future__ import annotations

from typing import Any

from arq import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms

from jobs.protocol import nudge_channel

__all__ = ["enqueue_job"]

# KEYS: the job, its result, the queue. ARGV: the job's TTL in ms, the
# encoded job, its score (when it is due, in ms), its ID, and the channel to
# wake idle workers on ("" for a deferred job: nothing to wake them for yet).
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  return 0
end
redis.call('PSETEX', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[4])
end
return 1
"""


async def enqueue_job(
    redis: ArqRedis,
    function: str,
    *args: Any,
    job_id: str,
    queue_name: str,
    defer_seconds: float = 0.0,
) -> bool:
    """Queue ``function(*args)`` as arq's ``enqueue_job`` would, with ``_job_id``;
    ``False`` if a job (or a kept result) with that ID is there already."""
    now_ms = timestamp_ms()
    defer_ms = round(defer_seconds * 1000) if defer_seconds > 0 else 0
    encoded = serialize_job(function, args, {}, None, now_ms, serializer=redis.job_serializer)
    script = getattr(redis, "_gateway_enqueue", None)
    if script is None:  # one Script per connection pool: its SHA1 is computed once
        script = redis.register_script(_ENQUEUE)
        redis._gateway_enqueue = script  # type: ignore[attr-defined]
    created = await script(
        keys=[job_key_prefix + job_id, result_key_prefix + job_id, queue_name],
        args=[
            defer_ms + redis.expires_extra_ms,
            encoded,
            now_ms + defer_ms,
            job_id,
            "" if defer_ms else nudge_channel(queue_name),
        ],
    )
    return bool(created)
