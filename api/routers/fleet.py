"""GET /v1/fleet: devices registered, online and MW available now, per region and kind.

Everything comes from the cached, vectorised fleet snapshot (``services.fleet``); the per-device
``available_kw`` is computed once per snapshot and shared with the device endpoints, so the
answer stays fast with a million devices.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Depends, Query

from api.deps import Principal, any_role, get_services
from api.schemas.devices import ErrorOut, FleetOut
from dispatch.services import Services
from vpp.domain import DeviceKind, Freshness, FreshnessCode, Role
from vpp.fleet.snapshot import FleetSnapshot, summarise
from vpp.flexibility import available_kw
from vpp.timefmt import to_rfc3339

router = APIRouter(tags=["fleet"])

WINDOW_H = 1.0
# The latest view per services object (one per app; tests run several in one process).
_VIEWS: weakref.WeakKeyDictionary[Services, FleetView] = weakref.WeakKeyDictionary()
FRESHNESS_NAMES = {
    FreshnessCode.fresh: Freshness.fresh.value,
    FreshnessCode.stale: Freshness.stale.value,
    FreshnessCode.offline: Freshness.offline.value,
    # registered, never heard from: offline to the outside
    FreshnessCode.never: Freshness.offline.value,
}


def freshness_name(code: int) -> str:
    return FRESHNESS_NAMES[FreshnessCode(int(code))]


@dataclass
class FleetView:
    """One snapshot with its per-device available kW, and summaries made from it."""

    snapshot: FleetSnapshot
    available_kw: npt.NDArray[np.float64]
    capability_kw: npt.NDArray[np.float64]
    summaries: dict[tuple[str | None, str | None, str | None], dict[str, Any]] = field(
        default_factory=dict
    )


async def current_view(services: Services) -> FleetView:
    """The fleet view of the current cached snapshot (rebuilt when the snapshot is)."""
    snap = await services.fleet.snapshot()
    view = _VIEWS.get(services)
    if view is None or view.snapshot is not snap:
        capability = available_kw(snap, WINDOW_H, only_dispatchable=False)
        view = FleetView(snap, np.where(snap.dispatchable(), capability, 0.0), capability)
        _VIEWS[services] = view
    return view


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("registered", "enrolled", "online", "fresh")
    out: dict[str, Any] = {k: sum(r[k] for r in rows) for k in keys}
    out["available_mw"] = round(sum(r["available_mw"] for r in rows), 6)
    return out


def fleet_summary(
    view: FleetView, tenant: str | None, region: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    key = (tenant, region, kind)
    cached = view.summaries.get(key)
    if cached is not None:
        return cached
    snap = view.snapshot
    if tenant is None and region is None and kind is None:
        rows = summarise(snap, view.available_kw)
    else:
        sel = snap.mask(region, kind)
        if tenant is not None:
            sel &= snap.tenant_ids == tenant
        rows = summarise(snap.take(sel), view.available_kw[sel])
    rows.sort(key=lambda r: (r["region"], r["kind"]))
    out = {
        "as_of": to_rfc3339(snap.now_ms),
        "window_h": WINDOW_H,
        "regions": rows,
        "totals": _totals(rows),
    }
    if len(view.summaries) > 256:  # many tenants: keep the cache bounded
        view.summaries.clear()
    view.summaries[key] = out
    return out


@router.get(
    "/v1/fleet",
    response_model=FleetOut,
    summary="Devices and MW available now, per region and kind",
    description="Any role. Per region and kind: devices registered, enrolled, online and fresh, "
    "and the flexibility available now in MW (what the fleet could hold for the next hour). "
    "A `fleet` key sees its own tenant's devices; every other role sees the whole fleet.",
    responses={401: {"model": ErrorOut, "description": "no valid API key"}},
)
async def get_fleet(
    region: str | None = Query(None, description="Only this region."),
    kind: DeviceKind | None = Query(None, description="Only this kind."),
    principal: Principal = Depends(any_role),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    view = await current_view(services)
    tenant = principal.tenant_id if principal.role == Role.fleet else None
    return fleet_summary(view, tenant, region, kind.value if kind is not None else None)
