"""How an ingest worker keeps its registry up to date, on both stores (the real Redis with a
unique prefix, and the in-process store): devices onboarded or removed by another process
arrive through the store's change log, without reading the whole registry again; the whole
registry is read only at start, when the log was trimmed past the worker, or after a lost store;
a registry read that fails is retried after a growing pause, not at every poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from devices import ingest
from devices.ingest import IngestWorker
from dispatch.services import Services
from store.state.base import StateStore
from store.state.rebuild import rebuild_if_lost
from store.state.redis import RedisStateStore
from tests.helpers.settings import REDIS_URL, make_settings
from vpp.fleet.records import unpack_states
from vpp.fleet.snapshot import BATTERY


@dataclass
class Setup:
    services: Services
    worker: IngestWorker
    elsewhere: StateStore  # another process's connection to the same store
    whole_reads: list[int]  # registry_all calls made by the worker's store


@pytest.fixture(params=["memory", "redis"])
async def setup(
    request: pytest.FixtureRequest,
    services_factory: Any,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Setup]:
    monkeypatch.setattr(ingest, "REGISTRY_POLL_S", 0.0)  # every flush checks the registry
    url = "memory://" if request.param == "memory" else REDIS_URL
    services = await services_factory(make_settings(sqlite_url, redis_url=url))
    state = services.state
    await rebuild_if_lost(services.db, state)  # a built store (an empty registry)
    await state.registry_put({"bat-1": BATTERY})
    elsewhere = (
        RedisStateStore(REDIS_URL, services.settings.state_prefix)
        if isinstance(state, RedisStateStore)
        else state  # the in-process store is one
    )
    whole_reads: list[int] = []
    real_all = state.registry_all

    async def counted_all() -> dict[str, int]:
        whole_reads.append(1)
        return await real_all()

    monkeypatch.setattr(state, "registry_all", counted_all)
    worker = IngestWorker(services, write_history=False)
    await worker.flush()  # loads the registry
    assert len(whole_reads) == 1 and worker.registry_full_loads == 1
    yield Setup(services, worker, elsewhere, whole_reads)
    if elsewhere is not state:
        await elsewhere.close()


async def send(s: Setup, device_id: str, ts: int) -> None:
    """One telemetry message from ``device_id``, taken by the worker (a few flushes: a message
    from a device it does not know waits for one registry refresh before it is rejected)."""
    body = orjson.dumps({"ts": ts, "soc_pct": 50.0, "power_w": 1000.0})
    s.worker._on_message(s.services.topic(device_id, "telemetry"), body)
    deadline = time.monotonic() + 5
    while True:
        await s.worker.flush()
        if not s.worker.pending or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.01)


async def stored_ts(s: Setup, device_id: str) -> int:
    return int(unpack_states(await s.services.state.get_states([device_id]))["ts_ms"][0])


async def test_devices_onboarded_and_removed_elsewhere_arrive_through_the_change_log(
    setup: Setup,
) -> None:
    s, now = setup, setup.services.clock.now_ms()
    await s.elsewhere.registry_put({"late-1": BATTERY})  # onboarded by another process
    await send(s, "late-1", now)
    assert await stored_ts(s, "late-1") == now
    await s.elsewhere.registry_remove(["late-1"])
    await send(s, "late-1", now + 1000)
    assert s.worker.rejected["unknown_device"] == 1
    assert await stored_ts(s, "late-1") == now
    # Both seen without reading the whole registry again.
    assert len(s.whole_reads) == 1 and s.worker.registry_full_loads == 1
    assert s.worker.registry_change_reads == 2


async def test_a_log_trimmed_past_the_worker_falls_back_to_a_whole_read(setup: Setup) -> None:
    s, now = setup, setup.services.clock.now_ms()
    s.elsewhere.registry_log_max = 2  # type: ignore[attr-defined]
    for i in range(5):
        await s.elsewhere.registry_put({f"new-{i}": BATTERY})
    for i in range(5):
        await send(s, f"new-{i}", now)
        assert await stored_ts(s, f"new-{i}") == now
    assert s.worker.registry_full_loads == 2 and len(s.whole_reads) == 2
    assert s.worker.rejected["unknown_device"] == 0


async def test_a_lost_store_is_rebuilt_and_read_whole(setup: Setup) -> None:
    s, now = setup, setup.services.clock.now_ms()
    await s.services.state.flush_prefix()  # type: ignore[attr-defined]
    assert await rebuild_if_lost(s.services.db, s.services.state)  # bat-1 is not in the database
    await s.elsewhere.registry_put({"after-1": BATTERY})
    await send(s, "after-1", now)
    assert await stored_ts(s, "after-1") == now
    assert s.worker.registry_full_loads == 2


async def test_a_failing_registry_read_is_retried_after_a_growing_pause(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = setup
    monkeypatch.setattr(ingest, "REGISTRY_POLL_S", 0.05)
    monkeypatch.setattr(ingest, "REGISTRY_RETRY_MAX_S", 0.4)
    state = s.services.state
    real_generation = state.generation
    calls = 0
    failing = True

    async def generation() -> str | None:
        nonlocal calls
        calls += 1
        if failing:
            raise ConnectionError("store too busy")
        return await real_generation()

    monkeypatch.setattr(state, "generation", generation)
    await s.elsewhere.registry_put({"late-1": BATTERY})
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        await s.worker.flush()
        await asyncio.sleep(0.01)
    # Every 50 ms poll would be ~24 tries; pauses of 50, 100, 200, 400, 400 ms leave 5-6.
    assert 3 <= calls <= 7
    failing = False  # the next try, at most 400 ms on, succeeds
    now = s.services.clock.now_ms()
    await send(s, "late-1", now)
    assert await stored_ts(s, "late-1") == now
    assert s.worker.registry_full_loads == 1  # caught up through the log
