"""The optimiser: plans cover what they can, report shortfalls and why, respect priorities."""

from __future__ import annotations

import numpy as np
import pytest

from dispatch.clusters import build_clusters
from dispatch.optimiser import optimise
from dispatch.types import Demand, DeviceUsage, DispatchParams, Horizon, Plan
from sim.synthetic import synthetic_fleet, synthetic_usage
from tests.helpers.demands import H, demand, horizon
from tests.helpers.fleets import NOW, REGION, fleet_of
from vpp.fleet.snapshot import FleetSnapshot


def run(
    fleet: FleetSnapshot, demands: list[Demand], usage: DeviceUsage | None = None, **params: object
) -> Plan:
    usage = usage if usage is not None else DeviceUsage.empty(len(fleet))
    return optimise(fleet, usage, demands, horizon(), DispatchParams(**params))  # type: ignore[arg-type]


def test_small_request_is_covered_with_reserve() -> None:
    plan = run(fleet_of("b" * 10), [demand(mw=0.02)])
    assert plan.solver == "glop" and plan.status == "optimal"
    a, b = horizon().window(*(lambda d: (d.start_ms, d.end_ms))(demand()))
    np.testing.assert_allclose(plan.planned_mw[0, a:b], 0.02, rtol=1e-6)
    assert plan.shortfall_mw.max() == 0.0
    assert set(plan.binding[0]) == {"none"}
    assert plan.reserve_mw[0] >= 0.15 * 0.02 - 1e-9
    assert plan.planned_mw[0, b:].sum() == 0.0


def test_never_infeasible_reports_shortfall_and_binding_energy() -> None:
    # One battery: 13.5 kWh, 20 % reserve → 10.8 kWh × 0.949 over a 4 h window.
    plan = run(fleet_of("b"), [demand(mw=0.005, end_h=4.0)])
    usable_mwh = 13.5 * 0.8 * 0.949 / 1000
    assert plan.planned_mw.sum() * 0.25 == pytest.approx(usable_mwh, rel=1e-6)
    short = plan.shortfall_mw[0][plan.requested_mw[0] > 0]
    assert (short > 0).all()
    assert set(plan.binding[0][:16]) == {"fleet_energy"}


def test_binding_power_when_discharge_rating_is_the_limit() -> None:
    plan = run(fleet_of("bb"), [demand(mw=0.02, end_h=1.0)])  # 2 × 5 kW < 20 kW for 1 h
    a = plan.planned_mw[0][plan.requested_mw[0] > 0]
    np.testing.assert_allclose(a, 0.010, rtol=1e-6)
    assert {b for b in plan.binding[0] if b != "none"} == {"fleet_power"}


def test_no_devices_and_solar_contributes_nothing() -> None:
    plan = run(fleet_of("sss"), [demand(mw=0.01)])
    assert plan.planned_mw.sum() == 0.0
    assert {b for b in plan.binding[0] if b != "none"} == {"no_devices"}
    other = run(fleet_of("bbb"), [demand(mw=0.01, region="CAISO-SP15")])
    assert other.planned_mw.sum() == 0.0


def test_fatigue_budget_binds() -> None:
    f = fleet_of("tttt")
    usage = DeviceUsage.empty(4)
    usage.events_this_season[:] = usage.max_events_thermostat
    plan = run(f, [demand(mw=0.002)], usage)
    assert plan.planned_mw.sum() == 0.0
    assert {b for b in plan.binding[0] if b != "none"} == {"fatigue_budget"}
    # Resting since an event 5 h ago (< 20 h) also holds them back.
    usage = DeviceUsage.empty(4)
    usage.last_event_end_ms[:] = horizon().start_ms - 5 * H
    assert run(f, [demand(mw=0.002)], usage).planned_mw.sum() == 0.0


def test_thermostat_shed_falls_with_event_length() -> None:
    f = fleet_of("t" * 50)
    short = run(f, [demand(mw=1.0, end_h=1.0)], reserve_pct=0.0)
    long = run(f, [demand(mw=1.0, end_h=2.0)], reserve_pct=0.0)
    per_interval_short = short.planned_mw[0, :4].mean()
    per_interval_long = long.planned_mw[0, :8].mean()
    assert per_interval_short > per_interval_long > 0
    assert short.recovery_mwh[0] > 0


def test_long_event_rotates_thermostats_in_blocks_of_two_hours() -> None:
    f = fleet_of("t" * 60)
    plan = run(f, [demand(mw=1.0, end_h=4.0)], reserve_pct=0.0)
    cl = build_clusters(f, DeviceUsage.empty(60), horizon(), DispatchParams(), [demand(end_h=4.0)])
    assert cl.windows[0].n_blocks == 2 and cl.windows[0].max_block_h <= 2.0
    # Each device serves one block: at any time about half the devices shed.
    mean_active = plan.planned_mw[0, :16].mean() * 1000 / cl.row_shed_kw[:, 0].mean()
    assert mean_active == pytest.approx(30, rel=0.05)


def test_priority_and_preemption() -> None:
    f = fleet_of("b" * 4)  # 20 kW
    req = demand("req", mw=0.015, end_h=1.0)
    grid = demand(
        "grid", mw=0.015, start_h=0.5, end_h=1.5, priority=100, is_grid_event=True, preempt=True
    )
    plan = run(f, [req, grid], reserve_pct=0.0)
    j_req, j_grid = 0, 1
    assert plan.shortfall_mw[j_grid].max() == pytest.approx(0.0, abs=1e-9)
    assert plan.shortfall_mw[j_req].max() > 0
    assert {b for b in plan.binding[j_req] if b != "none"} == {"preempted_by:grid"}
    # Without preempt the grid event takes only what the commitment leaves.
    passive = demand("grid", mw=0.015, start_h=0.5, end_h=1.5, priority=100, is_grid_event=True)
    plan = run(f, [req, passive], reserve_pct=0.0)
    assert plan.shortfall_mw[j_req].max() == pytest.approx(0.0, abs=1e-9)
    assert plan.shortfall_mw[j_grid].max() > 0
    assert {b for b in plan.binding[j_grid] if b != "none"} == {"preempted_by:req"}


def test_higher_priority_request_served_first() -> None:
    f = fleet_of("b" * 3)
    lo = demand("lo", mw=0.015, end_h=1.0, priority=40)
    hi = demand("hi", mw=0.015, end_h=1.0, priority=70)
    plan = run(f, [lo, hi], reserve_pct=0.0)
    assert plan.shortfall_mw[1].max() == pytest.approx(0.0, abs=1e-9)
    assert plan.shortfall_mw[0].max() > 0


def test_per_interval_profile_and_energy_shaping() -> None:
    f = fleet_of("b" * 2)
    h = horizon()
    mw = np.zeros(h.n_intervals)
    mw[:8] = [0.002] * 4 + [0.009] * 4  # low then high within the 2 h window
    plan = run(f, [Demand("r", REGION, h.start_ms, h.start_ms + 2 * H, mw)], reserve_pct=0.0)
    np.testing.assert_allclose(plan.planned_mw[0, :8], mw[:8], rtol=1e-6)


def test_greedy_fallback() -> None:
    f = synthetic_fleet(400, seed=3, now_ms=NOW)
    u = synthetic_usage(400, seed=3, now_ms=NOW)
    ds = [demand("a", mw=0.2, end_h=2.0), demand("b", mw=0.1, start_h=1.0, end_h=3.0)]
    fallback = optimise(f, u, ds, horizon(), DispatchParams(time_limit_s=0.0))
    assert fallback.solver == "greedy" and fallback.notes
    lp = optimise(f, u, ds, horizon(), DispatchParams())
    for p in (fallback, lp):
        assert (p.planned_mw <= p.requested_mw + 1e-9).all()
        np.testing.assert_allclose(p.planned_mw + p.shortfall_mw, p.requested_mw, atol=1e-9)
    assert lp.objective >= fallback.objective - 1e-6


def test_pdlp_solver_matches_glop() -> None:
    f = synthetic_fleet(300, seed=5, now_ms=NOW)
    u = synthetic_usage(300, seed=5, now_ms=NOW)
    ds = [demand("a", mw=0.3, end_h=2.0)]
    glop = optimise(f, u, ds, horizon(), DispatchParams())
    pdlp = optimise(f, u, ds, horizon(), DispatchParams(solver="pdlp", time_limit_s=10.0))
    assert pdlp.solver in ("pdlp", "greedy")
    if pdlp.solver == "pdlp":
        assert pdlp.objective == pytest.approx(glop.objective, rel=1e-3)


def test_plan_json_round_trip() -> None:
    f = synthetic_fleet(300, seed=1, now_ms=NOW)
    u = synthetic_usage(300, seed=1, now_ms=NOW)
    plan = optimise(f, u, [demand(mw=0.5, end_h=3.0)], horizon(), DispatchParams())
    back = Plan.from_json(plan.to_json())
    assert back.demand_ids == plan.demand_ids and back.binding == plan.binding
    np.testing.assert_allclose(back.planned_mw, plan.planned_mw, atol=1e-6)
    np.testing.assert_allclose(back.cluster_mw, plan.cluster_mw, atol=1e-6)
    np.testing.assert_allclose(back.cluster_alloc, plan.cluster_alloc, atol=1e-6)
    assert back.cluster_key(0) == plan.cluster_key(0)


def test_empty_demands_and_empty_fleet() -> None:
    plan = run(fleet_of("bt"), [])
    assert plan.planned_mw.shape == (0, 16)
    empty = fleet_of("b").take(np.zeros(0, np.int64))
    plan = optimise(empty, DeviceUsage.empty(0), [demand()], horizon(), DispatchParams())
    assert plan.planned_mw.sum() == 0 and plan.shortfall_mw.sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mw": -1.0}, "mw"),
        ({"mw": float("nan")}, "mw"),
        ({"direction": "up"}, "direction"),
        ({"start_ms": NOW + 2 * H, "end_ms": NOW + H}, "end_ms"),
        ({"region": ""}, "region"),
        ({"priority": 1.5}, "priority"),
    ],
)
def test_bad_demand_names_the_field(kwargs: dict[str, object], field: str) -> None:
    base: dict[str, object] = {
        "id": "x",
        "region": REGION,
        "start_ms": NOW,
        "end_ms": NOW + H,
        "mw": 1.0,
    }
    with pytest.raises(ValueError, match=field):
        Demand(**{**base, **kwargs})  # type: ignore[arg-type]


def test_bad_inputs_name_the_field() -> None:
    f = fleet_of("bb")
    with pytest.raises(ValueError, match=r"usage\.events_this_season"):
        optimise(f, DeviceUsage.empty(3), [demand()], horizon(), DispatchParams())
    with pytest.raises(ValueError, match="reserve_pct"):
        optimise(f, DeviceUsage.empty(2), [demand()], horizon(), DispatchParams(reserve_pct=90))
    with pytest.raises(ValueError, match="n_intervals"):
        Horizon(NOW, 900, 0)
    with pytest.raises(ValueError, match=r"demand\.mw"):
        bad = Demand("r", REGION, NOW + H, NOW + 2 * H, np.ones(3))
        optimise(f, DeviceUsage.empty(2), [bad], horizon(), DispatchParams())
    with pytest.raises(ValueError, match="ids must be unique"):
        optimise(f, DeviceUsage.empty(2), [demand(), demand()], horizon(), DispatchParams())


def test_a_battery_serving_its_home_until_its_window_is_planned_on_what_will_be_left() -> None:
    """A battery read giving its home 1 kW keeps doing so until its command takes effect: the
    charge it spends before the window (at most half an hour of it) is not planned for the
    window, or an energy-limited battery reaches its reserve before the end."""
    from vpp.flexibility import battery_inputs

    f = fleet_of("bb", soc_pct=40.0, power_w=np.array([1000.0, 0.0]))
    total_kwh = battery_inputs(f).energy_kwh()
    ds = [demand(mw=0.01, end_h=2.0)]  # the window opens an hour after the reading
    cl = build_clusters(f, DeviceUsage.empty(2), horizon(), DispatchParams(), ds)
    shed = dict(zip(cl.device_index.tolist(), cl.row_shed_kw[:, 0].tolist(), strict=True))
    # Serving 1 kW: half an hour of it before the window, then 1 kW under the setpoint in it.
    assert shed[0] == pytest.approx((total_kwh[0] - 1.0 * 0.5 - 1.0 * 2.0) / 2.0, rel=1e-6)
    # Idle: its whole charge, spread over the window.
    assert shed[1] == pytest.approx(total_kwh[1] / 2.0, rel=1e-6)
    # A window opening now: only the seconds since the reading.
    now = Horizon(start_ms=NOW, interval_s=900, n_intervals=16)
    d_now = [Demand(id="r1", region=REGION, start_ms=NOW, end_ms=NOW + 2 * H, mw=0.01)]
    cl_now = build_clusters(f, DeviceUsage.empty(2), now, DispatchParams(), d_now)
    shed_now = dict(
        zip(cl_now.device_index.tolist(), cl_now.row_shed_kw[:, 0].tolist(), strict=True)
    )
    assert shed_now[0] == pytest.approx((total_kwh[0] - 10 / 3600 - 2.0) / 2.0, rel=1e-6)
