"""Dispatch benchmark: the clustered plan against a device-level LP, and a million devices.

    .venv/bin/python bench/dispatch.py            # 1 000 and 10 000 devices vs device-level LP;
                                                  # 1 000 000 devices x 48 intervals x 3 requests
    .venv/bin/python bench/dispatch.py --small    # 300 / 1 000 and 20 000 devices (under a minute)

Part 1 compares, on the same synthetic fleet and demands, our pipeline (clusters, one GLOP LP over
clusters x intervals) with peers that solve the same LP with one unit per device (one variable per
device and interval). The device-level LP is built once and loaded as one MathOpt model, solved by
GLOP, HiGHS (dual simplex, and interior point) and PDLP (first-order, stopped at a relative
tolerance of 1e-4); GLOP through the linear_solver model builder, the peer of earlier versions,
runs too at the smaller size and must agree with GLOP through MathOpt. Each peer's time counts
building the device-level LP, loading it and solving it (wall and CPU seconds: on a shared
machine the CPU ratio is the steadier one). Every objective is our objective function ($ of
priority-weighted delivery minus wear, fatigue and missing reserve) evaluated on the peer's
solution after the same repair our plans get (a first-order solution overshoots bounds by its
tolerance); the solver's own objective and its largest bound violation are printed beside it.
It prints the speed-up against the fastest peer that reached optimality (goal >= 50x at 10 000)
and the objective gap against the best peer objective (goal <= 0.5 %). The "realised" line is
what the device-level assignment of our plan is expected to deliver, against our plan.
Part 2 times fleet snapshot -> clusters -> LP -> device-level assignment for 1 000 000 devices,
48 intervals and three overlapping requests (goal < 2 s) and prints peak memory (tracemalloc of
the pipeline, separate run, and the process's max RSS).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ortools.math_opt import model_pb2, parameters_pb2, result_pb2
from ortools.math_opt.core.python import solver as mathopt_core
from ortools.math_opt.python import mathopt

from dispatch.assign import assign
from dispatch.clusters import build_clusters
from dispatch.optimiser import LP, _repair, build_lp, optimise
from dispatch.types import Demand, DispatchParams, Horizon
from sim.synthetic import synthetic_fleet, synthetic_usage
from vpp.fleet.snapshot import FleetSnapshot
from vpp.flexibility import available_kw

F64 = npt.NDArray[np.float64]
NOW_MS = 1_784_061_000_000
PDLP_RELATIVE_TOL = 1e-4
HOUR_MS = 3_600_000


def horizon() -> Horizon:
    return Horizon(start_ms=NOW_MS + HOUR_MS, interval_s=900, n_intervals=48)


def region_mw(fleet: FleetSnapshot, region: str, window_h: float) -> float:
    return float(available_kw(fleet, window_h)[fleet.mask(region=region)].sum()) / 1000.0


def scenario(fleet: FleetSnapshot, h: Horizon, *, three: bool = False) -> list[Demand]:
    """Requests sized against what each region holds (some fit, some are short), a ramped
    profile, and a preempting grid event on top of a commitment."""
    s = h.start_ms
    n_north = region_mw(fleet, "ERCOT-NORTH", 4.0)
    n_houston = region_mw(fleet, "ERCOT-HOUSTON", 5.0)
    if three:
        return [
            Demand("r1", "ERCOT-NORTH", s + 2 * HOUR_MS, s + 6 * HOUR_MS, 0.55 * n_north),
            Demand(
                "r2", "ERCOT-NORTH", s + 4 * HOUR_MS, s + 7 * HOUR_MS, 0.35 * n_north, priority=60
            ),
            Demand("r3", "ERCOT-HOUSTON", s + 3 * HOUR_MS, s + 8 * HOUR_MS, 0.8 * n_houston),
        ]
    n_caiso = region_mw(fleet, "CAISO-SP15", 3.0)
    n_pjm = region_mw(fleet, "PJM-DOM", 6.0)
    ramp = np.clip(np.linspace(0.4, 1.2, h.n_intervals), 0, None) * 0.9 * n_houston
    return [
        Demand("r1", "ERCOT-NORTH", s + 2 * HOUR_MS, s + 6 * HOUR_MS, 0.7 * n_north),
        Demand(
            "g1",
            "ERCOT-NORTH",
            s + 5 * HOUR_MS,
            s + 7 * HOUR_MS,
            0.4 * n_north,
            priority=100,
            is_grid_event=True,
            preempt=True,
        ),
        Demand("r2", "ERCOT-HOUSTON", s + 3 * HOUR_MS, s + 8 * HOUR_MS, ramp, priority=55),
        Demand("r3", "CAISO-SP15", s + 6 * HOUR_MS, s + 9 * HOUR_MS, 1.1 * n_caiso),
        Demand(
            "r4", "PJM-DOM", s + 1 * HOUR_MS, s + 7 * HOUR_MS, 0.6 * n_pjm, direction="net_export"
        ),
    ]


@dataclass
class Peer:
    """One solve of the device-level LP: ``objective`` is our objective function evaluated on
    the (repaired) solution, so every peer is scored the same way; ``solver_objective`` is what
    the solver itself reported."""

    name: str
    status: str
    seconds: float
    cpu_s: float
    objective: float = float("nan")
    solver_objective: float = float("nan")
    max_violation: float = float("nan")
    planned_mwh: F64 | None = None


def mathopt_model(lp: LP) -> model_pb2.ModelProto:
    """The device-level LP as a MathOpt model, filled from the same arrays (bounds, objective,
    CSR matrix) that ``optimise`` loads into GLOP, so every MathOpt solver sees one model."""
    A = lp.A.tocsr(copy=True)
    A.sum_duplicates()
    A.eliminate_zeros()
    A.sort_indices()
    n_var, n_row = A.shape[1], A.shape[0]
    m = model_pb2.ModelProto(name="device-level dispatch LP")
    m.variables.ids.extend(range(n_var))
    m.variables.lower_bounds.extend(lp.lb.tolist())
    m.variables.upper_bounds.extend(lp.ub.tolist())
    m.variables.integers.extend([False] * n_var)
    m.objective.maximize = True
    nz = np.flatnonzero(lp.obj)
    m.objective.linear_coefficients.ids.extend(nz.tolist())
    m.objective.linear_coefficients.values.extend(lp.obj[nz].tolist())
    m.linear_constraints.ids.extend(range(n_row))
    m.linear_constraints.lower_bounds.extend(lp.row_lb.tolist())
    m.linear_constraints.upper_bounds.extend(lp.row_ub.tolist())
    rows = np.repeat(np.arange(n_row, dtype=np.int64), np.diff(A.indptr))
    m.linear_constraint_matrix.row_ids.extend(rows.tolist())
    m.linear_constraint_matrix.column_ids.extend(A.indices.astype(np.int64).tolist())
    m.linear_constraint_matrix.coefficients.extend(A.data.tolist())
    return m


def mathopt_params(
    kind: mathopt.SolverType, lp_algorithm: int | None, limit_s: float
) -> parameters_pb2.SolveParametersProto:
    p = parameters_pb2.SolveParametersProto()
    p.time_limit.FromTimedelta(timedelta(seconds=limit_s))
    if lp_algorithm is not None:
        p.lp_algorithm = lp_algorithm  # type: ignore[assignment]
    if kind == mathopt.SolverType.PDLP:
        # A first-order method stops at a tolerance: relative 1e-4 on the primal and dual
        # residuals and the duality gap, with an absolute floor far below a device's MW (~1e-3),
        # so its objective is comparable with the simplex solvers' (printed side by side).
        crit = p.pdlp.termination_criteria.simple_optimality_criteria
        crit.eps_optimal_relative = PDLP_RELATIVE_TOL
        crit.eps_optimal_absolute = 1e-9
    return p


def violation(lp: LP, v: F64) -> float:
    """Largest bound or row violation of ``v`` (MW, MWh or devices, as the row counts)."""
    ax = lp.A @ v
    rows = np.maximum(lp.row_lb - ax, ax - lp.row_ub)
    cols = np.maximum(lp.lb - v, v - lp.ub)
    return float(max(rows.max(initial=0.0), cols.max(initial=0.0), 0.0))


def solve_mathopt(
    name: str,
    kind: mathopt.SolverType,
    lp_algorithm: int | None,
    lp: LP,
    build_s: tuple[float, float],
    limit_s: float,
) -> Peer:
    """Convert and solve; the time counts building the device-level LP (``build_s``, shared by
    the peers, measured once: wall and CPU seconds), the conversion to MathOpt and the solve."""
    t0, c0 = time.perf_counter(), time.process_time()
    model = mathopt_model(lp)
    res = mathopt_core.solve(
        model,
        kind.value,
        parameters_pb2.SolverInitializerProto(),
        mathopt_params(kind, lp_algorithm, limit_s),
        mathopt.ModelSolveParameters().to_proto(),
        None,
        mathopt.CallbackRegistration().to_proto(),
        None,
        None,
    )
    seconds = build_s[0] + time.perf_counter() - t0
    cpu_s = build_s[1] + time.process_time() - c0
    reason = result_pb2.TerminationReasonProto.Name(res.termination.reason)
    status = reason.removeprefix("TERMINATION_REASON_").lower()
    if res.termination.limit != result_pb2.LIMIT_UNSPECIFIED:
        limit = result_pb2.LimitProto.Name(res.termination.limit).removeprefix("LIMIT_")
        status += f" ({limit.lower()} limit)"
    if not res.solutions or not res.solutions[0].HasField("primal_solution"):
        return Peer(name, status, seconds, cpu_s)
    primal = res.solutions[0].primal_solution
    v = np.zeros(lp.n_var)
    v[np.asarray(primal.variable_values.ids, dtype=np.int64)] = primal.variable_values.values
    raw_violation = violation(lp, v)
    fixed = _repair(lp, v)
    return Peer(
        name,
        status,
        seconds,
        cpu_s,
        objective=float(lp.obj @ fixed),
        solver_objective=float(primal.objective_value),
        max_violation=raw_violation,
        planned_mwh=planned_by_demand(lp, fixed),
    )


def planned_by_demand(lp: LP, v: F64) -> F64:
    x = lp.split(v)[2]
    mw = np.bincount(lp.pair_d[lp.x_pair], weights=x, minlength=lp.n_demands)
    return np.asarray(mw * lp.dt_h, dtype=np.float64)


_LP = parameters_pb2.LPAlgorithmProto
# name -> (label, solver, LP algorithm or the solver's default)
PEERS: dict[str, tuple[str, mathopt.SolverType, int | None]] = {
    "highs-ipm": ("HiGHS IPM", mathopt.SolverType.HIGHS, _LP.LP_ALGORITHM_BARRIER),
    "highs": ("HiGHS simplex", mathopt.SolverType.HIGHS, _LP.LP_ALGORITHM_DUAL_SIMPLEX),
    "glop": ("GLOP (MathOpt)", mathopt.SolverType.GLOP, None),
    "pdlp": ("PDLP (MathOpt)", mathopt.SolverType.PDLP, None),
}


def compare(
    n: int, seed: int, peer_limit_s: float, pdlp_limit_s: float, peers: list[str], check_glop: bool
) -> None:
    fleet = synthetic_fleet(n, seed=seed, now_ms=NOW_MS)
    usage = synthetic_usage(n, seed=seed, now_ms=NOW_MS)
    h = horizon()
    demands = scenario(fleet, h)
    params = DispatchParams(time_limit_s=10.0)
    optimise(fleet, usage, demands, h, params)  # warm-up (imports, solver load)

    t0, c0 = time.perf_counter(), time.process_time()
    cl = build_clusters(fleet, usage, h, params, demands)
    plan = optimise(fleet, usage, demands, h, params, clusters=cl)
    t_plan, c_plan = time.perf_counter() - t0, time.process_time() - c0
    asg = assign(fleet, usage, plan, demands, h, params, clusters=cl)
    t_total = time.perf_counter() - t0

    # The device-level LP, built once (one cluster per device) and given to every peer.
    peer_params = DispatchParams(time_limit_s=peer_limit_s)
    t1, c1 = time.perf_counter(), time.process_time()
    dcl = build_clusters(fleet, usage, h, peer_params, demands, granularity="device")
    dlp = build_lp(dcl, demands, h, peer_params)
    build_s = (time.perf_counter() - t1, time.process_time() - c1)
    results = []
    for p in peers:
        r = solve_mathopt(*PEERS[p], dlp, build_s, pdlp_limit_s if p == "pdlp" else peer_limit_s)
        # Progress on stderr: a full-size run takes many minutes before its summary.
        print(f"  [{n:,} devices] {r.name}: {r.status}, {r.seconds:.1f} s", file=sys.stderr)
        results.append(r)
    glop_mb = None
    if check_glop:
        # GLOP through the linear_solver model builder, the peer this bench used before: it
        # must agree with GLOP through MathOpt (same model, two loaders).
        t1, c1 = time.perf_counter(), time.process_time()
        mb = optimise(fleet, usage, demands, h, peer_params, granularity="device")
        glop_mb = Peer(
            "GLOP (model_builder)",
            mb.status,
            time.perf_counter() - t1,
            time.process_time() - c1,
            objective=mb.objective,
            solver_objective=mb.objective,
            max_violation=0.0,
            planned_mwh=mb.planned_mw.sum(axis=1) * h.dt_h,
        )
        results.append(glop_mb)
    n_units = len(dcl)

    asked = plan.requested_mw.sum() * h.dt_h
    realised = asg.expected_mw().sum() * h.dt_h
    print(
        f"\n== {n:,} devices x {h.n_intervals} intervals, {len(demands)} demands "
        f"({asked:.2f} MWh asked) =="
    )
    print(
        f"  ours : {len(cl)} clusters, {plan.solver} {plan.status}, objective "
        f"${plan.objective:,.2f}, planned {plan.planned_mw.sum() * h.dt_h:.3f} MWh, "
        f"plan {t_plan * 1000:.1f} ms, CPU {c_plan * 1000:.1f} ms "
        f"(+assign {1000 * (t_total - t_plan):.1f} ms)"
    )
    print(
        f"  device-level LP: {n_units:,} devices with a use, {dlp.n_var:,} variables, "
        f"{dlp.A.shape[0]:,} rows, {dlp.A.nnz:,} nonzeros; built in {build_s[0]:.2f} s "
        f"(counted in each peer's time)"
    )
    for r in results:
        extra = ""
        if r.planned_mwh is not None:
            extra = (
                f", solver's objective ${r.solver_objective:,.2f}, max violation "
                f"{r.max_violation:.1e}, planned {r.planned_mwh.sum():.3f} MWh"
            )
        print(
            f"  peer {r.name:<21}: {r.status}, objective ${r.objective:,.2f}{extra}, "
            f"{r.seconds:.2f} s (CPU {r.cpu_s:.2f} s)"
        )
    if glop_mb is not None:
        glop_mo = next((r for r in results if r.name == PEERS["glop"][0]), None)
        if glop_mo is not None:
            diff = abs(glop_mo.objective - glop_mb.objective) / max(abs(glop_mb.objective), 1e-9)
            print(
                f"  GLOP via MathOpt vs via model_builder: objectives differ by {100 * diff:.4f} %"
            )
    solved = [r for r in results if r.status == "optimal" and np.isfinite(r.objective)]
    if not solved:
        print("  no device-level peer solved to optimality: no speed-up or gap printed")
        return
    best = max(solved, key=lambda r: r.objective)
    fastest = min(solved, key=lambda r: r.seconds)
    gap = (best.objective - plan.objective) / max(abs(best.objective), 1e-9)
    print(
        f"  speed-up vs fastest device-level peer ({fastest.name.split(' (')[0]}): "
        f"{fastest.seconds / t_plan:,.0f}× at {n} devices, objective gap {100 * gap:.3f} %"
        f"  (gap against the best peer objective, {best.name}; goals >= 50×, <= 0.5 %)"
    )
    for r in solved:
        print(f"    vs {r.name:<21}: {r.seconds / t_plan:,.0f}× wall, {r.cpu_s / c_plan:,.0f}× CPU")
    print(
        f"  realised by our assignment: {realised:.3f} MWh = "
        f"{100 * realised / max(plan.planned_mw.sum() * h.dt_h, 1e-9):.1f} % of our plan"
    )
    ref = best.planned_mwh if best.planned_mwh is not None else np.zeros(len(demands))
    for j, d in enumerate(demands):
        short = plan.shortfall_mw[j]
        binds = sorted({b for b in plan.binding[j] if b != "none"})
        print(
            f"    {d.id}: asked {plan.requested_mw[j].sum() * h.dt_h:.3f} MWh, planned "
            f"{plan.planned_mw[j].sum() * h.dt_h:.3f} (best peer {ref[j]:.3f})"
            f", short {short.sum() * h.dt_h:.3f} MWh, binding {binds or ['none']}"
        )


def pipeline(
    fleet: FleetSnapshot,
    usage,
    demands: list[Demand],
    h: Horizon,  # type: ignore[no-untyped-def]
    params: DispatchParams,
):
    cl = build_clusters(fleet, usage, h, params, demands)
    plan = optimise(fleet, usage, demands, h, params, clusters=cl)
    asg = assign(fleet, usage, plan, demands, h, params, clusters=cl)
    return cl, plan, asg


def million(n: int, seed: int) -> None:
    t0 = time.perf_counter()
    fleet = synthetic_fleet(n, seed=seed, now_ms=NOW_MS)
    usage = synthetic_usage(n, seed=seed, now_ms=NOW_MS)
    h = horizon()
    demands = scenario(fleet, h, three=True)
    params = DispatchParams()
    print(f"\n== {n:,} devices x {h.n_intervals} intervals x 3 overlapping requests ==")
    print(f"  (synthetic fleet built in {time.perf_counter() - t0:.2f} s, not timed)")
    pipeline(
        fleet.take(np.arange(min(n, 20_000))), usage_take(usage, min(n, 20_000)), demands, h, params
    )  # warm-up
    times = []
    for _ in range(3):
        gc.collect()
        t = time.perf_counter()
        cl = build_clusters(fleet, usage, h, params, demands)
        t_cl = time.perf_counter() - t
        plan = optimise(fleet, usage, demands, h, params, clusters=cl)
        t_lp = time.perf_counter() - t - t_cl
        asg = assign(fleet, usage, plan, demands, h, params, clusters=cl)
        total = time.perf_counter() - t
        times.append((total, t_cl, t_lp, total - t_cl - t_lp))
    best = min(times)
    print(
        f"  snapshot -> device assignment: best {best[0]:.3f} s, runs "
        f"{', '.join(f'{x[0]:.3f}' for x in times)} s  (goal < 2 s)"
    )
    print(
        f"    clusters {best[1]:.3f} s ({len(cl)} clusters, {len(cl.device_index):,} eligible), "
        f"LP {best[2]:.3f} s ({plan.solver} {plan.status}), assign {best[3]:.3f} s"
    )
    print(
        f"    {int((~asg.is_reserve).sum()):,} devices assigned, {int(asg.is_reserve.sum()):,} "
        f"in reserve; {asg.summary()}"
    )
    for j, d in enumerate(demands):
        print(
            f"    {d.id}: asked {plan.requested_mw[j].max():.1f} MW, planned min/max "
            f"{plan.planned_mw[j][plan.requested_mw[j] > 0].min():.1f}/"
            f"{plan.planned_mw[j].max():.1f} MW, reserve {plan.reserve_mw[j]:.1f} MW"
        )
    gc.collect()
    tracemalloc.start()
    pipeline(fleet, usage, demands, h, params)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"  peak memory of the pipeline (tracemalloc): {peak / 2**20:.0f} MiB; "
        f"process max RSS (incl. the fleet itself): {rss:.0f} MiB"
    )


def usage_take(usage, k: int):  # type: ignore[no-untyped-def]
    from dispatch.types import DeviceUsage

    return DeviceUsage(
        usage.events_this_season[:k],
        usage.hours_this_season[:k],
        usage.last_event_end_ms[:k],
        usage.cost_per_kwh[:k],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="quick run with small fleets")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--peer-limit-s", type=float, default=1800.0, help="time limit of the device-level LP"
    )
    ap.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"device-level peers through MathOpt, comma-separated from: {', '.join(PEERS)}",
    )
    ap.add_argument(
        "--pdlp-limit-s",
        type=float,
        default=None,
        help="time limit of PDLP (default: 600 s, 3 s with --small); at the limit it is shown "
        "with its objective so far and is not a candidate for the fastest peer",
    )
    ap.add_argument(
        "--no-glop-check",
        action="store_true",
        help="skip GLOP through the model builder (the agreement check with GLOP via MathOpt)",
    )
    ap.add_argument(
        "--sizes",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        default=None,
        help="fleet sizes of part 1, comma-separated (default 1000,10000; 300,1000 with --small)",
    )
    ap.add_argument("--no-million", action="store_true", help="skip part 2 (1 000 000 devices)")
    args = ap.parse_args()
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        ap.error(f"--peers: unknown {unknown}; choose from {sorted(PEERS)}")
    sizes = args.sizes or ((300, 1_000) if args.small else (1_000, 10_000))
    pdlp_limit_s = (
        args.pdlp_limit_s if args.pdlp_limit_s is not None else (3.0 if args.small else 600.0)
    )
    for i, n in enumerate(sizes):
        # The two loaders of GLOP are checked at the smaller size only (the larger one would
        # spend minutes solving the same model twice).
        check = not args.no_glop_check and i == 0
        compare(n, args.seed, args.peer_limit_s, pdlp_limit_s, peers, check)
    if not args.no_million:
        million(20_000 if args.small else 1_000_000, args.seed)


if __name__ == "__main__":
    main()
