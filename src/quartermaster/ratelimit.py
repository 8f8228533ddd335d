"""Rate limiting per caller, in Redis, so every API instance charges the same bucket.

A token bucket per caller (the token's subject, or the client address for anonymous callers)
holding the role's points per window (``QM_RATE_LIMITS``, ``QM_RATE_WINDOW_S``) and refilling
continuously. Each operation is charged its query cost (at least 1). The bucket lives in one
Redis hash updated by a Lua script that reads Redis's own clock, so instances with skewed clocks
agree. When Redis is unreachable the limiter lets requests through (and logs it): an outage of
the limiter must not become an outage of the API.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from quartermaster.auth import Principal
from quartermaster.config import AccessSettings

log = structlog.get_logger(__name__)

_CHARGE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
if tokens < cost then
  return {0, tostring((cost - tokens) / rate), tostring(tokens)}
end
tokens = tokens - cost
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {1, '0', tostring(tokens)}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0
    remaining: float | None = None


class RateLimiter:
    def __init__(self, redis: Redis, settings: AccessSettings, prefix: str = "qm:rate:") -> None:
        self.redis = redis
        self.settings = settings
        self.prefix = prefix
        self._script = redis.register_script(_CHARGE)

    async def charge(self, key: str | None, principal: Principal, cost: int) -> Decision:
        limit = self.settings.rate_limit(principal.role)
        if limit <= 0 or key is None:
            return Decision(True)
        rate = limit / self.settings.rate_window_s
        try:
            allowed, retry, remaining = await self._script(
                keys=[self.prefix + key], args=[rate, limit, cost]
            )
        except RedisError as exc:
            log.warning("ratelimit.unavailable", error=repr(exc))
            return Decision(True)
        if int(allowed):
            return Decision(True, remaining=float(remaining))
        if cost > limit:
            # More than a whole window's points: waiting cannot help; say when the bucket is full.
            return Decision(False, retry_after=self.settings.rate_window_s, remaining=0.0)
        return Decision(False, retry_after=max(1.0, float(retry)), remaining=float(remaining))
