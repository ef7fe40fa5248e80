"""One valuation of a home's flexibility: the fleet view (/v1/fleet), the optimiser's clusters and
the forecaster's inputs give the same home the same kW, and fill the readings a device has not
sent with the same defaults."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dispatch.clusters import build_clusters
from dispatch.types import Demand, DeviceUsage, DispatchParams, Horizon
from tests.vpp.test_fleet_snapshot import (
    NOW,
    SHED_1C_1H,
    SHED_COOL_1H,
    SHED_HEAT_1H,
    bat,
    rec,
    snapshot,
    thermo,
)
from vpp import flexibility as fx
from vpp import physics
from vpp.fleet.snapshot import BATTERY, THERMOSTAT, FleetSnapshot
from vpp.forecast import model as m

H = 3_600_000
PARAMS = DispatchParams()
# A one-hour demand is one rotation block: the optimiser expects the block's shed less the
# customers who override by then (10 % at 2 h, linear), and no snapback inside the window.
OVERRIDE_1H = PARAMS.thermostat_override_at_2h * 1.0 / 2.0
COOL = {"indoor_c": 24, "setpoint_c": 24, "outdoor_c": 35, "mode": physics.MODE_COOL}


def fleet_kw(snap: FleetSnapshot) -> np.ndarray:
    """What /v1/fleet and /v1/devices report: kW over the next hour."""
    return fx.available_kw(snap, 1.0)


def optimiser_kw(snap: FleetSnapshot, exclude: np.ndarray | None = None) -> np.ndarray:
    """kW the optimiser's cluster rows give each device for a one-hour demand in its region,
    before the expected overrides (0 for a device it would not use)."""
    horizon = Horizon(start_ms=NOW, interval_s=900, n_intervals=8)
    demands = [Demand(f"d-{r}", r, NOW, NOW + H, 1.0) for r in snap.regions]
    cl = build_clusters(
        snap, DeviceUsage.empty(len(snap)), horizon, PARAMS, demands, exclude=exclude
    )
    out = np.zeros(len(snap))
    for row, i in enumerate(cl.device_index):
        kw = cl.row_shed_kw[row, snap.region_codes[i]]  # demand j is in region j
        out[i] = kw / (1.0 - OVERRIDE_1H) if snap.kind_codes[i] == THERMOSTAT else kw
    return out


def forecast_kw(snap: FleetSnapshot) -> np.ndarray:
    """kW of each device from the forecaster's cluster inputs (``region_devices``), evaluated
    now: a battery's deliverable power over the hour, a thermostat's shed at today's outdoor
    temperature from a home at its setpoint (the forecaster does not track indoor)."""
    outdoor = fx.outdoor_temperatures(snap)
    out = np.zeros(len(snap))
    for i in range(len(snap)):
        dev = m.region_devices(snap, np.array([i]), m.RegionCalibration())
        if dev.batteries is not None:
            p = dev.batteries.params
            out[i] = physics.battery_deliverable_kw(
                p["soc_pct"], p["capacity_wh"], p["max_discharge_w"], p["reserve_pct"], 1.0
            )[0]
        elif dev.thermostats is not None:
            p = dev.thermostats.params
            mode = np.rint(p["mode"])
            sp = p["setpoint_c"]
            heating = (mode == physics.MODE_HEAT) | (
                (mode == physics.MODE_AUTO) & (outdoor[i] < sp)
            )
            offset = np.where(heating, p["off_heat"], p["off_cool"])
            shed, _, _ = physics.thermostat_shed(
                sp, sp, outdoor[i], offset, 1.0, p["rated_kw"], heating=heating
            )
            out[i] = float(np.nan_to_num(shed)[0]) if mode[0] != physics.MODE_OFF else 0.0
    return out


def three_ways(snap: FleetSnapshot, **kw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return fleet_kw(snap), optimiser_kw(snap, **kw), forecast_kw(snap)


# --- the same home, the same kW ---------------------------------------------------------------
def test_the_same_home_gets_the_same_kw_from_fleet_view_optimiser_and_forecast() -> None:
    rows = [
        bat("full"),
        bat("forty"),
        bat("own_reserve"),
        thermo("cool"),
        thermo("small_offset", max_offset_c=1.0),
        thermo("comfort_cap", comfort_max_c=25.0),
        thermo("heat", region="PJM-DOM", comfort_min_c=None),  # no comfort limit: no limit
        thermo("off"),
    ]
    states = {
        "full": rec(soc_pct=100, power_w=0),
        "forty": rec(soc_pct=40, power_w=0),
        "own_reserve": rec(soc_pct=35, backup_reserve_pct=30, power_w=0),
        "cool": rec(**COOL),
        "small_offset": rec(**COOL),
        "comfort_cap": rec(**COOL),
        "heat": rec(indoor_c=21, setpoint_c=21, outdoor_c=0, mode=physics.MODE_HEAT),
        "off": rec(**{**COOL, "mode": physics.MODE_OFF}),
    }
    snap = snapshot(rows, states)
    fleet, optimiser, forecast = three_ways(snap)
    by_hand = [5.0, 2.5623, 0.640575, SHED_COOL_1H, SHED_1C_1H, SHED_1C_1H, SHED_HEAT_1H, 0.0]
    assert fleet == pytest.approx(by_hand, abs=1e-6)
    assert optimiser == pytest.approx(fleet, abs=1e-9)
    assert forecast == pytest.approx(fleet, abs=1e-9)


def test_the_optimiser_commands_the_offset_the_fleet_view_values() -> None:
    rows = [
        thermo("cool"),
        thermo("small_offset", max_offset_c=1.0),
        thermo("no_max", max_offset_c=None),
    ]
    snap = snapshot(rows, {d: rec(**COOL) for d in ("cool", "small_offset", "no_max")})
    horizon = Horizon(start_ms=NOW, interval_s=900, n_intervals=8)
    cl = build_clusters(
        snap, DeviceUsage.empty(3), horizon, PARAMS, [Demand("d", "ERCOT-NORTH", NOW, NOW + H, 1.0)]
    )
    commanded = dict(zip(cl.device_index.tolist(), cl.row_offset_c.tolist(), strict=True))
    assert commanded == pytest.approx({0: 1.7, 1: 1.0, 2: 1.7})
    assert fx.thermostat_inputs(snap).offset_c.tolist() == pytest.approx([1.7, 1.0, 1.7])


# --- defaults for missing readings --------------------------------------------------------------
def test_battery_defaults_for_what_it_has_not_reported() -> None:
    rows = [
        bat("no_soc"),
        bat("no_reserve_anywhere", backup_reserve_pct=None),
        bat("no_ratings", capacity_wh=None, max_discharge_w=None),
    ]
    states = {
        "no_soc": rec(power_w=0),  # reports, but no state of charge: worth nothing
        "no_reserve_anywhere": rec(soc_pct=40, power_w=0),  # the 20 % floor
        "no_ratings": rec(soc_pct=100, power_w=0),  # 13.5 kWh, 5 kW
    }
    snap = snapshot(rows, states)
    inp = fx.battery_inputs(snap)
    assert inp.soc_pct.tolist() == [0.0, 40.0, 100.0]
    assert inp.reserve_pct.tolist() == [20.0, 20.0, 20.0]
    assert inp.capacity_wh[2] == 13_500.0 and inp.max_discharge_w[2] == 5_000.0
    for kw in three_ways(snap):
        assert kw == pytest.approx([0.0, 2.5623, 5.0], abs=1e-6)


def test_thermostat_defaults_for_what_it_has_not_reported() -> None:
    rows = [
        thermo("no_indoor"),
        thermo("no_max_offset", max_offset_c=None),
        thermo("no_comfort_limit", comfort_max_c=None),
        thermo("no_hvac_rating", hvac_rated_w=None),
        thermo("no_setpoint"),
        thermo("no_mode"),
        thermo("no_room", comfort_max_c=24.2),  # 0.2 °C of room: below 0.25, not asked
    ]
    no_indoor = {k: v for k, v in COOL.items() if k != "indoor_c"}
    states = {
        "no_indoor": rec(**no_indoor),
        "no_max_offset": rec(**COOL),
        "no_comfort_limit": rec(**COOL),
        "no_hvac_rating": rec(**COOL),
        "no_setpoint": rec(indoor_c=24, outdoor_c=35, mode=physics.MODE_COOL),
        "no_mode": rec(indoor_c=24, setpoint_c=24, outdoor_c=35),
        "no_room": rec(**COOL),
    }
    snap = snapshot(rows, states)
    inp = fx.thermostat_inputs(snap)
    assert inp.indoor_c[0] == 24.0  # the setpoint
    assert inp.rated_kw[3] == pytest.approx(5.6)
    assert inp.usable.tolist() == [True, True, True, True, False, False, True]
    assert inp.offset_c.tolist() == pytest.approx([1.7, 1.7, 1.7, 1.7, 0.0, 0.0, 0.0])
    expected = [SHED_COOL_1H] * 4 + [0.0, 0.0, 0.0]
    for kw in three_ways(snap):
        assert kw == pytest.approx(expected, abs=1e-6)


def test_outdoor_temperature_own_reading_else_region_median_else_default() -> None:
    st = {"indoor_c": 24, "setpoint_c": 24, "mode": physics.MODE_COOL}
    rows = [
        thermo("a"),
        thermo("b"),
        thermo("c"),
        thermo("blind"),
        thermo("alone", region="PJM-DOM"),
    ]
    states = {
        "a": rec(**st, outdoor_c=30),
        "b": rec(**st, outdoor_c=35),
        "c": rec(**st, outdoor_c=40),
        "blind": rec(**st),
        "alone": rec(**st),  # no reading in its region at all
    }
    snap = snapshot(rows, states)
    assert fx.outdoor_temperatures(snap).tolist() == [30.0, 35.0, 40.0, 35.0, fx.DEFAULT_OUTDOOR_C]
    # The median is the region's, whichever devices are valued: the optimiser planning without
    # the homes that report values the blind one as the fleet view does.
    assert fx.outdoor_temperatures(snap, [3]).tolist() == [35.0]
    exclude = np.array([True, True, True, False, False])
    fleet, optimiser = fleet_kw(snap), optimiser_kw(snap, exclude=exclude)
    assert fleet[3] == pytest.approx(SHED_COOL_1H, abs=1e-6)
    assert optimiser[3] == pytest.approx(fleet[3], abs=1e-9)
    assert optimiser[4] == pytest.approx(fleet[4], abs=1e-9)
    # GET /v1/devices/{id} values a one-device snapshot with its region's median from the fleet.
    one = snap.take(np.array([3]))
    assert fx.outdoor_temperatures(one).tolist() == [fx.DEFAULT_OUTDOOR_C]
    assert fx.outdoor_temperatures(one, reference=snap).tolist() == [35.0]


def test_history_readings_replace_the_snapshots() -> None:
    """The forecast's back-test truth (``realised_window_mw``) values a past window's readings
    with the same defaults."""
    snap = snapshot([bat("b"), thermo("t")], {"b": rec(soc_pct=100), "t": rec(**COOL)})
    b = fx.battery_inputs(snap, [0], soc_pct=np.array([40.0]))
    assert b.deliverable_kw(1.0)[0] == pytest.approx(2.5623, abs=1e-6)
    assert fx.battery_inputs(snap, [0], soc_pct=np.array([np.nan])).soc_pct[0] == 0.0
    t = fx.thermostat_inputs(snap, [1], setpoint_c=np.array([27.0]))
    assert t.setpoint_c[0] == 27.0 and t.offset_c[0] == pytest.approx(1.0)  # comfort max 28
    assert snap.kind_codes.tolist() == [BATTERY, THERMOSTAT]
