"""FastAPI dependencies: the service container and API-key authentication."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.auth import hash_key
from vpp.domain import Role
from vpp.services import Services

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

        from vpp.db.models import ApiKey

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
    """Dependency: the caller's key must have one of ``roles`` (admin always passes)."""
    allowed = {Role(r) for r in roles} | {Role.admin}

    async def dependency(principal: Principal = Depends(authenticate)) -> Principal:
        if principal.role not in allowed:
            raise HTTPException(
                403,
                f"role {principal.role.value!r} may not do this "
                f"(needs one of: {', '.join(sorted(r.value for r in allowed))})",
            )
        return principal

    return dependency


any_role = require_roles(*Role)
