"""Helpers shared by the event-runner tests: a sped-up clock set on a summer afternoon, and a
running stack (service components + simulated fleet) around one Services object."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np

from vpp.clock import Clock

# A hot afternoon in north Texas (local 14:00 CDT): air conditioners run, batteries are full.
SUMMER_START = datetime(2027, 7, 15, 19, 0, tzinfo=UTC)


def summer_origin_ms(time_scale: float, at: datetime = SUMMER_START) -> int:
    """The VPP_TIME_ORIGIN that makes service time read ``at`` right now with ``time_scale``
    (service = origin + (wall − origin) × scale, so origin = (at − scale·wall) / (1 − scale))."""
    wall = time.time() * 1000.0
    target = at.timestamp() * 1000.0
    if time_scale == 1.0:
        raise ValueError("time_scale must differ from 1 to move the clock")
    return int((target - time_scale * wall) / (1.0 - time_scale))


def summer_clock(time_scale: float, at: datetime = SUMMER_START) -> Clock:
    return Clock(time_scale, summer_origin_ms(time_scale, at))


async def wait_for(pred: Any, timeout_s: float, step_s: float = 0.1) -> bool:
    """Poll ``pred`` (sync or async) until true or ``timeout_s`` wall seconds pass."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return True
        await asyncio.sleep(step_s)
    return False


@dataclass
class Stack:
    services: Any
    client: httpx.AsyncClient
    sim: Any
    ingest: Any
    runner: Any
    stop: asyncio.Event
    task: asyncio.Task[None]
    fleet_key: str

    async def operator(self) -> dict[str, str]:
        from store.keys import create_api_key

        key = await create_api_key(
            self.services.db, "gridco", "operator", self.services.clock.now_ms()
        )
        return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def running_stack(
    services: Any,
    n_devices: int,
    *,
    region: str = "ERCOT-NORTH",
    seed: int = 7,
    fleet_options: dict[str, Any] | None = None,
    faults: Any = None,
    with_runner: bool = True,
) -> AsyncIterator[Stack]:
    """API (ASGI), ingest, event runner and a simulated fleet onboarded through the API."""
    from api.app import create_app
    from devices.ingest import IngestWorker
    from dispatch.runner import EventRunner
    from sim.simulator import FleetSimulator
    from store.keys import create_api_key

    app = create_app(services=services)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120
    )
    key = await create_api_key(services.db, "fleetco", "fleet", services.clock.now_ms())
    sim = FleetSimulator(
        services.settings,
        n_devices,
        [region],
        clock=services.clock,
        http_client=client,
        api_key=key,
        mqtt_client_factory=services.mqtt_client,
        seed=seed,
        id_prefix=f"ev{seed}",
        tick_s=15,
        fleet_options=fleet_options,
        faults=faults,
    )
    assert await sim.onboard() == n_devices
    ingest = IngestWorker(services)
    await ingest.start()
    runner = EventRunner(services, owner=f"test-{seed}-{np.random.randint(1 << 30)}")
    if with_runner:
        await runner.start()
    stop = asyncio.Event()
    task = asyncio.create_task(sim.run(stop))
    try:
        yield Stack(services, client, sim, ingest, runner, stop, task, key)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        if with_runner:
            await runner.stop()
        await ingest.stop()
        await client.aclose()
