"""Fleet snapshot cache at national scale: before (row-wise build, dict join, rebuild in the
request) and after (vectorised build, packed state read with cached positions, stale-while-
revalidate, incremental onboarding), against the real PostgreSQL and Redis on this machine.

For each size it writes a synthetic fleet (``sim.synthetic.synthetic_fleet``) to a
PostgreSQL database and a Redis prefix of its own (both dropped afterwards) and prints:

- registry: database read, row-wise build (before) vs vectorised build (after);
- state: Redis read as dicts (before) vs packed chunks (after), and the join of states and
  statuses to registry rows (before: per-id generator; after: cold positions / warm positions);
- a request after an onboarding: before, invalidate + full rebuild inside the request; after,
  ``apply_changes`` + ``snapshot()``;
- ``snapshot()`` latency when the snapshot is older than ``max_age_s`` (it returns the current
  one and rebuilds in the background) and the longest event-loop stall during that rebuild;
- ``available_kw`` and ``summarise`` for reference;
- ``fleet cold start``: a new cache's first ``snapshot()`` with the stores as a running service
  leaves them (the registry image in Redis, one device onboarded and one offboarded by another
  process since), against, in the same run, the first start ever (no image: the database's
  COPY) and the code before (row-wise registry, dict reads, per-id join);
- ``offboard one device``: ``apply_changes`` + the ``snapshot()`` after it (a tombstone),
  against compacting every array as before.

    .venv/bin/python bench/fleet_snapshot.py            # 100 000 and 1 000 000 devices
    .venv/bin/python bench/fleet_snapshot.py --small    # 20 000 devices
    .venv/bin/python bench/fleet_snapshot.py --sizes 200000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import text as sql_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.synthetic import synthetic_fleet  # noqa: E402
from vpp.domain import KIND_BY_CODE, KIND_CODE, DeviceKind  # noqa: E402
from vpp.fleet import registry as R  # noqa: E402
from vpp.fleet import snapshot as F  # noqa: E402
from vpp.fleet.records import STATE_DTYPE, unpack_states  # noqa: E402
from vpp.flexibility import available_kw  # noqa: E402

PG_ADMIN_DSN = os.environ.get("VPP_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("VPP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


# --- the code as it was (for "before") -----------------------------------------------------------
def legacy_codes(values: list[Any]) -> tuple[np.ndarray, list[str]]:
    table: dict[str, int] = {}
    codes = np.fromiter(
        (table.setdefault(v if v is not None else "", len(table)) for v in values),
        dtype=np.int32,
        count=len(values),
    )
    return codes, list(table)


def legacy_build_registry(rows: list[tuple[Any, ...]]) -> R.Registry:
    cols: list[Any] = list(zip(*rows, strict=True)) if rows else [[] for _ in R.REGISTRY_COLUMNS]
    data = dict(zip(R.REGISTRY_COLUMNS, cols, strict=True))
    region_codes, regions = legacy_codes(list(data["region"]))
    vendor_codes, vendors = legacy_codes(list(data["vendor"]))
    feeder_codes, feeders = legacy_codes(list(data["feeder"]))

    def f64(name: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in data[name]], dtype=float)

    columns: dict[str, np.ndarray] = {
        "device_ids": np.array(data["id"], dtype=object),
        "tenant_ids": np.array(data["tenant_id"], dtype=object),
        "region_codes": region_codes,
        "kind_codes": np.array([KIND_CODE[DeviceKind(k)] for k in data["kind"]], dtype=np.int8),
        "vendor_codes": vendor_codes,
        "feeder_codes": feeder_codes,
        "enrolled": np.array(data["enrolled"], dtype=bool),
    }
    for name in R.REGISTRY_COLUMNS[7:]:
        columns[name] = f64(name)
    return R.Registry(
        columns, regions, vendors, feeders, {d: i for i, d in enumerate(columns["device_ids"])}
    )


def legacy_assemble(
    registry: R.Registry, states: dict[str, bytes], statuses: dict[str, tuple[bool, int]], now: int
) -> F.FleetSnapshot:
    ids = registry.columns["device_ids"]
    state = unpack_states(states.get(d) for d in ids) if len(ids) else np.zeros(0, STATE_DTYPE)
    online = np.fromiter((statuses.get(d, (True, 0))[0] for d in ids), dtype=bool, count=len(ids))
    freshness = F.compute_freshness(state["recv_ms"], online, now, 300.0, 900.0)
    return R._make_snapshot(registry, state, online, freshness, now)


# --- setup ---------------------------------------------------------------------------------------
def device_rows(n: int, now_ms: int) -> tuple[list[tuple[Any, ...]], F.FleetSnapshot]:
    snap = synthetic_fleet(n, now_ms=now_ms, seed=7)
    kinds = [KIND_BY_CODE[int(k)].value for k in snap.kind_codes]
    regions = np.array(snap.regions, dtype=object)[snap.region_codes]
    vendors = np.array(snap.vendors, dtype=object)[snap.vendor_codes]

    def opt(a: np.ndarray) -> list[float | None]:
        return [None if np.isnan(v) else float(v) for v in a]

    cols = {
        "id": snap.device_ids.tolist(),
        "tenant_id": ["tenant-1"] * n,
        "kind": kinds,
        "site_id": snap.device_ids.tolist(),
        "region": regions.tolist(),
        "feeder": [None] * n,
        "vendor": vendors.tolist(),
        "lat": snap.lat.tolist(),
        "lon": snap.lon.tolist(),
        "enrolled": snap.enrolled.tolist(),
        "offboarded_ms": [None] * n,
        "created_ms": [now_ms] * n,
        "updated_ms": [now_ms] * n,
        "capacity_wh": opt(snap.capacity_wh),
        "max_discharge_w": opt(snap.max_discharge_w),
        "max_charge_w": opt(snap.max_charge_w),
        "backup_reserve_pct": opt(snap.backup_reserve_pct),
        "rated_w": opt(snap.rated_w),
        "hvac_rated_w": opt(snap.hvac_rated_w),
        "comfort_max_c": opt(snap.comfort_max_c),
        "comfort_min_c": opt(snap.comfort_min_c),
        "max_offset_c": opt(snap.max_offset_c),
    }
    names = list(cols)
    return [tuple(r) for r in zip(*(cols[c] for c in names), strict=True)], snap


DEVICE_COLUMNS = [
    "id",
    "tenant_id",
    "kind",
    "site_id",
    "region",
    "feeder",
    "vendor",
    "lat",
    "lon",
    "enrolled",
    "offboarded_ms",
    "created_ms",
    "updated_ms",
    "capacity_wh",
    "max_discharge_w",
    "max_charge_w",
    "backup_reserve_pct",
    "rated_w",
    "hvac_rated_w",
    "comfort_max_c",
    "comfort_min_c",
    "max_offset_c",
]


async def write_fleet(services: Any, n: int, now_ms: int) -> F.FleetSnapshot:
    from store.models import Tenant

    rows, snap = device_rows(n, now_ms)
    async with services.db.session() as session, session.begin():
        session.add(Tenant(id="tenant-1", name="bench", created_ms=now_ms))
    async with services.db.session() as session, session.begin():
        conn = await session.connection()
        raw = await conn.get_raw_connection()
        await raw.driver_connection.copy_records_to_table(
            "devices", records=rows, columns=DEVICE_COLUMNS
        )
    ids = snap.device_ids.tolist()
    recs = snap.state
    step = 50_000
    for lo in range(0, n, step):
        await services.state.put_states(
            {ids[i]: recs[i : i + 1].tobytes() for i in range(lo, min(lo + step, n))}
        )
        await services.state.put_status(
            {ids[i]: (bool(snap.online[i]), now_ms) for i in range(lo, min(lo + step, n))}
        )
    return snap


def _parts(timings: dict[str, float]) -> str:
    return ", ".join(
        f"{k} {v}" if isinstance(v, int) else f"{k} {v:.2f}" for k, v in timings.items()
    )


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


async def atimed(coro: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = await coro
    return out, time.perf_counter() - t


async def loop_stall_during(coro: Any) -> tuple[Any, float]:
    """Run ``coro`` while a ticker sleeps 1 ms at a time; the longest gap it saw (s)."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    task = asyncio.create_task(ticker())
    try:
        out = await coro
    finally:
        done = True
        await task
    return out, worst


def new_battery_row(device_id: str) -> dict[str, Any]:
    return {
        "id": device_id,
        "tenant_id": "tenant-1",
        "region": "ERCOT-NORTH",
        "kind": "battery",
        "vendor": "acme",
        "feeder": None,
        "enrolled": True,
        "capacity_wh": 13_500.0,
        "max_discharge_w": 5_000.0,
        "max_charge_w": 5_000.0,
        "backup_reserve_pct": 20.0,
        "rated_w": None,
        "hvac_rated_w": None,
        "comfort_max_c": None,
        "comfort_min_c": None,
        "max_offset_c": None,
        "lat": None,
        "lon": None,
    }


async def bench_size(n: int) -> None:
    from dispatch.services import Services
    from store.migrate import upgrade
    from vpp.clock import ManualClock
    from vpp.settings import Settings

    now_ms = 1_784_061_000_000
    tag = uuid.uuid4().hex[:8]
    db = f"vpp_bench_fleet_{tag}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    url = f"{base}/{db}"
    services: Any = None
    try:
        await asyncio.to_thread(upgrade, url)
        settings = Settings(
            database_url=url,
            redis_url=REDIS_URL,
            mqtt_url="memory://",
            state_prefix=f"vpp_bench_fleet_{tag}",
            broker_credentials="none",
        )
        services = await Services.create(settings, clock=ManualClock(now_ms))
        print(f"\n== {n:,} devices ==")
        _, t_write = await atimed(write_fleet(services, n, now_ms))
        print(f"  (setup: fleet written to PostgreSQL + Redis in {t_write:.1f} s)")
        cache = services.fleet

        # Registry: database read, then the build.
        from sqlalchemy import select

        from store.models import Device

        cols = [getattr(Device, c) for c in R.REGISTRY_COLUMNS]
        q = select(*cols).where(Device.offboarded_ms.is_(None)).order_by(Device.id)

        async def read_rows(plain: bool) -> list[Any]:
            async with services.db.session() as session:
                result = await session.execute(q)
                return list(result.all()) if plain else [tuple(r) for r in result.all()]

        legacy_rows, t_db_before = await atimed(read_rows(False))
        reg_before, t_reg_before = timed(legacy_build_registry, legacy_rows)
        rows, t_db_rows = await atimed(read_rows(True))
        _, t_reg_rows = timed(R.build_registry, rows)
        reg_after, t_load_after = await atimed(cache._load_registry())
        # Same devices, same values (rows in the table's order now, so aligned by id; coded
        # columns compared by label).
        order = np.fromiter(
            (reg_after.index[d] for d in reg_before.columns["device_ids"]), np.intp, n
        )
        tables = {"region_codes": "regions", "vendor_codes": "vendors", "feeder_codes": "feeders"}
        for name, col in reg_before.columns.items():
            other = reg_after.columns[name][order]
            if name in tables:
                col = np.array(getattr(reg_before, tables[name]), dtype=object)[col]
                other = np.array(getattr(reg_after, tables[name]), dtype=object)[other]
            same = (col == other) | (col != col) & (other != other)
            assert same.all(), name
        before = t_db_before + t_reg_before
        print(
            f"  registry  before: db read {t_db_before:.2f} s + row-wise build "
            f"{t_reg_before:.2f} s = {before:.2f} s"
        )
        print(
            f"            after: COPY + Arrow CSV parse + vectorised build {t_load_after:.2f} s "
            f"(×{before / max(t_load_after, 1e-9):.1f}); rows path (SQLite): db read "
            f"{t_db_rows:.2f} s + build {t_reg_rows:.2f} s"
        )

        # State: the Redis read and the join to registry rows.
        store = services.state
        (states, statuses), t_read_before = await atimed(
            asyncio.gather(store.all_states(), store.all_status())
        )
        (pstates, pstatus), t_read_after = await atimed(
            asyncio.gather(store.all_states_packed(), store.all_status_packed())
        )
        snap_before, t_asm_before = timed(legacy_assemble, reg_after, states, statuses, now_ms)
        args = (pstates, pstatus, now_ms, 300.0, 900.0)
        snap_cold, t_asm_cold = timed(R.assemble_packed, reg_after, *args)
        (pstates, pstatus), _ = await atimed(
            asyncio.gather(store.all_states_packed(), store.all_status_packed())
        )
        args = (pstates, pstatus, now_ms, 300.0, 900.0)
        snap_warm, t_asm_warm = timed(R.assemble_packed, reg_after, *args)
        assert snap_before.state.tobytes() == snap_warm.state.tobytes()
        assert (snap_before.online == snap_cold.online).all()
        print(
            f"  state     redis read (states+statuses) dicts {t_read_before:.2f} s → "
            f"packed {t_read_after:.2f} s"
        )
        print(
            f"            assemble {t_asm_before:.2f} s → {t_asm_cold:.2f} s cold, "
            f"{t_asm_warm:.3f} s warm (×{t_asm_before / max(t_asm_warm, 1e-9):.0f})"
        )

        # Cold start: a new cache's first snapshot() with the stores as a running service
        # leaves them: the registry image its cache wrote after its whole read, and changes
        # made by another process since (one device onboarded, one offboarded), caught up
        # through the change log. Peers in the same run: the first start ever (no image:
        # COPY + Arrow parse + a cold join) and the code before (row-wise registry, dict reads,
        # per-id join), measured above.
        before_cold = t_db_before + t_reg_before + t_read_before + t_asm_before
        from store.fleet_cache import IMAGE_KEY, FleetCache

        await store.redis.delete(store._k(IMAGE_KEY))
        first = FleetCache(services.db, store, services.settings, services.clock)
        first_snap, t_first_ever = await atimed(first.snapshot())
        assert first.registry_loads == 1
        first_parts = _parts(first.last_build_s)
        await first.wait_image()
        image = first.last_image
        await first.stop()
        # Another process: one device onboarded (row, registry write), one offboarded.
        added, gone_elsewhere = "zz-elsewhere-0", str(first_snap.device_ids[3])
        async with services.db.session() as session, session.begin():
            conn = await session.connection()
            raw = await conn.get_raw_connection()
            row = {**new_battery_row(added), "site_id": added, "created_ms": now_ms}
            row["updated_ms"], row["offboarded_ms"] = now_ms, None
            await raw.driver_connection.copy_records_to_table(
                "devices", records=[tuple(row[c] for c in DEVICE_COLUMNS)], columns=DEVICE_COLUMNS
            )
        await store.registry_put({added: 0})
        async with services.db.session() as session, session.begin():
            await session.execute(
                sql_text("UPDATE devices SET offboarded_ms = :t WHERE id = :d"),
                {"t": now_ms, "d": gone_elsewhere},
            )
        await store.registry_put({gone_elsewhere: -1})
        await store.delete_devices([gone_elsewhere])
        await store.put_states({added: snap_before.state[:1].tobytes()})
        cold = FleetCache(services.db, store, services.settings, services.clock)
        cold.write_image = False
        cold_snap, t_cold = await atimed(cold.snapshot())
        assert cold.image_loads == 1 and cold.registry_loads == 0
        # The same fleet as the whole read, less the one offboarded, plus the one onboarded.
        # (The offboarded row is a tombstone until the next build compacts it.)
        keep = first_snap.device_ids != gone_elsewhere
        live = cold_snap.live()
        assert cold_snap.n_devices == n and gone_elsewhere not in cold_snap.index
        assert (cold_snap.device_ids[live][:-1] == first_snap.device_ids[keep]).all()
        assert cold_snap.device_ids[-1] == added and added in cold_snap.index
        assert cold_snap.state[live][:-1].tobytes() == first_snap.state[keep].tobytes()
        assert (cold_snap.online[live][:-1] == first_snap.online[keep]).all()
        parts = _parts(cold.last_build_s)
        print(f"fleet cold start: {n} devices in {t_cold:.2f} s")
        print(
            f"  (registry image and catch-up of {int(cold.last_build_s.get('caught_up', 0))} "
            f"changes; parts, from the start, overlapping: {parts})"
        )
        print(
            f"  image: {image.get('bytes', 0) / 1e6:.1f} MB "
            f"({image.get('bytes', 0) / max(n, 1):.0f} bytes/device), encoded and written in "
            f"{image.get('s', 0):.2f} s by the cache that read the database"
        )
        print(
            f"  first start ever (no image: COPY + Arrow parse + cold join) {t_first_ever:.2f} s "
            f"(×{t_first_ever / max(t_cold, 1e-9):.1f}; {first_parts})"
        )
        print(
            f"  before (row-wise registry, dict reads, per-id join): {before_cold:.2f} s "
            f"(×{before_cold / max(t_cold, 1e-9):.1f})"
        )
        await cold.stop()
        _, t_first = await atimed(cache.snapshot())
        print(f"  cache     first snapshot() (waits, from the image): {t_first:.2f} s")
        await cache.snapshot(force=True)  # the next build compacts the tombstone away
        # Offboarding one device: the tombstone and the request after it, against compacting
        # the arrays as before (the same registry and snapshot, in the same run).
        snap = await cache.snapshot()
        gone = str(snap.device_ids[1])
        reg_now, snap_now = cache._registry, cache._snapshot
        assert reg_now is not None and snap_now is not None
        t = time.perf_counter()
        mask = np.zeros(len(reg_now), dtype=bool)
        mask[reg_now.index[gone]] = True
        shadow = R.Registry(  # the registry with the device marked, nothing shared mutated
            reg_now.columns, reg_now.regions, reg_now.vendors, reg_now.feeders, {}, mask
        )
        compacted, source = R.compact_registry(shadow)
        R.snapshot_with_changes(snap_now, compacted, source)
        t_compact = time.perf_counter() - t
        await store.registry_put({gone: -1})
        t = time.perf_counter()
        cache.apply_changes([], [gone])
        after = await cache.snapshot()
        t_off = time.perf_counter() - t
        assert gone not in after.index and after.n_devices == len(compacted)
        print(f"offboard one device in a {snap_now.n_devices}-device fleet: {t_off * 1000:.1f} ms")
        print(
            f"  (before, compacting every array: {t_compact * 1000:.0f} ms, "
            f"×{t_compact / max(t_off, 1e-9):.0f}; the next build compacts in a worker thread)"
        )

        c = time.process_time()
        _, t_forced = await atimed(cache.snapshot(force=True))
        cpu_forced = time.process_time() - c
        print(f"            snapshot(force=True), registry known: {t_forced:.2f} s")
        # The closed loop's read each control step: an event's own devices (a tenth of the
        # fleet) fresh over the cache's snapshot, against the forced rebuild it used to take.
        base = await cache.snapshot()
        event_ids = base.device_ids[::10][: max(1, base.n_devices // 10)]
        c = time.process_time()
        fresh, t_loop = await atimed(cache.with_fresh_states(base, event_ids))
        cpu_loop = time.process_time() - c
        assert len(fresh) == len(base)
        print(
            f"closed-loop read of {len(event_ids)} event devices in a {base.n_devices}-device "
            f"fleet: {t_loop:.2f} s (a forced rebuild: {t_forced:.2f} s, "
            f"×{t_forced / max(t_loop, 1e-9):.1f}); this process's CPU {cpu_loop:.2f} s against "
            f"{cpu_forced:.2f} s (the rest of the read is Redis's)"
        )

        # A request right after an onboarding.
        async def before_onboarding() -> None:
            reg = legacy_build_registry(await read_rows(False))
            st, stat = await asyncio.gather(store.all_states(), store.all_status())
            available_kw(legacy_assemble(reg, st, stat, now_ms))

        _, t_req_before = await atimed(before_onboarding())
        for k, batch in enumerate((1, 1000)):
            new = [new_battery_row(f"zz-new-{k}-{i}") for i in range(batch)]
            await store.registry_put({r["id"]: 0 for r in new})  # onboarding's registry write
            t = time.perf_counter()
            cache.apply_changes(new)
            snap = await cache.snapshot()
            t_apply = time.perf_counter() - t
            assert new[-1]["id"] in snap.index
            print(
                f"  onboarding {batch} device(s): request after it {t_req_before:.2f} s "
                f"(reload + rebuild) → {t_apply * 1000:.1f} ms (apply_changes + snapshot())"
            )
        patched = {**new_battery_row("zz-new-0-0"), "enrolled": False}
        await store.registry_put({"zz-new-0-0": 0})
        _, t_patch = timed(cache.apply_changes, [patched])
        print(f"  PATCH apply {t_patch * 1000:.1f} ms")
        # Stale-while-revalidate: the call returns at once, the rebuild runs behind it.
        loads = cache.registry_loads
        cache.max_age_s = 0.0
        before_snap = cache._snapshot
        got, t_swr = await atimed(cache.snapshot())
        assert got is before_snap
        _, stall = await loop_stall_during(cache.wait_refreshed())
        print(
            f"  stale snapshot(): {t_swr * 1e6:.0f} µs (returns the current one); background "
            f"rebuild {cache.last_build_s.get('total_s', 0):.2f} s, longest event-loop stall "
            f"{stall * 1000:.0f} ms (registry reloads: {cache.registry_loads - loads})"
        )
        cache.max_age_s = 2.0
        snap = await cache.snapshot()
        kw, t_kw = timed(available_kw, snap)
        _, t_sum = timed(F.summarise, snap, kw)
        print(f"  available_kw {t_kw:.2f} s, summarise {t_sum:.2f} s")
    finally:
        if services is not None:
            await services.state.flush_prefix()  # type: ignore[attr-defined]
            await services.close()
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="20 000 devices only")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    a = ap.parse_args()
    sizes = a.sizes or ([20_000] if a.small else [100_000, 1_000_000])
    for n in sizes:
        asyncio.run(bench_size(n))


if __name__ == "__main__":
    main()
