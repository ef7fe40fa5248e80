"""/v1/events: both kinds of event (capacity requests and grid events) that run or ran, and a
minute-by-minute timeline of one, for the dashboard. Operators and admins see every event; a
hyperscaler sees only its own requests (another tenant's id answers 404)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from pydantic import BaseModel, Field

from api.deps import Principal, get_services, require_roles
from dispatch import events_service as es
from dispatch.settlement_service import timeline
from vpp.services import Services

router = APIRouter(tags=["events"])

viewer = require_roles("operator", "hyperscaler")


class EventSummary(BaseModel):
    id: str
    kind: str = Field(description="capacity_request or grid_event")
    tenant_id: str
    region: str
    mw: float
    start: str | None
    end: str | None
    priority: int
    preempt: bool
    status: str
    created_at: str | None = None


class TimelinePoint(BaseModel):
    ts: str | None = Field(description="service time of the control step, RFC 3339 UTC")
    target_mw: float
    delivered_mw: float = Field(description="closed-loop estimate from fresh telemetry")
    commanded: int = Field(description="devices under a live command")
    acknowledged: int
    opted_out: int
    replaced: int
    stale: int
    action: str | None = Field(None, description="what the closed loop did at this step")


class Timeline(BaseModel):
    event_id: str
    kind: str
    status: str
    points: list[TimelinePoint]


@router.get(
    "/v1/events",
    response_model=list[EventSummary],
    summary="Running (status=active) or recently ended (status=recent) events of both kinds",
)
async def list_events(
    status: Literal["active", "recent"] = Query("active"),
    principal: Principal = Depends(viewer),
    services: Services = Depends(get_services),
) -> list[dict[str, Any]]:
    tenant = None if principal.sees_all_tenants else principal.tenant_id
    return await es.list_events(
        services, status=status, tenant_id=tenant, now_ms=services.clock.now_ms()
    )


@router.get(
    "/v1/events/{event_id}/timeline",
    response_model=Timeline,
    summary="Minute by minute: target, delivered estimate, devices commanded/acked/opted out",
    responses={404: {"description": "no such event for this tenant"}},
)
async def event_timeline(
    event_id: str = Path(max_length=64),
    principal: Principal = Depends(viewer),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    ev = await es.load_event(services, event_id)
    if ev is None or (
        not principal.sees_all_tenants and (ev.is_grid or ev.tenant_id != principal.tenant_id)
    ):
        raise HTTPException(404, f"id: no event {event_id!r}")
    return {
        "event_id": ev.id,
        "kind": ev.kind,
        "status": ev.status,
        "points": await timeline(services, event_id),
    }
