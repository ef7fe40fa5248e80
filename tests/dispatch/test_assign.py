"""Assignment: devices by priority list, within their limits, each booked once; replacements."""

from __future__ import annotations

import numpy as np
import pytest

from dispatch.assign import _subset, assign, replacements, standby
from dispatch.clusters import build_clusters
from dispatch.optimiser import optimise
from dispatch.types import Assignment, Demand, DeviceUsage, DispatchParams
from sim.synthetic import synthetic_fleet, synthetic_usage
from tests.helpers.demands import demand, horizon
from tests.helpers.fleets import NOW, REGION, fleet_of
from vpp.domain import FreshnessCode
from vpp.fleet.snapshot import BATTERY, THERMOSTAT, FleetSnapshot


def plan_and_assign(
    fleet: FleetSnapshot,
    demands: list[Demand],
    usage: DeviceUsage | None = None,
    exclude: np.ndarray | None = None,
    **params: object,
) -> Assignment:
    usage = usage if usage is not None else DeviceUsage.empty(len(fleet))
    p = DispatchParams(**params)  # type: ignore[arg-type]
    plan = optimise(fleet, usage, demands, horizon(), p, exclude=exclude)
    return assign(fleet, usage, plan, demands, horizon(), p, exclude=exclude)


def test_cheapest_devices_first_and_reserve_listed_separately() -> None:
    f = fleet_of("b" * 10)
    usage = DeviceUsage.empty(10)
    usage.cost_per_kwh[:] = np.linspace(0.30, 0.01, 10)  # device 9 cheapest
    asg = plan_and_assign(f, [demand(mw=0.01, end_h=1.0)], usage)
    active = asg.active_devices
    assert set(active) == {9, 8}  # 2 × 5 kW, the two cheapest
    assert len(asg.reserve_devices) >= 1
    assert set(asg.reserve_devices).isdisjoint(active)
    assert asg.summary()["battery"]["assigned"] == 2


def test_least_recently_used_then_freshest() -> None:
    f = fleet_of("b" * 6)
    usage = DeviceUsage.empty(6)
    usage.last_event_end_ms[:] = [NOW - d * 86_400_000 for d in (2, 9, 5, 30, 1, 3)]
    asg = plan_and_assign(f, [demand(mw=0.005, end_h=1.0)], usage, reserve_pct=0.0)
    assert list(asg.active_devices) == [3]  # used 30 days ago
    usage = DeviceUsage.empty(6)
    f.state["recv_ms"] = NOW - np.array([300, 200, 100, 5, 250, 150]) * 1000
    asg = plan_and_assign(f, [demand(mw=0.005, end_h=1.0)], usage, reserve_pct=0.0)
    assert list(asg.active_devices) == [3]  # freshest telemetry


def test_battery_commands_respect_limits_and_reserve() -> None:
    f = fleet_of("b" * 20, soc_pct=np.linspace(15, 100, 20), backup_reserve_pct=30.0)
    asg = plan_and_assign(f, [demand(mw=0.2, end_h=3.0)])
    bat = asg.kind_code == BATTERY
    i = asg.device_index[bat]
    assert (asg.setpoint_w[bat] <= f.max_discharge_w[i]).all()
    usable_kwh = np.maximum(f.state["soc_pct"][i].astype(float) - 30.0, 0) / 100 * 13.5 * 0.949
    used = sum(asg.setpoint_kw_at(t)[bat] * 0.25 for t in range(16))
    assert (used <= usable_kwh + 1e-6).all()
    assert not np.isin(np.flatnonzero(f.state["soc_pct"] <= 30.0), asg.device_index).any()
    cmd = asg.command(int(np.flatnonzero(bat)[0]))
    assert cmd["type"] == "battery_discharge" and cmd["setpoint_w"] > 0
    assert cmd["valid_until"] > cmd["valid_from"]


def test_thermostat_commands_respect_comfort_and_max_offset() -> None:
    f = fleet_of(
        "t" * 30,
        comfort_max_c=np.where(np.arange(30) < 10, 25.0, 27.0),
        max_offset_c=np.where(np.arange(30) % 2 == 0, 1.2, 3.0),
    )
    asg = plan_and_assign(f, [demand(mw=0.02, end_h=2.0)])
    th = asg.kind_code == THERMOSTAT
    i = asg.device_index[th]
    room = f.comfort_max_c[i] - 24.0
    assert (asg.offset_c[th] <= np.minimum(np.minimum(1.7, f.max_offset_c[i]), room) + 1e-9).all()
    assert (asg.offset_c[th] > 0).all()
    blocks_h = (asg.end_interval[th] - asg.start_interval[th]) * 0.25
    assert (blocks_h <= 2.0).all()
    assert asg.command(int(np.flatnonzero(th)[0]))["type"] == "thermostat_offset"


def test_no_device_booked_twice_across_overlapping_demands() -> None:
    f = synthetic_fleet(2_000, seed=4, now_ms=NOW)
    u = synthetic_usage(2_000, seed=4, now_ms=NOW)
    ds = [
        demand("a", mw=0.4, end_h=2.0),
        demand("b", mw=0.4, start_h=1.0, end_h=3.0),
        demand("g", mw=0.2, start_h=0.5, end_h=1.5, priority=100, is_grid_event=True, preempt=True),
    ]
    p = DispatchParams()
    plan = optimise(f, u, ds, horizon(), p)
    asg = assign(f, u, plan, ds, horizon(), p)
    assert len(np.unique(asg.device_index)) == len(asg)
    assert f.dispatchable()[asg.device_index].all()
    # What the devices are expected to deliver tracks the plan.
    exp = asg.expected_mw()
    assert exp.sum() == pytest.approx(plan.planned_mw.sum(), rel=0.05)
    assert (exp <= plan.requested_mw * 1.10 + 1e-6).all()


def test_exclude_is_respected() -> None:
    f = fleet_of("b" * 8)
    exclude = np.zeros(8, bool)
    exclude[[0, 1, 2]] = True
    asg = plan_and_assign(f, [demand(mw=0.02, end_h=1.0)], exclude=exclude)
    assert not np.isin([0, 1, 2], asg.device_index).any()
    asg = plan_and_assign(f, [demand(mw=0.02, end_h=1.0)], exclude=np.array([3, 4]))
    assert not np.isin([3, 4], asg.device_index).any()


def test_assign_from_stored_plan_and_later_snapshot() -> None:
    f = synthetic_fleet(1_000, seed=2, now_ms=NOW)
    u = synthetic_usage(1_000, seed=2, now_ms=NOW)
    ds = [demand(mw=0.3, end_h=2.0)]
    p = DispatchParams()
    plan = optimise(f, u, ds, horizon(), p)
    from dispatch.types import Plan

    stored = Plan.from_json(plan.to_json())
    # A device went stale since: clusters are matched by key, the device is left out.
    cl = build_clusters(f, u, horizon(), p, ds)
    gone = int(cl.device_index[0])
    f.freshness[gone] = FreshnessCode.stale
    asg = assign(f, u, stored, ds, horizon(), p)
    assert gone not in set(asg.device_index)
    assert len(asg) > 0


def test_replacements_take_reserve_then_free_devices() -> None:
    f = fleet_of("b" * 12)
    ds = [demand(mw=0.02, end_h=2.0)]
    asg = plan_and_assign(f, ds, reserve_pct=15.0)
    reserve = list(asg.reserve_devices)
    assert reserve
    opted_out = asg.active_devices[:1]
    new = replacements(f, DeviceUsage.empty(12), asg, 4.0, exclude=opted_out, from_interval=2)
    assert not new.is_reserve.any()
    assert new.device_index[0] == reserve[0]
    assert (new.start_interval >= 2).all()
    assert new.expected_kw.sum() >= 4.0 - 1e-9
    # A shortfall beyond the reserve enlists free devices too, never one already active.
    big = replacements(f, DeviceUsage.empty(12), asg, 20.0, exclude=opted_out, from_interval=2)
    assert len(big) > len(reserve)
    assert not np.isin(big.device_index, asg.active_devices).any()
    assert len(np.unique(big.device_index)) == len(big)


def test_planned_rows_held_back_in_the_reserve_are_enlisted_first() -> None:
    """The runner starts only part of its plan (the front-load) and keeps the rest, with the
    reserve, as the event's reserve: a shortfall later takes those planned rows first. Kept as
    primaries there, they were neither reserve nor free, and the event ran dry with them idle."""
    f = fleet_of("b" * 12)
    ds = [demand(mw=0.03, end_h=2.0)]
    asg = plan_and_assign(f, ds, reserve_pct=15.0)
    primaries = np.flatnonzero(~asg.is_reserve)
    assert primaries.size >= 3
    started, held = primaries[:1], primaries[1:]
    rows = np.concatenate([held, np.flatnonzero(asg.is_reserve)])
    usage = DeviceUsage.empty(12)
    taken = np.isin(np.arange(12), asg.device_index[started])
    reserve = standby(asg, rows)
    assert reserve.is_reserve.all()
    new = replacements(f, usage, reserve, 4.0, exclude=taken, from_interval=2)
    assert new.device_index[0] == asg.device_index[held[0]]
    assert new.expected_kw.sum() >= 4.0 - 1e-9
    # The old reserve (the held rows as primaries): nothing in the region could be enlisted
    # but devices outside the plan.
    old = replacements(f, usage, _subset(asg, rows), 4.0, exclude=taken, from_interval=2)
    assert not np.isin(old.device_index, asg.device_index[held]).any()


def test_a_battery_standing_by_is_sent_only_what_its_charge_now_holds() -> None:
    """A reserve battery planned on its charge at the start serves its home while it stands
    by; enlisted later, its setpoint is cut to what its charge holds for the rest of the
    window (else it reaches its reserve before the end and the last interval falls short)."""
    f = fleet_of("b" * 12, soc_pct=60.0)
    ds = [demand(mw=0.02, end_h=2.0)]
    asg = plan_and_assign(f, ds, reserve_pct=15.0)
    reserve = list(asg.reserve_devices)
    assert reserve
    dev = int(reserve[0])
    planned_kw = float(asg.setpoint_kw[asg.device_index == dev][0])
    f.state["soc_pct"][dev] = 25.0  # 5 points above the 20 % floor: 0.64 kWh of 13.5 kWh
    new = replacements(f, DeviceUsage.empty(12), asg, 1.0, from_interval=4)  # 1 h left
    row = np.flatnonzero(new.device_index == dev)
    assert row.size == 1
    energy_kwh = 0.05 * 13.5 * 0.949
    assert new.setpoint_kw[row[0]] <= energy_kwh / 1.0 + 1e-6 < planned_kw
    assert new.setpoint_w[row[0]] <= new.setpoint_kw[row[0]] * 1000.0
    assert new.expected_kw[row[0]] <= new.setpoint_kw[row[0]] + 1e-9


def test_replacement_thermostats_hold_at_most_one_block() -> None:
    f = fleet_of("t" * 40)
    asg = plan_and_assign(f, [demand(mw=0.01, end_h=4.0)])
    new = replacements(f, DeviceUsage.empty(40), asg, 3.0, from_interval=5)
    assert len(new) > 0
    assert ((new.end_interval - new.start_interval) * 0.25 <= 2.0).all()
    assert (new.start_interval >= 5).all()


def test_assignment_json_round_trip() -> None:
    f = synthetic_fleet(500, seed=6, now_ms=NOW)
    u = synthetic_usage(500, seed=6, now_ms=NOW)
    ds = [
        demand(mw=0.2, end_h=2.0),
        demand("b", mw=0.1, start_h=1.0, end_h=4.0, region="CAISO-SP15"),
    ]
    p = DispatchParams()
    plan = optimise(f, u, ds, horizon(), p)
    asg = assign(f, u, plan, ds, horizon(), p)
    back = Assignment.from_json(asg.to_json())
    np.testing.assert_array_equal(back.device_index, asg.device_index)
    np.testing.assert_allclose(back.expected_mw(), asg.expected_mw(), atol=1e-3)
    assert back.summary() == asg.summary()


def test_plan_demands_must_match() -> None:
    f = fleet_of("bb")
    p = DispatchParams()
    plan = optimise(f, DeviceUsage.empty(2), [demand()], horizon(), p)
    with pytest.raises(ValueError, match="demands"):
        assign(f, DeviceUsage.empty(2), plan, [demand("other")], horizon(), p)
    asg = assign(f, DeviceUsage.empty(2), plan, [demand()], horizon(), p)
    with pytest.raises(ValueError, match="shortfall_kw"):
        replacements(f, DeviceUsage.empty(2), asg, -1.0)
    assert REGION in f.regions
