"""Settlement CSV exports: one line per settlement interval with the baseline inputs it used, so
the figures can be recomputed and disputed."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import Response
from sqlalchemy import select

from api.deps import Principal, get_services, require_roles
from api.presenters.settlement import settlement_csv
from dispatch.services import Services
from dispatch.settlement_service import export_lines
from store.models import CapacityRequest, GridEvent
from vpp.errors import NotFound

router = APIRouter(tags=["settlement"])

_CSV: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {}}, "description": "settlement lines, one row an interval"},
    401: {"description": "no valid API key"},
    422: {"description": "the id is malformed (over 64 characters)"},
}
_REQUEST_CSV: dict[int | str, dict[str, Any]] = {
    **_CSV,
    403: {"description": "the key's role may not do this (hyperscaler, operator or admin)"},
    404: {"description": "no such request for this tenant (another tenant's id looks the same)"},
}
_GRID_CSV: dict[int | str, dict[str, Any]] = {
    **_CSV,
    403: {"description": "the key's role may not do this (operator or admin only)"},
    404: {"description": "no such grid event"},
}


def _csv(body: str, name: str) -> Response:
    return Response(
        body,
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}-settlement.csv"'},
    )


@router.get(
    "/v1/capacity-requests/{request_id}/settlement.csv",
    summary="Settlement lines of a capacity request, with baseline inputs",
    response_class=Response,
    responses=_REQUEST_CSV,
)
async def request_settlement_csv(
    request_id: str = Path(description="capacity request id, cr-<12 hex>", max_length=64),
    principal: Principal = Depends(require_roles("hyperscaler", "operator")),
    services: Services = Depends(get_services),
) -> Response:
    async with services.db.session() as s:
        tenant = (
            await s.execute(
                select(CapacityRequest.tenant_id).where(CapacityRequest.id == request_id)
            )
        ).scalar_one_or_none()
    if tenant is None or (not principal.sees_all_tenants and tenant != principal.tenant_id):
        raise NotFound("id", f"no capacity request {request_id!r}")
    # A request's JSON shows an interval with nothing committed as met (1.0): so does its CSV.
    lines, summary = await export_lines(services, request_id, uncommitted=1.0)
    return _csv(settlement_csv(request_id, lines, summary), request_id)


@router.get(
    "/v1/grid-events/{event_id}/settlement.csv",
    summary="Settlement lines of a grid event, with baseline inputs",
    response_class=Response,
    responses=_GRID_CSV,
)
async def grid_settlement_csv(
    event_id: str = Path(description="grid event id, ge-<12 hex>", max_length=64),
    principal: Principal = Depends(require_roles("operator")),
    services: Services = Depends(get_services),
) -> Response:
    async with services.db.session() as s:
        found = await s.get(GridEvent, event_id)
    if found is None:
        raise NotFound("id", f"no grid event {event_id!r}")
    lines, summary = await export_lines(services, event_id)
    return _csv(settlement_csv(event_id, lines, summary), event_id)
