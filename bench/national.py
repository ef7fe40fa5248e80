"""One run at national scale: a million registered devices, a hundred thousand of them live,
a committed capacity request and a grid event planned across the whole fleet, commands out and
acks in, stage by stage, with each process's peak memory.

The fleet:

- ``--registered`` devices (default 1 000 000) bulk-loaded by ``COPY`` straight into the
  ``devices`` table of a private database on the shared PostgreSQL (``bench_national``, dropped
  at the end); the state store's registry is not written by the bench: the service rebuilds it
  from the table on its first start against an empty Redis (``store/state/rebuild.py``), which is
  part of the "services start" stage;
- ``--live`` of them (default 100 000) are the project's simulator (sim/simulator.py) in a
  subprocess of its own, speaking MQTT through the ``vpp-gateway`` login
  (``VPP_BROKER_CREDENTIALS=none``); their registry rows are drawn from the same simulator
  fleet, so what the service plans with is what the devices are. All of them report at once
  when the fleet connects (a fleet coming back), then at their own phase every 5 service
  minutes (every minute under a command); they obey commands and ack them;
- the rest are registered and silent: no telemetry, no status, no acks.

The service is real processes: ``vpp serve`` (API, ingest, forecaster, event runner) and
``--ingest-workers`` × ``vpp ingest`` on the shared subscription, against a private Redis
(tests/helpers/servers.py) and a private Mosquitto with the deploy configuration
(tests/helpers/mosquitto.py), at ``--scale`` (``VPP_TIME_SCALE``) so the event window comes
within a minute or two of wall time. The harness reads only the public surface (the HTTP API)
and the database as ground truth (``telemetry_intervals``, ``commands``).

Stages printed (wall seconds):

- ``bulk load``: the COPY of the registered devices (rows generated before, timed apart);
- ``services start``: ``vpp serve`` spawned → ``/readyz`` 200; ``fleet cold start``: → the
  first ``GET /v1/fleet`` that counts every registered device;
- ``telemetry for N live devices accepted``: the fleet connected → every live device has a
  committed reading in ``telemetry_intervals`` (the README's *accepted*);
- ``forecast``: ``GET /v1/forecast``, 48 h in 15-minute steps, for the region;
- ``quote+commit``: ``POST /v1/capacity-requests`` then ``…/commit``;
- ``grid event planned``: ``POST /v1/grid-events`` (the plan is made before it answers);
- ``commands stored+published``: the window opens → the last command of the opening wave has
  ``sent_ms`` (stored before it is published); ``acks in``: → the last ack of that wave;
- ``settlement``: the window ends → the request reads ``completed`` and ``settled`` (every
  interval's final figures).

Then the commands split between live and silent devices (a silent device never acks: the
runner's replacement path handles it), and the peak RSS (``VmHWM``) of every process and of the
bench itself. The machine running it is named as shared or not by the operator, not the script.

    .venv/bin/python bench/national.py            # 1 000 000 registered, 100 000 live, ×10
    .venv/bin/python bench/national.py --small    # 50 000 registered, 5 000 live, ×20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REGION = "ERCOT-NORTH"
TENANT = "national-fleet"
SEED = 12
LIVE_PREFIX = "nat"
SILENT_PREFIX = "silent"
SLOT_MS = 300_000
PG_ADMIN_DSN = os.environ.get("VPP_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
DB_NAME = "bench_national"

DEVICE_COLUMNS = (
    "id",
    "tenant_id",
    "kind",
    "site_id",
    "region",
    "feeder",
    "vendor",
    "lat",
    "lon",
    "enrolled",
    "offboarded_ms",
    "created_ms",
    "updated_ms",
    "capacity_wh",
    "max_discharge_w",
    "max_charge_w",
    "backup_reserve_pct",
    "rated_w",
    "hvac_rated_w",
    "comfort_max_c",
    "comfort_min_c",
    "max_offset_c",
)


@dataclass(frozen=True)
class Profile:
    registered: int
    live: int
    scale: float
    duration_min: int  # the request's and the grid event's window, service minutes
    lead_wall_s: float  # the window opens this long after the quote is asked, wall seconds


FULL = Profile(registered=1_000_000, live=100_000, scale=10.0, duration_min=15, lead_wall_s=150)
SMALL = Profile(registered=50_000, live=5_000, scale=20.0, duration_min=15, lead_wall_s=60)


# =============================================================================================
# The registry rows
# =============================================================================================
def live_fleet_config(n: int) -> Any:
    """The simulator fleet's config; the fleet worker's ``FleetSimulator`` draws the same one."""
    from sim.simulator import FleetConfig

    return FleetConfig(n_devices=n, regions=(REGION,), seed=SEED, id_prefix=LIVE_PREFIX)


def registry_frame(profile: Profile, now_ms: int) -> Any:
    """The ``devices`` rows, one DataFrame, columns vectorised (no Python loop per device)."""
    import numpy as np
    import pandas as pd

    from sim.simulator import BATTERY, SOLAR, THERMOSTAT, SimFleet
    from sim.synthetic import synthetic_fleet
    from vpp.domain import KIND_BY_CODE

    def nan_where(mask: Any, values: Any) -> Any:
        return np.where(mask, values, np.nan)

    live = SimFleet(live_fleet_config(profile.live), now_ms)
    kinds = np.full(live.n, "", dtype=object)
    kinds[live.kind == BATTERY] = KIND_BY_CODE[BATTERY].value
    kinds[live.kind == SOLAR] = KIND_BY_CODE[SOLAR].value
    kinds[live.kind == THERMOSTAT] = KIND_BY_CODE[THERMOSTAT].value
    ids = np.array(live.ids, dtype=object)
    feeders = np.char.add(f"{REGION}-F", (np.arange(live.n) // 500).astype(str)).astype(object)
    bat, sol, th = live.is_battery, live.is_solar, live.is_thermostat
    live_df = pd.DataFrame(
        {
            "id": ids,
            "kind": kinds,
            "site_id": np.char.add("site-", ids.astype(str)).astype(object),
            "feeder": feeders,
            "vendor": np.array(live.vendors, dtype=object)[live.vendor_idx],
            "lat": np.round(live.lat, 4),
            "lon": np.round(live.lon, 4),
            "capacity_wh": nan_where(bat, live.capacity_wh),
            "max_discharge_w": nan_where(bat, live.max_discharge_w),
            "max_charge_w": nan_where(bat, live.max_charge_w),
            "backup_reserve_pct": nan_where(bat, live.customer_reserve_pct),
            "rated_w": nan_where(sol, np.round(live.pv_rated_w)),
            "hvac_rated_w": nan_where(th, live.hvac_rated_w),
            "comfort_max_c": nan_where(th, live.comfort_max),
            "comfort_min_c": nan_where(th, live.comfort_min),
            "max_offset_c": nan_where(th, live.max_offset_c),
        }
    )
    n_silent = profile.registered - profile.live
    frames = [live_df]
    if n_silent > 0:
        snap = synthetic_fleet(n_silent, regions=[REGION], seed=SEED, now_ms=now_ms)
        sids = np.char.add(f"{SILENT_PREFIX}-", np.arange(n_silent).astype(str)).astype(object)
        skinds = np.array([KIND_BY_CODE[c].value for c in sorted(KIND_BY_CODE)], dtype=object)
        frames.append(
            pd.DataFrame(
                {
                    "id": sids,
                    "kind": skinds[snap.kind_codes - min(KIND_BY_CODE)],
                    "site_id": np.char.add("site-", sids.astype(str)).astype(object),
                    "feeder": np.char.add(
                        f"{REGION}-S", (np.arange(n_silent) // 500).astype(str)
                    ).astype(object),
                    "vendor": np.array(snap.vendors, dtype=object)[snap.vendor_codes],
                    "lat": np.round(snap.lat, 4),
                    "lon": np.round(snap.lon, 4),
                    **{
                        c: getattr(snap, c)
                        for c in (
                            "capacity_wh",
                            "max_discharge_w",
                            "max_charge_w",
                            "backup_reserve_pct",
                            "rated_w",
                            "hvac_rated_w",
                            "comfort_max_c",
                            "comfort_min_c",
                            "max_offset_c",
                        )
                    },
                }
            )
        )
    df = pd.concat(frames, ignore_index=True)
    df["tenant_id"] = TENANT
    df["region"] = REGION
    df["enrolled"] = True
    df["offboarded_ms"] = pd.array([None] * len(df), dtype="Int64")
    df["created_ms"] = now_ms
    df["updated_ms"] = now_ms
    return df[list(DEVICE_COLUMNS)]


def copy_devices(dsn: str, csv_bytes: bytes, now_ms: int) -> None:
    import psycopg

    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO tenants (id, name, created_ms) VALUES (%s, %s, %s) "
            "ON CONFLICT (id) DO NOTHING",
            (TENANT, "national bench fleet", now_ms),
        )
        cols = ", ".join(DEVICE_COLUMNS)
        with conn.cursor().copy(f"COPY devices ({cols}) FROM STDIN WITH (FORMAT csv)") as cp:
            step = 8 << 20
            for k in range(0, len(csv_bytes), step):
                cp.write(csv_bytes[k : k + step])
        conn.commit()


# =============================================================================================
# The fleet worker: the project's simulator in its own process
# =============================================================================================
def fleet_worker(config_path: str) -> None:
    """Run the live fleet until ``stop`` on stdin, then write its counters to ``cfg["out"]``."""
    import numpy as np

    from sim.simulator import FleetSimulator
    from vpp.settings import get_settings

    cfg = json.loads(Path(config_path).read_text())
    settings = get_settings()
    fc = live_fleet_config(cfg["live"])
    sim = FleetSimulator(
        settings,
        fc.n_devices,
        list(fc.regions),
        seed=fc.seed,
        id_prefix=fc.id_prefix,
        mqtt_url=cfg["mqtt_url"],
        gateway_username=cfg["gateway_username"],
        gateway_password=cfg["gateway_password"],
        gateways=cfg["gateways"],
    )
    fleet = sim.fleet
    # Every device reports on connecting (a fleet coming back after an outage); then each at
    # its own phase, so the steady load is one interval's share per tick, not a burst.
    fleet.next_due_ms[:] = 0
    original = fleet.telemetry_payloads
    first = {"done": False}
    rng = np.random.default_rng(SEED)

    def spread(now_ms: int, mask: Any = None, *, advance: bool = True) -> Any:
        idx, payloads = original(now_ms, mask, advance=advance)
        if advance and mask is None and not first["done"] and len(idx):
            first["done"] = True
            phase = rng.random(len(idx)) * fc.interval_s * 1000.0
            fleet.next_due_ms[idx] = now_ms + phase.astype(np.int64)
        return idx, payloads

    fleet.telemetry_payloads = spread  # type: ignore[method-assign]

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        await sim.connect()
        print("ready", flush=True)
        task = asyncio.create_task(sim.run(stop))

        def read_stdin() -> None:
            for line in sys.stdin:
                if line.strip() == "stop":
                    break
            loop.call_soon_threadsafe(stop.set)

        import threading

        threading.Thread(target=read_stdin, daemon=True).start()
        await task

    asyncio.run(go())
    Path(cfg["out"]).write_text(
        json.dumps(
            {
                "summary": sim.summary(),
                "acks_sent": sim.ground_truth().acks_sent,
                "mute": int(np.sum(fleet.mute)),
                "vmhwm_kib": vmhwm_kib(os.getpid()),
            }
        )
    )
    print("done", flush=True)


# =============================================================================================
# The harness
# =============================================================================================
def vmhwm_kib(pid: int) -> int | None:
    """The process's peak resident set (``VmHWM``), KiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    peak_kib: int | None = None

    def start(self, env: dict[str, str], **kw: Any) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=env,
                cwd=str(REPO),
                stdout=kw.pop("stdout", out),
                stderr=out,
                **kw,
            )

    def sample(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.peak_kib = vmhwm_kib(self.proc.pid) or self.peak_kib

    def cpu_s(self) -> float | None:
        return None if self.proc is None else cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.sample()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Stages:
    """The stage lines, and after each the share of a core each process used since the stage
    before (what bounds a stage on a shared machine: the servers are sampled too)."""

    lines: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    servers: dict[str, int] = field(default_factory=dict)  # name → pid
    _cpu: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.monotonic)

    def cpu_shares(self) -> str:
        now = time.monotonic()
        dt = max(now - self._t, 1e-6)
        self._t = now
        named = [(p.name, p.cpu_s()) for p in self.procs]
        named += [(n, cpu_seconds(pid)) for n, pid in self.servers.items()]
        named.append(("bench", time.process_time()))
        parts = []
        for name, cpu in named:
            if cpu is None:
                continue
            before = self._cpu.get(name)
            self._cpu[name] = cpu
            if before is not None:
                parts.append(f"{name} {(cpu - before) / dt:.0%}")
        return ", ".join(parts)

    def add(self, label: str, seconds: float | None, extra: str = "") -> None:
        value = "not reached" if seconds is None else f"{seconds:.2f} s"
        line = f"{label}: {value}{'  (' + extra + ')' if extra else ''}"
        self.lines.append(line)
        print(f"national: {line}", flush=True)
        shares = self.cpu_shares()
        if shares:
            print(f"national:     cpu since the stage before: {shares}", flush=True)


def _iso(t_ms: int) -> str:
    from vpp.timefmt import to_rfc3339

    return to_rfc3339(int(t_ms))


def _spawn_key(env: dict[str, str], tenant: str, role: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "keys", "create", "--tenant", tenant, "--role", role],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def db_scalar(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def command_counts(dsn: str, event_ids: list[str], until_ms: int) -> dict[str, Any]:
    """The events' commands created before ``until_ms`` (restores left out): stored, sent,
    acked, the last created, sent and ack times, split by live and silent devices."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT device_id LIKE %s AS live, count(*), count(sent_ms), count(ack_ms),"
            " max(sent_ms), max(ack_ms), max(created_ms), min(created_ms) FROM commands"
            " WHERE event_id = ANY(%s) AND type <> 'restore' AND created_ms < %s GROUP BY 1",
            (f"{LIVE_PREFIX}-%", event_ids, until_ms),
        ).fetchall()
    out: dict[str, Any] = {
        "stored": 0,
        "sent": 0,
        "acked": 0,
        "last_sent": None,
        "last_ack": None,
        "last_created": None,
        "first_created": None,
        "live": 0,
        "silent": 0,
        "live_acked": 0,
    }
    for live, n, sent, acked, last_sent, last_ack, last_created, first_created in rows:
        out["stored"] += n
        out["sent"] += sent
        out["acked"] += acked
        out["live" if live else "silent"] += n
        if live:
            out["live_acked"] += acked
        for key, v in (
            ("last_sent", last_sent),
            ("last_ack", last_ack),
            ("last_created", last_created),
        ):
            if v is not None:
                out[key] = max(out[key] or 0, int(v))
        if first_created is not None:
            out["first_created"] = min(out["first_created"] or 1 << 62, int(first_created))
    return out


async def print_counters(client: Any, url: str) -> None:
    """What ``vpp serve``'s own ingest accepted and dropped (by reason, the non-zero ones), the
    commands it sent and the acks it took (the extra ingest workers count in their own
    processes)."""
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        text = (await client.get(url + "/metrics")).text
        wanted = ("vpp_ingest_rejected_total{", "vpp_acks_total{", "vpp_ingest_messages_total{",
                  "vpp_commands_sent_total{")  # fmt: skip
        picked = [
            ln.replace("vpp_", "", 1)
            for ln in text.splitlines()
            if ln.startswith(wanted) and not ln.endswith(" 0.0")
        ]
        print("national: vpp serve counters: " + "; ".join(picked), flush=True)


async def wait_until(pred: Any, timeout_s: float, step_s: float = 0.25) -> float | None:
    """Poll ``pred`` (a coroutine function) until true; wall seconds taken, None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if await pred():
            return time.monotonic() - t0
        await asyncio.sleep(step_s)
    return None


async def national(profile: Profile, ingest_workers: int, gateways: int) -> None:
    import httpx
    import psycopg

    from store.migrate import upgrade
    from tests.helpers.eventkit import summer_origin_ms
    from tests.helpers.mosquitto import free_port, run_mosquitto
    from tests.helpers.servers import private_redis
    from vpp.clock import Clock

    n_reg, n_live, scale = profile.registered, profile.live, profile.scale
    origin = summer_origin_ms(scale)
    clock = Clock(scale, origin)
    work = Path(tempfile.mkdtemp(prefix="vpp-national-"))
    stages = Stages()
    t_run = time.monotonic()
    print(
        f"national: {n_reg:,} registered, {n_live:,} live, ×{scale:g}, {ingest_workers} extra "
        f"ingest worker(s), {gateways} gateway connection(s); logs in {work}",
        flush=True,
    )
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    dsn = f"{base}/{DB_NAME}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    procs: list[Proc] = []
    fleet: Proc | None = None
    try:
        with private_redis() as redis, run_mosquitto() as broker:
            stages.procs = procs
            if redis.proc is not None:
                stages.servers["redis"] = redis.proc.pid
            stages.servers["mosquitto"] = broker.pid
            db_url = dsn.replace("postgresql://", "postgresql+asyncpg://")
            await asyncio.to_thread(upgrade, db_url)
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("VPP_")},
                "PYTHONPATH": str(REPO),
                "VPP_DATABASE_URL": db_url,
                "VPP_REDIS_URL": redis.url,
                "VPP_MQTT_URL": broker.service_url,
                "VPP_BROKER_CREDENTIALS": "none",  # the fleet speaks through the gateway login
                "VPP_TIME_SCALE": str(scale),
                "VPP_TIME_ORIGIN": str(origin),
                "VPP_LOG_LEVEL": "warning",
                # At ×scale one wall second of ingest lag is scale service seconds: allow ten
                # wall seconds, so readings are filed by their own ts (as bench/soak.py does).
                "VPP_MAX_CLOCK_SKEW_S": str(10.0 * scale),
                # One replica, no takeover to wait for: a lease of 30 wall s instead of a
                # service minute (3-6 s here), which event-loop stalls of a loaded process
                # outlast (the runner then stands by mid-event).
                "VPP_LEADER_LEASE_S": "30",
            }
            admin_key = await asyncio.to_thread(_spawn_key, env, "national-ops", "admin")
            buyer_key = await asyncio.to_thread(_spawn_key, env, "national-buyer", "hyperscaler")

            # --- bulk load ---------------------------------------------------------------
            now = clock.now_ms()
            t = time.perf_counter()
            frame = await asyncio.to_thread(registry_frame, profile, now)
            csv_bytes = frame.to_csv(index=False, header=False, na_rep="").encode()
            del frame
            t_rows = time.perf_counter() - t
            t = time.perf_counter()
            await asyncio.to_thread(copy_devices, dsn, csv_bytes, now)
            t_copy = time.perf_counter() - t
            del csv_bytes
            stages.add(
                f"bulk load {n_reg} devices (COPY into devices)",
                t_copy,
                f"rows generated in {t_rows:.1f} s, not counted",
            )

            # --- services start ----------------------------------------------------------
            port = free_port()
            serve = Proc(
                "vpp serve",
                [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
                work / "serve.log",
            )
            procs.append(serve)
            url = f"http://127.0.0.1:{port}"
            admin = {"Authorization": f"Bearer {admin_key}"}
            buyer = {"Authorization": f"Bearer {buyer_key}"}
            async with httpx.AsyncClient(timeout=120.0) as client:
                t0 = time.monotonic()
                serve.start(env)
                for k in range(ingest_workers):
                    w = Proc(
                        f"vpp ingest {k + 1}",
                        [sys.executable, "-m", "cli.main", "ingest"],
                        work / f"ingest-{k + 1}.log",
                    )
                    w.start(env)
                    procs.append(w)

                async def ready() -> bool:
                    assert serve.proc is not None
                    if serve.proc.poll() is not None:
                        raise RuntimeError(f"vpp serve exited; see {work / 'serve.log'}")
                    with contextlib.suppress(httpx.HTTPError):
                        return (await client.get(url + "/readyz", timeout=5.0)).status_code == 200
                    return False

                t_ready = await wait_until(ready, 600.0, 0.2)
                stages.add("services start (vpp serve spawned → /readyz 200)", t_ready)
                fleet_doc: dict[str, Any] = {}

                async def fleet_counts_all() -> bool:
                    with contextlib.suppress(httpx.HTTPError):
                        r = await client.get(url + "/v1/fleet", headers=admin)
                        if r.status_code == 200:
                            fleet_doc.update(r.json())
                            return int(fleet_doc["totals"]["registered"]) >= n_reg
                    return False

                t_cold = await wait_until(fleet_counts_all, 600.0, 0.2)
                stages.add(
                    f"fleet cold start: {n_reg} devices",
                    None if t_cold is None else time.monotonic() - t0,
                    "vpp serve spawned → first GET /v1/fleet counting them all",
                )

                # --- the live fleet ------------------------------------------------------
                fleet_cfg, out_path = work / "fleet.json", work / "fleet-out.json"
                fleet_cfg.write_text(
                    json.dumps(
                        {
                            "live": n_live,
                            "mqtt_url": f"mqtt://127.0.0.1:{broker.port}",
                            "gateway_username": broker.gateway_username,
                            "gateway_password": broker.gateway_password,
                            "gateways": gateways,
                            "out": str(out_path),
                        }
                    )
                )
                fleet = Proc(
                    "fleet (simulator)",
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--fleet-worker",
                        str(fleet_cfg),
                    ],
                    work / "fleet.log",
                )
                fleet.start(env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                stages.procs = [*procs, fleet]
                assert fleet.proc is not None and fleet.proc.stdout is not None
                line = await asyncio.to_thread(fleet.proc.stdout.readline)
                if line.strip() != b"ready":
                    raise RuntimeError(f"fleet did not start; see {work / 'fleet.log'}")
                t0 = time.monotonic()

                async def all_accepted() -> bool:
                    n = await asyncio.to_thread(
                        db_scalar, dsn, "SELECT count(DISTINCT device_id) FROM telemetry_intervals"
                    )
                    return int(n or 0) >= n_live

                t_acc = await wait_until(all_accepted, 900.0, 0.5)
                stages.add(
                    f"telemetry for {n_live} live devices accepted",
                    t_acc,
                    "fleet connected → a committed reading of every live device",
                )

                await print_counters(client, url)

                async def fleet_fresh() -> bool:
                    await fleet_counts_all()
                    return int(fleet_doc.get("totals", {}).get("fresh", 0)) >= 0.98 * n_live

                # The fleet view is a cached snapshot (served stale while it rebuilds): the
                # market and the planner see what it sees.
                t_fresh = await wait_until(fleet_fresh, 300.0, 0.5)
                stages.add(
                    f"fleet view fresh: {n_live} live devices",
                    None if t_fresh is None or t_acc is None else t_acc + t_fresh,
                    "fleet connected → GET /v1/fleet counts 98 % of them fresh",
                )
                tot = fleet_doc.get("totals", {})
                print(
                    f"national: fleet reads registered {tot.get('registered'):,}, online "
                    f"{tot.get('online'):,}, fresh {tot.get('fresh'):,}, available "
                    f"{tot.get('available_mw', 0):.1f} MW",
                    flush=True,
                )
                for p in procs:
                    p.sample()

                # --- forecast ------------------------------------------------------------
                t_now = clock.now_ms()
                q = (
                    f"/v1/forecast?region={REGION}&start={_iso(t_now)}"
                    f"&end={_iso(t_now + 48 * 3_600_000)}&step=PT15M"
                )
                t = time.perf_counter()
                r = await client.get(url + q, headers=buyer)
                t_fc = time.perf_counter() - t
                stages.add(
                    "forecast (48 h, 15-minute steps, one region)", t_fc, f"HTTP {r.status_code}"
                )

                # --- quote + commit ------------------------------------------------------
                avail = float(tot.get("available_mw", 0.0))
                # The window opens lead_wall_s on (quote, commit and the grid event must fit in
                # it), on a settlement interval.
                lead_ms = max(5 * 60_000, int(profile.lead_wall_s * scale * 1000))
                start = -(-(clock.now_ms() + lead_ms) // SLOT_MS) * SLOT_MS
                end = start + profile.duration_min * 60_000
                # Ask for all the fleet holds now: the quote offers what the P90 allows (a partial
                # quote), so the request takes every device the planner can use.
                req_mw = round(max(avail, 0.1), 3)
                body = {
                    "region": REGION,
                    "mw": req_mw,
                    "start": _iso(start),
                    "end": _iso(end),
                    "firmness": 0.9,
                }
                t = time.perf_counter()
                r = await client.post(url + "/v1/capacity-requests", json=body, headers=buyer)
                t_quote = time.perf_counter() - t
                request_id = None
                quoted = 0.0
                if r.status_code == 201 and r.json().get("status") == "quoted":
                    request_id = r.json()["id"]
                    quoted = float(r.json().get("quoted_mw") or 0.0)
                    c = await client.post(
                        url + f"/v1/capacity-requests/{request_id}/commit", headers=buyer
                    )
                    t_qc = time.perf_counter() - t
                    ok = c.status_code == 200
                    stages.add(
                        "quote+commit",
                        t_qc if ok else None,
                        f"asked {req_mw} MW, quoted {quoted} MW in {t_quote:.2f} s; "
                        f"commit HTTP {c.status_code}",
                    )
                    if not ok:
                        print(f"national: commit answered {c.text[:300]}", flush=True)
                        request_id = None
                else:
                    stages.add("quote+commit", None, f"quote HTTP {r.status_code}: {r.text[:200]}")

                # --- grid event ----------------------------------------------------------
                ge_mw = round(max(avail * 0.20, 0.1), 3)
                body = {"region": REGION, "mw": ge_mw, "start": _iso(start), "end": _iso(end)}
                t = time.perf_counter()
                r = await client.post(url + "/v1/grid-events", json=body, headers=admin)
                t_ge = time.perf_counter() - t
                grid_id = r.json().get("id") if r.status_code in (200, 201) else None
                stages.add(
                    "grid event planned",
                    t_ge if grid_id else None,
                    f"{ge_mw} MW, HTTP {r.status_code}" + ("" if grid_id else f": {r.text[:200]}"),
                )
                event_ids = [e for e in (request_id, grid_id) if e]
                print(
                    f"national: window {_iso(start)} – {_iso(end)}, opens in "
                    f"{clock.wall_seconds((start - clock.now_ms()) / 1000):.0f} s wall",
                    flush=True,
                )

                # --- commands out, acks in -----------------------------------------------
                wait_s = clock.wall_seconds((start - clock.now_ms()) / 1000.0)
                await asyncio.sleep(max(wait_s, 0.0))
                # The opening wave: the commands stored and sent once nothing new has come for
                # a wall second (the closed loop's enlistments and replacements, a service
                # minute apart, come after it).
                last: dict[str, Any] = {}
                stable = {"n": 0}

                async def wave_sent() -> bool:
                    cur = await asyncio.to_thread(command_counts, dsn, event_ids, 1 << 62)
                    done = cur["stored"] > 0 and cur["sent"] == cur["stored"]
                    same = cur == last
                    last.clear()
                    last.update(cur)
                    stable["n"] = stable["n"] + 1 if done and same else 0
                    return stable["n"] >= 4

                await wait_until(wave_sent, clock.wall_seconds(profile.duration_min * 60) + 60)
                wave = dict(last)
                # Wall seconds from the first command stored (the runner stores and sends the
                # opening wave just before the window opens) to ``t_ms``.
                first = int(wave.get("first_created") or start)

                def since_first(t_ms: int | None) -> float | None:
                    return None if t_ms is None else clock.wall_seconds((t_ms - first) / 1000.0)

                t_sent = since_first(wave.get("last_sent"))
                stages.add(
                    f"commands stored+published: {wave.get('sent', 0)} of {wave.get('stored', 0)}",
                    t_sent,
                    f"first stored → last sent, "
                    f"{clock.wall_seconds((first - start) / 1000.0):+.2f} s from the window's "
                    f"open; {wave.get('live', 0)} to live devices, {wave.get('silent', 0)} to "
                    "silent ones",
                )
                stable["n"] = 0
                last.clear()
                wave_until = int(wave.get("last_created") or start) + 1

                async def acks_settled() -> bool:
                    cur = await asyncio.to_thread(command_counts, dsn, event_ids, wave_until)
                    same = cur.get("acked") == last.get("acked")
                    last.clear()
                    last.update(cur)
                    stable["n"] = stable["n"] + 1 if same else 0
                    # Every live device that answers has (2 % of the simulated ones never do),
                    # or 30 wall seconds without a new ack (at a million devices acks come in
                    # bursts: the fleet's ticks, the runner's ack batches).
                    answered = cur["live_acked"] >= 0.97 * cur["live"]
                    return cur["acked"] > 0 and ((answered and same) or stable["n"] >= 120)

                await wait_until(acks_settled, 240.0)
                wave = dict(last)
                t_acks = since_first(wave.get("last_ack"))
                stages.add(
                    f"acks in: {wave.get('acked', 0)} of {wave.get('sent', 0)}",
                    t_acks,
                    f"first stored → last ack of the opening wave; live devices acked "
                    f"{wave.get('live_acked', 0)} of {wave.get('live', 0)}",
                )
                for p in procs:
                    p.sample()

                # --- settlement ----------------------------------------------------------
                wait_s = clock.wall_seconds((end - clock.now_ms()) / 1000.0)
                await asyncio.sleep(max(wait_s, 0.0))
                t0 = time.monotonic()
                doc: dict[str, Any] = {}

                async def settled() -> bool:
                    if request_id is None:
                        return True
                    with contextlib.suppress(httpx.HTTPError):
                        r = await client.get(
                            url + f"/v1/capacity-requests/{request_id}", headers=buyer
                        )
                        if r.status_code == 200:
                            doc.clear()
                            doc.update(r.json())
                            # Final: every interval settled (before, the figures cover the
                            # intervals measured so far).
                            return doc.get("status") == "completed" and bool(doc.get("settled"))
                    return False

                t_settle = await wait_until(settled, max(60.0, clock.wall_seconds(900)), 0.5)
                perf = doc.get("performance")
                stages.add(
                    "settlement (window end → request completed and settled)",
                    t_settle if request_id else None,
                    f"status {doc.get('status')}, performance {perf}, request window "
                    f"{doc.get('start')} – {doc.get('end')}",
                )
                ivs = doc.get("intervals") or []
                if ivs:
                    print(
                        "national: intervals (target → delivered MW): "
                        + ", ".join(
                            f"{str(iv.get('start'))[11:16]} {iv.get('target_mw'):.1f}→"
                            f"{iv.get('delivered_mw'):.1f}"
                            for iv in ivs
                        ),
                        flush=True,
                    )
                for p in procs:
                    p.sample()
                await print_counters(client, url)
            # --- stop, memory ------------------------------------------------------------
            if fleet.proc is not None and fleet.proc.stdin is not None:
                fleet.proc.stdin.write(b"stop\n")
                fleet.proc.stdin.flush()
                await asyncio.to_thread(fleet.proc.wait, 120)
            fleet_out = json.loads(out_path.read_text()) if out_path.exists() else {}
            print(
                f"national: fleet {fleet_out.get('summary')}; mute devices (never ack) "
                f"{fleet_out.get('mute')}",
                flush=True,
            )
            fleet.peak_kib = fleet_out.get("vmhwm_kib") or fleet.peak_kib
            for p in procs:
                p.stop()
    finally:
        for p in [*procs, *([fleet] if fleet else [])]:
            with contextlib.suppress(Exception):
                p.stop()
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    print(
        f"\nnational: {n_reg:,} registered, {n_live:,} live, ×{scale:g}, "
        f"{time.monotonic() - t_run:.0f} s wall",
        flush=True,
    )
    for stage_line in stages.lines:
        print(f"  {stage_line}")
    bench_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mem = [(p.name, p.peak_kib) for p in procs] + ([(fleet.name, fleet.peak_kib)] if fleet else [])
    mem.append(("bench itself", bench_kib))
    print(
        "  peak memory (VmHWM): "
        + ", ".join(f"{name} {kib / 1024:,.0f} MiB" if kib else f"{name} –" for name, kib in mem)
    )
    print(f"  logs: {work}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="1/20: 50 000 registered, 5 000 live")
    ap.add_argument("--registered", type=int, help="registered devices")
    ap.add_argument("--live", type=int, help="of which live (the simulator)")
    ap.add_argument("--scale", type=float, help="VPP_TIME_SCALE (default ×10, --small ×20)")
    ap.add_argument(
        "--ingest-workers",
        type=int,
        default=1,
        help="vpp ingest processes besides vpp serve's own ingest",
    )
    ap.add_argument("--gateways", type=int, default=2, help="the fleet's gateway connections")
    ap.add_argument("--fleet-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.fleet_worker:
        fleet_worker(a.fleet_worker)
        return
    p = SMALL if a.small else FULL
    p = Profile(
        registered=a.registered or p.registered,
        live=a.live or p.live,
        scale=a.scale or p.scale,
        duration_min=p.duration_min,
        lead_wall_s=p.lead_wall_s,
    )
    if not 0 < p.live <= p.registered:
        raise SystemExit("--live: must be between 1 and --registered")
    asyncio.run(national(p, a.ingest_workers, a.gateways))


if __name__ == "__main__":
    main()
