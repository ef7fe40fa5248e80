"""Dispatch benchmark: the clustered plan against a device-level LP, and a million devices.

    .venv/bin/python bench/dispatch.py            # 1 000 and 10 000 devices vs device-level LP;
                                                  # 1 000 000 devices x 48 intervals x 3 requests
    .venv/bin/python bench/dispatch.py --small    # 300 / 1 000 and 20 000 devices (seconds)

Part 1 compares, on the same synthetic fleet and demands, our pipeline (clusters, one GLOP LP over
clusters x intervals) with the peer: the same LP with one unit per device (one variable per device
and interval), solved by OR-Tools GLOP. It prints both objective values (the same objective
function: $ of priority-weighted delivery minus wear, fatigue and missing reserve), the gap
(goal <= 1 %), the times and the speed-up (goal >= 100x at 10 000). The "realised" line is what
the device-level assignment of our plan is expected to deliver, against our plan.
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dispatch.assign import assign
from dispatch.clusters import build_clusters
from dispatch.optimiser import optimise
from dispatch.types import Demand, DispatchParams, Horizon
from sim.synthetic import synthetic_fleet, synthetic_usage
from vpp.fleet.snapshot import FleetSnapshot
from vpp.flexibility import available_kw

NOW_MS = 1_784_061_000_000
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


def compare(n: int, seed: int, peer_limit_s: float) -> None:
    fleet = synthetic_fleet(n, seed=seed, now_ms=NOW_MS)
    usage = synthetic_usage(n, seed=seed, now_ms=NOW_MS)
    h = horizon()
    demands = scenario(fleet, h)
    params = DispatchParams(time_limit_s=10.0)
    optimise(fleet, usage, demands, h, params)  # warm-up (imports, solver load)

    t0 = time.perf_counter()
    cl = build_clusters(fleet, usage, h, params, demands)
    plan = optimise(fleet, usage, demands, h, params, clusters=cl)
    t_plan = time.perf_counter() - t0
    asg = assign(fleet, usage, plan, demands, h, params, clusters=cl)
    t_total = time.perf_counter() - t0

    peer_params = DispatchParams(time_limit_s=peer_limit_s)
    t1 = time.perf_counter()
    peer = optimise(fleet, usage, demands, h, peer_params, granularity="device")
    t_peer = time.perf_counter() - t1
    n_units = int(peer.cluster_devices.size)

    gap = (peer.objective - plan.objective) / max(abs(peer.objective), 1e-9)
    asked = plan.requested_mw.sum() * h.dt_h
    realised = asg.expected_mw().sum() * h.dt_h
    print(
        f"\n== {n:,} devices x {h.n_intervals} intervals, {len(demands)} demands "
        f"({asked:.2f} MWh asked) =="
    )
    print(
        f"  ours : {len(cl)} clusters, {plan.solver} {plan.status}, objective "
        f"${plan.objective:,.2f}, planned {plan.planned_mw.sum() * h.dt_h:.3f} MWh, "
        f"plan {t_plan * 1000:.1f} ms (+assign {1000 * (t_total - t_plan):.1f} ms)"
    )
    print(
        f"  peer : device-level LP, {n_units:,} devices with a use, {peer.solver} {peer.status}, "
        f"objective ${peer.objective:,.2f}, planned {peer.planned_mw.sum() * h.dt_h:.3f} MWh, "
        f"{t_peer:.2f} s"
    )
    print(f"  objective gap: {100 * gap:+.3f} %  (goal <= 1 %)")
    print(f"  speed-up: {t_peer / t_plan:,.0f}x  (plan vs device LP; goal >= 100x at 10 000)")
    print(
        f"  realised by our assignment: {realised:.3f} MWh = "
        f"{100 * realised / max(plan.planned_mw.sum() * h.dt_h, 1e-9):.1f} % of our plan"
    )
    for j, d in enumerate(demands):
        short = plan.shortfall_mw[j]
        binds = sorted({b for b in plan.binding[j] if b != "none"})
        print(
            f"    {d.id}: asked {plan.requested_mw[j].sum() * h.dt_h:.3f} MWh, planned "
            f"{plan.planned_mw[j].sum() * h.dt_h:.3f} "
            f"(peer {peer.planned_mw[j].sum() * h.dt_h:.3f})"
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
    args = ap.parse_args()
    sizes = (300, 1_000) if args.small else (1_000, 10_000)
    for n in sizes:
        compare(n, args.seed, args.peer_limit_s)
    million(20_000 if args.small else 1_000_000, args.seed)


if __name__ == "__main__":
    main()
