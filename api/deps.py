"""FastAPI dependencies: the service container, API-key authentication (unknown, revoked and
expired keys: 401) and the per-key rate limit (429 with Retry-After)."""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from devices.outages import dependency_down
from dispatch.services import Services
from store.audit import Actor
from store.keys import find_key, hash_key
from store.ratelimit import RateLimiter
from vpp.domain import Role
from vpp.metrics import HTTP_RATE_LIMITED
from vpp.timefmt import to_rfc3339

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer vpp_…`")


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant_id: str
    role: Role
    # The key's own token bucket; None: the settings' default.
    rate_limit_per_s: float | None = None
    rate_limit_burst: int | None = None

    @property
    def sees_all_tenants(self) -> bool:
        """admin and operator act across tenants; fleet and hyperscaler keys see their own."""
        return self.role in (Role.admin, Role.operator)

    @property
    def actor(self) -> Actor:
        """Who the audit trail names for this caller."""
        return Actor("api", self.tenant_id, self.key_id)


@dataclass(frozen=True)
class KnownKey:
    """A key as the database knows it: revoked and expired keys are kept, so the 401 says why."""

    principal: Principal
    revoked_ms: int | None
    expires_ms: int | None


# Key lookups are cached briefly so a busy dashboard does not hit the database per request.
# A revoked key stops at once: through this process's API its entry is dropped; with Redis,
# `vpp keys revoke` and every replica's revocation leave a notice that the per-request rate-limit
# check sees (store/ratelimit.py). Without Redis, a key revoked by another process stops within
# the TTL. Expiry is checked on every request against the service clock, cached or not.
_KEY_CACHE: dict[str, tuple[KnownKey | None, float]] = {}
_KEY_CACHE_TTL_S = 10.0
# While the database is down a key seen before keeps its last answer, asked again this often.
_KEY_RETRY_S = 1.0


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


async def _known_key(services: Services, digest: str) -> KnownKey | None:
    """The key with this hash, from the cache or the database."""
    now = time.monotonic()
    cached = _KEY_CACHE.get(digest)
    if cached is not None and cached[1] > now:
        return cached[0]
    try:
        row = await find_key(services.db, digest)
    except Exception as exc:
        # The database is down: a key it answered for before keeps that answer until it is
        # back (a revocation made meanwhile counts from then); an unseen key gets the 503.
        if cached is None or dependency_down(exc) != "database":
            raise
        _KEY_CACHE[digest] = (cached[0], now + _KEY_RETRY_S)
        return cached[0]
    known = (
        KnownKey(
            Principal(
                row.id,
                row.tenant_id,
                Role(row.role),
                row.rate_limit_per_s,
                row.rate_limit_burst,
            ),
            row.revoked_ms,
            row.expires_ms,
        )
        if row is not None
        else None
    )
    _KEY_CACHE[digest] = (known, now + _KEY_CACHE_TTL_S)
    return known


def forget_key(key_id: str) -> None:
    """Drop a key from this process's cache (it was just revoked here)."""
    for digest, (known, _) in list(_KEY_CACHE.items()):
        if known is not None and known.principal.key_id == key_id:
            _KEY_CACHE.pop(digest, None)


def _check_live(known: KnownKey | None, now_ms: int) -> Principal:
    """The caller, or 401 saying why not: unknown, revoked or expired."""
    if known is None:
        raise _unauthorized("invalid API key")
    key_id = known.principal.key_id
    if known.revoked_ms is not None:
        raise _unauthorized(f"API key {key_id} was revoked at {to_rfc3339(known.revoked_ms)}")
    if known.expires_ms is not None and now_ms >= known.expires_ms:
        raise _unauthorized(f"API key {key_id} expired at {to_rfc3339(known.expires_ms)}")
    return known.principal


def rate_limiter(request: Request, services: Services) -> RateLimiter:
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        limiter = RateLimiter(services.state)
        request.app.state.rate_limiter = limiter
    return limiter


async def _check_rate(request: Request, services: Services, principal: Principal) -> bool:
    """429 with Retry-After when the caller's key has no token left in its bucket. Returns
    True when a revocation notice for the key is out instead (revoked by another process since
    this one cached it)."""
    settings = services.settings
    rate = principal.rate_limit_per_s
    rate = settings.rate_limit_per_s if rate is None else rate
    burst = principal.rate_limit_burst or settings.rate_limit_burst
    verdict = await rate_limiter(request, services).check(principal.key_id, rate, burst)
    if verdict.revoked:
        return True
    if verdict.wait_s > 0:
        HTTP_RATE_LIMITED.inc()
        retry_after = max(1, math.ceil(verdict.wait_s))
        raise HTTPException(
            429,
            f"rate limit: API key {principal.key_id} is over {rate:g} requests/s (burst "
            f"{burst}); retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
    return False


async def authenticate(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    services: Services = Depends(get_services),
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("missing API key: send Authorization: Bearer <key>")
    digest = hash_key(credentials.credentials)
    principal = _check_live(await _known_key(services, digest), services.clock.now_ms())
    if await _check_rate(request, services, principal):
        # Revoked elsewhere since it was cached: the database says so (and when).
        forget_key(principal.key_id)
        principal = _check_live(await _known_key(services, digest), services.clock.now_ms())
    return principal


def require_roles(*roles: Role | str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """Dependency: the caller's key must have one of ``roles`` (admin always passes). Then the
    query string must name only the operation's own parameters, each once (401, 403, then 422)."""
    allowed = {Role(r) for r in roles} | {Role.admin}

    async def dependency(
        request: Request, principal: Principal = Depends(authenticate)
    ) -> Principal:
        if principal.role not in allowed:
            raise HTTPException(
                403,
                f"role {principal.role.value!r} may not do this "
                f"(needs one of: {', '.join(sorted(r.value for r in allowed))})",
            )
        check_query_params(request)
        return principal

    return dependency


def _query_params(dependant: Any) -> dict[str, bool]:
    """alias → takes several values, over the dependant and its sub-dependencies."""
    out: dict[str, bool] = {}
    for field in getattr(dependant, "query_params", ()):
        annotation = field.field_info.annotation
        args = typing.get_args(annotation) if typing.get_origin(annotation) else ()
        kinds = {typing.get_origin(annotation), *(typing.get_origin(a) for a in args)}
        out[field.alias] = bool(kinds & {list, set, tuple, frozenset})
    for sub in getattr(dependant, "dependencies", ()):
        out.update(_query_params(sub))
    return out


def check_query_params(request: Request) -> None:
    """A query parameter the operation does not take (``?regoin=…``), or a single-valued one
    given twice, is a 422 naming it rather than silently ignored: a typo must not widen a filter."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    known: dict[str, bool] | None = getattr(route, "_vpp_query_params", None)
    if known is None:
        known = _query_params(dependant)
        route._vpp_query_params = known  # type: ignore[union-attr]
    problems = []
    for name in dict.fromkeys(request.query_params.keys()):
        if name not in known:
            expected = ", ".join(sorted(known)) or "none"
            problems.append(
                f"{name or '(empty)'}: unknown query parameter (this call takes: {expected})"
            )
        elif not known[name] and len(request.query_params.getlist(name)) > 1:
            problems.append(f"{name}: given more than once")
    if problems:
        raise HTTPException(422, "; ".join(problems))


any_role = require_roles(*Role)
