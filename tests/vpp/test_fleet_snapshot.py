"""The fleet snapshot, pure: freshness, available kW per device and the per-region sums,
against figures worked out by hand from the domain brief."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from vpp.domain import FreshnessCode
from vpp.fleet.records import empty_state, pack_state
from vpp.fleet.registry import assemble, build_registry
from vpp.fleet.snapshot import FleetSnapshot, compute_freshness, summarise
from vpp.flexibility import available_kw

NOW = 1_784_061_000_000
INTERVAL_S = 300.0
OFFLINE_S = 900.0

# Thermostat by hand (R 2 °C/kW, C 2 kWh/°C, COP 2.5, internal gain 0.5 kW, default offset 1.7):
# 35 °C outside, home held at 24 °C: T_eq = 36, baseline (36 − 24) / (2 × 2.5) = 2.4 kW; with the
# setpoint at 25.7 the unit needs 10.3 / 5 = 2.06 kW, after staying off 4 h × ln(12 / 10.3).
T_OFF_COOL = 4 * math.log(12 / 10.3)  # 0.61105 h
SHED_COOL_1H = 2.4 * T_OFF_COOL + (2.4 - 2.06) * (1 - T_OFF_COOL)  # 1.59877 kW
# Offset cut to 1 °C (max_offset_c or the comfort limit): off 4 h × ln(12 / 11).
T_OFF_1C = 4 * math.log(12 / 11)
SHED_1C_1H = 2.4 * T_OFF_1C + (2.4 - 2.2) * (1 - T_OFF_1C)  # 0.96570 kW
# Heating at 0 °C outside, 21 °C inside: T_eq = 1, baseline 20 / 5 = 4 kW, new 18.3 / 5 = 3.66.
T_OFF_HEAT = 4 * math.log(20 / 18.3)
SHED_HEAT_1H = 4.0 * T_OFF_HEAT + 0.34 * (1 - T_OFF_HEAT)  # 1.64049 kW


def reg_row(
    device_id: str,
    kind: str,
    region: str = "ERCOT-NORTH",
    *,
    enrolled: bool = True,
    tenant: str = "acme",
    capacity_wh: float | None = None,
    max_discharge_w: float | None = None,
    backup_reserve_pct: float | None = None,
    rated_w: float | None = None,
    hvac_rated_w: float | None = None,
    comfort_max_c: float | None = None,
    comfort_min_c: float | None = None,
    max_offset_c: float | None = None,
) -> tuple[Any, ...]:
    # Column order of vpp.fleet.snapshot.REGISTRY_COLUMNS.
    return (
        device_id,
        tenant,
        region,
        kind,
        "oem",
        None,
        enrolled,
        capacity_wh,
        max_discharge_w,
        max_discharge_w,
        backup_reserve_pct,
        rated_w,
        hvac_rated_w,
        comfort_max_c,
        comfort_min_c,
        max_offset_c,
        None,
        None,
    )


def bat(device_id: str, **kw: Any) -> tuple[Any, ...]:
    values = {"capacity_wh": 13_500.0, "max_discharge_w": 5_000.0, "backup_reserve_pct": 20.0}
    return reg_row(device_id, "battery", **{**values, **kw})


def thermo(device_id: str, **kw: Any) -> tuple[Any, ...]:
    values = {
        "hvac_rated_w": 5_600.0,
        "comfort_max_c": 28.0,
        "comfort_min_c": 16.0,
        "max_offset_c": 2.0,
    }
    return reg_row(device_id, "thermostat", **{**values, **kw})


def rec(age_s: float = 60, **fields: float) -> bytes:
    r = empty_state()
    r["recv_ms"] = NOW - int(age_s * 1000)
    r["ts_ms"] = r["recv_ms"]
    for k, v in fields.items():
        r[k] = v
    return pack_state(r)


def snapshot(
    rows: list[tuple[Any, ...]],
    states: dict[str, bytes],
    statuses: dict[str, tuple[bool, int]] | None = None,
) -> FleetSnapshot:
    return assemble(build_registry(rows), states, statuses or {}, NOW, INTERVAL_S, OFFLINE_S)


# --- freshness ----------------------------------------------------------------------------------
def test_freshness_boundaries() -> None:
    ages_s = np.array([0, 600, 601, 900, 901, 60])
    recv = NOW - (ages_s * 1000).astype(np.int64)
    recv = np.append(recv, 0)  # never heard from
    online = np.array([True, True, True, True, True, False, True])
    got = compute_freshness(recv, online, NOW, INTERVAL_S, OFFLINE_S)
    f = FreshnessCode
    assert got.tolist() == [f.fresh, f.fresh, f.stale, f.stale, f.offline, f.offline, f.never]


# --- batteries ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("soc", "kw_row", "window_h", "expected_kw"),
    [
        (100, {}, 1.0, 5.0),  # 10.8 kWh × 0.949 = 10.25 kW: the 5 kW rating binds
        (40, {}, 1.0, 2.5623),  # 2.7 kWh × 0.949 = 2.5623 kW
        (100, {}, 2.0, 5.0),  # 5.1246 kW over 2 h: still the rating
        (100, {"max_discharge_w": 11_500.0}, 2.0, 5.1246),  # newer unit: energy binds
        (35, {"backup_reserve_pct": 30.0}, 1.0, 0.640575),  # 5 % × 13.5 kWh × 0.949
        (30, {"backup_reserve_pct": 10.0}, 1.0, 1.28115),  # reserve never below 20 %
        (15, {}, 1.0, 0.0),  # below the reserve
    ],
)
def test_battery_available_kw_by_hand(
    soc: float, kw_row: dict[str, float], window_h: float, expected_kw: float
) -> None:
    snap = snapshot([bat("b", **kw_row)], {"b": rec(soc_pct=soc)})
    assert available_kw(snap, window_h)[0] == pytest.approx(expected_kw, abs=1e-6)


def test_reserve_the_battery_reports_wins_over_the_registry() -> None:
    snap = snapshot([bat("b")], {"b": rec(soc_pct=35, backup_reserve_pct=30)})
    assert available_kw(snap)[0] == pytest.approx(0.640575, abs=1e-6)


def test_only_enrolled_online_fresh_devices_count() -> None:
    rows = [bat("fresh"), bat("stale"), bat("gone"), bat("optout", enrolled=False), bat("never")]
    states = {
        "fresh": rec(60, soc_pct=100),
        "stale": rec(700, soc_pct=100),
        "gone": rec(60, soc_pct=100),
        "optout": rec(60, soc_pct=100),
    }
    snap = snapshot(rows, states, {"gone": (False, NOW)})
    assert available_kw(snap).tolist() == [5.0, 0.0, 0.0, 0.0, 0.0]
    # What the hardware could do, whatever its freshness (never heard from: SOC unknown, 0).
    assert available_kw(snap, only_dispatchable=False).tolist() == [5.0, 5.0, 5.0, 5.0, 0.0]


# --- thermostats and solar ----------------------------------------------------------------------
def test_thermostat_shed_by_hand() -> None:
    rows = [
        thermo("cool"),
        thermo("small_offset", max_offset_c=1.0),
        thermo("comfort_cap", comfort_max_c=25.0),  # 24 → 25 °C leaves 1 °C of room
        thermo("off"),
        thermo("heat", comfort_min_c=None),  # no comfort limit on record: no limit
        thermo("warm_inside"),  # already at 26 °C: past the new setpoint, no off time
    ]
    cool = {"indoor_c": 24, "setpoint_c": 24, "outdoor_c": 35, "mode": 1}
    states = {
        "cool": rec(**cool),
        "small_offset": rec(**cool),
        "comfort_cap": rec(**cool),
        "off": rec(**{**cool, "mode": 0}),
        "heat": rec(indoor_c=21, setpoint_c=21, outdoor_c=0, mode=2),
        "warm_inside": rec(**{**cool, "indoor_c": 26}),
    }
    kw = available_kw(snapshot(rows, states))
    expected = [SHED_COOL_1H, SHED_1C_1H, SHED_1C_1H, 0.0, SHED_HEAT_1H, 0.34]
    assert kw == pytest.approx(expected, abs=1e-6)


def test_thermostat_without_outdoor_reading_uses_its_regions_median() -> None:
    rows = [thermo("a"), thermo("b"), thermo("c"), thermo("blind")]
    st = {"indoor_c": 24, "setpoint_c": 24, "mode": 1}
    states = {
        "a": rec(**st, outdoor_c=30),
        "b": rec(**st, outdoor_c=35),
        "c": rec(**st, outdoor_c=40),
        "blind": rec(**st),
    }
    kw = available_kw(snapshot(rows, states))
    assert kw[3] == pytest.approx(SHED_COOL_1H, abs=1e-6)  # median 35 °C


def test_solar_offers_nothing_upward() -> None:
    rows = [reg_row("pv", "solar", rated_w=7_600.0)]
    assert available_kw(snapshot(rows, {"pv": rec(power_w=5_000)})).tolist() == [0.0]


# --- sums ---------------------------------------------------------------------------------------
def test_summarise_per_region_and_kind() -> None:
    rows = [
        bat("n1"),
        bat("n2"),
        bat("n3"),
        bat("p1", region="PJM-DOM"),
        thermo("t1"),
        reg_row("pv", "solar", rated_w=7_600.0),
    ]
    states = {
        "n1": rec(soc_pct=100),
        "n2": rec(soc_pct=40),
        "n3": rec(700, soc_pct=100),  # stale
        "p1": rec(soc_pct=100),
        "t1": rec(indoor_c=24, setpoint_c=24, outdoor_c=35, mode=1),
    }
    snap = snapshot(rows, states)
    out = {(r["region"], r["kind"]): r for r in summarise(snap, available_kw(snap))}
    assert set(out) == {
        ("ERCOT-NORTH", "battery"),
        ("PJM-DOM", "battery"),
        ("ERCOT-NORTH", "thermostat"),
        ("ERCOT-NORTH", "solar"),
    }
    north = out[("ERCOT-NORTH", "battery")]
    assert (north["registered"], north["online"], north["fresh"]) == (3, 3, 2)
    assert north["available_mw"] == pytest.approx(0.0075623, abs=1e-6)
    assert out[("PJM-DOM", "battery")]["available_mw"] == pytest.approx(0.005)
    assert out[("ERCOT-NORTH", "thermostat")]["available_mw"] == pytest.approx(
        SHED_COOL_1H / 1000, abs=1e-6
    )
    solar = out[("ERCOT-NORTH", "solar")]
    assert (solar["registered"], solar["online"], solar["available_mw"]) == (1, 0, 0)
    sel = snap.mask(region="PJM-DOM")
    assert [r["registered"] for r in summarise(snap.take(sel), available_kw(snap)[sel])] == [1]
