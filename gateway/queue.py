"""Putting jobs on arq's queue: one round trip to Redis for any number of them.

``ArqRedis.enqueue_job`` checks for an existing job and writes the new one in
a WATCH/MULTI transaction: three round trips, and the trigger path's largest
cost after the database. This does the same check and the same writes (arq's
keys, arq's job encoding, so arq's worker cannot tell the difference) in one
Lua script, which Redis runs atomically; the jobs one unit of work caused (a
batch of triggers, the children of a workflow step, the callbacks of a batch
of reports) go in one pipeline of that script. The script also announces a
job that is due now, which wakes an idle worker at once.

**Turns across projects.** arq takes the jobs of lowest score first. A run's
job (one with a ``fair_key``, its project) is not scored by the time it was
queued, which would let one project's flood of thousands of jobs keep a second
project's single run waiting behind all of them, but by a turn: start-time
fair queuing, as a network switch shares a link. Each project has a virtual
clock in Redis; a job's turn is the later of its project's clock and the
queue's front (the lowest turn waiting), and moves the project's clock one on.
A project with one run waiting thus goes next, however much another queued,
and a project's own jobs keep their order. Turns are counted in milliseconds
from ``FAIR_EPOCH`` (2001), so every turn is long due and arq takes it at
once: the flood's own throughput is unchanged. A priority is still a head
start off the turn. Losing these keys with Redis loses only the turns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from arq import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.exceptions import NoScriptError

from jobs.contract import Job
from jobs.protocol import nudge_channel, redis_database

__all__ = ["QueuedJob", "enqueue_job", "enqueue_jobs"]

# KEYS: the job, its result, the queue, the project's clock, the queue's
# clock. ARGV: the job's TTL in ms, the encoded job, its score (when it is
# due, in ms), its ID, the channel to wake idle workers on ("" for a deferred
# job: nothing to wake them for yet), and for a fair job its head start in ms
# (else ""): its score is then its turn less the head start.
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  return 0
end
local score = ARGV[3]
if ARGV[6] ~= '' then
  local clock = tonumber(redis.call('GET', KEYS[5]) or ARGV[7])
  local front = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2]
  if front and tonumber(front) < clock then
    clock = math.max(tonumber(front), tonumber(ARGV[7]))
  end
  local turn = math.max(clock, tonumber(redis.call('GET', KEYS[4]) or '0'))
  redis.call('SET', KEYS[4], turn + 1, 'EX', 86400)
  if turn + 1 > tonumber(redis.call('GET', KEYS[5]) or '0') then
    redis.call('SET', KEYS[5], turn + 1)
  end
  score = turn - tonumber(ARGV[6])
end
redis.call('PSETEX', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], score, ARGV[4])
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[4] .. ' ' .. string.format('%.0f', score))
end
return 1
"""


@dataclasses.dataclass(frozen=True)
class QueuedJob:
    """An arq job to queue: ``function(*args, **kwargs)`` under ``job_id``."""

    function: str
    args: tuple[Any, ...]
    job_id: str
    queue_name: str
    defer_seconds: float = 0.0
    #: Seconds of head start: arq takes jobs by score, so a job scored as if
    #: queued this much earlier goes ahead of those queued since.
    head_start: float = 0.0
    #: Whose turns it takes (a project): scored by turn, not by time.
    fair_key: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, job: Job, *, job_id: str, queue_name: str, **options: Any) -> QueuedJob:
        """The arq job that carries ``job`` (``jobs.contract``), by keyword."""
        return cls(job.name, (), job_id, queue_name, kwargs=job.kwargs(), **options)


#: Turns count from here (ms since 1970: 2001-09-09), far enough in the past
#: that a turn is always due, and far enough from zero for a head start.
FAIR_EPOCH = 1_000_000_000_000


async def enqueue_jobs(redis: ArqRedis, jobs: Sequence[QueuedJob]) -> list[bool]:
    """Queue each job as arq's ``enqueue_job`` would (with ``_job_id``), all in
    one round trip; for each, ``False`` if a job (or a kept result) with that
    ID was there already.

    :raises redis.exceptions.RedisError: Redis did not take them (some may be in)
    """
    if not jobs:
        return []
    script = getattr(redis, "_gateway_enqueue", None)
    if script is None:  # one Script per connection pool: its SHA1 is computed once
        script = redis.register_script(_ENQUEUE)
        redis._gateway_enqueue = script  # type: ignore[attr-defined]
    now_ms = timestamp_ms()
    database = redis_database(redis)

    def call(job: QueuedJob, client: Any, sha: str | None = None) -> Any:
        defer_ms = round(job.defer_seconds * 1000) if job.defer_seconds > 0 else 0
        encoded = serialize_job(
            job.function, job.args, job.kwargs, None, now_ms, serializer=redis.job_serializer
        )
        fair = job.fair_key is not None and not defer_ms
        keys = [
            job_key_prefix + job.job_id,
            result_key_prefix + job.job_id,
            job.queue_name,
            f"{job.queue_name}:turn:{job.fair_key}",
            f"{job.queue_name}:turn",
        ]
        args: list[Any] = [
            defer_ms + redis.expires_extra_ms,
            encoded,
            now_ms + defer_ms - round(job.head_start * 1000),
            job.job_id,
            "" if defer_ms else nudge_channel(job.queue_name, database),
            str(round(job.head_start * 1000)) if fair else "",
            FAIR_EPOCH,
        ]
        if sha is not None:
            return client.evalsha(sha, len(keys), *keys, *args)
        return script(keys=keys, args=args, client=client)

    if len(jobs) == 1:
        return [bool(await call(jobs[0], redis))]
    # EVALSHA straight on the pipeline: redis-py's scripts on a pipeline cost
    # a SCRIPT EXISTS round trip before every send. A Redis that lost the
    # script (restarted, flushed) answers NOSCRIPT to those calls, which ran
    # nothing: the script is loaded and they go again.
    results: list[Any] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    loaded = False
    while True:
        async with redis.pipeline(transaction=False) as pipe:
            for i in pending:
                call(jobs[i], pipe, script.sha)
            answers = await pipe.execute(raise_on_error=False)
        missing = []
        for i, answer in zip(pending, answers, strict=True):
            if isinstance(answer, NoScriptError):
                missing.append(i)
            elif isinstance(answer, Exception):
                raise answer
            else:
                results[i] = answer
        if not missing:
            break
        if loaded:  # loaded, and lost again at once
            raise NoScriptError("the enqueue script vanished from Redis as it was loaded")
        await redis.script_load(_ENQUEUE)
        loaded = True
        pending = missing
    return [bool(created) for created in results]


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
    [created] = await enqueue_jobs(
        redis, [QueuedJob(function, args, job_id, queue_name, defer_seconds)]
    )
    return created
