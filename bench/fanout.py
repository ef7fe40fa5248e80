"""Command fan-out and ack processing of the event runner, on the real servers.

1. Commands for N devices (default 100 000): from a ready assignment to the last command
   accepted (PUBACK) by the real Mosquitto, through the runner's own path: build the commands,
   store them in PostgreSQL (COPY) before sending, publish QoS 1, mark them sent. Beside it, in
   the same run, a bare paho-mqtt client publishes the same N messages (QoS 1, as many in flight
   as the broker allows) and waits for every PUBACK. Goal: runner rate ≥ 0.8 × bare rate.
2. Acks for N devices: N acks pushed on the ack queue (as ingest does), drained and applied by
   the runner (statuses in memory and in PostgreSQL). Without falling behind means the runner
   takes acks faster than commands go out.

    .venv/bin/python bench/fanout.py            # 100 000 devices
    .venv/bin/python bench/fanout.py --small    # 5 000 devices

Needs PostgreSQL (127.0.0.1:5432, user postgres), Redis (127.0.0.1:6379) and Mosquitto
(127.0.0.1:1883, anonymous) — the same servers the tests use.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
import uuid

import numpy as np
import orjson
import psycopg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PG_ADMIN = os.environ.get("VPP_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("VPP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MQTT = os.environ.get("VPP_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")


def bare_paho(messages: list[tuple[str, bytes]], window: int = 1000) -> float:
    """Seconds for a plain paho client to get every QoS-1 message PUBACKed."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from devices.mqtt import parse_mqtt_url

    cfg = parse_mqtt_url(MQTT)
    free = threading.Semaphore(window)
    done = threading.Event()
    count = [0]
    n = len(messages)

    def on_publish(client, userdata, mid, rc, props):  # type: ignore[no-untyped-def]
        count[0] += 1
        free.release()
        if count[0] >= n:
            done.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{uuid.uuid4().hex[:8]}",
                    protocol=paho.MQTTv5)  # fmt: skip
    c.max_inflight_messages_set(window)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect(cfg.host, cfg.port)
    c.loop_start()
    connected.wait(10)
    t0 = time.perf_counter()
    for topic, payload in messages:
        free.acquire()
        c.publish(topic, payload, 1)
    done.wait(600)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return dt


async def main(n: int) -> None:
    from dispatch import events as es
    from dispatch.runner import SENT, CommandBatch, EventRunner, Running, new_command_id
    from dispatch.services import Services
    from dispatch.types import Horizon
    from store.migrate import upgrade
    from vpp.clock import Clock
    from vpp.domain import AckStatus, CommandStatus, CommandType, Direction, RequestStatus
    from vpp.fleet.snapshot import BATTERY
    from vpp.settings import Settings

    db = f"vpp_bench_fanout_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + "/" + db
    root = f"bench-{uuid.uuid4().hex[:6]}/v1"
    settings = Settings(database_url=url, redis_url=REDIS, mqtt_url=MQTT, topic_root=root,
                        state_prefix=f"benchfan-{uuid.uuid4().hex[:6]}",
                        broker_credentials="none")  # type: ignore[call-arg]  # fmt: skip
    try:
        await asyncio.to_thread(upgrade, url)
        svc = await Services.create(settings, clock=Clock())
        runner = EventRunner(svc, owner="bench")
        runner.client = svc.mqtt_client(f"bench-runner-{uuid.uuid4().hex[:6]}")
        await runner.client.connect()
        now = svc.clock.now_ms()
        end = now + 2 * 3_600_000
        ids = [f"d-{i:07d}" for i in range(n)]
        rng = np.random.default_rng(1)
        # The plan: one row a device, as the assignment hands it over.
        setpoint = np.floor(rng.uniform(2000, 5000, n))
        kind = np.full(n, BATTERY, np.int8)

        t_plan = time.perf_counter()
        batch = CommandBatch(
            ids=[new_command_id() for _ in range(n)],
            device_ids=ids,
            kind=kind,
            type=[CommandType.battery_discharge.value] * n,
            setpoint_w=setpoint,
            offset_c=np.full(n, np.nan),
            limit_w=np.full(n, np.nan),
            valid_from_ms=np.full(n, now, np.int64),
            valid_until_ms=np.full(n, end + 60_000, np.int64),
            randomize_s=np.zeros(n, np.int64),
            baseline_w=np.zeros(n),
            expected_kw=setpoint / 1000.0,
        )
        info = es.EventInfo("cr-bench", es.KIND_REQUEST, "t", "ERCOT-NORTH", n * 3.5 / 1000,
                            now, end, 50, False, Direction.load_reduction.value,
                            RequestStatus.active.value)  # fmt: skip
        run = Running(info, Horizon(now, 300, 24), np.ones(24), runner._table("cr-bench", batch),
                      [], np.zeros(0))  # fmt: skip
        t_built = time.perf_counter()
        records = runner.store.records("cr-bench", batch, now)
        async with svc.db.engine.begin() as conn:
            await runner.store.insert(conn, records)
        t_stored = time.perf_counter()
        runner._register(run)
        # Publish and mark sent: the runner's own path (store → publish → mark).
        rows = np.arange(n, dtype=np.int64)
        t_pub0 = time.perf_counter()
        topic = svc.topic
        msgs = [(topic(run.table.device_id[i], "cmd"), run.table.payload[i], 1, False)
                for i in range(n)]  # fmt: skip
        await runner.publish(msgs)
        t_acked = time.perf_counter()
        await runner.store.mark(batch.ids, CommandStatus.sent.value, sent_ms=svc.clock.now_ms(),
                                attempts_inc=True)  # fmt: skip
        t_done = time.perf_counter()
        run.table.status[rows] = SENT

        runner_s = t_acked - t_plan  # plan → last command accepted by Mosquitto
        bare_msgs = [(m[0], m[1]) for m in msgs]
        bare_s = await asyncio.to_thread(bare_paho, bare_msgs)
        print(f"fan-out, {n} commands (QoS 1, real Mosquitto, commands stored in PostgreSQL first)")
        print(f"  build commands      {t_built - t_plan:8.3f} s")
        print(f"  store (COPY)        {t_stored - t_built:8.3f} s")
        print(f"  publish → PUBACKs   {t_acked - t_pub0:8.3f} s")
        print(f"  mark sent (after)   {t_done - t_acked:8.3f} s")
        print(f"  runner: plan → last PUBACK {runner_s:8.3f} s = {n / runner_s:10.0f} commands/s")
        print(f"  bare paho, same messages  {bare_s:8.3f} s = {n / bare_s:10.0f} messages/s")
        print(f"  ratio runner/bare rate    {bare_s / runner_s:8.2f}   (goal ≥ 0.8)")

        # Acks: one "received" and one "started" per device, through the ack queue.
        acks = []
        for cid, dev in zip(batch.ids, ids, strict=True):
            for status in (AckStatus.received, AckStatus.started):
                acks.append(orjson.dumps({"device_id": dev, "command_id": cid,
                                          "status": status.value, "ts": now,
                                          "recv_ms": now}))  # fmt: skip
        for lo in range(0, len(acks), 20_000):
            await svc.state.push_acks(acks[lo : lo + 20_000])
        t0 = time.perf_counter()
        drained = await runner.drain_acks()
        ack_s = time.perf_counter() - t0
        started = int((run.table.status == 3).sum())
        print(f"acks, {drained} for {n} devices (received + started each)")
        print(f"  drained and applied (memory + PostgreSQL) in {ack_s:.3f} s = "
              f"{drained / ack_s:.0f} acks/s; devices started: {started}")  # fmt: skip
        print(
            f"  acks/s ÷ commands/s = {(drained / ack_s) / (n / runner_s):.2f} "
            "(> 1: acks never fall behind the fan-out)"
        )
        await runner.client.disconnect()
        await svc.state.flush_prefix()  # type: ignore[attr-defined]
        await svc.close()
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="5 000 devices instead of 100 000")
    ap.add_argument("--devices", type=int, default=None)
    a = ap.parse_args()
    asyncio.run(main(a.devices or (5_000 if a.small else 100_000)))
