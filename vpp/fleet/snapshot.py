"""The fleet as arrays: registry attributes and latest state of every device, vectorised.

A :class:`FleetSnapshot` is plain data (numpy arrays, one row a device) that the forecaster, the
optimiser and the API read; :func:`available_kw` and :func:`summarise` are pure. The snapshot is
put together by ``vpp.fleet.registry`` and kept current by ``store.fleet_cache``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from vpp import physics
from vpp.domain import (
    KIND_CODE,
    THERMOSTAT_DEFAULT_OFFSET_C,
    DeviceKind,
    FreshnessCode,
)

F64 = npt.NDArray[np.float64]

BATTERY = KIND_CODE[DeviceKind.battery]
SOLAR = KIND_CODE[DeviceKind.solar]
THERMOSTAT = KIND_CODE[DeviceKind.thermostat]

# Outdoor temperature assumed for a thermostat that reports none and whose region has no reading.
DEFAULT_OUTDOOR_C = 30.0


@dataclass
class FleetSnapshot:
    now_ms: int
    device_ids: npt.NDArray[np.object_]
    tenant_ids: npt.NDArray[np.object_]
    region_codes: npt.NDArray[np.int32]
    regions: list[str]
    kind_codes: npt.NDArray[np.int8]
    vendor_codes: npt.NDArray[np.int32]
    vendors: list[str]
    feeder_codes: npt.NDArray[np.int32]
    feeders: list[str]
    enrolled: npt.NDArray[np.bool_]
    capacity_wh: F64
    max_discharge_w: F64
    max_charge_w: F64
    backup_reserve_pct: F64
    rated_w: F64
    hvac_rated_w: F64
    comfort_max_c: F64
    comfort_min_c: F64
    max_offset_c: F64
    lat: F64
    lon: F64
    state: np.ndarray  # STATE_DTYPE records, aligned with device_ids
    online: npt.NDArray[np.bool_]  # status topic says online (or fresh telemetry and no status)
    freshness: npt.NDArray[np.int8]  # FreshnessCode
    index: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.device_ids)

    def region_code(self, region: str) -> int:
        try:
            return self.regions.index(region)
        except ValueError:
            return -1

    def mask(self, region: str | None = None, kind: str | None = None) -> npt.NDArray[np.bool_]:
        m = np.ones(len(self), dtype=bool)
        if region is not None:
            m &= self.region_codes == self.region_code(region)
        if kind is not None:
            m &= self.kind_codes == KIND_CODE[DeviceKind(kind)]
        return m

    def take(self, sel: npt.NDArray[Any]) -> FleetSnapshot:
        """A sub-fleet (boolean mask or index array); code tables are kept."""
        arrays = {
            name: getattr(self, name)[sel]
            for name, value in self.__dict__.items()
            if isinstance(value, np.ndarray)
        }
        sub = replace(self, **arrays, index={})
        sub.index = {d: i for i, d in enumerate(sub.device_ids)}
        return sub

    def mask_of(self, device_ids: Iterable[str]) -> npt.NDArray[np.bool_]:
        """Rows of the given device ids (unknown ids ignored). Costs O(len(device_ids)) through
        ``index``, not a pass over the whole fleet, so the runner can call it every minute."""
        out = np.zeros(len(self), dtype=bool)
        if len(self) and not self.index:  # a hand-built snapshot without its id index
            return np.isin(self.device_ids, np.fromiter(device_ids, dtype=object))
        rows = [i for i in map(self.index.get, device_ids) if i is not None]
        out[np.asarray(rows, dtype=np.int64)] = True
        return out

    def dispatchable(self) -> npt.NDArray[np.bool_]:
        """Enrolled, online and fresh: the devices new dispatch may use (stale counts 0)."""
        return self.enrolled & self.online & (self.freshness == FreshnessCode.fresh)


def compute_freshness(
    recv_ms: npt.NDArray[np.int64],
    online: npt.NDArray[np.bool_],
    now_ms: int,
    interval_s: float,
    offline_after_s: float,
) -> npt.NDArray[np.int8]:
    """fresh within 2 expected intervals, stale after that, offline after ``offline_after_s`` or a
    Last Will. (The brief's "stale after 3" leaves the third interval as grace; we count it stale
    already, the conservative side for P90.)"""
    age_s = (now_ms - recv_ms) / 1000.0
    out = np.full(len(recv_ms), FreshnessCode.stale, dtype=np.int8)
    out[age_s <= 2 * interval_s] = FreshnessCode.fresh
    out[(age_s > offline_after_s) | ~online] = FreshnessCode.offline
    out[recv_ms <= 0] = FreshnessCode.never
    return out


def outdoor_temperatures(snap: FleetSnapshot) -> F64:
    """Each device's outdoor temperature: its own reading, else its region's median reading."""
    outdoor = snap.state["outdoor_c"].astype(float)
    missing = np.isnan(outdoor)
    if missing.any():
        fill = np.full(len(snap.regions), DEFAULT_OUTDOOR_C)
        for code in np.unique(snap.region_codes[missing]):
            vals = outdoor[(snap.region_codes == code) & ~missing]
            if vals.size:
                fill[code] = float(np.median(vals))
        outdoor = np.where(missing, fill[snap.region_codes], outdoor)
    return outdoor


def available_kw(
    snap: FleetSnapshot,
    window_h: float = 1.0,
    outdoor_c: F64 | None = None,
    only_dispatchable: bool = True,
) -> F64:
    """Flexibility each device could deliver now, held over ``window_h`` hours (kW).

    Battery: min(max discharge, energy above reserve × 0.949 / h). Thermostat: the RC model's
    average shed at its current indoor/outdoor state with the default +1.7 °C offset (cut to the
    device's own max offset and comfort limit). Solar: nothing upward.
    """
    st = snap.state
    kw = np.zeros(len(snap))
    bat = snap.kind_codes == BATTERY
    if bat.any():
        reserve = np.where(
            np.isnan(st["backup_reserve_pct"][bat]),
            snap.backup_reserve_pct[bat],
            st["backup_reserve_pct"][bat],
        )
        kw[bat] = physics.battery_deliverable_kw(
            np.nan_to_num(st["soc_pct"][bat].astype(float), nan=0.0),
            snap.capacity_wh[bat],
            snap.max_discharge_w[bat],
            reserve,
            window_h,
        )
    th = snap.kind_codes == THERMOSTAT
    if th.any():
        out_c = outdoor_temperatures(snap)[th] if outdoor_c is None else outdoor_c[th]
        mode = st["mode"][th]
        setpoint = st["setpoint_c"][th].astype(float)
        indoor = np.where(np.isnan(st["indoor_c"][th]), setpoint, st["indoor_c"][th])
        heating = (mode == physics.MODE_HEAT) | ((mode == physics.MODE_AUTO) & (out_c < setpoint))
        comfort = np.where(heating, snap.comfort_min_c[th], snap.comfort_max_c[th])
        offset = np.minimum(
            THERMOSTAT_DEFAULT_OFFSET_C, np.nan_to_num(snap.max_offset_c[th], nan=2.0)
        )
        shed, _, _ = physics.thermostat_shed(
            indoor,
            setpoint,
            out_c,
            offset,
            window_h,
            snap.hvac_rated_w[th] / 1000.0,
            heating=heating,
            # No comfort limit on record: no limit (cooling up to 99 °C, heating down to -99).
            comfort_limit_c=np.where(np.isnan(comfort), np.where(heating, -99.0, 99.0), comfort),
        )
        kw[th] = np.where((mode == physics.MODE_OFF) | np.isnan(setpoint), 0.0, np.nan_to_num(shed))
    if only_dispatchable:
        kw = np.where(snap.dispatchable(), kw, 0.0)
    return kw


def summarise(
    snap: FleetSnapshot, window_h: float = 1.0, kw: F64 | None = None
) -> list[dict[str, Any]]:
    """Per region and kind: registered, online, fresh, and MW available now. ``kw``: the
    snapshot's ``available_kw`` if the caller has it already."""
    kw = available_kw(snap, window_h) if kw is None else kw
    n_kinds = 3
    key = snap.region_codes.astype(np.int64) * n_kinds + snap.kind_codes
    size = max(len(snap.regions), 1) * n_kinds
    registered = np.bincount(key, minlength=size)
    enrolled = np.bincount(key, weights=snap.enrolled, minlength=size)
    online = np.bincount(
        key, weights=snap.online & (snap.freshness <= FreshnessCode.stale), minlength=size
    )
    fresh = np.bincount(key, weights=snap.freshness == FreshnessCode.fresh, minlength=size)
    mw = np.bincount(key, weights=kw, minlength=size) / 1000.0
    # Where the devices are (for the dashboard's map): mean of the coordinates given, if any.
    located = ~(np.isnan(snap.lat) | np.isnan(snap.lon))
    n_located = np.bincount(key, weights=located, minlength=size)
    lat_sum = np.bincount(key, weights=np.where(located, snap.lat, 0.0), minlength=size)
    lon_sum = np.bincount(key, weights=np.where(located, snap.lon, 0.0), minlength=size)
    from vpp.domain import KIND_BY_CODE

    rows = []
    for k in np.flatnonzero(registered):
        has_xy = n_located[k] > 0
        rows.append(
            {
                "region": snap.regions[k // n_kinds],
                "kind": KIND_BY_CODE[int(k % n_kinds)].value,
                "registered": int(registered[k]),
                "enrolled": int(enrolled[k]),
                "online": int(online[k]),
                "fresh": int(fresh[k]),
                "available_mw": round(float(mw[k]), 6),
                "lat": round(float(lat_sum[k] / n_located[k]), 4) if has_xy else None,
                "lon": round(float(lon_sum[k] / n_located[k]), 4) if has_xy else None,
            }
        )
    return rows
