"""Per-API-key rate limits: a token bucket per key id.

A key may make ``burst`` requests at once and ``rate_per_s`` a second after that; a request
that finds the bucket empty is told how long to wait (the API answers 429 with that as
``Retry-After``). Each key has its own bucket, so a bulk import or a runaway client spends only
its own key's tokens and never another's.

With Redis as the state store the bucket lives there (one Lua script, atomic, timed by the Redis
server's clock), so the limit holds across every API replica. With the in-process store it lives
in the process. If Redis does not answer, the replica's own bucket decides and a warning is
logged (at most once a minute): the check fails open to a per-replica limit, never to a 5xx.

Buckets run on wall time (monotonic, or the Redis server's), not the scaled service clock: a
client's requests arrive in real seconds whatever ``VPP_TIME_SCALE`` is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from store.state.base import StateStore
from vpp.metrics import RATE_LIMIT_STORE_ERRORS

log = logging.getLogger(__name__)

# KEYS[1] the bucket; ARGV rate a second, burst. The bucket is a hash of tokens and the time
# they were counted at, expiring once it would be full again. Returns the seconds to wait as a
# string ("0": allowed and a token taken), since Lua numbers come back to Redis as integers.
_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil or ts == nil then
  tokens, ts = burst, now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts',
  string.format('%.6f', now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return string.format('%.6f', wait)
"""

# How long a rate-limit check may wait for Redis before the local bucket decides.
STORE_TIMEOUT_S = 0.25
_WARN_EVERY_S = 60.0


class LocalBuckets:
    """Token buckets in this process, on the monotonic clock."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key id → (tokens, at)

    def take(self, key_id: str, rate_per_s: float, burst: int, now: float | None = None) -> float:
        """0.0 if a token was taken, else the seconds until one is there."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(key_id, (float(burst), now))
        tokens = min(float(burst), tokens + max(0.0, now - at) * rate_per_s)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate_per_s
        self._buckets[key_id] = (tokens, now)
        if len(self._buckets) > 100_000:  # keys are few; this only bounds a pathological case
            self._buckets.pop(next(iter(self._buckets)))
        return wait


class RateLimiter:
    """``await take(key_id, rate_per_s, burst)`` → 0.0 (go ahead) or the seconds to wait."""

    def __init__(self, state: StateStore | None = None) -> None:
        self.local = LocalBuckets()
        self._redis: Any = None
        self._prefix = ""
        self._script: Any = None
        self._warned_at = -_WARN_EVERY_S
        from store.state.redis import RedisStateStore

        if isinstance(state, RedisStateStore):
            self._redis = state.redis
            self._prefix = state.prefix
            self._script = state.redis.register_script(_TAKE)

    @property
    def shared(self) -> bool:
        """True when the buckets are in Redis (one limit across replicas)."""
        return self._script is not None

    async def take(self, key_id: str, rate_per_s: float, burst: int) -> float:
        if rate_per_s <= 0:
            return 0.0  # no limit
        burst = max(1, int(burst))
        if self._script is None:
            return self.local.take(key_id, rate_per_s, burst)
        try:
            raw = await asyncio.wait_for(
                self._script(keys=[f"{self._prefix}:rl:{key_id}"], args=[rate_per_s, burst]),
                STORE_TIMEOUT_S,
            )
            return float(raw.decode() if isinstance(raw, bytes) else raw)
        except Exception as exc:
            RATE_LIMIT_STORE_ERRORS.inc()
            now = time.monotonic()
            if now - self._warned_at >= _WARN_EVERY_S:
                self._warned_at = now
                log.warning(
                    "rate limit: the state store did not answer (%s); each replica limits "
                    "keys with its own bucket until it does",
                    exc.__class__.__name__,
                )
            return self.local.take(key_id, rate_per_s, burst)
