"""Ingest throughput, through the real Mosquitto (127.0.0.1:1883) and Redis on this machine.

One fixed stream (default 200 000 valid telemetry messages for 100 000 devices, QoS 0, a third
each battery, solar, thermostat) is published by a paho publisher in its own process, three
times, to:

  (a)  a bare paho-mqtt subscriber that only counts (stock paho, same shared subscription);
  (a') the same bare subscriber on the service's buffered paho client (devices/mqtt.py), to
       show how much of (b) is the MQTT client itself;
  (b)  one IngestWorker (own process) against Redis: messages validated and reflected in the
       Redis state store per second, from the first message received to the last state write;
  (c)  two IngestWorkers in two processes on the same MQTT 5 shared subscription.

It prints the rates, b/a and c/b, and the Redis memory per device at the fleet size (Redis
``MEMORY USAGE`` of the state hashes ÷ devices stored).

The machine has 2 cores shared by the broker, the publisher and the subscribers, so (c) cannot
show two cores' worth of scaling here: it shows that splitting works and what it costs.

    .venv/bin/python bench/ingest.py            # full size
    .venv/bin/python bench/ingest.py --small    # 20 000 messages, 10 000 devices
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MQTT_URL = os.environ.get("VPP_BENCH_MQTT_URL", "mqtt://127.0.0.1:1883")
REDIS_URL = os.environ.get("VPP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
IDLE_S = 3.0  # a subscriber is done when nothing arrived for this long after the publisher ended


def _settings(cfg: dict[str, Any]):  # type: ignore[no-untyped-def]
    from vpp.settings import Settings

    return Settings(
        database_url=str(cfg["database_url"]),
        mqtt_url=MQTT_URL,
        redis_url=REDIS_URL,
        state_prefix=str(cfg["prefix"]),
        topic_root=str(cfg["topic_root"]),
        share_group=str(cfg["group"]),
        broker_credentials="none",
    )


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _wait_for_go() -> None:
    """Block until the orchestrator writes a line to stdin (the publisher has finished)."""
    sys.stdin.readline()


# --- roles (each runs in its own process) ---------------------------------------------------
def role_publish(cfg: dict[str, Any]) -> None:
    import orjson
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from vpp.clock import Clock

    n_dev, n_msg, root = int(cfg["devices"]), int(cfg["messages"]), str(cfg["topic_root"])
    now = Clock().now_ms()
    msgs: list[tuple[str, bytes]] = []
    rounds = max(1, n_msg // n_dev)
    for r in range(rounds):
        ts = now - 30_000 + r * 1000
        for i in range(n_dev):
            if len(msgs) >= n_msg:
                break
            kind = i % 3
            if kind == 0:
                body = {
                    "ts": ts,
                    "seq": r + 1,
                    "soc_pct": 50.0 + i % 40,
                    "power_w": -1500.0,
                    "backup_reserve_pct": 20,
                    "grid": "up",
                    "mode": "self_consumption",
                }
            elif kind == 1:
                body = {"ts": ts, "seq": r + 1, "power_w": 3200.0 + i % 500, "energy_wh": 1.2e7 + i}
            else:
                body = {"ts": ts, "seq": r + 1, "indoor_c": 24.5, "setpoint_c": 24.0,
                        "hvac_w": 3100.0, "mode": "cool", "outdoor_c": 35.0}  # fmt: skip
            msgs.append((f"{root}/devices/d-{i:06d}/telemetry", orjson.dumps(body)))
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}",
                    protocol=paho.MQTTv5)  # fmt: skip
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", int(MQTT_URL.rsplit(":", 1)[1]))
    c.loop_start()
    time.sleep(0.3)
    t0 = time.monotonic()
    info = None
    for topic, payload in msgs:
        info = c.publish(topic, payload, 0)
    if info is not None:
        info.wait_for_publish(60)
    t1 = time.monotonic()
    time.sleep(0.2)
    c.disconnect()
    c.loop_stop()
    _emit({"published": len(msgs), "seconds": t1 - t0, "rate": len(msgs) / (t1 - t0)})


def role_bare(cfg: dict[str, Any], buffered: bool) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from devices.mqtt import buffered_paho_class

    cls = buffered_paho_class() if buffered else paho.Client
    state = {"n": 0, "first": 0.0, "last": 0.0}
    subscribed = threading.Event()

    def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        if state["n"] == 0:
            state["first"] = now
        state["n"] += 1
        state["last"] = now
        _ = msg.topic, msg.payload  # what any consumer reads

    def on_connect(client, userdata, flags, rc, props):  # type: ignore[no-untyped-def]
        client.subscribe(f"$share/{cfg['group']}/{cfg['topic_root']}/devices/+/telemetry", qos=1)

    c = cls(CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5)  # fmt: skip
    c.on_message = on_message
    c.on_connect = on_connect
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("127.0.0.1", int(MQTT_URL.rsplit(":", 1)[1]))
    c.loop_start()
    subscribed.wait(10)
    _emit("READY")
    _wait_for_go()
    while state["n"] == 0 or time.monotonic() - float(state["last"]) < IDLE_S:
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    _emit({"count": state["n"], "first": state["first"], "last": state["last"]})


def role_worker(cfg: dict[str, Any]) -> None:
    asyncio.run(_worker(cfg))


async def _worker(cfg: dict[str, Any]) -> None:
    from devices.ingest import IngestWorker
    from dispatch.services import Services

    services = await Services.create(_settings(cfg))
    worker = IngestWorker(services)
    first = [0.0]
    orig = worker._on_message

    def on_message(topic: str, payload: bytes) -> None:
        if first[0] == 0.0:
            first[0] = time.monotonic()
        orig(topic, payload)

    worker._on_message = on_message  # type: ignore[method-assign]
    await worker.start()
    progress = {"n": 0, "at": 0.0}

    async def track() -> None:  # when the stored count last moved (20 ms resolution)
        while True:
            n = worker.accepted["telemetry"] + sum(worker.rejected.values())
            if n != progress["n"]:
                progress["n"], progress["at"] = n, time.monotonic()
            await asyncio.sleep(0.02)

    tracker = asyncio.create_task(track())
    _emit("READY")
    await asyncio.to_thread(_wait_for_go)
    go_at = time.monotonic()
    while True:
        await asyncio.sleep(0.05)
        idle = time.monotonic() - max(progress["at"], go_at)
        if idle > IDLE_S and not worker.pending and not worker._inbox:
            break
    tracker.cancel()
    stored_at = progress["at"]
    await worker.stop()
    await services.close()
    _emit(
        {
            "count": worker.accepted["telemetry"],
            "rejected": dict(worker.rejected),
            "received": worker.received,
            "first": first[0],
            "last": stored_at,
            "batches": worker.batches,
        }
    )


# --- orchestration ------------------------------------------------------------------------------
def _spawn(role: str, cfg: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--cfg", json.dumps(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )


def _read_json(proc: subprocess.Popen[str]) -> Any:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench process exited with {proc.wait()}")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue  # stray output


def run_round(role: str, n_subscribers: int, cfg: dict[str, Any]) -> dict[str, Any]:
    subs = [_spawn(role, cfg) for _ in range(n_subscribers)]
    for p in subs:
        assert _read_json(p) == "READY"
    pub = _spawn("publish", cfg)
    pub_result = _read_json(pub)
    pub.wait()
    for p in subs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [_read_json(p) for p in subs]
    for p in subs:
        p.wait()
    first = min(float(r["first"]) for r in results if r["count"])
    last = max(float(r["last"]) for r in results)
    count = sum(int(r["count"]) for r in results)
    return {
        "count": count,
        "seconds": last - first,
        "rate": count / (last - first),
        "per_process": [r["count"] for r in results],
        "publish_rate": pub_result["rate"],
        "details": results,
    }


async def _setup(cfg: dict[str, Any]) -> None:
    from store.migrate import upgrade
    from store.state.redis import RedisStateStore

    await asyncio.to_thread(upgrade, str(cfg["database_url"]))
    store = RedisStateStore(REDIS_URL, prefix=str(cfg["prefix"]))
    n = int(cfg["devices"])
    await store.registry_put({f"d-{i:06d}": i % 3 for i in range(n)})
    await store.close()


async def _reset_states(cfg: dict[str, Any]) -> None:
    """Forget stored states between rounds so every round ingests the same stream afresh."""
    from store.state.redis import RedisStateStore

    store = RedisStateStore(REDIS_URL, prefix=str(cfg["prefix"]))
    keys = [k async for k in store.redis.scan_iter(match=f"{cfg['prefix']}:st:*", count=5000)]
    for lo in range(0, len(keys), 1000):
        await store.redis.delete(*keys[lo : lo + 1000])
    await store.close()


async def _cleanup(cfg: dict[str, Any]) -> None:
    from store.state.redis import RedisStateStore

    store = RedisStateStore(REDIS_URL, prefix=str(cfg["prefix"]))
    await store.flush_prefix()
    await store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="20 000 messages for 10 000 devices")
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--messages", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None, help="rounds of (a)…(c); default 3")
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role:
        role_cfg = json.loads(args.cfg)
        if args.role == "publish":
            role_publish(role_cfg)
        elif args.role in ("bare", "bare-buffered"):
            role_bare(role_cfg, buffered=args.role == "bare-buffered")
        elif args.role == "worker":
            role_worker(role_cfg)
        return

    devices = args.devices or (10_000 if args.small else 100_000)
    messages = args.messages or (2 * devices)
    run = uuid.uuid4().hex[:8]
    tmp = tempfile.mkdtemp(prefix="vpp-bench-ingest-")
    cfg: dict[str, Any] = {
        "devices": devices,
        "messages": messages,
        "prefix": f"bench-ingest-{run}",
        "topic_root": f"bench-{run}/v1",
        "group": f"bench-{run}",
        "database_url": f"sqlite+aiosqlite:///{tmp}/bench.db",
    }
    repeat = args.repeat or (1 if args.small else 3)
    print(f"ingest bench: {messages} telemetry messages (QoS 0) for {devices} devices, {repeat}x")
    print(f"Mosquitto {MQTT_URL}, Redis {REDIS_URL}. This machine has {os.cpu_count()} cores,")
    print("shared by the broker, Redis, the publisher and the subscribers (and by whatever else")
    print("runs): (c) cannot get cores of its own, and figures vary from run to run.")
    asyncio.run(_setup(cfg))
    rounds: dict[str, list[dict[str, Any]]] = {"a": [], "a'": [], "b": [], "c": []}
    try:
        for _ in range(repeat):  # interleaved, so background load hits every mode alike
            rounds["a"].append(run_round("bare", 1, cfg))
            rounds["a'"].append(run_round("bare-buffered", 1, cfg))
            asyncio.run(_reset_states(cfg))
            rounds["b"].append(run_round("worker", 1, cfg))
            asyncio.run(_reset_states(cfg))
            rounds["c"].append(run_round("worker", 2, cfg))
            asyncio.run(_reset_states(cfg))
        mem_per_device = asyncio.run(_memory_at(cfg, devices))
    finally:
        asyncio.run(_cleanup(cfg))

    def med(mode: str) -> float:
        return float(statistics.median(float(r["rate"]) for r in rounds[mode]))

    labels = {
        "a": "(a)  bare paho subscriber (stock)",
        "a'": "(a') bare subscriber, service's paho",
        "b": "(b)  one ingest worker -> Redis",
        "c": "(c)  two workers, shared sub",
    }
    print()
    print(f"{'':38}{'median msg/s':>13}   runs (msg/s; messages received of {messages})")
    for mode, label in labels.items():
        runs = ", ".join(f"{float(r['rate']):,.0f} ({r['count']})" for r in rounds[mode])
        print(f"{label:38}{med(mode):>13,.0f}   {runs}")
    splits = [r["per_process"] for r in rounds["c"]]
    pub = statistics.median(float(r["publish_rate"]) for r in rounds["a"])
    print(f"(c) split between the two workers: {splits}; publisher: {pub:,.0f} msg/s")
    print()
    print(f"b/a  = {med('b') / med('a'):.2f}   (goal >= 0.8)")
    a_own = med("a'")
    print(f"b/a' = {med('b') / a_own:.2f}   (the worker against its own MQTT client, bare)")
    print(f"c/b  = {med('c') / med('b'):.2f}")
    print(f"Redis state memory at {devices} devices: {mem_per_device:.1f} bytes per device")
    print(
        "Note: Mosquitto keeps at most ~1000 messages queued per subscriber (max_queued_messages,"
        " QoS 0 included)\nand drops the rest when the publisher outruns it, so each rate is a"
        " saturated subscriber's\nthroughput; the counts in brackets show how much of the stream"
        " each one took."
    )


async def _memory_at(cfg: dict[str, Any], devices: int) -> float:
    """Bytes per device of the state hashes with every device stored (through ingest's write)."""
    from store.state.redis import RedisStateStore

    store = RedisStateStore(REDIS_URL, prefix=f"{cfg['prefix']}-mem")
    try:
        record = bytes(range(64))
        ids = [f"d-{i:06d}" for i in range(devices)]
        for lo in range(0, devices, 20_000):
            await store.put_states_if_newer(dict.fromkeys(ids[lo : lo + 20_000], record))
        return await store.memory_bytes() / devices
    finally:
        await store.flush_prefix()
        await store.close()


if __name__ == "__main__":
    main()
