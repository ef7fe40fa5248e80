"""Grid events (an operator's short-notice call on the fleet) and the uniform view of both kinds of
event (capacity requests and grid events) that the event runner and the events API read.

Edge code: database rows in, :class:`EventInfo` and :class:`EventRecord` out (the API shapes them
into JSON: ``api/presenters/events.py``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from devices.edges import Edges
from dispatch.types import GRID_EVENT_PRIORITY
from store.keys import ensure_tenant
from store.models import CapacityRequest, GridEvent
from vpp.domain import Direction, GridEventStatus, RequestStatus
from vpp.errors import Conflict, InvalidInput, NotFound

KIND_REQUEST = "capacity_request"
KIND_GRID = "grid_event"

MAX_GRID_EVENT_H = 24.0
# A grid event may be raised "now": a start up to this far in the past is taken as now.
START_GRACE_S = 300.0


@dataclass(frozen=True)
class EventInfo:
    """A capacity request or a grid event, as the runner sees it."""

    id: str
    kind: str  # KIND_REQUEST | KIND_GRID
    tenant_id: str
    region: str
    mw: float  # committed MW (a request's quoted/committed MW, a grid event's MW)
    start_ms: int
    end_ms: int
    priority: int
    preempt: bool
    direction: str
    status: str

    @property
    def is_grid(self) -> bool:
        return self.kind == KIND_GRID


@dataclass(frozen=True)
class EventRecord:
    """An event as the lists and the grid-event answers show it: with when it was made."""

    info: EventInfo
    created_ms: int
    # Who raised it (grid events): "api" or "openadr", and the OpenADR event's id.
    source: str = "api"
    source_id: str | None = None


SOURCE_API = "api"
SOURCE_OPENADR = "openadr"
SOURCE_OPENADR_UPSTREAM = "openadr-upstream"  # an upstream VTN's event, dispatch/openadr/upstream


def from_request(r: CapacityRequest) -> EventInfo:
    committed = r.quoted_mw if r.quoted_mw and r.quoted_mw > 0 else r.mw
    return EventInfo(
        id=r.id,
        kind=KIND_REQUEST,
        tenant_id=r.tenant_id,
        region=r.region,
        mw=float(committed),
        start_ms=int(r.start_ms),
        end_ms=int(r.end_ms),
        priority=int(r.priority if r.priority is not None else 50),
        preempt=False,
        direction=r.direction or Direction.load_reduction.value,
        status=r.status,
    )


def grid_record(g: GridEvent) -> EventRecord:
    return EventRecord(from_grid(g), g.created_ms, g.source or SOURCE_API, g.source_id)


def from_grid(g: GridEvent) -> EventInfo:
    return EventInfo(
        id=g.id,
        kind=KIND_GRID,
        tenant_id=g.tenant_id,
        region=g.region,
        mw=float(g.mw),
        start_ms=int(g.start_ms),
        end_ms=int(g.end_ms),
        priority=int(g.priority),
        preempt=bool(g.preempt),
        direction=Direction.load_reduction.value,
        status=g.status,
    )


async def load_event(services: Edges, event_id: str) -> EventInfo | None:
    async with services.db.session() as s:
        if event_id.startswith("ge-"):
            g = await s.get(GridEvent, event_id)
            return from_grid(g) if g is not None else None
        r = await s.get(CapacityRequest, event_id)
        return from_request(r) if r is not None else None


# --- grid events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridEventSpec:
    """What a new grid event asks: region, MW, window, priority, preemption."""

    region: str
    mw: float
    start_ms: int
    end_ms: int
    priority: int | None = None
    preempt: bool = False


def _grid_row(
    services: Edges,
    tenant_id: str,
    spec: GridEventSpec,
    now: int,
    *,
    source: str = SOURCE_API,
    source_id: str | None = None,
) -> GridEvent:
    """The row of a new grid event, or InvalidInput naming the bad field."""
    region, mw, start_ms, end_ms = spec.region, spec.mw, spec.start_ms, spec.end_ms
    if not services.regions.is_sold(region):
        raise InvalidInput(
            "region", f"unknown region {region!r} ({services.regions.describe_sold()})"
        )
    if end_ms <= start_ms:
        raise InvalidInput("end", "must be after start")
    if end_ms <= now:
        raise InvalidInput("end", "must be in the future")
    if start_ms < now - START_GRACE_S * 1000:
        raise InvalidInput("start", "must not be more than 5 minutes in the past")
    if (end_ms - start_ms) / 3.6e6 > MAX_GRID_EVENT_H:
        raise InvalidInput("end", f"a grid event lasts at most {MAX_GRID_EVENT_H:g} h")
    if not (mw > 0 and mw <= services.settings.max_request_mw):
        raise InvalidInput("mw", f"must be > 0 and ≤ {services.settings.max_request_mw:g}")
    prio = GRID_EVENT_PRIORITY if spec.priority is None else int(spec.priority)
    if not 0 <= prio <= 1000:
        raise InvalidInput("priority", "must be within 0..1000")
    return GridEvent(
        id=f"ge-{secrets.token_hex(6)}",
        tenant_id=tenant_id,
        region=region,
        mw=float(mw),
        start_ms=max(start_ms, now) if start_ms < now else start_ms,
        end_ms=end_ms,
        priority=prio,
        preempt=bool(spec.preempt),
        status=GridEventStatus.scheduled.value,
        created_ms=now,
        updated_ms=now,
        source=source,
        source_id=source_id,
    )


def check_grid_events(services: Edges, specs: list[GridEventSpec]) -> None:
    """InvalidInput naming the field if any of these grid events could not be raised now."""
    now = services.clock.now_ms()
    for spec in specs:
        _grid_row(services, "-", spec, now)


async def create_grid_events(
    services: Edges,
    tenant_id: str,
    specs: list[GridEventSpec],
    *,
    source: str = SOURCE_API,
    source_id: str | None = None,
) -> list[EventRecord]:
    """Raise several grid events at once: all are checked first, then stored in one
    transaction (bad input changes nothing)."""
    now = services.clock.now_ms()
    rows = [
        _grid_row(services, tenant_id, spec, now, source=source, source_id=source_id)
        for spec in specs
    ]
    if not rows:
        return []
    await ensure_tenant(services.db, tenant_id, now)
    async with services.db.session() as s, s.begin():
        s.add_all(rows)
    services.event_changed()  # a runner in this process acts now, not on its next tick
    return [grid_record(g) for g in rows]


async def create_grid_event(
    services: Edges,
    tenant_id: str,
    *,
    region: str,
    mw: float,
    start_ms: int,
    end_ms: int,
    priority: int | None = None,
    preempt: bool = False,
    source: str = SOURCE_API,
    source_id: str | None = None,
) -> EventRecord:
    spec = GridEventSpec(region, mw, start_ms, end_ms, priority, preempt)
    (rec,) = await create_grid_events(
        services, tenant_id, [spec], source=source, source_id=source_id
    )
    return rec


async def grid_events_of_source(services: Edges, source: str, source_id: str) -> list[EventRecord]:
    """The grid events raised for one outside object (an OpenADR event), oldest first."""
    async with services.db.session() as s:
        rows = (
            (
                await s.execute(
                    select(GridEvent)
                    .where(GridEvent.source == source, GridEvent.source_id == source_id)
                    .order_by(GridEvent.start_ms, GridEvent.created_ms)
                )
            )
            .scalars()
            .all()
        )
    return [grid_record(g) for g in rows]


async def grid_events_of_sources(
    services: Edges, source: str, source_id_prefix: str
) -> list[EventRecord]:
    """The grid events raised for outside objects whose id starts with the prefix (an upstream
    VTN's events), oldest first."""
    async with services.db.session() as s:
        rows = (
            await s.execute(
                select(GridEvent)
                .where(
                    GridEvent.source == source,
                    GridEvent.source_id.startswith(source_id_prefix, autoescape=True),
                )
                .order_by(GridEvent.start_ms, GridEvent.created_ms)
            )
        ).scalars()
        return [grid_record(g) for g in rows]


async def get_grid_event(services: Edges, event_id: str) -> EventRecord:
    async with services.db.session() as s:
        g = await s.get(GridEvent, event_id)
    if g is None:
        raise NotFound("id", f"no grid event {event_id!r}")
    return grid_record(g)


async def list_grid_events(services: Edges, limit: int = 100) -> list[EventRecord]:
    async with services.db.session() as s:
        rows = (
            (await s.execute(select(GridEvent).order_by(GridEvent.start_ms.desc()).limit(limit)))
            .scalars()
            .all()
        )
    return [grid_record(g) for g in rows]


async def abort_grid_event(services: Edges, event_id: str) -> EventRecord:
    """Abort: every device is restored at once (the runner sends restores with no stagger)."""
    now = services.clock.now_ms()
    async with services.db.session() as s, s.begin():
        g = await s.get(GridEvent, event_id, with_for_update=True)
        if g is None:
            raise NotFound("id", f"no grid event {event_id!r}")
        if g.status in (GridEventStatus.completed.value, GridEventStatus.aborted.value):
            raise Conflict("status", f"the grid event is already {g.status}")
        g.status = GridEventStatus.aborted.value
        g.updated_ms = now
    services.event_changed()  # a runner in this process acts now, not on its next tick
    return await get_grid_event(services, event_id)


# --- both kinds, for the runner and the events API -----------------------------------------------
async def due_events(services: Edges, now_ms: int) -> list[EventInfo]:
    """Events whose window has opened and that no runner has started: committed requests and
    scheduled grid events (those whose window already closed are returned too, so the runner can
    close them)."""
    async with services.db.session() as s:
        reqs = (
            (
                await s.execute(
                    select(CapacityRequest).where(
                        CapacityRequest.status == RequestStatus.committed.value,
                        CapacityRequest.start_ms <= now_ms,
                    )
                )
            )
            .scalars()
            .all()
        )
        grids = (
            (
                await s.execute(
                    select(GridEvent).where(
                        GridEvent.status == GridEventStatus.scheduled.value,
                        GridEvent.start_ms <= now_ms,
                    )
                )
            )
            .scalars()
            .all()
        )
    out = [from_request(r) for r in reqs] + [from_grid(g) for g in grids]
    # Higher priority first, so a preempting grid event picks its devices before the rest.
    return sorted(out, key=lambda e: (-e.priority, e.start_ms, e.id))


async def active_events(services: Edges) -> list[EventInfo]:
    async with services.db.session() as s:
        reqs = (
            (
                await s.execute(
                    select(CapacityRequest).where(
                        CapacityRequest.status == RequestStatus.active.value
                    )
                )
            )
            .scalars()
            .all()
        )
        grids = (
            (
                await s.execute(
                    select(GridEvent).where(GridEvent.status == GridEventStatus.active.value)
                )
            )
            .scalars()
            .all()
        )
    return [from_request(r) for r in reqs] + [from_grid(g) for g in grids]


async def ended_since(services: Edges, since_ms: int) -> list[EventInfo]:
    """Events that ended (completed, aborted, cancelled) with a window ending at or after
    ``since_ms``: a runner taking over finishes their restores and settlement."""
    req_ended = (RequestStatus.completed.value, RequestStatus.cancelled.value)
    grid_ended = (GridEventStatus.completed.value, GridEventStatus.aborted.value)
    async with services.db.session() as s:
        reqs = (
            await s.execute(
                select(CapacityRequest).where(
                    CapacityRequest.status.in_(req_ended), CapacityRequest.end_ms >= since_ms
                )
            )
        ).scalars()
        grids = (
            await s.execute(
                select(GridEvent).where(
                    GridEvent.status.in_(grid_ended), GridEvent.end_ms >= since_ms
                )
            )
        ).scalars()
        return [from_request(r) for r in reqs] + [from_grid(g) for g in grids]


async def overlapping_commitments(
    services: Edges, region: str, start_ms: int, end_ms: int, exclude_id: str
) -> list[EventInfo]:
    """Committed (not yet running) requests and scheduled grid events overlapping a window: the
    planner leaves their capacity alone unless the event may preempt them."""
    async with services.db.session() as s:
        reqs = (
            (
                await s.execute(
                    select(CapacityRequest).where(
                        CapacityRequest.region == region,
                        CapacityRequest.status == RequestStatus.committed.value,
                        CapacityRequest.start_ms < end_ms,
                        CapacityRequest.end_ms > start_ms,
                        CapacityRequest.id != exclude_id,
                    )
                )
            )
            .scalars()
            .all()
        )
    return [from_request(r) for r in reqs]


async def statuses(services: Edges, ids: list[str]) -> dict[str, str]:
    """Current status of each event id (requests and grid events)."""
    out: dict[str, str] = {}
    req_ids = [i for i in ids if not i.startswith("ge-")]
    grid_ids = [i for i in ids if i.startswith("ge-")]
    async with services.db.session() as s:
        if req_ids:
            for i, st in (
                await s.execute(
                    select(CapacityRequest.id, CapacityRequest.status).where(
                        CapacityRequest.id.in_(req_ids)
                    )
                )
            ).all():
                out[i] = st
        if grid_ids:
            for i, st in (
                await s.execute(
                    select(GridEvent.id, GridEvent.status).where(GridEvent.id.in_(grid_ids))
                )
            ).all():
                out[i] = st
    return out


async def set_status(
    services: Edges, ev: EventInfo, status: str, *, only_from: tuple[str, ...] = ()
) -> bool:
    """Move an event to ``status`` (optionally only from the given statuses); True if it moved."""
    now = services.clock.now_ms()
    model: Any = GridEvent if ev.is_grid else CapacityRequest
    stmt = update(model).where(model.id == ev.id)
    if only_from:
        stmt = stmt.where(model.status.in_(only_from))
    async with services.db.session() as s, s.begin():
        res = await s.execute(stmt.values(status=status, updated_ms=now))
    return bool(res.rowcount)  # type: ignore[attr-defined]


async def list_events(
    services: Edges, *, status: str, tenant_id: str | None, now_ms: int, limit: int = 100
) -> list[EventRecord]:
    """Both kinds of event: ``active`` (running now) or ``recent`` (ended in the last 7 days),
    latest start first."""
    week_ms = 7 * 86_400_000
    async with services.db.session() as s:
        rq = select(CapacityRequest)
        gq = select(GridEvent)
        if status == "active":
            rq = rq.where(CapacityRequest.status == RequestStatus.active.value)
            gq = gq.where(GridEvent.status == GridEventStatus.active.value)
        else:
            rq = rq.where(
                CapacityRequest.status.in_(
                    [RequestStatus.completed.value, RequestStatus.cancelled.value]
                ),
                CapacityRequest.end_ms >= now_ms - week_ms,
                CapacityRequest.start_ms <= now_ms,
            )
            gq = gq.where(
                GridEvent.status.in_(
                    [GridEventStatus.completed.value, GridEventStatus.aborted.value]
                ),
                GridEvent.end_ms >= now_ms - week_ms,
            )
        if tenant_id is not None:
            rq = rq.where(CapacityRequest.tenant_id == tenant_id)
        reqs = (
            await s.execute(rq.order_by(CapacityRequest.start_ms.desc()).limit(limit))
        ).scalars()
        evs = [EventRecord(from_request(r), r.created_ms) for r in reqs]
        if tenant_id is None:
            grids = (await s.execute(gq.order_by(GridEvent.start_ms.desc()).limit(limit))).scalars()
            evs += [grid_record(g) for g in grids]
    evs.sort(key=lambda e: -e.info.start_ms)
    return evs[:limit]
