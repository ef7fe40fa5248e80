"""Device physics against hand-computed cases (every expected figure is worked out in a comment)."""

from __future__ import annotations

import numpy as np
import pytest

from vpp import physics

# --- Battery -------------------------------------------------------------------------------------


def test_battery_energy_limited_over_two_hours() -> None:
    # 13.5 kWh at 80 %, reserve 20 %: 0.6 × 13.5 = 8.1 kWh above reserve; × 0.949 = 7.6869 kWh
    # at the meter; over 2 h that is 3.843 kW, below the 5 kW rating.
    kw = physics.battery_deliverable_kw(80.0, 13_500.0, 5_000.0, 20.0, 2.0)
    assert kw == pytest.approx(8.1 * 0.949 / 2.0)
    assert kw == pytest.approx(3.8435, abs=1e-4)


def test_battery_power_limited_over_one_hour() -> None:
    # Same battery over 1 h: 7.69 kW of energy but only 5 kW of inverter.
    assert physics.battery_deliverable_kw(80.0, 13_500.0, 5_000.0, 20.0, 1.0) == pytest.approx(5.0)


def test_battery_reserve_never_below_twenty_percent() -> None:
    # A customer reserve of 10 % is raised to the 20 % floor; one of 30 % is kept.
    kw = physics.battery_deliverable_kw(
        np.array([50.0, 50.0, 15.0]), 10_000.0, 5_000.0, np.array([10.0, 30.0, 0.0]), 2.0
    )
    # (50−20) % of 10 kWh = 3 kWh × 0.949 / 2 h = 1.4235 kW; (50−30) % → 0.949 kW; below floor → 0.
    np.testing.assert_allclose(kw, [1.4235, 0.949, 0.0], atol=1e-9)


def test_battery_step_discharge_loses_efficiency_and_stops_at_reserve() -> None:
    # 10 kWh at 50 %, 2 kW for 1 h: the cells give 2 / 0.949 = 2.1075 kWh → 28.925 %.
    soc, p = physics.battery_step(50.0, 2_000.0, 10_000.0, 5_000.0, 5_000.0, 20.0, 3600.0)
    assert p == pytest.approx(2_000.0)
    assert soc == pytest.approx(50.0 - 2.0 / 0.949 / 10.0 * 100.0)
    # Asking 5 kW for 1 h from 25 %: only 0.5 kWh above reserve, × 0.949 = 474.5 W for the hour.
    soc, p = physics.battery_step(25.0, 5_000.0, 10_000.0, 5_000.0, 5_000.0, 20.0, 3600.0)
    assert p == pytest.approx(474.5)
    assert soc == pytest.approx(20.0)


def test_battery_soc_projection_charges_from_solar_then_covers_load() -> None:
    # 10 kWh at 50 %. Hour 1: 3 kW of PV, 1 kW of load → 2 kW surplus × 0.949 = 1.898 kWh →
    # 68.98 %. Hour 2: no PV, 1 kW of load → 1 / 0.949 = 1.0537 kWh out → 58.443 %.
    soc = physics.battery_soc_projection(
        50.0,
        10_000.0,
        5_000.0,
        5_000.0,
        20.0,
        pv_w=np.array([3_000.0, 0.0]),
        load_w=np.array([1_000.0, 1_000.0]),
        dt_s=3600.0,
    )
    assert soc.shape == (2,)
    assert soc[0] == pytest.approx(68.98)
    assert soc[1] == pytest.approx(68.98 - 100.0 / 0.949 / 10.0, abs=1e-9)


def test_battery_soc_projection_vectorised_and_bounded() -> None:
    # Three batteries, 4 hours of 6 kW PV and no load: charge is capped at 5 kW × 0.949 per hour
    # and at 100 %; then the window's deliverable power follows from the projected state.
    soc0 = np.array([20.0, 50.0, 90.0])
    pv = np.full((4, 1), 6_000.0)
    soc = physics.battery_soc_projection(soc0, 13_500.0, 5_000.0, 5_000.0, 20.0, pv, 0.0, 3600.0)
    assert soc.shape == (4, 3)
    # First hour from 20 %: +4.745 kWh = +35.148 % → 55.148 %.
    assert soc[0, 0] == pytest.approx(20.0 + 4.745 / 13.5 * 100.0)
    assert soc[-1, 1] == pytest.approx(100.0)
    assert soc[0, 2] == pytest.approx(100.0)
    # Full battery, 2 h window: 80 % × 13.5 kWh × 0.949 / 2 h = 5.1246 kW → capped at 5 kW.
    assert physics.battery_deliverable_kw(soc[-1], 13_500.0, 5_000.0, 20.0, 2.0)[2] == 5.0


# --- Thermostat ----------------------------------------------------------------------------------


def test_worked_example_35c_plus_2c() -> None:
    # Domain brief: 35 °C outside, +2 °C offset. T_eq = 35 + R·Q = 36 °C; at a 24 °C setpoint the
    # gap is 12 °C → hold power 12 / (R·COP) = 2.4 kW; after the offset 10 °C → 2.0 kW.
    # Off time = RC·ln(12/10) = 4 h × 0.18232 = 0.7293 h ("about 0.7 h").
    # Shed over 2 h = (2.4 × 0.7293 + 0.4 × 1.2707) / 2 = 1.129 kW ("about 1.1 kW");
    # over 4 h = (2.4 × 0.7293 + 0.4 × 3.2707) / 4 = 0.765 kW ("0.8 kW");
    # recovery = C · offset / COP = 2 × 2 / 2.5 = 1.6 kWh.
    shed2, off2, rec2 = physics.thermostat_shed(24.0, 24.0, 35.0, 2.0, 2.0, 5.6)
    shed4, _, rec4 = physics.thermostat_shed(24.0, 24.0, 35.0, 2.0, 4.0, 5.6)
    assert off2 == pytest.approx(4.0 * np.log(1.2), abs=1e-9)
    assert off2 == pytest.approx(0.7, abs=0.05)
    assert shed2 == pytest.approx(1.129, abs=1e-3)
    assert shed4 == pytest.approx(0.765, abs=1e-3)
    assert shed4 < shed2  # shed falls as the event gets longer
    assert rec2 == pytest.approx(1.6)
    assert rec4 == pytest.approx(1.6)
    assert physics.thermostat_off_hours(24.0, 35.0, 2.0) == pytest.approx(off2)
    assert physics.thermostat_hold_kw(24.0, 35.0, 5.6) == pytest.approx(2.4)


def test_thermostat_flat_shed_staggers_cohorts() -> None:
    # The worked example: b = 2.4 kW off, d = 0.4 kW once drifted, T = 0.7293 h. A fleet held
    # flat starts F/b homes and enlists a new cohort as each one fades; over m = H/T lifetimes
    # that costs F/b · (1 − q^m)/(1 − q) homes with q = 1 − d/b, so F per home = d / (1 − q^m).
    b, d, t_off = 2.4, 0.4, 4.0 * np.log(1.2)
    q = 1 - d / b
    flat2 = physics.thermostat_flat_shed(24.0, 35.0, 2.0, 2.0, 5.6)
    assert flat2 == pytest.approx(d / (1 - q ** (2.0 / t_off)), rel=1e-6)
    avg2, _, _ = physics.thermostat_shed(24.0, 24.0, 35.0, 2.0, 2.0, 5.6)
    assert d < flat2 < avg2  # below the average: the end of the window is what binds
    # A window shorter than the drift: nothing fades, flat = average = b.
    short = physics.thermostat_flat_shed(24.0, 35.0, 2.0, 0.5, 5.6)
    assert short == pytest.approx(2.4)
    # Longer windows fall towards the steady shed, never below it.
    hours = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 24.0])
    flat = physics.thermostat_flat_shed(24.0, 35.0, 2.0, hours, 5.6)
    assert (np.diff(flat) <= 1e-12).all() and (flat >= d - 1e-9).all()
    assert flat[-1] == pytest.approx(d, rel=0.01)
    # Nothing to shed on a cool day.
    assert physics.thermostat_flat_shed(24.0, 20.0, 2.0, 2.0, 5.6) == 0.0


def test_thermostat_comfort_limit_cuts_the_offset() -> None:
    # Comfort max 25 °C at a 24 °C setpoint: only +1 °C. Gap 12 → 11, off = 4·ln(12/11) = 0.348 h;
    # shed over 2 h = (2.4 × 0.348 + 0.2 × 1.652) / 2 = 0.5828 kW; recovery 2 × 1 / 2.5 = 0.8 kWh.
    shed, off, rec = physics.thermostat_shed(24.0, 24.0, 35.0, 2.0, 2.0, 5.6, comfort_limit_c=25.0)
    assert off == pytest.approx(4.0 * np.log(12 / 11))
    assert shed == pytest.approx((2.4 * off + 0.2 * (2.0 - off)) / 2.0)
    assert rec == pytest.approx(0.8)


def test_thermostat_short_event_stays_off_and_recovers_less() -> None:
    # 0.5 h event, shorter than the 0.73 h off time: the whole 2.4 kW is shed; the home drifts
    # 12 − 12·e^(−0.5/4) = 1.4099 °C, so recovery = 2 × 1.4099 / 2.5 = 1.128 kWh.
    shed, off, rec = physics.thermostat_shed(24.0, 24.0, 35.0, 2.0, 0.5, 5.6)
    assert off == pytest.approx(0.5)
    assert shed == pytest.approx(2.4)
    assert rec == pytest.approx(2.0 * (12.0 - 12.0 * np.exp(-0.5 / 4.0)) / 2.5)


def test_thermostat_cool_night_has_nothing_to_shed() -> None:
    # 20 °C outside: T_eq = 21 °C < 24 °C setpoint, the unit is idle; nothing to shed.
    shed, off, rec = physics.thermostat_shed(24.0, 24.0, 20.0, 2.0, 2.0, 5.6)
    assert (shed, off, rec) == (0.0, 0.0, 0.0)


def test_thermostat_vectorised_over_devices() -> None:
    out = np.array([35.0, 30.0, 20.0])
    shed, off, _ = physics.thermostat_shed(24.0, 24.0, out, 2.0, 2.0, 5.6)
    assert shed.shape == (3,)
    # 30 °C: gap 7 → 1.4 kW hold, 1.0 kW after; off = 4·ln(7/5) = 1.3459 h;
    # shed = (1.4 × 1.3459 + 0.4 × 0.6541) / 2 = 1.0730 kW.
    assert off[1] == pytest.approx(4.0 * np.log(1.4))
    assert shed[1] == pytest.approx((1.4 * off[1] + 0.4 * (2.0 - off[1])) / 2.0)
    assert shed[0] > shed[1] > shed[2] == 0.0


# --- Solar ---------------------------------------------------------------------------------------


def test_solar_matches_pvlib_pvwatts() -> None:
    import pvlib

    ghi = np.array([0.0, 200.0, 800.0, 1000.0])
    air = np.array([10.0, 20.0, 30.0, 35.0])
    cell = air + ghi * 25.0 / 800.0
    expected = pvlib.pvsystem.pvwatts_dc(ghi, cell, 6_000.0, -0.004) * 0.86
    np.testing.assert_allclose(physics.solar_power_w(ghi, 6_000.0, air), expected, rtol=1e-12)
    # By hand: 1000 W/m² at 25 °C air → cell 56.25 °C → 6 kW × (1 − 0.004 × 31.25) × 0.86 = 4515 W.
    assert physics.solar_power_w(1000.0, 6_000.0, 25.0) == pytest.approx(4515.0)
