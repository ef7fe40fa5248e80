"""The home load a battery fleet serves, learnt from what its batteries report, and what it does
to the forecast: a region whose homes draw more through the evening, and more unevenly, can
promise less above them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from sqlalchemy import insert

from dispatch.forecast_calibrator import ForecastCalibrator
from dispatch.forecast_service import ForecastService
from sim.synthetic import make_fleet
from store.database import Database
from store.models import Base, Command, TelemetryInterval
from store.state.memory import MemoryStateStore
from tests.helpers.fleets import FixedFleet
from vpp.clock import ManualClock
from vpp.fleet.snapshot import BATTERY
from vpp.forecast import model as m
from vpp.regions import RegionBook
from vpp.settings import Settings
from vpp.weather import weather_for_region

NOW = 1_783_000_800_000  # 2026-07-02 13:00 UTC
STEP = 900_000
DAY = 86_400_000
REGION = "ERCOT-NORTH"
SIGMA = 0.25  # the region's evening load swings, log-sd per 15-minute step


def truth(n_steps: int, n_homes: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray, float]:
    """(steps × homes) per-home scale × a regional noise, and the mean level it implies."""
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0.0, 0.3, n_homes)
    noise = rng.lognormal(-(SIGMA**2) / 2, SIGMA, n_steps)  # mean one
    return scale[None, :] * noise[:, None], scale, float(scale.mean())


def test_estimate_recovers_level_and_swing_though_big_users_run_down_first() -> None:
    n_steps, n_homes = 16 * 14, 400
    ratio, scale, level = truth(n_steps, n_homes)
    base = np.full(n_steps, 1200.0)
    observed = ratio * base[:, None]
    # The biggest users hit their reserve early each evening: they report only the first steps.
    big = scale > np.quantile(scale, 0.6)
    step_of_evening = np.arange(n_steps) % 16
    observed[np.ix_(step_of_evening >= 3, big)] = np.nan
    got = m.estimate_home_load(observed, base)
    assert got.level == pytest.approx(level, rel=0.05)
    assert got.sigma == pytest.approx(SIGMA, abs=0.04)
    assert got.samples == n_steps
    # Averaging what reports would read the big users' absence as a low level.
    assert np.nanmean(observed / base[:, None]) < 0.9 * level
    # And the homes' spread around it (0.3 in log terms here).
    assert got.spread == pytest.approx(0.3, abs=0.05)


def test_homes_spread_round_their_level_is_learnt_and_kept_mean_one() -> None:
    rng = np.random.default_rng(3)
    for spread in (0.1, 0.6):
        scale = rng.lognormal(0.0, spread, 300)
        base = np.full(100, 1000.0)
        got = m.estimate_home_load(scale[None, :] * base[:, None], base)
        assert got.spread == pytest.approx(spread, rel=0.15)
        nodes, weights = got.scales()
        assert float((nodes * weights).sum()) == pytest.approx(1.0)
        assert nodes.max() / nodes.min() == pytest.approx(np.exp(2 * np.sqrt(3) * got.spread))


def test_without_data_the_prior_holds_and_the_peak_grows_with_the_window() -> None:
    assert m.estimate_home_load(np.full((10, 5), np.nan), np.full(10, 1000.0)) == m.HomeLoad()
    hl = m.HomeLoad(level=1.0, sigma=0.2, rho=0.0)
    assert 1.0 < hl.peak_factor(4) < hl.peak_factor(12) < hl.peak_factor(20)
    assert m.HomeLoad(sigma=0.0).peak_factor(12) == pytest.approx(1.0)


def test_a_heavier_home_load_lowers_the_evening_forecast() -> None:
    fleet = make_fleet(3000, [REGION], seed=4, now_ms=NOW, kind_mix=(0.6, 0.4, 0.0))
    snap = fleet.snap
    wy = weather_for_region(REGION)
    times = NOW + np.arange(4 * 30) * STEP
    ghi, temp = wy.sample(times)
    weather = m.WeatherForecast(NOW, 900, ghi, temp, wy.tz_offset_h)
    midnight = ((NOW + int(wy.tz_offset_h * 3_600_000)) // DAY) * DAY - int(
        wy.tz_offset_h * 3_600_000
    )
    start = midnight + 17 * 3_600_000 + (DAY if midnight + 17 * 3_600_000 < NOW else 0)
    rows = np.arange(len(snap))

    def p50(home: m.HomeLoad) -> float:
        calib = m.RegionCalibration(home_load=home)
        dev = m.region_devices(snap, rows, calib)
        res = m.forecast_region(
            REGION, dev, weather, NOW, start, start + 3 * 3_600_000, 900, calib, seed=1
        )
        return float(res.p50_mw.mean())

    light, usual, heavy = (
        p50(m.HomeLoad(level=x, sigma=s)) for x, s in ((0.6, 0.05), (1.0, 0.15), (1.5, 0.3))
    )
    assert light > usual > heavy > 0


async def test_the_calibrator_learns_it_from_the_interval_history(tmp_path: Path) -> None:
    fleet = make_fleet(600, [REGION], seed=4, now_ms=NOW, kind_mix=(1.0, 0.0, 0.0))
    snap = fleet.snap
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    wy = weather_for_region(REGION)
    bats = np.flatnonzero(snap.kind_codes == BATTERY)
    serving = bats[: bats.size // 2]  # the rest hold their charge: they report 0 W
    steps = np.arange(((NOW - 14 * DAY) // STEP), NOW // STEP) * STEP
    ratio, _, level = truth(steps.size, serving.size)
    base = m.home_load_w(steps + STEP // 2, wy.tz_offset_h)
    commanded_day = steps[steps.size // 2] // DAY * DAY
    rows: list[dict[str, Any]] = []
    for k, ts in enumerate(steps):
        local_h = ((ts + wy.tz_offset_h * 3_600_000) % DAY) / 3_600_000
        if local_h < 16:
            continue
        for j, i in enumerate(serving):
            rows.append(
                {
                    "device_id": snap.device_ids[i],
                    "interval_start_ms": int(ts),
                    "samples": 3,
                    "power_w": float(base[k] * ratio[k, j]),
                    "soc_pct": 80.0,
                }
            )
            # An evening under an event: the batteries discharge at 5 kW, which is no home load.
            if commanded_day <= ts < commanded_day + DAY:
                rows[-1]["power_w"] = 5000.0
        for i in bats[bats.size // 2 :]:
            rows.append(
                {
                    "device_id": snap.device_ids[i],
                    "interval_start_ms": int(ts),
                    "samples": 3,
                    "power_w": 0.0,
                    "soc_pct": 100.0,
                }
            )
    async with db.session() as s:
        for lo in range(0, len(rows), 20_000):
            await s.execute(insert(TelemetryInterval), rows[lo : lo + 20_000])
        s.add_all(
            Command(
                id=f"c-{i}",
                event_id="e-1",
                device_id=snap.device_ids[i],
                type="battery_discharge",
                status="completed",
                valid_from_ms=int(commanded_day),
                valid_until_ms=int(commanded_day + DAY),
                created_ms=int(commanded_day),
            )
            for i in serving
        )
        await s.commit()
    settings = Settings(regions=[REGION], database_url=db.url, history_interval_s=900)
    services = SimpleNamespace(
        settings=settings,
        clock=ManualClock(NOW),
        db=db,
        state=MemoryStateStore(),
        fleet=FixedFleet(snap),
        regions=RegionBook(sold=settings.regions),
    )
    cal = ForecastCalibrator(services, ForecastService(services))  # type: ignore[arg-type]
    got = await cal.learn_home_load(REGION, snap, NOW)
    await db.dispose()
    assert got.samples > 100
    assert got.level == pytest.approx(level, rel=0.08)
    assert got.sigma == pytest.approx(SIGMA, abs=0.06)
