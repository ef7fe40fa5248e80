"""The ingest worker end to end, against the real Mosquitto and Redis (and the embedded
``memory://`` path): what devices publish ends up in the state store, the ack queue and the
interval history; every drop is counted by reason; garbage, a broker restart and a Redis outage
do not lose accepted state."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import generate_latest
from sqlalchemy import select

from devices.ingest import IngestWorker
from devices.mqtt import MqttClient
from dispatch.services import Services
from store.history import IntervalHistory, write_intervals
from store.models import TelemetryInterval
from tests.helpers.mosquitto import free_port
from tests.helpers.settings import MQTT_URL, REDIS_URL, make_settings, unique
from vpp.clock import ManualClock
from vpp.domain import RejectReason
from vpp.fleet.records import STATE_DTYPE, unpack_states
from vpp.fleet.snapshot import BATTERY, SOLAR, THERMOSTAT
from vpp.settings import Settings

T0 = 1_784_061_000_000  # 2026-07-14T20:30:00Z, on a 5-minute boundary


async def eventually(pred: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if await pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def battery(ts: int, soc: float = 50.0, seq: int | None = None, **kw: object) -> bytes:
    body: dict[str, object] = {"ts": ts, "soc_pct": soc, "power_w": 1000.0, **kw}
    if seq is not None:
        body["seq"] = seq
    return orjson.dumps(body)


class Rig:
    """Services + a worker + a publisher on one settings."""

    def __init__(self, services: Services, worker: IngestWorker, pub: MqttClient) -> None:
        self.services = services
        self.worker = worker
        self.pub = pub

    def topic(self, device_id: str, leaf: str = "telemetry") -> str:
        return self.services.topic(device_id, leaf)

    async def publish(self, items: list[tuple[str, bytes]], qos: int = 1) -> None:
        await self.pub.publish_many((t, p, qos, False) for t, p in items)

    async def publish_paced(
        self,
        items: list[tuple[str, bytes]],
        qos: int = 1,
        workers: list[IngestWorker] | None = None,
    ) -> None:
        """Publish in chunks the workers keep up with: Mosquitto drops messages for a subscriber
        that falls more than ``max_queued_messages`` (1000 by default) behind."""
        ws = workers or [self.worker]
        base = sum(w.received for w in ws)
        for lo in range(0, len(items), 500):
            chunk = items[lo : lo + 500]
            await self.publish(chunk, qos)
            target = base + lo + len(chunk)

            async def caught_up(target: int = target) -> bool:
                return sum(w.received for w in ws) >= target

            await eventually(caught_up, 30)

    async def states(self, ids: list[str]) -> np.ndarray:
        return unpack_states(await self.services.state.get_states(ids))

    async def settled(self, accepted: int, rejected: int = 0, timeout_s: float = 20.0) -> None:
        w = self.worker

        async def done() -> bool:
            return (
                sum(w.accepted.values()) >= accepted
                and sum(w.rejected.values()) >= rejected
                and not w.pending
            )

        await eventually(done, timeout_s)


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture()
async def rig(services_factory, sqlite_url: str) -> AsyncIterator[RigFactory]:  # type: ignore[no-untyped-def]
    made: list[Rig] = []

    async def factory(
        real: bool = True,
        clock: ManualClock | None = None,
        services: Services | None = None,
        **overrides: object,
    ) -> Rig:
        if services is None:
            values: dict[str, object] = {"share_group": unique("grp"), "ingest_flush_ms": 50}
            if real:
                values.update(mqtt_url=MQTT_URL, redis_url=REDIS_URL)
            values.update(overrides)
            settings = make_settings(sqlite_url, **values)
            services = await services_factory(settings, clock=clock)
        worker = IngestWorker(services)
        await worker.start()
        pub = services.mqtt_client(unique("pub"))
        await pub.connect()
        r = Rig(services, worker, pub)
        made.append(r)
        return r

    yield factory
    for r in made:
        await r.pub.disconnect()
        await r.worker.stop(drain_timeout_s=2)


# --- the happy path on both transports ------------------------------------------------------------
@pytest.mark.parametrize("real", [True, False], ids=["mosquitto+redis", "memory"])
async def test_telemetry_status_and_acks_reach_the_state_store(rig: RigFactory, real: bool) -> None:
    r = await rig(real=real)
    st = r.services.state
    now = r.services.clock.now_ms()
    await st.registry_put({"bat-1": BATTERY, "sol-1": SOLAR, "th-1": THERMOSTAT})
    await r.publish(
        [
            (r.topic("bat-1"), battery(now - 2000, soc=40.0, seq=1)),
            (r.topic("bat-1"), battery(now - 1000, soc=41.0, seq=2)),  # newest wins
            (r.topic("sol-1"), orjson.dumps({"ts": now, "power_w": 4200})),
            (
                r.topic("th-1"),
                orjson.dumps(
                    {"ts": now, "indoor_c": 25.0, "setpoint_c": 24.0, "hvac_w": 0, "mode": "off"}
                ),
            ),
            (r.topic("bat-1", "status"), b"online"),
            (r.topic("th-1", "status"), b"offline"),
            (
                r.topic("bat-1", "ack"),
                orjson.dumps({"command_id": "c-1", "status": "started", "ts": now}),
            ),
        ]
    )
    await r.settled(accepted=7)
    rows = await r.states(["bat-1", "sol-1", "th-1"])
    assert rows["soc_pct"][0] == 41.0 and rows["seq"][0] == 2
    assert rows["power_w"][1] == 4200 and rows["kind"][1] == SOLAR
    assert rows["indoor_c"][2] == 25.0
    assert (rows["recv_ms"] >= now).all()
    status = await st.all_status()
    assert status["bat-1"][0] is True and status["th-1"][0] is False
    acks = [orjson.loads(a) for a in await st.pop_acks()]
    assert acks == [
        {
            "device_id": "bat-1",
            "command_id": "c-1",
            "status": "started",
            "ts": now,
            "recv_ms": acks[0]["recv_ms"],
        }
    ]
    assert r.worker.accepted == {"telemetry": 4, "status": 2, "ack": 1}
    assert r.worker.connected


async def test_every_rejection_reason_is_counted_in_metrics(rig: RigFactory) -> None:
    r = await rig(real=True)
    st = r.services.state
    now = r.services.clock.now_ms()
    await st.registry_put({"bat-1": BATTERY, "gone-1": BATTERY})
    await st.registry_put({"gone-1": -1})  # offboarded: a tombstone
    t = r.topic("bat-1")
    await r.publish([(t, battery(now - 1000, seq=10))])
    await r.settled(accepted=1)
    before = generate_latest().decode()
    cases = {
        RejectReason.invalid_json: [(t, b"{oops")],
        RejectReason.not_object: [(t, b"[1, 2, 3]")],
        RejectReason.missing_field: [(t, orjson.dumps({"ts": now, "power_w": 1}))],
        RejectReason.wrong_type: [(t, orjson.dumps({"ts": now, "soc_pct": "x", "power_w": 1}))],
        RejectReason.out_of_range: [(t, battery(now, soc=140.0, seq=11))],
        RejectReason.unknown_device: [(r.topic("nobody"), battery(now))],
        RejectReason.offboarded: [
            (r.topic("gone-1"), battery(now)),
            (r.topic("gone-1", "ack"), b"{}"),
        ],
        RejectReason.out_of_order: [(t, battery(now, seq=9))],
        RejectReason.oversize: [(t, battery(now, seq=12, pad="x" * 5000))],
        RejectReason.future: [(t, battery(now + 6 * 60_000, seq=13))],
    }
    await r.publish([m for msgs in cases.values() for m in msgs])
    # bad_topic cannot come through the subscription filters; feed one in directly.
    r.worker._on_message(f"{r.services.settings.topic_root}/devices/x/y/telemetry", b"{}")
    expected = {reason.value: len(msgs) for reason, msgs in cases.items()}
    expected["bad_topic"] = 1
    await r.settled(accepted=1, rejected=sum(expected.values()))
    assert dict(r.worker.rejected) == expected
    # The metric counts each reason.
    after = generate_latest().decode()

    def metric(text: str, reason: str) -> float:
        for line in text.splitlines():
            if line.startswith(f'vpp_ingest_rejected_total{{reason="{reason}"}}'):
                return float(line.split()[-1])
        return 0.0

    for reason, n in expected.items():
        assert metric(after, reason) - metric(before, reason) >= n, reason
    # The state is still the one valid reading.
    row = (await r.states(["bat-1"]))[0]
    assert row["seq"] == 10


async def test_garbage_flood_does_not_stop_valid_devices(rig: RigFactory) -> None:
    r = await rig(real=True)
    st = r.services.state
    now = r.services.clock.now_ms()
    devices = [f"d-{i:04d}" for i in range(300)]
    await st.registry_put(dict.fromkeys(devices, BATTERY))
    rng = np.random.default_rng(1)
    garbage_payloads = [
        b"",
        b"\x00\xff" * 40,
        b"{" * 3000,
        b'{"ts": 1e400}',
        b"[]",
        b'{"ts": "now"}',
        orjson.dumps({"ts": now, "soc_pct": None, "power_w": "1"}),
        bytes(rng.integers(0, 256, 4000, dtype=np.uint8)),
        b"x" * 10_000,
    ]
    n_garbage = 0
    for rnd in range(5):
        batch: list[tuple[str, bytes]] = []
        for i, d in enumerate(devices):
            batch.append((r.topic(d), battery(now - 10_000 + rnd * 1000, soc=rnd * 10.0 + i % 7)))
            for _ in range(10):
                target = d if rng.random() < 0.5 else f"intruder-{rng.integers(1_000_000)}"
                batch.append(
                    (r.topic(target), garbage_payloads[rng.integers(len(garbage_payloads))])
                )
                n_garbage += 1
        await r.publish_paced(batch)
    await r.settled(accepted=5 * len(devices), rejected=n_garbage)
    assert sum(r.worker.rejected.values()) == n_garbage
    assert r.worker.accepted["telemetry"] == 5 * len(devices)
    rows = await r.states(devices)
    assert (rows["ts_ms"] == now - 10_000 + 4000).all()
    assert np.allclose(rows["soc_pct"], 40.0 + np.arange(len(devices)) % 7)


async def test_onboarding_seen_by_a_running_worker(rig: RigFactory) -> None:
    r = await rig(real=True)
    now = r.services.clock.now_ms()
    await r.publish([(r.topic("late-1"), battery(now - 5000))])
    await r.settled(accepted=0, rejected=1)
    assert r.worker.rejected["unknown_device"] == 1
    await r.services.state.registry_put({"late-1": BATTERY})  # onboarded by another process
    await r.publish([(r.topic("late-1"), battery(now))])
    await r.settled(accepted=1)
    assert (await r.states(["late-1"]))["ts_ms"][0] == now


async def test_restarted_worker_still_rejects_older_messages(rig: RigFactory) -> None:
    r = await rig(real=True)
    now = r.services.clock.now_ms()
    await r.services.state.registry_put({"bat-1": BATTERY})
    await r.publish([(r.topic("bat-1"), battery(now - 1000, seq=50, soc=77.0))])
    await r.settled(accepted=1)
    await r.worker.stop()
    # A new worker with an empty memory: the state store knows seq 50.
    r2 = await rig(services=r.services)
    await r2.publish([(r2.topic("bat-1"), battery(now, seq=49, soc=10.0))])
    await r2.settled(accepted=0, rejected=1)
    assert r2.worker.rejected == {"out_of_order": 1}
    assert (await r2.states(["bat-1"]))["soc_pct"][0] == 77.0
    await r2.publish([(r2.topic("bat-1"), battery(now, seq=49, soc=10.0))])  # now known locally
    await r2.publish([(r2.topic("bat-1"), battery(now, seq=51, soc=12.0))])
    await r2.settled(accepted=1, rejected=2)
    assert (await r2.states(["bat-1"]))["soc_pct"][0] == 12.0


async def test_two_workers_split_the_load_and_keep_the_newest(rig: RigFactory) -> None:
    r1 = await rig(real=True)
    r2 = await rig(services=r1.services)  # same share group: one shared subscription
    now = r1.services.clock.now_ms()
    devices = [f"d-{i:03d}" for i in range(100)]
    await r1.services.state.registry_put(dict.fromkeys(devices, BATTERY))
    n_seq = 20
    msgs = [
        (r1.topic(d), battery(now - 60_000 + s * 1000, soc=float(s), seq=s))
        for s in range(1, n_seq + 1)
        for d in devices
    ]
    await r1.publish_paced(msgs, workers=[r1.worker, r2.worker])

    async def all_in() -> bool:
        rows = await r1.states(devices)
        # Telemetry counts as accepted once its history row is committed: wait for that too.
        workers = (r1.worker, r2.worker)
        return bool((rows["seq"] == n_seq).all()) and not any(
            w.pending or w.pending_history for w in workers
        )

    await eventually(all_in, 30)
    a1, a2 = r1.worker.accepted["telemetry"], r2.worker.accepted["telemetry"]
    # Both workers took a share, nothing was counted twice, and the newest reading won.
    assert a1 > 0 and a2 > 0
    dropped = sum(r1.worker.rejected.values()) + sum(r2.worker.rejected.values())
    assert a1 + a2 + dropped == len(msgs)
    assert set(r1.worker.rejected) | set(r2.worker.rejected) <= {"out_of_order"}
    rows = await r1.states(devices)
    assert (rows["soc_pct"] == n_seq).all()


# --- faults -------------------------------------------------------------------------------------
@contextmanager
def private_server(
    argv: Callable[[int, Path], list[str]],
) -> Iterator[tuple[int, Callable[[], None], Callable[[], None]]]:
    """A broker or Redis of our own on a free port that the test can kill and restart."""
    workdir = Path(tempfile.mkdtemp(prefix="vpp-ingest-test-"))
    port = free_port()
    proc: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        p = subprocess.Popen(
            argv(port, workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        proc.append(p)
        import socket

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{argv(port, workdir)[0]} did not start on {port}")

    def kill() -> None:
        p = proc.pop()
        p.send_signal(signal.SIGKILL)
        p.wait(5)

    try:
        start()
        yield port, kill, start
    finally:
        for p in proc:
            p.kill()
            p.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


def mosquitto_argv(port: int, workdir: Path) -> list[str]:
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    return ["mosquitto", "-c", str(conf)]


def redis_argv(port: int, workdir: Path) -> list[str]:
    return [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(workdir),
    ]  # fmt: skip


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto not installed")
async def test_broker_restart_during_ingest(rig: RigFactory) -> None:
    with private_server(mosquitto_argv) as (port, kill, start):
        r = await rig(real=True, mqtt_url=f"mqtt://127.0.0.1:{port}")
        st = r.services.state
        devices = [f"d-{i:03d}" for i in range(200)]
        await st.registry_put(dict.fromkeys(devices, BATTERY))
        now = r.services.clock.now_ms()
        await r.publish([(r.topic(d), battery(now - 30_000, soc=11.0)) for d in devices])
        await r.settled(accepted=len(devices))

        kill()  # the broker dies mid-stream
        await eventually(lambda: _false_if(r.worker.connected), 10)
        start()  # and comes back on the same port
        assert await r.worker.wait_connected(40), "worker did not reconnect"
        assert await _wait_client(r.pub, 40), "publisher did not reconnect"
        # State accepted before the restart is still there.
        rows = await r.states(devices)
        assert (rows["soc_pct"] == 11.0).all()

        # The worker re-subscribed: new telemetry flows again (retry until the SUBACK is in).
        async def second_round_in() -> bool:
            await r.publish([(r.topic(d), battery(now, soc=22.0)) for d in devices[:5]])
            await asyncio.sleep(0.3)
            return bool(((await r.states(devices[:5]))["soc_pct"] == 22.0).all())

        await eventually(second_round_in, 30)
        await r.publish([(r.topic(d), battery(now, soc=22.0)) for d in devices[5:]])
        await eventually(
            lambda: _async_all(r, devices, 22.0),
            20,
        )
        assert r.worker.rejected.keys() <= {"out_of_order"}  # only the retried duplicates


async def _false_if(flag: bool) -> bool:
    return not flag


async def _async_all(r: Rig, devices: list[str], soc: float) -> bool:
    return bool(((await r.states(devices))["soc_pct"] == soc).all())


async def _wait_client(client: MqttClient, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not client.connected:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
async def test_redis_outage_keeps_accepted_state_until_it_is_back(rig: RigFactory) -> None:
    with private_server(redis_argv) as (port, kill, start):
        r = await rig(real=True, redis_url=f"redis://127.0.0.1:{port}/0")
        st = r.services.state
        devices = [f"d-{i:03d}" for i in range(50)]
        await st.registry_put(dict.fromkeys(devices, BATTERY))
        now = r.services.clock.now_ms()
        await r.publish([(r.topic(d), battery(now - 20_000, soc=5.0)) for d in devices])
        await r.settled(accepted=len(devices))

        kill()  # Redis goes away; devices keep reporting
        await r.publish([(r.topic(d), battery(now - 10_000, soc=6.0)) for d in devices])
        await eventually(lambda: _async_true(len(r.worker._pend_states) == len(devices)), 10)
        await asyncio.sleep(0.5)  # a few failed writes and retries
        assert r.worker.store_failures > 0
        start()  # an empty Redis comes back
        await eventually(
            lambda: _async_true(not (r.worker.pending or r.worker.pending_history)), 30
        )
        rows = await r.states(devices)
        assert (rows["soc_pct"] == 6.0).all()
        assert r.worker.accepted["telemetry"] == 2 * len(devices)


async def _async_true(flag: bool) -> bool:
    return flag


# --- history ------------------------------------------------------------------------------------
async def test_interval_history_is_written_through_while_the_interval_is_open(
    rig: RigFactory,
) -> None:
    clock = ManualClock(T0 + 60_000)
    r = await rig(real=False, clock=clock, history_interval_s=300)
    await r.services.state.registry_put({"bat-1": BATTERY, "th-1": THERMOSTAT})
    th = {"indoor_c": 25.0, "setpoint_c": 24.0, "mode": "cool"}
    await r.publish(
        [
            (r.topic("bat-1"), battery(T0 + 10_000, soc=40.0, power_w=1000.0)),
            (r.topic("bat-1"), battery(T0 + 70_000, soc=50.0, power_w=3000.0)),
            (r.topic("th-1"), orjson.dumps({"ts": T0 + 5000, "hvac_w": 2000, **th})),
            (r.topic("th-1"), orjson.dumps({"ts": T0 + 6000, "hvac_w": 0, "outdoor_c": 30, **th})),
        ]
    )
    await r.worker.flush()
    clock.advance(245)
    await r.publish([(r.topic("bat-1"), battery(T0 + 310_000, soc=60.0))])  # next interval
    # Written through while the intervals are still open: the service clock stays short of the
    # first one's end plus its grace period (T0 + 330 s), where the rows used to be written.
    await eventually(lambda: _history_count(r.services, 3))
    async with r.services.db.session() as s:
        rows = {
            (x.device_id, x.interval_start_ms): x
            for x in (await s.execute(select(TelemetryInterval))).scalars()
        }
    assert set(rows) == {("bat-1", T0), ("th-1", T0), ("bat-1", T0 + 300_000)}
    assert rows[("bat-1", T0 + 300_000)].samples == 1
    bat = rows[("bat-1", T0)]
    assert bat.samples == 2 and bat.soc_pct == 45.0 and bat.power_w == 2000.0
    assert bat.indoor_c is None
    therm = rows[("th-1", T0)]
    assert therm.samples == 2 and therm.hvac_w == 1000.0 and therm.outdoor_c == 30.0


async def _history_count(services: Services, n: int) -> bool:
    async with services.db.session() as s:
        return len((await s.execute(select(TelemetryInterval))).all()) >= n


async def test_history_upsert_merges_two_writers(db_url: str, services_factory) -> None:  # type: ignore[no-untyped-def]
    svc = await services_factory(make_settings(db_url))
    h1, h2 = IntervalHistory(300), IntervalHistory(300)
    rec = np.zeros(2, dtype=STATE_DTYPE)
    for f in ("power_w", "soc_pct", "indoor_c", "setpoint_c", "hvac_w", "outdoor_c"):
        rec[f] = np.nan
    rec["ts_ms"] = [T0 + 1000, T0 + 2000]
    rec["recv_ms"] = rec["ts_ms"]
    rec["clock_skewed"] = 0
    rec["power_w"] = [1000.0, 2000.0]
    h1.add(["d-1", "d-1"], rec)  # worker 1 saw two samples
    one = rec[:1].copy()
    one["power_w"] = 4500.0
    one["soc_pct"] = 80.0
    h2.add(["d-1"], one)  # worker 2 saw one of the same device and interval
    await write_intervals(svc.db, h1.take_closed(0, everything=True))
    await write_intervals(svc.db, h2.take_closed(0, everything=True))
    async with svc.db.session() as s:
        rows = (await s.execute(select(TelemetryInterval))).scalars().all()
    assert len(rows) == 1
    assert rows[0].samples == 3
    assert rows[0].power_w == pytest.approx((1000 + 2000 + 4500) / 3)
    assert rows[0].soc_pct == pytest.approx(80.0)  # only one writer had it


async def test_worker_ignores_settings_of_other_topic_roots(rig: RigFactory) -> None:
    """Workers of another deployment (other topic root) on the same broker see nothing of ours."""
    r = await rig(real=True)
    other = await rig(real=True)
    await r.services.state.registry_put({"bat-1": BATTERY})
    await r.publish([(r.topic("bat-1"), battery(r.services.clock.now_ms()))])
    await r.settled(accepted=1)
    await asyncio.sleep(0.3)
    assert sum(other.worker.accepted.values()) + sum(other.worker.rejected.values()) == 0


def test_settings_defaults_match_the_contract() -> None:
    s = Settings()
    assert s.max_payload_bytes == 4096 and s.future_tolerance_s == 300
    assert s.max_clock_skew_s == 60 and s.history_interval_s == 300
