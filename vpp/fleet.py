"""The fleet as arrays: registry attributes and latest state of every device, vectorised.

A :class:`FleetSnapshot` is plain data (numpy arrays, one row a device) that the forecaster, the
optimiser and the API read. :class:`FleetCache` (at the edge) builds it from the database and the
state store and keeps it current; :func:`available_kw` and :func:`summarise` are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from sqlalchemy import select

from devices import physics
from vpp.domain import (
    KIND_CODE,
    THERMOSTAT_DEFAULT_OFFSET_C,
    DeviceKind,
    FreshnessCode,
)
from vpp.state.base import (
    STATE_DTYPE,
    PackedStates,
    PackedStatus,
    empty_state,
    pack_records,
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


# --- Building snapshots (edge: database + state store) -------------------------------------------
_REGISTRY_COLUMNS = (
    "id",
    "tenant_id",
    "region",
    "kind",
    "vendor",
    "feeder",
    "enrolled",
    "capacity_wh",
    "max_discharge_w",
    "max_charge_w",
    "backup_reserve_pct",
    "rated_w",
    "hvac_rated_w",
    "comfort_max_c",
    "comfort_min_c",
    "max_offset_c",
    "lat",
    "lon",
)
_FLOAT_COLUMNS = _REGISTRY_COLUMNS[7:]
# (snapshot column, registry column, code table attribute) of the columns coded against a table.
_CODED = (
    ("region_codes", "region", "regions"),
    ("vendor_codes", "vendor", "vendors"),
    ("feeder_codes", "feeder", "feeders"),
)
_EMPTY_RECORD = empty_state()[0]
_RECORD_BYTES = np.dtype(f"V{STATE_DTYPE.itemsize}")
log = logging.getLogger(__name__)


def _factorize(values: Sequence[Any] | np.ndarray) -> tuple[npt.NDArray[np.intp], Any]:
    arr = np.asarray(values, dtype=object)
    return pd.factorize(arr, sort=False, use_na_sentinel=False)  # type: ignore[return-value]


def _codes(values: Sequence[Any] | np.ndarray) -> tuple[npt.NDArray[np.int32], list[str]]:
    """Codes in order of first appearance (a missing value is ``""``), hashed in C."""
    codes, uniques = pd.factorize(
        np.asarray(values, dtype=object), sort=False, use_na_sentinel=False
    )
    labels = [
        "" if u is None or (isinstance(u, float) and np.isnan(u)) else str(u) for u in uniques
    ]
    if len(set(labels)) != len(labels):  # None and "" both present: one code, as before
        first: dict[str, int] = {}
        remap = np.array([first.setdefault(lbl, len(first)) for lbl in labels], dtype=np.int64)
        return remap[codes].astype(np.int32), list(first)
    return codes.astype(np.int32), labels


def _kind_codes(values: Sequence[Any] | np.ndarray) -> npt.NDArray[np.int8]:
    """Kind names to codes through a lookup over the few distinct names (bad names raise)."""
    codes, uniques = pd.factorize(
        np.asarray(values, dtype=object), sort=False, use_na_sentinel=False
    )
    lut = np.array([KIND_CODE[DeviceKind(k)] for k in uniques], dtype=np.int8)
    return lut[codes] if len(codes) else np.zeros(0, np.int8)


@dataclass
class Registry:
    """The registry part of a snapshot (changes only on onboarding/offboarding/PATCH).

    Treated as immutable once built: changes make a new one (:func:`registry_with_changes`), so a
    snapshot being assembled in a worker thread never sees a half-applied change."""

    columns: dict[str, np.ndarray]
    regions: list[str]
    vendors: list[str]
    feeders: list[str]
    index: dict[str, int]
    # State-store order → registry rows, per chunk of the store's answer: the store returns its
    # devices in the same order from one read to the next, and looking a million ids up by hash
    # costs about a second (random memory access), so only chunks whose ids changed are looked
    # up again. Keyed by (what, chunk number): (the chunk's ids, their rows).
    _positions: dict[tuple[str, int], tuple[list[Any], npt.NDArray[np.intp]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __len__(self) -> int:
        return len(self.columns["device_ids"])

    def positions(self, what: str, chunks: Sequence[Sequence[Any]]) -> npt.NDArray[np.intp]:
        """The registry row of every id in ``chunks`` (ids as str or UTF-8 bytes; -1 if not
        registered), concatenated in chunk order."""
        out: list[npt.NDArray[np.intp] | None] = []
        todo: list[int] = []
        for i, ids in enumerate(chunks):
            cached = self._positions.get((what, i))
            if cached is not None and cached[0] == ids:
                out.append(cached[1])
            else:
                out.append(None)
                todo.append(i)
        if todo:  # one lookup pass over every chunk that changed
            names = [d.decode() if isinstance(d, bytes) else d for i in todo for d in chunks[i]]
            get = self.index.get
            found = np.fromiter((get(d, -1) for d in names), dtype=np.intp, count=len(names))
            lo = 0
            for i in todo:
                out[i] = found[lo : lo + len(chunks[i])]
                lo += len(chunks[i])
        # Replace (not update) so chunks that disappeared are forgotten.
        done = [p for p in out if p is not None]
        fresh = {
            (what, i): (list(ids), pos)
            for i, (ids, pos) in enumerate(zip(chunks, done, strict=True))
        }
        self._positions = {**{k: v for k, v in self._positions.items() if k[0] != what}, **fresh}
        return np.concatenate(done) if done else np.zeros(0, np.intp)


def build_registry_columns(data: Mapping[str, Sequence[Any] | np.ndarray]) -> Registry:
    """A registry from whole columns (names of ``_REGISTRY_COLUMNS``): vectorised, no per-row
    Python beyond what numpy/pandas do in C."""
    ids = np.asarray(data["id"], dtype=object)
    n = len(ids)
    columns: dict[str, np.ndarray] = {
        "device_ids": ids,
        "tenant_ids": np.asarray(data["tenant_id"], dtype=object),
        "kind_codes": _kind_codes(data["kind"]),
        "enrolled": np.asarray(data["enrolled"], dtype=bool) if n else np.zeros(0, dtype=bool),
    }
    tables: dict[str, list[str]] = {}
    for col, name, table in _CODED:
        columns[col], tables[table] = _codes(data[name])
    for name in _FLOAT_COLUMNS:
        # None → NaN in numpy's own conversion.
        columns[name] = np.asarray(data[name], dtype=float) if n else np.zeros(0)
    index = dict(zip(ids.tolist(), range(n), strict=True))
    return Registry(columns, tables["regions"], tables["vendors"], tables["feeders"], index)


def build_registry(rows: Sequence[Sequence[Any]]) -> Registry:
    """A registry from rows in ``_REGISTRY_COLUMNS`` order (tuples, or dicts keyed by column)."""
    if rows and isinstance(rows[0], Mapping):
        rows = [tuple(r[c] for c in _REGISTRY_COLUMNS) for r in rows]  # type: ignore[call-overload]
    cols: list[Any] = list(zip(*rows, strict=True)) if rows else [() for _ in _REGISTRY_COLUMNS]
    return build_registry_columns(dict(zip(_REGISTRY_COLUMNS, cols, strict=True)))


def registry_with_changes(
    registry: Registry, rows: Sequence[Sequence[Any]], removed_ids: Sequence[str] = ()
) -> tuple[Registry, npt.NDArray[np.intp]]:
    """``registry`` with ``rows`` upserted (a known id has its columns replaced in place, a new
    one is appended) and ``removed_ids`` dropped. Idempotent. Returns the new registry and, for
    each of its rows, the row it came from in ``registry`` (-1: new)."""
    removed = {d for d in removed_ids if d in registry.index}
    change = build_registry([r for r in rows if _row_id(r) not in set(removed_ids)])
    old = registry.columns
    n_old = len(registry)
    at = np.fromiter(
        (registry.index.get(d, -1) for d in change.columns["device_ids"]),
        dtype=np.intp,
        count=len(change),
    )
    known, new = at >= 0, at < 0
    # New code tables extend the old ones, so the codes of untouched rows stay valid.
    tables = {"regions": registry.regions, "vendors": registry.vendors, "feeders": registry.feeders}
    columns: dict[str, np.ndarray] = {}
    for col, _, table in _CODED:
        labels = list(tables[table])
        lookup = {lbl: i for i, lbl in enumerate(labels)}
        remap = np.array(
            [lookup.setdefault(lbl, len(lookup)) for lbl in getattr(change, table)], dtype=np.int32
        )
        labels.extend(list(lookup)[len(labels) :])
        tables[table] = labels
        columns[col] = remap[change.columns[col]] if len(change) else change.columns[col]
    for name, values in change.columns.items():
        columns.setdefault(name, values)
    out: dict[str, np.ndarray] = {}
    keep = np.ones(n_old, dtype=bool)
    if removed:
        keep[[registry.index[d] for d in removed]] = False
    for name, column in old.items():
        merged = column
        if known.any() and name != "device_ids":  # a known id keeps its row and its id
            merged = column.copy()
            merged[at[known]] = columns[name][known]
        if removed:
            merged = merged[keep]
        out[name] = np.concatenate([merged, columns[name][new]]) if new.any() else merged
    source = np.concatenate([np.flatnonzero(keep), np.full(int(new.sum()), -1, dtype=np.intp)])
    appended = change.columns["device_ids"][new].tolist()
    if removed:
        index = dict(zip(out["device_ids"].tolist(), range(len(source)), strict=True))
    elif appended:
        index = dict(registry.index)  # snapshots handed out keep the old one: never mutated
        index.update(zip(appended, range(n_old, n_old + len(appended)), strict=True))
    else:
        index = registry.index
    result = Registry(out, tables["regions"], tables["vendors"], tables["feeders"], index)
    # Positions found so far move with their rows; chunks with ids unknown before are looked
    # up again (those ids may be among the new rows).
    moved = np.full(n_old + 1, -1, dtype=np.intp)  # old row → new row; moved[-1]: unknown
    moved[:n_old][keep] = np.arange(int(keep.sum()))
    result._positions = {
        k: (ids, moved[pos] if removed else pos)
        for k, (ids, pos) in registry._positions.items()
        if pos.size == 0 or pos.min() >= 0
    }
    return result, source


def _row_id(row: Sequence[Any] | Mapping[str, Any]) -> Any:
    return row["id"] if isinstance(row, Mapping) else row[0]


def _make_snapshot(
    registry: Registry,
    state: np.ndarray,
    online: npt.NDArray[np.bool_],
    freshness: npt.NDArray[np.int8],
    now_ms: int,
) -> FleetSnapshot:
    c = registry.columns
    return FleetSnapshot(
        now_ms=now_ms,
        device_ids=c["device_ids"],
        tenant_ids=c["tenant_ids"],
        region_codes=c["region_codes"],
        regions=registry.regions,
        kind_codes=c["kind_codes"],
        vendor_codes=c["vendor_codes"],
        vendors=registry.vendors,
        feeder_codes=c["feeder_codes"],
        feeders=registry.feeders,
        enrolled=c["enrolled"],
        capacity_wh=c["capacity_wh"],
        max_discharge_w=c["max_discharge_w"],
        max_charge_w=c["max_charge_w"],
        backup_reserve_pct=c["backup_reserve_pct"],
        rated_w=c["rated_w"],
        hvac_rated_w=c["hvac_rated_w"],
        comfort_max_c=c["comfort_max_c"],
        comfort_min_c=c["comfort_min_c"],
        max_offset_c=c["max_offset_c"],
        lat=c["lat"],
        lon=c["lon"],
        state=state,
        online=online,
        freshness=freshness,
        index=registry.index,
    )


def snapshot_with_changes(
    snap: FleetSnapshot, registry: Registry, source: npt.NDArray[np.intp]
) -> FleetSnapshot:
    """``snap`` re-aligned to ``registry`` (from :func:`registry_with_changes`): rows keep their
    state; new devices have none yet (never heard from, online until a status says otherwise)."""
    n_old = len(snap)
    if len(source) >= n_old and np.array_equal(source[:n_old], np.arange(n_old)):
        # Rows kept in place (PATCH, onboarding): share or extend the arrays, no scatter.
        extra = len(source) - n_old
        if extra == 0:
            state, online, freshness = snap.state, snap.online, snap.freshness
        else:
            state = np.concatenate([snap.state, np.repeat(_EMPTY_RECORD[np.newaxis], extra)])
            online = np.concatenate([snap.online, np.ones(extra, dtype=bool)])
            never = np.full(extra, FreshnessCode.never, dtype=np.int8)
            freshness = np.concatenate([snap.freshness, never])
        return _make_snapshot(registry, state, online, freshness, snap.now_ms)
    carried = source >= 0
    state = np.repeat(_EMPTY_RECORD[np.newaxis], len(source))
    state.view(_RECORD_BYTES)[carried] = snap.state.view(_RECORD_BYTES)[source[carried]]
    online = np.where(carried, snap.online[np.maximum(source, 0)], True)
    freshness = np.where(
        carried, snap.freshness[np.maximum(source, 0)], np.int8(FreshnessCode.never)
    ).astype(np.int8)
    return _make_snapshot(registry, state, online, freshness, snap.now_ms)


def assemble_packed(
    registry: Registry,
    states: Sequence[PackedStates],
    statuses: Sequence[PackedStatus],
    now_ms: int,
    interval_s: float,
    offline_after_s: float,
) -> FleetSnapshot:
    """The snapshot from the state store's packed answers (``all_states_packed`` /
    ``all_status_packed``): records land in their registry rows with one scatter."""
    n = len(registry)
    state = np.repeat(_EMPTY_RECORD[np.newaxis], n)
    if states:
        pos = registry.positions("state", [ids for ids, _ in states])
        recs = np.frombuffer(b"".join(blob for _, blob in states), dtype=_RECORD_BYTES)
        ok = pos >= 0  # devices in the store but not (or no longer) registered are skipped
        # Scattered as opaque 64-byte items: ten times faster than field by field.
        state.view(_RECORD_BYTES)[pos[ok]] = recs[ok]
    # No status message yet: online if telemetry flows; a retained "offline" or Last Will wins.
    online = np.ones(n, dtype=bool)
    if statuses:
        pos = registry.positions("status", [ids for ids, _ in statuses])
        flags = np.concatenate([np.asarray(f, dtype=bool) for _, f in statuses])
        ok = pos >= 0
        online[pos[ok]] = flags[ok]
    freshness = compute_freshness(state["recv_ms"], online, now_ms, interval_s, offline_after_s)
    return _make_snapshot(registry, state, online, freshness, now_ms)


def assemble(
    registry: Registry,
    states: Mapping[str, bytes],
    statuses: Mapping[str, tuple[bool, int]],
    now_ms: int,
    interval_s: float,
    offline_after_s: float,
) -> FleetSnapshot:
    """The snapshot from ``all_states()`` / ``all_status()`` dicts (vectorised like
    :func:`assemble_packed`)."""
    status_flags = np.fromiter((v[0] for v in statuses.values()), dtype=bool, count=len(statuses))
    return assemble_packed(
        registry,
        [pack_records(list(states), list(states.values()))] if states else [],
        [(list(statuses), status_flags)] if statuses else [],
        now_ms,
        interval_s,
        offline_after_s,
    )


class FleetCache:
    """Keeps a current snapshot for the API, forecaster and dispatcher: stale-while-revalidate.

    ``snapshot()`` answers at once with the snapshot it has; when that is older than
    ``max_age_s`` (wall time) it starts one rebuild in the background, so no request waits for
    a million devices to be re-read. Only the first call waits, and calls after ``invalidate()``
    or with ``force=True`` (the event runner's closed loop, tests), which wait for a build that
    started after them.

    The registry is reloaded from the database only when the state store's registry version
    says another process changed it: changes made here come in through ``apply_changes`` and
    are applied to the registry and the current snapshot at once. Worker-thread assembly and
    the registry build keep the event loop responsive while a rebuild runs.
    """

    def __init__(
        self,
        services: Any,
        max_age_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.services = services
        self.max_age_s = max_age_s
        # Wall-clock bounded on purpose (like the state store's TTLs): it limits work, not
        # simulated time.
        self._monotonic = monotonic
        self._registry: Registry | None = None
        self._registry_version: int | None = None
        self._snapshot: FleetSnapshot | None = None
        self._built_at = 0.0
        self._lock = asyncio.Lock()
        # Tickets: a build serves every request made before it started.
        self._requested = 0
        self._built_ticket = -1
        self._must_ticket = 0
        # Local changes seen while a build runs, applied again to its result (idempotent).
        self._changes: list[tuple[list[Any], list[str]]] | None = None
        self._refresh: asyncio.Task[None] | None = None
        self.builds = 0
        self.registry_loads = 0
        self.last_build_s: dict[str, float] = {}

    def invalidate(self) -> None:
        """The next ``snapshot()`` waits for a build that starts after this call (state and
        registry re-read; the registry from the database only if its version moved)."""
        self._requested += 1
        self._must_ticket = self._requested

    def apply_changes(
        self, rows: Sequence[Sequence[Any] | Mapping[str, Any]], removed_ids: Sequence[str] = ()
    ) -> None:
        """Devices this process just onboarded/changed (``rows``: registry rows as tuples in
        ``_REGISTRY_COLUMNS`` order or dicts with those keys) and offboarded (``removed_ids``),
        after the call's one registry write (``registry_put``): the registry and the current
        snapshot take them at once, no reload from the database."""
        tuples = [
            tuple(r[c] for c in _REGISTRY_COLUMNS) if isinstance(r, Mapping) else tuple(r)
            for r in rows
        ]
        removed = list(removed_ids)
        if self._changes is not None:
            self._changes.append((tuples, removed))
        if self._registry is None:
            return  # nothing loaded yet: the first build reads the database
        self._registry, source = registry_with_changes(self._registry, tuples, removed)
        if self._registry_version is not None:
            self._registry_version += 1  # our own registry write, already applied
        if self._snapshot is not None:
            self._snapshot = snapshot_with_changes(self._snapshot, self._registry, source)

    async def snapshot(self, force: bool = False) -> FleetSnapshot:
        if force:
            self._requested += 1
            return await self._fresh(self._requested)
        snap = self._snapshot
        if snap is None or self._built_ticket < self._must_ticket:
            return await self._fresh(self._must_ticket)
        if self._monotonic() - self._built_at >= self.max_age_s:
            self._start_refresh()
        return snap

    async def stop(self) -> None:
        """Cancel a background rebuild (called by ``Services.close`` via ``components``)."""
        task, self._refresh = self._refresh, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_refreshed(self) -> None:
        """Wait for a background rebuild in flight, if any (tests, benches)."""
        task = self._refresh
        if task is not None:
            await asyncio.shield(task)

    async def _fresh(self, ticket: int) -> FleetSnapshot:
        async with self._lock:
            if self._snapshot is not None and self._built_ticket >= ticket:
                return self._snapshot
            return await self._build()

    def _start_refresh(self) -> None:
        if self._refresh is not None and not self._refresh.done():
            return
        components = getattr(self.services, "components", None)
        if isinstance(components, dict):
            components.setdefault("fleet_cache", self)  # so Services.close stops the task
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_in_background())

    async def _refresh_in_background(self) -> None:
        try:
            async with self._lock:
                if self._monotonic() - self._built_at < self.max_age_s:
                    return  # someone rebuilt while we queued
                await self._build()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Keep serving the previous snapshot; try again after another max_age_s.
            log.exception("fleet snapshot rebuild failed; serving the previous snapshot")
            self._built_at = self._monotonic()

    async def _build(self) -> FleetSnapshot:
        """One rebuild; the caller holds the lock."""
        ticket = self._requested
        self._changes = []
        timings: dict[str, float] = {}
        store = self.services.state
        try:
            t0 = time.perf_counter()
            version = await store.registry_version()
            reload = self._registry is None or version != self._registry_version
            registry = self._registry
            if reload:
                registry = await self._load_registry()
                timings["registry_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            states, statuses = await asyncio.gather(
                store.all_states_packed(), store.all_status_packed()
            )
            timings["read_s"] = time.perf_counter() - t1
            assert registry is not None
            if not reload:
                registry = self._registry  # local changes applied while we read
                assert registry is not None
            s = self.services.settings
            t2 = time.perf_counter()
            snap = await asyncio.to_thread(
                assemble_packed,
                registry,
                states,
                statuses,
                self.services.clock.now_ms(),
                s.telemetry_interval_s,
                s.offline_after_s,
            )
            timings["assemble_s"] = time.perf_counter() - t2
            # Local changes made meanwhile (idempotent on rows they already reached). No await
            # from here on: registry and snapshot are swapped together.
            for rows, removed in self._changes:
                registry, source = registry_with_changes(registry, rows, removed)
                snap = snapshot_with_changes(snap, registry, source)
            self._registry, self._snapshot = registry, snap
            if reload:
                self._registry_version = version
                self.registry_loads += 1
            self._built_ticket = ticket
            self._built_at = self._monotonic()
            self.builds += 1
            timings["total_s"] = time.perf_counter() - t0
            self.last_build_s = timings
            return snap
        finally:
            self._changes = None

    async def _load_registry(self) -> Registry:
        from vpp.db.models import Device

        db = self.services.db
        if not db.is_sqlite:
            csv = await _copy_registry_csv(db)
            if csv is not None:
                return await asyncio.to_thread(_registry_from_csv, csv)
        cols = [getattr(Device, name) for name in _REGISTRY_COLUMNS]
        query = select(*cols).where(Device.offboarded_ms.is_(None)).order_by(Device.id)
        async with db.session() as session:
            rows = (await session.execute(query)).all()
        # Transposed to columns and converted in a worker thread.
        return await asyncio.to_thread(build_registry, rows)


async def _copy_registry_csv(db: Any) -> bytes | None:
    """The registry columns as CSV through PostgreSQL's COPY (asyncpg): no Python object per
    row or value on the event loop; parsed by pandas' C reader. None if the driver can't."""
    sql = (
        f"SELECT {', '.join(_REGISTRY_COLUMNS)} FROM devices "
        "WHERE offboarded_ms IS NULL ORDER BY id"
    )
    chunks: list[bytes] = []

    async def sink(data: bytes) -> None:
        chunks.append(data)

    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = getattr(raw, "driver_connection", None)
        if driver is None or not hasattr(driver, "copy_from_query"):
            return None
        await driver.copy_from_query(sql, output=sink, format="csv")
    return b"".join(chunks)


def _registry_from_csv(data: bytes) -> Registry:
    if not data.strip():
        return build_registry([])
    text = _REGISTRY_COLUMNS[:7]  # ids, tenant, codes and the t/f of enrolled
    dtypes: dict[str, Any] = {
        **dict.fromkeys(text, object),
        **dict.fromkeys(_FLOAT_COLUMNS, "float64"),
    }
    frame = pd.read_csv(
        io.BytesIO(data),
        header=None,
        names=list(_REGISTRY_COLUMNS),
        dtype=dtypes,
        # NULL is an unquoted empty field: "" for text (vendor/feeder code as ""), NaN for floats.
        keep_default_na=False,
        na_values={c: [""] for c in _FLOAT_COLUMNS},
        float_precision="round_trip",
    )
    columns: dict[str, Any] = {c: frame[c].to_numpy() for c in _REGISTRY_COLUMNS}
    columns["enrolled"] = columns["enrolled"] == "t"
    return build_registry_columns(columns)
