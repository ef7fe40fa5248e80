"""/v1/capacity-requests: quote, commit, cancel, get and list (the market's HTTP edge)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Header, Path, Query, Response

from api import auditing
from api.deps import Principal, get_services, require_roles
from api.presenters.requests import request_detail_doc, request_doc
from api.schemas.capacity_requests import (
    CapacityRequestIn,
    CapacityRequestList,
    CapacityRequestOut,
    ListStatus,
    QuotePreviewOut,
)
from dispatch.market import RequestInput
from dispatch.services import Services
from store.models import CapacityRequest
from vpp.domain import AuditAction
from vpp.timefmt import to_rfc3339

log = logging.getLogger(__name__)

router = APIRouter(tags=["capacity requests"])

buyer = require_roles("hyperscaler", "operator")

_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid API key"},
    403: {"description": "the key's role may not do this (hyperscaler, operator or admin)"},
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    **_AUTH,
    404: {"description": "no such request for this tenant (another tenant's id looks the same)"},
}
_ID = Path(description="capacity request id, cr-<12 hex>", max_length=64)


def _scope(principal: Principal) -> str | None:
    return None if principal.sees_all_tenants else principal.tenant_id


def _audit_detail(req: CapacityRequest) -> dict[str, Any]:
    return {
        "tenant": req.tenant_id,
        "region": req.region,
        "mw": req.mw,
        "quoted_mw": req.quoted_mw,
        "status": req.status,
        "start_ms": req.start_ms,
        "end_ms": req.end_ms,
    }


@router.post(
    "/v1/capacity-requests",
    status_code=201,
    response_model=CapacityRequestOut,
    summary="Ask for firm capacity: answered with a quote (or a rejection naming why)",
    responses={
        **_AUTH,
        422: {
            "description": "a bad field, named: mw, start, end, firmness, region, direction; or "
            "an Idempotency-Key reused with a different body"
        },
    },
)
async def create_request(
    body: CapacityRequestIn,
    response: Response,
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        description="the same key and body return the same request, never a second one",
        max_length=200,
    ),
    services: Services = Depends(get_services),
    principal: Principal = Depends(buyer),
) -> dict[str, Any]:
    market = services.market
    req, replayed = await market.quote(principal.tenant_id, _input(body), idempotency_key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        await auditing.record(
            services, principal, AuditAction.request_quoted, req.id, _audit_detail(req)
        )
    return request_detail_doc(await market.detail(req))


def _input(body: CapacityRequestIn) -> RequestInput:
    return RequestInput(
        region=body.region,
        mw=float(body.mw),
        start_ms=body.start,
        end_ms=body.end,
        firmness=float(body.firmness),
        direction=body.direction.value,
        max_price_per_mwh=body.max_price_per_mwh,
    )


@router.post(
    "/v1/capacity-requests/preview",
    response_model=QuotePreviewOut,
    summary="Preview a quote without making one: what POST /v1/capacity-requests would answer "
    "now (same body, same checks), nothing stored or booked",
    responses={
        **_AUTH,
        422: {"description": "a bad field, named, as for POST /v1/capacity-requests"},
    },
)
async def preview_request(
    body: CapacityRequestIn,
    services: Services = Depends(get_services),
    principal: Principal = Depends(buyer),
) -> dict[str, Any]:
    pre = await services.market.preview(_input(body))
    q = pre.quote
    return {
        "status": q.status,
        "quoted_mw": q.quoted_mw,
        "available_mw": pre.available_mw,
        "reason": q.reason,
        "binding_interval": to_rfc3339(q.binding_slot_ms) if q.binding_slot_ms else None,
        "quote_would_expire_at": to_rfc3339(pre.expires_ms) if pre.expires_ms else None,
        "intervals": pre.intervals,
        "region": body.region,
        "mw": float(body.mw),
        "firmness": float(body.firmness),
        "start": to_rfc3339(body.start),
        "end": to_rfc3339(body.end),
        "stored": False,
    }


@router.post(
    "/v1/capacity-requests/{request_id}/commit",
    response_model=CapacityRequestOut,
    summary="Book the quoted MW (409 if it is no longer there, or the quote expired)",
    responses={
        **_ERRORS,
        409: {
            "description": "the quote expired, was cancelled or rejected, the window started, "
            "or the capacity is no longer available (the ledger is unchanged)"
        },
    },
)
async def commit_request(
    request_id: str = _ID,
    services: Services = Depends(get_services),
    principal: Principal = Depends(buyer),
) -> dict[str, Any]:
    market = services.market
    req, changed = await market.commit(request_id, _scope(principal))
    if changed:
        await auditing.record(
            services, principal, AuditAction.request_committed, req.id, _audit_detail(req)
        )
        # The plan is made now so the buyer sees it; a failure here leaves the booking intact
        # and the planner's refresh makes the plan later.
        try:
            await services.planner.plan_for(req.id, reason="committed")
        except Exception:
            log.exception("planning %s after commit", req.id)
    return request_detail_doc(await market.detail(req))


@router.post(
    "/v1/capacity-requests/{request_id}/cancel",
    response_model=CapacityRequestOut,
    summary="Cancel before the window opens; booked capacity is released",
    responses={
        **_ERRORS,
        409: {"description": "the window started, or the request is completed/rejected/expired"},
    },
)
async def cancel_request(
    request_id: str = _ID,
    services: Services = Depends(get_services),
    principal: Principal = Depends(buyer),
) -> dict[str, Any]:
    market = services.market
    req, changed = await market.cancel(request_id, _scope(principal))
    if changed:
        await auditing.record(
            services, principal, AuditAction.request_cancelled, req.id, _audit_detail(req)
        )
    return request_detail_doc(await market.detail(req))


@router.get(
    "/v1/capacity-requests",
    response_model=CapacityRequestList,
    summary="Your tenant's requests (operator and admin: every tenant's), newest first",
    responses=_AUTH,
)
async def list_requests(
    status: ListStatus | None = Query(None, description="only requests in this status"),
    region: str | None = Query(None, max_length=64, description="only this region"),
    limit: int = Query(100, ge=1, le=1000, description="page size (1–1000)"),
    offset: int = Query(0, ge=0, le=1_000_000_000, description="requests to skip (newest first)"),
    services: Services = Depends(get_services),
    principal: Principal = Depends(buyer),
) -> dict[str, Any]:
    market = services.market
    rows, total = await market.list_requests(
        _scope(principal), status=status, region=region, limit=limit, offset=offset
    )
    plans = await market.latest_plans([r.id for r in rows])
    items = [request_doc(r, plans.get(r.id)) for r in rows]
    return {"items": items, "total": total, "limit": limit, "offset": offset}


@router.get(
    "/v1/capacity-requests/{request_id}",
    response_model=CapacityRequestOut,
    summary="A request: status, plan, booked MW and, once run, delivery and performance",
    responses=_ERRORS,
)
async def get_request(
    request_id: str = _ID,
    services: Services = Depends(get_services),
    principal: Principal = Depends(buyer),
) -> dict[str, Any]:
    market = services.market
    req = await market.get(request_id, _scope(principal))
    return request_detail_doc(await market.detail(req))
