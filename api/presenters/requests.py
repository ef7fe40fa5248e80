"""Capacity requests as the API shows them: the request with its plan, booked MW per ledger slot
and, once run, its delivery per settlement interval."""

from __future__ import annotations

from typing import Any

from api.presenters.settlement import delivery_doc
from dispatch.market import BOOKED, RequestDetail
from store.models import CapacityRequest, Plan
from vpp.timefmt import to_rfc3339


def plan_doc(plan: Plan | None) -> dict[str, Any] | None:
    """A stored plan as the API shows it (``dispatch.planner`` writes the body)."""
    if plan is None:
        return None
    body = plan.body or {}
    return {
        "version": int(plan.version),
        "created_at": to_rfc3339(plan.created_ms),
        "interval_s": int(plan.interval_s),
        "solver": str(body.get("solver", "")),
        "status": str(body.get("status", "")),
        "reason": body.get("reason"),
        "available_mw": float(body.get("available_mw", 0.0)),
        "intervals": list(body.get("intervals", [])),
        "devices_by_kind": dict(body.get("devices_by_kind", {})),
    }


def request_doc(req: CapacityRequest, plan: Plan | None = None) -> dict[str, Any]:
    """A request as the list shows it (no booked rows, no delivery)."""
    booked = req.status in BOOKED
    return {
        "id": req.id,
        "status": req.status,
        "quoted_mw": round(float(req.quoted_mw), 6),
        "firmness": float(req.firmness),
        "quote_expires_at": to_rfc3339(req.quote_expires_ms) if req.quote_expires_ms else None,
        "reason": req.reason,
        "region": req.region,
        "mw": float(req.mw),
        "committed_mw": round(float(req.quoted_mw), 6) if booked else 0.0,
        "start": to_rfc3339(req.start_ms),
        "end": to_rfc3339(req.end_ms),
        "direction": req.direction,
        "max_price_per_mwh": req.max_price_per_mwh,
        "tenant_id": req.tenant_id,
        "created_at": to_rfc3339(req.created_ms),
        "updated_at": to_rfc3339(req.updated_ms),
        "booked": [],
        "plan": plan_doc(plan),
        "intervals": [],
        "delivery": None,
        "performance": req.performance,
        # The stored performance is written by the final settlement only.
        "settled": req.performance is not None,
    }


def request_detail_doc(d: RequestDetail) -> dict[str, Any]:
    """The representation of one request: the list's, plus booked rows and delivery."""
    doc = request_doc(d.request, d.plan)
    doc["booked"] = [
        {"start": to_rfc3339(int(t)), "mw": round(float(v), 6)}
        for t, v in zip(d.booked_starts_ms.tolist(), d.booked_mw.tolist(), strict=True)
    ]
    if d.lines:
        doc["intervals"] = [
            {
                "start": to_rfc3339(ln.interval_start_ms),
                "end": to_rfc3339(ln.interval_end_ms),
                "target_mw": round(float(ln.target_mw), 6),
                "delivered_mw": round(float(ln.delivered_mw), 6),
                "performance": round(float(p), 6),
            }
            for ln, p in zip(d.lines, d.line_performance, strict=True)
            if p == p  # NaN: a line outside the window, not counted
        ]
        doc["delivery"] = delivery_doc(d.summary)
        if d.performance is not None:
            doc["performance"] = round(d.performance, 6)
    return doc
