"""Command fan-out and ack processing of the event runner, on real servers.

1. Fan-out of N commands (default 1 000 000): from a ready assignment to the last command
   accepted (PUBACK) by Mosquitto, through the runner's own path (``EventRunner.fan_out``): the
   commands stored in PostgreSQL (COPY, in chunks) before they are sent, each chunk stored while
   the one before it is being published, QoS 1 over ``VPP_MQTT_PUBLISH_CONNECTIONS``
   connections with the broker's in-flight window each, marked sent in bulk. The broker is a
   private Mosquitto with the deploy config (tests/helpers/mosquitto.py), so the shared broker's
   settings and traffic decide nothing. A C subscriber (``mosquitto_sub``, one wildcard
   subscription on the cmd topics) stands for the devices and counts deliveries: the time of
   the last delivery is printed beside the last PUBACK (the service's view). It subscribes at
   QoS 0: at QoS 1 its one connection's in-flight window (100) would throttle every delivery,
   which a million devices on a million connections do not have. The event loop is uvloop, as
   under ``vpp serve`` (uvicorn picks it when installed).
2. The peer, in the same run: the same messages from bare paho-mqtt clients, one thread each,
   over the same number of connections with the same in-flight window, to the same broker and
   the same kind of subscriber. Goal: runner rate ≥ 0.8 × bare rate.
3. What bounds it: CPU of the broker (its one thread, from /proc/<pid>/stat), of this process
   (the client: one Python core), and how long publishing waited for PostgreSQL.
4. Acks: one "received" and one "started" per device (for up to 200 000 devices), pushed on the
   ack queue as ingest does, drained and applied by the runner: faster than commands go out?

    .venv/bin/python bench/fanout.py            # 1 000 000 commands
    .venv/bin/python bench/fanout.py --small    # 50 000 commands

Needs PostgreSQL (127.0.0.1:5432, user postgres; a private database is made and dropped), Redis
(127.0.0.1:6379, a private key prefix) and the mosquitto and mosquitto_sub programs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
import zlib

import numpy as np
import orjson
import psycopg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PG_ADMIN = os.environ.get("VPP_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("VPP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MAX_ACK_DEVICES = 200_000


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall time, broker CPU and this process's CPU over a stretch of the run."""

    def __init__(self, broker_pid: int) -> None:
        self.pid = broker_pid
        self.t0 = time.perf_counter()
        self.b0 = cpu_s(broker_pid)
        self.c0 = time.process_time()

    def stop(self) -> tuple[float, float, float]:
        wall = time.perf_counter() - self.t0
        return wall, (cpu_s(self.pid) - self.b0) / wall, (time.process_time() - self.c0) / wall


def subscriber(broker, n: int) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    """mosquitto_sub on every device's cmd topic (QoS 0); exits after n messages."""
    proc = subprocess.Popen(
        ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-V", "mqttv5", "-q", "0",
         "-u", broker.gateway_username, "-P", broker.gateway_password,
         "-i", f"bench-sub-{uuid.uuid4().hex[:6]}", "-t", f"{broker.topic_root}/devices/+/cmd",
         "-C", str(n)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)  # subscribed before the first publish
    return proc


def wait_delivered(proc: subprocess.Popen[bytes], t0: float, timeout_s: float) -> float | None:
    """Seconds from t0 to the subscriber's last message, or None if it never got them all."""
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    return time.perf_counter() - t0 if proc.returncode == 0 else None


def bare_paho(broker, messages: list[tuple[str, bytes]], connections: int, window: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds for plain paho clients (one thread each, ``window`` in flight each, messages
    spread by topic hash) to get every QoS-1 message PUBACKed."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    parts: list[list[tuple[str, bytes]]] = [[] for _ in range(connections)]
    for topic, payload in messages:
        parts[zlib.crc32(topic.encode()) % connections].append((topic, payload))
    clients, senders, finished = [], [], []
    for k, part in enumerate(parts):
        free = threading.Semaphore(window)
        done = threading.Event()
        count = [0, len(part)]

        def on_publish(c, u, mid, rc, props, free=free, done=done, count=count):  # type: ignore[no-untyped-def]
            count[0] += 1
            free.release()
            if count[0] >= count[1]:
                done.set()

        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{k}-{uuid.uuid4().hex[:6]}",
                        protocol=paho.MQTTv5)  # fmt: skip
        c.username_pw_set(broker.service_username, broker.service_password)
        c.max_inflight_messages_set(window)
        c.max_queued_messages_set(0)
        c.on_publish = on_publish
        up = threading.Event()
        c.on_connect = lambda *a, up=up: up.set()
        c.connect(broker.host, broker.port)
        c.loop_start()
        up.wait(10)

        def send(c=c, part=part, free=free) -> None:  # type: ignore[no-untyped-def]
            for topic, payload in part:
                free.acquire()
                c.publish(topic, payload, 1)

        clients.append(c)
        senders.append(threading.Thread(target=send))
        finished.append(done if part else None)
    t0 = time.perf_counter()
    for s in senders:
        s.start()
    for s in senders:
        s.join()
    for d in finished:
        if d is not None:
            d.wait(1800)
    dt = time.perf_counter() - t0
    for c in clients:
        c.disconnect()
        c.loop_stop()
    return dt


async def main(n: int, connections: int, peer_n: int) -> None:
    from dispatch import events as es
    from dispatch.runner.commands import STARTED, CommandBatch, new_command_id
    from dispatch.runner.loop import STORE_CHUNK, EventRunner
    from dispatch.runner.table import Running
    from dispatch.services import Services
    from dispatch.types import Horizon
    from store.migrate import upgrade
    from tests.helpers.mosquitto import run_mosquitto
    from vpp.clock import Clock
    from vpp.domain import AckStatus, CommandType, Direction, RequestStatus
    from vpp.fleet.snapshot import BATTERY
    from vpp.settings import Settings

    db = f"bench_fanout_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + "/" + db
    root = f"bench-{uuid.uuid4().hex[:6]}/v1"
    try:
        await asyncio.to_thread(upgrade, url)
        with run_mosquitto(root) as broker:
            settings = Settings(database_url=url, redis_url=REDIS, mqtt_url=broker.service_url,
                                topic_root=root, mqtt_publish_connections=connections,
                                state_prefix=f"benchfan-{uuid.uuid4().hex[:6]}",
                                # A long lease: a loaded machine must not make the bench's
                                # only runner lose the lead halfway (that is tested elsewhere).
                                leader_lease_s=600,
                                broker_credentials="none")  # type: ignore[call-arg]  # fmt: skip
            window = settings.mqtt_publish_inflight
            svc = await Services.create(settings, clock=Clock())
            runner = EventRunner(svc, owner="bench")
            await runner.leadership.start()  # the runner stores and sends only as the leader
            runner._leader = True
            runner.client = svc.mqtt_publisher(f"bench-runner-{uuid.uuid4().hex[:6]}")
            await runner.client.connect()
            now = svc.clock.now_ms()
            end = now + 2 * 3_600_000
            ids = [f"d-{i:07d}" for i in range(n)]
            setpoint = np.floor(np.random.default_rng(1).uniform(2000, 5000, n))

            sub = subscriber(broker, n)
            load0 = os.getloadavg()[0]
            meter = Meter(broker.pid)
            t0 = meter.t0
            # The plan's commands, as the assignment hands them over (one a device).
            batch = CommandBatch(
                ids=[new_command_id() for _ in range(n)],
                device_ids=ids,
                kind=np.full(n, BATTERY, np.int8),
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
            t_built = time.perf_counter()
            # What start_event does after planning: the first chunk stored (with the plan),
            # then the rest stored while the stored part goes out.
            head, rest = batch.take(0, STORE_CHUNK), batch.take(STORE_CHUNK, n)
            async with svc.db.engine.begin() as aconn:
                await runner.store.insert(aconn, runner.store.records("cr-bench", head, now))
            info = es.EventInfo("cr-bench", es.KIND_REQUEST, "t", "ERCOT-NORTH", n * 3.5 / 1000,
                                now, end, 50, False, Direction.load_reduction.value,
                                RequestStatus.active.value)  # fmt: skip
            run = Running(info, Horizon(now, 300, 24), np.ones(24),
                          runner._table("cr-bench", head), [], np.zeros(0))  # fmt: skip
            runner._register(run)
            t_head = time.perf_counter()
            await runner.fan_out(run, rest, now, None)
            stats = runner.fan_out_stats
            runner_s, broker_cpu, client_cpu = meter.stop()
            delivered_s = await asyncio.to_thread(wait_delivered, sub, t0, 120 + n / 2000)
            sent = int((run.table.status > 0).sum())

            # The peer: the same messages (topic and bytes) from bare paho clients.
            devs, bodies = run.table.device_id[:peer_n], run.table.payload[:peer_n]
            msgs = [(svc.topic(d, "cmd"), p) for d, p in zip(devs, bodies, strict=True)]
            sub = subscriber(broker, len(msgs))
            meter = Meter(broker.pid)
            bare_s = await asyncio.to_thread(bare_paho, broker, msgs, connections, window)
            _, bare_broker_cpu, bare_client_cpu = meter.stop()
            bare_delivered_s = await asyncio.to_thread(
                wait_delivered, sub, meter.t0, 120 + len(msgs) / 2000
            )

            def rate(count: int, s: float | None) -> str:
                return f"{count / s:9.0f}/s" if s else "   (not all delivered)"

            print(f"fan-out: {n} commands in {runner_s:.1f} s")
            print(f"  QoS 1, {connections} connections × {window} in flight, private Mosquitto "
                  f"(deploy config); stored in PostgreSQL before sending: {sent} sent")  # fmt: skip
            print(f"  plan → last PUBACK     {runner_s:8.2f} s = {rate(n, runner_s)}")
            d = f"{delivered_s:8.2f} s" if delivered_s else "     n/a  "
            print(f"  plan → last delivery   {d} = {rate(n, delivered_s)} (one wildcard "
                  "subscriber, mosquitto_sub, QoS 0)")  # fmt: skip
            print(f"  build commands         {t_built - t0:8.2f} s")
            print(f"  first chunk stored     {t_head - t_built:8.2f} s ({len(head)} rows, "
                  "with the plan in start_event)")  # fmt: skip
            if stats:
                print(f"  stages (overlapping): store {stats['store_s']:.2f} s, publish "
                      f"{stats['publish_s']:.2f} s, mark sent {stats['mark_s']:.2f} s; "
                      f"publishing waited {stats['wait_store_s']:.2f} s for a chunk to be "
                      f"stored and {stats['wait_mark_s']:.2f} s for marks")  # fmt: skip
            print(f"  broker CPU {broker_cpu:.0%} of one core, this process {client_cpu:.0%}")
            print(f"bare paho, {connections} connections × {window} in flight, same "
                  f"{len(msgs)} messages: {bare_s:.1f} s = {rate(len(msgs), bare_s)}, last "
                  f"delivery {rate(len(msgs), bare_delivered_s)}; broker CPU "
                  f"{bare_broker_cpu:.0%}, client {bare_client_cpu:.0%}")  # fmt: skip
            ratio = (n / runner_s) / (len(msgs) / bare_s)
            print(f"ratio runner/bare rate {ratio:.2f} (goal ≥ 0.8)")
            # CPU per command does not depend on how busy the machine is: it says what the
            # run would cost on cores of its own.
            client_us = client_cpu * runner_s / n * 1e6
            broker_us = broker_cpu * runner_s / n * 1e6
            print(f"  CPU per command: this process {client_us:.1f} µs (build, COPY, publish, "
                  f"mark), broker {broker_us:.1f} µs (PUBLISH in, PUBACK, delivery); load "
                  f"average {load0:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
                  "cores")  # fmt: skip
            waited = stats.get("wait_store_s", 0.0) + stats.get("wait_mark_s", 0.0)
            cores = os.cpu_count() or 1
            if broker_cpu > 0.85:
                bound = "the broker's thread"
            elif waited > 0.25 * runner_s:
                bound = f"PostgreSQL (publishing waited {waited:.1f} s of {runner_s:.1f} s)"
            elif client_cpu > 0.85:
                bound = "the client (this process's one Python core)"
            elif max(load0, os.getloadavg()[0]) > cores:
                bound = (f"the machine: more runnable processes than its {cores} cores, so "
                         f"this process got {client_cpu:.0%} of a core and the broker "
                         f"{broker_cpu:.0%}; on cores of their own: {client_us * n / 1e6:.0f} s "
                         f"of client CPU, {broker_us * n / 1e6:.0f} s of broker CPU")  # fmt: skip
            else:
                bound = "round trips (neither broker, client nor PostgreSQL saturated)"
            print(f"bound: {bound}")

            # Acks: one "received" and one "started" per device, through the ack queue.
            k = min(n, MAX_ACK_DEVICES)
            acks = []
            for cid, dev in zip(batch.ids[:k], ids[:k], strict=True):
                for status in (AckStatus.received, AckStatus.started):
                    acks.append(orjson.dumps({"device_id": dev, "command_id": cid,
                                              "status": status.value, "ts": now,
                                              "recv_ms": now}))  # fmt: skip
            for lo in range(0, len(acks), 20_000):
                await svc.state.push_acks(acks[lo : lo + 20_000])
            ta = time.perf_counter()
            drained = await runner.drain_acks()
            ack_s = time.perf_counter() - ta
            started = int((run.table.status == STARTED).sum())
            print(f"acks, {drained} for {k} devices (received + started each)")
            print(f"  drained and applied (memory + PostgreSQL) in {ack_s:.3f} s = "
                  f"{drained / ack_s:.0f} acks/s; devices started: {started}")  # fmt: skip
            print(f"  acks/s ÷ commands/s = {(drained / ack_s) / (n / runner_s):.2f} "
                  "(> 1: acks never fall behind the fan-out)")  # fmt: skip
            await runner.client.disconnect()
            await runner.leadership.stop()
            await svc.state.flush_prefix()  # type: ignore[attr-defined]
            await svc.close()
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="50 000 commands instead of 1 000 000")
    ap.add_argument("--commands", type=int, default=None)
    ap.add_argument(
        "--connections", type=int, default=None, help="default: VPP_MQTT_PUBLISH_CONNECTIONS"
    )
    ap.add_argument(
        "--peer-messages", type=int, default=None, help="the bare peer's share (default: all)"
    )
    a = ap.parse_args()
    from vpp.settings import Settings

    count = a.commands or (50_000 if a.small else 1_000_000)
    conns = a.connections or Settings().mqtt_publish_connections  # type: ignore[call-arg]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(count, conns, min(a.peer_messages or count, count)))
