"""Soak: the service run as two replicas for hours of service time while its dependencies fail.

Six hours of service time at ×60 (six wall minutes) with 10 000 simulated devices: a capacity
request quoted and committed every 20 minutes, a grid event every hour, and faults on a
schedule, one after another (each starts once the one before has recovered), in rounds of:

- ``leader-kill``: ``kill -9`` of the replica that leads the runner, restarted a few seconds
  later (the leader as /readyz or /metrics names it; replica 1 while neither does);
- ``broker-restart``: the private Mosquitto killed and started again on the same port;
- ``postgres-restart``: the private PostgreSQL stopped with ``-m immediate``, then started;
- ``malformed-flood``: bad JSON, not an object, missing fields, wrong types, out-of-range
  values, out-of-order readings, unknown devices and oversize payloads on the telemetry topics;
- ``redis-loss``: the private Redis killed and started empty (``FLUSHALL`` in every second
  round). Last in a round: while nothing rebuilds the state store, ingest refuses every
  reading after it, and the faults after it would measure little.

Everything runs on private servers on free ports (tests/helpers/servers.py, tests/helpers/
mosquitto.py with the deploy config); the shared servers are never touched. The service is two
``vpp serve`` subprocesses with nothing but ``--port`` different (and, for both, a clock-skew
allowance of ten wall seconds: at ×60 the default minute is one wall second of ingest lag, past
which a reading is filed under its arrival time instead of its ts). The fleet is the project's
simulator (sim/simulator.py) in a subprocess of its own, speaking MQTT through the
``vpp-gateway`` login; it records what it published per 5-minute slot and what the devices
truly delivered (its counterfactual twin), and hands both back at the end.

The harness reads only the public surface: the HTTP API (/v1, /readyz, /metrics), and the
database tables as ground truth (telemetry_intervals, commands). It prints, per window (the
baseline before the first fault, then each fault until the next one starts; a slot or a
settlement interval belongs to the window it ends in):

- readings lost (goal 0): published by the fleet − refused by the service (its
  ``vpp_ingest_rejected_total`` counters) − samples in telemetry_intervals;
- 5xx answers (goal 0) of a poller reading six endpoints every second on every live replica,
  as admin and as the buyer, and of the harness's own quotes, commits and grid events; a 503
  that names the dependency that is down and carries ``Retry-After`` (the answer issue 11 allows
  while one is down) is counted apart, as "503 named";
- conflicting commands (goal 0): devices holding two live commands with different
  instructions for one interval (commands table); and, as a sign of two runners, devices
  commanded twice with the same instruction;
- settlement intervals missing, or settled at 0 while the devices truly delivered (goal 0);

then delivery per request (the service's measured MW against the devices' true MW and the
committed MW) and the RSS of each replica at the start and the end. A missed goal is a figure,
not a failure: the exit status is non-zero only when the harness itself fails. The logs of the
replicas and the fleet, slots.csv (published and stored per slot) and conflicts.csv (the
conflicting command pairs) stay in the work directory it prints.

    .venv/bin/python bench/soak.py            # 10 000 devices, 6 h at ×60, every fault twice
    .venv/bin/python bench/soak.py --small    # 1 000 devices, 1 h at ×60, every fault once

Needs redis-server, PostgreSQL's server binaries (initdb, pg_ctl) and Mosquitto with the
dynamic-security plugin installed (not running: the soak starts its own).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REGION = "ERCOT-NORTH"
SLOT_MS = 300_000  # the service's history and settlement interval (5 minutes)
# Redis last in a round: while the state store is not rebuilt from the database, ingest refuses
# every reading after its loss, and a fault after it would measure nothing.
FAULTS = ("leader-kill", "broker-restart", "postgres-restart", "malformed-flood", "redis-loss")
# Delivering, for "settled at 0 while delivering": the devices' true output above 5 kW.
DELIVERING_MW = 0.005
# Command statuses during which a command holds on the device (or may: a missed ack may be an
# ack lost, not a command); the others were ended by the device, the customer or the runner.
LIVE_STATUSES = ("pending", "sent", "received", "started", "completed", "missed")
FINISHED = ("completed", "aborted", "cancelled", "expired", "rejected")
FLOOD_KINDS = ("malformed", "oversized", "out_of_order", "unknown_device")


@dataclass(frozen=True)
class Profile:
    devices: int
    hours: float
    scale: float
    rounds: int  # each fault this many times
    outage_s: float  # wall seconds a killed replica, Redis or the broker stays down
    postgres_down_s: float  # wall seconds PostgreSQL stays down
    flood: int  # bad messages of each kind in a flood


FULL = Profile(devices=10_000, hours=6.0, scale=60.0, rounds=2, outage_s=4.0,
               postgres_down_s=20.0, flood=2_000)  # fmt: skip
SMALL = Profile(devices=1_000, hours=1.0, scale=60.0, rounds=1, outage_s=3.0,
                postgres_down_s=8.0, flood=400)  # fmt: skip


# =============================================================================================
# The fleet worker: the project's simulator in its own process
# =============================================================================================
def fleet_worker(config_path: str) -> None:
    """Run the simulated fleet until ``stop`` on stdin; then write what it published and what
    the devices delivered to ``config["out"]``. ``flood N`` on stdin injects N bad messages of
    each kind."""
    import numpy as np

    from sim.simulator import FleetSimulator
    from vpp.settings import get_settings

    cfg = json.loads(Path(config_path).read_text())
    settings = get_settings()
    sim = FleetSimulator(
        settings,
        cfg["devices"],
        [REGION],
        api_url=cfg["api_url"],
        api_key=cfg["api_key"],
        seed=cfg["seed"],
        mqtt_url=cfg["mqtt_url"],
        gateway_username=cfg["gateway_username"],
        gateway_password=cfg["gateway_password"],
        gateways=2,
        id_prefix="soak",
    )
    # Readings published per 5-minute slot of their ts: while every gateway connection was up
    # (they reached the broker) or while one was down (paho drops QoS 0 without a connection).
    published: dict[int, int] = defaultdict(int)
    offline: dict[int, int] = defaultdict(int)
    original = sim.fleet.telemetry_payloads

    def recording(now_ms: int, mask: Any = None, *, advance: bool = True) -> Any:
        idx, payloads = original(now_ms, mask, advance=advance)
        if advance and mask is None and payloads:
            up = all(c.connected for c in sim._clients)
            (published if up else offline)[now_ms // SLOT_MS * SLOT_MS] += len(payloads)
        return idx, payloads

    sim.fleet.telemetry_payloads = recording  # type: ignore[method-assign]
    flooded: dict[str, int] = defaultdict(int)

    async def flood(n: int) -> None:
        for name in ("malformed", "oversized", "out_of_order"):
            flooded[name] += await sim.inject(name, n)
        # Telemetry of devices the service never registered, on the gateway's connection.
        now = sim.clock.now_ms()
        body = json.dumps({"ts": now, "soc_pct": 50.0, "power_w": 100.0}).encode()
        root = sim.topic_root
        ghosts = [(f"{root}/devices/ghost-{k}/telemetry", body, 0, False) for k in range(n)]
        flooded["unknown_device"] += await sim._publish(ghosts, list(range(n)))

    async def go() -> None:
        await sim.onboard()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(sim.run(stop))
        while not sim._clients or not all(c.connected for c in sim._clients):
            await asyncio.sleep(0.05)
        print("ready", flush=True)

        def read_stdin() -> None:
            for line in sys.stdin:
                words = line.split()
                if words[:1] == ["flood"]:
                    asyncio.run_coroutine_threadsafe(flood(int(words[1])), loop)
                elif words[:1] == ["stop"]:
                    break
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=read_stdin, daemon=True).start()
        await task

    asyncio.run(go())
    truth = sim.ground_truth()
    Path(cfg["out"]).write_text(
        json.dumps(
            {
                "published": {str(k): v for k, v in published.items()},
                "offline": {str(k): v for k, v in offline.items()},
                "flooded": dict(flooded),
                "delivered_mw": {
                    ev: {str(t): mw for t, mw in series.items()}
                    for ev, series in truth.delivered_mw.items()
                },
                "batteries_below_reserve": truth.batteries_below_reserve,
                "still_under_command": len(truth.under_command),
                "summary": sim.summary(),
                "device_ids": truth.device_ids[: min(50, len(truth.device_ids))],
                "n_alive": int(np.sum(sim.fleet.alive)),
            }
        )
    )
    print("done", flush=True)


# =============================================================================================
# The harness
# =============================================================================================
@dataclass
class Replica:
    """One ``vpp serve`` process slot; ``proc`` is its current incarnation."""

    name: str
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    incarnation: int = 0
    rss_start_kib: int | None = None
    rss_warm_kib: int | None = None  # at the first fault, before any restart
    rss_end_kib: int | None = None
    first_pid: int | None = None
    last_pid: int | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "serve", "--port", str(self.port)],
                env=self.env, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.incarnation += 1
        self.first_pid = self.first_pid or self.proc.pid
        self.last_pid = self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int | None:
        if not self.alive():
            return None
        assert self.proc is not None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None


@dataclass
class Window:
    """A stretch of service time, slot-aligned: the baseline before the first fault, or one
    fault and what follows it until the next."""

    name: str
    start_ms: int
    end_ms: int
    detail: str = ""

    def holds(self, t_ms: int) -> bool:
        return self.start_ms <= t_ms < self.end_ms


@dataclass
class Run:
    profile: Profile
    clock: Any
    replicas: list[Replica]
    admin_key: str
    buyer_key: str
    db_dsn: str
    answers: list[tuple[int, str, str, int]] = field(
        default_factory=list
    )  # t, replica, path, status
    refused: int = 0  # no connection (a replica down, or not listening yet)
    timed_out: int = 0  # no answer within the client's timeout
    scrapes: list[tuple[int, str, int, float, dict[str, float]]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)  # committed requests, grid events
    faults: list[tuple[str, int, str]] = field(default_factory=list)  # name, service ms, detail
    leader_method: str = "none"
    device_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_ACCEPTED = re.compile(r'^vpp_ingest_messages_total\{topic_kind="telemetry"\}\s+([0-9.e+]+)', re.M)
_REJECTED = re.compile(r'^vpp_ingest_rejected_total\{reason="([^"]+)"\}\s+([0-9.e+]+)', re.M)


def now_ms(run: Run) -> int:
    return int(run.clock.now_ms())


async def call(
    run: Run, client: Any, method: str, path: str, key: str, *, json_body: Any = None,
    record: bool = True,
) -> Any:  # fmt: skip
    """One API call on the first replica that answers; every answer's status is recorded."""
    import httpx

    for rep in run.replicas:
        if not rep.alive():
            continue
        try:
            resp = await client.request(
                method, rep.url + path, json=json_body,
                headers={"Authorization": f"Bearer {key}"}, timeout=30.0,
            )  # fmt: skip
        except httpx.TimeoutException:
            run.timed_out += 1
            continue
        except httpx.HTTPError:
            run.refused += 1
            continue
        if record:
            run.answers.append((now_ms(run), rep.name, f"{method} {path.split('?')[0]}",
                                answer_status(resp)))  # fmt: skip
        return resp
    return None


OUTAGE_503 = 1503  # recorded for a 503 that names its dependency and says when to retry


def answer_status(resp: Any) -> int:
    """The answer's status; a ``503`` with ``Retry-After`` and a JSON ``detail`` naming one of
    the service's dependencies (what issue 11 allows while one is down) as ``OUTAGE_503``, so
    that only the other 5xx count against the goal."""
    if resp.status_code != 503 or "retry-after" not in resp.headers:
        return int(resp.status_code)
    try:
        detail = str(resp.json().get("detail", ""))
    except ValueError:
        return 503
    named = any(dep in detail for dep in ("database", "state_store", "state store", "broker"))
    return OUTAGE_503 if named else 503


async def call_retrying(
    run: Run, client: Any, method: str, path: str, key: str, body: Any = None, tries: int = 12
) -> Any:
    """``call``, again after a second while no replica answers or one answers 5xx, as an
    operator's script would (``body`` may be a function of nothing: made anew each try, so a
    window start stays ahead of the clock). Every answer is recorded."""
    resp = None
    for k in range(tries):
        payload = body() if callable(body) else body
        resp = await call(run, client, method, path, key, json_body=payload)
        if resp is not None and resp.status_code < 500:
            return resp
        if k + 1 < tries:
            await asyncio.sleep(1.0)
    return resp


async def poller(run: Run, stop: asyncio.Event) -> None:
    """A handful of endpoints every second on every live replica, as admin and as the buyer."""
    import httpx

    probes = [
        ("/v1/fleet", "admin"),
        ("/v1/devices/{device}", "admin"),
        ("/v1/devices?limit=20", "admin"),
        ("/v1/capacity-requests", "buyer"),
        ("/v1/events", "admin"),
        ("/v1/forecast?region={region}&start={start}&end={end}&step=PT15M", "buyer"),
    ]
    k = 0
    async with httpx.AsyncClient(timeout=5.0) as client:
        while not stop.is_set():
            t = now_ms(run)
            for rep in run.replicas:
                if not rep.alive():
                    continue
                for path, who in probes:
                    dev = run.device_ids[k % len(run.device_ids)] if run.device_ids else "x"
                    k += 1
                    url = path.format(device=dev, region=REGION, start=_iso(t),
                                      end=_iso(t + 6 * 3_600_000))  # fmt: skip
                    key = run.admin_key if who == "admin" else run.buyer_key
                    try:
                        resp = await client.get(
                            rep.url + url, headers={"Authorization": f"Bearer {key}"}
                        )
                    except httpx.TimeoutException:
                        run.timed_out += 1
                        continue
                    except httpx.HTTPError:
                        run.refused += 1
                        continue
                    run.answers.append((now_ms(run), rep.name, "GET " + path.split("?")[0],
                                        answer_status(resp)))  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def scraper(run: Run, stop: asyncio.Event) -> None:
    """Every replica's /metrics twice a second: accepted and rejected telemetry counters."""
    import httpx

    async with httpx.AsyncClient(timeout=3.0) as client:
        while not stop.is_set():
            for rep in run.replicas:
                if not rep.alive():
                    continue
                try:
                    text = (await client.get(rep.url + "/metrics")).text
                except httpx.HTTPError:
                    continue
                m = _ACCEPTED.search(text)
                rejected = {r: float(v) for r, v in _REJECTED.findall(text)}
                run.scrapes.append((now_ms(run), rep.name, rep.incarnation,
                                    float(m.group(1)) if m else 0.0, rejected))  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


def lead_ms(run: Run, service_ms: int, wall_s: float) -> int:
    """How far ahead a window starts: ``service_ms``, plus ``wall_s`` wall seconds for the
    answer to come back (a quote on a loaded machine takes seconds: minutes at ×60)."""
    return service_ms + int(wall_s * run.profile.scale * 1000)


def next_slot(t_ms: int) -> int:
    """The first slot start at or after ``t_ms``."""
    return -(-t_ms // SLOT_MS) * SLOT_MS


def _iso(t_ms: int) -> str:
    from vpp.timefmt import to_rfc3339

    return to_rfc3339(int(t_ms))


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


async def find_leader(run: Run, client: Any) -> Replica:
    """The replica that leads the runner, as /readyz names it (``replica.leader``); replica 1
    when no live replica says it leads (none does while the lease is being taken over)."""
    import httpx

    for rep in run.replicas:
        if not rep.alive():
            continue
        try:
            body = (await client.get(rep.url + "/readyz")).json()
        except (httpx.HTTPError, ValueError):
            continue
        replica = body.get("replica") if isinstance(body, dict) else None
        if isinstance(replica, dict) and replica.get("leader") is True:
            run.leader_method = "/readyz replica.leader"
            return rep
    run.leader_method = "assumed: no replica said it leads"
    return run.replicas[0]


async def wait_healthy(rep: Replica, client: Any, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not rep.alive():
            raise RuntimeError(f"{rep.name} exited at start; see {rep.log}")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(rep.url + "/healthz", timeout=2.0)).status_code == 200:
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{rep.name} did not answer /healthz in {timeout_s:.0f} s; see {rep.log}")


# ---- the schedule ---------------------------------------------------------------------------
async def place_request(run: Run, client: Any, t: int, duration_min: float = 30.0) -> None:
    """Quote a share of what the fleet offers now for a window starting a quarter of an hour on
    at ×60 (on a settlement interval, as the truth is kept); commit what was quoted."""
    fleet = await call(run, client, "GET", "/v1/fleet", run.admin_key)
    avail = 0.0
    if fleet is not None and fleet.status_code == 200:
        avail = float(fleet.json().get("totals", {}).get("available_mw", 0.0))
    mw = round(max(avail * 0.15, 0.05), 3)
    window: dict[str, int] = {}

    def body() -> dict[str, Any]:
        window["start"] = start = next_slot(now_ms(run) + lead_ms(run, 5 * 60_000, 10.0))
        return {"region": REGION, "mw": mw, "start": _iso(start),
                "end": _iso(start + int(duration_min * 60_000)), "firmness": 0.9}  # fmt: skip

    q = await call_retrying(run, client, "POST", "/v1/capacity-requests", run.buyer_key, body)
    if q is None or q.status_code != 201 or q.json().get("status") != "quoted":
        detail = "no answer" if q is None else f"{q.status_code} {q.text[:120]}"
        run.notes.append(f"request at {_iso(t)} not quoted: {detail}")
        return
    rid = q.json()["id"]
    c = await call_retrying(run, client, "POST", f"/v1/capacity-requests/{rid}/commit",
                            run.buyer_key)  # fmt: skip
    if c is None or c.status_code != 200:
        detail = "no answer" if c is None else f"{c.status_code} {c.text[:120]}"
        run.notes.append(f"request {rid} not committed: {detail}")
        return
    start = window["start"]
    end = start + int(duration_min * 60_000)
    run.requests.append({"id": rid, "kind": "request", "mw": float(q.json()["quoted_mw"]),
                         "start_ms": start, "end_ms": end})  # fmt: skip


async def place_grid_event(run: Run, client: Any, t: int, duration_min: float = 20.0) -> None:
    fleet = await call(run, client, "GET", "/v1/fleet", run.admin_key)
    avail = 0.0
    if fleet is not None and fleet.status_code == 200:
        avail = float(fleet.json().get("totals", {}).get("available_mw", 0.0))
    mw = round(max(avail * 0.10, 0.05), 3)
    window: dict[str, int] = {}

    def body() -> dict[str, Any]:
        window["start"] = start = next_slot(now_ms(run) + lead_ms(run, 60_000, 2.0))
        window["end"] = end = start + int(duration_min * 60_000)
        return {"region": REGION, "mw": mw, "start": _iso(start), "end": _iso(end)}

    r = await call_retrying(run, client, "POST", "/v1/grid-events", run.admin_key, body)
    if r is None or r.status_code not in (200, 201):
        detail = "no answer" if r is None else f"{r.status_code} {r.text[:120]}"
        run.notes.append(f"grid event at {_iso(t)} not created: {detail}")
        return
    run.requests.append({"id": r.json()["id"], "kind": "grid event", "mw": mw,
                         "start_ms": window["start"], "end_ms": window["end"]})  # fmt: skip


class Servers:
    """The private Redis, PostgreSQL and Mosquitto, with the faults they can suffer."""

    def __init__(self, redis: Any, pg: Any, broker: Any) -> None:
        self.redis, self.pg, self.broker = redis, pg, broker
        self.broker_proc: subprocess.Popen[bytes] | None = None

    def flush_redis(self) -> None:
        import redis

        redis.Redis(host="127.0.0.1", port=self.redis.port).flushall()

    def kill_broker(self) -> None:
        from tests.helpers.servers import _wait_port

        pid = self.broker_proc.pid if self.broker_proc is not None else self.broker.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if self.broker_proc is not None:
            self.broker_proc.wait(10)
        # (The helper's own process stays a zombie until its context exits: it holds no port.)
        _wait_port(self.broker.port, up=False)

    def start_broker(self) -> None:
        from tests.helpers.mosquitto import _wait_listening

        conf = self.broker.workdir / "mosquitto.conf"
        self.broker_proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if not _wait_listening("127.0.0.1", self.broker.port, self.broker_proc, 20.0):
            raise RuntimeError("mosquitto did not restart on its port")

    def close(self) -> None:
        if self.broker_proc is not None and self.broker_proc.poll() is None:
            self.broker_proc.terminate()
            self.broker_proc.wait(10)


async def inject(run: Run, servers: Servers, fleet: subprocess.Popen[bytes], client: Any,
                 name: str, round_no: int) -> str:  # fmt: skip
    p = run.profile
    if name == "leader-kill":
        leader = await find_leader(run, client)
        await asyncio.to_thread(leader.kill)
        await asyncio.sleep(p.outage_s)
        leader.start()
        leader.restarts += 1
        try:
            await wait_healthy(leader, client)
        except RuntimeError as exc:  # the service failing to come back is a figure, not ours
            run.notes.append(f"leader-kill: {exc}")
        return f"kill -9 {leader.name} (leader {run.leader_method}), back after {p.outage_s:.0f} s"
    if name == "redis-loss":
        if round_no % 2 == 0:
            await asyncio.to_thread(servers.redis.kill)
            await asyncio.sleep(p.outage_s)
            await asyncio.to_thread(servers.redis.start)
            return f"redis kill -9, started empty after {p.outage_s:.0f} s"
        await asyncio.to_thread(servers.flush_redis)
        return "redis FLUSHALL"
    if name == "broker-restart":
        await asyncio.to_thread(servers.kill_broker)
        await asyncio.sleep(p.outage_s)
        await asyncio.to_thread(servers.start_broker)
        return f"mosquitto kill -9, restarted after {p.outage_s:.0f} s"
    if name == "postgres-restart":
        await asyncio.to_thread(servers.pg.stop, True)
        await asyncio.sleep(p.postgres_down_s)
        await asyncio.to_thread(servers.pg.start)
        return f"pg_ctl stop -m immediate, started after {p.postgres_down_s:.0f} s"
    if name == "malformed-flood":
        assert fleet.stdin is not None
        for _ in range(5):
            fleet.stdin.write(f"flood {p.flood // 5}\n".encode())
            fleet.stdin.flush()
            await asyncio.sleep(0.5)
        return f"{p.flood} each of {', '.join(FLOOD_KINDS)}"
    raise ValueError(f"fault: unknown {name!r}")


# ---- figures --------------------------------------------------------------------------------
def counter_deltas(run: Run) -> tuple[list[int], list[float], dict[str, list[float]]]:
    """The replicas' telemetry counters summed into one cumulative series over service time.

    Each process incarnation counts from zero; its increments are added up, so a replica killed
    and restarted keeps counting (what it accepted after its last scrape is not seen)."""
    last: dict[tuple[str, int], tuple[float, dict[str, float]]] = {}
    times: list[int] = []
    accepted: list[float] = []
    rejected: dict[str, list[float]] = defaultdict(list)
    total_acc = 0.0
    total_rej: dict[str, float] = defaultdict(float)
    for t, rep, inc, acc, rej in sorted(run.scrapes, key=lambda s: s[0]):
        prev_acc, prev_rej = last.get((rep, inc), (0.0, {}))
        total_acc += acc - prev_acc
        for reason, v in rej.items():
            total_rej[reason] += v - prev_rej.get(reason, 0.0)
        last[(rep, inc)] = (acc, rej)
        times.append(t)
        accepted.append(total_acc)
        for reason in set(total_rej) | set(rejected):
            series = rejected[reason]
            series.extend([0.0] * (len(times) - 1 - len(series)))
            series.append(total_rej[reason])
    return times, accepted, dict(rejected)


def at(times: list[int], values: list[float], t: int) -> float:
    """A cumulative series read at ``t`` (linear between scrapes)."""
    if not times:
        return 0.0
    i = bisect.bisect_left(times, t)
    if i == 0:
        return values[0] if t >= times[0] else 0.0
    if i >= len(times):
        return values[-1]
    t0, t1 = times[i - 1], times[i]
    v0, v1 = values[i - 1], values[i]
    return v0 + (v1 - v0) * (t - t0) / max(t1 - t0, 1)


def db_truth(run: Run, start_ms: int, end_ms: int) -> tuple[dict[int, int], list[tuple[Any, ...]]]:
    """Samples stored per slot, and the commands table."""
    import psycopg

    with psycopg.connect(run.db_dsn) as conn:
        rows = conn.execute(
            "SELECT interval_start_ms, SUM(samples) FROM telemetry_intervals"
            " WHERE interval_start_ms >= %s AND interval_start_ms < %s GROUP BY 1",
            (start_ms, end_ms),
        ).fetchall()
        commands = conn.execute(
            "SELECT device_id, event_id, type, setpoint_w, offset_c, limit_w, valid_from_ms,"
            " valid_until_ms, status, created_ms FROM commands"
            " WHERE type <> 'restore' AND sent_ms IS NOT NULL AND status = ANY(%s)"
            " ORDER BY device_id, valid_from_ms",
            (list(LIVE_STATUSES),),
        ).fetchall()
    return {int(s): int(n) for s, n in rows}, commands


def conflicts(
    commands: list[tuple[Any, ...]], pairs: list[tuple[Any, ...]] | None = None
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(device, service ms) for each device command that overlaps another live one of the same
    device with a different instruction (two commands holding the device in one interval), and
    for each that overlaps one with the same instruction under another command_id (a device
    commanded twice: harmless to it, but a sign of two runners). The conflicting rows go to
    ``pairs``, for a look."""
    out: list[tuple[str, int]] = []
    same: list[tuple[str, int]] = []
    by_device: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in commands:
        by_device[row[0]].append(row)
    for dev, rows in by_device.items():
        for i, a in enumerate(rows):
            for b in rows[i + 1 :]:
                if b[6] >= a[7]:
                    break  # sorted by valid_from: no later one overlaps a
                what = (
                    out
                    if (a[1], a[2], a[3], a[4], a[5]) != (b[1], b[2], b[3], b[4], b[5])
                    else same
                )
                what.append((dev, int(max(a[9], b[9]))))
                if what is out and pairs is not None:
                    pairs.append(a + b)
    return out, same


async def settlement(run: Run, client: Any, req: dict[str, Any]) -> dict[str, Any]:
    path = (f"/v1/capacity-requests/{req['id']}" if req["kind"] == "request"
            else f"/v1/grid-events/{req['id']}")  # fmt: skip
    key = run.buyer_key if req["kind"] == "request" else run.admin_key
    resp = await call(run, client, "GET", path, key, record=False)
    if resp is None or resp.status_code != 200:
        return {"status": "unreadable", "intervals": {}}
    doc = resp.json()
    ivs = {_ms(iv["start"]): float(iv["delivered_mw"]) for iv in doc.get("intervals") or []}
    return {"status": doc.get("status"), "intervals": ivs}


def fmt(v: float | int | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def report(
    run: Run,
    windows: list[Window],  # in order, back to back: the run
    truth: dict[str, Any],
    stored: dict[int, int],
    commands: list[tuple[Any, ...]],
    settled: dict[str, dict[str, Any]],
    work: Path,
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    times, accepted, rejected = counter_deltas(run)
    published = {int(k): v for k, v in truth["published"].items()}
    offline = {int(k): v for k, v in truth["offline"].items()}
    pairs: list[tuple[Any, ...]] = []
    clashes, doubled = conflicts(commands, pairs)
    cols = ("device_id", "event_id", "type", "setpoint_w", "offset_c", "limit_w",
            "valid_from_ms", "valid_until_ms", "status", "created_ms")  # fmt: skip
    (work / "conflicts.csv").write_text(
        ",".join([f"a_{c}" for c in cols] + [f"b_{c}" for c in cols])
        + "\n"
        + "".join(",".join(str(v) for v in row) + "\n" for row in pairs)
    )
    floods = sum(1 for f in run.faults if f[0] == "malformed-flood")
    flood_each = sum(truth.get("flooded", {}).values()) / max(floods, 1)

    def rejected_between(a: int, b: int) -> dict[str, float]:
        return {r: at(times, s, b) - at(times, s, a) for r, s in rejected.items()}

    # Settlement per interval: (window of the interval, missing?, zero while delivering?).
    iv_flags: list[tuple[int, bool, bool]] = []
    for req in run.requests:
        got = settled.get(req["id"], {}).get("intervals", {})
        true = {int(k): v for k, v in truth["delivered_mw"].get(req["id"], {}).items()}
        for t in range(req["start_ms"], req["end_ms"], SLOT_MS):
            missing = t not in got
            zero = not missing and got[t] <= 1e-6 and true.get(t, 0.0) > DELIVERING_MW
            iv_flags.append((t, missing, zero))

    table = Table(title="Soak: figures per fault window (goal 0 in the starred columns)")
    columns = ("window", "fault", "published", "accepted", "rejected", "stored", "lost*", "5xx*",
               "503 named", "conflicts*", "doubled", "settle miss*", "settled 0*")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("window", "fault") else "right")
    totals: dict[str, float] = defaultdict(float)
    for w in windows:
        slots = [s for s in published.keys() | stored.keys() if w.holds(s + SLOT_MS - 1)]
        pub = sum(published.get(s, 0) for s in slots)
        sto = sum(stored.get(s, 0) for s in slots)
        acc = at(times, accepted, w.end_ms) - at(times, accepted, w.start_ms)
        rej = rejected_between(w.start_ms, w.end_ms)
        # Readings that reached the broker, were not refused by the service and are not in
        # the database: accepted, then lost. (The flood's own messages are refused too: they
        # are not the fleet's readings.)
        refused = sum(rej.values()) - (flood_each if "flood" in w.name else 0)
        lost = max(pub - max(refused, 0.0) - sto, 0.0)
        five = sum(1 for t, _r, _p, s in run.answers if w.holds(t) and 500 <= s < 600)
        named = sum(1 for t, _r, _p, s in run.answers if w.holds(t) and s == OUTAGE_503)
        clash = len({d for d, t in clashes if w.holds(t)})
        twice = len({d for d, t in doubled if w.holds(t)})
        miss = sum(1 for t, m, _z in iv_flags if w.holds(t + SLOT_MS - 1) and m)
        zero = sum(1 for t, _m, z in iv_flags if w.holds(t + SLOT_MS - 1) and z)
        rej_txt = ", ".join(f"{r} {v:,.0f}" for r, v in sorted(rej.items()) if v >= 0.5) or "0"
        table.add_row(w.name, w.detail, fmt(pub), fmt(acc), rej_txt, fmt(sto), fmt(lost),
                      fmt(five), fmt(named), fmt(clash), fmt(twice), fmt(miss),
                      fmt(zero))  # fmt: skip
        for k, v in (("pub", pub), ("sto", sto), ("lost", lost), ("five", five), ("named", named),
                     ("miss", miss), ("zero", zero)):  # fmt: skip
            totals[k] += v
    acc_total = at(times, accepted, windows[-1].end_ms) - at(times, accepted, windows[0].start_ms)
    table.add_row("whole run", "", fmt(totals["pub"]), fmt(acc_total), "",
                  fmt(sum(stored.values())), fmt(totals["lost"]), fmt(totals["five"]),
                  fmt(totals["named"]), fmt(len({d for d, _t in clashes})),
                  fmt(len({d for d, _t in doubled})),
                  fmt(totals["miss"]),
                  fmt(totals["zero"]))  # fmt: skip
    console.print(table)
    # A slot is counted in the window it ends in, but a replica may hold it for longer (a write
    # retried after a failure): name the short slots and the fault that came next.
    short = []
    for t in sorted(published):
        if not windows[0].start_ms <= t < windows[-1].end_ms:
            continue  # the fleet publishes from its start; the run's slots are compared
        missing = published[t] - stored.get(t, 0)
        if missing > max(0.005 * published[t], 1):
            after = next((f"{n} {_iso(tf)[11:16]}" for n, tf, _d in run.faults if tf >= t), "-")
            short.append(f"{_iso(t)[11:16]} −{missing:,} (next fault: {after})")
    if short:
        console.print("slots stored short of what was published: " + "; ".join(short[:16]))
    console.print(
        "published: the fleet's readings (by the 5-minute slot of their ts) sent while its "
        "broker connections were up; accepted, rejected: the replicas' /metrics counters over "
        "the window (by arrival); stored: samples in telemetry_intervals for the slots; lost = "
        "published − rejected (the flood's own messages left out) − stored, readings the "
        "service took and does not have (it also counts QoS 0 readings a broker restart or a "
        "killed subscriber dropped in flight); doubled: devices commanded twice with the same "
        "instruction (not a goal; a sign of two runners); settled 0: an interval settled at 0 "
        f"MW while the devices truly delivered over {DELIVERING_MW * 1000:.0f} kW."
    )
    console.print(
        f"accepted − stored over the whole run (counters against the table; blind to what a "
        f"killed replica accepted after its last scrape): "
        f"[bold]{acc_total - sum(stored.values()):,.0f}[/bold]; published while a gateway "
        f"connection was down (never reached the broker, not counted above): "
        f"{sum(offline.values()):,}"
    )
    by_status: dict[int, int] = defaultdict(int)
    by_path: dict[str, int] = defaultdict(int)
    for _t, _r, path, s in run.answers:
        by_status[s] += 1
        if 500 <= s < 600:
            by_path[path] += 1
    statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(by_status.items()))
    console.print(
        f"HTTP answers: {len(run.answers):,} ({statuses}); refused (replica down or not yet "
        f"listening): {run.refused:,}; no answer in time (5 s polling, 30 s placing): "
        f"{run.timed_out:,}; 5xx by endpoint: {dict(sorted(by_path.items())) or 'none'}"
    )
    for w in windows:
        per: dict[str, int] = defaultdict(int)
        for t, _r, path, s in run.answers:
            if w.holds(t) and 500 <= s < 600:
                per[path] += 1
        if per:
            console.print(f"  5xx in {w.name}: {dict(sorted(per.items()))}")
    flooded = truth.get("flooded", {})
    if flooded:
        console.print(f"flood sent: {flooded}")

    acc_table = Table(title="Delivery per request (measured by the service vs the devices' truth)")
    for col in ("id", "kind", "status", "committed MW", "measured MW", "true MW",
                "measured/true", "true/committed", "intervals"):  # fmt: skip
        acc_table.add_column(col, justify="left" if col in ("id", "kind", "status") else "right")
    for req in run.requests:
        got = settled.get(req["id"], {})
        ivs = got.get("intervals", {})
        true = {int(k): v for k, v in truth["delivered_mw"].get(req["id"], {}).items()}
        slots = list(range(req["start_ms"], req["end_ms"], SLOT_MS))
        meas = [ivs[s] for s in slots if s in ivs]
        tru = [true.get(s, 0.0) for s in slots]
        m = sum(meas) / len(meas) if meas else None
        tr = sum(tru) / len(tru) if tru else 0.0
        acc_table.add_row(
            req["id"], req["kind"], str(got.get("status")), fmt(req["mw"], 3), fmt(m, 3),
            fmt(tr, 3), fmt(m / tr if m is not None and tr > 0 else None, 3),
            fmt(tr / req["mw"] if req["mw"] > 0 else None, 3), f"{len(meas)}/{len(slots)}",
        )  # fmt: skip
    console.print(acc_table)

    mem = Table(title="Memory per replica (RSS of vpp serve)")
    for col in ("replica", "restarts", "RSS at start MiB", "at first fault MiB",
                "RSS at end MiB", "growth MiB", "growth after warm-up MiB"):  # fmt: skip
        mem.add_column(col, justify="left" if col == "replica" else "right")
    for rep in run.replicas:
        first, warm, last = rep.rss_start_kib, rep.rss_warm_kib, rep.rss_end_kib
        # A replica restarted by a fault is a new process: its growth is not the run's.
        whole = (last - first) / 1024 if first and last and not rep.restarts else None
        after = (last - warm) / 1024 if warm and last and not rep.restarts else None
        mem.add_row(rep.name, str(rep.restarts), fmt(first / 1024 if first else None, 1),
                    fmt(warm / 1024 if warm else None, 1), fmt(last / 1024 if last else None, 1),
                    fmt(whole, 1), fmt(after, 1))  # fmt: skip
    console.print(mem)
    console.print(
        f"leader detection: {run.leader_method}; fleet at the end: "
        f"{truth.get('summary')}; batteries below reserve: "
        f"{truth.get('batteries_below_reserve')}; devices still under command: "
        f"{truth.get('still_under_command')}"
    )
    for note in run.notes:
        console.print(f"note: {note}")


# ---- the run --------------------------------------------------------------------------------
def _spawn_keys(env: dict[str, str], tenant: str, role: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "keys", "create", "--tenant", tenant, "--role", role],
        env=env, cwd=str(REPO), capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def private_servers() -> Iterator[Servers]:
    from tests.helpers.mosquitto import run_mosquitto
    from tests.helpers.servers import private_postgres, private_redis

    with private_postgres() as pg, private_redis() as redis, run_mosquitto() as broker:
        servers = Servers(redis, pg, broker)
        try:
            yield servers
        finally:
            servers.close()


async def soak(profile: Profile) -> None:
    import httpx

    from tests.helpers.eventkit import summer_origin_ms
    from tests.helpers.mosquitto import free_port
    from vpp.clock import Clock

    origin = summer_origin_ms(profile.scale)
    clock = Clock(profile.scale, origin)
    work = Path(tempfile.mkdtemp(prefix="vpp-soak-"))
    t_wall = time.monotonic()
    print(f"soak: {profile.devices:,} devices, {profile.hours:g} h of service time at "
          f"×{profile.scale:g}, faults ×{profile.rounds}; logs in {work}", flush=True)  # fmt: skip
    with private_servers() as servers:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("VPP_")},
            "PYTHONPATH": str(REPO),
            "VPP_DATABASE_URL": servers.pg.url,
            "VPP_REDIS_URL": servers.redis.url,
            "VPP_MQTT_URL": servers.broker.service_url,
            "VPP_BROKER_CREDENTIALS": "none",  # the fleet speaks through the gateway login
            "VPP_TIME_SCALE": str(profile.scale),
            "VPP_TIME_ORIGIN": str(origin),
            "VPP_LOG_LEVEL": "warning",
            # A reading whose ts is further than this from its arrival is filed under its
            # arrival time. At ×60 one wall second of ingest lag is a service minute (the
            # default): allow ten wall seconds, so readings are filed by their own ts and the
            # slots compare with what the fleet published.
            "VPP_MAX_CLOCK_SKEW_S": str(10.0 * profile.scale),
        }
        admin_key = await asyncio.to_thread(_spawn_keys, env, "soak-ops", "admin")
        buyer_key = await asyncio.to_thread(_spawn_keys, env, "soak-buyer", "hyperscaler")
        replicas = [
            Replica(f"replica {k}", free_port(), env, work / f"serve-{k}.log") for k in (1, 2)
        ]
        run = Run(profile, clock, replicas, admin_key, buyer_key,
                  servers.pg.url.replace("postgresql+asyncpg://", "postgresql://"))  # fmt: skip
        fleet: subprocess.Popen[bytes] | None = None
        stop = asyncio.Event()
        background: list[asyncio.Task[None]] = []
        try:
            async with httpx.AsyncClient() as client:
                for rep in replicas:
                    rep.start()
                for rep in replicas:
                    await wait_healthy(rep, client)
                fleet_cfg = work / "fleet.json"
                truth_path = work / "truth.json"
                fleet_cfg.write_text(json.dumps({
                    "devices": profile.devices, "api_url": replicas[0].url, "api_key": admin_key,
                    "seed": 11, "mqtt_url": f"mqtt://127.0.0.1:{servers.broker.port}",
                    "gateway_username": servers.broker.gateway_username,
                    "gateway_password": servers.broker.gateway_password, "out": str(truth_path),
                }))  # fmt: skip
                with (work / "fleet.log").open("ab") as flog:
                    fleet = subprocess.Popen(
                        [sys.executable, str(Path(__file__).resolve()), "--fleet-worker",
                         str(fleet_cfg)],
                        env=env, cwd=str(REPO), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=flog,
                    )  # fmt: skip
                assert fleet.stdout is not None
                line = await asyncio.to_thread(fleet.stdout.readline)
                if line.strip() != b"ready":
                    raise RuntimeError(f"fleet did not start; see {work / 'fleet.log'}")
                listing = await call(run, client, "GET", "/v1/devices?limit=50", admin_key,
                                     record=False)  # fmt: skip
                if listing is not None and listing.status_code == 200:
                    doc = listing.json()
                    run.device_ids = [d["id"] for d in doc.get("devices", [])]
                # The service has seen the fleet when most devices read online.
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    r = await call(run, client, "GET", "/v1/fleet", admin_key, record=False)
                    online = r.json()["totals"]["online"] if r and r.status_code == 200 else 0
                    if online >= 0.9 * profile.devices:
                        break
                    await asyncio.sleep(1.0)
                for rep in replicas:
                    rep.rss_start_kib = rep.rss_kib()
                print(f"soak: setup done in {time.monotonic() - t_wall:.0f} s wall", flush=True)

                # Poller and scraper start before the first slot, so that the counters read
                # at its start are the run's own.
                background = [asyncio.create_task(poller(run, stop)),
                              asyncio.create_task(scraper(run, stop))]  # fmt: skip
                t0 = now_ms(run) // SLOT_MS * SLOT_MS + SLOT_MS
                await asyncio.sleep(max(clock.wall_seconds((t0 - now_ms(run)) / 1000.0), 0))
                t_end = t0 + int(profile.hours * 3_600_000)
                market: list[tuple[int, str]] = []
                # Placed while the run has time left for most of their window; the run is
                # then stretched to their ends.
                for k in range(int(profile.hours * 3)):  # every 20 minutes
                    t = t0 + k * 20 * 60_000
                    if t + 35 * 60_000 <= t_end:
                        market.append((t, "request"))
                for k in range(int(profile.hours)):  # every hour, on the half hour
                    t = t0 + k * 3_600_000 + 30 * 60_000
                    if t + 25 * 60_000 <= t_end:
                        market.append((t, "grid-event"))
                market.sort()
                n_faults = len(FAULTS) * profile.rounds
                span = t_end - t0 - 20 * 60_000
                faults: list[tuple[int, str, int]] = []
                for k in range(n_faults):
                    t = t0 + 10 * 60_000 + int(span * k / n_faults)
                    # Mid-slot: the slot before has been written, so a fault's losses fall in
                    # its own window.
                    t = t // SLOT_MS * SLOT_MS + SLOT_MS // 2
                    faults.append((t, FAULTS[k % len(FAULTS)], k // len(FAULTS)))

                async def until(t: int) -> None:
                    wait = clock.wall_seconds((t - now_ms(run)) / 1000.0)
                    if wait > 0:
                        await asyncio.sleep(wait)

                async def market_chain() -> None:
                    for t, what in market:
                        await until(t)
                        if what == "request":
                            await place_request(run, client, now_ms(run))
                        else:
                            await place_grid_event(run, client, now_ms(run))

                async def fault_chain() -> int:
                    """One fault at a time: a fault starts once the one before has recovered
                    (a restart can take longer than the spacing); returns when the last did."""
                    recovered = 0
                    for t, what, round_no in faults:
                        # Two slots after the last recovery at least: each window holds whole
                        # slots of its own.
                        start = max(t, recovered + 2 * SLOT_MS)
                        await until(start // SLOT_MS * SLOT_MS + SLOT_MS // 2)
                        tf = now_ms(run)
                        if not run.faults:
                            # Warmed up (imports, first plans and quotes): growth from here on
                            # is what a long run would accumulate.
                            for rep in run.replicas:
                                rep.rss_warm_kib = rep.rss_kib()
                        print(f"soak: {_iso(tf)} {what}", flush=True)
                        detail = await inject(run, servers, fleet, client, what, round_no)
                        run.faults.append((what, tf, detail))
                        recovered = now_ms(run)
                    return recovered

                _, last_fault_ms = await asyncio.gather(market_chain(), fault_chain())
                # Ten service minutes after the last recovery at least, and to the end of the
                # last event, to a slot's end.
                last_event = max((r["end_ms"] for r in run.requests), default=t0)
                t_end = max(t_end, next_slot(max(last_fault_ms + 10 * 60_000, last_event)))
                await until(t_end)
                # Let the last events end and settle (a few service minutes after their end).
                deadline = time.monotonic() + max(60.0, clock.wall_seconds(900))
                settled: dict[str, dict[str, Any]] = {}
                while time.monotonic() < deadline:
                    settled = {r["id"]: await settlement(run, client, r) for r in run.requests}
                    if all(s["status"] in FINISHED for s in settled.values()):
                        break
                    await asyncio.sleep(2.0)
                for rep in replicas:
                    rep.rss_end_kib = rep.rss_kib()
                    if rep.proc is not None and rep.proc.poll() is not None:
                        run.notes.append(f"{rep.name} exited by itself ({rep.proc.returncode})")
                stop.set()
                await asyncio.gather(*background)
                assert fleet.stdin is not None
                fleet.stdin.write(b"stop\n")
                fleet.stdin.flush()
                await asyncio.to_thread(fleet.wait, 120)
                truth = json.loads(truth_path.read_text())
                stored, commands = await asyncio.to_thread(db_truth, run, t0, t_end)
        finally:
            stop.set()
            for task in background:
                task.cancel()
            if fleet is not None and fleet.poll() is None:
                fleet.kill()
                fleet.wait(10)
            for rep in replicas:
                rep.stop()
    windows = [Window("baseline", t0, t_end)]
    for name, tf, detail in run.faults:
        windows[-1].end_ms = tf
        windows.append(Window(f"{_iso(tf)[11:16]} {name}", tf, t_end, detail))
    (work / "slots.csv").write_text(
        "slot,published,published_offline,stored\n"
        + "".join(
            f"{_iso(t)},{truth['published'].get(str(t), 0)},{truth['offline'].get(str(t), 0)},"
            f"{stored.get(t, 0)}\n"
            for t in range(t0, t_end, SLOT_MS)
        )
    )
    report(run, windows, truth, stored, commands, settled, work)
    print(f"soak: {time.monotonic() - t_wall:.0f} s wall", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="1 000 devices, 1 h, every fault once")
    ap.add_argument("--devices", type=int, help="override the profile's fleet size")
    ap.add_argument("--hours", type=float, help="override the profile's service hours")
    ap.add_argument("--scale", type=float, help="override the clock speed (default ×60)")
    ap.add_argument("--fleet-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fleet_worker:
        fleet_worker(args.fleet_worker)
        return
    p = SMALL if args.small else FULL
    p = Profile(
        devices=args.devices or p.devices, hours=args.hours or p.hours,
        scale=args.scale or p.scale, rounds=p.rounds, outage_s=p.outage_s,
        postgres_down_s=p.postgres_down_s, flood=p.flood,
    )  # fmt: skip
    asyncio.run(soak(p))


if __name__ == "__main__":
    main()
