"""Two ingest workers on one shared subscription lose no reading: the broker splits one device's
messages between them, so one worker may store a newer reading a moment before the other stores
an older one. Against the real Redis, PostgreSQL and Mosquitto."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

import orjson
from sqlalchemy import select

from devices.ingest import IngestWorker
from devices.onboarding import BatterySpec, onboard
from dispatch.services import Services
from store.keys import create_api_key
from store.models import TelemetryInterval
from store.state.rebuild import rebuild_if_lost
from tests.helpers.devices import battery as battery_body
from tests.helpers.settings import MQTT_URL, REDIS_URL, make_settings, unique
from vpp.fleet.records import unpack_states

INTERVAL_MS = 300_000
TENANT = "tenant-race"

Sent = dict[tuple[str, int], list[float]]  # (device, interval start) -> power_w of each reading


async def eventually(pred: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def onboard_batteries(services: Services, ids: list[str]) -> None:
    """Devices as an operator registers them (database rows, the ingest registry), and the
    state store's generation in place, so a worker trusts its registry from the first flush."""
    await create_api_key(services.db, TENANT, "fleet", services.clock.now_ms())
    await onboard(services, [BatterySpec(**battery_body(d)) for d in ids], tenant_id=TENANT)
    await rebuild_if_lost(services.db, services.state)


async def ready_worker(services: Services) -> IngestWorker:
    worker = IngestWorker(services)
    await worker.flush()  # loads the registry
    return worker


def reading(ts: int, seq: int) -> bytes:
    return orjson.dumps({"ts": ts, "seq": seq, "soc_pct": 50.0, "power_w": 100.0 + seq})


async def history(services: Services, ids: list[str]) -> dict[tuple[str, int], tuple[int, float]]:
    """``(device, interval start) -> (samples, power_w)`` as settlement would read them."""
    async with services.db.session() as s:
        rows = (
            await s.execute(select(TelemetryInterval).where(TelemetryInterval.device_id.in_(ids)))
        ).scalars()
        return {(r.device_id, r.interval_start_ms): (r.samples, r.power_w) for r in rows}


def assert_history_is(got: dict[tuple[str, int], tuple[int, float]], sent: Sent) -> None:
    assert set(got) == set(sent)
    for key, powers in sent.items():
        samples, power = got[key]
        assert samples == len(powers), key
        assert abs(power - sum(powers) / len(powers)) < 1e-6, key


async def test_readings_overtaken_by_the_other_worker_still_land_in_the_history(
    fresh_pg_url: str, services_factory
) -> None:  # type: ignore[no-untyped-def]
    """Each worker's batches are run by hand, so the interleaving is the worst one: the worker
    holding the even seqs always stores first, sometimes two of them at once."""
    settings = make_settings(
        fresh_pg_url, redis_url=REDIS_URL, share_group=unique("grp"), ingest_reorder_window_ms=5000
    )
    services = await services_factory(settings)
    devices = [f"race-{i:03d}" for i in range(50)]
    await onboard_batteries(services, devices)
    first, second = await ready_worker(services), await ready_worker(services)
    now = services.clock.now_ms()
    # Within the clock-skew allowance (60 s) of the service clock, so each reading is filed
    # by its own ts (a skewed one would be filed by when it arrived).
    base = now - 45_000
    ts_of = {s: base + s * 1000 for s in range(1, 41)}
    sent: Sent = defaultdict(list)

    async def deliver(worker: IngestWorker, seqs: list[int]) -> None:
        for s in seqs:
            for d in devices:
                worker._on_message(services.topic(d, "telemetry"), reading(ts_of[s], s))
                sent[(d, ts_of[s] // INTERVAL_MS * INTERVAL_MS)].append(100.0 + s)
        await worker.flush(now_ms=now)

    # seq 2 and 4 stored by `second` before `first` has seq 1, then 3; then one each, and so on.
    await deliver(second, [2, 4])
    await deliver(first, [1])
    await deliver(first, [3])
    for s in range(5, 40, 2):
        await deliver(second, [s + 1])
        await deliver(first, [s])
    await first.stop()
    await second.stop()

    n = 40 * len(devices)
    assert first.rejected == {} and second.rejected == {}
    assert first.accepted["telemetry"] + second.accepted["telemetry"] == n
    assert first.reordered == 20 * len(devices)  # every one of its readings was overtaken
    assert_history_is(await history(services, devices), sent)
    # The latest state is the newest reading, whoever stored it.
    states = unpack_states(await services.state.get_states(devices))
    assert (states["seq"] == 40).all()

    # Replays are still dropped: an old reading and the exact stored one, by a worker that
    # remembers the device and by a fresh one that only has the state store to go by.
    fresh = await ready_worker(services)
    for w, s in ((first, 3), (second, 40), (fresh, 2), (fresh, 40)):
        w._on_message(services.topic(devices[0], "telemetry"), reading(ts_of[s], s))
        await w.flush(now_ms=now)
        await w.stop()
    assert first.rejected == {"out_of_order": 1}
    assert second.rejected == {"out_of_order": 1}
    assert fresh.rejected == {"out_of_order": 2} and fresh.reordered == 0
    assert_history_is(await history(services, devices), sent)


async def test_a_reading_further_behind_than_the_reorder_window_is_rejected(
    fresh_pg_url: str, services_factory
) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(fresh_pg_url, redis_url=REDIS_URL, ingest_reorder_window_ms=2000)
    services = await services_factory(settings)
    await onboard_batteries(services, ["late-1"])
    now = services.clock.now_ms()
    one, other = await ready_worker(services), await ready_worker(services)
    topic = services.topic("late-1", "telemetry")
    other._on_message(topic, reading(now - 10_000, 10))
    await other.flush(now_ms=now)
    one._on_message(topic, reading(now - 14_000, 6))  # 4 s behind the stored one: stale
    await one.flush(now_ms=now)
    one._on_message(topic, reading(now - 11_000, 9))  # 1 s behind: overtaken, still counted
    await one.flush(now_ms=now)
    await one.stop()
    await other.stop()
    assert one.rejected == {"out_of_order": 1}
    assert one.last_rejections[-1][:2] == ("late-1", "out_of_order")
    assert one.accepted["telemetry"] == 1 and other.accepted["telemetry"] == 1
    got = await history(services, ["late-1"])
    assert sum(samples for samples, _ in got.values()) == 2
    state = unpack_states(await services.state.get_states(["late-1"]))
    assert state["seq"][0] == 10


async def test_two_workers_over_mqtt_lose_no_reading(fresh_pg_url: str, services_factory) -> None:  # type: ignore[no-untyped-def]
    """End to end: the shared Mosquitto splits every device's stream between two workers."""
    settings = make_settings(
        fresh_pg_url,
        mqtt_url=MQTT_URL,
        redis_url=REDIS_URL,
        share_group=unique("grp"),
        ingest_flush_ms=20,
        # Readings are stamped up to a minute back; on a loaded machine the run takes longer than
        # the default allowance, and a reading outside it is filed by arrival, not by its ts.
        max_clock_skew_s=3600.0,
    )
    services = await services_factory(settings)
    # An odd count: the broker alternates workers per message, so each device's consecutive
    # readings go to different workers.
    devices = [f"mq-{i:03d}" for i in range(101)]
    await onboard_batteries(services, devices)
    workers = [IngestWorker(services), IngestWorker(services)]
    for w in workers:
        await w.start()
    for w in workers:
        assert await w.wait_connected(10)
    pub = services.mqtt_client(unique("pub"))
    await pub.connect()
    now = services.clock.now_ms()
    sent: Sent = defaultdict(list)
    n_seq, burst = 20, 4
    try:
        for lo in range(1, n_seq + 1, burst):
            # A few readings of every device back to back: the broker hands consecutive ones of
            # one device to different workers, inside the same flush period.
            batch = []
            for s in range(lo, lo + burst):
                ts = now - 60_000 + s * 100  # 100 ms apart: well inside the reorder window
                for d in devices:
                    batch.append((services.topic(d, "telemetry"), reading(ts, s), 0, False))
                    sent[(d, ts // INTERVAL_MS * INTERVAL_MS)].append(100.0 + s)
            await pub.publish_many(batch)
            target = (lo + burst - 1) * len(devices)

            async def received(target: int = target) -> bool:
                return sum(w.received for w in workers) >= target

            await eventually(received)  # keeps the broker's queue short: nothing dropped

        async def all_decided() -> bool:
            decided = sum(w.accepted["telemetry"] + w.rejected.total() for w in workers)
            return decided >= n_seq * len(devices)

        await eventually(all_decided)
    finally:
        await pub.disconnect()
        for w in workers:
            await w.stop(drain_timeout_s=5)
    assert all(w.received for w in workers)  # both took a share
    assert [w.rejected for w in workers] == [{}, {}]
    assert sum(w.reordered for w in workers) > 0  # the race did happen
    assert_history_is(await history(services, devices), sent)
