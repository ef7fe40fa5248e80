"""Back-test of the forecaster against a simulated fleet (pure: no I/O, seeded).

Each day the forecaster sees only the past (device online history, opt-out acks, its own past
forecast-vs-realised outcomes, past weather errors) and the fleet's state at forecast time, and
forecasts the next day's evening window. The simulator then decides, device by device, what the
fleet could actually have delivered: true weather (pvlib's typical year), each device's hidden
online rate and opt-out propensity, and shocks drawn from a seed the forecaster never saw —
temperature forecast error, vendor cloud outages, opt-out waves that grow with event length and
consecutive event days, a cloudier or sunnier day than forecast. What it scores is what a
buyer is settled on, held flat through the window: a battery's deliverable power less its
highest own output (serving its home) in the window, a thermostat's staggered-start flat shed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from sim.synthetic import make_fleet
from vpp import physics
from vpp.domain import THERMOSTAT_DEFAULT_OFFSET_C, FreshnessCode
from vpp.fleet.snapshot import BATTERY, THERMOSTAT
from vpp.forecast import model as m
from vpp.weather import weather_for_region

F64 = npt.NDArray[np.float64]
STEP_S = 900
STEP_MS = STEP_S * 1000
LOAD_DAYS = 14  # days of battery reports the home load is learnt from
PIT_DAYS = 30  # days of past outcomes the quantiles are recalibrated on (the live calibrator's)


@dataclass(frozen=True)
class TruthShocks:
    """The simulator's hidden shock magnitudes (differ from the forecaster's priors)."""

    temp_sigma_c: float = 2.0
    temp_hourly_sigma_c: float = 0.5
    vendor_outage_p: float = 0.015  # ~5 OEM cloud outages a year per vendor
    vendor_outage_depth: tuple[float, float] = (0.6, 1.0)
    optout_wave_sigma: float = 0.35
    solar_sigma: float = 0.25
    event_day_p: float = 0.6


@dataclass(frozen=True)
class BacktestConfig:
    n_devices: int = 10_000
    regions: tuple[str, ...] = ("ERCOT-NORTH", "PJM-DOM")
    history_days: int = 30
    test_days: int = 90
    first_day: str = "2025-06-01"
    window_local_h: tuple[float, float] = (17.0, 20.0)
    forecast_local_h: float = 20.0  # the day before, after that day's window
    n_scenarios: int = 1000
    fleet_seed: int = 11
    truth_seed: int = 2024  # shocks: never seen by the forecaster
    forecaster_seed: int = 7
    truth: TruthShocks = field(default_factory=TruthShocks)


@dataclass
class BacktestReport:
    config: BacktestConfig
    realised: F64  # (days, regions, T) MW over all days (history + test)
    p50: F64
    p90: F64
    yesterday: F64
    derate_p10: F64
    derate_p50: F64
    calibrated: npt.NDArray[np.bool_]  # (days, regions)
    test_mask: npt.NDArray[np.bool_]  # (days,)

    def coverage(self) -> float:
        t = self.test_mask
        return float((self.realised[t] >= self.p90[t] - 1e-9).mean())

    def pinball(self, which: str, q: float) -> float:
        t = self.test_mask
        pred = {
            "model": self.p90 if q < 0.5 else self.p50,
            "yesterday": self.yesterday,
            "derate": self.derate_p10 if q < 0.5 else self.derate_p50,
        }[which][t]
        return pinball_loss(self.realised[t], pred, q)


def pinball_loss(y: F64, pred: F64, q: float) -> float:
    d = np.asarray(y, float) - np.asarray(pred, float)
    return float(np.mean(np.maximum(q * d, (q - 1.0) * d)))


def _local_midnight_ms(day: str, tz_h: float) -> int:
    return int(np.datetime64(day, "ms").astype(np.int64)) - int(tz_h * m.HOUR_MS)


def run_backtest(cfg: BacktestConfig) -> BacktestReport:
    regions = list(cfg.regions)
    n_reg = len(regions)
    n_days = cfg.history_days + cfg.test_days + 1  # day 0 only seeds "yesterday"
    fleet = make_fleet(cfg.n_devices, regions, seed=cfg.fleet_seed)
    snap = fleet.snap
    truth = cfg.truth
    rng = np.random.default_rng(cfg.truth_seed)
    n = len(snap)
    kind = snap.kind_codes
    bat = kind == BATTERY
    th = kind == THERMOSTAT
    n_vendors = len(snap.vendors)
    weathers = [weather_for_region(r) for r in regions]
    w_lo, w_hi = cfg.window_local_h
    t_count = round((w_hi - w_lo) * 3600 / STEP_S)
    event_h = w_hi - w_lo

    # --- Truth over the whole period, in 15-min steps (device-level physics) ---------------------
    tz = np.array([w.tz_offset_h for w in weathers])
    origin = [_local_midnight_ms(cfg.first_day, float(t)) for t in tz]
    steps_per_day = 96
    total_steps = (n_days + 1) * steps_per_day
    region_of = snap.region_codes
    ghi_true = np.zeros((n_reg, total_steps))
    temp_true = np.zeros((n_reg, total_steps))
    temp_climate = np.zeros((n_reg, total_steps))
    for r, w in enumerate(weathers):
        times = origin[r] + np.arange(total_steps) * STEP_MS + STEP_MS // 2
        ghi_true[r], temp_true[r] = w.sample(times)
        temp_climate[r] = w.climate_temp(times)
    # Day-level forecast errors (the forecaster sees truth + these).
    temp_err_day = rng.standard_normal((n_days + 1, n_reg)) * truth.temp_sigma_c
    solar_err_day = np.clip(
        1.0 + truth.solar_sigma * rng.standard_normal((n_days + 1, n_reg)), 0.2, 2.0
    )

    # Battery SOC path with self-consumption (true PV and load of each home).
    b_idx = np.flatnonzero(bat)
    soc = snap.state["soc_pct"][b_idx].astype(float)
    cap = snap.capacity_wh[b_idx]
    dis = snap.max_discharge_w[b_idx]
    chg = snap.max_charge_w[b_idx]
    res = snap.backup_reserve_pct[b_idx]
    pv_unit = np.stack(
        [physics.solar_power_w(ghi_true[r], 1.0, temp_true[r]) for r in range(n_reg)]
    )  # (R, steps)
    reg_b = region_of[b_idx]
    soc_path = np.zeros((total_steps + 1, b_idx.size), dtype=np.float32)
    soc_path[0] = soc
    has_pv = fleet.pv_w[b_idx] > 0
    load_noise = rng.lognormal(0.0, 0.2, (total_steps, n_reg))
    # Settlement credits a battery above what it gives its home anyway, and a battery holds its
    # setpoint: what it delivers flat through a day's window is its deliverable power less its
    # highest own output (serving the home) inside the window. Kept per day, per battery.
    win_steps = range(int(w_lo * 4), int(w_lo * 4) + t_count)
    own_max_w = np.zeros((n_days + 1, b_idx.size))
    # What the service learns home load from: each battery's reported output while it serves its
    # home (a backup-mode battery reports 0 W outside events) with charge above its reserve, at
    # evening steps without sun; against the typical profile (NaN: not such a step).
    serving = has_pv
    load_obs_w = np.full((total_steps, b_idx.size), np.nan, dtype=np.float32)
    load_mod_w = np.full(total_steps, np.nan)
    fc_step_of_day = int(cfg.forecast_local_h * 4)
    reported_w: dict[int, F64] = {}
    for k in range(total_steps):
        hour_local = ((k % steps_per_day) + 0.5) * STEP_S / 3600.0
        base_load = np.interp(hour_local, np.arange(25), np.append(m.HOME_LOAD_W, m.HOME_LOAD_W[0]))
        # Homes without PV hold their battery in backup mode (as the forecaster assumes).
        load = base_load * fleet.load_scale[b_idx] * load_noise[k, reg_b] * has_pv
        pv = fleet.pv_w[b_idx] * pv_unit[reg_b, k]
        charged = soc > res + 5.0
        soc, own_w = physics.battery_step(soc, load - pv, cap, dis, chg, res, STEP_S)
        if hour_local >= m.HOME_LOAD_EVENING_H:
            dark = pv_unit[reg_b, k] <= 0.0
            use = serving & charged & dark
            load_obs_w[k] = np.where(use, own_w, np.nan)
            load_mod_w[k] = float(base_load)
        soc_path[k + 1] = soc
        if (k + 1) % steps_per_day == fc_step_of_day:
            reported_w[k + 1] = own_w  # what each battery reports at forecast time
        if k % steps_per_day in win_steps:
            day = k // steps_per_day
            own_max_w[day] = np.maximum(own_max_w[day], own_w)

    # Shocks per day.
    vendor_down = rng.random((n_days + 1, n_reg, n_vendors)) < truth.vendor_outage_p
    vendor_depth = rng.uniform(*truth.vendor_outage_depth, (n_days + 1, n_reg, n_vendors))
    ws = truth.optout_wave_sigma
    wave = np.exp(ws * rng.standard_normal((n_days + 1, n_reg, 2)) - ws * ws / 2)
    event_day = rng.random(n_days + 1) < truth.event_day_p
    consecutive = np.zeros(n_days + 1, dtype=int)
    for d in range(1, n_days + 1):
        consecutive[d] = consecutive[d - 1] + 1 if event_day[d - 1] else 0

    def online_draw(d: int) -> npt.NDArray[np.bool_]:
        on = rng.random(n) < fleet.online_p
        lost = rng.random(n) < vendor_depth[d, region_of, snap.vendor_codes]
        return on & ~(vendor_down[d, region_of, snap.vendor_codes] & lost)

    window_step0 = int(w_lo * 4)
    realised = np.zeros((n_days, n_reg, t_count))
    online_hist = np.zeros(n)  # days online (telemetry proxy)
    expected_hist = np.zeros(n)
    opted_hist = np.zeros(n)
    trials_hist = np.zeros(n)
    vendor_share_hist: list[F64] = []  # per day: (R·V) online shares
    # Per region: the window's mean forecast, observed and climate temperatures of past days,
    # and the departure from the climate reported when the forecast was made.
    temp_hist: list[list[tuple[float, float, float, float]]] = [[] for _ in regions]
    # Per region: the solar energy to the window of past days, forecast and observed.
    solar_hist: list[list[tuple[float, float]]] = [[] for _ in regions]
    wave_obs: list[tuple[float, float, float]] = []
    pits: list[list[F64]] = [[] for _ in regions]
    p50 = np.zeros_like(realised)
    p90 = np.zeros_like(realised)
    calibrated = np.zeros((n_days, n_reg), bool)
    rng_fc = np.random.default_rng(cfg.forecaster_seed)
    nameplate = np.zeros(n_reg)
    th_idx = np.flatnonzero(th)
    offsets = np.minimum(THERMOSTAT_DEFAULT_OFFSET_C, snap.max_offset_c[th_idx])
    offsets = np.clip(
        np.minimum(offsets, snap.comfort_max_c[th_idx] - snap.state["setpoint_c"][th_idx]),
        0.0,
        None,
    )
    sp_th = snap.state["setpoint_c"][th_idx].astype(float)

    pending: dict[int, F64] = {}
    default_r = np.where(bat, m.DEFAULT_OPTOUT_AT_2H[BATTERY], m.DEFAULT_OPTOUT_AT_2H[THERMOSTAT])
    for d in range(n_days):
        optout_rate = m.estimate_optout_rates(opted_hist, trials_hist, default_r)
        # ---- Forecast (not for day 0): made the day before at forecast_local_h --------------
        if d >= 1:
            fc_step = (d - 1) * steps_per_day + fc_step_of_day
            st = snap.state.copy()
            st["soc_pct"][b_idx] = soc_path[fc_step]
            st["power_w"][b_idx] = reported_w[fc_step]
            online_now = online_draw(d - 1)
            now_snap = replace(
                snap,
                state=st,
                online=online_now,
                freshness=np.where(online_now, FreshnessCode.fresh, FreshnessCode.offline).astype(
                    np.int8
                ),
            )
            online_rate, _ = m.estimate_online_rates(
                online_hist * 288, expected_hist * 288, region_of
            )
            shocks = [
                _estimate_shocks(
                    temp_hist[r],
                    solar_hist[r],
                    vendor_share_hist,
                    wave_obs,
                    lead_h=(w_lo + w_hi) / 2 + 24.0 - cfg.forecast_local_h,
                )
                for r in range(n_reg)
            ]
            for r, reg in enumerate(regions):
                rows = np.flatnonzero(region_of == r)
                now_ms = origin[r] + fc_step * STEP_MS
                start_ms = origin[r] + d * m.DAY_MS + window_step0 * STEP_MS
                end_ms = start_ms + t_count * STEP_MS
                n_fc = int((end_ms - now_ms) // STEP_MS) + 1
                sl = slice(fc_step, fc_step + n_fc)
                temp_fc = (
                    temp_true[r, sl]
                    + temp_err_day[d, r]
                    + truth.temp_hourly_sigma_c * (rng.standard_normal(n_fc))
                )
                ghi_fc = ghi_true[r, sl] / solar_err_day[d, r]
                # What thermostats report outside now, against the climate.
                departure_now = float(temp_true[r, fc_step] - temp_climate[r, fc_step])
                wf = m.WeatherForecast(
                    now_ms,
                    STEP_S,
                    ghi_fc,
                    temp_fc,
                    float(tz[r]),
                    temp_climate_c=temp_climate[r, sl],
                    observed_departure_c=departure_now,
                )
                hist_days = d - 1
                calib = m.RegionCalibration(
                    calibrated=hist_days >= 7,
                    online_rate=online_rate if hist_days >= 1 else None,
                    optout_rate=optout_rate if hist_days >= 1 else None,
                    shocks=shocks[r],
                    # As the live calibrator learns it (days × intervals).
                    quantiles=m.fit_quantile_map(
                        np.array(pits[r][-PIT_DAYS:]) if pits[r] else np.zeros((0, t_count))
                    ),
                    consecutive_event_days=int(consecutive[d]),
                    # Only the steps reported by forecast time (the last two weeks).
                    home_load=m.estimate_home_load(
                        load_obs_w[max(fc_step - LOAD_DAYS * steps_per_day, 0) : fc_step][
                            :, reg_b == r
                        ],
                        load_mod_w[max(fc_step - LOAD_DAYS * steps_per_day, 0) : fc_step],
                    ),
                )
                dev = m.region_devices(now_snap, rows, calib)
                nameplate[r] = dev.nameplate_kw / 1000.0
                res_fc = m.forecast_region(
                    reg,
                    dev,
                    wf,
                    now_ms,
                    start_ms,
                    end_ms,
                    STEP_S,
                    calib,
                    n_scenarios=cfg.n_scenarios,
                    seed=int(rng_fc.integers(1 << 31)),
                    keep_scenarios=True,
                )
                p50[d, r], p90[d, r] = res_fc.p50_mw, res_fc.p90_mw
                calibrated[d, r] = res_fc.calibrated
                scen = res_fc.scenarios_mw
                assert scen is not None
                pending[r] = scen  # scored once the outcome is known (below)
                # The forecast's temperature error for the window is learnt after the fact.
                win = slice(
                    d * steps_per_day + window_step0, d * steps_per_day + window_step0 + t_count
                )
                temp_hist[r].append(
                    (
                        float(np.mean(temp_fc[-t_count - 1 : -1])),
                        float(np.mean(temp_true[r, win])),
                        float(np.mean(temp_climate[r, win])),
                        departure_now,
                    )
                )
                before = slice(fc_step, fc_step + n_fc - t_count)
                solar_hist[r].append(
                    (
                        float(ghi_fc[: n_fc - t_count].sum()),
                        float(ghi_true[r, before].sum()),
                    )
                )

        # ---- What the fleet could actually deliver on day d ---------------------------------
        online = online_draw(d)
        r_scale = m.optout_scale(event_h, int(consecutive[d]))
        kind_slot = np.where(bat, 0, 1)
        p_opt = np.clip(fleet.optout_r * r_scale * wave[d, region_of, kind_slot], 0.0, 1.0)
        opted = rng.random(n) < p_opt
        avail = online & ~opted & snap.enrolled
        step0 = d * steps_per_day + window_step0
        kw_bat = physics.battery_deliverable_kw(soc_path[step0], cap, dis, res, event_h)
        kw_bat = np.maximum(kw_bat - own_max_w[d] / 1000.0, 0.0)
        for r in range(n_reg):
            in_r = region_of == r
            mw = np.zeros(t_count)
            b_sel = in_r[b_idx]
            mw += (kw_bat * avail[b_idx] * b_sel).sum()
            t_sel = in_r[th_idx]
            for k in range(t_count):
                # Flat for the window (staggered starts), as the forecast quotes it.
                shed = physics.thermostat_flat_shed(
                    sp_th[t_sel],
                    temp_true[r, step0 + k],
                    offsets[t_sel],
                    event_h,
                    snap.hvac_rated_w[th_idx][t_sel] / 1000.0,
                    r_c_per_kw=fleet.r_c_per_kw[th_idx][t_sel],
                    c_kwh_per_c=fleet.c_kwh_per_c[th_idx][t_sel],
                )
                mw[k] += float((shed * avail[th_idx][t_sel]).sum())
            realised[d, r] = mw / 1000.0
            if d >= 1:
                pits[r].append(m.pit(pending[r], realised[d, r]))
            # Opt-out acks of the day's event (if there was one): the per-event wave evidence.
            if event_day[d]:
                for kmask in (bat, th):
                    sel = in_r & kmask & online
                    r_hat = np.where(np.isnan(optout_rate[sel]), default_r[sel], optout_rate[sel])
                    wave_obs.append(
                        (
                            float(opted[sel].sum()),
                            float(sel.sum()),
                            float(r_hat.mean() * r_scale) if sel.any() else 0.0,
                        )
                    )
        # ---- History the service would have recorded -----------------------------------------
        online_hist += online
        expected_hist += 1.0
        vendor_share = np.zeros((n_reg, n_vendors))
        for r in range(n_reg):
            for v in range(n_vendors):
                sel = (region_of == r) & (snap.vendor_codes == v)
                vendor_share[r, v] = online[sel].mean() if sel.any() else np.nan
        vendor_share_hist.append(vendor_share.reshape(-1))
        if event_day[d]:
            part = online & snap.enrolled & (bat | th)
            opted_hist += opted & part
            trials_hist += part * r_scale  # trials in units of 2 h fresh-day events

    # Baselines: yesterday's realised; nameplate × constant derates fit on the history days.
    yesterday = np.zeros_like(realised)
    yesterday[1:] = realised[:-1]
    hist = slice(1, cfg.history_days + 1)
    ratio = realised[hist] / np.maximum(nameplate[None, :, None], 1e-9)
    derate10 = float(np.quantile(ratio, 0.1))
    derate50 = float(np.quantile(ratio, 0.5))
    derate_p10 = np.broadcast_to(nameplate[None, :, None] * derate10, realised.shape).copy()
    derate_p50 = np.broadcast_to(nameplate[None, :, None] * derate50, realised.shape).copy()
    test_mask = np.zeros(n_days, bool)
    test_mask[cfg.history_days + 1 :] = True
    return BacktestReport(
        cfg, realised, p50, p90, yesterday, derate_p10, derate_p50, calibrated, test_mask
    )


def _estimate_shocks(
    temp: list[tuple[float, float, float, float]],
    solar: list[tuple[float, float]],
    vendor_share: list[F64],
    wave_obs: list[tuple[float, float, float]],
    lead_h: float,
) -> m.ShockParams:
    prior = m.ShockParams()
    fc, obs, clim, now = np.array(temp).reshape(-1, 4).T
    temp_bias, temp_skill, temp_sigma, persistence = m.estimate_temp_mos(
        fc, obs, clim, prior, now, lead_h
    )
    p_out, depth = m.estimate_vendor_outages(
        np.array(vendor_share) if vendor_share else np.zeros((0, 0)), prior.vendor_outage_p
    )
    s_fc, s_obs = np.array(solar).reshape(-1, 2).T
    solar_sigma = m.estimate_solar_sigma(s_fc, s_obs, prior.solar_sigma)
    wave = np.array(wave_obs) if wave_obs else np.zeros((0, 3))
    wave_sigma = m.estimate_wave_sigma(wave[:, 0], wave[:, 1], wave[:, 2], prior.optout_wave_sigma)
    return replace(
        prior,
        temp_sigma_c=temp_sigma,
        temp_bias_c=temp_bias,
        temp_skill=temp_skill,
        temp_persistence=persistence,
        vendor_outage_p=p_out,
        vendor_outage_depth=depth,
        solar_sigma=solar_sigma,
        optout_wave_sigma=wave_sigma,
    )
