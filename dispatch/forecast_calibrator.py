"""The running service learns its forecast's calibration from its own history.

Once per service day (and once at start), per region:

1. the day-level error of the temperature forecast: the outdoor temperature devices reported in
   the evening window (``telemetry_intervals.outdoor_c``) against the weather file the
   forecaster uses (:mod:`vpp.weather`);
2. for each of the last ``history_days`` days, what the fleet could have delivered in the evening
   window (online devices × their capability then, from the interval history, minus opt-outs;
   a battery's net of its home's highest draw in the window) and what the forecaster would
   have said the evening before (the fleet's state at that time, the learnt per-device rates,
   the shocks learnt in step 1–2); from the pairs the probability
   integral transforms (PIT) → a :class:`QuantileMap`, plus vendor-outage and opt-out-wave sizes
   where the history shows them; everything shrunk toward the brief's defaults when days are few;
3. installs the result (``ForecastService.set_tuning``) and persists it in the state store
   (``forecast:tuning:<region>``) so a restarted service or another process starts from it.

A region with fewer than ``min_days`` usable days keeps the defaults and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import warnings
import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pandas as pd
from sqlalchemy import select

from devices.edges import Edges
from devices.outage_log import OutageLog
from devices.outages import dependency_down
from dispatch.forecast_service import (
    TUNING_KEY,
    ForecastService,
    tuning_to_json,
)
from dispatch.leadership import Leadership
from dispatch.periodic import Periodic
from vpp.domain import CommandStatus, CommandType, FreshnessCode
from vpp.fleet.snapshot import BATTERY, THERMOSTAT, FleetSnapshot
from vpp.forecast import model as m
from vpp.weather import weather_for

log = logging.getLogger(__name__)
F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]


@dataclass
class _Day:
    """One past evening, reduced to what calibration needs (region rows of the snapshot)."""

    window_start_ms: int
    forecast_ms: int
    starts_ms: npt.NDArray[np.int64]
    member: B  # (N,) the device existed when the forecast was made
    realised_mw: F64  # (T,)
    online_any: B  # (N,) online at some interval of the window
    fc_online: B  # (N,) reporting at forecast time
    fc_soc: F64  # (N,) state of charge at forecast time (NaN: not reported)
    fc_power: F64  # (N,) a battery's output at forecast time (NaN: not reported)
    fc_setpoint: F64  # (N,)
    temp_obs_c: float  # mean reported outdoor temperature over the window (NaN: none)
    temp_fc_c: float  # the weather file's mean over the same intervals
    temp_clim_c: float  # the climate's mean over the same intervals (vpp.weather)
    temp_now_c: float  # median reported outdoor temperature at forecast time (NaN: none)
    temp_now_clim_c: float  # the climate then
    commanded: bool  # an event touched the window
    wave: list[tuple[float, float, float]]  # per kind: (opted out, commanded, expected rate)


class ForecastCalibrator(Periodic):
    """Background component of ``vpp serve`` (``start``/``stop``), see module doc."""

    task_name = "forecast-calibrator"

    def __init__(
        self,
        services: Edges,
        forecast: ForecastService,
        *,
        history_days: int = 30,
        min_days: int = 7,
        window_local_h: tuple[float, float] = (17.0, 20.0),
        forecast_local_h: float = 20.0,
        step_s: int = 900,
        prior_days: float = m.QUANTILE_PRIOR_DAYS,
        check_period_s: float = 900.0,
        n_scenarios: int | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        self.services = services
        self.forecast = forecast
        self.leadership = leadership
        self.history_days = history_days
        self.min_days = min_days
        self.home_load_days = 14  # evenings of battery reports the home load is learnt from
        self.home_load_sample = 2000  # batteries of a region read for it
        self.window_local_h = window_local_h
        self.forecast_local_h = forecast_local_h
        self.step_s = step_s
        self.prior_days = prior_days
        self.check_period_s = check_period_s
        self.n_scenarios = n_scenarios
        self.owner = f"calibrator-{uuid.uuid4().hex[:8]}"
        self.last_report: dict[str, Any] = {}
        self.last_day: int | None = None
        self.outages = OutageLog(log, "forecast calibration")

    # --- component ----------------------------------------------------------------------------
    async def _run(self) -> None:
        clock = self.services.clock
        while True:
            try:
                now = int(clock.now_ms())
                day = now // m.DAY_MS
                if day != self.last_day and await self._daily(now, day):
                    self.last_day = day
                self.outages.recovered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be back on the next check
                if not self.outages.failed(exc):  # an outage is one line, a bug its traceback
                    log.exception("forecast calibration")
            await clock.sleep(self.check_period_s)

    async def _daily(self, now_ms: int, day: int) -> bool:
        """One process per service day computes (the leading replica, when there are
        replicas); the others adopt what it persisted. True once this day is done here: a
        follower keeps adopting on every check until the leader has computed."""
        leads = self.leadership is None or self.leadership.is_leader
        mine = leads  # a store that cannot answer leaves the leader to calibrate for itself
        if leads:
            with contextlib.suppress(Exception):
                mine = await self.services.state.acquire_lease(
                    f"forecast-calibrator:{day}", self.owner, 2 * 86_400.0
                )
        if mine:
            await self.run_once(now_ms)
            return True
        fs = self.forecast
        snap = await self.services.fleet.snapshot()
        for region in sorted(fs.active_regions(snap)):
            await fs.load_tuning(region, force=True)
        return self.leadership is None

    # --- one calibration ----------------------------------------------------------------------
    async def run_once(self, now_ms: int | None = None) -> dict[str, Any]:
        """Calibrate every region now; returns per region what was learnt and from how much."""
        now = int(self.services.clock.now_ms() if now_ms is None else now_ms)
        fs = self.forecast
        snap = await self.services.fleet.snapshot()
        created = await self._created_ms(snap)
        report: dict[str, Any] = {}
        for region in sorted(fs.active_regions(snap)):
            try:
                report[region] = await self.calibrate_region(fs, snap, created, region, now)
            except Exception as exc:  # one region's trouble must not stop the others
                if dependency_down(exc):
                    raise  # the whole day again on the next check, not a day of errors
                log.exception("forecast calibration of %s", region)
                report[region] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        self.last_report = report
        return report

    async def calibrate_region(
        self,
        fs: ForecastService,
        snap: FleetSnapshot,
        created_ms: F64,
        region: str,
        now_ms: int,
    ) -> dict[str, Any]:
        code = snap.region_code(region)
        rows = np.flatnonzero(snap.region_codes == code) if code >= 0 else np.zeros(0, np.int64)
        if rows.size == 0:
            return {"status": "no_devices", "days": 0, "samples": 0, "defaults": True}
        sub = snap.take(rows)
        calib_now = await fs.calibration(region, snap, now_ms, now_ms)
        online_rate = None if calib_now.online_rate is None else calib_now.online_rate[rows]
        optout_rate = None if calib_now.optout_rate is None else calib_now.optout_rate[rows]
        days = await self.reconstruct_days(region, sub, created_ms[rows], optout_rate, now_ms)
        usable = [d for d in days if d.online_any[d.member].any()]
        prior = m.ShockParams()
        if len(usable) < self.min_days:
            return {
                "status": "insufficient_history",
                "defaults": True,
                "days": len(usable),
                "min_days": self.min_days,
                "samples": 0,
            }
        shocks, temp_n = self.estimate_shocks(usable, sub, prior)
        home_load = await self.learn_home_load(region, sub, now_ms)
        pits = await self.day_pits(fs, region, sub, usable, online_rate, optout_rate, shocks)
        quantiles = m.fit_quantile_map(pits, self.prior_days)
        info = {
            "learnt_ms": int(now_ms),
            "days": len(usable),
            "samples": int(quantiles.pits.size),
            "temp_samples": temp_n,
            "mean_pit": round(float(np.nanmean(pits)), 4),
            "calibrated_rates": bool(calib_now.calibrated),
            "home_load_samples": home_load.samples,
        }
        fs.set_tuning(region, shocks=shocks, quantiles=quantiles, info=info, home_load=home_load)
        doc = tuning_to_json(shocks, quantiles, info, home_load)
        await self.services.state.set_value(TUNING_KEY.format(region=region), orjson.dumps(doc))
        return {
            "status": "learnt",
            "defaults": False,
            "days": len(usable),
            "samples": int(quantiles.pits.size),
            "temp_samples": temp_n,
            "temp_sigma_c": round(shocks.temp_sigma_c, 3),
            "temp_bias_c": round(shocks.temp_bias_c, 3),
            "temp_skill": round(shocks.temp_skill, 3),
            "temp_persistence": round(shocks.temp_persistence, 3),
            "vendor_outage_p": round(shocks.vendor_outage_p, 4),
            "vendor_outage_depth": list(shocks.vendor_outage_depth),
            "optout_wave_sigma": round(shocks.optout_wave_sigma, 3),
            "home_load": {
                "level": round(home_load.level, 3),
                "sigma": round(home_load.sigma, 3),
                "rho": round(home_load.rho, 3),
                "samples": home_load.samples,
            },
            "p90_level": round(float(quantiles.level(0.1)), 4),
            "mean_pit": info["mean_pit"],
            "persisted": True,
        }

    # --- home load ------------------------------------------------------------------------------
    async def learn_home_load(self, region: str, sub: FleetSnapshot, now_ms: int) -> m.HomeLoad:
        """The region's home load (:class:`vpp.forecast.model.HomeLoad`) from what a sample of
        its batteries reported on the last ``home_load_days`` evenings: each one's output at
        dark 15-minute steps from 17:00 local while it was above its reserve and under no
        command. A sample is enough (the noise to learn is the region's, common to its homes)
        and keeps the read small on a national fleet."""
        from store.models import Command, TelemetryInterval

        rows = np.flatnonzero((sub.kind_codes == BATTERY) & sub.enrolled)
        if rows.size == 0:
            return m.HomeLoad()
        if rows.size > self.home_load_sample:
            pick = np.random.default_rng(zlib.crc32(region.encode())).choice(
                rows.size, self.home_load_sample, replace=False
            )
            rows = np.sort(rows[pick])
        ids = [str(sub.device_ids[i]) for i in rows]
        reserve = np.nan_to_num(sub.backup_reserve_pct[rows].astype(float), nan=20.0)
        wy = weather_for(self.services.regions.locate(region))
        step_ms = 15 * 60_000
        first = ((now_ms - self.home_load_days * m.DAY_MS) // step_ms) * step_ms
        steps = np.arange(first, (now_ms // step_ms) * step_ms, step_ms, dtype=np.int64)
        mids = steps + step_ms // 2
        local_h = ((mids + wy.tz_offset_h * m.HOUR_MS) % m.DAY_MS) / m.HOUR_MS
        ghi, _ = wy.sample(mids)
        evening = (local_h >= m.HOME_LOAD_EVENING_H) & (ghi <= 0.0)
        if not evening.any():
            return m.HomeLoad()
        iv_ms = int(self.services.settings.history_interval_s) * 1000
        stamps = np.unique(
            ((steps[evening][:, None] + np.arange(0, step_ms, iv_ms)[None, :]) // iv_ms) * iv_ms
        )
        async with self.services.db.session() as session:
            tel = (
                await session.execute(
                    select(
                        TelemetryInterval.device_id,
                        TelemetryInterval.interval_start_ms,
                        TelemetryInterval.power_w,
                        TelemetryInterval.soc_pct,
                    )
                    .where(TelemetryInterval.device_id.in_(ids))
                    .where(TelemetryInterval.interval_start_ms >= int(stamps[0]))
                    .where(TelemetryInterval.interval_start_ms <= int(stamps[-1]))
                )
            ).all()
            cmds = (
                await session.execute(
                    select(Command.device_id, Command.valid_from_ms, Command.valid_until_ms)
                    .where(Command.device_id.in_(ids))
                    .where(Command.type != CommandType.restore.value)
                    .where(Command.valid_until_ms > int(steps[0]))
                )
            ).all()
        if not tel:
            return m.HomeLoad()
        frame = pd.DataFrame(tel, columns=["id", "ts", "power", "soc"])
        col = pd.Index(ids).get_indexer(pd.Index(frame["id"]))
        ts = frame["ts"].to_numpy(np.int64)
        step = np.searchsorted(steps, (ts // step_ms) * step_ms)
        power = frame["power"].to_numpy(float, na_value=np.nan)
        soc = frame["soc"].to_numpy(float, na_value=np.nan)
        ok = (
            (col >= 0)
            & (step < steps.size)
            & np.isfinite(power)
            & (soc > reserve[np.maximum(col, 0)] + 5.0)
        )
        ok &= evening[np.minimum(step, steps.size - 1)]
        if cmds:
            # A step any sampled battery was commanded in is left out for all of them: events
            # are a few hours of the fortnight, and the test stays one vectorised pass.
            lo = np.array([int(c[1]) for c in cmds], dtype=np.int64)
            hi = np.array([int(c[2]) for c in cmds], dtype=np.int64)
            first_step = np.searchsorted(steps, (lo // step_ms) * step_ms)
            last_step = np.searchsorted(steps, hi, side="left")
            busy = np.zeros(steps.size + 1, np.int64)
            np.add.at(busy, np.minimum(first_step, steps.size), 1)
            np.add.at(busy, np.minimum(last_step, steps.size), -1)
            ok &= np.cumsum(busy)[:-1][np.minimum(step, steps.size - 1)] == 0
        total = np.zeros((steps.size, len(ids)))
        count = np.zeros((steps.size, len(ids)))
        np.add.at(total, (step[ok], col[ok]), power[ok])
        np.add.at(count, (step[ok], col[ok]), 1.0)
        observed = np.where(count > 0, total / np.maximum(count, 1.0), np.nan)
        modelled = np.where(evening, m.home_load_w(mids, wy.tz_offset_h), np.nan)
        return m.estimate_home_load(observed, modelled)

    # --- history → per-day data -----------------------------------------------------------------
    async def _created_ms(self, snap: FleetSnapshot) -> F64:
        """When each snapshot device joined (NaN: unknown → treated as always there)."""
        from store.models import Device

        async with self.services.db.session() as session:
            rows = (await session.execute(select(Device.id, Device.created_ms))).all()
        if not rows:
            return np.full(len(snap), np.nan)
        ids = pd.Index([r[0] for r in rows])
        vals = np.array([float(r[1]) if r[1] is not None else np.nan for r in rows])
        pos = ids.get_indexer(pd.Index(snap.device_ids))
        return np.where(pos >= 0, vals[np.maximum(pos, 0)], np.nan)

    def _windows(self, region: str, now_ms: int) -> list[tuple[int, int, int]]:
        """(window start, window end, forecast time) of the past days, oldest first."""
        tz_ms = int(weather_for(self.services.regions.locate(region)).tz_offset_h * m.HOUR_MS)
        midnight = ((now_ms + tz_ms) // m.DAY_MS) * m.DAY_MS - tz_ms
        lo, hi = self.window_local_h
        step_ms = self.step_s * 1000
        out = []
        for j in range(self.history_days, -1, -1):
            day0 = midnight - j * m.DAY_MS
            w_start = day0 + int(lo * m.HOUR_MS)
            w_end = day0 + int(hi * m.HOUR_MS)
            fc = day0 - m.DAY_MS + int(self.forecast_local_h * m.HOUR_MS)
            fc = (fc // step_ms) * step_ms
            if w_end <= now_ms and fc >= now_ms - (self.history_days + 1) * m.DAY_MS:
                out.append((w_start, w_end, fc))
        return out[-self.history_days :]

    async def reconstruct_days(
        self,
        region: str,
        sub: FleetSnapshot,
        created_ms: F64,
        optout_rate: F64 | None,
        now_ms: int,
    ) -> list[_Day]:
        """Past evenings of one region's devices (``sub``: the region's snapshot rows)."""
        from store.models import Command, TelemetryInterval

        iv_ms = int(self.services.settings.history_interval_s) * 1000
        wy = weather_for(self.services.regions.locate(region))
        n = len(sub)
        ids = pd.Index(sub.device_ids)
        event_h = m.event_hours(0, int((self.window_local_h[1] - self.window_local_h[0]) * 3.6e6))
        default_r = np.where(
            sub.kind_codes == BATTERY,
            m.DEFAULT_OPTOUT_AT_2H[BATTERY],
            m.DEFAULT_OPTOUT_AT_2H[THERMOSTAT],
        )
        r_hat = (
            default_r
            if optout_rate is None
            else np.where(np.isnan(optout_rate), default_r, optout_rate)
        )
        out: list[_Day] = []
        consecutive = 0
        for w_start, w_end, fc_ms in self._windows(region, now_ms):
            starts = m.interval_starts(w_start, w_end, self.step_s)
            step_iv = (starts // iv_ms) * iv_ms
            fc_iv = (fc_ms // iv_ms) * iv_ms
            stamps = np.unique(np.append(step_iv, fc_iv))
            async with self.services.db.session() as session:
                tel = (
                    await session.execute(
                        select(
                            TelemetryInterval.device_id,
                            TelemetryInterval.interval_start_ms,
                            TelemetryInterval.soc_pct,
                            TelemetryInterval.setpoint_c,
                            TelemetryInterval.outdoor_c,
                            TelemetryInterval.power_w,
                        ).where(TelemetryInterval.interval_start_ms.in_([int(s) for s in stamps]))
                    )
                ).all()
                cmds = (
                    await session.execute(
                        select(
                            Command.device_id,
                            Command.status,
                            Command.valid_from_ms,
                            Command.valid_until_ms,
                        )
                        .where(Command.type != CommandType.restore.value)
                        .where(Command.valid_from_ms < w_end)
                        .where(Command.valid_until_ms > w_start)
                    )
                ).all()
            # Only the devices with a reading in the window get columns: (stamps × devices)
            # arrays over a national fleet's silent or new devices cost GB and find nothing.
            if tel:
                frame = pd.DataFrame(tel, columns=["id", "ts", "soc", "sp", "out", "power"])
                seen_pos = ids.get_indexer(pd.Index(frame["id"]))
                cols_of = np.unique(seen_pos[seen_pos >= 0])
            else:
                cols_of = np.zeros(0, np.int64)
            k, n_seen = stamps.size, cols_of.size
            present_s = np.zeros((k, n_seen), bool)
            soc_s = np.full((k, n_seen), np.nan)
            setpoint_s = np.full((k, n_seen), np.nan)
            outdoor_s = np.full((k, n_seen), np.nan)
            power_s = np.full((k, n_seen), np.nan)
            if tel:
                keep = seen_pos >= 0
                col = np.searchsorted(cols_of, seen_pos[keep])
                row = np.searchsorted(stamps, frame["ts"].to_numpy(np.int64)[keep])
                present_s[row, col] = True
                soc_s[row, col] = frame["soc"].to_numpy(float, na_value=np.nan)[keep]
                setpoint_s[row, col] = frame["sp"].to_numpy(float, na_value=np.nan)[keep]
                outdoor_s[row, col] = frame["out"].to_numpy(float, na_value=np.nan)[keep]
                power_s[row, col] = frame["power"].to_numpy(float, na_value=np.nan)[keep]
            commanded = np.zeros(n, bool)
            opted = np.zeros(n, bool)
            # Per interval of the window, the seen devices under a command then (their
            # reports show the command, not what their homes drew).
            under_command = np.zeros((starts.size + 1, n_seen), np.int16)  # small at 1 M
            if cmds:
                cf = pd.DataFrame(cmds, columns=["id", "status", "from", "until"])
                cpos = ids.get_indexer(pd.Index(cf["id"]))
                cstat = (cf["status"] == CommandStatus.opted_out).to_numpy(bool)
                ok = cpos >= 0
                commanded[cpos[ok]] = True
                opted[cpos[ok][cstat[ok]]] = True
                ccol = np.searchsorted(cols_of, cpos)
                hit = ok & (ccol < n_seen)
                hit[hit] = cols_of[ccol[hit]] == cpos[hit]
                lo = cf["from"].to_numpy(np.int64)[hit]
                hi = cf["until"].to_numpy(np.int64)[hit]
                step_ms = self.step_s * 1000
                first_k = np.searchsorted(starts + step_ms, lo, side="right")
                end_k = np.searchsorted(starts, hi, side="left")
                np.add.at(under_command, (first_k, ccol[hit]), 1)
                np.add.at(under_command, (end_k, ccol[hit]), -1)
            commanded_at = np.cumsum(under_command, axis=0, dtype=np.int16)[:-1] > 0
            member = np.isnan(created_ms) | (created_ms <= fc_ms)
            step_idx = np.searchsorted(stamps, step_iv)
            fc_idx = int(np.searchsorted(stamps, fc_iv))
            online = present_s[step_idx] & member[cols_of][None, :]
            seen_sub = sub.take(cols_of)
            # Each battery's highest own output in the window, which settlement does not credit.
            own_max = np.zeros(n_seen)
            bc = np.flatnonzero(seen_sub.kind_codes == BATTERY)
            own_max[bc] = m.window_own_max_w(
                np.where(online[:, bc], power_s[step_idx][:, bc], np.nan),
                commanded_at[:, bc],
                m.home_use(
                    power_s[fc_idx, bc],
                    soc_s[fc_idx, bc],
                    np.nan_to_num(seen_sub.backup_reserve_pct[bc].astype(float), nan=20.0),
                ),
            )
            # Outdoor temperature per interval: the median device reading (robust to a broken
            # sensor), else the weather file.
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                reported = (
                    np.nanmedian(np.where(online, outdoor_s[step_idx], np.nan), axis=1)
                    if n_seen
                    else np.full(step_idx.size, np.nan)
                )
                fc_out = outdoor_s[fc_idx][present_s[fc_idx] & member[cols_of]]
                fc_out = fc_out[np.isfinite(fc_out)]
                temp_now = float(np.median(fc_out)) if fc_out.size else np.nan
            _, file_temp = wy.sample(starts + self.step_s * 500)
            file_temp = np.asarray(file_temp, float)
            clim_temp = wy.climate_temp(starts + self.step_s * 500)
            has_temp = np.isfinite(reported)
            temp_steps = np.where(has_temp, reported, file_temp)
            realised = (
                m.realised_window_mw(
                    seen_sub,
                    online,
                    soc_s[step_idx],
                    setpoint_s[step_idx],
                    temp_steps,
                    opted[cols_of],
                    event_h,
                    own_max_w=own_max,
                )
                if n_seen
                else np.zeros(starts.size)
            )
            wave: list[tuple[float, float, float]] = []
            if commanded.any():
                scale = m.optout_scale(event_h, consecutive)
                for kind in (BATTERY, THERMOSTAT):
                    sel = commanded & (sub.kind_codes == kind)
                    if sel.any():
                        wave.append(
                            (
                                float(opted[sel].sum()),
                                float(sel.sum()),
                                float(r_hat[sel].mean() * scale),
                            )
                        )
            consecutive = consecutive + 1 if commanded.any() else 0
            enough_temp = has_temp.sum() * 2 >= has_temp.size
            online_any = np.zeros(n, bool)
            online_any[cols_of] = online.any(axis=0)
            fc_present = np.zeros(n, bool)
            fc_present[cols_of] = present_s[fc_idx]
            fc_soc = np.full(n, np.nan)
            fc_soc[cols_of] = soc_s[fc_idx]
            fc_power = np.full(n, np.nan)
            fc_power[cols_of] = power_s[fc_idx]
            fc_setpoint = np.full(n, np.nan)
            fc_setpoint[cols_of] = setpoint_s[fc_idx]
            out.append(
                _Day(
                    window_start_ms=w_start,
                    forecast_ms=fc_ms,
                    starts_ms=starts,
                    member=member,
                    realised_mw=realised,
                    online_any=online_any,
                    fc_online=fc_present & member,
                    fc_soc=fc_soc,
                    fc_power=fc_power,
                    fc_setpoint=fc_setpoint,
                    temp_obs_c=float(reported[has_temp].mean()) if enough_temp else np.nan,
                    temp_fc_c=float(file_temp[has_temp].mean()) if enough_temp else np.nan,
                    temp_clim_c=float(clim_temp[has_temp].mean()) if enough_temp else np.nan,
                    temp_now_c=temp_now,
                    temp_now_clim_c=float(wy.climate_temp(np.array([fc_ms]))[0]),
                    commanded=bool(commanded.any()),
                    wave=wave,
                )
            )
            await asyncio.sleep(0)  # a big fleet's day is a big query: let others run
        return out

    # --- learning -------------------------------------------------------------------------------
    def estimate_shocks(
        self, days: list[_Day], sub: FleetSnapshot, prior: m.ShockParams
    ) -> tuple[m.ShockParams, int]:
        """Shock sizes from the days' evidence, each shrunk toward ``prior``; also returns how
        many days had temperature readings."""
        fc = np.array([d.temp_fc_c for d in days])
        obs = np.array([d.temp_obs_c for d in days])
        clim = np.array([d.temp_clim_c for d in days])
        ok = np.isfinite(fc) & np.isfinite(obs) & np.isfinite(clim)
        # The departure devices reported when each forecast was made, from the climate then.
        now_dep = np.array([d.temp_now_c - d.temp_now_clim_c for d in days])
        lead_h = (
            float(np.mean([(d.starts_ms.mean() + self.step_s * 500 - d.forecast_ms) for d in days]))
            / m.HOUR_MS
        )
        temp_bias, temp_skill, temp_sigma, persistence = m.estimate_temp_mos(
            fc[ok], obs[ok], clim[ok], prior, now_dep[ok], lead_h
        )
        eligible = (
            np.stack([d.member for d in days])
            & ((sub.kind_codes == BATTERY) | (sub.kind_codes == THERMOSTAT))[None, :]
        )
        share = m.vendor_online_share(
            np.stack([d.online_any for d in days]),
            sub.vendor_codes,
            len(sub.vendors),
            eligible,
        )
        share = share[:, np.isfinite(share).any(axis=0)] if share.size else share
        p_out, depth = m.estimate_vendor_outages(share, prior.vendor_outage_p)
        wave = np.array([w for d in days for w in d.wave]).reshape(-1, 3)
        wave_sigma = m.estimate_wave_sigma(
            wave[:, 0], wave[:, 1], wave[:, 2], prior.optout_wave_sigma
        )
        shocks = replace(
            prior,
            temp_sigma_c=float(temp_sigma),
            temp_bias_c=float(temp_bias),
            temp_skill=float(temp_skill),
            temp_persistence=float(persistence),
            vendor_outage_p=float(p_out),
            vendor_outage_depth=(float(depth[0]), float(depth[1])),
            optout_wave_sigma=float(wave_sigma),
        )
        return shocks, int(ok.sum())

    async def day_pits(
        self,
        fs: ForecastService,
        region: str,
        sub: FleetSnapshot,
        days: list[_Day],
        online_rate: F64 | None,
        optout_rate: F64 | None,
        shocks: m.ShockParams,
    ) -> F64:
        """(days × intervals) PITs of what the forecaster would have said the evening before."""
        n_scen = self.n_scenarios or fs.n_scenarios
        seed = zlib.crc32(region.encode())  # the live service's seed: the same scenario noise
        out = np.full((len(days), days[0].starts_ms.size), np.nan)
        consecutive, prev = 0, None
        for i, d in enumerate(days):
            # Event days right before this one (the forecaster raises opt-outs after them).
            if (
                prev is not None
                and prev.commanded
                and prev.window_start_ms == (d.window_start_ms - m.DAY_MS)
            ):
                consecutive += 1
            else:
                consecutive = 0
            prev = d
            scen = await asyncio.to_thread(
                self.forecast_scenarios,
                region,
                sub,
                d,
                online_rate,
                optout_rate,
                shocks,
                n_scen,
                seed,
                consecutive,
            )
            out[i] = m.pit(scen, d.realised_mw)
        return out

    def forecast_scenarios(
        self,
        region: str,
        sub: FleetSnapshot,
        day: _Day,
        online_rate: F64 | None,
        optout_rate: F64 | None,
        shocks: m.ShockParams,
        n_scenarios: int,
        seed: int,
        consecutive: int = 0,
    ) -> F64:
        """Scenario MW (S, T) the forecaster would have produced at ``day.forecast_ms`` for the
        day's window: the devices that existed then, in the state they reported then."""
        snap = sub.take(day.member)
        st = snap.state.copy()
        soc = day.fc_soc[day.member]
        sp = day.fc_setpoint[day.member]
        st["soc_pct"] = np.where(np.isnan(soc), st["soc_pct"], soc)
        # What each battery was doing then (not now): how it runs its home (model.home_use).
        st["power_w"] = day.fc_power[day.member]
        st["setpoint_c"] = np.where(np.isnan(sp), st["setpoint_c"], sp)
        on = day.fc_online[day.member]
        snap = replace(
            snap,
            state=st,
            online=on,
            freshness=np.where(on, FreshnessCode.fresh, FreshnessCode.offline).astype(np.int8),
        )
        calib = m.RegionCalibration(
            calibrated=online_rate is not None,
            online_rate=None if online_rate is None else online_rate[day.member],
            optout_rate=None if optout_rate is None else optout_rate[day.member],
            shocks=shocks,
            consecutive_event_days=consecutive,
        )
        dev = m.region_devices(snap, np.arange(len(snap)), calib)
        start, step = int(day.starts_ms[0]), self.step_s
        end = int(day.starts_ms[-1]) + step * 1000
        wy = weather_for(self.services.regions.locate(region))
        n_w = int((end - day.forecast_ms) // (step * 1000)) + 2
        weather = m.typical_year_forecast(wy, day.forecast_ms, step, n_w, day.temp_now_c)
        event_h = m.event_hours(start, end)
        scen, _ = m.simulate_region(
            dev,
            weather,
            day.forecast_ms,
            day.starts_ms,
            step,
            calib,
            event_h=event_h,
            n_scenarios=n_scenarios,
            seed=seed,
        )
        return scen
