"""Durable acceptance of telemetry under faults, against the real servers: a reading ingest has
counted as accepted is in ``telemetry_intervals`` and stays there through a ``kill -9`` of the
process; readings that arrive while PostgreSQL is down are kept and written when it returns,
and when they are more than the bound allows, exactly the dropped ones are counted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from devices.ingest import IngestWorker
from devices.mqtt import MqttClient
from devices.onboarding import BatterySpec, onboard
from dispatch.services import Services
from store.history import FIELDS, IntervalHistory, write_partials
from store.keys import create_api_key
from store.migrate import upgrade
from store.models import TelemetryInterval
from tests.helpers.devices import battery as battery_body
from tests.helpers.servers import postgres_available, private_postgres
from tests.helpers.settings import MQTT_URL, REDIS_URL, make_settings, unique
from vpp.fleet.records import STATE_DTYPE
from vpp.settings import Settings

REPO = Path(__file__).resolve().parents[2]
TENANT = "tenant-dur"

Sent = dict[tuple[str, int], list[float]]  # (device, interval start) → power_w of each reading


async def eventually(pred: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def onboard_batteries(services: Services, ids: list[str]) -> None:
    """Devices as a fleet operator registers them: database rows and the ingest registry."""
    await create_api_key(services.db, TENANT, "fleet", services.clock.now_ms())
    specs = [BatterySpec(**battery_body(d)) for d in ids]
    await onboard(services, specs, tenant_id=TENANT)


async def stored(services: Services, ids: list[str]) -> dict[tuple[str, int], TelemetryInterval]:
    async with services.db.session() as s:
        q = select(TelemetryInterval).where(TelemetryInterval.device_id.in_(ids))
        return {(r.device_id, r.interval_start_ms): r for r in (await s.execute(q)).scalars()}


async def holds_exactly(services: Services, sent: Sent) -> bool:
    """True when every (device, interval) row has the samples sent; asserts their means."""
    rows = await stored(services, sorted({d for d, _ in sent}))
    if {k: r.samples for k, r in rows.items()} != {k: len(v) for k, v in sent.items()}:
        return False
    for key, powers in sent.items():
        assert rows[key].power_w == pytest.approx(sum(powers) / len(powers), rel=1e-12)
    return True


class Readings:
    """Battery readings with increasing ts and seq per device; remembers what was sent."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seq: dict[str, int] = defaultdict(int)
        self.sent: Sent = defaultdict(list)

    def make(self, device_id: str, ts: int, power_w: float) -> tuple[str, bytes]:
        self.seq[device_id] += 1
        body = {"ts": ts, "seq": self.seq[device_id], "soc_pct": 50.0, "power_w": power_w}
        start = ts // (self.settings.history_interval_s * 1000) * self.settings.history_interval_s
        self.sent[(device_id, start * 1000)].append(power_w)
        topic = f"{self.settings.topic_root}/devices/{device_id}/telemetry"
        return topic, orjson.dumps(body)


async def publish(pub: MqttClient, items: list[tuple[str, bytes]]) -> None:
    await pub.publish_many((t, p, 1, False) for t, p in items)


# --- a real `vpp ingest` process, kill -9 ------------------------------------------------------
def start_ingest(settings: Settings) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "VPP_DATABASE_URL": settings.database_url,
        "VPP_REDIS_URL": settings.redis_url,
        "VPP_MQTT_URL": settings.mqtt_url,
        "VPP_STATE_PREFIX": settings.state_prefix,
        "VPP_TOPIC_ROOT": settings.topic_root,
        "VPP_SHARE_GROUP": settings.share_group,
        "VPP_BROKER_CREDENTIALS": "none",
        "VPP_HISTORY_WRITETHROUGH_MS": str(settings.history_writethrough_ms),
        "VPP_LOG_LEVEL": "warning",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "ingest"],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


async def until_subscribed(
    services: Services, pub: MqttClient, readings: Readings, device_id: str
) -> None:
    """Publish a probe reading until the process has written one more probe sample (it is
    subscribed: a message published before that may have had no subscriber)."""
    deadline = time.monotonic() + 60
    before = await _samples(services, device_id)
    while True:
        await publish(pub, [readings.make(device_id, services.clock.now_ms(), 1.0)])
        try:
            await eventually(lambda: _more(services, device_id, before), 1.0)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


async def _samples(services: Services, device_id: str) -> int:
    return sum(r.samples for r in (await stored(services, [device_id])).values())


async def _more(services: Services, device_id: str, than: int) -> bool:
    return await _samples(services, device_id) > than


@pytest.fixture()
async def proc_guard() -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        kill9(p)


async def test_kill_9_loses_no_accepted_reading_of_the_open_interval(
    fresh_pg_url: str, services_factory, proc_guard: list[subprocess.Popen[bytes]]
) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(
        fresh_pg_url,
        redis_url=REDIS_URL,
        mqtt_url=MQTT_URL,
        share_group=unique("grp"),
        history_writethrough_ms=200,
    )
    services = await services_factory(settings)
    devices = [f"dur-{i}" for i in range(4)]
    await onboard_batteries(services, [*devices, "probe"])
    pub = services.mqtt_client(unique("pub"))
    await pub.connect()
    readings = Readings(settings)
    try:
        proc_guard.append(start_ingest(settings))
        await until_subscribed(services, pub, readings, "probe")

        # Readings of the open interval (5 minutes: it closes long after the test).
        now = services.clock.now_ms()
        first = [readings.make(d, now - 4000 + k * 500, 100.0 * i + k) for k in range(4)
                 for i, d in enumerate(devices)]  # fmt: skip
        await publish(pub, first)
        ours = {k: v for k, v in readings.sent.items() if k[0] in devices}
        # Accepted = committed: the service has them in telemetry_intervals, its interval open.
        await eventually(lambda: holds_exactly(services, ours))

        kill9(proc_guard[0])
        assert await holds_exactly(services, ours)  # nothing of it died with the process

        proc_guard.append(start_ingest(settings))
        await until_subscribed(services, pub, readings, "probe")
        now = max(services.clock.now_ms(), now + 1)
        more = [readings.make(d, now + k * 10, 1000.0 + 7 * i - k) for k in range(3)
                for i, d in enumerate(devices)]  # fmt: skip
        await publish(pub, more)
        ours = {k: v for k, v in readings.sent.items() if k[0] in devices}
        # The restarted process adds to the same rows: samples and mean power of all 7 readings.
        await eventually(lambda: holds_exactly(services, ours))
        assert sum(len(v) for v in ours.values()) == 7 * len(devices)
    finally:
        await pub.disconnect()


# --- PostgreSQL down ---------------------------------------------------------------------------
def dropped_metric() -> float:
    return REGISTRY.get_sample_value("vpp_ingest_history_dropped_total") or 0.0


needs_pg = pytest.mark.skipif(not postgres_available(), reason="PostgreSQL binaries not installed")


async def pg_down_rig(
    pg_url: str, **overrides: object
) -> tuple[Services, IngestWorker, MqttClient, Readings]:
    settings = make_settings(
        pg_url,
        redis_url=REDIS_URL,
        mqtt_url=MQTT_URL,
        share_group=unique("grp"),
        history_writethrough_ms=100,
        ingest_flush_ms=50,
        **overrides,
    )
    await asyncio.to_thread(upgrade, pg_url)
    services = await Services.create(settings)
    worker = IngestWorker(services)
    await worker.start()
    assert await worker.wait_connected()
    pub = services.mqtt_client(unique("pub"))
    await pub.connect()
    return services, worker, pub, Readings(settings)


async def close_rig(services: Services, worker: IngestWorker, pub: MqttClient) -> None:
    await pub.disconnect()
    await worker.stop(drain_timeout_s=2)
    await services.state.flush_prefix()  # type: ignore[attr-defined]
    await services.close()


async def until_tried(worker: IngestWorker, received: int) -> None:
    """Everything received is in the state store, and a history write taken after that has
    failed (the second failure from then on: the first may be a write already in flight)."""
    await eventually(lambda: _is(worker.received >= received and not worker.pending))
    failures = worker.history_failures
    await eventually(lambda: _is(worker.history_failures >= failures + 2))


@needs_pg
async def test_readings_while_postgres_is_down_are_written_when_it_returns() -> None:
    with private_postgres() as pg:
        services, worker, pub, readings = await pg_down_rig(pg.url)
        try:
            devices = [f"pg-{i}" for i in range(3)]
            await onboard_batteries(services, devices)
            pg.stop(immediate=True)
            now = services.clock.now_ms()
            items = [readings.make(d, now - 3000 + k * 100, 50.0 * i + k) for k in range(10)
                     for i, d in enumerate(devices)]  # fmt: skip
            await publish(pub, items)
            await until_tried(worker, len(items))
            # Kept, not yet accepted: accepted means in the database.
            assert worker.accepted["telemetry"] == 0
            assert worker.pending_history == len(items)

            pg.start()
            await eventually(lambda: holds_exactly(services, readings.sent))
            await eventually(lambda: _is(worker.accepted["telemetry"] == len(items)))
            assert worker.history_dropped == 0 and worker.pending_history == 0
        finally:
            if not _port_open(pg.port):
                pg.start()
            await close_rig(services, worker, pub)


@needs_pg
async def test_past_the_bound_the_oldest_intervals_are_dropped_and_counted() -> None:
    with private_postgres() as pg:
        # Two rows may wait: one 10-second interval of the two devices.
        services, worker, pub, readings = await pg_down_rig(
            pg.url, history_interval_s=10, history_buffer_max_rows=2
        )
        try:
            devices = ["cap-0", "cap-1"]
            await onboard_batteries(services, devices)
            before = dropped_metric()
            pg.stop(immediate=True)
            now = services.clock.now_ms()
            base = now // 10_000 * 10_000 - 30_000  # three whole intervals, all in the past
            items: list[tuple[str, bytes]] = []
            for slot in range(3):
                for k in range(slot + 2):  # 2, 3, 4 readings per device
                    for i, d in enumerate(devices):
                        ts = base + slot * 10_000 + 1000 + k * 1000
                        items.append(readings.make(d, ts, 10.0 * slot + k + i))
            await publish(pub, items)
            await until_tried(worker, len(items))
            newest = {key: v for key, v in readings.sent.items() if key[1] == base + 20_000}
            assert sum(len(v) for v in newest.values()) == 8
            assert worker.pending_history == 8  # the newest interval's readings, kept
            assert worker.history_dropped == len(items) - 8  # the two older ones, dropped
            assert dropped_metric() - before == worker.history_dropped

            pg.start()
            # What was kept is written, exactly; nothing of the dropped intervals is there.
            await eventually(lambda: holds_exactly(services, newest))
            await eventually(lambda: _is(worker.accepted["telemetry"] == 8))
            assert worker.history_dropped + worker.accepted["telemetry"] == len(items)
        finally:
            if not _port_open(pg.port):
                pg.start()
            await close_rig(services, worker, pub)


async def _is(flag: bool) -> bool:
    return flag


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# --- the write-through merge ---------------------------------------------------------------------
async def test_write_through_partials_add_up_to_the_interval_row(
    db_url: str, services_factory
) -> None:  # type: ignore[no-untyped-def]
    """Partials written one after the other, and partials given back after a failed write, end
    as one row with every sample and the exact means (PostgreSQL and SQLite paths)."""
    svc = await services_factory(make_settings(db_url))
    history = IntervalHistory(300)
    t0 = 1_784_061_000_000  # on a 5-minute boundary

    def add(device_id: str, powers: list[float], socs: list[float]) -> None:
        rec = np.zeros(len(powers), dtype=STATE_DTYPE)
        for f in FIELDS:
            rec[f] = np.nan
        rec["ts_ms"] = rec["recv_ms"] = t0 + 1000 * np.arange(1, len(powers) + 1)
        rec["power_w"], rec["soc_pct"] = powers, socs
        history.add([device_id] * len(powers), rec)

    add("b-1", [100.0, 200.0], [10.0, 20.0])
    add("b-2", [5.0], [50.0])
    assert await write_partials(svc.db, history.take_all()) == 2
    add("b-1", [600.0], [30.0])
    failed = history.take_all()  # a write that failed: given back, then more arrive
    history.restore(failed)
    add("b-1", [1100.0], [40.0])
    assert await write_partials(svc.db, history.take_all()) == 1
    assert len(history) == 0
    rows = await stored(svc, ["b-1", "b-2"])
    assert {k: r.samples for k, r in rows.items()} == {("b-1", t0): 4, ("b-2", t0): 1}
    assert rows[("b-1", t0)].power_w == pytest.approx(500.0, rel=1e-12)
    assert rows[("b-1", t0)].soc_pct == pytest.approx(25.0, rel=1e-12)
    assert rows[("b-1", t0)].hvac_w is None
    assert rows[("b-2", t0)].power_w == pytest.approx(5.0)
