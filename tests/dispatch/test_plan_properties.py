"""Whatever the fleet and the demands: the plan never exceeds a device's limits, never takes a
battery below its reserve, and never books a device twice."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch.assign import assign, replacements
from dispatch.optimiser import optimise
from dispatch.types import Assignment, Demand, DeviceUsage, DispatchParams, Horizon
from sim.synthetic import synthetic_fleet, synthetic_usage
from vpp import physics
from vpp.fleet.snapshot import BATTERY, THERMOSTAT, FleetSnapshot
from vpp.flexibility import outdoor_temperatures

NOW = 1_784_061_000_000
H = 3_600_000
HORIZON = Horizon(start_ms=NOW + H, interval_s=900, n_intervals=24)
REGIONS = ["ERCOT-NORTH", "CAISO-SP15"]


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[FleetSnapshot, DeviceUsage, list[Demand], np.ndarray, DispatchParams]:
    n = draw(st.integers(0, 60))
    seed = draw(st.integers(0, 10_000))
    fleet = synthetic_fleet(n, regions=REGIONS, seed=seed, now_ms=NOW)
    usage = synthetic_usage(n, seed=seed, now_ms=NOW)
    rng = np.random.default_rng(seed)
    # Push some devices to the edges: batteries near or under their reserve, tight comfort,
    # budgets nearly used, events just ended.
    if draw(st.booleans()):
        fleet.state["soc_pct"] = np.where(
            fleet.kind_codes == BATTERY, rng.uniform(0, 40, n), fleet.state["soc_pct"]
        )
    if draw(st.booleans()):
        fleet.comfort_max_c = fleet.state["setpoint_c"] + rng.uniform(-0.5, 0.8, n)
        fleet.max_offset_c = np.where(rng.random(n) < 0.5, rng.uniform(0.0, 1.0, n), np.nan)
    if draw(st.booleans()):
        usage.events_this_season = rng.integers(10, 13, n).astype(np.int32)
        usage.hours_this_season = rng.uniform(55, 60, n)
    if draw(st.booleans()):
        usage.last_event_end_ms = (HORIZON.start_ms - rng.uniform(0, 30, n) * H).astype(np.int64)
    demands = []
    for j in range(draw(st.integers(1, 3))):
        start_q = draw(st.integers(-4, 22))
        length_q = draw(st.integers(1, 24))
        flat = draw(st.booleans())
        mw: float | np.ndarray = (
            draw(st.floats(0.0, 0.3))
            if flat
            else np.asarray(draw(st.lists(st.floats(0.0, 0.3), min_size=24, max_size=24)))
        )
        grid = draw(st.booleans())
        demands.append(
            Demand(
                id=f"d{j}",
                region=draw(st.sampled_from([*REGIONS, "PJM-DOM"])),
                start_ms=HORIZON.start_ms + start_q * 900_000,
                end_ms=HORIZON.start_ms + (start_q + length_q) * 900_000,
                mw=mw,
                priority=draw(st.integers(0, 120)),
                direction=draw(st.sampled_from(["load_reduction", "net_export"])),
                is_grid_event=grid,
                preempt=grid and draw(st.booleans()),
            )
        )
    exclude = rng.random(n) < draw(st.floats(0.0, 0.5))
    params = DispatchParams(
        reserve_pct=draw(st.sampled_from([0.0, 10.0, 15.0, 20.0])),
        time_limit_s=draw(st.sampled_from([0.0, 2.0])),  # 0: the greedy fallback
    )
    return fleet, usage, demands, exclude, params


def check_limits(
    fleet: FleetSnapshot,
    usage: DeviceUsage,
    asg: Assignment,
    demands: list[Demand],
    params: DispatchParams,
) -> None:
    i = asg.device_index
    # Only dispatchable, non-solar devices of the demand's region.
    assert fleet.dispatchable()[i].all()
    assert np.isin(asg.kind_code, [BATTERY, THERMOSTAT]).all()
    assert (fleet.kind_codes[i] == asg.kind_code).all()
    for j, d in enumerate(demands):
        rows = asg.demand_index == j
        assert (fleet.region_codes[i[rows]] == fleet.region_code(d.region)).all()
    assert (asg.start_interval >= 0).all() and (asg.end_interval <= HORIZON.n_intervals).all()
    assert (asg.start_interval < asg.end_interval).all()

    bat = asg.kind_code == BATTERY
    if bat.any():
        b = i[bat]
        assert (asg.setpoint_w[bat] <= fleet.max_discharge_w[b]).all()
        assert (asg.setpoint_w[bat] > 0).all()
        # Run every battery row (reserve rows too: each may be enlisted) through the physics.
        reserve = np.where(
            np.isnan(fleet.state["backup_reserve_pct"][b]),
            fleet.backup_reserve_pct[b],
            fleet.state["backup_reserve_pct"][b],
        )
        floor = physics.battery_reserve_pct(reserve)
        soc = fleet.state["soc_pct"][b].astype(float)
        for t in range(HORIZON.n_intervals):
            want_w = asg.setpoint_kw_at(t)[bat] * 1000.0
            soc, got_w = physics.battery_step(
                soc,
                want_w,
                fleet.capacity_wh[b],
                fleet.max_discharge_w[b],
                fleet.max_charge_w[b],
                reserve,
                HORIZON.interval_s,
            )
            np.testing.assert_allclose(got_w, want_w, rtol=1e-6, atol=1e-3)
            assert (soc >= floor - 1e-6).all()

    th = asg.kind_code == THERMOSTAT
    if th.any():
        k = i[th]
        max_off = np.nan_to_num(fleet.max_offset_c[k], nan=2.0)
        setpoint = fleet.state["setpoint_c"][k].astype(float)
        mode = fleet.state["mode"][k]
        outdoor = outdoor_temperatures(fleet)[k]
        heating = (mode == physics.MODE_HEAT) | ((mode == physics.MODE_AUTO) & (outdoor < setpoint))
        room = np.where(
            heating, setpoint - fleet.comfort_min_c[k], fleet.comfort_max_c[k] - setpoint
        )
        room = np.nan_to_num(room, nan=np.inf)
        assert (
            asg.offset_c[th]
            <= np.minimum(np.minimum(params.thermostat_offset_c, max_off), room) + 1e-9
        ).all()
        assert (asg.offset_c[th] > 0).all()
        assert (fleet.state["mode"][k] != physics.MODE_OFF).all()
        block_h = (asg.end_interval[th] - asg.start_interval[th]) * HORIZON.dt_h
        limit = np.array(
            [
                params.thermostat_hard_max_h
                if demands[j].is_grid_event
                else params.thermostat_max_event_h
                for j in asg.demand_index[th]
            ]
        )
        assert (block_h <= limit + 1e-9).all()
        # Season budgets and rest.
        assert (usage.events_this_season[k] < usage.max_events_thermostat).all()
        assert (usage.hours_this_season[k] + block_h <= usage.max_hours_thermostat + 1e-9).all()
        starts = HORIZON.start_ms + asg.start_interval[th].astype(np.int64) * 900_000
        last = usage.last_event_end_ms[k]
        assert ((last <= 0) | (last + params.min_rest_h * H <= starts)).all()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_plan_and_assignment_respect_every_device(
    case: tuple[FleetSnapshot, DeviceUsage, list[Demand], np.ndarray, DispatchParams],
) -> None:
    fleet, usage, demands, exclude, params = case
    plan = optimise(fleet, usage, demands, HORIZON, params, exclude=exclude)
    # Never infeasible: planned + shortfall is what was asked; a reason for every shortfall.
    assert (plan.planned_mw >= -1e-12).all()
    assert (plan.planned_mw <= plan.requested_mw + 1e-9).all()
    np.testing.assert_allclose(plan.planned_mw + plan.shortfall_mw, plan.requested_mw, atol=1e-6)
    for j in range(len(demands)):
        for t in range(HORIZON.n_intervals):
            assert (plan.binding[j][t] == "none") == (plan.shortfall_mw[j, t] == 0)

    asg = assign(fleet, usage, plan, demands, HORIZON, params, exclude=exclude)
    # Never the same device twice (one demand per device, reserve included).
    assert len(np.unique(asg.device_index)) == len(asg)
    assert not exclude[asg.device_index].any()
    check_limits(fleet, usage, asg, demands, params)

    # Replacements never re-book an active or excluded device, and keep to the limits too.
    if len(asg) and demands:
        more = replacements(
            fleet,
            usage,
            asg,
            np.full(len(demands), 5.0),
            exclude=exclude,
            from_interval=3,
            params=params,
        )
        assert not np.isin(more.device_index, asg.active_devices).any()
        assert not exclude[more.device_index].any()
        assert len(np.unique(more.device_index)) == len(more)
        check_limits(fleet, usage, more, demands, params)
