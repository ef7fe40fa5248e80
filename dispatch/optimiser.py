"""Allocate clusters to demands over the horizon: one LP (OR-Tools GLOP or PDLP), greedy fallback.

Variables, per eligible (cluster c, demand d) pair p:
  n[p]    devices of c allotted to d for the whole horizon (a device serves one demand per plan),
  res[p]  devices of c held as replacement reserve for d,
  x[p,t]  MW c delivers to d in interval t of d's window;
and per demand rs[d], the reserve MW missing.
Constraints:
  power     x[p,t] ≤ u[p] ≤ pw[p]·n[p]  battery: mean max discharge; thermostat: mean shed /
                                      blocks; u[p], the pair's peak, costs a little (flat plans)
  energy    Σ_t x[p,t]·Δt ≤ e[c]·n[p]  (batteries: energy above reserve over the whole window)
  devices   Σ_d n[p] + res[p] ≤ N[c]
  demand    Σ_c x[p,t] ≤ MW[d,t]      (shortfall is what is left: never infeasible)
  reserve   Σ_c q[p]·res[p] + rs[d] ≥ reserve_pct·peak MW[d]
Objective (maximise, $): Σ (value[d] − energy cost[c])·x·Δt − event cost[c]·n − λ[d]·rs
  + a small reward on z[d], the worst interval's covered share (a short fleet spreads evenly)
  − a small cost on u[p].
value[d] grows with priority; a grid event that may not preempt is valued below every other
demand, so it only takes what the commitments leave free.

The matrix is built with numpy index arithmetic as one scipy CSR matrix and loaded in one call
(``ModelBuilderHelper.fill_model_from_sparse_data``): no Python loop over variables.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from ortools.linear_solver.python import model_builder_helper as mbh

from dispatch.clusters import Clusters, build_clusters
from dispatch.types import (
    BINDING_ENERGY,
    BINDING_FATIGUE,
    BINDING_NO_DEVICES,
    BINDING_NONE,
    BINDING_POWER,
    Demand,
    DeviceUsage,
    DispatchParams,
    Horizon,
    Plan,
)
from vpp.domain import KIND_BY_CODE
from vpp.fleet.snapshot import BATTERY, THERMOSTAT, FleetSnapshot

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_TOL_MW = 1e-6


def demand_values(demands: Sequence[Demand], params: DispatchParams) -> F64:
    """$ per MWh delivered to each demand (the priority weight)."""
    pri = np.array([float(d.priority) for d in demands])
    w = params.value_per_mwh * (1.0 + np.maximum(pri, 0.0) / 100.0)
    passive = np.array([d.is_grid_event and not d.preempt for d in demands], dtype=bool)
    if passive.any() and (~passive).any():
        w[passive] = 0.5 * w[~passive].min() * (1.0 + pri[passive] / 1e4) / (1.0 + 100 / 1e4)
    return w


@dataclass
class LP:
    """Layout, data and CSR matrix of the allocation LP."""

    pair_c: I64
    pair_d: I64
    pw: F64  # MW per allotted device (power row)
    eng: F64  # MWh per allotted device (battery energy row; 0 for thermostats)
    q: F64  # sustained MW per device over the window (reserve and greedy)
    is_bat: npt.NDArray[np.bool_]
    x_pair: I64
    x_t: I64
    n_pairs: int
    n_x: int
    n_demands: int
    obj: F64
    lb: F64
    ub: F64
    A: sp.csr_matrix
    row_lb: F64
    row_ub: F64
    energy_pairs: I64
    requested: F64  # (demands, intervals)
    peak: F64
    values: F64
    dt_h: float

    @property
    def n_var(self) -> int:
        return 3 * self.n_pairs + self.n_x + 2 * self.n_demands

    def split(self, v: F64) -> tuple[F64, F64, F64, F64]:
        """(n, res, x, rs) views of a solution vector (the last blocks, z and u, are derived)."""
        p, nx, nd = self.n_pairs, self.n_x, self.n_demands
        return v[:p], v[p : 2 * p], v[2 * p : 2 * p + nx], v[2 * p + nx : 2 * p + nx + nd]

    def with_floor(self, v: F64) -> F64:
        """Set z (the coverage floor) and u (each pair's peak) to their best values for the
        allocation (n, res, x, rs) at the head of ``v``."""
        n, res, x, rs = self.split(v)
        nt = self.requested.shape[1]
        key = self.pair_d[self.x_pair] * nt + self.x_t
        tot = np.bincount(key, weights=x, minlength=self.n_demands * nt).reshape(-1, nt)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(self.requested > 0, tot / self.requested, np.inf)
        z = np.clip(frac.min(axis=1, initial=np.inf), 0.0, 1.0) if nt else np.zeros(0)
        u = np.zeros(self.n_pairs)
        np.maximum.at(u, self.x_pair, x)
        return np.concatenate([n, res, x, rs, np.where(np.isfinite(z), z, 0.0), u])


def build_lp(
    cl: Clusters, demands: Sequence[Demand], horizon: Horizon, params: DispatchParams
) -> LP:
    nd, nt, dt = len(demands), horizon.n_intervals, horizon.dt_h
    requested = np.stack([d.mw_profile(horizon) for d in demands]) if nd else np.zeros((0, nt))
    values = demand_values(demands, params) if nd else np.zeros(0)
    a = np.array([w.a for w in cl.windows], dtype=np.int64)
    m = np.array([w.b - w.a for w in cl.windows], dtype=np.int64)
    k = np.array([w.n_blocks for w in cl.windows], dtype=np.int64)
    hours = m * dt
    peak = requested.max(axis=1, initial=0.0) if nd else np.zeros(0)

    elig = (
        cl.eligible() & (cl.count[:, None] > 0) & (m[None, :] > 0) if nd else np.zeros((0, 0), bool)
    )
    pair_c, pair_d = np.nonzero(elig)
    pair_c = pair_c.astype(np.int64)
    pair_d = pair_d.astype(np.int64)
    n_p = len(pair_c)
    is_bat = cl.kind_code[pair_c] == BATTERY
    shed = cl.shed_mw[pair_c, pair_d]
    pw = np.where(is_bat, cl.power_mw[pair_c], shed / k[pair_d])
    # Battery energy per allotted device over the window: the cluster mean of each device's
    # min(power × hours, energy above reserve) (= sustained MW × hours). Tighter than the mean
    # energy alone, and exact for a flat request, so the devices can deliver what is planned.
    eng = np.where(is_bat, np.minimum(cl.energy_mwh[pair_c], shed * hours[pair_d]), 0.0)
    q = np.where(is_bat, shed, shed / k[pair_d])

    # x variables: for each pair, one per interval of its demand's window.
    mx = m[pair_d]
    x_off = np.concatenate([[0], np.cumsum(mx)]).astype(np.int64)
    n_x = int(x_off[-1])
    x_pair = np.repeat(np.arange(n_p, dtype=np.int64), mx)
    x_t = a[pair_d][x_pair] + (np.arange(n_x, dtype=np.int64) - x_off[x_pair])
    col_n, col_res, col_x0, col_rs0 = 0, n_p, 2 * n_p, 2 * n_p + n_x
    col_x = col_x0 + np.arange(n_x, dtype=np.int64)

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    rlb: list[np.ndarray] = []
    rub: list[np.ndarray] = []
    r0 = 0
    # Power rows: x − u ≤ 0, u the pair's peak, itself ≤ pw·n (a row further down). A small
    # cost on u picks, among equally good plans, the one where each cluster's MW is flattest,
    # which its devices can follow exactly (a cluster's energy poured into one interval is a
    # relaxation its devices cannot all match).
    col_u0 = col_x0 + n_x + 2 * nd
    pr = r0 + np.arange(n_x, dtype=np.int64)
    rows += [pr, pr]
    cols += [col_x, col_u0 + x_pair]
    vals += [np.ones(n_x), -np.ones(n_x)]
    rlb.append(np.full(n_x, -np.inf))
    rub.append(np.zeros(n_x))
    r0 += n_x
    # Energy rows (batteries): Σ x·Δt − e·n ≤ 0.
    energy_pairs = np.flatnonzero(is_bat).astype(np.int64)
    erow_of_pair = np.full(n_p, -1, dtype=np.int64)
    erow_of_pair[energy_pairs] = r0 + np.arange(len(energy_pairs))
    xb = erow_of_pair[x_pair] >= 0
    rows += [erow_of_pair[x_pair][xb], erow_of_pair[energy_pairs]]
    cols += [col_x[xb], col_n + energy_pairs]
    vals += [np.full(int(xb.sum()), dt), -eng[energy_pairs]]
    rlb.append(np.full(len(energy_pairs), -np.inf))
    rub.append(np.zeros(len(energy_pairs)))
    r0 += len(energy_pairs)
    # Device rows per cluster: Σ n + res ≤ N.
    nc = len(cl)
    prow = r0 + pair_c
    rows += [prow, prow]
    cols += [col_n + np.arange(n_p), col_res + np.arange(n_p)]
    vals += [np.ones(n_p), np.ones(n_p)]
    rlb.append(np.full(nc, -np.inf))
    rub.append(cl.count.astype(float))
    r0 += nc
    # Demand rows per (demand, interval of its window): Σ x ≤ MW.
    d_off = np.concatenate([[0], np.cumsum(m)]).astype(np.int64)
    drow = r0 + d_off[pair_d][x_pair] + (x_t - a[pair_d][x_pair])
    rows.append(drow)
    cols.append(col_x)
    vals.append(np.ones(n_x))
    n_drows = int(d_off[-1])
    d_of_row = np.repeat(np.arange(nd), m)
    t_of_row = a[d_of_row] + (np.arange(n_drows) - d_off[d_of_row])
    rlb.append(np.full(n_drows, -np.inf))
    rub.append(requested[d_of_row, t_of_row] if nd else np.zeros(0))
    r0 += n_drows
    # Reserve rows per demand: −Σ q·res − rs ≤ −reserve·peak.
    rows += [r0 + pair_d, r0 + np.arange(nd, dtype=np.int64)]
    cols += [col_res + np.arange(n_p), col_rs0 + np.arange(nd, dtype=np.int64)]
    vals += [-q, -np.ones(nd)]
    rlb.append(np.full(nd, -np.inf))
    rub.append(-params.reserve_pct / 100.0 * peak)
    r0 += nd
    # Coverage floor rows per (demand, interval asked for): z·MW − Σ x ≤ 0. A small reward on z
    # spreads a short fleet evenly over the window instead of anywhere the LP likes.
    col_z0 = col_rs0 + nd
    asked = (requested[d_of_row, t_of_row] > 0) if nd else np.zeros(0, bool)
    zrow = r0 + np.cumsum(asked) - 1
    xr = drow - (r0 - n_drows - nd)  # demand row index (0-based) of each x
    x_asked = asked[xr] if n_x else np.zeros(0, bool)
    rows += [zrow[xr[x_asked]], zrow[asked]]
    cols += [col_x[x_asked], col_z0 + d_of_row[asked]]
    vals += [-np.ones(int(x_asked.sum())), requested[d_of_row, t_of_row][asked]]
    n_zrows = int(asked.sum())
    rlb.append(np.full(n_zrows, -np.inf))
    rub.append(np.zeros(n_zrows))
    r0 += n_zrows
    # Peak rows per pair: u − pw·n ≤ 0 (the power rows above bound x by u).
    ur = r0 + np.arange(n_p, dtype=np.int64)
    rows += [ur, ur]
    cols += [col_u0 + np.arange(n_p, dtype=np.int64), col_n + np.arange(n_p, dtype=np.int64)]
    vals += [np.ones(n_p), -pw]
    rlb.append(np.full(n_p, -np.inf))
    rub.append(np.zeros(n_p))
    r0 += n_p

    n_var = 3 * n_p + n_x + 2 * nd
    A = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r0, n_var)
    )
    obj = np.zeros(n_var)
    obj[col_x] = (values[pair_d][x_pair] - cl.energy_cost_per_mwh[pair_c][x_pair]) * dt
    obj[col_n : col_n + n_p] = -cl.event_cost[pair_c]
    obj[col_res : col_res + n_p] = -1e-4
    obj[col_rs0:col_z0] = -params.reserve_shortfall_weight * values * np.maximum(hours, dt)
    obj[col_z0:col_u0] = params.coverage_floor_weight * values * (requested.sum(axis=1) * dt)
    obj[col_u0:] = -params.cluster_peak_cost_per_mw
    lb = np.zeros(n_var)
    ub = np.full(n_var, np.inf)
    ub[col_z0:col_u0] = 1.0
    ub[col_n : col_n + n_p] = cl.count[pair_c]
    ub[col_res : col_res + n_p] = cl.count[pair_c]
    return LP(
        pair_c=pair_c,
        pair_d=pair_d,
        pw=pw,
        eng=eng,
        q=q,
        is_bat=is_bat,
        x_pair=x_pair,
        x_t=x_t,
        n_pairs=n_p,
        n_x=n_x,
        n_demands=nd,
        obj=obj,
        lb=lb,
        ub=ub,
        A=A,
        row_lb=np.concatenate(rlb),
        row_ub=np.concatenate(rub),
        energy_pairs=energy_pairs,
        requested=requested,
        peak=peak,
        values=values,
        dt_h=dt,
    )


def solve_lp(lp: LP, params: DispatchParams) -> tuple[F64 | None, str, float]:
    """(solution or None, status, seconds)."""
    t0 = time.perf_counter()
    model = mbh.ModelBuilderHelper()
    # The stubs type these arrays oddly; they are plain float64 vectors and a CSR matrix.
    fill: Any = model.fill_model_from_sparse_data
    fill(lp.lb, lp.ub, lp.obj, lp.row_lb, lp.row_ub, lp.A)
    model.set_maximize(True)
    solver = mbh.ModelSolverHelper(params.solver)
    if not solver.solver_is_supported():
        return None, f"{params.solver}_unavailable", time.perf_counter() - t0
    solver.set_time_limit_in_seconds(float(params.time_limit_s))
    if params.solver_parameters:
        solver.set_solver_specific_parameters(params.solver_parameters)
    solver.solve(model)
    status = solver.status()
    elapsed = time.perf_counter() - t0
    if status == mbh.SolveStatus.OPTIMAL and solver.has_solution():
        v = np.asarray(solver.variable_values(), dtype=float)
        return _repair(lp, v), "optimal", elapsed
    return None, status.name.lower(), elapsed


def _repair(lp: LP, v: F64) -> F64:
    """Clip solver round-off so the plan never exceeds a bound by a hair (first-order solvers)."""
    v = np.clip(v, lp.lb, lp.ub)
    n, res, x, rs = lp.split(v)
    x = np.minimum(np.maximum(x, 0.0), lp.pw[lp.x_pair] * n[lp.x_pair])
    # Energy: scale a battery pair's profile down if it overdraws.
    dt_e = np.bincount(lp.x_pair, weights=x, minlength=lp.n_pairs)
    used_mwh = dt_e * lp.dt_h
    scale = np.where(
        lp.is_bat & (used_mwh > 0), np.minimum(1.0, lp.eng * n / np.maximum(used_mwh, 1e-300)), 1.0
    )
    x = x * scale[lp.x_pair]
    # Demand: never plan more than asked.
    nt = lp.requested.shape[1]
    key = lp.pair_d[lp.x_pair] * nt + lp.x_t
    tot = np.bincount(key, weights=x, minlength=lp.n_demands * nt)
    cap = lp.requested.reshape(-1)
    over = np.where(tot > cap, cap / np.maximum(tot, 1e-300), 1.0)
    x = x * over[key]
    return lp.with_floor(np.concatenate([n, res, x, rs, np.zeros(lp.n_demands)]))


def greedy_solution(lp: LP, cl: Clusters, params: DispatchParams, dt_h: float) -> F64:
    """Cluster-level priority list: demands by value; per demand, cheapest clusters first, each
    allotted devices at its sustained MW until the peak is covered; then the reserve."""
    n = np.zeros(lp.n_pairs)
    res = np.zeros(lp.n_pairs)
    x = np.zeros(lp.n_x)
    rs = np.zeros(lp.n_demands)
    rem = cl.count.astype(float).copy()
    hours = np.array([max(w.hours, dt_h) for w in cl.windows])
    for d in np.argsort(-lp.values, kind="stable"):
        pairs = np.flatnonzero((lp.pair_d == d) & (lp.q > 0))
        if pairs.size == 0:
            rs[d] = params.reserve_pct / 100.0 * lp.peak[d]
            continue
        c = lp.pair_c[pairs]
        q = lp.q[pairs]
        unit_cost = cl.energy_cost_per_mwh[c] + cl.event_cost[c] / (q * hours[d])
        order = np.argsort(unit_cost, kind="stable")
        pairs, c, q = pairs[order], c[order], q[order]
        cap = rem[c] * q
        before = np.cumsum(cap) - cap
        take_mw = np.clip(lp.peak[d] - before, 0.0, cap)
        n[pairs] = take_mw / q
        rem[c] -= n[pairs]
        cover = take_mw.sum()
        need_r = params.reserve_pct / 100.0 * lp.peak[d]
        cap_r = rem[c] * q
        before_r = np.cumsum(cap_r) - cap_r
        take_r = np.clip(need_r - before_r, 0.0, cap_r)
        res[pairs] = take_r / q
        rem[c] -= res[pairs]
        rs[d] = max(need_r - take_r.sum(), 0.0)
        if cover > 0:
            xs = np.flatnonzero(lp.pair_d[lp.x_pair] == d)
            frac = np.minimum(1.0, lp.requested[d, lp.x_t[xs]] / cover)
            x[xs] = lp.q[lp.x_pair[xs]] * n[lp.x_pair[xs]] * frac
    return lp.with_floor(np.concatenate([n, res, x, rs, np.zeros(lp.n_demands)]))


def _bindings(
    lp: LP, cl: Clusters, v: F64, demands: Sequence[Demand], shortfall: F64, dt_h: float
) -> list[list[str]]:
    nd, nt = shortfall.shape
    out = [[BINDING_NONE] * nt for _ in range(nd)]
    if not (shortfall > _TOL_MW).any():
        return out
    n, res, x, _ = lp.split(v)
    alloc = np.zeros((len(cl), nd))
    np.add.at(alloc, (lp.pair_c, lp.pair_d), n + res)
    used = alloc.sum(axis=1)
    exhausted = used >= cl.count - 1e-6
    elig = cl.eligible()
    x_use = np.bincount(lp.x_pair, weights=x, minlength=lp.n_pairs) * dt_h
    energy_tight = lp.is_bat & (n > 1e-9) & (x_use >= lp.eng * n * (1 - 1e-6))
    power_slack = lp.pw[lp.x_pair] * n[lp.x_pair] - x
    for d in range(nd):
        ts = np.flatnonzero(shortfall[d] > _TOL_MW)
        if ts.size == 0:
            continue
        mine = elig[:, d] & (cl.count > 0)
        # Higher-valued demands holding devices of clusters this one could use, all taken.
        rivals = [
            e
            for e in range(nd)
            if e != d
            and lp.values[e] > lp.values[d]
            and float((alloc[:, e] * (mine & exhausted)).sum()) > 1e-9
        ]
        rival = max(rivals, key=lambda e: float((alloc[:, e] * mine).sum()), default=None)
        pd_mask = lp.pair_d == d
        e_pairs = pd_mask & energy_tight
        for t in ts:
            if rival is not None:
                label = f"preempted_by:{demands[rival].id}"
            elif cl.fatigue_lost_mw[d] >= shortfall[d, t] - _TOL_MW:
                label = BINDING_FATIGUE
            elif not mine.any():
                label = BINDING_NO_DEVICES
            else:
                # Energy binds when a battery allotment has used all its energy while it still
                # had power to spare in this interval; otherwise the fleet's power (or count).
                xs = (lp.x_t == t) & e_pairs[lp.x_pair]
                label = BINDING_ENERGY if (power_slack[xs] > _TOL_MW).any() else BINDING_POWER
            out[d][t] = label
    return out


def _plan_from(
    lp: LP,
    cl: Clusters,
    v: F64,
    demands: Sequence[Demand],
    horizon: Horizon,
    solver: str,
    status: str,
    solve_s: float,
    build_s: float,
    notes: list[str],
) -> Plan:
    nd, nt = len(demands), horizon.n_intervals
    n, res, x, _ = lp.split(v)
    cluster_mw = np.zeros((len(cl), nd, nt))
    cluster_mw[lp.pair_c[lp.x_pair], lp.pair_d[lp.x_pair], lp.x_t] = x
    planned = cluster_mw.sum(axis=0)
    requested = lp.requested
    planned = np.minimum(planned, requested)
    shortfall = np.maximum(requested - planned, 0.0)
    shortfall[shortfall <= _TOL_MW] = 0.0
    alloc = np.zeros((len(cl), nd))
    reserve = np.zeros((len(cl), nd))
    alloc[lp.pair_c, lp.pair_d] = n
    reserve[lp.pair_c, lp.pair_d] = res
    reserve_mw: F64 = np.bincount(lp.pair_d, weights=lp.q * res, minlength=nd).astype(float)
    th = cl.kind_code[lp.pair_c] == THERMOSTAT
    recovery: F64 = np.bincount(
        lp.pair_d,
        weights=np.where(th, cl.recovery_mwh[lp.pair_c, lp.pair_d] * n, 0.0),
        minlength=nd,
    ).astype(float)
    return Plan(
        horizon=horizon,
        demand_ids=[d.id for d in demands],
        requested_mw=requested,
        planned_mw=planned,
        shortfall_mw=shortfall,
        binding=_bindings(lp, cl, v, demands, shortfall, horizon.dt_h),
        reserve_mw=reserve_mw,
        recovery_mwh=recovery,
        cluster_region=[cl.regions[int(r)] for r in cl.region_code],
        cluster_kind=[KIND_BY_CODE[int(k)].value for k in cl.kind_code],
        cluster_bucket=cl.bucket.copy(),
        cluster_mask=cl.mask.copy(),
        cluster_devices=cl.count.copy(),
        cluster_mw=cluster_mw,
        cluster_alloc=alloc,
        cluster_reserve=reserve,
        solver=solver,
        objective=float(lp.obj @ v),
        status=status,
        solve_s=solve_s,
        build_s=build_s,
        notes=notes,
    )


def _prepare(
    fleet: FleetSnapshot,
    usage: DeviceUsage,
    demands: Sequence[Demand],
    horizon: Horizon,
    params: DispatchParams,
    exclude: np.ndarray | None,
    clusters: Clusters | None,
    granularity: str,
) -> tuple[Clusters, LP]:
    demands = list(demands)
    cl = (
        clusters
        if clusters is not None
        else build_clusters(
            fleet, usage, horizon, params, demands, exclude=exclude, granularity=granularity
        )
    )
    if cl.demand_ids != [d.id for d in demands]:
        raise ValueError("clusters: built for other demands")
    lp = build_lp(cl, demands, horizon, params)
    return cl, lp


def optimise(
    fleet: FleetSnapshot,
    usage: DeviceUsage,
    demands: Sequence[Demand],
    horizon: Horizon,
    params: DispatchParams,
    *,
    exclude: np.ndarray | None = None,
    clusters: Clusters | None = None,
    granularity: str = "cluster",
) -> Plan:
    """Plan MW per demand, interval and cluster. Never infeasible: what cannot be covered is the
    shortfall, with the constraint that binds. The LP runs under ``params.time_limit_s``; on a
    time-out or solver failure the greedy plan is returned (``solver == "greedy"``)."""
    t0 = time.perf_counter()
    cl, lp = _prepare(fleet, usage, demands, horizon, params, exclude, clusters, granularity)
    build_s = time.perf_counter() - t0
    notes: list[str] = []
    v: F64 | None = None
    status = "skipped"
    solve_s = 0.0
    if params.time_limit_s > 0 and lp.n_pairs > 0:
        try:
            v, status, solve_s = solve_lp(lp, params)
        except Exception as exc:  # the greedy plan is always available
            status = f"error: {exc}"
    if v is not None:
        return _plan_from(
            lp, cl, v, demands, horizon, params.solver, status, solve_s, build_s, notes
        )
    if lp.n_pairs > 0:
        notes.append(f"LP not used ({status}); greedy fallback")
    t1 = time.perf_counter()
    g = greedy_solution(lp, cl, params, horizon.dt_h)
    return _plan_from(
        lp,
        cl,
        g,
        demands,
        horizon,
        "greedy",
        "fallback" if lp.n_pairs else "empty",
        solve_s + time.perf_counter() - t1,
        build_s,
        notes,
    )
