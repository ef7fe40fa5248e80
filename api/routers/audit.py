"""GET /v1/audit (admin): who did what and when. Also the admin's key revocation, since a
revoked key is one of the things the trail records."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from api.deps import Principal, forget_key, get_services, rate_limiter, require_roles
from dispatch.services import Services
from store import audit
from store.keys import revoke_api_key
from store.models import AuditEntry
from vpp.domain import AuditAction
from vpp.errors import InvalidInput
from vpp.timefmt import TimeFormatError, parse_rfc3339, to_rfc3339

router = APIRouter(tags=["audit and keys"])

admin = require_roles("admin")

_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid API key"},
    403: {"description": "the key's role may not do this (admin only)"},
}


class AuditEntryOut(BaseModel):
    id: int = Field(description="rises with every row")
    at: str = Field(description="when, RFC 3339 UTC (service clock)")
    tenant: str | None = Field(description="the caller's tenant (null: the command line)")
    key_id: str | None = Field(description="the caller's API key id (null: the command line)")
    actor: str = Field(description="api (an HTTP call with a key) or local (vpp keys, the demo)")
    action: str = Field(description="what was done, e.g. request.committed, key.revoked")
    target_id: str | None = Field(description="the object acted on: request, event, device, key")
    detail: dict[str, Any] = Field(description="a few fields saying what changed")


class AuditList(BaseModel):
    items: list[AuditEntryOut] = Field(description="newest first")
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next (older) page; null on the last page"
    )


class RevokedKeyOut(BaseModel):
    id: str = Field(description="the key id")
    tenant: str = Field(description="the key's tenant")
    role: str = Field(description="the key's role")
    revoked_at: str | None = Field(description="when it was revoked, RFC 3339 UTC")
    expires_at: str | None = Field(None, description="when it would have expired, if it had to")


def entry_doc(row: AuditEntry) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": to_rfc3339(row.ts_ms),
        "tenant": row.tenant_id,
        "key_id": row.key_id,
        "actor": row.actor,
        "action": row.action,
        "target_id": row.target_id,
        "detail": row.detail or {},
    }


def _time(text: str | None, field: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_rfc3339(text, field, assume_utc=True)
    except TimeFormatError as exc:
        raise InvalidInput(field, exc.reason) from None


def _cursor(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise InvalidInput("cursor", "the next_cursor of a previous page (a positive integer)")
    return int(text)


@router.get(
    "/v1/audit",
    response_model=AuditList,
    summary="The audit trail: quotes, commits, cancels, grid events, aborts, devices, keys",
    responses={
        **_AUTH,
        422: {"description": "a bad filter, named: since, until, action, limit, cursor"},
    },
)
async def list_audit(
    since: str | None = Query(None, max_length=64, description="from this time, RFC 3339"),
    until: str | None = Query(None, max_length=64, description="before this time, RFC 3339"),
    tenant: str | None = Query(None, max_length=64, description="only this caller's tenant"),
    action: str | None = Query(
        None, max_length=40, description="only this action: " + ", ".join(a for a in AuditAction)
    ),
    limit: int = Query(100, ge=1, le=audit.MAX_LIMIT, description="page size (1–1000)"),
    cursor: str | None = Query(None, max_length=18, description="a previous page's next_cursor"),
    principal: Principal = Depends(admin),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    since_ms, until_ms = _time(since, "since"), _time(until, "until")
    if since_ms is not None and until_ms is not None and until_ms <= since_ms:
        raise InvalidInput("until", "must be after since")
    if action is not None and action not in set(AuditAction):
        raise InvalidInput("action", f"one of {', '.join(a for a in AuditAction)}")
    rows, next_id = await audit.list_entries(
        services.db,
        since_ms=since_ms,
        until_ms=until_ms,
        tenant_id=tenant,
        action=action,
        before_id=_cursor(cursor),
        limit=limit,
    )
    return {
        "items": [entry_doc(r) for r in rows],
        "next_cursor": str(next_id) if next_id is not None else None,
    }


@router.post(
    "/v1/api-keys/{key_id}/revoke",
    response_model=RevokedKeyOut,
    summary="Revoke an API key: it answers 401 from now on (admin only)",
    responses={**_AUTH, 404: {"description": "no such API key"}},
)
async def revoke_key(
    request: Request,
    key_id: str = Path(description="the key id: the part of vpp_<id>_… after vpp_", max_length=32),
    principal: Principal = Depends(admin),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    row, _ = await revoke_api_key(
        services.db, key_id, services.clock.now_ms(), actor=principal.actor
    )
    forget_key(key_id)  # this process: at once
    await rate_limiter(request, services).announce_revoked(key_id)  # other replicas (Redis)
    return {
        "id": row.id,
        "tenant": row.tenant_id,
        "role": row.role,
        "revoked_at": to_rfc3339(row.revoked_ms),
        "expires_at": to_rfc3339(row.expires_ms),
    }
