"""FastAPI dependencies: the service container and API-key authentication."""

from __future__ import annotations

import time
import typing
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dispatch.services import Services
from store.keys import hash_key
from vpp.domain import Role

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer vpp_…`")


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant_id: str
    role: Role

    @property
    def sees_all_tenants(self) -> bool:
        """admin and operator act across tenants; fleet and hyperscaler keys see their own."""
        return self.role in (Role.admin, Role.operator)


# Key lookups are cached briefly so a busy dashboard does not hit the database per request;
# a revoked key stops working within the TTL.
_KEY_CACHE: dict[str, tuple[Principal | None, float]] = {}
_KEY_CACHE_TTL_S = 10.0


async def authenticate(
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    services: Services = Depends(get_services),
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise HTTPException(
            401,
            "missing API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    digest = hash_key(credentials.credentials)
    now = time.monotonic()
    cached = _KEY_CACHE.get(digest)
    if cached is not None and cached[1] > now:
        principal = cached[0]
    else:
        from sqlalchemy import select

        from store.models import ApiKey

        async with services.db.session() as session:
            row = (
                await session.execute(
                    select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_ms.is_(None))
                )
            ).scalar_one_or_none()
        principal = Principal(row.id, row.tenant_id, Role(row.role)) if row else None
        _KEY_CACHE[digest] = (principal, now + _KEY_CACHE_TTL_S)
    if principal is None:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
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
