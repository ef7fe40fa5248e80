"""Per-API-key rate limits: a token bucket per key id.

A key may make ``burst`` requests at once and ``rate_per_s`` a second after that; a request
that finds the bucket empty is told how long to wait (the API answers 429 with that as
``Retry-After``). Each key has its own bucket, so a bulk import or a runaway client spends only
its own key's tokens and never another's.

With Redis as the state store the bucket lives there (one Lua script, atomic, timed by the Redis
server's clock), so the limit holds across every API replica. With the in-process store it lives
in the process. If Redis does not answer (within 0.25 s), the replica's own bucket decides for
the next 5 s and a warning is logged (at most once a minute): the check fails open to a
per-replica limit, never to a 5xx.

The same script carries revocation notices: revoking a key (``vpp keys revoke``, the admin
endpoint) sets ``<prefix>:revoked:<key id>`` in Redis for :data:`REVOCATION_NOTICE_S`, longer
than any API process keeps a key in its cache, and every replica's next check of that key sees
it. So with Redis a revoked key stops at once everywhere, not only when the cache runs out.

Buckets run on wall time (monotonic, or the Redis server's), not the scaled service clock: a
client's requests arrive in real seconds whatever ``VPP_TIME_SCALE`` is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NamedTuple

from store.state.base import StateStore
from vpp.metrics import RATE_LIMIT_STORE_ERRORS

log = logging.getLogger(__name__)

# KEYS[1] the bucket, KEYS[2] the key's revocation notice; ARGV rate a second (0: no limit),
# burst. The bucket is a hash of tokens and the time they were counted at, expiring once it
# would be full again. Returns "revoked", or the seconds to wait as a string ("0": allowed and a
# token taken), since Lua numbers come back to Redis as integers.
_TAKE = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 'revoked'
end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
if rate <= 0 then
  return '0'
end
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

# How long a rate-limit check may wait for Redis before the local bucket decides, and how long
# after a failure the local bucket decides alone (so an unreachable Redis does not add the wait
# to every request).
STORE_TIMEOUT_S = 0.25
STORE_RETRY_AFTER_S = 5.0
# How long a revocation notice stays in Redis: longer than any API process caches a key.
REVOCATION_NOTICE_S = 120.0


class Verdict(NamedTuple):
    wait_s: float  # 0.0: go ahead (a token was taken); else seconds until the next token
    revoked: bool = False  # a revocation notice for the key is out (Redis only)


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
    """``await check(key_id, rate_per_s, burst)`` → a :class:`Verdict`;
    ``await announce_revoked(key_id)`` after a revocation."""

    def __init__(self, state: StateStore | None = None) -> None:
        self.local = LocalBuckets()
        self._redis: Any = None
        self._prefix = ""
        self._script: Any = None
        self._warned_at = -_WARN_EVERY_S
        self._store_down_until = 0.0
        from store.state.redis import RedisStateStore

        if isinstance(state, RedisStateStore):
            self._redis = state.redis
            self._prefix = state.prefix
            self._script = state.redis.register_script(_TAKE)

    @property
    def shared(self) -> bool:
        """True when the buckets are in Redis (one limit across replicas)."""
        return self._script is not None

    def _keys(self, key_id: str) -> list[str]:
        return [f"{self._prefix}:rl:{key_id}", f"{self._prefix}:revoked:{key_id}"]

    async def check(self, key_id: str, rate_per_s: float, burst: int) -> Verdict:
        burst = max(1, int(burst))
        if self._script is None or time.monotonic() < self._store_down_until:
            if rate_per_s <= 0:
                return Verdict(0.0)  # no limit
            return Verdict(self.local.take(key_id, rate_per_s, burst))
        try:
            # asyncio.timeout, not wait_for: no task per call on this per-request path.
            async with asyncio.timeout(STORE_TIMEOUT_S):
                raw = await self._script(
                    keys=self._keys(key_id), args=[max(0.0, rate_per_s), burst]
                )
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            return Verdict(0.0, revoked=True) if text == "revoked" else Verdict(float(text))
        except Exception as exc:
            RATE_LIMIT_STORE_ERRORS.inc()
            now = time.monotonic()
            self._store_down_until = now + STORE_RETRY_AFTER_S
            if now - self._warned_at >= _WARN_EVERY_S:
                self._warned_at = now
                log.warning(
                    "rate limit: the state store did not answer (%s); each replica limits "
                    "keys with its own bucket until it does",
                    exc.__class__.__name__,
                )
            if rate_per_s <= 0:
                return Verdict(0.0)
            return Verdict(self.local.take(key_id, rate_per_s, burst))

    async def announce_revoked(self, key_id: str) -> bool:
        """Tell every replica at once that ``key_id`` is revoked (Redis only; False if there is
        no Redis or it did not answer: the key caches' TTL then bounds it)."""
        if self._redis is None:
            return False
        try:
            await asyncio.wait_for(
                self._redis.set(self._keys(key_id)[1], b"1", ex=int(REVOCATION_NOTICE_S)),
                STORE_TIMEOUT_S * 4,
            )
        except Exception as exc:
            log.warning("revocation notice for key %s not sent: %s", key_id, exc)
            return False
        return True
