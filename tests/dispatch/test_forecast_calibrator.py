"""The running service learns its forecast's calibration from its own interval history."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from sqlalchemy import insert

from dispatch.forecast_calibrator import ForecastCalibrator
from dispatch.forecast_service import ForecastService
from sim.synthetic import SyntheticFleet, make_fleet
from store.database import Database
from store.models import Base, TelemetryInterval
from store.state.memory import MemoryStateStore
from tests.helpers.fleets import FixedFleet
from vpp.clock import ManualClock
from vpp.fleet.snapshot import BATTERY
from vpp.forecast import model as m
from vpp.regions import RegionBook
from vpp.settings import Settings
from vpp.weather import weather_for_region

NOW = 1_783_000_800_000  # 2026-07-02 13:00 UTC
H = 3_600_000
DAY = 86_400_000
REGION = "ERCOT-NORTH"
SHORT = "PJM-DOM"  # only a few days of history


async def write_history(
    db: Database, fleet: SyntheticFleet, days: int, short_days: int, seed: int = 3
) -> None:
    """Hourly telemetry: devices report 90 % of hours (a day-level ± 2 % swing); in the evening
    window batteries hold only ~85 % of the energy above reserve they had the evening before
    (homes use it first: a bias the model does not know), and reported outdoor temperatures
    differ from the weather file by a day-level error of sd 2 °C."""
    rng = np.random.default_rng(seed)
    snap = fleet.snap
    n = len(snap)
    tz = weather_for_region(REGION).tz_offset_h
    wy = weather_for_region(REGION)
    is_bat = snap.kind_codes == BATTERY
    in_short = snap.region_codes == snap.region_code(SHORT)
    soc_base = np.where(is_bat, rng.uniform(70.0, 95.0, n), np.nan)
    reserve = m.physics.battery_reserve_pct(np.nan_to_num(snap.backup_reserve_pct, nan=20.0))
    first_hour = (NOW // H) - days * 24
    rows: list[dict[str, Any]] = []
    day_online = 0.9 + 0.02 * rng.standard_normal(days + 2)
    day_soc = np.clip(0.85 + 0.05 * rng.standard_normal(days + 2), 0.6, 1.0)
    day_temp = 2.0 * rng.standard_normal(days + 2)
    for k in range(days * 24):
        ts = (first_hour + k) * H
        d = k // 24
        local_h = ((ts / H) + tz) % 24
        evening = 17 <= local_h < 20
        present = rng.random(n) < day_online[d]
        present &= ~in_short | (ts >= NOW - short_days * DAY)
        soc = soc_base
        if evening:
            soc = reserve + (soc_base - reserve) * day_soc[d]
        _, file_temp = wy.sample(np.array([ts + 1_800_000]))
        outdoor = float(file_temp[0]) + day_temp[d]
        for i in np.flatnonzero(present):
            rows.append(
                {
                    "device_id": snap.device_ids[i],
                    "interval_start_ms": int(ts),
                    "samples": 12,
                    "soc_pct": None if np.isnan(soc[i]) else float(soc[i]),
                    "setpoint_c": None if is_bat[i] else float(snap.state["setpoint_c"][i]),
                    "outdoor_c": None if is_bat[i] else outdoor,
                }
            )
    async with db.session() as session:
        for start in range(0, len(rows), 20_000):
            await session.execute(insert(TelemetryInterval), rows[start : start + 20_000])
        await session.commit()


async def make_services(url: str, fleet: SyntheticFleet, create: bool) -> Any:
    db = Database(url)
    if create:
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
    settings = Settings(regions=[REGION, SHORT], database_url=url, history_interval_s=3600)
    return SimpleNamespace(
        settings=settings,
        clock=ManualClock(NOW),
        db=db,
        state=MemoryStateStore(),
        fleet=FixedFleet(fleet.snap),
        regions=RegionBook(sold=settings.regions),
    )


def small_fleet(n: int) -> SyntheticFleet:
    # Batteries and thermostats only (no PV: batteries hold their charge between events).
    return make_fleet(n, [REGION, SHORT], seed=4, now_ms=NOW, kind_mix=(0.6, 0.0, 0.4))


async def evening_p90(fs: ForecastService) -> float:
    tz = weather_for_region(REGION).tz_offset_h
    midnight = ((NOW + int(tz * H)) // DAY) * DAY - int(tz * H)
    start = midnight + 17 * H
    if start < NOW:
        start += DAY
    res = await fs.forecast(REGION, start, start + 3 * H, 900)
    return float(res.p90_mw.mean())


async def test_learns_the_bias_holds_coverage_persists_and_reloads(tmp_path: Path) -> None:
    fleet = small_fleet(400)
    url = f"sqlite+aiosqlite:///{tmp_path / 'cal.db'}"
    services = await make_services(url, fleet, create=True)
    try:
        await write_history(services.db, fleet, days=36, short_days=3)
        fs = ForecastService(services, n_scenarios=500)
        p90_default = await evening_p90(fs)
        assert (await fs.tuning_info(REGION))["samples"] == 0

        # Learn on days −35…−15 (as if it were two weeks ago); hold out the last 14 days.
        learn_now = NOW - 14 * DAY
        cal = ForecastCalibrator(services, fs, history_days=20, n_scenarios=500)
        report = await cal.run_once(learn_now)
        got = report[REGION]
        assert got["status"] == "learnt", got
        assert got["days"] >= 15
        assert got["samples"] == got["days"] * 12
        assert got["mean_pit"] < 0.3  # the fleet delivered less than the forecast said
        assert got["temp_sigma_c"] > m.ShockParams().temp_sigma_c  # 2 °C errors, prior 1.5
        assert got["p90_level"] < 0.09  # the P90 moves down the scenario distribution
        # The short-history region keeps the defaults and says why.
        assert report[SHORT]["status"] == "insufficient_history"
        assert report[SHORT]["defaults"] is True
        assert await services.state.get_value(f"forecast:tuning:{SHORT}") is None

        # Held-out days: coverage of the learnt P90 vs the default one.
        fs.invalidate()
        rows = np.flatnonzero(fleet.snap.region_codes == 0)
        sub = fleet.snap.take(rows)
        held = await cal.reconstruct_days(REGION, sub, np.full(len(sub), np.nan), None, NOW)
        held = [d for d in held if d.window_start_ms > learn_now]
        assert len(held) >= 10
        tuning = fs._tuning[REGION]
        calib = await fs.calibration(REGION, fleet.snap, NOW, NOW)
        rate = None if calib.online_rate is None else calib.online_rate[rows]
        hits_learnt, hits_default = [], []
        for d in held:
            scen = cal.forecast_scenarios(
                REGION, sub, d, rate, None, tuning.shocks, 500, 7, consecutive=0
            )
            learnt = np.quantile(scen, tuning.quantiles.level(0.1), axis=0)
            scen0 = cal.forecast_scenarios(
                REGION, sub, d, rate, None, m.ShockParams(), 500, 7, consecutive=0
            )
            default = np.quantile(scen0, m.QuantileMap().level(0.1), axis=0)
            hits_learnt.append(d.realised_mw >= learnt - 1e-9)
            hits_default.append(d.realised_mw >= default - 1e-9)
        cov_learnt = float(np.mean(hits_learnt))
        cov_default = float(np.mean(hits_default))
        print(f"held-out P90 coverage: learnt {cov_learnt:.3f}, defaults {cov_default:.3f}")
        # The fleet delivers less than the defaults assume, so the learnt P90 is lower and is
        # met at least as often as the default one.
        assert cov_learnt >= cov_default - 1e-9
        assert 0.78 <= cov_learnt <= 1.0

        # The running service's P90 moved the right way (down), and the API field says so.
        services.clock = ManualClock(NOW)
        fs.invalidate()
        p90_learnt = await evening_p90(fs)
        assert p90_learnt < p90_default
        info = await fs.tuning_info(REGION)
        assert info["samples"] == got["samples"] and info["days"] == got["days"]

        # Persisted: a new service (a restart, another process) starts from it.
        raw = await services.state.get_value(f"forecast:tuning:{REGION}")
        assert raw is not None and orjson.loads(raw)["info"]["days"] == got["days"]
        fresh = ForecastService(services, n_scenarios=500)
        assert (await fresh.tuning_info(REGION))["samples"] == got["samples"]
        assert abs(await evening_p90(fresh) - p90_learnt) < 1e-9
        assert (await fresh.tuning_info(SHORT))["samples"] == 0
    finally:
        await services.db.dispose()


async def test_postgres_run_once_and_component(fresh_pg_url: str) -> None:
    fleet = small_fleet(120)
    services = await make_services(fresh_pg_url, fleet, create=False)
    try:
        await write_history(services.db, fleet, days=10, short_days=2)
        fs = ForecastService(services)
        cal = ForecastCalibrator(services, fs, history_days=9, min_days=7, n_scenarios=200)
        report = await cal.run_once(NOW)
        assert report[REGION]["status"] == "learnt"
        assert report[REGION]["samples"] == report[REGION]["days"] * 12
        assert report[SHORT]["status"] == "insufficient_history"
        assert (await fs.tuning_info(REGION))["days"] == report[REGION]["days"]
        # As a component: start runs a calibration for the service day, stop ends it.
        other = ForecastCalibrator(services, fs, history_days=9, n_scenarios=200)
        await other.start()
        for _ in range(400):
            if other.last_day is not None:
                break
            await asyncio.sleep(0.05)
        await other.stop()
        assert other.last_day is not None and REGION in other.last_report
    finally:
        await services.db.dispose()


async def test_a_past_evening_credits_batteries_only_above_their_homes_draw(
    tmp_path: Path,
) -> None:
    """What the calibrator scores a past evening's forecast against is what settlement would
    have credited: each battery's deliverable power less its home's highest draw in the
    window (as the forecast quotes it), where a battery commanded through the window, whose
    reports show the command, counts the draw of the homes run like it."""
    from store.models import Command
    from vpp import flexibility as fx
    from vpp.domain import CommandStatus, CommandType

    fleet = make_fleet(6, [REGION], seed=4, now_ms=NOW, kind_mix=(1.0, 0.0, 0.0))
    snap = fleet.snap
    url = f"sqlite+aiosqlite:///{tmp_path / 'own.db'}"
    services = await make_services(url, fleet, create=True)
    try:
        cal = ForecastCalibrator(services, ForecastService(services), history_days=2)
        w_start, w_end, fc_ms = cal._windows(REGION, NOW)[-1]
        # Battery: (output in the window, output at forecast time, commanded in the window).
        # 0 and 3 serve their homes, 1 and 4 are held in backup mode; 2 and 5 are dispatched
        # through the window (4 kW), the evening before 2 served its home and 5 was held.
        runs = [(1500, 900, False), (0, 0, False), (4000, 1200, True)]
        runs += [(1000, 800, False), (0, 0, False), (4000, 0, True)]
        rows: list[dict[str, Any]] = []
        cmds: list[dict[str, Any]] = []
        for i, (window_w, fc_w, commanded) in enumerate(runs):
            dev = snap.device_ids[i]
            for ts, power in [(fc_ms, fc_w)] + [(w_start + h * H, window_w) for h in range(3)]:
                rows.append(
                    {
                        "device_id": dev,
                        "interval_start_ms": int(ts),
                        "samples": 12,
                        "soc_pct": 80.0,
                        "power_w": float(power),
                    }
                )
            if commanded:
                cmds.append(
                    {
                        "id": f"c-{i}",
                        "event_id": "e-1",
                        "device_id": dev,
                        "type": CommandType.battery_discharge.value,
                        "setpoint_w": 4000.0,
                        "valid_from_ms": w_start,
                        "valid_until_ms": w_end,
                        "status": CommandStatus.completed.value,
                        "created_ms": w_start - H,
                    }
                )
        async with services.db.session() as session:
            await session.execute(insert(TelemetryInterval), rows)
            await session.execute(insert(Command), cmds)
            await session.commit()

        days = await cal.reconstruct_days(REGION, snap, np.full(len(snap), np.nan), None, NOW)
        day = next(d for d in days if d.window_start_ms == w_start)
        gross_kw = fx.battery_inputs(snap, np.arange(6), soc_pct=np.full(6, 80.0)).deliverable_kw(
            3.0
        )
        # The dispatched battery that served its home counts the serving homes' mean draw.
        own_kw = np.array([1.5, 0.0, 1.25, 1.0, 0.0, 0.0])
        want_mw = float(np.maximum(gross_kw - own_kw, 0.0).sum()) / 1000.0
        np.testing.assert_allclose(day.realised_mw, want_mw, rtol=1e-9)
        assert float(day.realised_mw[0]) < float(gross_kw.sum()) / 1000.0 - 0.003
    finally:
        await services.db.dispose()


async def test_the_next_hours_follow_the_outdoor_temperature_devices_report(
    tmp_path: Path,
) -> None:
    """The service's weather is a typical year; a hot spell its thermostats report now moves
    the next hours' forecast (as far as the region's departures learnt to persist), where
    before the forecast ignored it and disagreed with the fleet's own readings."""
    from dataclasses import replace as dc_replace

    fleet = small_fleet(300)
    services = await make_services(f"sqlite+aiosqlite:///{tmp_path / 'now.db'}", fleet, True)
    try:
        fs = ForecastService(services, n_scenarios=300)
        fs.set_tuning(REGION, shocks=dc_replace(m.ShockParams(), temp_persistence=0.5))
        snap = fleet.snap
        in_region = snap.region_codes == snap.region_code(REGION)

        async def next_hour_p50(outdoor_c: float) -> float:
            state = snap.state.copy()
            state["outdoor_c"] = np.where(in_region, outdoor_c, state["outdoor_c"])
            services.fleet = FixedFleet(dc_replace(snap, state=state))
            fs.invalidate()
            res = await fs.forecast(REGION, NOW, NOW + H, 900)
            return float(res.p50_mw.mean())

        wy = weather_for_region(REGION)
        clim_now = float(wy.climate_temp(np.array([NOW]))[0])
        hot, mild = await next_hour_p50(clim_now + 6.0), await next_hour_p50(clim_now - 6.0)
        # Cooling homes shed more on a hotter afternoon.
        assert hot > mild * 1.02
        # Without a learnt persistence the readings do not move it.
        fs.set_tuning(REGION, shocks=m.ShockParams())
        assert await next_hour_p50(clim_now + 6.0) == pytest.approx(
            await next_hour_p50(clim_now - 6.0), rel=1e-9
        )
    finally:
        await services.db.dispose()
