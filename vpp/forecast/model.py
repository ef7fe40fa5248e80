"""The forecaster, pure: flexible MW per region and interval as a distribution, by scenarios.

How it scales (1 M devices × 192 intervals in well under a second of numpy):
1. Devices are grouped into clusters (kind × vendor × state bucket × online-now) with one
   ``np.unique``; a cluster carries its mean physics parameters and the SUMS of its members'
   availability probabilities, which is all the expectation needs (it is linear in them).
2. Physics runs per cluster, not per device: thermostat shed at each interval for a grid of
   outdoor-temperature errors, battery power from the state of charge projected to each event's
   start for a grid of solar outcomes.
3. Scenarios draw the shocks that move many devices together, per region and lead day:
   temperature forecast error, a vendor's cloud going down, an opt-out wave (scaled by event
   length and consecutive event days), a cloudy or sunny day for battery charging. Device-level
   independent noise (online/opt-out coin flips) enters in closed form as a binomial variance.
   What history teaches enters through :class:`RegionCalibration`: per-device online and
   opt-out rates, the shocks' sizes, how to read the temperature forecast against the climate
   (its skill and bias), and the homes behind the batteries (:class:`HomeLoad`: their evening
   level, its swing, and the spread of homes around it). Whether a battery serves its home at
   all (self-consumption) or is held in backup mode is read from its last report
   (:func:`home_use`), not guessed from the registry's count of solar devices.
4. P90 = the value exceeded in 90 % of scenarios = the 10th percentile; a firmness f asks for the
   (1 − f) quantile. A :class:`QuantileMap` learnt from past forecast-vs-realised outcomes
   (probability integral transforms) moves the levels so that the P90 holds ~90 % of the time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from vpp import physics
from vpp.fleet.snapshot import BATTERY, SOLAR, THERMOSTAT, FleetSnapshot
from vpp.flexibility import battery_inputs, thermostat_inputs
from vpp.weather import WeatherYear

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

HOUR_MS = 3_600_000
DAY_MS = 86_400_000

# --- Defaults from the domain brief (used until history says otherwise) -------------------------
DEFAULT_ONLINE_RATE = 0.95  # share of intervals a device reports; brief: realised 67–79 % of plan
DEFAULT_OPTOUT_AT_2H = {BATTERY: 0.03, THERMOSTAT: 0.10, SOLAR: 0.0}  # brief: ~10 % at 2 h
OPTOUT_DURATION_EXPONENT = 0.7  # overrides grow with duration: 10 % at 2 h → 16 % at 4 h
OPTOUT_PER_CONSECUTIVE_DAY = 0.2  # +20 % of the base rate per consecutive event day before
MAX_EVENT_H = 5.0  # events last 1–5 h: a longer window is served as consecutive events
# Home load that batteries cover outside events (self-consumption), W by local hour.
HOME_LOAD_W = np.array(
    [
        500,
        450,
        450,
        450,
        450,
        500,
        700,
        900,
        800,
        700,
        650,
        650,
        650,
        650,
        700,
        800,
        1000,
        1400,
        1600,
        1600,
        1400,
        1100,
        800,
        600,
    ],
    dtype=float,
)
# Home load is learnt from the evening hours after sunset (local, from this hour to midnight),
# when homes draw on their batteries and most still have charge.
HOME_LOAD_EVENING_H = 17.0
PRIOR_STEPS = 24.0
PRIOR_HOMES = 20.0  # homes that weigh as much as the prior spread of their scales
MAX_PV_PER_BATTERY_W = 10_000.0
# Shock grids: physics is evaluated at these points and scenarios interpolate between them.
TEMP_GRID_C = np.linspace(-8.0, 8.0, 17)
SOLAR_GRID = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])


@dataclass(frozen=True)
class ShockParams:
    """Magnitudes of the common shocks. Defaults are priors; :func:`estimate_*` learn them."""

    temp_sigma_c: float = 1.5  # day-ahead error of the outdoor temperature, per region-day
    # How the temperature forecast is read (model output statistics, learnt by
    # :func:`estimate_temp_mos`): the climate plus ``temp_skill`` times the forecast's departure
    # from it, plus ``temp_bias_c``. A forecast whose departures are partly noise earns a skill
    # below 1; without a climate only the bias applies.
    temp_bias_c: float = 0.0
    temp_skill: float = 1.0
    # Share of the departure from the climate reported now that is still there a day later
    # (learnt by :func:`estimate_temp_mos`); it fades as ``temp_persistence ** (lead / 24 h)``
    # and weighs against the forecast's reading: at lead 0 the reading is what devices report.
    temp_persistence: float = 0.0
    temp_sigma_growth_per_day: float = 0.3  # relative growth of that error per lead day
    vendor_outage_p: float = 0.02  # probability a vendor's cloud is down on a given day
    vendor_outage_depth: tuple[float, float] = (0.5, 1.0)  # share of its fleet lost, uniform
    optout_wave_sigma: float = 0.4  # log-sd of the opt-out multiplier shared by a region-day
    solar_sigma: float = 0.3  # sd of the day's solar energy against its forecast (relative)
    persistence_h: float = 2.0  # how long a device's present online/offline state persists


@dataclass(frozen=True)
class QuantileMap:
    """Recalibration of quantile levels from past probability integral transforms (PIT).

    A PIT is the share of a past forecast's scenarios below what was realised. If forecasts were
    perfectly calibrated PITs would be uniform; the level that makes the realised value fall
    below the forecast quantile with probability q is the q-quantile of the PITs (conformal /
    Kuleshov recalibration). With few PITs the map shrinks toward the identity.
    """

    pits: F64 = field(default_factory=lambda: np.zeros(0))
    prior_strength: float = 20.0
    # Lower quantiles aim a little inside the promise: a P90 aims to hold 91 % of the time
    # (inside the accepted 88–95 % band) because a shortfall costs the buyer's penalty,
    # about $1,150/MWh, while unsold capacity costs only the margin.
    guard: float = 0.1

    def level(self, q: float | F64) -> F64:
        q_arr = np.asarray(q, dtype=float)
        aim = np.where(q_arr < 0.5, q_arr * (1.0 - self.guard), q_arr)
        n = self.pits.size
        if n == 0:
            return aim
        learnt = np.quantile(self.pits, np.clip(aim, 0.0, 1.0))
        w = n / (n + self.prior_strength)
        return np.clip(w * learnt + (1.0 - w) * aim, 0.0005, 0.9995)


@dataclass(frozen=True)
class HomeLoad:
    """How a region's battery homes' own load runs against :data:`HOME_LOAD_W`, learnt from
    what their batteries report outside events (:func:`estimate_home_load`).

    ``level``: the mean load over the typical profile. ``sigma``, ``rho``: the log-sd of the
    region's load against that level at one 15-minute step, and its lag-one autocorrelation
    (homes' evenings move together: a hot night, a big game). A battery holds its setpoint
    through an event, so what it can promise above its home is its deliverable power less the
    home's HIGHEST own draw inside the window: the peak of a noisy load, higher than its mean by
    :meth:`peak_factor`."""

    level: float = 1.0
    sigma: float = 0.15
    rho: float = 0.5
    samples: int = 0  # 15-minute steps it was learnt from (0: the prior)
    # Log-sd of homes' own scales around the level: big users drain their batteries overnight
    # and draw more in the window, small ones keep charge; one mean home would make the fleet
    # swing all at once with the sun, where the real one is smoothed by its spread.
    spread: float = 0.3

    def scales(self) -> tuple[F64, F64]:
        """Homes' scales (over the level, mean one) and their weights: three-point
        Gauss–Hermite nodes of the lognormal spread."""
        x = np.array([-np.sqrt(3.0), 0.0, np.sqrt(3.0)])
        w = np.array([1.0, 4.0, 1.0]) / 6.0
        s = np.exp(self.spread * x)
        return s / float((w * s).sum()), w

    def peak_factor(self, n_steps: int) -> float:
        """E[max over ``n_steps`` consecutive steps of the load] over its mean level."""
        return float(self.peaks(n_steps).mean())

    def peaks(self, n_steps: int) -> F64:
        """Draws of the window's peak over the mean level: one evening's, common to the
        region's homes (sorted)."""
        return _peaks(round(self.sigma, 3), round(self.rho, 2), max(int(n_steps), 1))


@lru_cache(maxsize=256)
def _peaks(sigma: float, rho: float, n_steps: int) -> F64:
    # AR(1) in logs with a stationary sd of sigma, mean-one in level; a fixed seed: the same
    # inputs give the same forecast.
    rng = np.random.default_rng(12345)
    paths = 4000
    x = np.empty((paths, n_steps))
    x[:, 0] = rng.standard_normal(paths)
    innovation = np.sqrt(max(1.0 - rho * rho, 0.0))
    for k in range(1, n_steps):
        x[:, k] = rho * x[:, k - 1] + innovation * rng.standard_normal(paths)
    level = np.exp(sigma * x - sigma * sigma / 2.0)
    out = np.sort(level.max(axis=1))
    out.setflags(write=False)
    return out


# The home-load peaks the battery table is evaluated at (quantiles of the evening's peak);
# scenarios interpolate between them, as between the solar outcomes.
PEAK_QUANTILES = np.array([0.05, 0.5, 0.95])


def estimate_home_load(
    observed_w: npt.ArrayLike, modelled_w: npt.ArrayLike, prior: HomeLoad | None = None
) -> HomeLoad:
    """The home load learnt from a region's batteries that serve their homes (a backup-mode
    battery reports 0 W outside events).

    ``observed_w`` (steps × batteries): each battery's reported output (W, + discharging) at
    15-minute steps where the sun is down, nobody is commanded and that battery is above its
    reserve, NaN elsewhere; ``modelled_w`` (steps,): :data:`HOME_LOAD_W` at the same steps.
    Each home's own scale is its mean ratio to the profile (so homes that run down early, the
    big users, still count at their own level); the region's level is their mean, the homes'
    spread the log-sd of the scales of those seen at 8 steps or more, and the region's noise
    (log-sd, lag-one autocorrelation) that of the steps' mean ratio to those scales. Shrunk
    toward ``prior`` while data is short (``PRIOR_STEPS`` steps weigh as much as the prior: two
    evenings)."""
    prior = prior or HomeLoad()
    obs = np.asarray(observed_w, float)
    mod = np.asarray(modelled_w, float)
    if obs.ndim != 2 or obs.shape[0] != mod.size or obs.size == 0:
        return prior
    ok = np.isfinite(obs) & (obs > 0.0) & (np.isfinite(mod) & (mod > 1.0))[:, None]
    ratio = np.where(ok, obs / np.where(mod > 1.0, mod, 1.0)[:, None], np.nan)
    per_home = ok.sum(axis=0)
    homes = per_home >= 1  # the big users run down early: one step of theirs counts too
    if not homes.any():
        return prior
    scale = np.nanmean(ratio[:, homes], axis=0)
    norm = ratio[:, homes] / scale[None, :]
    seen = np.isfinite(norm).sum(axis=1)
    step_ratio = np.full(norm.shape[0], np.nan)
    step_ratio[seen > 0] = np.nanmean(norm[seen > 0], axis=1)
    steps = np.isfinite(step_ratio) & (step_ratio > 0)
    n = int(steps.sum())
    if n < 8:
        return prior
    w = n / (n + PRIOR_STEPS)
    level = w * float(np.mean(scale)) + (1 - w) * prior.level
    # Homes' spread from those seen often enough for their own scale to mean something.
    steady = per_home[homes] >= 8
    spread = prior.spread
    if steady.sum() >= 5:
        ws = float(steady.sum()) / (float(steady.sum()) + PRIOR_HOMES)
        spread = ws * float(np.std(np.log(scale[steady]))) + (1 - ws) * prior.spread
    logs = np.log(np.where(steps, step_ratio, 1.0))
    sigma = w * float(np.std(logs[steps])) + (1 - w) * prior.sigma
    pairs = steps[1:] & steps[:-1]
    rho = prior.rho
    a, b = logs[1:][pairs], logs[:-1][pairs]
    if pairs.sum() >= 8 and a.std() > 1e-9 and b.std() > 1e-9:
        wr = float(pairs.sum()) / (float(pairs.sum()) + PRIOR_STEPS)
        rho = wr * float(np.corrcoef(a, b)[0, 1]) + (1 - wr) * prior.rho
    return HomeLoad(
        level=float(np.clip(level, 0.2, 5.0)),
        sigma=float(np.clip(sigma, 0.0, 1.0)),
        rho=float(np.clip(rho, -0.5, 0.99)),
        samples=n,
        spread=float(np.clip(spread, 0.0, 1.0)),
    )


@dataclass
class RegionCalibration:
    """What history taught about one region. Per-device arrays align with the snapshot rows
    (NaN: no history for that device → the brief's default)."""

    calibrated: bool = False
    online_rate: F64 | None = None
    optout_rate: F64 | None = None  # at a 2 h event
    shocks: ShockParams = field(default_factory=ShockParams)
    quantiles: QuantileMap = field(default_factory=QuantileMap)
    consecutive_event_days: int = 0
    home_load: HomeLoad = field(default_factory=HomeLoad)


@dataclass(frozen=True)
class WeatherForecast:
    """Forecast weather for one region on a regular grid from ``start_ms`` (pure data)."""

    start_ms: int
    dt_s: int
    ghi_w_m2: F64
    temp_c: F64
    tz_offset_h: float = 0.0
    temp_climate_c: F64 | None = None  # the climate's temperature on the same grid, if known
    # The outdoor temperature devices report at ``start_ms`` less the climate then (less the
    # forecast then, without a climate); None: nobody reports one.
    observed_departure_c: float | None = None

    def at(self, epoch_ms: npt.ArrayLike) -> tuple[F64, F64]:
        t = (np.asarray(epoch_ms, dtype=float) - self.start_ms) / (self.dt_s * 1000.0)
        x = np.arange(self.ghi_w_m2.size, dtype=float)
        return np.interp(t, x, self.ghi_w_m2), np.interp(t, x, self.temp_c)

    def read(self, shocks: ShockParams) -> WeatherForecast:
        """The forecast as its learnt skill, bias and persistence say to read it
        (:class:`ShockParams`): the climate plus the believed share of the forecast's departure
        from it, blended with the departure reported now as far as it persists at each lead."""
        clim = self.temp_c if self.temp_climate_c is None else self.temp_climate_c
        now = np.nan if self.observed_departure_c is None else self.observed_departure_c
        reading = believed_departure(
            self.temp_c - clim,
            now,
            shocks.temp_skill,
            shocks.temp_persistence,
            np.arange(self.temp_c.size) * self.dt_s / 3600.0,
        )
        temp = clim + reading + shocks.temp_bias_c
        return replace(
            self, temp_c=np.asarray(temp, float), temp_climate_c=None, observed_departure_c=None
        )


def believed_departure(
    forecast_departure_c: npt.ArrayLike,
    departure_now_c: npt.ArrayLike,
    skill: float,
    persistence: float,
    lead_h: npt.ArrayLike,
) -> F64:
    """The departure from the climate a forecast is read as: ``skill`` times the forecast's,
    blended with the departure reported now (NaN: none) by the share of it still there
    ``lead_h`` hours on, ``persistence ** (lead / 24 h)``."""
    reading = skill * np.asarray(forecast_departure_c, float)
    if persistence <= 0:
        return reading
    now = np.asarray(departure_now_c, float)
    carried = persistence ** (np.asarray(lead_h, float) / 24.0)
    blended = carried * np.nan_to_num(now) + (1.0 - carried) * reading
    return np.asarray(np.where(np.isfinite(now), blended, reading), float)


def typical_year_forecast(
    wy: WeatherYear, start_ms: int, dt_s: int, n_steps: int, observed_c: float | None = None
) -> WeatherForecast:
    """A region's typical year (and its climate) as the forecast from ``start_ms``: what the
    service forecasts with, having no weather service; ``observed_c``: the outdoor temperature
    its devices report at ``start_ms`` (None: none), which the reading blends in
    (:meth:`WeatherForecast.read`)."""
    times = start_ms + np.arange(max(n_steps, 2), dtype=np.int64) * dt_s * 1000
    ghi, temp = wy.sample(times)
    clim = wy.climate_temp(times)
    departure = None
    if observed_c is not None and np.isfinite(observed_c):
        departure = float(observed_c) - float(clim[0])
    return WeatherForecast(
        start_ms,
        dt_s,
        ghi,
        temp,
        wy.tz_offset_h,
        temp_climate_c=clim,
        observed_departure_c=departure,
    )


@dataclass
class ForecastResult:
    region: str
    starts_ms: I64
    step_s: int
    p50_mw: F64
    p90_mw: F64
    firm_mw: F64  # at the requested firmness, else = p90
    calibrated: bool
    n_devices: int
    firmness: float | None = None
    event_h: float = 2.0
    expected_mw: F64 = field(default_factory=lambda: np.zeros(0))
    scenarios_mw: F64 | None = None  # (S, T), kept only when asked for (back-tests)

    def quantile(self, q: float) -> F64:
        if self.scenarios_mw is None:
            raise ValueError("scenarios were not kept")
        return np.quantile(self.scenarios_mw, q, axis=0)


def quantile_for_firmness(firmness: float) -> float:
    """A firmness f (delivered with probability ≥ f) is the (1 − f) quantile of the MW."""
    if not 0.5 <= firmness <= 0.99:
        raise ValueError("firmness must be within 0.5–0.99")
    return 1.0 - firmness


def interval_starts(start_ms: int, end_ms: int, step_s: int) -> I64:
    return np.arange(start_ms, end_ms, step_s * 1000, dtype=np.int64)


def event_hours(start_ms: int, end_ms: int) -> float:
    """Length of the event each interval is served by: the window, cut to the longest event."""
    return float(min(max((end_ms - start_ms) / HOUR_MS, 0.25), MAX_EVENT_H))


def optout_scale(event_h: float, consecutive_days: int) -> float:
    """Opt-out rate relative to a 2 h event on a fresh day."""
    return float(
        (event_h / 2.0) ** OPTOUT_DURATION_EXPONENT
        * (1 + OPTOUT_PER_CONSECUTIVE_DAY * max(consecutive_days, 0))
    )


def home_load_w(epoch_ms: npt.ArrayLike, tz_offset_h: float) -> F64:
    hour = (np.asarray(epoch_ms, dtype=float) / HOUR_MS + tz_offset_h) % 24.0
    lo = np.floor(hour).astype(int) % 24
    frac = hour - np.floor(hour)
    return HOME_LOAD_W[lo] * (1 - frac) + HOME_LOAD_W[(lo + 1) % 24] * frac


# --- Clusters ------------------------------------------------------------------------------------
@dataclass
class Clusters:
    """Devices of one kind in one region, grouped. Sums are over members."""

    vendor: I64  # (C,)
    n: F64  # members
    online_now: F64  # 1 if the cluster's members are dispatchable now, else 0
    sum_p: F64  # Σ long-run online rate
    sum_r: F64  # Σ opt-out rate (2 h event)
    sum_pr: F64  # Σ p·r
    params: dict[str, F64]  # mean physics parameters


def _bucket(x: F64, width: float, lo: float, n: int) -> I64:
    return np.clip(np.floor((np.nan_to_num(x, nan=lo) - lo) / width), 0, n - 1).astype(np.int64)


def _cluster(
    keys: list[tuple[I64, int]],
    vendor: I64,
    online_now: npt.NDArray[np.bool_],
    p: F64,
    r: F64,
    params: dict[str, F64],
) -> Clusters:
    """Group rows by the mixed-radix key and sum/mean what the forecast needs."""
    key = np.zeros(vendor.size, dtype=np.int64)
    for digits, radix in keys:
        key = key * radix + digits
    uniq, inv = np.unique(key, return_inverse=True)
    c = uniq.size
    n = np.bincount(inv, minlength=c).astype(float)

    def total(w: F64) -> F64:
        return np.asarray(np.bincount(inv, weights=w, minlength=c), dtype=float)

    first = np.zeros(c, dtype=np.int64)
    first[inv[::-1]] = np.arange(inv.size)[::-1]  # any member: vendor/online are in the key
    return Clusters(
        vendor=vendor[first].astype(np.int64),
        n=n,
        online_now=online_now[first].astype(float),
        sum_p=total(p),
        sum_r=total(r),
        sum_pr=total(p * r),
        params={k: total(v) / n for k, v in params.items()},
    )


def _rates(n: int, given: F64 | None, default: float) -> F64:
    if given is None:
        return np.full(n, default)
    return np.where(np.isnan(given), default, np.clip(given, 0.0, 1.0))


# What a battery's last report says of how it is run outside events (:func:`home_use`).
HELD, SERVING, UNKNOWN_USE = 0, 1, 2
# Output below this (W, either way) is a battery standing still: metering noise, not a home.
SERVING_MIN_W = 50.0


def home_use(power_w: F64, soc_pct: F64, reserve_pct: F64) -> npt.NDArray[np.int64]:
    """How each battery is run outside events, from its last report: ``SERVING`` its home
    (self-consumption: it discharges into the home's load or charges from its PV), ``HELD``
    (backup mode: it reports 0 W with charge to spare), or ``UNKNOWN_USE`` when its report
    cannot tell (none, or standing still because it is empty or full: a self-consuming
    battery at its reserve overnight or full at noon reads 0 W too)."""
    p = np.asarray(power_w, dtype=float)
    soc = np.asarray(soc_pct, dtype=float)
    moving = np.isfinite(p) & (np.abs(p) >= SERVING_MIN_W)
    still = np.isfinite(p) & ~moving & (soc > np.asarray(reserve_pct, float) + 5.0) & (soc < 99.0)
    return np.where(moving, SERVING, np.where(still, HELD, UNKNOWN_USE)).astype(np.int64)


def _serving_share(use: npt.NDArray[np.int64], pv_share: float) -> F64:
    """Per battery, the probability that it serves its home: 1 or 0 where its report says.
    For the rest: the region's PV homes (solar devices per battery, the registry's only hint)
    not already seen serving, spread over them; with no PV in the registry, the share of the
    batteries whose reports tell that serve."""
    n_unknown = int((use == UNKNOWN_USE).sum())
    seen = int((use == SERVING).sum())
    known = int(use.size - n_unknown)
    if pv_share > 0 or known == 0:
        rest = pv_share * use.size - seen
        prior = float(np.clip(rest / max(n_unknown, 1), 0.0, 1.0))
    else:
        prior = seen / known
    return np.where(use == SERVING, 1.0, np.where(use == HELD, 0.0, prior))


@dataclass
class RegionDevices:
    """One region's rows of a snapshot: the forecaster's input (built once per snapshot)."""

    n_devices: int
    n_vendors: int
    batteries: Clusters | None
    thermostats: Clusters | None
    pv_share: float  # share of battery homes with PV
    pv_w: float  # mean PV size of those homes
    nameplate_kw: float
    # Mean reported output of the region's fresh batteries now (kW, + discharging), None when
    # too few report: anchors the model of their own output through a window.
    battery_own_kw_now: float | None = None


def region_devices(
    snap: FleetSnapshot,
    rows: npt.NDArray[np.int64],
    calib: RegionCalibration,
) -> RegionDevices:
    """Cluster a region's devices (``rows`` index the snapshot); vectorised, no device loop.
    Each device's inputs, and the defaults for what it has not reported, come from
    ``vpp.flexibility`` (as for the fleet view and the optimiser)."""
    kind = snap.kind_codes[rows]
    enrolled = snap.enrolled[rows]
    online_now = snap.dispatchable()[rows]
    vendor = snap.vendor_codes[rows].astype(np.int64)
    n_vendors = max(len(snap.vendors), 1)
    st = snap.state[rows]
    p_all = _rates(
        rows.size,
        None if calib.online_rate is None else calib.online_rate[rows],
        DEFAULT_ONLINE_RATE,
    )
    p_all = np.where(enrolled, p_all, 0.0)  # not enrolled: never available
    r_given = None if calib.optout_rate is None else calib.optout_rate[rows]

    bat_rows = np.flatnonzero((kind == BATTERY) & enrolled)
    th_rows = np.flatnonzero((kind == THERMOSTAT) & enrolled)
    solar_rows = np.flatnonzero(kind == SOLAR)

    # PV attached to battery homes: the registry does not pair them, so assume the region's
    # solar devices sit in battery homes first (share ≤ 1) at their mean size.
    n_bat = max(bat_rows.size, 1)
    solar_rated = np.nan_to_num(snap.rated_w[rows][solar_rows], nan=0.0)
    pv_share = float(min(1.0, solar_rows.size / n_bat)) if bat_rows.size else 0.0
    pv_w = float(min(solar_rated.mean(), MAX_PV_PER_BATTERY_W)) if solar_rows.size else 0.0

    batteries = None
    battery_kw = 0.0
    if bat_rows.size:
        b_inp = battery_inputs(snap, rows[bat_rows])
        soc, cap, reserve = b_inp.soc_pct, b_inp.capacity_wh, b_inp.reserve_pct
        dis, chg = b_inp.max_discharge_w, b_inp.max_charge_w
        battery_kw = float(dis.sum()) / 1000.0
        use = home_use(st["power_w"][bat_rows], soc, reserve)
        serving_p = _serving_share(use, pv_share)
        r = _rates(
            bat_rows.size,
            None if r_given is None else r_given[bat_rows],
            DEFAULT_OPTOUT_AT_2H[BATTERY],
        )
        batteries = _cluster(
            [
                (vendor[bat_rows], n_vendors),
                (_bucket(soc, 2.5, 0.0, 41), 41),
                (_bucket(cap, 1000.0, 0.0, 64), 64),
                (_bucket(dis, 500.0, 0.0, 64), 64),
                (_bucket(chg, 1000.0, 0.0, 32), 32),
                (_bucket(reserve, 5.0, 0.0, 21), 21),
                (use, 3),
                (online_now[bat_rows].astype(np.int64), 2),
            ],
            vendor[bat_rows],
            online_now[bat_rows],
            p_all[bat_rows],
            r,
            {
                "soc_pct": soc,
                "capacity_wh": cap,
                "max_discharge_w": dis,
                "max_charge_w": chg,
                "reserve_pct": reserve,
                "serving": serving_p,
            },
        )

    thermostats = None
    if th_rows.size:
        t_inp = thermostat_inputs(snap, rows[th_rows])
        # Not asked (no mode or setpoint reported, or mode off): off, at offset 0.
        mode = np.where(t_inp.usable, t_inp.mode, physics.MODE_OFF)
        sp, rated = t_inp.setpoint_c, t_inp.rated_kw * 1000.0
        off_cool, off_heat = t_inp.offset_cool_c, t_inp.offset_heat_c
        r = _rates(
            th_rows.size,
            None if r_given is None else r_given[th_rows],
            DEFAULT_OPTOUT_AT_2H[THERMOSTAT],
        )
        # A unit switched off sheds nothing: it keeps its cluster (mode in the key) at offset 0.
        thermostats = _cluster(
            [
                (vendor[th_rows], n_vendors),
                (mode, 4),
                (_bucket(sp, 0.5, 10.0, 41), 41),
                (_bucket(rated, 500.0, 0.0, 40), 40),
                (_bucket(off_cool, 0.25, 0.0, 13), 13),
                (_bucket(off_heat, 0.25, 0.0, 13), 13),
                (online_now[th_rows].astype(np.int64), 2),
            ],
            vendor[th_rows],
            online_now[th_rows],
            p_all[th_rows],
            r,
            {
                "setpoint_c": sp,
                "rated_kw": rated / 1000.0,
                "off_cool": off_cool,
                "off_heat": off_heat,
                "mode": mode.astype(float),
            },
        )

    nameplate_kw = battery_kw + 1.1 * th_rows.size  # brief: ~1.1 kW of 1 h shift per thermostat
    power = st["power_w"][bat_rows[online_now[bat_rows]]].astype(float)
    power = power[np.isfinite(power)]
    # A handful of reports is no fleet mean: below 5, keep the model's own guess.
    own_now = None
    if power.size >= 5:
        own_now = float(np.clip(power, -20_000.0, 20_000.0).mean()) / 1000.0
    return RegionDevices(
        int(rows.size),
        n_vendors,
        batteries,
        thermostats,
        pv_share,
        pv_w,
        nameplate_kw,
        battery_own_kw_now=own_now,
    )


# --- Physics per cluster --------------------------------------------------------------------------
def _thermostat_table(cl: Clusters, out_c: F64, event_h: float) -> F64:
    """Shed kW per member a fleet holds flat through an event of ``event_h`` (staggered starts,
    :func:`vpp.physics.thermostat_flat_shed`), shape (C, T, K) over intervals ×
    temperature errors."""
    prm = cl.params
    sp = prm["setpoint_c"][:, None, None]
    temp = out_c[None, :, None] + TEMP_GRID_C[None, None, :]
    mode = np.rint(prm["mode"]).astype(np.int64)[:, None, None]
    heating = (mode == physics.MODE_HEAT) | ((mode == physics.MODE_AUTO) & (temp < sp))
    offset = np.where(heating, prm["off_heat"][:, None, None], prm["off_cool"][:, None, None])
    shed = physics.thermostat_flat_shed(
        sp, temp, offset, event_h, prm["rated_kw"][:, None, None], heating=heating
    )
    return np.where(mode == physics.MODE_OFF, 0.0, np.nan_to_num(shed))


def _pv_unit_and_load(weather: WeatherForecast, times_ms: npt.ArrayLike) -> tuple[F64, F64]:
    """PV output per W of rated PV, and a home's load (W), at ``times_ms``."""
    ghi, temp = weather.at(times_ms)
    return physics.solar_power_w(ghi, 1.0, temp), home_load_w(times_ms, weather.tz_offset_h)


def _battery_tables(
    cl: Clusters,
    dev: RegionDevices,
    weather: WeatherForecast,
    now_ms: int,
    event_starts_ms: I64,
    event_h: float,
    home: HomeLoad,
    peaks: F64,
) -> list[F64]:
    """Deliverable kW per member, shape (C, E, K) over event starts × solar outcomes, one table
    per home-load peak of ``peaks`` (the homes' draw in the window at that times its level).
    The state of charge is projected once: the window's peak does not move it."""
    prm = cl.params
    step_ms = weather.dt_s * 1000
    n_steps = int(max(0, np.ceil((event_starts_ms.max() - now_ms) / step_ms)))
    times = now_ms + np.arange(n_steps, dtype=np.int64) * step_ms + step_ms // 2
    pv_unit, load = _pv_unit_and_load(weather, times)
    load = load * home.level  # the region's own level, learnt from its batteries
    # Axis 0: the variants of a home (serving it at each of its load scales, or held);
    # 1: clusters; 2: solar outcomes.
    v_load, v_pv, v_weight = _home_variants(cl, dev, home)
    pv_size = v_pv[:, None, None]
    pv = pv_unit[:, None, None, None] * pv_size[None] * SOLAR_GRID[None, None, None, :]
    load_by_variant = load[:, None, None, None] * v_load[None, :, None, None]
    shape = (v_load.size, cl.n.size, SOLAR_GRID.size)

    def b(name: str) -> F64:
        return np.broadcast_to(prm[name][None, :, None], shape)

    if n_steps:
        soc_path = physics.battery_soc_projection(
            b("soc_pct"),
            b("capacity_wh"),
            b("max_discharge_w"),
            b("max_charge_w"),
            b("reserve_pct"),
            pv,
            load_by_variant,
            weather.dt_s,
        )
        idx = np.clip(np.ceil((event_starts_ms - now_ms) / step_ms).astype(int) - 1, -1, None)
        soc0 = np.broadcast_to(b("soc_pct"), shape)[None]
        soc_at = np.concatenate([soc0, soc_path])[idx + 1]  # (E, V, C, K)
    else:
        soc_at = np.broadcast_to(b("soc_pct"), shape)[None].repeat(event_starts_ms.size, axis=0)
    kw = physics.battery_deliverable_kw(
        soc_at,
        b("capacity_wh")[None],
        b("max_discharge_w")[None],
        b("reserve_pct")[None],
        event_h,
    )
    # Settlement credits a battery only above what it would have given its home anyway: its
    # pre-event output moved by the control group's drift, i.e. the home's own output at each
    # moment of the window. A battery holds its setpoint, so the increment it can promise FLAT
    # is its deliverable power less the HIGHEST own output inside the window (on a summer
    # afternoon the sun fades and the homes' own discharge rises through the event), not the
    # average. A home charging from its PV (own < 0) adds to the increment, but only while the
    # sun lasts: never counted below 0.
    pv_scale = _fit_pv_scale(cl, dev, weather, now_ms, b, home)
    tables = []
    for peak in peaks:
        own_kw = _battery_own_kw(
            weather, event_starts_ms, event_h, soc_at, b, v_load, v_pv * pv_scale, home.level * peak
        )
        net = np.maximum(kw - np.maximum(own_kw, 0.0), 0.0)
        net = (v_weight[None, :, :, None] * net).sum(axis=1)  # (E, C, K)
        tables.append(np.transpose(net, (1, 0, 2)))
    return tables


def _home_variants(cl: Clusters, dev: RegionDevices, home: HomeLoad) -> tuple[F64, F64, F64]:
    """The homes behind a cluster's batteries: serving the home (self-consumption, with the
    region's PV) at each of the homes' load scales, or held (backup mode: no load, no PV).
    Returns per variant its load scale (V,), its PV (W, (V,)) and per cluster its weight
    (V, C): a battery's chance of serving (:func:`home_use`) times the scale's weight."""
    scales, weights = home.scales()
    serving = cl.params["serving"]
    v_load = np.append(scales, 0.0)
    v_pv = np.append(np.full(scales.size, dev.pv_w), 0.0)
    v_weight = np.vstack([weights[:, None] * serving[None, :], (1.0 - serving)[None, :]])
    return v_load, v_pv, v_weight


OWN_SAMPLES = np.array([0.0, 0.25, 0.5, 0.75, 1.0])  # points of the window own output is taken at


def _battery_own_kw(
    weather: WeatherForecast,
    event_starts_ms: I64,
    event_h: float,
    soc_at: F64,
    b: Callable[[str], F64],
    v_load: F64,
    v_pv: F64,
    load_level: float,
) -> F64:
    """Highest own output (kW, self-consumption: + serving the home, − charging from PV) of a
    battery home inside each event window, shape (E, V, C, K) like ``soc_at``, for the home
    variants' load scales ``v_load`` and PV ``v_pv`` (W).

    The registry does not pair PV with batteries, so the PV behind a battery is a guess; the
    fleet's own telemetry corrects it: the caller scales ``v_pv`` so that the model's mean own
    output now equals the batteries' reported mean output now (:func:`_fit_pv_scale`). The
    load is at ``load_level``: the region's learnt level times the peak of its noise over the
    window's 15-minute steps (:class:`HomeLoad`), a home's highest draw, not its mean."""
    t = event_starts_ms[:, None] + (OWN_SAMPLES * event_h * HOUR_MS)[None, :]  # (E, P)
    pv_unit, load = _pv_unit_and_load(weather, t)
    load = load * load_level
    pv_size = v_pv[:, None, None]
    pv = pv_unit[..., None, None, None] * (pv_size * SOLAR_GRID[None, None, :])[None, None]
    # Held batteries (no load, no PV) give their home nothing.
    own = load[..., None, None, None] * v_load[None, None, :, None, None] - pv
    # A full battery cannot charge: its own output is floored at 0 instead of −max charge.
    floor = np.where(soc_at >= 99.0, 0.0, -b("max_charge_w")[None])[:, None]  # (E, 1, V, C, K)
    own = np.clip(own, floor, b("max_discharge_w")[None, None])
    return own.max(axis=1) / 1000.0


def _fit_pv_scale(
    cl: Clusters,
    dev: RegionDevices,
    weather: WeatherForecast,
    now_ms: int,
    b: Callable[[str], F64],
    home: HomeLoad,
) -> float:
    """Scale of the assumed PV behind batteries that makes the modelled mean own output now match
    the reported one (bisection: own output falls as PV grows). 1 without a report or sun."""
    observed = dev.battery_own_kw_now
    pv_now, load_now = _pv_unit_and_load(weather, np.array([now_ms]))
    pv_unit, load = float(pv_now[0]), float(load_now[0]) * home.level
    serving = cl.params["serving"]
    if observed is None or pv_unit < 0.05 or not (serving > 0).any() or dev.pv_w <= 0:
        return 1.0
    mid = int(np.argmin(np.abs(SOLAR_GRID - 1.0)))
    weights = cl.sum_p * serving / max(float(cl.sum_p.sum()), 1e-9)
    dis = b("max_discharge_w")[0, :, mid]
    chg = b("max_charge_w")[0, :, mid]
    full = b("soc_pct")[0, :, mid] >= 99.0
    scales, scale_w = home.scales()

    def mean_own_kw(scale: float) -> float:
        own = np.clip(
            load * scales[:, None] - scale * dev.pv_w * pv_unit, np.where(full, 0.0, -chg), dis
        )
        return float((weights * (scale_w[:, None] * own).sum(axis=0)).sum()) / 1000.0

    lo, hi = 0.0, 3.0
    if mean_own_kw(lo) <= observed:
        return lo
    if mean_own_kw(hi) >= observed:
        return hi
    for _ in range(40):
        mid_s = (lo + hi) / 2
        if mean_own_kw(mid_s) > observed:
            lo = mid_s
        else:
            hi = mid_s
    return (lo + hi) / 2


def _group_tables(
    cl: Clusters,
    per_member: F64,
    phi: F64,
    n_groups: int,
) -> tuple[F64, F64, F64]:
    """Sum cluster tables (C, T, K) into vendor groups: availability-weighted MW (kW) without
    opt-out, the opt-out part, and the independent (binomial) variance per interval."""
    # Expected available members at lead time: Σp + (n·online_now − Σp)·φ(τ) (persistence).
    avail = cl.sum_p[:, None] + (cl.n * cl.online_now - cl.sum_p)[:, None] * phi[None, :]
    mean_r = cl.sum_r / np.maximum(cl.n, 1.0)
    p_bar = np.clip(avail / np.maximum(cl.n[:, None], 1.0), 0.0, 1.0)  # (C, T)
    # Σ p_i r_i, moved with the same persistence (r is a property of the customer, not of τ).
    avail_r = cl.sum_pr[:, None] + (cl.n * cl.online_now * mean_r - cl.sum_pr)[:, None] * phi
    onehot = np.zeros((n_groups, cl.n.size))
    onehot[cl.vendor, np.arange(cl.n.size)] = 1.0
    c, t, k = per_member.shape
    ta = (onehot @ (per_member * avail[:, :, None]).reshape(c, t * k)).reshape(n_groups, t, k)
    tr = (onehot @ (per_member * avail_r[:, :, None]).reshape(c, t * k)).reshape(n_groups, t, k)
    q = np.clip(p_bar * (1.0 - mean_r[:, None]), 0.0, 1.0)
    mid = per_member[:, :, k // 2]
    var = (mid**2 * cl.n[:, None] * q * (1.0 - q)).sum(axis=0)
    return ta, tr, var


def _grid_weights(grid: F64, x: F64) -> F64:
    """Weights (L, *x.shape) of linear interpolation on a sorted grid of L points, extrapolated
    linearly beyond its ends (a peak past the 95th percentile costs more still)."""
    n = grid.size
    out = np.zeros((n, *x.shape))
    if n == 1 or np.ptp(grid) <= 0:
        out[n // 2] = 1.0
        return out
    lo = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, n - 2)
    frac = (x - grid[lo]) / np.maximum(grid[lo + 1] - grid[lo], 1e-12)
    np.put_along_axis(out, lo[None], (1.0 - frac)[None], axis=0)
    np.put_along_axis(out, (lo + 1)[None], frac[None], axis=0)
    return out


def _interp_grid(table: F64, grid: F64, x: F64) -> F64:
    """table (G, T, K) on a uniform grid; x (S, T) → (G, S, T)."""
    pos = np.clip((x - grid[0]) / (grid[1] - grid[0]), 0.0, grid.size - 1 - 1e-9)
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    t_idx = np.arange(table.shape[1])[None, :]
    return table[:, t_idx, lo] * (1.0 - frac) + table[:, t_idx, lo + 1] * frac


# --- The forecast --------------------------------------------------------------------------------
def simulate_region(
    dev: RegionDevices,
    weather: WeatherForecast,
    now_ms: int,
    starts_ms: I64,
    step_s: int,
    calib: RegionCalibration,
    *,
    event_h: float | None = None,
    n_scenarios: int = 1000,
    seed: int = 0,
) -> tuple[F64, F64]:
    """Scenario MW, shape (S, T), and the expected MW (T,) for one region's intervals."""
    t_count = starts_ms.size
    if t_count == 0 or (dev.batteries is None and dev.thermostats is None):
        return np.zeros((n_scenarios, t_count)), np.zeros(t_count)
    weather = weather.read(calib.shocks)
    window_start = int(starts_ms[0])
    window_end = int(starts_ms[-1]) + step_s * 1000
    eh = event_h if event_h is not None else event_hours(window_start, window_end)
    sh = calib.shocks
    mids = starts_ms + step_s * 500
    lead_h = np.maximum(mids - now_ms, 0) / HOUR_MS
    phi = np.exp(-lead_h / max(sh.persistence_h, 1e-6))
    # Lead day of each interval: shocks are drawn per region-day.
    day = np.minimum((np.maximum(mids - now_ms, 0) // DAY_MS).astype(np.int64), 7)
    n_days = int(day.max()) + 1
    rng = np.random.default_rng(seed)
    s = n_scenarios
    g = dev.n_vendors
    sigma_t = sh.temp_sigma_c * (1.0 + sh.temp_sigma_growth_per_day * np.arange(n_days))
    temp_err = rng.standard_normal((s, n_days)) * sigma_t[None, :]
    solar_mult = np.clip(1.0 + sh.solar_sigma * rng.standard_normal((s, n_days)), 0.0, 1.5)
    down = rng.random((s, n_days, g)) < sh.vendor_outage_p
    depth = rng.uniform(sh.vendor_outage_depth[0], sh.vendor_outage_depth[1], (s, n_days, g))
    keep = 1.0 - down * depth  # (S, D, G)
    ws = sh.optout_wave_sigma
    wave = np.exp(ws * rng.standard_normal((s, n_days, 2)) - ws * ws / 2.0)  # per kind
    r_scale = optout_scale(eh, calib.consecutive_event_days)
    # The evening's home-load peak, one per region-day, drawn from its distribution.
    peaks = calib.home_load.peaks(round(eh * 4))
    peak_grid = np.quantile(peaks, PEAK_QUANTILES)
    peak_draw = peaks[rng.integers(0, peaks.size, (s, n_days))]

    total = np.zeros((s, t_count))
    expected = np.zeros(t_count)
    variance = np.zeros(t_count)
    keep_t = np.transpose(keep[:, day, :], (2, 0, 1))  # (G, S, T)
    # Per part: its clusters, its tables (one per home-load peak) with each scenario's weights
    # on them (L, S, T), the shock grid and draws, the kind slot of its opt-out wave.
    parts: list[tuple[Clusters, list[F64], F64, F64, F64, int]] = []
    if dev.thermostats is not None:
        _, out_c = weather.at(mids)
        parts.append(
            (
                dev.thermostats,
                [_thermostat_table(dev.thermostats, out_c, eh)],
                np.ones((1, s, t_count)),
                TEMP_GRID_C,
                temp_err[:, day],
                1,
            )
        )
    if dev.batteries is not None:
        # Windows longer than one event are served as consecutive events: each interval's
        # batteries start from the state projected to its own event's start.
        ev_idx = ((starts_ms - window_start) // int(eh * HOUR_MS)).astype(np.int64)
        ev_starts = window_start + np.unique(ev_idx) * int(eh * HOUR_MS)
        at_ev = np.searchsorted(np.unique(ev_idx), ev_idx)
        tables = [
            table[:, at_ev, :]  # (C, T, K)
            for table in _battery_tables(
                dev.batteries, dev, weather, now_ms, ev_starts, eh, calib.home_load, peak_grid
            )
        ]
        parts.append(
            (
                dev.batteries,
                tables,
                _grid_weights(peak_grid, peak_draw)[:, :, day],
                SOLAR_GRID,
                solar_mult[:, day],
                0,
            )
        )
    for cl, per_member_l, weights, grid, shock, kind_slot in parts:
        mid_k = int(np.argmin(np.abs(grid - (0.0 if grid is TEMP_GRID_C else 1.0))))
        mid_l = len(per_member_l) // 2
        a = np.zeros((g, s, t_count))
        r = np.zeros((g, s, t_count))
        for li, per_member in enumerate(per_member_l):
            ta, tr, var = _group_tables(cl, per_member, phi, g)
            tr = tr * r_scale
            a += weights[li][None] * _interp_grid(ta, grid, shock)  # (G, S, T)
            r += weights[li][None] * _interp_grid(tr, grid, shock)
            if li == mid_l:
                variance += var
                expected += (ta[:, :, mid_k] - tr[:, :, mid_k]).sum(axis=0) * (
                    1 - sh.vendor_outage_p * np.mean(sh.vendor_outage_depth)
                )
        w = wave[:, day, kind_slot][None]  # (1, S, T)
        total += (keep_t * np.maximum(a - w * r, 0.0)).sum(axis=0)
    total += np.sqrt(variance)[None, :] * rng.standard_normal((s, t_count))
    return np.maximum(total, 0.0) / 1000.0, np.maximum(expected, 0.0) / 1000.0


def forecast_region(
    region: str,
    dev: RegionDevices,
    weather: WeatherForecast,
    now_ms: int,
    start_ms: int,
    end_ms: int,
    step_s: int,
    calib: RegionCalibration,
    *,
    firmness: float | None = None,
    event_h: float | None = None,
    n_scenarios: int = 1000,
    seed: int = 0,
    keep_scenarios: bool = False,
) -> ForecastResult:
    """P50, P90 (and the firmness quantile) per interval for one region."""
    starts = interval_starts(start_ms, end_ms, step_s)
    eh = event_h if event_h is not None else event_hours(start_ms, end_ms)
    scen, expected = simulate_region(
        dev, weather, now_ms, starts, step_s, calib, event_h=eh, n_scenarios=n_scenarios, seed=seed
    )
    levels = [0.5, 0.1] + ([quantile_for_firmness(firmness)] if firmness is not None else [])
    adj = calib.quantiles.level(np.array(levels))
    qs = np.quantile(scen, adj, axis=0) if starts.size else np.zeros((len(levels), 0))
    p50, p90 = qs[0], np.minimum(qs[1], qs[0])
    firm = np.minimum(qs[2], p50) if firmness is not None and firmness >= 0.5 else p90
    return ForecastResult(
        region=region,
        starts_ms=starts,
        step_s=step_s,
        p50_mw=p50,
        p90_mw=p90,
        firm_mw=firm,
        calibrated=calib.calibrated,
        n_devices=dev.n_devices,
        firmness=firmness,
        event_h=eh,
        expected_mw=expected,
        scenarios_mw=scen if keep_scenarios else None,
    )


def pit(scenarios_mw: F64, realised_mw: F64) -> F64:
    """Probability integral transform per interval: share of scenarios below the realised MW
    (ties split), the input of :class:`QuantileMap`."""
    below = (scenarios_mw < realised_mw[None, :]).mean(axis=0)
    equal = (scenarios_mw == realised_mw[None, :]).mean(axis=0)
    return np.asarray(below + 0.5 * equal, dtype=float)


# --- Calibration from history (empirical Bayes) ------------------------------------------------
def shrunk_rate(successes: F64, trials: F64, prior_mean: float | F64, prior_strength: float) -> F64:
    """Beta-binomial posterior mean: a device with little history stays near its region's rate."""
    s = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    return np.asarray((s + prior_strength * np.asarray(prior_mean)) / (n + prior_strength), float)


def estimate_online_rates(
    observed: F64,
    expected: F64,
    groups: npt.ArrayLike | None = None,
    prior_intervals: float = 288.0,
) -> tuple[F64, F64]:
    """Per-device online rate from intervals with telemetry ÷ intervals expected (empirical
    Bayes: each device shrunk toward its group's pooled rate with a prior worth
    ``prior_intervals``, one day of 5-minute intervals). Devices with no expected intervals get
    NaN (→ the default). Returns (rates, pooled rate per group)."""
    exp_ = np.maximum(np.asarray(expected, float), 0.0)
    obs = np.minimum(np.asarray(observed, float), exp_)
    grp = np.zeros(exp_.size, np.int64) if groups is None else np.asarray(groups, np.int64)
    n_groups = int(grp.max()) + 1 if grp.size else 1
    obs_g = np.bincount(grp, weights=obs, minlength=n_groups)
    exp_g = np.bincount(grp, weights=exp_, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = np.where(exp_g > 0, obs_g / exp_g, DEFAULT_ONLINE_RATE)
    rates = shrunk_rate(obs, exp_, pooled[grp], prior_intervals)
    return np.where(exp_ > 0, rates, np.nan), pooled


def estimate_optout_rates(
    opted_out: F64,
    commands: F64,
    default: F64 | float,
    prior_strength: float = 10.0,
) -> F64:
    """Per-device opt-out rate from command acks; the prior is the kind's pooled rate when there
    are enough commands, else the brief's default."""
    k = np.asarray(opted_out, float)
    n = np.asarray(commands, float)
    prior = np.asarray(default, dtype=float)
    if n.sum() >= 200:
        prior = np.full(n.shape, k.sum() / n.sum()) if prior.ndim == 0 else prior
    rates = shrunk_rate(k, n, prior, prior_strength)
    return np.where(n > 0, rates, np.nan)


# Evenings of evidence the model's own quantile levels weigh as much as (:func:`fit_quantile_map`).
# A month of outcomes moves the levels three quarters of the way to what they say; a few evenings,
# whose shortfalls may be luck (and whose season drifts), much less. Weighed at under two
# evenings, the back-test's recalibrated P90 in ERCOT-NORTH held in only 86.6–87.8 % of its
# intervals in three seed pairs of seven, where the model's own levels held in 90–94 %.
QUANTILE_PRIOR_DAYS = 10.0
MOS_PRIOR_DAYS = 10.0  # days of evidence the prior reading of a forecast weighs as much as


def estimate_temp_mos(
    forecast_c: F64,
    observed_c: F64,
    climate_c: F64 | None,
    prior: ShockParams,
    departure_now_c: F64 | None = None,
    lead_h: float = 24.0,
) -> tuple[float, float, float, float]:
    """How to read the temperature forecast, from past days' window means: (bias °C, skill,
    sigma °C of what is left, persistence). The observed departure from the climate regressed
    on the forecast's (model output statistics) and on the departure devices reported when the
    forecast was made (``departure_now_c``, NaN: none), ``lead_h`` hours before the window:
    its coefficient is the departure's persistence over that lead, turned into a per-day one.
    Each shrunk toward the prior (no bias, full skill, the prior persistence and sigma) with
    ``MOS_PRIOR_DAYS`` days' weight. Without a climate, the bias only."""
    fc = np.asarray(forecast_c, float)
    obs = np.asarray(observed_c, float)
    clim = fc if climate_c is None else np.asarray(climate_c, float)
    now = (
        np.full(fc.shape, np.nan) if departure_now_c is None else np.asarray(departure_now_c, float)
    )
    ok = np.isfinite(fc) & np.isfinite(obs) & np.isfinite(clim)
    n = int(ok.sum())
    if n == 0:
        return prior.temp_bias_c, prior.temp_skill, prior.temp_sigma_c, prior.temp_persistence
    x, y, z = fc[ok] - clim[ok], obs[ok] - clim[ok], now[ok]
    w = n / (n + MOS_PRIOR_DAYS)
    lead = max(float(lead_h), 1.0)
    skill, persistence = prior.temp_skill, prior.temp_persistence
    has_now = np.isfinite(z)
    if climate_c is not None and n >= 5 and float(np.var(x)) > 1e-6:
        ols_skill, ols_persistence = float(np.cov(x, y, bias=True)[0, 1] / np.var(x)), None
        if has_now.sum() >= 5 and float(np.var(z[has_now])) > 1e-6:
            a = np.column_stack([x, z, np.ones_like(x)])[has_now]
            coef = np.linalg.lstsq(a, y[has_now], rcond=None)[0]
            carried = float(np.clip(coef[1], 0.0, 0.95))
            ols_skill = float(coef[0]) / (1.0 - carried)
            ols_persistence = carried ** (24.0 / lead) if carried > 0 else 0.0
        skill = float(np.clip(w * ols_skill + (1 - w) * prior.temp_skill, 0.0, 1.2))
        if ols_persistence is not None:
            wp = float(has_now.sum()) / (float(has_now.sum()) + MOS_PRIOR_DAYS)
            persistence = float(
                np.clip(wp * ols_persistence + (1 - wp) * prior.temp_persistence, 0.0, 0.95)
            )
    reading = believed_departure(x, z, skill, persistence, lead)
    bias = w * float(np.mean(y - reading)) + (1 - w) * prior.temp_bias_c
    resid = y - reading - bias
    sigma = float(
        np.sqrt((np.sum(resid**2) + MOS_PRIOR_DAYS * prior.temp_sigma_c**2) / (n + MOS_PRIOR_DAYS))
    )
    return float(bias), skill, sigma, persistence


def estimate_solar_sigma(forecast_wh: F64, observed_wh: F64, default: float) -> float:
    """Relative error of a day's solar energy against its forecast, shrunk toward the default."""
    fc = np.asarray(forecast_wh, float)
    ok = fc > 0
    if not ok.any():
        return default
    rel = np.asarray(observed_wh, float)[ok] / fc[ok] - 1.0
    k = rel.size
    return float(np.sqrt((np.sum(rel**2) + 10 * default**2) / (k + 10)))


def estimate_vendor_outages(
    online_share: F64, default_p: float
) -> tuple[float, tuple[float, float]]:
    """From a (days × vendors) matrix of each vendor's online share: days where a vendor fell
    below half of its typical share are outages. Returns (daily probability, depth range)."""
    x = np.asarray(online_share, float)
    if x.size == 0:
        return default_p, (0.5, 1.0)
    typical = np.nanmedian(x, axis=0, keepdims=True)
    depth = 1.0 - x / np.maximum(typical, 1e-9)
    hit = depth > 0.3
    # Beta(1, 1/p0 − 1)-ish prior worth 50 vendor-days.
    p = float((hit.sum() + 50 * default_p) / (np.isfinite(x).sum() + 50))
    if hit.sum() >= 3:
        d = depth[hit]
        return p, (float(max(0.3, d.min())), float(min(1.0, d.max())))
    return p, (0.5, 1.0)


def estimate_wave_sigma(
    opted: F64,
    trials: F64,
    expected_rate: F64,
    default: float,
) -> float:
    """Log-sd of the opt-out multiplier shared by a region-day, from per-event opt-out counts:
    the dispersion of observed/expected beyond what independent coin flips explain."""
    k = np.asarray(opted, float)
    n = np.asarray(trials, float)
    e = np.asarray(expected_rate, float)
    ok = (n > 20) & (e > 0)
    if ok.sum() < 5:
        return default
    ratio = k[ok] / (n[ok] * e[ok])
    binom_var = (1 - e[ok]) / (n[ok] * e[ok])
    excess = max(float(np.var(ratio) - np.mean(binom_var)), 0.0)
    sigma = float(np.sqrt(np.log1p(excess)))
    m = int(ok.sum())
    return float(np.sqrt((m * sigma**2 + 10 * default**2) / (m + 10)))


# --- Calibration of the running service from its own history ----------------------------------
def first_reported(values: F64) -> F64:
    """(T, N) readings with NaN where a device did not report → (N,) its first reading (NaN if
    it never reported)."""
    v = np.asarray(values, dtype=float)
    if v.shape[0] == 0:
        return np.full(v.shape[1:], np.nan)
    ok = np.isfinite(v)
    idx = np.argmax(ok, axis=0)
    first = v[idx, np.arange(v.shape[1])]
    return np.where(ok.any(axis=0), first, np.nan)


def window_own_max_w(
    power_w: F64, under_command: npt.NDArray[np.bool_], use: npt.NDArray[np.int64]
) -> F64:
    """Each battery's highest own output over a past window (W, ≥ 0: serving its home; a
    battery charging from its PV counts 0), from its reports (``power_w`` (T, N), NaN: none) at
    the intervals it was not under command (``under_command`` (T, N)). One commanded through
    the whole window, whose reports show the command, gets the mean of the others of its use
    (``use`` (N,), :func:`home_use` at forecast time): the evening's draw of homes run like
    it; 0 when there are none."""
    p = np.where(np.asarray(under_command, bool), np.nan, np.asarray(power_w, float))
    seen = np.isfinite(p).any(axis=0)
    own = np.zeros(p.shape[1])
    own[seen] = np.maximum(np.nanmax(p[:, seen], axis=0), 0.0)
    for u in (HELD, SERVING, UNKNOWN_USE):  # three kinds of use, not a loop over batteries
        gap = ~seen & (use == u)
        peers = seen & (use == u)
        if gap.any() and peers.any():
            own[gap] = float(own[peers].mean())
    return own


def realised_window_mw(
    snap: FleetSnapshot,
    online: npt.NDArray[np.bool_],
    soc_pct: F64,
    setpoint_c: F64,
    outdoor_c: F64,
    opted_out: npt.NDArray[np.bool_],
    event_h: float,
    own_max_w: F64 | None = None,
) -> F64:
    """What a fleet could have delivered per interval of a past window, from its history: the
    devices online at each interval (``online`` (T, N)) and not opted out, times their capability
    then — a battery's deliverable kW from its state of charge at its first report in the window
    (held over the event) less its highest own output in the window (``own_max_w`` (N,),
    :func:`window_own_max_w`: settlement credits only what it gives above its home's draw, and
    it holds its setpoint), a thermostat's flat shed at the interval's outdoor temperature
    (``outdoor_c`` (T,)) and its reported setpoint. The same quantity the back-test scores
    and the forecast quotes."""
    kind = snap.kind_codes
    t_count = online.shape[0]
    avail = online & (snap.enrolled & ~np.asarray(opted_out, bool))[None, :]
    # Only devices available at some interval add anything: a national fleet's silent or
    # newly registered devices cost nothing here, and the thermostats go through in chunks so
    # the (T, chunk) temporaries stay a few tens of MB at a million devices.
    ever = avail.any(axis=0)
    out = np.zeros(t_count)
    bat = np.flatnonzero((kind == BATTERY) & ever)
    if bat.size:
        b_inp = battery_inputs(snap, bat, soc_pct=first_reported(soc_pct[:, bat]))
        kw = b_inp.deliverable_kw(event_h)
        if own_max_w is not None:
            own = np.nan_to_num(np.asarray(own_max_w, float)[bat], nan=0.0)
            kw = np.maximum(kw - np.maximum(own, 0.0) / 1000.0, 0.0)
        out += (avail[:, bat] * kw[None, :]).sum(axis=1)
    temp = np.asarray(outdoor_c, dtype=float)[:, None]
    th_all = np.flatnonzero((kind == THERMOSTAT) & snap.enrolled & ever)
    for lo in range(0, th_all.size, _REALISED_CHUNK):
        th = th_all[lo : lo + _REALISED_CHUNK]
        sp = first_reported(setpoint_c[:, th])
        sp = np.where(np.isnan(sp), snap.state["setpoint_c"][th].astype(float), sp)
        t_inp = thermostat_inputs(snap, th, setpoint_c=sp)
        heating = t_inp.heating_at(temp)
        shed = physics.thermostat_flat_shed(
            t_inp.setpoint_c[None, :],
            temp,
            t_inp.offset_at(heating),
            event_h,
            t_inp.rated_kw[None, :],
            heating=heating,
        )
        out += (avail[:, th] * np.nan_to_num(shed)).sum(axis=1)
    return out / 1000.0


_REALISED_CHUNK = 65_536


def vendor_online_share(
    online_any: npt.NDArray[np.bool_],
    vendor: npt.ArrayLike,
    n_vendors: int,
    eligible: npt.NDArray[np.bool_],
    min_devices: int = 20,
) -> F64:
    """(D, N) online-in-the-window flags and (D, N) eligibility (the device existed that day)
    → (D, V) each vendor's online share of its eligible devices (NaN for a vendor with fewer
    than ``min_devices``: too few to tell an outage from chance).
    The input of :func:`estimate_vendor_outages`."""
    elig = np.broadcast_to(np.asarray(eligible, bool), np.shape(online_any))
    on = np.asarray(online_any, bool) & elig
    v = np.asarray(vendor, np.int64)
    n_v = max(int(n_vendors), int(v.max()) + 1 if v.size else 1)
    onehot = np.zeros((v.size, n_v))
    onehot[np.arange(v.size), v] = 1.0
    counts = elig.astype(float) @ onehot
    with np.errstate(divide="ignore", invalid="ignore"):
        share = (on @ onehot) / counts
    return np.where(counts >= min_devices, share, np.nan)


def fit_quantile_map(
    pits_by_day: F64,
    prior_days: float = QUANTILE_PRIOR_DAYS,
    guard: float = QuantileMap.guard,
) -> QuantileMap:
    """A :class:`QuantileMap` from (days × intervals) PITs. The intervals of one day share its
    shocks, so the evidence is worth about one sample per day: the prior toward the identity is
    ``prior_days`` days' worth of PITs (:data:`QUANTILE_PRIOR_DAYS`)."""
    p = np.asarray(pits_by_day, dtype=float)
    if p.ndim == 1:
        p = p[:, None]
    per_day = max(p.shape[1], 1)
    flat = p[np.isfinite(p)]
    return QuantileMap(pits=flat, prior_strength=float(prior_days * per_day), guard=guard)
