"""The pure forecaster: hand-computed aggregates, shocks, firmness, calibration."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from sim.synthetic import make_fleet
from tests.helpers.fleets import fleet_of
from vpp import physics
from vpp.fleet.snapshot import BATTERY, FleetSnapshot
from vpp.forecast import model as m

NOW = 1_783_000_800_000  # a summer afternoon, on the 15-minute grid
H = m.HOUR_MS
NO_SHOCKS = m.ShockParams(
    temp_sigma_c=0.0, vendor_outage_p=0.0, optout_wave_sigma=0.0, solar_sigma=0.0
)


def flat_weather(temp_c: float, ghi: float = 0.0, hours: int = 60) -> m.WeatherForecast:
    n = hours * 4 + 2
    return m.WeatherForecast(NOW, 900, np.full(n, ghi), np.full(n, temp_c), -5.0)


def certain(n: int) -> m.RegionCalibration:
    """Every device online and nobody opts out, no shocks: the forecast is pure physics."""
    return m.RegionCalibration(
        calibrated=True, online_rate=np.ones(n), optout_rate=np.zeros(n), shocks=NO_SHOCKS
    )


def run(
    snap: FleetSnapshot,
    calib: m.RegionCalibration,
    start: int,
    end: int,
    weather: m.WeatherForecast | None = None,
    **kw: Any,
) -> m.ForecastResult:
    rows = np.arange(len(snap))
    dev = m.region_devices(snap, rows, calib)
    return m.forecast_region(
        "ERCOT-NORTH", dev, weather or flat_weather(35.0), NOW, start, end, 900, calib, **kw
    )


def test_quantile_for_firmness() -> None:
    assert m.quantile_for_firmness(0.9) == pytest.approx(0.1)
    assert m.quantile_for_firmness(0.5) == pytest.approx(0.5)
    assert m.quantile_for_firmness(0.99) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        m.quantile_for_firmness(0.999)


def test_batteries_sum_to_hand_computed_mw() -> None:
    # 1000 × 13.5 kWh at 80 %, reserve 20 %, 5 kW, over a 2 h window starting now:
    # 8.1 kWh × 0.949 / 2 h = 3.8435 kW each → 3.8435 MW, certain.
    snap = fleet_of(
        "b" * 1000,
        now_ms=NOW,
        age_s=0.0,
        capacity_wh=13_500.0,
        max_discharge_w=5_000.0,
        max_charge_w=5_000.0,
        backup_reserve_pct=20.0,
        soc_pct=80.0,
    )
    res = run(snap, certain(1000), NOW, NOW + 2 * H)
    assert res.starts_ms.size == 8
    np.testing.assert_allclose(res.p50_mw, 3.8435, atol=5e-3)
    np.testing.assert_allclose(res.p90_mw, 3.8435, atol=5e-3)
    assert res.calibrated and res.n_devices == 1000


def test_online_rate_and_optout_scale_the_mw() -> None:
    # Online 80 %, opt-out 10 % at 2 h: 3.8435 MW × 0.8 × 0.9 = 2.7673 MW expected.
    snap = fleet_of(
        "b" * 1000,
        now_ms=NOW,
        age_s=0.0,
        capacity_wh=13_500.0,
        max_discharge_w=5_000.0,
        max_charge_w=5_000.0,
        backup_reserve_pct=20.0,
        soc_pct=80.0,
    )
    # Present state forgotten at once (persistence ~0): the long-run rates alone apply.
    calib = replace(
        certain(1000),
        online_rate=np.full(1000, 0.8),
        optout_rate=np.full(1000, 0.1),
        shocks=replace(NO_SHOCKS, persistence_h=1e-6),
    )
    res = run(snap, calib, NOW + H, NOW + 3 * H, weather=flat_weather(30.0, ghi=0.0))
    # No PV in these homes: batteries are held in backup mode until the window.
    assert res.expected_mw.mean() == pytest.approx(3.8435 * 0.8 * 0.9, rel=0.02)
    # Binomial noise only: the P90 sits a little below the P50.
    assert (res.p90_mw < res.p50_mw).all()
    assert (res.p50_mw - res.p90_mw).max() < 0.05 * res.p50_mw.max()


def test_thermostats_match_the_rc_model_and_fall_with_event_length() -> None:
    # 1000 homes at 24 °C, comfort 26 °C, max offset 2 °C → the default +1.7 °C offset;
    # 35 °C outside all day.
    snap = fleet_of(
        "t" * 1000,
        now_ms=NOW,
        age_s=0.0,
        setpoint_c=24.0,
        indoor_c=24.0,
        hvac_rated_w=5_600.0,
        comfort_max_c=26.0,
        comfort_min_c=18.0,
        max_offset_c=2.0,
    )
    two = run(snap, certain(1000), NOW + H, NOW + 3 * H)
    four = run(snap, certain(1000), NOW + H, NOW + 5 * H)
    # Firm capacity is flat: the forecast quotes the staggered-start flat shed, not the average.
    shed2 = physics.thermostat_flat_shed(24.0, 35.0, 1.7, 2.0, 5.6)
    shed4 = physics.thermostat_flat_shed(24.0, 35.0, 1.7, 4.0, 5.6)
    np.testing.assert_allclose(two.p50_mw, float(shed2), rtol=0.01)
    np.testing.assert_allclose(four.p50_mw, float(shed4), rtol=0.01)
    assert four.p50_mw.mean() < two.p50_mw.mean()


def test_temperature_error_spreads_thermostat_forecast() -> None:
    snap = fleet_of(
        "t" * 1000,
        now_ms=NOW,
        age_s=0.0,
        setpoint_c=24.0,
        hvac_rated_w=5_600.0,
        comfort_max_c=27.0,
        max_offset_c=2.0,
    )
    calib = replace(certain(1000), shocks=replace(NO_SHOCKS, temp_sigma_c=2.0))
    res = run(snap, calib, NOW + 20 * H, NOW + 22 * H, weather=flat_weather(29.0))
    assert (res.p90_mw < 0.97 * res.p50_mw).all()


def test_vendor_outage_and_opt_out_wave_lower_p90() -> None:
    snap = fleet_of(
        "b" * 2000,
        now_ms=NOW,
        age_s=0.0,
        capacity_wh=13_500.0,
        max_discharge_w=5_000.0,
        max_charge_w=5_000.0,
        backup_reserve_pct=20.0,
        soc_pct=90.0,
    )
    calm = run(snap, certain(2000), NOW, NOW + 2 * H)
    stormy_calib = replace(
        certain(2000),
        optout_rate=np.full(2000, 0.05),
        shocks=replace(NO_SHOCKS, vendor_outage_p=0.15, optout_wave_sigma=0.8),
    )
    stormy = run(snap, stormy_calib, NOW, NOW + 2 * H)
    assert stormy.p90_mw.mean() < 0.9 * calm.p90_mw.mean()


def test_firmness_quantile_is_between() -> None:
    fleet = make_fleet(3000, ["ERCOT-NORTH"], now_ms=NOW, seed=3)
    calib = m.RegionCalibration()
    res = run(fleet.snap, calib, NOW + 20 * H, NOW + 23 * H, firmness=0.97)
    p70 = run(fleet.snap, calib, NOW + 20 * H, NOW + 23 * H, firmness=0.7)
    assert (res.firm_mw <= res.p90_mw + 1e-9).all()
    assert (p70.firm_mw >= p70.p90_mw - 1e-9).all()
    assert (p70.firm_mw <= p70.p50_mw + 1e-9).all()
    assert not res.calibrated  # no history: the brief's defaults


def test_a_fifth_of_batteries_offline_moves_next_hour() -> None:
    fleet = make_fleet(5000, ["ERCOT-NORTH"], now_ms=NOW, seed=4, kind_mix=(1.0, 0.0, 0.0))
    snap = fleet.snap
    before = run(snap, m.RegionCalibration(), NOW, NOW + 48 * H)
    off = snap.online.copy()
    off[np.arange(len(snap)) % 5 == 0] = False
    after = run(replace(snap, online=off), m.RegionCalibration(), NOW, NOW + 48 * H)
    first_hour = slice(0, 4)
    assert after.p90_mw[first_hour].mean() < 0.85 * before.p90_mw[first_hour].mean()
    # A day later the present outage says little: long-run rates dominate.
    later = slice(96, 100)
    assert after.p90_mw[later].mean() > 0.97 * before.p90_mw[later].mean()


def test_region_without_devices_is_zero() -> None:
    snap = fleet_of("b" * 10, now_ms=NOW, age_s=0.0, soc_pct=50.0)
    dev = m.region_devices(snap, np.zeros(0, np.int64), m.RegionCalibration())
    res = m.forecast_region(
        "X", dev, flat_weather(30.0), NOW, NOW, NOW + 4 * H, 900, m.RegionCalibration()
    )
    assert res.starts_ms.size == 16
    assert (res.p50_mw == 0).all() and (res.p90_mw == 0).all() and res.n_devices == 0


def test_shrunk_rates_stay_near_the_prior_with_little_history() -> None:
    # 1 of 2 intervals seen, prior 0.9 worth 10: (1 + 9) / (2 + 10) = 0.8333.
    assert m.shrunk_rate(np.array([1.0]), np.array([2.0]), 0.9, 10.0)[0] == pytest.approx(10 / 12)
    rates = m.estimate_optout_rates(np.array([0.0, 5.0, 0.0]), np.array([0.0, 10.0, 2.0]), 0.1)
    assert np.isnan(rates[0])  # no commands → default later
    assert rates[1] == pytest.approx((5 + 1) / 20)
    assert rates[2] == pytest.approx(1 / 12)
    # Region 0: 100 and 50 of 100 intervals (pooled 0.75); region 1: no expected intervals.
    online, pooled = m.estimate_online_rates(
        np.array([100.0, 50.0, 0.0]),
        np.array([100.0, 100.0, 0.0]),
        [0, 0, 1],
        prior_intervals=100.0,
    )
    np.testing.assert_allclose(pooled, [0.75, m.DEFAULT_ONLINE_RATE])
    # (100 + 75) / 200 = 0.875; (50 + 75) / 200 = 0.625.
    np.testing.assert_allclose(online[:2], [0.875, 0.625])
    assert np.isnan(online[2])


def test_quantile_map_learns_from_pits() -> None:
    rng = np.random.default_rng(0)
    uniform = m.QuantileMap(rng.random(20_000), guard=0.0)
    assert float(uniform.level(0.1)) == pytest.approx(0.1, abs=0.01)
    # Realised values fell below the forecast's 10th percentile 20 % of the time: the map asks
    # for a lower level so the P90 holds again.
    over = m.QuantileMap(
        np.concatenate([rng.random(4000) * 0.1, 0.1 + rng.random(16_000) * 0.9]), guard=0.0
    )
    assert float(over.level(0.1)) < 0.06
    assert float(m.QuantileMap().level(0.1)) == pytest.approx(0.09)  # guard only


def test_the_promise_moves_with_evenings_of_evidence_not_with_intervals() -> None:
    # One evening in five the realised MW fell below the forecast's 10th percentile (all its
    # intervals together: they share the evening's weather), seen over 5 evenings or 30, at 12
    # or 48 intervals an evening.
    def evenings(days: int, per_day: int) -> np.ndarray:
        u = np.random.default_rng(days * per_day).random((days, per_day))
        below = (np.arange(days) % 5 == 0)[:, None]
        return np.where(below, 0.01 + 0.02 * u, 0.3 + 0.7 * u)

    aim = float(m.QuantileMap().level(0.1))
    moved = {
        (d, k): aim - float(m.fit_quantile_map(evenings(d, k)).level(0.1))
        for d in (5, 30)
        for k in (12, 48)
    }
    # A month of such evenings lowers the P90's level most of the way toward the shortfalls'
    # PITs (≈ 0.03); five evenings, whose one shortfall may be luck, move it less than half as
    # far: the promise does not swing on a handful of evenings.
    assert moved[(30, 12)] > 0.04
    assert 0 < moved[(5, 12)] < 0.5 * moved[(30, 12)]
    # More intervals per evening are not more evenings.
    for d in (5, 30):
        assert moved[(d, 48)] == pytest.approx(moved[(d, 12)], abs=0.005)


def test_pit() -> None:
    scen = np.arange(100, dtype=float)[:, None] * np.ones((1, 2))
    np.testing.assert_allclose(m.pit(scen, np.array([9.5, 200.0])), [0.1, 1.0])


def test_a_battery_reports_how_it_runs_its_home() -> None:
    power = np.array([900.0, -2500.0, 0.0, 0.0, 0.0, np.nan, 20.0])
    soc = np.array([60.0, 50.0, 60.0, 21.0, 100.0, 60.0, 70.0])
    reserve = np.full(7, 20.0)
    assert m.home_use(power, soc, reserve).tolist() == [
        m.SERVING,  # discharging into the home
        m.SERVING,  # charging from its PV
        m.HELD,  # 0 W with charge to spare: backup mode
        m.UNKNOWN_USE,  # 0 W at its reserve: empty, or held there
        m.UNKNOWN_USE,  # 0 W when full: nothing to charge, or held
        m.UNKNOWN_USE,  # no report
        m.HELD,  # metering noise is standing still
    ]


def _battery_homes(power_w: float) -> FleetSnapshot:
    """Batteries at 60 %, each reporting ``power_w`` now, and 200 rooftop PV systems."""
    snap = make_fleet(2_000, ["ERCOT-NORTH"], seed=4, kind_mix=(0.5, 0.5, 0.0)).snap
    bat = snap.kind_codes == BATTERY
    st = snap.state.copy()
    st["soc_pct"] = np.where(bat, 60.0, np.nan)
    st["power_w"] = np.where(bat, power_w, np.nan)
    return replace(snap, state=st)


def test_a_held_battery_is_not_counted_on_to_charge_from_the_sun() -> None:
    # Tomorrow evening's window, after a sunny day or a dark one. Batteries seen serving their
    # homes fill up in the sun; batteries seen held in backup mode stay where they are, whatever
    # the registry's PV count suggests.
    start, end = NOW + 28 * H, NOW + 30 * H
    sunny, dark = flat_weather(30.0, ghi=700.0), flat_weather(30.0, ghi=0.0)

    def p50(snap: FleetSnapshot, weather: m.WeatherForecast) -> float:
        res = run(snap, certain(len(snap)), start, end, weather)
        return float(res.p50_mw.mean())

    serving, held = _battery_homes(800.0), _battery_homes(0.0)
    assert p50(serving, sunny) > 1.5 * p50(serving, dark)
    assert p50(held, sunny) == pytest.approx(p50(held, dark), rel=1e-6)


def test_a_noisy_temperature_forecast_is_read_toward_the_climate() -> None:
    rng = np.random.default_rng(8)
    clim = 30.0 + rng.normal(0.0, 0.5, 60)
    truth = clim + rng.normal(0.0, 2.0, 60)  # the day's own departure from the climate
    prior = m.ShockParams()
    # A forecast that sees the truth through 2 °C of noise is worth about half of its departure.
    noisy = truth + rng.normal(0.0, 2.0, 60) + 1.0  # and runs 1 °C warm
    bias, skill, sigma, _ = m.estimate_temp_mos(noisy, truth, clim, prior)
    assert 0.3 < skill < 0.7
    read = clim + skill * (noisy - clim) + bias
    assert abs(float(np.mean(read - truth))) < 0.2  # its warm 1 °C is taken out
    raw = float(np.sqrt(np.mean((noisy - truth) ** 2)))
    assert sigma < 0.85 * raw
    # A perfect forecast keeps its full skill, no bias, and little error.
    bias, skill, sigma, _ = m.estimate_temp_mos(truth, truth, clim, prior)
    assert skill == pytest.approx(1.0, abs=0.02)
    assert abs(bias) < 0.05
    assert sigma < prior.temp_sigma_c
    # Read through it, the forecast's expected temperature moves toward the climate.
    wf = m.WeatherForecast(NOW, 900, np.zeros(4), np.full(4, 36.0), -5.0, np.full(4, 30.0))
    assert wf.read(replace(prior, temp_skill=0.5)).temp_c == pytest.approx(np.full(4, 33.0))


def test_the_temperature_devices_report_now_carries_into_the_next_hours() -> None:
    # The typical year says 30 °C (its climate) all day; devices report 34 °C now: a hot spell
    # the file cannot know. Half of a departure is still there a day later.
    hot_now = m.WeatherForecast(
        NOW, 900, np.zeros(97), np.full(97, 30.0), -6.0, np.full(97, 30.0), 4.0
    )
    read = hot_now.read(replace(m.ShockParams(), temp_skill=0.0, temp_persistence=0.5)).temp_c
    assert read[0] == pytest.approx(34.0)  # now: what devices report
    assert read[48] == pytest.approx(30.0 + 4.0 * 0.5**0.5)  # 12 h on
    assert read[96] == pytest.approx(32.0)  # a day on: half of it
    assert np.all(np.diff(read) < 0)
    # Not learnt (or nobody reports): the reading stays with the forecast.
    assert hot_now.read(m.ShockParams()).temp_c == pytest.approx(np.full(97, 30.0))


def test_how_long_a_departure_lasts_is_learnt_from_past_evenings() -> None:
    rng = np.random.default_rng(5)
    days = 80
    clim = np.full(days, 30.0)
    now = rng.normal(0.0, 2.0, days)  # the departure reported when each forecast was made
    truth = clim + 0.6 * now + rng.normal(0.0, 1.0, days)  # 60 % of it left a day later
    blind = clim + rng.normal(0.0, 2.0, days)  # a forecast that knows nothing of the weather
    bias, skill, sigma, persistence = m.estimate_temp_mos(
        blind, truth, clim, m.ShockParams(), now, lead_h=24.0
    )
    assert 0.45 < persistence < 0.7
    assert skill < 0.3
    assert abs(bias) < 0.4
    # What is left is the day's own noise, not the departure: well under the raw 2 °C spread.
    assert sigma < 1.3
    # The same carry-over seen over half a day is a departure that fades faster.
    _, _, _, per_day = m.estimate_temp_mos(blind, truth, clim, m.ShockParams(), now, lead_h=12.0)
    assert per_day < persistence
