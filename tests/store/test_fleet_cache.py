"""The fleet cache at scale: the vectorised registry build and state join give the same
snapshot as the row-by-row code they replaced; the cache serves stale-while-revalidate, takes
local changes without a database reload, and still shows a change at once after
``invalidate()``."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from store.fleet_cache import FleetCache
from store.state.memory import MemoryStateStore
from vpp.clock import ManualClock
from vpp.domain import KIND_CODE, DeviceKind, FreshnessCode
from vpp.fleet.records import STATE_DTYPE, empty_state, pack_state, unpack_states
from vpp.fleet.registry import (
    REGISTRY_COLUMNS,
    Registry,
    assemble,
    assemble_packed,
    build_registry,
    compact_registry,
    registry_with_changes,
    snapshot_with_changes,
)
from vpp.fleet.snapshot import FleetSnapshot, compute_freshness, summarise

NOW = 1_784_061_000_000
INTERVAL_S = 300.0
OFFLINE_S = 900.0
ARRAY_FIELDS = [name for name, value in vars(FleetSnapshot).get("__dataclass_fields__", {}).items()]


# --- the row-by-row code as it was (the reference) -----------------------------------------------
def reference_snapshot(
    rows: list[tuple[Any, ...]],
    states: dict[str, bytes],
    statuses: dict[str, tuple[bool, int]],
) -> dict[str, Any]:
    """Per device id: registry values and state, computed one device at a time."""
    out: dict[str, Any] = {}
    for row in rows:
        d = dict(zip(REGISTRY_COLUMNS, row, strict=True))
        blob = states.get(d["id"])
        state = unpack_states([blob])[0]
        online = statuses.get(d["id"], (True, 0))[0]
        fresh = compute_freshness(
            np.array([state["recv_ms"]]), np.array([online]), NOW, INTERVAL_S, OFFLINE_S
        )[0]
        out[d["id"]] = (d, state.tobytes(), bool(online), int(fresh))
    return out


def as_reference(snap: FleetSnapshot) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, did in enumerate(snap.device_ids):
        if snap.removed is not None and snap.removed[i]:
            assert did not in snap.index or snap.device_ids[snap.index[did]] is not did
            continue
        d = {
            "id": did,
            "tenant_id": snap.tenant_ids[i],
            "region": snap.regions[snap.region_codes[i]],
            "kind": DeviceKind({v: k for k, v in KIND_CODE.items()}[int(snap.kind_codes[i])]).value,
            "vendor": snap.vendors[snap.vendor_codes[i]],
            "feeder": snap.feeders[snap.feeder_codes[i]],
            "enrolled": bool(snap.enrolled[i]),
        }
        for name in REGISTRY_COLUMNS[7:]:
            v = float(getattr(snap, name)[i])
            d[name] = None if np.isnan(v) else v
        out[did] = (d, snap.state[i].tobytes(), bool(snap.online[i]), int(snap.freshness[i]))
        assert snap.index[did] == i
    return out


def normalise(ref: dict[str, Any]) -> dict[str, Any]:
    """Registry values as the snapshot holds them (missing text is "", NaN floats None)."""
    out = {}
    for did, (d, state, online, fresh) in ref.items():
        d = dict(d)
        d["vendor"] = d["vendor"] or ""
        d["feeder"] = d["feeder"] or ""
        d["enrolled"] = bool(d["enrolled"])
        for name in REGISTRY_COLUMNS[7:]:
            d[name] = None if d[name] is None else float(d[name])
        out[did] = (d, state, online, fresh)
    return out


def random_fleet(
    n: int, seed: int
) -> tuple[list[tuple[Any, ...]], dict[str, bytes], dict[str, tuple[bool, int]]]:
    rng = random.Random(seed)
    rows, states, statuses = [], {}, {}
    for i in range(n):
        did = f"d-{seed}-{i:05d}"
        kind = rng.choice(["battery", "solar", "thermostat"])

        def maybe(lo: float, hi: float) -> float | None:
            return None if rng.random() < 0.2 else rng.uniform(lo, hi)

        rows.append(
            (
                did,
                rng.choice(["acme", "beta"]),
                rng.choice(["ERCOT-NORTH", "PJM-DOM", "CAISO-SP15"]),
                kind,
                rng.choice([None, "", "oem-a", "oem-b"]),
                rng.choice([None, "f-1", "f-2"]),
                rng.random() > 0.1,
                maybe(5_000, 20_000),
                maybe(3_000, 11_500),
                maybe(3_000, 11_500),
                maybe(10, 50),
                maybe(4_000, 9_000),
                maybe(3_500, 5_600),
                maybe(24, 30),
                maybe(14, 18),
                maybe(1, 3),
                maybe(25, 45),
                maybe(-120, -75),
            )
        )
        r = rng.random()
        if r < 0.8:
            rec = empty_state()
            rec["recv_ms"] = NOW - rng.randint(0, 2_000_000)
            rec["soc_pct"] = rng.uniform(0, 100)
            rec["kind"] = KIND_CODE[DeviceKind(kind)]
            states[did] = pack_state(rec)
        elif r < 0.85:
            states[did] = b"short"  # a damaged record reads as no state
        if rng.random() < 0.5:
            statuses[did] = (rng.random() > 0.2, NOW)
    # Devices in the store but not registered (offboarded elsewhere) are ignored.
    states["ghost"] = pack_state(empty_state())
    statuses["ghost"] = (False, NOW)
    return rows, states, statuses


def packed_chunks(
    states: dict[str, bytes], statuses: dict[str, tuple[bool, int]], seed: int, size: int = 7
) -> tuple[list[Any], list[Any]]:
    """The store's packed answer in a shuffled order, ids as bytes (like Redis)."""
    from vpp.fleet.records import pack_records

    rng = random.Random(seed)
    items = list(states.items())
    rng.shuffle(items)
    st = [
        pack_records([d.encode() for d, _ in chunk], [r for _, r in chunk])
        for chunk in (items[lo : lo + size] for lo in range(0, len(items), size))
    ]
    stat_items = list(statuses.items())
    rng.shuffle(stat_items)
    stat = [
        (
            [d.encode() for d, _ in stat_items[lo : lo + size]],
            np.array([v[0] for _, v in stat_items[lo : lo + size]], dtype=bool),
        )
        for lo in range(0, len(stat_items), size)
    ]
    return st, stat


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_vectorised_build_and_join_match_the_row_by_row_code(seed: int) -> None:
    rows, states, statuses = random_fleet(400, seed)
    expected = normalise(reference_snapshot(rows, states, statuses))
    registry = build_registry(rows)
    got = assemble(registry, states, statuses, NOW, INTERVAL_S, OFFLINE_S)
    assert as_reference(got) == expected
    # Packed, shuffled, bytes ids; twice (the second time from cached positions).
    for _ in range(2):
        st, stat = packed_chunks(states, statuses, seed)
        packed = assemble_packed(registry, st, stat, NOW, INTERVAL_S, OFFLINE_S)
        assert as_reference(packed) == expected
    # Rows as dicts build the same registry.
    as_dicts: list[Any] = [dict(zip(REGISTRY_COLUMNS, r, strict=True)) for r in rows]
    same = build_registry(as_dicts)
    assert same.regions == registry.regions and same.vendors == registry.vendors
    for name, col in registry.columns.items():
        assert np.array_equal(col, same.columns[name], equal_nan=col.dtype.kind == "f"), name


def test_code_tables_keep_first_appearance_order_and_merge_missing_with_empty() -> None:
    rows = [
        ("a", "t", "R2", "battery", None, None, True, *[None] * 11),
        ("b", "t", "R1", "solar", "", "f", True, *[None] * 11),
        ("c", "t", "R2", "thermostat", "v", None, False, *[None] * 11),
    ]
    reg = build_registry(rows)
    assert reg.regions == ["R2", "R1"] and reg.vendors == ["", "v"] and reg.feeders == ["", "f"]
    assert reg.columns["vendor_codes"].tolist() == [0, 0, 1]
    assert reg.columns["kind_codes"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        build_registry([("x", "t", "R", "toaster", None, None, True, *[None] * 11)])
    assert len(build_registry([])) == 0


def test_changes_give_the_same_snapshot_as_a_rebuild() -> None:
    rows, states, statuses = random_fleet(300, 9)
    registry = build_registry(rows)
    snap = assemble(registry, states, statuses, NOW, INTERVAL_S, OFFLINE_S)
    new_rows, _, _ = random_fleet(20, 10)
    patched = [(*rows[5][:6], not rows[5][6], *rows[5][7:])]
    patched.append((rows[6][0], rows[6][1], "NEW-REGION", *rows[6][3:]))
    removed = [rows[0][0], rows[100][0], "never-registered"]
    reg2 = registry_with_changes(registry, new_rows + patched, removed)
    snap2 = snapshot_with_changes(snap, reg2)
    # Idempotent: applying the same change again changes nothing.
    reg3 = registry_with_changes(reg2, new_rows + patched, removed)
    snap3 = snapshot_with_changes(snap2, reg3)
    # Compacting the tombstones away gives the same devices, and so does a fresh assembly.
    reg4, source4 = compact_registry(reg3)
    assert source4 is not None and reg4.removed is None and len(reg4) == len(reg3) - 2
    snap4 = snapshot_with_changes(snap3, reg4, source4)

    final = {r[0]: r for r in rows}
    final.update({r[0]: r for r in new_rows + patched})
    for d in removed:
        final.pop(d, None)
    states_now = {d: s for d, s in states.items() if d not in {r[0] for r in new_rows}}
    expected = normalise(reference_snapshot(list(final.values()), states_now, statuses))
    assert as_reference(snap2) == expected
    assert as_reference(snap3) == expected
    assert as_reference(snap4) == expected
    st, stat = packed_chunks(states, statuses, 9)
    assert as_reference(assemble_packed(reg3, st, stat, NOW, INTERVAL_S, OFFLINE_S)) == expected
    assert as_reference(assemble_packed(reg4, st, stat, NOW, INTERVAL_S, OFFLINE_S)) == expected


# --- the cache ------------------------------------------------------------------------------------
class Tick:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class DbCache(FleetCache):
    """The cache with its database replaced by a list of rows (counts the reloads)."""

    def __init__(self, services: Any, rows: list[tuple[Any, ...]], tick: Tick) -> None:
        super().__init__(
            None,  # type: ignore[arg-type]  # no database: rows come from the list
            services.state,
            services.settings,
            services.clock,
            max_age_s=2.0,
            monotonic=tick,
        )
        self.rows = rows

    async def _load_registry(self) -> Registry:
        await asyncio.sleep(0)
        return build_registry(list(self.rows))

    async def _rows_by_id(self, ids: Any) -> list[tuple[Any, ...]]:
        await asyncio.sleep(0)
        wanted = set(ids)
        return [r for r in self.rows if r[0] in wanted]


class SlowStore(MemoryStateStore):
    """Holds the state read until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.reads = 0

    async def all_states_packed(self) -> Any:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        return await super().all_states_packed()


def battery_row(did: str, enrolled: bool = True) -> tuple[Any, ...]:
    return (did, "acme", "ERCOT-NORTH", "battery", "oem", None, enrolled, 13_500.0, 5_000.0,
            5_000.0, 20.0, None, None, None, None, None, None, None)  # fmt: skip


def state_at(recv_ms: int, soc: float) -> bytes:
    rec = empty_state()
    rec["recv_ms"] = recv_ms
    rec["soc_pct"] = soc
    return pack_state(rec)


async def make_cache(n: int = 5) -> tuple[DbCache, SlowStore, Tick]:
    store = SlowStore()
    services = SimpleNamespace(
        settings=SimpleNamespace(
            telemetry_interval_s=INTERVAL_S, offline_after_s=OFFLINE_S, broker_apply_timeout_s=60.0
        ),
        clock=ManualClock(NOW),
        state=store,
    )
    rows = [battery_row(f"b{i}") for i in range(n)]
    await store.registry_put({r[0]: 0 for r in rows})
    await store.put_states({r[0]: state_at(NOW - 1000, 50.0) for r in rows})
    tick = Tick()
    return DbCache(services, rows, tick), store, tick


def soc(snap: FleetSnapshot, did: str) -> float:
    return float(snap.state["soc_pct"][snap.index[did]])


async def test_stale_snapshot_is_served_at_once_and_rebuilt_once_in_the_background() -> None:
    cache, store, tick = await make_cache()
    first = await cache.snapshot()  # the only call that waits
    assert cache.builds == 1 and soc(first, "b0") == 50.0

    await store.put_states({"b0": state_at(NOW - 500, 80.0)})
    assert await cache.snapshot() is first  # younger than max_age_s: no rebuild
    assert cache.builds == 1

    tick.t += 2.5
    store.gate = asyncio.Event()
    got = [await cache.snapshot() for _ in range(5)]
    assert all(s is first for s in got)  # served the stale one, no waiting
    for _ in range(20):
        await asyncio.sleep(0)
    assert store.reads == 2  # one background rebuild for the five calls
    store.gate.set()
    await cache.wait_refreshed()
    fresh = await cache.snapshot()
    assert fresh is not first and soc(fresh, "b0") == 80.0
    assert cache.builds == 2 and cache.registry_loads == 1
    await cache.stop()


async def test_invalidate_and_force_wait_for_a_build_that_sees_the_change() -> None:
    cache, store, _ = await make_cache()
    await cache.snapshot()
    await store.put_states({"b1": state_at(NOW - 500, 90.0)})
    cache.invalidate()
    assert soc(await cache.snapshot(), "b1") == 90.0
    await store.put_states({"b1": state_at(NOW - 400, 91.0)})
    assert soc(await cache.snapshot(force=True), "b1") == 91.0
    # A build already running when invalidate() came does not count: another one runs.
    store.gate = asyncio.Event()
    running = asyncio.create_task(cache.snapshot(force=True))
    await asyncio.sleep(0.01)
    await store.put_states({"b1": state_at(NOW - 300, 92.0)})
    cache.invalidate()
    waiting = asyncio.create_task(cache.snapshot())
    store.gate.set()
    await running
    assert soc(await waiting, "b1") == 92.0


async def test_local_changes_apply_at_once_without_a_database_reload() -> None:
    cache, store, _ = await make_cache()
    await cache.snapshot()
    # Onboarding here: the rows, after its registry write.
    cache.rows.append(battery_row("new"))
    await store.registry_put({"new": 0})
    cache.apply_changes([battery_row("new")])
    snap = await cache.snapshot()
    assert "new" in snap.index and snap.freshness[snap.index["new"]] == FreshnessCode.never
    # PATCH (opt out) and offboarding.
    await store.registry_put({"b2": 0})
    cache.apply_changes(
        [dict(zip(REGISTRY_COLUMNS, battery_row("b2", enrolled=False), strict=True))]
    )
    await store.registry_put({"b3": -1})
    cache.apply_changes([], ["b3"])
    snap = await cache.snapshot()
    assert not snap.enrolled[snap.index["b2"]] and "b3" not in snap.index
    assert soc(snap, "b2") == 50.0  # the state stays with its row
    # A rebuild sees our own registry writes as applied: no reload.
    cache.rows[:] = [r for r in cache.rows if r[0] != "b3"]
    cache.rows[2] = battery_row("b2", enrolled=False)
    await store.put_states({"new": state_at(NOW - 100, 70.0)})
    snap = await cache.snapshot(force=True)
    assert cache.registry_loads == 1 and soc(snap, "new") == 70.0
    # Another process onboards (registry version moves without apply_changes): caught up
    # through the change log, that device's row read by id.
    cache.rows.append(battery_row("elsewhere"))
    await store.registry_put({"elsewhere": 0})
    snap = await cache.snapshot(force=True)
    assert cache.registry_loads == 1 and cache.registry_catchups == 1
    assert "elsewhere" in snap.index and cache.last_build_s["caught_up"] >= 1
    # The log trimmed past the cursor: the whole registry from the database.
    store.registry_log_max = 1
    cache.rows.append(battery_row("trimmed-1"))
    await store.registry_put({"trimmed-0": 0})
    await store.registry_put({"trimmed-1": 0})
    snap = await cache.snapshot(force=True)
    assert cache.registry_loads == 2 and "trimmed-1" in snap.index
    assert not snap.enrolled[snap.index["b2"]] and "b3" not in snap.index


async def test_a_change_made_during_a_rebuild_is_not_lost() -> None:
    cache, store, _ = await make_cache()
    await cache.snapshot()
    store.gate = asyncio.Event()
    await store.registry_put({"x": 0})  # another process: the rebuild reloads the registry
    build = asyncio.create_task(cache.snapshot(force=True))
    await asyncio.sleep(0.01)
    # Onboarded here while the rebuild waits on the store (its database read missed it).
    await store.registry_put({"late": 0})
    cache.apply_changes([battery_row("late")])
    assert "late" in (await asyncio.wait_for(asyncio.shield(cache.snapshot()), 1)).index
    store.gate.set()
    snap = await build
    assert "late" in snap.index and len(snap) == 6
    assert snap.state.dtype == STATE_DTYPE


async def test_offboarding_leaves_every_view_at_once_and_the_next_build_compacts() -> None:
    cache, store, _ = await make_cache(6)
    before = await cache.snapshot()
    assert sum(r["registered"] for r in summarise(before, np.zeros(len(before)))) == 6
    await store.registry_put({"b3": -1})
    cache.apply_changes([], ["b3"])
    snap = await cache.snapshot()
    row = before.index.get("b3")  # the shared index forgets it too: offboarding is at once
    assert row is None and "b3" not in snap.index
    gone = int(np.flatnonzero(snap.device_ids == "b3")[0])  # still a row, a tombstone
    assert snap.n_devices == 5 and len(snap) == 6
    assert not snap.mask()[gone] and not snap.mask(region="ERCOT-NORTH")[gone]
    assert not snap.dispatchable()[gone] and snap.freshness[gone] == FreshnessCode.offline
    assert not snap.mask_of(["b3", "b4"])[gone] and snap.mask_of(["b4"]).sum() == 1
    rows = summarise(snap, np.ones(len(snap)))
    assert [(r["region"], r["registered"], r["available_mw"]) for r in rows] == [
        ("ERCOT-NORTH", 5, 0.005)
    ]
    assert "b3" not in snap.take(snap.mask()).index and len(snap.take(snap.mask())) == 5
    # The next build compacts the tombstone away (no database reload).
    cache.rows[:] = [r for r in cache.rows if r[0] != "b3"]
    snap = await cache.snapshot(force=True)
    assert len(snap) == 5 and snap.removed is None and "b3" not in snap.index
    assert cache.registry_loads == 1 and "compact_s" in cache.last_build_s
    assert soc(snap, "b5") == 50.0


async def test_a_device_onboarded_again_after_offboarding_gets_its_new_state() -> None:
    cache, store, _ = await make_cache(4)
    await cache.snapshot()
    cache.apply_changes([], ["b1"])  # tombstoned, not compacted yet
    cache.apply_changes([battery_row("b1")])  # back, in a new row
    await store.put_states({"b1": state_at(NOW - 100, 77.0)})
    cache.invalidate()
    snap = await cache.snapshot()
    assert soc(snap, "b1") == 77.0 and snap.enrolled[snap.index["b1"]]
    assert snap.n_devices == 4


def test_cached_positions_follow_a_device_offboarded_and_onboarded_again() -> None:
    rows = [battery_row(f"b{i}") for i in range(4)]
    states = {r[0]: state_at(NOW - 1000, 10.0 * i) for i, r in enumerate(rows)}
    registry = build_registry(rows)
    st, stat = packed_chunks(states, {}, 4)
    assemble_packed(registry, st, stat, NOW, INTERVAL_S, OFFLINE_S)  # caches positions
    back = registry_with_changes(registry_with_changes(registry, [], ["b1"]), [battery_row("b1")])
    snap = assemble_packed(back, st, stat, NOW, INTERVAL_S, OFFLINE_S)
    assert snap.index["b1"] == 4 and soc(snap, "b1") == 10.0
    assert snap.removed is not None and snap.removed.tolist() == [False, True, False, False, False]
    assert not snap.online[1] and snap.freshness[1] == FreshnessCode.offline


@pytest.mark.parametrize("seed", [4, 5])
def test_the_hash_join_of_many_ids_matches_the_dict_lookup(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vpp.fleet import registry as registry_module

    monkeypatch.setattr(registry_module, "_HASH_JOIN_MIN", 0)  # every cold lookup hashes
    rows, states, statuses = random_fleet(500, seed)
    expected = normalise(reference_snapshot(rows, states, statuses))
    # Ids the registry does not hold, and ids that share a prefix with one it holds.
    states = {**states, "stranger": state_at(NOW, 1.0), f"{rows[0][0]}x": state_at(NOW, 2.0)}
    registry = build_registry(rows)
    st, stat = packed_chunks(states, statuses, seed)
    blobs = [(b"".join(d + b"\n" for d in ids), recs) for ids, recs in st]
    blob_stat = [(b"".join(d + b"\n" for d in ids), flags) for ids, flags in stat]
    for _ in range(2):  # cold, then from cached positions
        snap = assemble_packed(registry, blobs, blob_stat, NOW, INTERVAL_S, OFFLINE_S)
        assert as_reference(snap) == expected
    assert registry._hashed is not None and registry._hashed.ok
    # A tombstone keeps its hash but is no longer found (cold: a registry with no positions).
    gone = registry_with_changes(build_registry(rows), [], [rows[3][0]])
    snap = assemble_packed(gone, blobs, blob_stat, NOW, INTERVAL_S, OFFLINE_S)
    assert snap.state["recv_ms"][3] == 0 and snap.freshness[3] == FreshnessCode.offline
    assert rows[3][0] not in snap.index and not snap.online[3]


def test_id_hashes_tell_apart_ids_that_differ_anywhere() -> None:
    from vpp.fleet.registry import id_hashes

    ids = [b"a", b"b", b"ab", b"ba", b"a" * 64, b"a" * 63 + b"b", b"dev:1", b"dev:10", b"dev.1"]
    first, second = id_hashes(b"".join(d + b"\n" for d in ids))
    assert len(set(first.tolist())) == len(ids) and len(set(second.tolist())) == len(ids)
    again, _ = id_hashes(b"x\n" + b"".join(d + b"\n" for d in ids))  # same id, other offset
    assert again[1:].tolist() == first.tolist()


async def test_fresh_states_of_some_devices_leave_the_rest_and_the_snapshot_alone() -> None:
    cache, store, _ = await make_cache(5)
    snap = await cache.snapshot()
    await store.put_states({"b0": state_at(NOW - 10, 81.0), "b1": state_at(NOW - 10, 82.0)})
    await store.put_status({"b3": (False, NOW - 20)})  # its Last Will
    await store.put_states({"b4": b"torn"})  # a malformed record keeps the row's

    fresh = await cache.with_fresh_states(snap, ["b0", "b3", "b4", "unknown"])

    assert soc(fresh, "b0") == 81.0 and soc(fresh, "b1") == 50.0  # b1 not asked
    row = fresh.index["b3"]
    assert fresh.freshness[row] == FreshnessCode.offline and not fresh.online[row]
    assert soc(fresh, "b4") == 50.0 and fresh.freshness[fresh.index["b4"]] == FreshnessCode.fresh
    assert soc(snap, "b0") == 50.0 and snap.freshness[snap.index["b3"]] == FreshnessCode.fresh
    assert cache.builds == 1  # no rebuild
    await cache.stop()
