"""The routers' one call to the audit trail, made right after an action succeeded (the caller
is known here, from its key). It never raises: see :func:`store.audit.record`."""

from __future__ import annotations

from typing import Any

from api.deps import Principal
from dispatch.services import Services
from store import audit
from vpp.domain import AuditAction


async def record(
    services: Services,
    principal: Principal,
    action: AuditAction,
    target_id: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    await audit.record(
        services.db, principal.actor, action, services.clock.now_ms(), target_id, detail
    )
