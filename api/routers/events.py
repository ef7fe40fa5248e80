"""/v1/events: both kinds of event (capacity requests and grid events) that run or ran, and a
minute-by-minute timeline of one, for the dashboard. Operators and admins see every event; a
hyperscaler sees only its own requests (another tenant's id answers 404)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field

from api.deps import Principal, get_services, require_roles
from api.presenters.events import event_summary_doc, timeline_doc
from api.schemas.capacity_requests import DeliverySummaryOut
from dispatch import events as es
from dispatch.services import Services
from dispatch.settlement_service import settlement_lines, summarise, timeline_rows
from vpp.errors import NotFound

router = APIRouter(tags=["events"])

viewer = require_roles("operator", "hyperscaler")


_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid API key"},
    403: {"description": "the key's role may not do this (hyperscaler, operator or admin)"},
}
_ID = Path(
    description="event id: a capacity request (cr-<12 hex>) or a grid event (ge-<12 hex>)",
    max_length=64,
)


class EventSummary(BaseModel):
    id: str = Field(description="cr-<12 hex> (capacity request) or ge-<12 hex> (grid event)")
    kind: str = Field(description="capacity_request or grid_event")
    tenant_id: str = Field(
        description="the buyer's tenant (a request) or the tenant of the operator who raised it "
        "(a grid event)"
    )
    region: str = Field(description="ISO zone, e.g. ERCOT-NORTH")
    mw: float = Field(description="MW committed (a request) or asked for (a grid event)")
    start: str | None = Field(description="window start, RFC 3339 UTC")
    end: str | None = Field(description="window end, RFC 3339 UTC")
    priority: int = Field(description="higher wins when the fleet cannot cover both")
    preempt: bool = Field(
        description="true: may take devices from lower-priority commitments (grid events only)"
    )
    status: str = Field(
        description="a request: active, completed or cancelled; a grid event: active, completed "
        "or aborted"
    )
    created_at: str | None = Field(None, description="when it was made, RFC 3339 UTC")
    source: str = Field(
        "api",
        description="who raised it: api (the /v1 API) or openadr (an OpenADR 3.1 event of a "
        "business-logic client)",
    )
    source_id: str | None = Field(None, description="openadr: the OpenADR event's id")


class TimelinePoint(BaseModel):
    ts: str | None = Field(description="service time of the control step, RFC 3339 UTC")
    target_mw: float = Field(description="MW asked of the fleet at this step")
    delivered_mw: float = Field(description="closed-loop estimate from fresh telemetry")
    commanded: int = Field(description="devices under a live command")
    acknowledged: int = Field(description="devices that acknowledged their command")
    opted_out: int = Field(description="devices whose owner opted out of the event")
    replaced: int = Field(
        description="devices replaced so far (opted out, missed, stale, or preempted)"
    )
    stale: int = Field(description="devices without fresh telemetry at this step")
    action: str | None = Field(None, description="what the closed loop did at this step")


class Timeline(BaseModel):
    event_id: str = Field(description="the event's id")
    kind: str = Field(description="capacity_request or grid_event")
    status: str = Field(description="the event's status now")
    points: list[TimelinePoint] = Field(description="one point per control step, oldest first")
    delivery: DeliverySummaryOut | None = Field(
        None,
        description="delivered MW, committed MW and performance from the stored settlement "
        "lines (provisional while the event runs, final once settled; null before any): the "
        "figures the event's JSON, CSV and the settlement page show. The points' "
        "delivered_mw are the closed loop's live estimates",
    )


@router.get(
    "/v1/events",
    response_model=list[EventSummary],
    summary="Running (status=active) or recently ended (status=recent) events of both kinds",
    responses={**_AUTH, 422: {"description": "status is neither active nor recent"}},
)
async def list_events(
    status: Literal["active", "recent"] = Query(
        "active",
        description="active: running now; recent: completed, cancelled or aborted in the last "
        "7 days",
    ),
    principal: Principal = Depends(viewer),
    services: Services = Depends(get_services),
) -> list[dict[str, Any]]:
    tenant = None if principal.sees_all_tenants else principal.tenant_id
    found = await es.list_events(
        services, status=status, tenant_id=tenant, now_ms=services.clock.now_ms()
    )
    return [event_summary_doc(rec) for rec in found]


@router.get(
    "/v1/events/{event_id}/timeline",
    response_model=Timeline,
    summary="Minute by minute: target, delivered estimate, devices commanded/acked/opted out",
    responses={
        **_AUTH,
        404: {
            "description": "no such event for this key (a hyperscaler sees only its own "
            "requests: another tenant's id and any grid event look missing)"
        },
        422: {"description": "the id is malformed (over 64 characters)"},
    },
)
async def event_timeline(
    event_id: str = _ID,
    principal: Principal = Depends(viewer),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    ev = await es.load_event(services, event_id)
    if ev is None or (
        not principal.sees_all_tenants and (ev.is_grid or ev.tenant_id != principal.tenant_id)
    ):
        raise NotFound("id", f"no event {event_id!r}")
    lines = await settlement_lines(services, event_id)
    summary = summarise(services, ev, lines, uncommitted=0.0 if ev.is_grid else 1.0)
    return timeline_doc(ev, await timeline_rows(services, event_id), summary)
