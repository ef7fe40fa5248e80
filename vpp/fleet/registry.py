"""The registry part of the fleet (attributes that change only on onboarding, PATCH and
offboarding) as columns, and the assembly of a :class:`FleetSnapshot` from it and the state
store's packed records. Pure: the store hands the rows and records in (``store.fleet_cache``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from vpp.domain import KIND_CODE, DeviceKind, FreshnessCode
from vpp.fleet.records import STATE_DTYPE, PackedStates, PackedStatus, empty_state, pack_records
from vpp.fleet.snapshot import FleetSnapshot, compute_freshness

REGISTRY_COLUMNS = (
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
FLOAT_COLUMNS = REGISTRY_COLUMNS[7:]
# (snapshot column, registry column, code table attribute) of the columns coded against a table.
_CODED = (
    ("region_codes", "region", "regions"),
    ("vendor_codes", "vendor", "vendors"),
    ("feeder_codes", "feeder", "feeders"),
)
_EMPTY_RECORD = empty_state()[0]
_RECORD_BYTES = np.dtype(f"V{STATE_DTYPE.itemsize}")


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
    """A registry from whole columns (names of ``REGISTRY_COLUMNS``): vectorised, no per-row
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
    for name in FLOAT_COLUMNS:
        # None → NaN in numpy's own conversion.
        columns[name] = np.asarray(data[name], dtype=float) if n else np.zeros(0)
    index = dict(zip(ids.tolist(), range(n), strict=True))
    return Registry(columns, tables["regions"], tables["vendors"], tables["feeders"], index)


def build_registry(rows: Sequence[Sequence[Any]]) -> Registry:
    """A registry from rows in ``REGISTRY_COLUMNS`` order (tuples, or dicts keyed by column)."""
    if rows and isinstance(rows[0], Mapping):
        rows = [tuple(r[c] for c in REGISTRY_COLUMNS) for r in rows]  # type: ignore[call-overload]
    cols: list[Any] = list(zip(*rows, strict=True)) if rows else [() for _ in REGISTRY_COLUMNS]
    return build_registry_columns(dict(zip(REGISTRY_COLUMNS, cols, strict=True)))


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
