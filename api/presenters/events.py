"""Events as the API shows them: the summary of either kind (/v1/events, /v1/grid-events), a grid
event with its settlement, and an event's minute-by-minute timeline."""

from __future__ import annotations

from typing import Any

from api.presenters.settlement import delivery_doc, settlement_doc
from dispatch.events import EventInfo, EventRecord
from dispatch.settlement import DeliverySummary
from dispatch.settlement_service import EventSettlement
from store.models import EventTimeline
from vpp.timefmt import to_rfc3339


def event_doc(rec: EventRecord) -> dict[str, Any]:
    ev = rec.info
    return {
        "id": ev.id,
        "kind": ev.kind,
        "region": ev.region,
        "mw": ev.mw,
        "start": to_rfc3339(ev.start_ms),
        "end": to_rfc3339(ev.end_ms),
        "priority": ev.priority,
        "preempt": ev.preempt,
        "status": ev.status,
        "created_at": to_rfc3339(rec.created_ms),
        "source": rec.source if ev.is_grid else "api",
        "source_id": rec.source_id,
    }


def event_summary_doc(rec: EventRecord) -> dict[str, Any]:
    """An entry of /v1/events: the event and whose it is."""
    out = event_doc(rec)
    out["tenant_id"] = rec.info.tenant_id
    return out


def grid_event_doc(rec: EventRecord, settlement: EventSettlement) -> dict[str, Any]:
    out = event_doc(rec)
    out.update(settlement_doc(settlement))
    return out


def timeline_point_doc(r: EventTimeline) -> dict[str, Any]:
    return {
        "ts": to_rfc3339(r.ts_ms),
        "target_mw": r.target_mw,
        "delivered_mw": r.delivered_mw,
        "commanded": r.commanded,
        "acknowledged": r.acknowledged,
        "opted_out": r.opted_out,
        "replaced": r.replaced,
        "stale": r.stale,
        "action": r.action,
    }


def timeline_doc(
    ev: EventInfo, rows: list[EventTimeline], summary: DeliverySummary | None = None
) -> dict[str, Any]:
    return {
        "event_id": ev.id,
        "kind": ev.kind,
        "status": ev.status,
        "points": [timeline_point_doc(r) for r in rows],
        "delivery": delivery_doc(summary),
    }
