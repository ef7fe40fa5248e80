"""The forecaster's edge: reads the fleet snapshot, history and commitments, runs the pure model.

Kept current: results are cached per (region, window, step, firmness) only while the fleet
snapshot they were computed from is still the current one and for at most ``cache_ttl_s`` of wall
time, so a fifth of a region's batteries going offline moves the next hour's P90 as soon as the
fleet cache sees it. Calibration (per-device online and opt-out rates from the database) changes
slowly and is re-read every ``calibration_ttl_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pandas as pd
from sqlalchemy import case, func, select

from devices.edges import Edges
from vpp.domain import CommandStatus, CommandType, GridEventStatus, RequestStatus
from vpp.errors import InvalidInput
from vpp.fleet.snapshot import BATTERY, THERMOSTAT, FleetSnapshot
from vpp.forecast import model as m
from vpp.forecast.model import (
    ForecastResult,
    HomeLoad,
    QuantileMap,
    RegionCalibration,
    ShockParams,
)
from vpp.weather import weather_for

log = logging.getLogger(__name__)
F64 = npt.NDArray[np.float64]
LEDGER_STEP_MS = 900_000  # ledger rows sit on the 15-minute grid
HISTORY_DAYS = 14
MIN_HISTORY_INTERVALS_SHARE = 0.5  # share of a region's devices with ≥ 1 day of history


class ForecastInputError(InvalidInput):
    """Bad forecast input; ``field`` names the offending parameter (region, start, end, step,
    firmness)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)


def validate_window(
    region: str,
    start_ms: int,
    end_ms: int,
    step_s: int,
    now_ms: int,
    horizon_h: float,
    known_regions: set[str],
    firmness: float | None = None,
) -> None:
    """Raise :class:`ForecastInputError` naming the first bad field."""
    if not region or region not in known_regions:
        raise ForecastInputError("region", f"unknown region {region!r}")
    if step_s <= 0:
        raise ForecastInputError("step", "must be a positive duration")
    if step_s < 60:
        raise ForecastInputError("step", "must be at least one minute (PT1M)")
    if end_ms <= start_ms:
        raise ForecastInputError("end", "must be after start")
    # One step of grace: a client's "now" is a little behind ours by the time it arrives.
    if start_ms < now_ms - max(step_s, 900) * 1000:
        raise ForecastInputError("start", "the window starts in the past")
    horizon_ms = int(horizon_h * m.HOUR_MS)
    if end_ms - start_ms > horizon_ms:
        raise ForecastInputError("end", f"the window is longer than the {horizon_h:g} h horizon")
    if end_ms > now_ms + horizon_ms:
        raise ForecastInputError("end", f"beyond the forecast horizon of {horizon_h:g} h")
    if (end_ms - start_ms) % (step_s * 1000) != 0:
        raise ForecastInputError("step", "does not divide the window into whole intervals")
    if firmness is not None and not 0.5 <= firmness <= 0.99:
        raise ForecastInputError("firmness", "must be within 0.5–0.99")


@dataclass
class _History:
    """Per-device history read from the database: (ids, values) columns per source."""

    loaded_at: float
    tel_ids: list[str]
    tel_count: F64  # telemetry intervals present
    tel_first_ms: F64
    dev_ids: list[str]
    dev_created_ms: F64
    cmd_ids: list[str]
    cmd_count: F64  # commands sent (not restores)
    cmd_opted: F64  # of which the customer opted out
    event_days: dict[str, set[int]]  # region → UTC day numbers with an event
    now_ms: int
    since_ms: int


@dataclass
class _Aligned:
    """History aligned with one snapshot's rows (recomputed only when the registry changes)."""

    device_ids: Any
    history: _History
    online_rate: F64
    optout_rate: F64
    has_history: npt.NDArray[np.bool_]


@dataclass
class _Tuning:
    shocks: ShockParams = field(default_factory=ShockParams)
    quantiles: QuantileMap = field(default_factory=QuantileMap)
    home_load: HomeLoad = field(default_factory=HomeLoad)
    # What the calibrator reported with it (days, samples, learnt_ms, …); empty: defaults.
    info: dict[str, Any] = field(default_factory=dict)


TUNING_KEY = "forecast:tuning:{region}"


def tuning_to_json(
    shocks: ShockParams,
    quantiles: QuantileMap,
    info: dict[str, Any],
    home_load: HomeLoad | None = None,
) -> dict[str, Any]:
    """The persisted form of a region's tuning (see :func:`tuning_from_json`)."""
    sh = asdict(shocks)
    sh["vendor_outage_depth"] = list(shocks.vendor_outage_depth)
    return {
        "version": 1,
        "shocks": sh,
        "home_load": asdict(home_load or HomeLoad()),
        "quantiles": {
            "pits": [round(float(x), 5) for x in quantiles.pits],
            "prior_strength": float(quantiles.prior_strength),
            "guard": float(quantiles.guard),
        },
        "info": info,
    }


def tuning_from_json(doc: dict[str, Any]) -> tuple[ShockParams, QuantileMap, dict[str, Any]]:
    """Inverse of :func:`tuning_to_json`; unknown shock fields are ignored (older/newer writer)."""
    known = {f.name for f in fields(ShockParams)}
    sh = {k: v for k, v in dict(doc.get("shocks") or {}).items() if k in known}
    if "vendor_outage_depth" in sh:
        lo, hi = sh["vendor_outage_depth"]
        sh["vendor_outage_depth"] = (float(lo), float(hi))
    q = dict(doc.get("quantiles") or {})
    quantiles = QuantileMap(
        pits=np.asarray(q.get("pits") or [], dtype=float),
        prior_strength=float(q.get("prior_strength", QuantileMap.prior_strength)),
        guard=float(q.get("guard", QuantileMap.guard)),
    )
    return ShockParams(**sh), quantiles, dict(doc.get("info") or {})


def home_load_from_json(doc: dict[str, Any]) -> HomeLoad:
    """The home load of a persisted tuning (the prior for a record written before it had one)."""
    known = {f.name for f in fields(HomeLoad)}
    raw = {k: v for k, v in dict(doc.get("home_load") or {}).items() if k in known}
    try:
        return HomeLoad(**raw)
    except (TypeError, ValueError):
        return HomeLoad()


class ForecastService:
    def __init__(
        self,
        services: Edges,
        *,
        n_scenarios: int = 1000,
        cache_ttl_s: float = 5.0,
        calibration_ttl_s: float = 300.0,
    ) -> None:
        self.services = services
        self.n_scenarios = n_scenarios
        self.cache_ttl_s = cache_ttl_s
        self.calibration_ttl_s = calibration_ttl_s
        self._cache: dict[tuple[Any, ...], tuple[tuple[int, int], float, ForecastResult]] = {}
        self._devices: dict[tuple[int, str], m.RegionDevices] = {}
        self._history: _History | None = None
        self._aligned: _Aligned | None = None
        self._tuning: dict[str, _Tuning] = {}
        self._tuning_read_at: dict[str, float] = {}  # monotonic time of the last store read
        self._lock = asyncio.Lock()

    # --- public -------------------------------------------------------------------------------
    def invalidate(self, region: str | None = None) -> None:
        """Drop cached results (of one region, or all) and force a calibration re-read."""
        if region is None:
            self._cache.clear()
            self._devices.clear()
            self._history = None
            self._aligned = None
            return
        for key in [k for k in self._cache if k[0] == region]:
            del self._cache[key]
        for dkey in [k for k in self._devices if k[1] == region]:
            del self._devices[dkey]

    def set_tuning(
        self,
        region: str,
        shocks: ShockParams | None = None,
        quantiles: QuantileMap | None = None,
        info: dict[str, Any] | None = None,
        home_load: HomeLoad | None = None,
    ) -> None:
        """Install shock magnitudes / a quantile map learnt by a calibration job (back-test or
        :class:`dispatch.forecast_calibrator.ForecastCalibrator`); ``info`` is what it reports."""
        t = self._tuning.setdefault(region, _Tuning())
        if shocks is not None:
            t.shocks = shocks
        if quantiles is not None:
            t.quantiles = quantiles
        if home_load is not None:
            t.home_load = home_load
        t.info = dict(info) if info is not None else {}
        t.info.setdefault("learnt_ms", int(self.services.clock.now_ms()))
        self._tuning_read_at[region] = time.monotonic()
        self.invalidate(region)

    async def load_tuning(self, region: str, force: bool = False) -> None:
        """Adopt the tuning persisted by a calibrator (this process's or another's) when it is
        newer than what is installed; re-read at most every ``calibration_ttl_s``."""
        last = self._tuning_read_at.get(region)
        if not force and last is not None and time.monotonic() - last < self.calibration_ttl_s:
            return
        self._tuning_read_at[region] = time.monotonic()
        state = self.services.state
        current = self._tuning.get(region)
        have = int(current.info.get("learnt_ms", -1)) if current is not None else -1
        try:
            raw = await state.get_value(TUNING_KEY.format(region=region))
            if raw is None:
                if current is not None and have >= 0:
                    await self._republish_tuning(region, current)  # the store was lost
                return
            doc = orjson.loads(raw)
            shocks, quantiles, info = tuning_from_json(doc)
            home_load = home_load_from_json(doc)
        except Exception:  # a bad or unreachable record: keep what is installed
            log.warning("forecast tuning of %s unreadable; keeping the current one", region)
            return
        learnt = int(info.get("learnt_ms", 0))
        if learnt > have:
            t = self._tuning.setdefault(region, _Tuning())
            t.shocks, t.quantiles, t.info = shocks, quantiles, info
            t.home_load = home_load
            self._tuning_read_at[region] = time.monotonic()
            self.invalidate(region)
        elif current is not None and have > learnt:
            # An older tuning than ours: put back by a process that outlived a lost store
            # with it. The newest one wins, whoever held it.
            await self._republish_tuning(region, current)

    async def _republish_tuning(self, region: str, tuning: _Tuning) -> None:
        """Write this process's tuning back to the state store (a cache of what calibrators
        learnt, lost with the store), so processes started since get it too."""
        doc = tuning_to_json(tuning.shocks, tuning.quantiles, tuning.info, tuning.home_load)
        try:
            await self.services.state.set_value(TUNING_KEY.format(region=region), orjson.dumps(doc))
        except Exception:  # unreachable: the next read tries again
            log.warning("forecast tuning of %s could not be written back", region)

    async def tuning_info(self, region: str) -> dict[str, Any]:
        """The region's current tuning in a few numbers (for ``GET /v1/forecast``)."""
        await self.load_tuning(region)
        t = self._tuning.get(region, _Tuning())
        info = t.info
        return {
            "learnt": bool(info.get("days")),
            "days": int(info.get("days", 0)),
            "samples": int(t.quantiles.pits.size),
            "quantile_guard": float(t.quantiles.guard),
            "p90_level": round(float(t.quantiles.level(0.1)), 4),
            "temp_sigma_c": round(float(t.shocks.temp_sigma_c), 3),
            "temp_samples": int(info.get("temp_samples", 0)),
            "vendor_outage_p": round(float(t.shocks.vendor_outage_p), 4),
            "optout_wave_sigma": round(float(t.shocks.optout_wave_sigma), 3),
            "learnt_at_ms": int(info["learnt_ms"]) if info.get("days") else None,
        }

    def known_regions(self, snap: FleetSnapshot | None = None) -> set[str]:
        """Regions a forecast may be asked for: those sold and any that holds devices."""
        regions = set(self.services.regions.sold())
        if snap is not None:
            regions |= {r for r in snap.regions if r}
        return regions

    def active_regions(self, snap: FleetSnapshot | None = None) -> set[str]:
        """Regions worth calibrating: those ``VPP_REGIONS`` names and any that holds devices
        (not every load zone of the registry: an empty zone forecasts zero by itself)."""
        regions = {r for r in self.services.settings.regions if r in self.services.regions}
        if snap is not None:
            regions |= {r for r in snap.regions if r}
        return regions

    async def forecast(
        self,
        region: str,
        start_ms: int,
        end_ms: int,
        step_s: int = 900,
        firmness: float | None = None,
        event_h: float | None = None,
    ) -> ForecastResult:
        """P50/P90 per interval of [start, end). Each interval is valued as part of an event as
        long as the window (cut to 5 h: longer windows are served as consecutive events), or
        of ``event_h`` hours if given. Raises :class:`ForecastInputError` naming a bad field."""
        settings = self.services.settings
        snap = await self.services.fleet.snapshot()
        now_ms = int(self.services.clock.now_ms())
        validate_window(
            region,
            int(start_ms),
            int(end_ms),
            int(step_s),
            now_ms,
            settings.forecast_horizon_h,
            self.known_regions(snap),
            firmness,
        )
        if event_h is not None and not 0.25 <= event_h <= m.MAX_EVENT_H:
            raise ForecastInputError("event", f"must be within 15 min–{m.MAX_EVENT_H:g} h")
        key = (region, int(start_ms), int(end_ms), int(step_s), firmness, event_h)
        snap_id = (id(snap), snap.now_ms)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == snap_id and time.monotonic() - hit[1] < self.cache_ttl_s:
            return hit[2]
        calib = await self.calibration(region, snap, now_ms, int(start_ms))
        dev = self._region_devices(snap, region, calib)
        weather = self._weather(region, now_ms, int(end_ms), int(step_s), snap)
        seed = zlib.crc32(region.encode())  # same random numbers each call: stable quotes
        result = await asyncio.to_thread(
            m.forecast_region,
            region,
            dev,
            weather,
            now_ms,
            int(start_ms),
            int(end_ms),
            int(step_s),
            calib,
            firmness=firmness,
            event_h=event_h,
            n_scenarios=self.n_scenarios,
            seed=seed,
        )
        self._cache[key] = (snap_id, time.monotonic(), result)
        if len(self._cache) > 512:
            self._cache.pop(next(iter(self._cache)))
        return result

    async def committed_mw(self, region: str, starts_ms: npt.ArrayLike, step_s: int) -> F64:
        """MW already booked per interval: per 15-minute ledger slot the sum over requests, per
        interval the largest slot it overlaps (capacity is firm at every moment)."""
        from store.models import LedgerEntry

        starts = np.asarray(starts_ms, dtype=np.int64)
        if starts.size == 0:
            return np.zeros(0)
        lo = int(starts[0]) - LEDGER_STEP_MS + 1
        hi = int(starts[-1]) + step_s * 1000
        async with self.services.db.session() as session:
            rows = (
                await session.execute(
                    select(LedgerEntry.interval_start_ms, func.sum(LedgerEntry.mw))
                    .where(LedgerEntry.region == region)
                    .where(LedgerEntry.interval_start_ms >= lo)
                    .where(LedgerEntry.interval_start_ms < hi)
                    .group_by(LedgerEntry.interval_start_ms)
                )
            ).all()
        out = np.zeros(starts.size)
        if not rows:
            return out
        slot = np.array([r[0] for r in rows], dtype=np.int64)
        mw = np.array([float(r[1] or 0.0) for r in rows])
        for s, v in zip(slot, mw, strict=True):  # a few hundred slots at most
            overlap = (starts < s + LEDGER_STEP_MS) & (starts + step_s * 1000 > s)
            out[overlap] = np.maximum(out[overlap], v)
        return out

    # --- internals ----------------------------------------------------------------------------
    def _weather(
        self, region: str, now_ms: int, end_ms: int, step_s: int, snap: FleetSnapshot
    ) -> m.WeatherForecast:
        dt_s = min(step_s, 900)
        n = int((end_ms - now_ms) // (dt_s * 1000)) + 2
        wy = weather_for(self.services.regions.locate(region))
        return m.typical_year_forecast(wy, now_ms, dt_s, n, _reported_outdoor_c(snap, region))

    def _region_devices(
        self,
        snap: FleetSnapshot,
        region: str,
        calib: RegionCalibration,
    ) -> m.RegionDevices:
        key = (id(snap), region)
        dev = self._devices.get(key)
        if dev is None:
            code = snap.region_code(region)
            rows = np.flatnonzero(snap.region_codes == code) if code >= 0 else np.zeros(0, np.int64)
            dev = m.region_devices(snap, rows, calib)
            # Only the latest snapshot's clusters are worth keeping.
            self._devices = {k: v for k, v in self._devices.items() if k[0] == id(snap)}
            self._devices[key] = dev
        return dev

    async def calibration(
        self,
        region: str,
        snap: FleetSnapshot,
        now_ms: int,
        start_ms: int,
    ) -> RegionCalibration:
        async with self._lock:
            if (
                self._history is None
                or time.monotonic() - self._history.loaded_at > self.calibration_ttl_s
            ):
                self._history = await self._load_history(now_ms)
                self._aligned = None
            hist = self._history
            if self._aligned is None or self._aligned.device_ids is not snap.device_ids:
                self._aligned = _align(hist, snap, self.services.settings.history_interval_s)
        al = self._aligned
        code = snap.region_code(region)
        in_region = snap.region_codes == code if code >= 0 else np.zeros(len(snap), bool)
        n_region = int(in_region.sum())
        share = float(al.has_history[in_region].mean()) if n_region else 0.0
        calibrated = n_region > 0 and share >= MIN_HISTORY_INTERVALS_SHARE
        await self.load_tuning(region)
        tuning = self._tuning.get(region, _Tuning())
        day = start_ms // m.DAY_MS
        days = hist.event_days.get(region, set())
        consecutive = 0
        while day - consecutive - 1 in days:
            consecutive += 1
        return RegionCalibration(
            calibrated=calibrated,
            online_rate=al.online_rate if calibrated else None,
            optout_rate=al.optout_rate if calibrated else None,
            shocks=tuning.shocks,
            quantiles=tuning.quantiles,
            consecutive_event_days=consecutive,
            home_load=tuning.home_load,
        )

    async def _load_history(self, now_ms: int) -> _History:
        from store.models import CapacityRequest, Command, Device, GridEvent, TelemetryInterval

        since = now_ms - HISTORY_DAYS * m.DAY_MS
        async with self.services.db.session() as session:
            tel = (
                await session.execute(
                    select(
                        TelemetryInterval.device_id,
                        func.count(),
                        func.min(TelemetryInterval.interval_start_ms),
                    )
                    .where(TelemetryInterval.interval_start_ms >= since)
                    .where(TelemetryInterval.interval_start_ms < now_ms)
                    .group_by(TelemetryInterval.device_id)
                )
            ).all()
            created = (
                await session.execute(
                    select(Device.id, Device.created_ms).where(Device.offboarded_ms.is_(None))
                )
            ).all()
            opted = func.sum(case((Command.status == CommandStatus.opted_out.value, 1), else_=0))
            cmds = (
                await session.execute(
                    select(Command.device_id, func.count(), opted)
                    .where(Command.type != CommandType.restore.value)
                    .where(Command.created_ms >= since)
                    .group_by(Command.device_id)
                )
            ).all()
            booked = (
                RequestStatus.committed.value,
                RequestStatus.active.value,
                RequestStatus.completed.value,
            )
            req = (
                await session.execute(
                    select(CapacityRequest.region, CapacityRequest.start_ms)
                    .where(CapacityRequest.status.in_(booked))
                    .where(CapacityRequest.start_ms >= since)
                )
            ).all()
            grid = (
                await session.execute(
                    select(GridEvent.region, GridEvent.start_ms)
                    .where(GridEvent.start_ms >= since)
                    .where(GridEvent.status != GridEventStatus.aborted.value)
                )
            ).all()
        event_days: dict[str, set[int]] = {}
        for region, start in [*req, *grid]:
            event_days.setdefault(region, set()).add(int(start) // m.DAY_MS)
        return _History(
            loaded_at=time.monotonic(),
            tel_ids=[r[0] for r in tel],
            tel_count=np.array([float(r[1]) for r in tel]),
            tel_first_ms=np.array([float(r[2]) for r in tel]),
            dev_ids=[r[0] for r in created],
            dev_created_ms=np.array([float(r[1] or 0) for r in created]),
            cmd_ids=[r[0] for r in cmds],
            cmd_count=np.array([float(r[1]) for r in cmds]),
            cmd_opted=np.array([float(r[2] or 0) for r in cmds]),
            event_days=event_days,
            now_ms=now_ms,
            since_ms=since,
        )


def _reported_outdoor_c(snap: FleetSnapshot, region: str) -> float | None:
    """The median outdoor temperature the region's devices report now (None: none does); a
    median, so one broken sensor does not move it."""
    code = snap.region_code(region)
    if code < 0:
        return None
    out = snap.state["outdoor_c"][(snap.region_codes == code) & snap.dispatchable()]
    out = out[np.isfinite(out)].astype(float)
    return float(np.median(out)) if out.size else None


def _lookup(ids: Any, keys: list[str], values: F64, missing: float) -> F64:
    """values[keys.index(id)] for each id, vectorised (a hash join, not a loop of dict gets)."""
    if not keys:
        return np.full(len(ids), missing)
    pos = pd.Index(keys).get_indexer(pd.Index(ids))
    return np.where(pos >= 0, values[np.maximum(pos, 0)], missing)


def _align(hist: _History, snap: FleetSnapshot, interval_s: int) -> _Aligned:
    """Per-device rates in snapshot row order (recomputed when the registry changes)."""
    ids = snap.device_ids
    observed = _lookup(ids, hist.tel_ids, hist.tel_count, 0.0)
    first = _lookup(ids, hist.tel_ids, hist.tel_first_ms, float(hist.now_ms))
    created = _lookup(ids, hist.dev_ids, hist.dev_created_ms, np.nan)
    created = np.where(np.isnan(created), first, created)
    # Intervals the device should have reported since it joined (or since its first report,
    # whichever came first) within the history window.
    joined = np.maximum(np.minimum(created, first), hist.since_ms)
    expected = np.maximum(np.floor((hist.now_ms - joined) / (interval_s * 1000.0)), 0.0)
    online_rate, _ = m.estimate_online_rates(observed, expected, snap.region_codes)
    cmd_n = _lookup(ids, hist.cmd_ids, hist.cmd_count, 0.0)
    cmd_opted = _lookup(ids, hist.cmd_ids, hist.cmd_opted, 0.0)
    default_r = np.where(
        snap.kind_codes == BATTERY,
        m.DEFAULT_OPTOUT_AT_2H[BATTERY],
        np.where(snap.kind_codes == THERMOSTAT, m.DEFAULT_OPTOUT_AT_2H[THERMOSTAT], 0.0),
    )
    optout_rate = m.estimate_optout_rates(cmd_opted, cmd_n, default_r)
    day_intervals = 86_400 / interval_s
    return _Aligned(ids, hist, online_rate, optout_rate, expected >= day_intervals)
