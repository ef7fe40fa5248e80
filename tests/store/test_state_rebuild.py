"""A lost state store is detected (no generation) and its registry rebuilt from the database,
on both stores: once when several processes see the loss together, without overwriting what
was written since the loss, and not at all over a store lost again while the rebuild ran."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from store.state import make_state_store
from store.state.rebuild import load_ingest_registry, rebuild_if_lost
from tests.helpers.devices import battery, solar, thermostat
from tests.helpers.settings import REDIS_URL, make_settings
from vpp.domain import KIND_CODE, KIND_OFFBOARDED, DeviceKind


@pytest.fixture(params=["memory", "redis"])
def store_url(request) -> str:  # type: ignore[no-untyped-def]
    return "memory://" if request.param == "memory" else REDIS_URL


async def _onboarded(api_factory, db_url: str, store_url: str):  # type: ignore[no-untyped-def]
    """A service (SQLite or PostgreSQL, each store) with three devices onboarded through the API
    and one of them offboarded."""
    client, make_key = await api_factory(make_settings(db_url, redis_url=store_url))
    key = await make_key("fleetco", "fleet")
    body = [battery("bat-1"), solar("pv-1"), thermostat("th-1")]
    assert (await client.post("/v1/devices/bulk", json=body, headers=key)).status_code == 201
    assert (await client.delete("/v1/devices/th-1", headers=key)).status_code == 204
    return client.services


EXPECTED = {
    "bat-1": KIND_CODE[DeviceKind.battery],
    "pv-1": KIND_CODE[DeviceKind.solar],
    "th-1": KIND_OFFBOARDED,
}


async def test_a_lost_store_gets_its_registry_back_from_the_database(
    api_factory, db_url: str, store_url: str
) -> None:  # type: ignore[no-untyped-def]
    services = await _onboarded(api_factory, db_url, store_url)
    state = services.state
    assert await state.registry_all() == EXPECTED
    version_before = await state.registry_version()

    await state.flush_prefix()  # lost: restarted empty
    assert await state.generation() is None
    assert await state.registry_all() == {}
    # Written after the loss, before the rebuild: newer than what the database read will say.
    await state.registry_put({"new-1": KIND_CODE[DeviceKind.battery], "bat-1": KIND_OFFBOARDED})

    assert await rebuild_if_lost(services.db, state) is True
    assert await state.registry_all() == {**EXPECTED, "new-1": 0, "bat-1": KIND_OFFBOARDED}
    generation = await state.generation()
    assert generation is not None
    assert await state.registry_version() not in (0, 1, version_before)
    # Not lost any more: nothing to do, nothing changed.
    assert await rebuild_if_lost(services.db, state) is False
    assert await state.generation() == generation


async def test_processes_seeing_the_loss_together_rebuild_it_once(
    api_factory, db_url: str, store_url: str
) -> None:  # type: ignore[no-untyped-def]
    services = await _onboarded(api_factory, db_url, store_url)
    prefix = services.settings.state_prefix
    # Five processes: their own connections to the same store (the in-process store is one).
    stores = [
        services.state if store_url == "memory://" else make_state_store(store_url, prefix)
        for _ in range(5)
    ]
    try:
        await services.state.flush_prefix()
        slow_loads = 0

        async def slow_load() -> Mapping[str, int]:
            nonlocal slow_loads
            slow_loads += 1
            await asyncio.sleep(0.2)  # the others arrive while this one holds the lock
            return await load_ingest_registry(services.db)

        done = await asyncio.gather(*(s.rebuild(slow_load) for s in stores))
        assert sorted(done) == [False] * 4 + [True]
        assert slow_loads == 1
        assert await services.state.registry_all() == EXPECTED
        generations = {await s.generation() for s in stores}
        assert len(generations) == 1 and None not in generations
    finally:
        for s in stores:
            if s is not services.state:
                await s.close()


async def test_a_store_lost_again_during_the_rebuild_stays_lost(
    api_factory, db_url: str, store_url: str
) -> None:  # type: ignore[no-untyped-def]
    services = await _onboarded(api_factory, db_url, store_url)
    state = services.state
    await state.flush_prefix()

    async def load_then_lose_again() -> Mapping[str, int]:
        rows = await load_ingest_registry(services.db)
        await state.flush_prefix()  # Redis restarted once more while we read the database
        return rows

    assert await state.rebuild(load_then_lose_again) is False
    assert await state.generation() is None  # no generation over a half-built registry
    assert await rebuild_if_lost(services.db, state) is True
    assert await state.registry_all() == EXPECTED


async def test_a_rebuild_that_outlasts_the_lock_ttl_still_finishes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A million devices on a loaded machine take longer than one lock TTL to fill: each fill
    call renews the lock, so the rebuild finishes instead of starting over for ever."""
    import uuid

    from store.state import redis as redis_store

    monkeypatch.setattr(redis_store, "REBUILD_LOCK_TTL_S", 0.4)
    monkeypatch.setattr(redis_store, "_REBUILD_CHUNK", 10)
    state = make_state_store(REDIS_URL, prefix=f"test-rebuild-ttl-{uuid.uuid4().hex[:8]}")
    assert isinstance(state, redis_store.RedisStateStore)
    registry = {f"dev-{i}": KIND_CODE[DeviceKind.battery] for i in range(100)}
    fill = state._rebuild_fill

    async def slow_fill(**kw):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.1)  # ten calls: a second, over twice the TTL
        return await fill(**kw)

    state._rebuild_fill = slow_fill  # type: ignore[method-assign]

    async def load() -> Mapping[str, int]:
        return registry

    try:
        assert await state.rebuild(load) is True
        assert await state.generation() is not None
        assert await state.registry_all() == registry
    finally:
        await state.flush_prefix()
        await state.close()
