"""The fleet as arrays: registry attributes and latest state of every device, vectorised.

A :class:`FleetSnapshot` is plain data (numpy arrays, one row a device) that the forecaster, the
optimiser and the API read; :func:`summarise` is pure. What each device is worth is valued in
``vpp.flexibility``. The snapshot is put together by ``vpp.fleet.registry`` and kept current by
``store.fleet_cache``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from vpp.domain import KIND_CODE, DeviceKind, FreshnessCode
from vpp.fleet.ids import IdIndex, rows_of

F64 = npt.NDArray[np.float64]

BATTERY = KIND_CODE[DeviceKind.battery]
SOLAR = KIND_CODE[DeviceKind.solar]
THERMOSTAT = KIND_CODE[DeviceKind.thermostat]


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
    index: Mapping[str, int] = field(default_factory=dict)  # IdIndex from a registry
    # Offboarded rows not yet compacted away (None: none). Offboarding marks a row here instead
    # of compacting a million-row snapshot; the cache compacts at its next build. A removed row
    # is inert for every reader: not in ``index``, region code -1, not enrolled, offline, and
    # left out of ``mask()`` and ``summarise``.
    removed: npt.NDArray[np.bool_] | None = None

    def __len__(self) -> int:
        """Rows, removed ones included: every array of the snapshot has this length."""
        return len(self.device_ids)

    @property
    def n_devices(self) -> int:
        """Registered devices (rows less removed ones)."""
        return len(self) - (int(self.removed.sum()) if self.removed is not None else 0)

    def live(self) -> npt.NDArray[np.bool_]:
        """Rows of registered devices (not removed)."""
        if self.removed is None:
            return np.ones(len(self), dtype=bool)
        return ~self.removed

    def region_code(self, region: str) -> int:
        try:
            return self.regions.index(region)
        except ValueError:
            return -1

    def mask(self, region: str | None = None, kind: str | None = None) -> npt.NDArray[np.bool_]:
        m = self.live()
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
        sel = np.asarray(sel)
        whole = (sel.dtype == np.bool_ and sel.shape == (len(self),) and bool(sel.all())) or (
            sel.dtype != np.bool_
            and sel.shape == (len(self),)
            and bool(np.array_equal(sel, np.arange(len(self))))
        )
        if whole and self.index:
            # Every row in place (a fleet of one region): the same positions, so the same
            # index, not a million-entry dict built again for each sub-fleet.
            sub.index = self.index
        else:
            sub.index = _index_of(sub.device_ids, sub.removed)
        return sub

    def mask_of(self, device_ids: Iterable[str]) -> npt.NDArray[np.bool_]:
        """Rows of the given device ids (unknown ids ignored). Costs O(len(device_ids)) through
        ``index``, not a pass over the whole fleet, so the runner can call it every minute."""
        out = np.zeros(len(self), dtype=bool)
        if len(self) and not self.index:  # a hand-built snapshot without its id index
            return np.isin(self.device_ids, np.fromiter(device_ids, dtype=object))
        rows = self.rows_of(device_ids)
        out[rows[rows >= 0]] = True
        return out

    def rows_of(self, device_ids: Iterable[str]) -> npt.NDArray[np.intp]:
        """The row of each device id (-1: not registered), in one vectorised lookup."""
        if len(self) and not self.index:  # a hand-built snapshot without its id index
            self.index = _index_of(self.device_ids, self.removed)
        return rows_of(self.index, device_ids)

    def dispatchable(self) -> npt.NDArray[np.bool_]:
        """Enrolled, online and fresh: the devices new dispatch may use (stale counts 0)."""
        # A removed row is neither enrolled nor online, so it never counts here.
        return self.enrolled & self.online & (self.freshness == FreshnessCode.fresh)


def _index_of(device_ids: npt.NDArray[Any], removed: npt.NDArray[np.bool_] | None) -> IdIndex:
    """The id index of rows ``device_ids`` without the ``removed`` ones."""
    index = IdIndex.build(device_ids)
    if removed is not None:
        for d in device_ids[removed].tolist():
            index.pop(d)
    return index


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


def with_fresh_records(
    snap: FleetSnapshot,
    rows: npt.NDArray[np.intp],
    records: Sequence[bytes | None],
    online: Sequence[bool | None],
    now_ms: int,
    interval_s: float,
    offline_after_s: float,
) -> FleetSnapshot:
    """``snap`` with the state records and online flags of ``rows`` replaced by ``records``
    and ``online`` (read just now; a missing or malformed record keeps the row's, no status
    message means online) and those rows' freshness judged at ``now_ms``. The other rows, and
    ``snap`` itself, are left as they were."""
    size = snap.state.dtype.itemsize
    good = np.fromiter((r is not None and len(r) == size for r in records), bool, len(records))
    state = snap.state.copy()
    if good.any():
        blob = b"".join(r for r, ok in zip(records, good.tolist(), strict=True) if ok and r)
        state.view(np.dtype(f"V{size}"))[rows[good]] = np.frombuffer(blob, np.dtype(f"V{size}"))
    flags = snap.online.copy()
    flags[rows] = np.fromiter((f is not False for f in online), bool, len(online))
    freshness = snap.freshness.copy()
    freshness[rows] = compute_freshness(
        state["recv_ms"][rows], flags[rows], now_ms, interval_s, offline_after_s
    )
    return replace(snap, state=state, online=flags, freshness=freshness)


def summarise(snap: FleetSnapshot, kw: F64) -> list[dict[str, Any]]:
    """Per region and kind: registered, online, fresh, and MW available now, from ``kw`` (one
    figure per device, as ``vpp.flexibility.available_kw`` gives it)."""
    n_kinds = 3
    kw = np.asarray(kw)
    region_codes, kind_codes = snap.region_codes, snap.kind_codes
    enrolled_rows, online_rows, freshness = snap.enrolled, snap.online, snap.freshness
    lat, lon = snap.lat, snap.lon
    if snap.removed is not None and snap.removed.any():  # removed rows are not registered
        live = ~snap.removed
        region_codes, kind_codes, kw = region_codes[live], kind_codes[live], kw[live]
        enrolled_rows, online_rows, freshness = (
            enrolled_rows[live],
            online_rows[live],
            freshness[live],
        )
        lat, lon = lat[live], lon[live]
    key = region_codes.astype(np.int64) * n_kinds + kind_codes
    size = max(len(snap.regions), 1) * n_kinds
    registered = np.bincount(key, minlength=size)
    enrolled = np.bincount(key, weights=enrolled_rows, minlength=size)
    online = np.bincount(
        key, weights=online_rows & (freshness <= FreshnessCode.stale), minlength=size
    )
    fresh = np.bincount(key, weights=freshness == FreshnessCode.fresh, minlength=size)
    mw = np.bincount(key, weights=kw, minlength=size) / 1000.0
    # Where the devices are (for the dashboard's map): mean of the coordinates given, if any.
    located = ~(np.isnan(lat) | np.isnan(lon))
    n_located = np.bincount(key, weights=located, minlength=size)
    lat_sum = np.bincount(key, weights=np.where(located, lat, 0.0), minlength=size)
    lon_sum = np.bincount(key, weights=np.where(located, lon, 0.0), minlength=size)
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
