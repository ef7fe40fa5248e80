"""A new process's fleet cache starts from the registry image the running ones keep in the
state store (``store.fleet_cache``), against the real PostgreSQL and Redis: it catches up what
other processes onboarded, patched and offboarded after the image through the change log, and
reads the whole registry from the database when the log was trimmed past the image or the
image is damaged, never serving a wrong fleet or failing. Plus the image format itself."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from devices.onboarding import BatterySpec, offboard, onboard, update_device
from store.fleet_cache import IMAGE_KEY, FleetCache
from store.keys import create_api_key
from store.state.redis import RedisStateStore
from tests.helpers.devices import battery as battery_body
from tests.helpers.settings import make_settings
from vpp.domain import KIND_CODE, DeviceKind
from vpp.fleet import image
from vpp.fleet.records import empty_state, pack_state
from vpp.fleet.registry import (
    REGISTRY_COLUMNS,
    assemble_packed,
    build_registry,
    export_positions,
    seed_positions,
)
from vpp.fleet.snapshot import FleetSnapshot

TENANT = "tenant-image"
NOW = 1_784_061_000_000


def by_id(snap: FleetSnapshot) -> dict[str, Any]:
    """Every registered device's registry values, state record and online flag."""
    out = {}
    for did, i in snap.index.items():
        values = [
            snap.tenant_ids[i],
            snap.regions[snap.region_codes[i]],
            int(snap.kind_codes[i]),
            snap.vendors[snap.vendor_codes[i]],
            snap.feeders[snap.feeder_codes[i]],
            bool(snap.enrolled[i]),
            *(float(getattr(snap, c)[i]) for c in REGISTRY_COLUMNS[7:]),
        ]
        out[did] = (
            [None if isinstance(v, float) and np.isnan(v) else v for v in values],
            snap.state[i].tobytes(),
            bool(snap.online[i]),
        )
    assert len(out) == snap.n_devices
    return out


async def reference(svc: Any) -> dict[str, Any]:
    """The fleet as a cache reading everything from the database sees it."""
    cache = FleetCache(svc.db, svc.state, svc.settings, svc.clock)
    cache.write_image = False
    cache._read_image = _no_image  # type: ignore[method-assign]
    snap = await cache.snapshot()
    assert cache.registry_loads == 1
    return by_id(snap)


async def _no_image() -> None:
    return None


def new_cache(svc: Any) -> FleetCache:
    return FleetCache(svc.db, svc.state, svc.settings, svc.clock)


@pytest.fixture()
async def fleet(services_factory: Any, fresh_pg_url: str, redis_url: str) -> Any:
    """Two services (two processes) on one database and one Redis prefix, 40 batteries
    onboarded with state and status, and the image written by the first one's cache."""
    settings = make_settings(fresh_pg_url, redis_url=redis_url)
    a = await services_factory(settings)
    b = await services_factory(settings)
    await create_api_key(a.db, TENANT, "fleet", NOW)
    ids = [f"img-{i:03d}" for i in range(40)]
    await onboard(a, [BatterySpec(**battery_body(d)) for d in ids], tenant_id=TENANT)
    rec = empty_state()
    rec["recv_ms"] = NOW
    rec["kind"] = KIND_CODE[DeviceKind.battery]
    states = {}
    for i, d in enumerate(ids):
        rec["soc_pct"] = float(i)
        states[d] = pack_state(rec)
    await a.state.put_states(states)
    await a.state.put_status({d: (i % 3 != 0, NOW) for i, d in enumerate(ids)})
    first = new_cache(a)
    await first.snapshot()
    await first.wait_image()
    assert first.registry_loads == 1 and first.images_written == 1
    assert await a.state.get_blob(IMAGE_KEY) is not None
    return a, b, ids


async def test_a_new_cache_starts_from_the_image_and_catches_up_other_processes(
    fleet: Any,
) -> None:
    a, b, ids = fleet
    cold = new_cache(a)
    snap = await cold.snapshot()
    assert cold.image_loads == 1 and cold.registry_loads == 0
    assert cold.last_build_s["seeded_chunks"] > 0  # the image's joins were used
    assert by_id(snap) == await reference(a)

    # Another process onboards one, opts one out and offboards one after the image.
    await onboard(b, [BatterySpec(**battery_body("img-new"))], tenant_id=TENANT)
    await update_device(b, ids[5], None, {"enrolled": False})
    await offboard(b, ids[7], None)
    await b.state.put_states({"img-new": a_state(77.0)})
    later = new_cache(a)
    snap = await later.snapshot()
    assert later.image_loads == 1 and later.registry_loads == 0
    got = by_id(snap)
    assert "img-new" in got and ids[7] not in got and got[ids[5]][0][5] is False
    assert got == await reference(a)
    # The cache that started first catches up too (through the log, no database read).
    assert by_id(await cold.snapshot(force=True)) == got
    assert cold.registry_catchups == 1 and cold.registry_loads == 0


def a_state(soc: float) -> bytes:
    rec = empty_state()
    rec["recv_ms"] = NOW
    rec["soc_pct"] = soc
    return pack_state(rec)


async def test_a_log_trimmed_past_the_image_reads_the_whole_registry(fleet: Any) -> None:
    a, b, ids = fleet
    assert isinstance(b.state, RedisStateStore)
    b.state.registry_log_max = 1  # every write trims the log to its last entry
    await offboard(b, ids[1], None)
    await onboard(b, [BatterySpec(**battery_body("img-after-trim"))], tenant_id=TENANT)
    cold = new_cache(a)
    got = by_id(await cold.snapshot())
    assert cold.registry_loads == 1 and cold.image_loads == 0
    assert "img-after-trim" in got and ids[1] not in got
    assert got == await reference(a)


@pytest.mark.parametrize("damage", ["garbage", "flipped", "chunk lost", "short"])
async def test_a_damaged_image_reads_the_whole_registry_not_a_crash(
    fleet: Any, damage: str
) -> None:
    a, _, _ = fleet
    store = a.state
    assert isinstance(store, RedisStateStore)
    data = await store.get_blob(IMAGE_KEY)
    assert data is not None
    if damage == "garbage":
        await store.put_blob(IMAGE_KEY, b"not an image at all")
    elif damage == "flipped":
        broken = bytearray(data)
        broken[len(broken) // 2] ^= 0xFF
        await store.put_blob(IMAGE_KEY, bytes(broken))
    elif damage == "short":
        await store.put_blob(IMAGE_KEY, data[:-10])
    else:
        head = (await store.redis.get(store._k(IMAGE_KEY))).decode()
        await store.redis.delete(store._k(IMAGE_KEY, head.split(":")[0], 0))
    cold = new_cache(a)
    got = by_id(await cold.snapshot())
    assert cold.registry_loads == 1 and cold.image_loads == 0
    assert got == await reference(a)


async def test_the_embedded_stores_keep_no_image_and_start_from_the_database(
    services_factory: Any, sqlite_url: str
) -> None:
    svc = await services_factory(make_settings(sqlite_url))
    await create_api_key(svc.db, TENANT, "fleet", NOW)
    await onboard(svc, [BatterySpec(**battery_body(f"m-{i}")) for i in range(5)], tenant_id=TENANT)
    cache = new_cache(svc)
    assert len(await cache.snapshot()) == 5
    await cache.wait_image()
    assert cache.registry_loads == 1 and cache.images_written == 0
    assert await svc.state.get_blob(IMAGE_KEY) is None
    # Another writer's onboarding (the version moves): caught up through the in-process log.
    await onboard(svc, [BatterySpec(**battery_body("m-late"))], tenant_id=TENANT)
    other = new_cache(svc)
    await other.snapshot()
    await svc.state.registry_put({"m-late": 0})  # a write this cache did not make
    snap = await other.snapshot(force=True)
    assert "m-late" in snap.index and other.registry_catchups == 1


# --- the image format ---------------------------------------------------------------------------
def _rows(n: int) -> list[tuple[Any, ...]]:
    return [
        (f"dev-{i}", f"t{i % 2}", ["R1", "R2"][i % 2], ["battery", "solar", "thermostat"][i % 3],
         "" if i % 4 else "v", None, i % 5 != 0, float(i), None, 3.0, None, 1.5, None, None,
         None, None, 30.0 + i, -90.0)
        for i in range(n)
    ]  # fmt: skip


def test_an_image_gives_back_the_registry_and_its_joins() -> None:
    registry = build_registry(_rows(50))
    chunk = [(b"".join(f"dev-{i}\n".encode() for i in range(0, 50, 2)), b"\0" * 64 * 25)]
    assemble_packed(registry, chunk, [], NOW, 300.0, 900.0)  # joins one chunk
    data = image.encode(registry, {"position": "1-0", "version": 3}, export_positions(registry))
    assert data is not None
    back, meta, positions = image.decode(data)
    assert meta == {"position": "1-0", "version": 3}
    assert back.regions == registry.regions and back.index == registry.index
    for name, col in registry.columns.items():
        assert np.array_equal(col, back.columns[name], equal_nan=col.dtype.kind == "f"), name
    assert seed_positions(back, "state", [chunk[0][0]], positions["state"]) == 1
    assert back._positions[("state", 0)][1].tolist() == list(range(0, 50, 2))
    assert seed_positions(back, "state", [b"dev-1\n"], positions["state"]) == 0  # other ids
    empty = image.encode(build_registry([]), {})
    assert empty is not None and len(image.decode(empty)[0]) == 0


def test_every_damaged_byte_of_an_image_is_refused() -> None:
    data = image.encode(build_registry(_rows(20)), {"position": "1-0", "version": 1})
    assert data is not None
    for at in range(0, len(data), 7):
        broken = bytearray(data)
        broken[at] ^= 0x01
        try:
            back, _, _ = image.decode(bytes(broken))
        except ValueError:
            continue
        # A flip the checks cannot see can only be in the header's JSON whitespace-free text
        # that still parses to the same shape: it must not have changed the registry.
        assert len(back) == 20
    with pytest.raises(ValueError):
        image.decode(data[:-1])
    newline = build_registry([("a\nb", *_rows(1)[0][1:])])
    assert image.encode(newline, {}) is None
