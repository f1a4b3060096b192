"""Per-key rate limits: a token bucket kept in Redis, shared by every gateway process."""

from __future__ import annotations

import math

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.errors import RateLimited

__all__ = ["RateLimiter"]

# KEYS[1] the bucket; ARGV rate (tokens/s), burst. Redis's own clock, so every
# gateway agrees. Returns {allowed, tokens left (string), seconds to full (string)}.
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil then tokens = burst; at = now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst / rate) * 1000) + 1000)
return {allowed, tostring(tokens), tostring((burst - tokens) / rate)}
"""


class RateLimiter:
    """``check(key_id, rate, burst)`` takes a token or raises 429 with the headers."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._script = redis.register_script(_BUCKET)

    async def check(self, key_id: str, rate: float, burst: int) -> None:
        burst = max(1, burst or math.ceil(rate))
        try:
            allowed, tokens, to_full = await self._script(
                keys=[f"gateway:ratelimit:{key_id}"], args=[rate, burst]
            )
        except RedisError:
            return  # fail open: an unreachable Redis must not take the API down
        if int(allowed):
            return
        left = float(tokens)
        retry_after = max(1, math.ceil((1 - left) / rate))
        raise RateLimited(
            f"this API key may make {rate:g} requests per second (bursts of {burst})",
            headers={
                "retry-after": str(retry_after),
                "x-ratelimit-limit": str(burst),
                "x-ratelimit-remaining": str(max(0, math.floor(left))),
                "x-ratelimit-reset": str(math.ceil(float(to_full))),
            },
        )
