"""The registry part of the fleet (attributes that change only on onboarding, PATCH and
offboarding) as columns, and the assembly of a :class:`FleetSnapshot` from it and the state
store's packed records. Pure: the store hands the rows and records in (``store.fleet_cache``)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from vpp.domain import KIND_CODE, DeviceKind, FreshnessCode
from vpp.fleet.ids import IdIndex
from vpp.fleet.records import (
    STATE_DTYPE,
    PackedIds,
    PackedStates,
    PackedStatus,
    empty_state,
    pack_records,
    packed_ids,
)
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
    index: IdIndex
    # Offboarded rows kept in place until :func:`compact_registry` (None: none): a tombstone is
    # O(1) where compacting a million rows is not.
    removed: npt.NDArray[np.bool_] | None = None
    # State-store order → registry rows, per chunk of the store's answer: the store returns its
    # devices in the same order from one read to the next, and looking a million ids up by hash
    # costs about a second (random memory access), so only chunks whose ids changed are looked
    # up again. Keyed by (what, chunk number): (the chunk's ids, their rows).
    _positions: dict[tuple[str, int], tuple[PackedIds, npt.NDArray[np.intp]]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # The ids hashed for a cold lookup of many ids at once (built on first use, kept while the
    # rows keep their ids): see :func:`id_hashes`.
    _hashed: _HashedIds | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.columns["device_ids"])

    def positions(self, what: str, chunks: Sequence[PackedIds]) -> npt.NDArray[np.intp]:
        """The registry row of every id in ``chunks`` (ids as in ``PackedIds``; -1 if not
        registered), concatenated in chunk order."""
        out: list[npt.NDArray[np.intp] | None] = []
        todo: list[int] = []
        for i, ids in enumerate(chunks):
            cached = self._positions.get((what, i))
            if cached is not None and cached[0] == ids:  # a blob compares as one memcmp
                out.append(cached[1])
            else:
                out.append(None)
                todo.append(i)
        if todo:  # one lookup pass over every chunk that changed
            found: npt.NDArray[np.intp] | None = None
            n_todo = sum(_count(chunks[i]) for i in todo)
            if n_todo >= _HASH_JOIN_MIN and all(isinstance(chunks[i], bytes) for i in todo):
                hashed = self._hashed_ids()
                if hashed is not None:
                    found = hashed.lookup(b"".join(chunks[i] for i in todo))  # type: ignore[misc]
                    if self.removed is not None:  # tombstones keep their ids' hashes
                        found[(found >= 0) & self.removed[np.maximum(found, 0)]] = -1
            if found is None:
                names = [d for i in todo for d in packed_ids(chunks[i])]
                names = [d.decode() if isinstance(d, bytes) else d for d in names]
                found = self.index.rows_of(names)
            lo = 0
            for i in todo:
                size = _count(chunks[i])
                out[i] = found[lo : lo + size]
                lo += size
        # Replace (not update) so chunks that disappeared are forgotten.
        done = [p for p in out if p is not None]
        fresh = {
            (what, i): (ids if isinstance(ids, bytes) else list(ids), pos)
            for i, (ids, pos) in enumerate(zip(chunks, done, strict=True))
        }
        self._positions = {**{k: v for k, v in self._positions.items() if k[0] != what}, **fresh}
        return np.concatenate(done) if done else np.zeros(0, np.intp)

    def _hashed_ids(self) -> _HashedIds | None:
        if self._hashed is None:
            ids = self.columns["device_ids"].tolist()
            blob = ("\n".join(ids) + "\n").encode() if ids else b""
            self._hashed = _HashedIds.build(blob, len(ids))
        return self._hashed if self._hashed.ok else None


# A cold lookup of more ids than this goes through the hashed ids instead of the dict.
_HASH_JOIN_MIN = 20_000
_BASES = (0x100000001B3, 0x9E3779B97F4A7C15)


def _powers(base: int, n: int) -> npt.NDArray[np.uint64]:
    """base**i mod 2**64 for i < n (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        steps = np.full(n, base, dtype=np.uint64)
        steps[0] = 1
        return np.cumprod(steps, dtype=np.uint64)


def id_hashes(blob: bytes) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Two 64-bit polynomial hashes of every id in ``blob`` (ids each followed by b"\\n", the
    newline hashed too so no id is a prefix of another), vectorised over the bytes: each byte
    times base**(its position in its id), summed over each id by ``np.add.reduceat``."""
    b = np.frombuffer(blob, dtype=np.uint8)
    if not len(b):
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    ends = np.flatnonzero(b == 10) + 1
    starts = np.concatenate([np.zeros(1, np.intp), ends[:-1]])
    lengths = ends - starts
    at = np.arange(len(b), dtype=np.intp) - np.repeat(starts, lengths)  # position in its id
    values = b.astype(np.uint64)
    out = []
    with np.errstate(over="ignore"):
        for base in _BASES:
            terms = values * _powers(base, int(lengths.max()))[at]
            out.append(np.add.reduceat(terms, starts, dtype=np.uint64))
    return out[0], out[1]


@dataclass
class _HashedIds:
    """The registry's ids by two 64-bit hashes: a million ids looked up as one vectorised hash
    join (pandas' uint64 table) instead of a million dict probes into scattered str objects.
    A hit must match both hashes; ``ok`` is False if two registered ids share the first."""

    by_first: pd.Index
    second: npt.NDArray[np.uint64]
    ok: bool

    @classmethod
    def build(cls, blob: bytes, n: int) -> _HashedIds:
        first, second = id_hashes(blob) if n else (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
        by_first = pd.Index(first)
        return cls(by_first, second, len(first) == n and by_first.is_unique)

    def lookup(self, blob: bytes) -> npt.NDArray[np.intp]:
        first, second = id_hashes(blob)
        found = self.by_first.get_indexer(pd.Index(first)).astype(np.intp)
        hit = found >= 0
        found[hit & (self.second[np.maximum(found, 0)] != second)] = -1
        return found


def chunk_digest(ids: bytes) -> bytes:
    """A 16-byte digest of a packed chunk's id blob: equal digests, equal ids (a registry
    image keeps chunk positions by it, ``vpp.fleet.image``)."""
    return hashlib.blake2b(ids, digest_size=16).digest()


def export_positions(registry: Registry) -> dict[str, dict[bytes, npt.NDArray[np.intp]]]:
    """The registry rows of every state-store chunk it has joined, by what (``"state"``,
    ``"status"``) and the chunk's digest: what a registry image carries so the next process
    joins the store's answer without a cold lookup."""
    out: dict[str, dict[bytes, npt.NDArray[np.intp]]] = {}
    for (what, _), (ids, pos) in registry._positions.items():
        if isinstance(ids, bytes):
            out.setdefault(what, {})[chunk_digest(ids)] = pos
    return out


def seed_positions(
    registry: Registry,
    what: str,
    chunks: Sequence[PackedIds],
    known: Mapping[bytes, npt.NDArray[np.intp]],
) -> int:
    """Take chunk positions from an image (``export_positions`` of the registry the image was
    made from, which is this one's rows before any change): each chunk whose ids hash to a
    known digest gets those rows, as if this registry had joined it. Call it before applying
    changes: ``registry_with_changes`` and ``compact_registry`` carry seeded positions along as
    they do joined ones. Returns the chunks seeded."""
    n = len(registry)
    seeded = 0
    positions = dict(registry._positions)
    for i, ids in enumerate(chunks):
        if not isinstance(ids, bytes) or (what, i) in positions:
            continue
        pos = known.get(chunk_digest(ids))
        if pos is not None and len(pos) == _count(ids) and (not len(pos) or pos.max() < n):
            positions[(what, i)] = (ids, pos)
            seeded += 1
    registry._positions = positions
    return seeded


def _count(ids: PackedIds) -> int:
    return ids.count(b"\n") if isinstance(ids, bytes) else len(ids)


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
    return Registry(
        columns, tables["regions"], tables["vendors"], tables["feeders"], IdIndex.build(ids)
    )


def build_registry(rows: Sequence[Sequence[Any]]) -> Registry:
    """A registry from rows in ``REGISTRY_COLUMNS`` order (tuples, or dicts keyed by column)."""
    if rows and isinstance(rows[0], Mapping):
        rows = [tuple(r[c] for c in REGISTRY_COLUMNS) for r in rows]  # type: ignore[call-overload]
    cols: list[Any] = list(zip(*rows, strict=True)) if rows else [() for _ in REGISTRY_COLUMNS]
    return build_registry_columns(dict(zip(REGISTRY_COLUMNS, cols, strict=True)))


def registry_with_changes(
    registry: Registry, rows: Sequence[Sequence[Any]], removed_ids: Sequence[str] = ()
) -> Registry:
    """``registry`` with ``rows`` upserted (a known id has its columns replaced in place, a new
    one is appended) and ``removed_ids`` tombstoned. Idempotent. No row moves: the rows of
    ``registry`` keep their places and new rows follow them (:func:`compact_registry` drops the
    tombstones later, off the request path)."""
    gone = set(removed_ids)
    kept = [r for r in rows if _row_id(r) not in gone]
    out = _upsert(registry, kept) if kept else registry
    dead = [d for d in gone if d in out.index]
    return _tombstone(out, dead) if dead else out


def _upsert(registry: Registry, rows: Sequence[Sequence[Any]]) -> Registry:
    rows = list({_row_id(r): r for r in rows}.values())  # an id changed twice: its last row
    change = build_registry(rows)
    old = registry.columns
    n_old = len(registry)
    at = registry.index.rows_of(change.columns["device_ids"])
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
    for name, column in old.items():
        merged = column
        if known.any() and name != "device_ids":  # a known id keeps its row and its id
            merged = column.copy()
            merged[at[known]] = columns[name][known]
        out[name] = np.concatenate([merged, columns[name][new]]) if new.any() else merged
    appended = change.columns["device_ids"][new].tolist()
    removed = registry.removed
    if appended:
        index = registry.index.with_appended(appended, n_old)  # handed-out ones keep theirs
        if removed is not None:
            removed = np.concatenate([removed, np.zeros(len(appended), dtype=bool)])
    else:
        index = registry.index
    result = Registry(out, tables["regions"], tables["vendors"], tables["feeders"], index, removed)
    # Positions found so far stay valid (no row moved). Chunks with ids unknown before are
    # looked up again (those ids may be among the new rows), and so are chunks that point at a
    # tombstone when rows are appended (the id may be back, onboarded again, in a new row).
    if not appended:
        result._hashed = registry._hashed  # the same ids in the same rows
    dead = registry.removed if appended and registry.removed is not None else None
    result._positions = {
        k: (ids, pos)
        for k, (ids, pos) in registry._positions.items()
        if pos.size == 0 or (pos.min() >= 0 and (dead is None or not dead[pos].any()))
    }
    return result


def _tombstone(registry: Registry, device_ids: Sequence[str]) -> Registry:
    """Offboarding without moving a row: O(removed) plus copies of the few small columns a
    tombstone changes (a few MB at a million devices), never the state records, the object
    columns or the id index.

    The id index is shared with the snapshots already handed out and the ids leave it in place:
    an offboarded device stops being found through them at once, which is what offboarding
    promises, while their arrays stay as they were."""
    rows = np.fromiter((registry.index.pop(d) for d in device_ids), dtype=np.intp)
    columns = dict(registry.columns)
    region_codes = columns["region_codes"].copy()
    region_codes[rows] = -1  # in no region: region filters and region tables never count it
    enrolled = columns["enrolled"].copy()
    enrolled[rows] = False
    columns["region_codes"], columns["enrolled"] = region_codes, enrolled
    n = len(registry)
    removed = np.zeros(n, dtype=bool) if registry.removed is None else registry.removed.copy()
    removed[rows] = True
    result = Registry(
        columns, registry.regions, registry.vendors, registry.feeders, registry.index, removed
    )
    result._positions = registry._positions  # rows did not move; a removed row is masked
    result._hashed = registry._hashed  # the same ids in the same rows (removed ones masked)
    return result


def compact_registry(registry: Registry) -> tuple[Registry, npt.NDArray[np.intp] | None]:
    """``registry`` without its tombstones, and for each row the row it came from (None: there
    was nothing to compact). O(devices): the cache runs it in a worker thread at a build."""
    if registry.removed is None or not registry.removed.any():
        return registry, None
    keep = ~registry.removed
    source = np.flatnonzero(keep)
    out = {name: column[keep] for name, column in registry.columns.items()}
    index = IdIndex.build(out["device_ids"])
    result = Registry(out, registry.regions, registry.vendors, registry.feeders, index)
    moved = np.full(len(registry) + 1, -1, dtype=np.intp)  # old row → new row; moved[-1]: -1
    moved[source] = np.arange(len(source))
    result._positions = {k: (ids, moved[pos]) for k, (ids, pos) in registry._positions.items()}
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
        removed=registry.removed,
    )


def snapshot_with_changes(
    snap: FleetSnapshot, registry: Registry, source: npt.NDArray[np.intp] | None = None
) -> FleetSnapshot:
    """``snap`` re-aligned to ``registry``: rows keep their state; new devices have none yet
    (never heard from, online until a status says otherwise); removed ones are offline.

    ``source`` None (from :func:`registry_with_changes`): the rows of ``snap`` kept their places
    and new rows follow, so the state records are shared or extended, never scattered. Else
    (from :func:`compact_registry`) the row of ``snap`` each row came from (-1: new)."""
    n_old = len(snap)
    if source is None:
        extra = len(registry) - n_old
        if extra == 0:
            state, online, freshness = snap.state, snap.online, snap.freshness
        else:
            state = np.concatenate([snap.state, np.repeat(_EMPTY_RECORD[np.newaxis], extra)])
            online = np.concatenate([snap.online, np.ones(extra, dtype=bool)])
            never = np.full(extra, FreshnessCode.never, dtype=np.int8)
            freshness = np.concatenate([snap.freshness, never])
        removed = registry.removed
        if removed is not None and removed is not snap.removed:  # new tombstones
            online = online & ~removed
            freshness = np.where(removed, np.int8(FreshnessCode.offline), freshness)
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
    if states:
        pos = registry.positions("state", [ids for ids, _ in states])
        ok = pos >= 0  # devices in the store but not (or no longer) registered are skipped
        covered = np.zeros(n, dtype=bool)
        covered[pos[ok]] = True
        # Rows with no record start empty; when every row has one (the usual case), none
        # needs the fill (64 MB at a million devices).
        state = np.empty(n, STATE_DTYPE) if covered.all() else np.repeat(_EMPTY_RECORD[None], n)
        # Scattered as opaque 64-byte items (ten times faster than field by field), a chunk
        # at a time: no copy of every record into one buffer first.
        view = state.view(_RECORD_BYTES)
        every = bool(ok.all())
        lo = 0
        for _, blob in states:
            recs = np.frombuffer(blob, dtype=_RECORD_BYTES)
            at = pos[lo : lo + len(recs)]
            lo += len(recs)
            if every:
                view[at] = recs
            else:
                keep = at >= 0
                view[at[keep]] = recs[keep]
    else:
        state = np.repeat(_EMPTY_RECORD[np.newaxis], n)
    # No status message yet: online if telemetry flows; a retained "offline" or Last Will wins.
    online = np.ones(n, dtype=bool)
    if statuses:
        pos = registry.positions("status", [ids for ids, _ in statuses])
        flags = np.concatenate([np.asarray(f, dtype=bool) for _, f in statuses])
        ok = pos >= 0
        online[pos[ok] if not ok.all() else pos] = flags[ok] if not ok.all() else flags
    if registry.removed is not None:
        online &= ~registry.removed  # offboarded, not yet compacted away
    freshness = compute_freshness(state["recv_ms"], online, now_ms, interval_s, offline_after_s)
    if registry.removed is not None:
        freshness[registry.removed] = FreshnessCode.offline
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
