"""Hand each cluster's planned MW to its devices, by priority list.

Inside a cluster the devices are already sorted cheapest, least recently used, freshest first
(:func:`dispatch.clusters.build_clusters`); each (cluster, demand) takes the next prefix of that
list whose cumulative kW covers the plan, found with one ``cumsum`` + ``searchsorted`` — no loop
over devices. Demands take devices in value order, each device once: a device is never booked on
two demands. Then the next devices become the replacement reserve (``reserve_pct`` of the peak).

Per device the command respects its own limits: a battery's setpoint is at most its max discharge
and its energy over the window at most its energy above max(reserve, 20 %) × 0.949; a
thermostat's offset is at most the default offset, its own max offset and its comfort limit, for
one rotation block of at most 2 h (3 h for grid events), after its rest and within its season's
events and hours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dispatch.clusters import Clusters, build_clusters
from dispatch.optimiser import demand_values
from dispatch.types import (
    CMD_BATTERY,
    CMD_THERMOSTAT,
    Assignment,
    Demand,
    DeviceUsage,
    DispatchParams,
    Horizon,
    Plan,
)
from vpp.fleet.snapshot import BATTERY, THERMOSTAT, FleetSnapshot
from vpp.flexibility import battery_inputs

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass
class _Rows:
    """Growing columns of an assignment (appended a slice at a time)."""

    row: list[I64] = field(default_factory=list)  # rows into Clusters' device rows
    demand: list[np.ndarray] = field(default_factory=list)
    setpoint: list[F64] = field(default_factory=list)
    start: list[np.ndarray] = field(default_factory=list)
    end: list[np.ndarray] = field(default_factory=list)
    reserve: list[np.ndarray] = field(default_factory=list)
    profile: list[np.ndarray] = field(default_factory=list)
    profiles: list[F64] = field(default_factory=list)

    def add(
        self, rows: I64, d: int, setpoint: F64, start: int, end: int, reserve: bool, profile: int
    ) -> None:
        k = len(rows)
        if k == 0:
            return
        self.row.append(rows)
        self.demand.append(np.full(k, d, np.int32))
        self.setpoint.append(setpoint)
        self.start.append(np.full(k, start, np.int32))
        self.end.append(np.full(k, end, np.int32))
        self.reserve.append(np.full(k, reserve, bool))
        self.profile.append(np.full(k, profile, np.int32))


def _take(kw: F64, need_kw: float) -> int:
    """How many devices (in list order) cover ``need_kw``; all of them if they cannot."""
    if need_kw <= 1e-9 or kw.size == 0:
        return 0
    cum = np.cumsum(kw)
    return min(int(np.searchsorted(cum, need_kw * (1 - 1e-9))) + 1, int(kw.size))


def _build(
    cl: Clusters, rows: _Rows, horizon: Horizon, demands: list[Demand], reserve_pct: float
) -> Assignment:
    if not rows.row:
        return Assignment.empty(horizon, demands, reserve_pct)
    r = np.concatenate(rows.row)
    kind = np.where(cl.row_power_kw[r] > 0, BATTERY, THERMOSTAT).astype(np.int8)
    increment = np.concatenate(rows.setpoint)
    is_bat = kind == BATTERY
    demand = np.concatenate(rows.demand)
    # A battery's planned kW is its increment over its pre-event output (what settlement
    # credits); the setpoint it is sent is its total output: pre-event + increment.
    pre = cl.row_pre_kw[r] if cl.row_pre_kw.size == len(cl.device_index) else np.zeros(len(r))
    setpoint = np.where(is_bat, increment + pre, increment)
    # Battery setpoints rounded down to whole watts: never above rating or energy.
    setpoint_w = np.where(is_bat, np.floor(setpoint * 1000.0), np.nan)
    setpoint = np.where(is_bat, setpoint_w / 1000.0, setpoint)
    expected = np.where(
        is_bat,
        np.maximum(setpoint - pre, 0.0),
        cl.row_shed_kw[r, demand] if len(r) else 0.0,
    )
    profiles = np.stack(rows.profiles) if rows.profiles else np.zeros((0, horizon.n_intervals))
    offset = np.where(is_bat, np.nan, np.floor(cl.row_offset_c[r] * 100.0) / 100.0)
    return Assignment(
        horizon=horizon,
        demands=demands,
        device_index=cl.device_index[r],
        demand_index=demand,
        kind_code=kind,
        setpoint_kw=setpoint,
        expected_kw=expected,
        start_interval=np.concatenate(rows.start),
        end_interval=np.concatenate(rows.end),
        is_reserve=np.concatenate(rows.reserve),
        profile=np.concatenate(rows.profile),
        profiles=profiles,
        command_type=np.where(is_bat, CMD_BATTERY, CMD_THERMOSTAT).astype(np.int8),
        setpoint_w=setpoint_w,
        offset_c=offset,
        limit_w=np.full(len(r), np.nan),
        reserve_pct=reserve_pct,
    )


def assign(
    fleet: FleetSnapshot,
    usage: DeviceUsage,
    plan: Plan,
    demands: list[Demand],
    horizon: Horizon,
    params: DispatchParams,
    exclude: np.ndarray | None = None,
    *,
    clusters: Clusters | None = None,
) -> Assignment:
    """Devices for each demand from the plan's cluster × demand × interval MW.

    ``exclude``: devices already booked on overlapping events, opted out or stale (mask or
    indices). ``clusters``: the clusters the plan was made from (saves rebuilding them); when the
    fleet changed since, clusters are matched to the plan's rows by (region, kind, bucket, mask).
    """
    demands = list(demands)
    if plan.demand_ids != [d.id for d in demands]:
        raise ValueError("demands: must be the plan's demands, in the plan's order")
    if plan.horizon != horizon:
        raise ValueError("horizon: differs from the plan's")
    cl = (
        clusters
        if clusters is not None
        else build_clusters(fleet, usage, horizon, params, demands, exclude=exclude)
    )
    plan_row = {plan.cluster_key(c): c for c in range(len(plan.cluster_region))}
    dt = horizon.dt_h
    order: list[int] = (
        np.argsort(-demand_values(demands, params), kind="stable").tolist() if demands else []
    )
    out = _Rows()
    active = np.flatnonzero((plan.cluster_alloc + plan.cluster_reserve).sum(axis=1) > 0)
    wanted = {plan.cluster_key(int(c)) for c in active}
    for c in range(len(cl)):
        key = cl.key(c)
        if key not in wanted:
            continue
        pc = plan_row[key]
        cursor, stop = int(cl.starts[c]), int(cl.starts[c + 1])
        bat = int(cl.kind_code[c]) == BATTERY
        for d in order:
            d = int(d)
            if cursor >= stop:
                break
            profile = plan.cluster_mw[pc, d]
            w = cl.windows[d]
            peak_mw = float(profile.max(initial=0.0))
            # The plan's reserve devices for this demand in this cluster (whole devices).
            n_reserve = int(np.ceil(plan.cluster_reserve[pc, d] - 1e-6))
            if bat:
                shape = profile / peak_mw if peak_mw > 0 else np.zeros_like(profile)
                if peak_mw <= 0:  # reserve only: flat over the window
                    shape[w.a : w.b] = 1.0
                span_h = max(float(shape.sum()) * dt, 1e-9)
                rows = np.arange(cursor, stop)
                kw = np.minimum(cl.row_power_kw[rows], cl.row_energy_kwh[rows] / span_h)
                k = _take(kw, peak_mw * 1000.0)
                prof = len(out.profiles)
                out.profiles.append(shape)
                # Active from the first to the last interval the plan asks anything of it.
                nz = np.flatnonzero(shape > 0)
                lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (w.a, w.b)
                out.add(rows[:k], d, kw[:k], lo, hi, False, prof)
                kr = min(n_reserve, len(rows) - k)
                out.add(rows[k : k + kr], d, kw[k : k + kr], lo, hi, True, prof)
                cursor += k + kr
            else:
                bounds = w.block_bounds
                for b in range(w.n_blocks):
                    lo, hi = int(bounds[b]), int(bounds[b + 1])
                    need = float(profile[lo:hi].max(initial=0.0)) * 1000.0
                    rows = np.arange(cursor, stop)
                    kw = cl.row_shed_kw[rows, d]
                    k = _take(kw, need)
                    out.add(rows[:k], d, kw[:k], lo, hi, False, -1)
                    cursor += k
                rows = np.arange(cursor, stop)
                kw = cl.row_shed_kw[rows, d]
                kr = min(n_reserve, len(rows))
                # A reserve thermostat stands by for one block, whichever the runner needs it
                # for (replacements() moves it to the interval it is enlisted from).
                out.add(rows[:kr], d, kw[:kr], w.a, int(bounds[1]), True, -1)
                cursor += kr
    return _build(cl, out, horizon, demands, params.reserve_pct)


def replacements(
    fleet: FleetSnapshot,
    usage: DeviceUsage,
    assignment: Assignment,
    shortfall_kw: float | F64,
    exclude: np.ndarray | None = None,
    *,
    from_interval: int | None = None,
    params: DispatchParams | None = None,
) -> Assignment:
    """Extra devices to cover ``shortfall_kw`` (per demand of the assignment, or one value for a
    single demand) from ``from_interval`` (default: the interval holding ``fleet.now_ms``).

    First the assignment's reserve devices, then free devices, each in priority order; ``exclude``
    (opted out, stale, booked elsewhere) and every device already in the assignment as a primary
    are skipped. Returns only the new rows (none of them reserve)."""
    params = params or DispatchParams(reserve_pct=assignment.reserve_pct)
    h = assignment.horizon
    demands = assignment.demands
    nd = len(demands)
    short = (
        np.broadcast_to(np.asarray(shortfall_kw, dtype=float), (nd,)).copy() if nd else np.zeros(0)
    )
    if np.any(~np.isfinite(short)) or np.any(short < 0):
        raise ValueError("shortfall_kw: must be finite and non-negative")
    n = len(fleet)
    blocked = np.zeros(n, bool)
    if exclude is not None:
        ex = np.asarray(exclude)
        if ex.dtype == bool:
            blocked |= ex
        else:
            blocked[ex.astype(np.int64)] = True
    blocked |= ~fleet.dispatchable()
    t0 = from_interval
    if t0 is None:
        t0 = int(
            np.clip((fleet.now_ms - h.start_ms) // (h.interval_s * 1000), 0, h.n_intervals - 1)
        )
    taken = np.zeros(n, bool)
    taken[assignment.device_index[~assignment.is_reserve]] = True
    pieces: list[Assignment] = []
    for d, dem in enumerate(demands):
        if short[d] <= 0:
            continue
        a, b = h.window(dem.start_ms, dem.end_ms)
        lo = max(a, t0)
        if lo >= b:
            continue
        # 1. Reserve devices of this demand, in their priority order.
        res = np.flatnonzero(assignment.is_reserve & (assignment.demand_index == d))
        res = res[~blocked[assignment.device_index[res]] & ~taken[assignment.device_index[res]]]
        kw = assignment.expected_kw[res]
        k = _take(kw, float(short[d]))
        chosen = res[:k]
        if k:
            sub = _subset(assignment, chosen)
            sub.is_reserve[:] = False
            # A thermostat holds the block it stood by for (its budget was checked for that
            # length), moved to start now; a battery keeps its window from now on.
            block = sub.end_interval - sub.start_interval
            sub.start_interval = np.maximum(sub.start_interval, lo).astype(np.int32)
            th = sub.kind_code == THERMOSTAT
            sub.end_interval = np.where(
                th, np.minimum(b, sub.start_interval + block), np.maximum(sub.end_interval, lo)
            ).astype(np.int32)
            keep = sub.end_interval > sub.start_interval
            sub = _subset(sub, np.flatnonzero(keep))
            kw = kw[:k][keep]
            # A battery's setpoint was planned on its charge at the window's start; standing by
            # since, it served its home (evening: 1–2 kW) and may no longer hold that setpoint
            # to the end. Cut it to what its charge now holds for the rest of the window, or it
            # reaches its reserve minutes early and the last interval falls short.
            bat = np.flatnonzero(sub.kind_code == BATTERY)
            if bat.size:
                rest_h = (sub.end_interval[bat] - sub.start_interval[bat]) * h.dt_h
                cap_kw = battery_inputs(fleet, sub.device_index[bat]).deliverable_kw(rest_h)
                cut = np.maximum(sub.setpoint_kw[bat] - np.floor(cap_kw * 1000.0) / 1000.0, 0.0)
                sub.setpoint_kw[bat] -= cut
                sub.setpoint_w[bat] = np.floor(sub.setpoint_kw[bat] * 1000.0)
                sub.expected_kw[bat] = np.maximum(sub.expected_kw[bat] - cut, 0.0)
                kw[bat] = sub.expected_kw[bat]
            k = int(keep.sum())
            pieces.append(sub)
            taken[sub.device_index] = True
            short[d] -= float(kw[:k].sum())
        if short[d] <= 1e-9:
            continue
        # 2. Free devices, eligible for what is left of the window.
        rest = Demand(
            id=dem.id,
            region=dem.region,
            start_ms=h.interval_start_ms(lo),
            end_ms=dem.end_ms,
            mw=float(short[d]) / 1000.0,
            priority=dem.priority,
            direction=dem.direction,
            is_grid_event=dem.is_grid_event,
            preempt=dem.preempt,
            firm=dem.firm,
        )
        cl = build_clusters(fleet, usage, h, params, [rest], exclude=blocked | taken)
        if cl.device_index.size == 0:
            continue
        w = cl.windows[0]
        kw_all = cl.row_shed_kw[:, 0]
        hours = max(w.hours, h.dt_h)
        unit = cl.row_energy_cost + cl.row_event_cost / np.maximum(kw_all * hours, 1e-9)
        prio = np.argsort(unit, kind="stable")
        k = _take(kw_all[prio], float(short[d]))
        rows = prio[:k]
        is_bat = cl.row_power_kw[rows] > 0
        out = _Rows()
        bat_rows, th_rows = rows[is_bat], rows[~is_bat]
        out.add(bat_rows, d, kw_all[bat_rows], w.a, w.b, False, -1)
        out.add(th_rows, d, kw_all[th_rows], w.a, int(w.block_bounds[1]), False, -1)
        # Shed per row was computed for column 0 of the replacement clusters.
        cl.row_shed_kw = np.repeat(cl.row_shed_kw[:, :1], nd, axis=1)
        new = _build(cl, out, h, demands, params.reserve_pct)
        pieces.append(new)
        taken[new.device_index] = True
    return _concat(pieces, h, demands, params.reserve_pct)


def standby(a: Assignment, rows: I64) -> Assignment:
    """Rows of an assignment kept as an event's reserve: every one stands by.

    The runner's reserve also holds planned rows it did not start (the front-loaded share held
    back for when the shed fades); they must be reserve rows here, or :func:`replacements`
    would neither take them from the reserve nor as free devices (a primary of the assignment
    counts as taken), and an event would run out of devices with them idle."""
    sub = _subset(a, np.asarray(rows, dtype=np.int64))
    sub.is_reserve[:] = True
    return sub


def _subset(a: Assignment, rows: I64) -> Assignment:
    return Assignment(
        horizon=a.horizon,
        demands=a.demands,
        device_index=a.device_index[rows].copy(),
        demand_index=a.demand_index[rows].copy(),
        kind_code=a.kind_code[rows].copy(),
        setpoint_kw=a.setpoint_kw[rows].copy(),
        expected_kw=a.expected_kw[rows].copy(),
        start_interval=a.start_interval[rows].copy(),
        end_interval=a.end_interval[rows].copy(),
        is_reserve=a.is_reserve[rows].copy(),
        profile=a.profile[rows].copy(),
        profiles=a.profiles,
        command_type=a.command_type[rows].copy(),
        setpoint_w=a.setpoint_w[rows].copy(),
        offset_c=a.offset_c[rows].copy(),
        limit_w=a.limit_w[rows].copy(),
        reserve_pct=a.reserve_pct,
    )


def _concat(
    parts: list[Assignment], h: Horizon, demands: list[Demand], reserve_pct: float
) -> Assignment:
    if not parts:
        return Assignment.empty(h, demands, reserve_pct)
    profiles: list[F64] = []
    prof_cols: list[np.ndarray] = []
    for p in parts:
        off = sum(len(x) for x in profiles)
        prof_cols.append(np.where(p.profile >= 0, p.profile + off, -1).astype(np.int32))
        profiles.append(p.profiles)

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    return Assignment(
        horizon=h,
        demands=demands,
        device_index=cat("device_index"),
        demand_index=cat("demand_index"),
        kind_code=cat("kind_code"),
        setpoint_kw=cat("setpoint_kw"),
        expected_kw=cat("expected_kw"),
        start_interval=cat("start_interval"),
        end_interval=cat("end_interval"),
        is_reserve=cat("is_reserve"),
        profile=np.concatenate(prof_cols),
        profiles=np.concatenate(profiles) if profiles else np.zeros((0, h.n_intervals)),
        command_type=cat("command_type"),
        setpoint_w=cat("setpoint_w"),
        offset_c=cat("offset_c"),
        limit_w=cat("limit_w"),
        reserve_pct=reserve_pct,
    )
