"""Ingest throughput and end-to-end latency, on a private Mosquitto run with the deploy config,
the Redis and PostgreSQL on this machine.

One fixed stream (default 200 000 valid telemetry messages for 100 000 devices, QoS 0, a third
each battery, solar, thermostat) is published by a paho publisher in its own process to:

  (a)  a bare paho-mqtt subscriber that only counts (stock paho, same shared subscription);
  (a') the same bare subscriber on the service's buffered paho client (devices/mqtt.py), to
       show how much of (b) is the MQTT client itself;
  (b0) one IngestWorker (own process) without the interval history: a message counts once it
       is in the Redis state store (not durable), to show what (b) pays for durability;
  (b)  one IngestWorker: messages validated, written to the Redis state store and written
       through to PostgreSQL's interval history; a message counts when it is *accepted*, i.e.
       once the history write holding it has committed (durable);
  (c)  two IngestWorkers in two processes on the same MQTT 5 shared subscription.

The broker is private (tests/helpers/mosquitto.py ``run_mosquitto``: the deploy config's
security, limits and persistence, on a free port) with its per-client queue raised above the
stream's length, so nothing is dropped: every variant's count must equal the messages published,
and the bench says so for each run. The database is a fresh one on PostgreSQL that the bench
creates and drops; the history table is emptied between rounds so every round inserts alike.

Each variant runs ``--runs`` times (default 3), interleaved so background load hits all alike.
It prints per variant the rate (messages / s from the first received to the last counted) as
min / median / max, the end-to-end latency of every message (the publisher puts its send time in
the payload; the end is the receive for (a), the durable acceptance for (b) and (c)) as p50 and
p99, the spread of b/a and c/b over the runs, and the Redis memory per device. Published as
fast as possible the stream outruns every subscriber, so rates are saturated throughputs and the
latency is mostly the backlog queued in the broker; ``--rate`` paces the publisher below that to
see the pipeline's own latency (for (b), half a write-through period plus one write).

The machine has 2 cores shared by the broker, the publisher, the subscribers, Redis and
PostgreSQL, so (c) cannot show two cores' worth of scaling here: it shows that splitting works
and what it costs.

    .venv/bin/python bench/ingest.py            # full size
    .venv/bin/python bench/ingest.py --small    # 100 000 messages, 10 000 devices

``--small`` keeps the stream long (ten readings per device, several seconds per variant) and
only the fleet small: a 2-second burst of 20 000 messages read b/a around 0.5, because what it
timed was mostly the last write-through (up to one period plus one write after the last
message), not the worker's rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REDIS_URL = os.environ.get("VPP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_DSN = os.environ.get("VPP_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
IDLE_S = 3.0  # a subscriber is done when nothing arrived for this long after the publisher ended
SENT_AT = slice(11, 27)  # the publisher's send time (µs since the epoch) in every payload
TENANT = "bench-ingest"


def _settings(cfg: dict[str, Any]):  # type: ignore[no-untyped-def]
    from vpp.settings import Settings

    return Settings(
        database_url=str(cfg["database_url"]),
        mqtt_url=str(cfg["service_url"]),
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


def _latencies_ms(sent_us: list[bytes], done_s: list[float]) -> list[float]:
    return [(d * 1e6 - int(s)) / 1000.0 for s, d in zip(sent_us, done_s, strict=True)]


def _mqtt_client(cls: Any, prefix: str, cfg: dict[str, Any], user: str) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = cls(CallbackAPIVersion.VERSION2, client_id=f"{prefix}-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5)  # fmt: skip
    c.username_pw_set(cfg[f"{user}_user"], cfg[f"{user}_password"])
    return c


# --- roles (each runs in its own process) ---------------------------------------------------
def role_publish(cfg: dict[str, Any]) -> None:
    import orjson
    import paho.mqtt.client as paho

    from vpp.clock import Clock

    n_dev, n_msg, root = int(cfg["devices"]), int(cfg["messages"]), str(cfg["topic_root"])
    now = Clock().now_ms()
    bodies: list[tuple[str, dict[str, Any]]] = []
    rounds = max(1, n_msg // n_dev)
    for r in range(rounds):
        ts = now - 30_000 + r * 1000
        for i in range(n_dev):
            if len(bodies) >= n_msg:
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
            bodies.append((f"{root}/devices/d-{i:06d}/telemetry", body))
    c = _mqtt_client(paho.Client, "bench-pub", cfg, "gateway")
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", int(cfg["port"]))
    c.loop_start()
    time.sleep(0.3)
    dumps = orjson.dumps
    rate = float(cfg.get("rate") or 0)
    t0 = time.monotonic()
    info = None
    for k, (topic, body) in enumerate(bodies):
        if rate and k % 100 == 0:  # paced: hold the schedule, 100 messages at a time
            ahead = t0 + k / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        # The send time goes first, at a fixed offset (SENT_AT): `{"sent_us":1234567890123456,`
        # (the validator ignores fields it does not know).
        payload = dumps({"sent_us": time.time_ns() // 1000, **body})
        info = c.publish(topic, payload, 0)
    if info is not None:
        info.wait_for_publish(120)
    t1 = time.monotonic()
    time.sleep(0.2)
    c.disconnect()
    c.loop_stop()
    _emit({"published": len(bodies), "seconds": t1 - t0, "rate": len(bodies) / (t1 - t0)})


def role_bare(cfg: dict[str, Any], buffered: bool) -> None:
    import paho.mqtt.client as paho

    from devices.mqtt import buffered_paho_class

    cls = buffered_paho_class() if buffered else paho.Client
    sent: list[bytes] = []
    done: list[float] = []
    subscribed = threading.Event()

    def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
        done.append(time.time())
        sent.append(msg.payload[SENT_AT])
        _ = msg.topic  # what any consumer reads

    def on_connect(client, userdata, flags, rc, props):  # type: ignore[no-untyped-def]
        client.subscribe(f"$share/{cfg['group']}/{cfg['topic_root']}/devices/+/telemetry", qos=1)

    c = _mqtt_client(cls, "bench-bare", cfg, "service")
    c.on_message = on_message
    c.on_connect = on_connect
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("127.0.0.1", int(cfg["port"]))
    c.loop_start()
    subscribed.wait(10)
    _emit("READY")
    _wait_for_go()
    last_n, last_at = -1, time.monotonic()
    while not done or time.monotonic() - last_at < IDLE_S:
        if len(done) != last_n:
            last_n, last_at = len(done), time.monotonic()
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    lat = _latencies_ms(sent, done)
    _emit({"count": len(done), "first": done[0], "last": done[-1], "latency_ms": lat})


def role_worker(cfg: dict[str, Any], durable: bool) -> None:
    asyncio.run(_worker(cfg, durable))


async def _worker(cfg: dict[str, Any], durable: bool) -> None:
    from devices.ingest import IngestWorker
    from dispatch.services import Services

    services = await Services.create(_settings(cfg))
    worker = IngestWorker(services, write_history=durable)
    arrived: list[float] = []
    sent: list[bytes] = []
    orig = worker._on_message

    def on_message(topic: str, payload: bytes) -> None:
        arrived.append(time.time())
        sent.append(payload[SENT_AT])
        orig(topic, payload)

    worker._on_message = on_message  # type: ignore[method-assign]
    await worker.start()
    # The k-th message received is accepted when `accepted` first exceeds k: the inbox is FIFO,
    # batches go to the history in order and each write-through takes everything held, so the
    # readings a commit makes durable are always the next ones in arrival order.
    accepted_at: list[float] = []

    async def track() -> None:
        while True:
            n = worker.accepted["telemetry"] + sum(worker.rejected.values())
            if n > len(accepted_at):
                accepted_at.extend([time.time()] * (n - len(accepted_at)))
            await asyncio.sleep(0.005)

    tracker = asyncio.create_task(track())
    _emit("READY")
    await asyncio.to_thread(_wait_for_go)
    go_at = time.time()
    while True:
        await asyncio.sleep(0.05)
        idle = time.time() - max(accepted_at[-1] if accepted_at else 0.0, go_at)
        busy = worker.pending or worker.pending_history or worker._inbox
        if idle > IDLE_S and not busy:
            break
    tracker.cancel()
    await worker.stop()
    await services.close()
    n = len(accepted_at)
    _emit(
        {
            "count": worker.accepted["telemetry"],
            "rejected": dict(worker.rejected),
            "history_dropped": worker.history_dropped,
            "received": worker.received,
            "first": arrived[0] if arrived else 0.0,
            "last": accepted_at[-1] if accepted_at else 0.0,
            "batches": worker.batches,
            "latency_ms": _latencies_ms(sent[:n], accepted_at),
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
    latency = sorted(x for r in results for x in r.pop("latency_ms"))
    return {
        "count": count,
        "published": int(pub_result["published"]),
        "seconds": last - first,
        "rate": count / (last - first),
        "per_process": [r["count"] for r in results],
        "publish_rate": pub_result["rate"],
        "p50_ms": _quantile(latency, 0.50),
        "p99_ms": _quantile(latency, 0.99),
        "details": results,
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _admin_sql(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql)


def _db_url(name: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


async def _setup(cfg: dict[str, Any]) -> None:
    """A fresh database, migrated, and the fleet onboarded as an operator would (rows in the
    database, the registry in Redis)."""
    from devices.onboarding import BatterySpec, SolarSpec, ThermostatSpec, onboard
    from dispatch.services import Services
    from store.keys import create_api_key
    from store.migrate import upgrade
    from tests.helpers.devices import battery, solar, thermostat

    _admin_sql(f'CREATE DATABASE "{cfg["db_name"]}"')
    await asyncio.to_thread(upgrade, str(cfg["database_url"]))
    services = await Services.create(_settings({**cfg, "service_url": "memory://"}))
    try:
        await create_api_key(services.db, TENANT, "fleet", services.clock.now_ms())
        makers = ((BatterySpec, battery), (SolarSpec, solar), (ThermostatSpec, thermostat))
        n = int(cfg["devices"])
        for lo in range(0, n, 10_000):
            specs = []
            for i in range(lo, min(n, lo + 10_000)):
                spec, body = makers[i % 3]
                specs.append(spec(**body(f"d-{i:06d}")))
            await onboard(services, specs, tenant_id=TENANT)
    finally:
        await services.close()


def _reset(cfg: dict[str, Any]) -> None:
    """Forget stored states and history between rounds so every round ingests the same stream
    afresh (no out-of-order refusals, inserts rather than merges)."""
    asyncio.run(_reset_states(cfg))
    import psycopg

    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + str(cfg["db_name"])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE telemetry_intervals")


async def _reset_states(cfg: dict[str, Any]) -> None:
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


def _spread(values: list[float], fmt: str = ",.0f") -> str:
    return (
        f"{min(values):{fmt}} / {statistics.median(values):{fmt}} / {max(values):{fmt}}"
        if values
        else "-"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--small",
        action="store_true",
        help="10 000 devices, 10 readings each (a stream long enough that the last\n"
        "write-through does not dominate the rate)",
    )
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--messages", type=int, default=None)
    ap.add_argument("--runs", type=int, default=3, help="rounds of (a)…(c); default 3")
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="publish at this many msg/s (default: as fast as possible, which measures the\n"
        "saturated rate; below saturation the latency is the pipeline's, not the backlog's)",
    )
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role:
        role_cfg = json.loads(args.cfg)
        if args.role == "publish":
            role_publish(role_cfg)
        elif args.role in ("bare", "bare-buffered"):
            role_bare(role_cfg, buffered=args.role == "bare-buffered")
        elif args.role in ("worker", "worker-volatile"):
            role_worker(role_cfg, durable=args.role == "worker")
        return

    from tests.helpers.mosquitto import run_mosquitto

    devices = args.devices or (10_000 if args.small else 100_000)
    messages = args.messages or ((10 if args.small else 2) * devices)
    run = uuid.uuid4().hex[:8]
    topic_root = f"bench-{run}/v1"
    # The deploy config, with the per-client queue above the whole stream: a subscriber that
    # falls behind gets everything late instead of losing it.
    limits = f"max_queued_messages {messages + 10_000}\nmax_queued_bytes 0"
    with run_mosquitto(topic_root, extra_config=limits) as broker:
        cfg: dict[str, Any] = {
            "devices": devices,
            "messages": messages,
            "prefix": f"bench-ingest-{run}",
            "topic_root": topic_root,
            "group": f"bench-{run}",
            "db_name": f"vpp_bench_ingest_{run}",
            "database_url": _db_url(f"vpp_bench_ingest_{run}"),
            "port": broker.port,
            "service_url": broker.service_url,
            "service_user": broker.service_username,
            "service_password": broker.service_password,
            "gateway_user": broker.gateway_username,
            "gateway_password": broker.gateway_password,
            "rate": args.rate,
        }
        pace = f"paced at {args.rate:,.0f} msg/s" if args.rate else "as fast as possible"
        print(f"ingest bench: {messages} telemetry messages (QoS 0, {pace}) for {devices} "
              f"devices, {args.runs} runs")  # fmt: skip
        print(f"private Mosquitto 127.0.0.1:{broker.port} (deploy config, {limits!r}),")
        print(f"Redis {REDIS_URL}, PostgreSQL database {cfg['db_name']} (made for the bench).")
        print(f"This machine has {os.cpu_count()} cores, shared by all of them and the bench.")
        rounds: dict[str, list[dict[str, Any]]] = {"a": [], "a'": [], "b0": [], "b": [], "c": []}
        try:
            asyncio.run(_setup(cfg))
            for _ in range(args.runs):  # interleaved, so background load hits every mode alike
                rounds["a"].append(run_round("bare", 1, cfg))
                rounds["a'"].append(run_round("bare-buffered", 1, cfg))
                _reset(cfg)
                rounds["b0"].append(run_round("worker-volatile", 1, cfg))
                _reset(cfg)
                rounds["b"].append(run_round("worker", 1, cfg))
                _reset(cfg)
                rounds["c"].append(run_round("worker", 2, cfg))
                _reset(cfg)
            mem_per_device = asyncio.run(_memory_at(cfg, devices))
        finally:
            asyncio.run(_cleanup(cfg))
            _admin_sql(f'DROP DATABASE IF EXISTS "{cfg["db_name"]}" WITH (FORCE)')
    _report(rounds, messages, devices, mem_per_device)


def _report(
    rounds: dict[str, list[dict[str, Any]]], messages: int, devices: int, mem_per_device: float
) -> None:
    labels = {
        "a": "(a)  bare paho subscriber (stock)",
        "a'": "(a') bare subscriber, service's paho",
        "b0": "(b0) one worker, state store only",
        "b": "(b)  one ingest worker, durable",
        "c": "(c)  two workers, shared sub",
    }
    print()
    print(f"{'':38}{'msg/s min / median / max':>28}  {'p50 ms':>7}  {'p99 ms':>7}  received")
    lost = False
    for mode, label in labels.items():
        rs = rounds[mode]
        counts = [int(r["count"]) for r in rs]
        lost |= any(c != int(r["published"]) for c, r in zip(counts, rs, strict=True))
        p50 = statistics.median(float(r["p50_ms"]) for r in rs)
        p99 = statistics.median(float(r["p99_ms"]) for r in rs)
        print(
            f"{label:38}{_spread([float(r['rate']) for r in rs]):>28}  {p50:>7,.0f}  {p99:>7,.0f}"
            f"  {', '.join(str(c) for c in counts)} of {messages}"
        )
    print("(latency: median over the runs of each run's p50 / p99, publish -> received for (a),")
    print(" publish -> accepted, i.e. committed to the interval history, for (b) and (c))")
    splits = [r["per_process"] for r in rounds["c"]]
    pub = statistics.median(float(r["publish_rate"]) for r in rounds["a"])
    print(f"(c) split between the two workers: {splits}; publisher: {pub:,.0f} msg/s")

    def per_run(num: str, den: str) -> list[float]:
        pairs = zip(rounds[num], rounds[den], strict=True)
        return [float(n["rate"]) / float(d["rate"]) for n, d in pairs]

    ratios = {
        "b/a ": per_run("b", "a"),
        "b/a'": per_run("b", "a'"),
        "c/b ": per_run("c", "b"),
        "b/b0": per_run("b", "b0"),
    }
    print()
    print("ratio per run, min / median / max:")
    goals = {
        "b/a ": "   (goal >= 0.8)",
        "b/a'": "   (the worker against its own client, bare)",
        "b/b0": "   (the cost of durable acceptance)",
    }
    for name, values in ratios.items():
        print(f"  {name} = {_spread(values, '.2f')}{goals.get(name, '')}")
    print(f"Redis state memory at {devices} devices: {mem_per_device:.1f} bytes per device")
    if lost:
        print("WARNING: a variant received fewer messages than were published (see 'received')")
    else:
        print("every variant received every message published, in every run")


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
