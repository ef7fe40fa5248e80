"""Plans for committed capacity requests and grid events, stored before any command is sent.

:meth:`Planner.plan_for` runs the optimiser over every committed request and scheduled grid event
of the region that overlaps the event's window (devices are never sold twice for overlapping
windows, so overlapping demands are planned together), and stores the result in ``plans`` with a
version one higher than the last. :meth:`Planner.refresh` re-plans requests whose window opens
within the next few hours when the fleet moved materially since their plan (available MW by more
than 5 % or 0.2 MW) or the overlapping demands changed. The event runner calls ``plan_for`` again
when the window opens.

The stored body (JSON) holds, for the event: per interval target_mw, planned_mw, shortfall_mw and
the binding constraint; devices and reserve by kind; the solver; the region's available MW when
planned; the overlapping demand ids; and the optimiser's whole plan (``optimiser``, the form of
:meth:`dispatch.types.Plan.to_json`) so the runner can assign devices from it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd
from sqlalchemy import func, select

from devices.edges import Edges
from dispatch.types import (
    GRID_EVENT_PRIORITY,
    Demand,
    DeviceUsage,
    DispatchParams,
    Horizon,
)
from dispatch.types import Plan as OptimiserPlan
from store.models import CapacityRequest, Command, GridEvent
from store.models import Plan as PlanRow
from vpp.domain import CommandType, GridEventStatus, RequestStatus
from vpp.fleet.snapshot import FleetSnapshot
from vpp.flexibility import available_kw
from vpp.metrics import PLANS_MADE
from vpp.timefmt import to_rfc3339

log = logging.getLogger(__name__)

PLAN_STEP_S = 900
SEASON_DAYS = 183  # usage budgets count the last half year
MAX_DEMANDS = 40  # the optimiser packs eligibility in an int64 mask
PLANNABLE_REQUESTS = (RequestStatus.committed.value, RequestStatus.active.value)
PLANNABLE_GRID = (GridEventStatus.scheduled.value, GridEventStatus.active.value)


class PlanError(ValueError):
    """The event cannot be planned (unknown id, or not committed/scheduled)."""


# --- pure helpers -------------------------------------------------------------------------------
def plan_horizon(demands: list[Demand], step_s: int = PLAN_STEP_S) -> Horizon:
    step = step_s * 1000
    start = min(d.start_ms for d in demands) // step * step
    end = -(-max(d.end_ms for d in demands) // step) * step
    return Horizon(start_ms=int(start), interval_s=step_s, n_intervals=int((end - start) // step))


def region_available_mw(fleet: FleetSnapshot, region: str, window_h: float) -> float:
    """MW the region's dispatchable devices could hold over ``window_h`` hours now."""
    if len(fleet) == 0:
        return 0.0
    mask = fleet.mask(region=region)
    if not mask.any():
        return 0.0
    kw = available_kw(fleet.take(mask), window_h=min(max(window_h, 0.25), 5.0))
    return float(kw.sum()) / 1000.0


def material_change(old_mw: float, new_mw: float, pct: float = 5.0, floor_mw: float = 0.2) -> bool:
    """The fleet moved enough to re-plan: by more than ``pct`` % of the old figure or
    ``floor_mw``, whichever is larger."""
    return abs(new_mw - old_mw) > max(abs(old_mw) * pct / 100.0, floor_mw)


def plan_body(
    plan: OptimiserPlan,
    event_id: str,
    event_start_ms: int,
    event_end_ms: int,
    available_mw: float,
    n_devices: int,
    reason: str,
) -> dict[str, Any]:
    """The stored body for one event of a joint plan."""
    j = plan.demand_ids.index(event_id)
    h = plan.horizon
    a, b = h.window(event_start_ms, event_end_ms)
    intervals = [
        {
            "start": to_rfc3339(h.interval_start_ms(t)),
            "target_mw": round(float(plan.requested_mw[j, t]), 6),
            "planned_mw": round(float(plan.planned_mw[j, t]), 6),
            "shortfall_mw": round(float(plan.shortfall_mw[j, t]), 6),
            "binding": plan.binding[j][t],
        }
        for t in range(a, b)
    ]
    kinds = np.asarray(plan.cluster_kind, dtype=object)
    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted(set(plan.cluster_kind)):
        rows = kinds == kind
        alloc = float(plan.cluster_alloc[rows, j].sum())
        reserve = float(plan.cluster_reserve[rows, j].sum())
        peak = float(plan.cluster_mw[rows, j].sum(axis=0).max(initial=0.0))
        if alloc > 1e-9 or reserve > 1e-9:
            by_kind[kind] = {
                "assigned": round(alloc, 3),
                "reserve": round(reserve, 3),
                "mw": round(peak, 6),
            }
    return {
        "event_id": event_id,
        "reason": reason,
        "solver": plan.solver,
        "status": plan.status,
        "notes": plan.notes,
        "available_mw": round(available_mw, 6),
        "fleet_devices": int(n_devices),
        "demand_ids": list(plan.demand_ids),
        "intervals": intervals,
        "devices_by_kind": by_kind,
        "reserve_mw": round(float(plan.reserve_mw[j]), 6),
        "planned_mwh": round(float(plan.planned_mw[j].sum()) * h.dt_h, 6),
        "shortfall_mwh": round(float(plan.shortfall_mw[j].sum()) * h.dt_h, 6),
        "optimiser": orjson.loads(plan.to_json()),
    }


@dataclass
class PlanOutcome:
    """Everything one planning run used and produced (for the runner's assignment)."""

    event_id: str
    region: str
    plan: OptimiserPlan
    demands: list[Demand]
    horizon: Horizon
    fleet: FleetSnapshot  # the region's devices, rows as in the plan's clusters
    usage: DeviceUsage
    params: DispatchParams
    body: dict[str, Any]


# --- the edge -----------------------------------------------------------------------------------
class Planner:
    def __init__(
        self,
        services: Edges,
        params: DispatchParams | None = None,
        *,
        lookahead_h: float = 6.0,
        material_pct: float = 5.0,
        material_mw: float = 0.2,
    ) -> None:
        self.services = services
        s = services.settings
        self.params = params or DispatchParams(
            reserve_pct=float(s.replacement_reserve_pct),
            wear_cost_per_kwh=float(s.battery_wear_cost_per_kwh),
        )
        self.lookahead_h = lookahead_h
        self.material_pct = material_pct
        self.material_mw = material_mw
        self._lock = asyncio.Lock()  # one plan write at a time: versions stay unique

    # -- public --
    async def plan_for(self, event_id: str, reason: str = "requested") -> dict[str, Any]:
        """Plan ``event_id`` (a committed request ``cr-…`` or a grid event ``ge-…``) with every
        overlapping demand, store it as the next version and return the stored body with
        ``version`` and ``created_ms``."""
        outcome = await self.compute(event_id, reason)
        return await self._store(outcome)

    async def compute(self, event_id: str, reason: str = "requested") -> PlanOutcome:
        """Run the optimiser for ``event_id`` without storing anything."""
        target, demands = await self._demands(event_id)
        horizon = plan_horizon(demands)
        snap = await self.services.fleet.snapshot()
        region = target.region
        fleet = snap.take(snap.mask(region=region)) if len(snap) else snap
        usage = await self._usage(fleet, [d.id for d in demands])
        from dispatch.optimiser import optimise

        plan = await asyncio.to_thread(optimise, fleet, usage, demands, horizon, self.params)
        window_h = (target.end_ms - target.start_ms) / 3_600_000
        avail = region_available_mw(fleet, region, window_h)
        body = plan_body(plan, event_id, target.start_ms, target.end_ms, avail, len(fleet), reason)
        return PlanOutcome(
            event_id, region, plan, demands, horizon, fleet, usage, self.params, body
        )

    async def latest(self, event_id: str) -> PlanRow | None:
        async with self.services.db.session() as session:
            row: PlanRow | None = (
                await session.execute(
                    select(PlanRow)
                    .where(PlanRow.event_id == event_id)
                    .order_by(PlanRow.version.desc(), PlanRow.id.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
            return row

    async def refresh(self, now_ms: int) -> list[str]:
        """Re-plan committed requests whose window opens within ``lookahead_h`` when the fleet
        changed materially since their plan, the overlapping demands changed, or they have no
        plan yet. Returns the re-planned ids."""
        horizon_ms = int(self.lookahead_h * 3_600_000)
        async with self.services.db.session() as session:
            reqs = list(
                (
                    await session.execute(
                        select(CapacityRequest)
                        .where(CapacityRequest.status == RequestStatus.committed.value)
                        .where(CapacityRequest.start_ms > int(now_ms))
                        .where(CapacityRequest.start_ms <= int(now_ms) + horizon_ms)
                        .order_by(CapacityRequest.start_ms)
                    )
                ).scalars()
            )
        if not reqs:
            return []
        snap = await self.services.fleet.snapshot()
        done: list[str] = []
        for req in reqs:
            latest = await self.latest(req.id)
            reason: str | None = None
            if latest is None:
                reason = "no plan yet"
            else:
                body = latest.body or {}
                old = float(body.get("available_mw", 0.0))
                new = region_available_mw(snap, req.region, (req.end_ms - req.start_ms) / 3.6e6)
                if material_change(old, new, self.material_pct, self.material_mw):
                    reason = f"fleet changed: {old:.3f} → {new:.3f} MW available"
                else:
                    overlapping = await self._overlapping_ids(req.region, req.start_ms, req.end_ms)
                    if sorted(overlapping) != sorted(body.get("demand_ids", [])):
                        reason = "overlapping commitments changed"
            if reason is None:
                continue
            try:
                await self.plan_for(req.id, reason=reason)
                done.append(req.id)
            except Exception:  # one bad plan must not stop the others
                log.exception("re-planning %s", req.id)
        return done

    # -- internals --
    async def _demands(self, event_id: str) -> tuple[Demand, list[Demand]]:
        async with self.services.db.session() as session:
            req = await session.get(CapacityRequest, event_id)
            grid = None if req is not None else await session.get(GridEvent, event_id)
            if req is None and grid is None:
                raise PlanError(f"event_id: no capacity request or grid event {event_id!r}")
            if req is not None and req.status not in PLANNABLE_REQUESTS:
                raise PlanError(f"event_id: request is {req.status}, not committed")
            if grid is not None and grid.status not in PLANNABLE_GRID:
                raise PlanError(f"event_id: grid event is {grid.status}")
            row: Any = req if req is not None else grid
            region, start, end = row.region, int(row.start_ms), int(row.end_ms)
            reqs = (
                await session.execute(
                    select(CapacityRequest)
                    .where(CapacityRequest.region == region)
                    .where(CapacityRequest.status.in_(PLANNABLE_REQUESTS))
                    .where(CapacityRequest.start_ms < end)
                    .where(CapacityRequest.end_ms > start)
                    .where(CapacityRequest.id != event_id)
                )
            ).scalars()
            grids = (
                await session.execute(
                    select(GridEvent)
                    .where(GridEvent.region == region)
                    .where(GridEvent.status.in_(PLANNABLE_GRID))
                    .where(GridEvent.start_ms < end)
                    .where(GridEvent.end_ms > start)
                    .where(GridEvent.id != event_id)
                )
            ).scalars()
            others = [_request_demand(r) for r in reqs] + [_grid_demand(g) for g in grids]
        target = _request_demand(req) if req is not None else _grid_demand(row)
        # Highest priority first, then earliest; the event itself always stays in.
        others.sort(key=lambda d: (-d.priority, d.start_ms, d.id))
        return target, [target, *others[: MAX_DEMANDS - 1]]

    async def _overlapping_ids(self, region: str, start_ms: int, end_ms: int) -> list[str]:
        async with self.services.db.session() as session:
            a = (
                await session.execute(
                    select(CapacityRequest.id)
                    .where(CapacityRequest.region == region)
                    .where(CapacityRequest.status.in_(PLANNABLE_REQUESTS))
                    .where(CapacityRequest.start_ms < end_ms)
                    .where(CapacityRequest.end_ms > start_ms)
                )
            ).scalars()
            b = (
                await session.execute(
                    select(GridEvent.id)
                    .where(GridEvent.region == region)
                    .where(GridEvent.status.in_(PLANNABLE_GRID))
                    .where(GridEvent.start_ms < end_ms)
                    .where(GridEvent.end_ms > start_ms)
                )
            ).scalars()
            return [*a, *b]

    async def _usage(self, fleet: FleetSnapshot, planned_ids: list[str]) -> DeviceUsage:
        """Season use per device from the commands sent (this plan's own events left out)."""
        n = len(fleet)
        usage = DeviceUsage.empty(n)
        if n == 0:
            return usage
        now = int(self.services.clock.now_ms())
        since = now - SEASON_DAYS * 86_400_000
        async with self.services.db.session() as session:
            rows = (
                await session.execute(
                    select(
                        Command.device_id,
                        func.count(func.distinct(Command.event_id)),
                        func.sum(Command.valid_until_ms - Command.valid_from_ms),
                        func.max(Command.valid_until_ms),
                    )
                    .where(Command.type != CommandType.restore.value)
                    .where(Command.created_ms >= since)
                    .where(Command.event_id.not_in(planned_ids))
                    .group_by(Command.device_id)
                )
            ).all()
        if not rows:
            return usage
        ids = pd.Index(fleet.device_ids)
        pos = ids.get_indexer(pd.Index([r[0] for r in rows]))
        ok = pos >= 0
        events = np.array([int(r[1] or 0) for r in rows], dtype=np.int32)
        hours = np.array([float(r[2] or 0) / 3.6e6 for r in rows])
        last = np.array([int(r[3] or 0) for r in rows], dtype=np.int64)
        usage.events_this_season[pos[ok]] = events[ok]
        usage.hours_this_season[pos[ok]] = hours[ok]
        usage.last_event_end_ms[pos[ok]] = np.minimum(last[ok], now)
        return usage

    async def _store(self, outcome: PlanOutcome) -> dict[str, Any]:
        now = int(self.services.clock.now_ms())
        async with self._lock, self.services.db.session() as session, session.begin():
            last = (
                await session.execute(
                    select(func.max(PlanRow.version)).where(PlanRow.event_id == outcome.event_id)
                )
            ).scalar_one_or_none()
            version = int(last or 0) + 1
            session.add(
                PlanRow(
                    event_id=outcome.event_id,
                    version=version,
                    created_ms=now,
                    interval_s=outcome.horizon.interval_s,
                    start_ms=outcome.horizon.start_ms,
                    body=outcome.body,
                )
            )
        PLANS_MADE.labels(outcome.body.get("reason", "requested").split(":")[0][:40]).inc()
        return {**outcome.body, "version": version, "created_ms": now}


def _request_demand(r: CapacityRequest) -> Demand:
    return Demand(
        id=r.id,
        region=r.region,
        start_ms=int(r.start_ms),
        end_ms=int(r.end_ms),
        mw=float(r.quoted_mw),
        priority=int(r.priority),
        direction=r.direction,
    )


def _grid_demand(g: GridEvent) -> Demand:
    return Demand(
        id=g.id,
        region=g.region,
        start_ms=int(g.start_ms),
        end_ms=int(g.end_ms),
        mw=float(g.mw),
        priority=int(g.priority if g.priority is not None else GRID_EVENT_PRIORITY),
        is_grid_event=True,
        preempt=bool(g.preempt),
    )
