"""/v1/grid-events: an operator's short-notice call on the fleet (roles operator, admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from api import auditing
from api.deps import Principal, get_services, require_roles
from api.presenters.events import event_doc, grid_event_doc
from api.schemas.capacity_requests import DeliverySummaryOut
from api.schemas.times import Rfc3339Ms
from dispatch import events as es
from dispatch.services import Services
from dispatch.settlement_service import event_settlement
from vpp.domain import AuditAction

router = APIRouter(tags=["grid events"])

operator = require_roles("operator")

_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid API key"},
    403: {"description": "the key's role may not do this (operator or admin only)"},
}
# Grid events belong to the grid, not to a tenant: every operator and admin key sees them all.
_ERRORS: dict[int | str, dict[str, Any]] = {
    **_AUTH,
    404: {"description": "no such grid event"},
    422: {"description": "the id is malformed (over 64 characters)"},
}
_ID = Path(description="grid event id, ge-<12 hex>", max_length=64)


class GridEventIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "region": "ERCOT-NORTH",
                    "mw": 10,
                    "start": "2026-07-15T19:00:00Z",
                    "end": "2026-07-15T20:00:00Z",
                    "priority": 100,
                    "preempt": False,
                }
            ]
        },
    )

    region: str = Field(min_length=1, max_length=64, description="ISO zone, e.g. ERCOT-NORTH")
    mw: float = Field(gt=0, allow_inf_nan=False, description="MW of load reduction asked for")
    start: Rfc3339Ms = Field(
        description="RFC 3339 with an offset; now or later (up to 5 minutes in the past is "
        "taken as now)"
    )
    end: Rfc3339Ms = Field(description="RFC 3339 with an offset; after start, at most 24 h")
    priority: int | None = Field(
        None, ge=0, le=1000, description="higher wins (default 100; capacity requests are 50)"
    )
    preempt: bool = Field(
        False,
        description="false: dispatch only from what commitments leave free; true: may take "
        "devices from lower-priority commitments",
    )


class GridInterval(BaseModel):
    start: str | None = Field(description="settlement interval start, RFC 3339 UTC")
    end: str | None = Field(description="settlement interval end, RFC 3339 UTC")
    target_mw: float = Field(description="MW of load reduction asked for in the interval")
    delivered_mw: float = Field(description="MW measured: baseline − actual")
    baseline_mw: float = Field(
        description="what the dispatched devices would have drawn (net) without the event, MW"
    )
    actual_mw: float = Field(description="what the dispatched devices drew (net), MW")
    performance: float = Field(description="delivered ÷ target in this interval, capped at 1")
    method: str = Field(description="baseline method(s) the interval was measured with")


class GridEventOut(BaseModel):
    id: str = Field(description="ge-<12 hex>")
    kind: str = Field("grid_event", description="always grid_event")
    region: str = Field(description="ISO zone, e.g. ERCOT-NORTH")
    mw: float = Field(description="MW of load reduction asked for")
    start: str | None = Field(
        description="window start, RFC 3339 UTC (a start given in the past is stored as now)"
    )
    end: str | None = Field(description="window end, RFC 3339 UTC")
    priority: int = Field(description="higher wins (0–1000; capacity requests are 50)")
    preempt: bool = Field(
        description="true: may take devices from lower-priority commitments; false: only what "
        "commitments leave free"
    )
    status: str = Field(description="scheduled, active, completed or aborted")
    created_at: str | None = Field(None, description="when it was raised, RFC 3339 UTC")
    source: str = Field(
        "api",
        description="who raised it: api (POST /v1/grid-events) or openadr (an OpenADR 3.1 "
        "event of a business-logic client, one grid event per run of equal interval values)",
    )
    source_id: str | None = Field(
        None, description="openadr: the OpenADR event's id (GET /openadr3/3.1.0/events/{id})"
    )
    settled: bool = Field(False, description="true once the settlement lines are stored")
    intervals: list[GridInterval] = Field(
        default_factory=list,
        description="per settlement interval: target, delivered and performance (provisional "
        "while the event runs, stored lines once settled; empty before the window)",
    )
    performance: float | None = Field(
        None,
        description="Σ min(delivered, target) × h ÷ Σ target × h over the intervals measured "
        "(delivery.performance)",
    )
    delivery: DeliverySummaryOut | None = Field(
        None,
        description="once measured: delivered MW, committed MW and performance over the "
        "intervals, the figures every screen shows",
    )
    devices: dict[str, int] = Field(
        default_factory=dict,
        description="device counts: commanded, acknowledged, opted_out, replaced",
    )


def _audit_detail(rec: es.EventRecord) -> dict[str, Any]:
    info = rec.info
    return {
        "region": info.region,
        "mw": info.mw,
        "start_ms": info.start_ms,
        "end_ms": info.end_ms,
        "priority": info.priority,
        "preempt": info.preempt,
        "status": info.status,
    }


async def _present(services: Services, rec: es.EventRecord) -> dict[str, Any]:
    return grid_event_doc(rec, await event_settlement(services, rec.info.id))


@router.post(
    "/v1/grid-events",
    status_code=201,
    response_model=GridEventOut,
    summary="Raise a grid event: the fleet is dispatched when its window opens",
    responses={
        **_AUTH,
        422: {
            "description": "a bad field, named: region (unknown), mw (≤ 0 or too large), start "
            "(more than 5 minutes in the past, or not RFC 3339 with an offset), end (not after "
            "start, in the past, or over 24 h after start), priority (outside 0–1000)"
        },
    },
)
async def create_grid_event(
    body: GridEventIn,
    principal: Principal = Depends(operator),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    rec = await es.create_grid_event(
        services,
        principal.tenant_id,
        region=body.region,
        mw=body.mw,
        start_ms=body.start,
        end_ms=body.end,
        priority=body.priority,
        preempt=body.preempt,
    )
    await auditing.record(
        services, principal, AuditAction.grid_event_created, rec.info.id, _audit_detail(rec)
    )
    return await _present(services, rec)


@router.get(
    "/v1/grid-events",
    response_model=list[GridEventOut],
    summary="Grid events, latest first",
    responses=_AUTH,
)
async def list_grid_events(
    principal: Principal = Depends(operator), services: Services = Depends(get_services)
) -> list[dict[str, Any]]:
    return [event_doc(rec) for rec in await es.list_grid_events(services)]


@router.get(
    "/v1/grid-events/{event_id}",
    response_model=GridEventOut,
    summary="A grid event: status and, once running, target/delivered/performance per interval",
    responses=_ERRORS,
)
async def get_grid_event(
    event_id: str = _ID,
    principal: Principal = Depends(operator),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    return await _present(services, await es.get_grid_event(services, event_id))


@router.post(
    "/v1/grid-events/{event_id}/abort",
    response_model=GridEventOut,
    summary="Abort a grid event: every device is restored at once",
    responses={
        **_ERRORS,
        409: {"description": "the grid event is already completed or aborted"},
    },
)
async def abort_grid_event(
    event_id: str = _ID,
    principal: Principal = Depends(operator),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    rec = await es.abort_grid_event(services, event_id)
    await auditing.record(
        services, principal, AuditAction.grid_event_aborted, rec.info.id, _audit_detail(rec)
    )
    return await _present(services, rec)
