"""Fault-test harness: ``vpp serve`` as real processes (this tree's code) on a fresh PostgreSQL
database, the shared Redis under a unique prefix and a private Mosquitto, with contract-only
battery emulators (tests/helpers/emulator.py) as the fleet."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from tests.helpers.emulator import BatteryEmulator
from tests.helpers.eventkit import summer_origin_ms, wait_for
from tests.helpers.mosquitto import MosquittoBroker, free_port
from tests.helpers.settings import REDIS_URL
from vpp.clock import Clock
from vpp.timefmt import to_rfc3339

ROOT = Path(__file__).resolve().parents[2]
REGION = "ERCOT-NORTH"


@dataclass
class Cluster:
    env: dict[str, str]
    clock: Clock
    db: Any
    broker: MosquittoBroker
    log: Path
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)  # port → process
    http: dict[int, httpx.AsyncClient] = field(default_factory=dict)
    emulator: BatteryEmulator | None = None
    operator: dict[str, str] = field(default_factory=dict)

    def serve(self, port: int | None = None) -> int:
        """Start one more ``vpp serve`` (only ``--port`` differs between replicas)."""
        port = port or free_port()
        cmd = [sys.executable, "-m", "cli.main", "serve", "--port", str(port)]
        out = self.log.open("ab")
        self.procs[port] = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
        )
        self.http[port] = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
        return port

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    async def ready(self, port: int) -> dict[str, Any] | None:
        with contextlib.suppress(httpx.HTTPError):
            r = await self.http[port].get("/readyz")
            if r.status_code == 200:
                return dict(r.json())
        return None

    async def replicas(self) -> dict[int, dict[str, Any]]:
        """/readyz ``replica`` of every running process (those that answer)."""
        out = {}
        for port in list(self.procs):
            doc = await self.ready(port)
            if doc is not None and "replica" in doc:
                out[port] = doc["replica"]
        return out

    async def leaders(self) -> list[int]:
        return [p for p, r in (await self.replicas()).items() if r["leader"]]

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    async def onboard(self, n: int, report_s: float = 20.0) -> list[str]:
        """Onboard ``n`` batteries through the API and start their emulator."""
        from store.keys import create_api_key

        key = await create_api_key(self.db, "fleetco", "fleet", self.clock.now_ms())
        prefix = uuid.uuid4().hex[:4]
        ids = [f"b{prefix}-{i:03d}" for i in range(n)]
        body = [
            {"id": d, "kind": "battery", "site_id": f"s-{d}", "region": REGION,
             "capacity_wh": 13_500, "max_discharge_w": 5_000, "max_charge_w": 5_000}
            for d in ids
        ]  # fmt: skip
        http = next(iter(self.http.values()))
        r = await http.post(
            "/v1/devices/bulk", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code in (200, 201), r.text
        b = self.broker
        self.emulator = BatteryEmulator(
            b.host, b.port, b.gateway_username, b.gateway_password, self.env["VPP_TOPIC_ROOT"],
            self.clock.time_scale, self.clock.origin_ms, ids, report_s=report_s,
        )  # fmt: skip
        self.emulator.start()
        self.operator = {
            "Authorization": "Bearer " + await create_api_key(self.db, "grid", "operator", 0)
        }
        return ids

    async def grid_event(self, port: int, mw: float, start_ms: int, end_ms: int) -> str:
        r = await self.http[port].post("/v1/grid-events", headers=self.operator, json={
            "region": REGION, "mw": mw, "start": to_rfc3339(start_ms), "end": to_rfc3339(end_ms)})  # fmt: skip  # noqa: E501
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async def capacity_request(self, port: int, mw: float, start_ms: int, end_ms: int) -> str:
        """Quote and commit a capacity request as a hyperscaler; its id."""
        from store.keys import create_api_key

        key = await create_api_key(self.db, "hyper", "hyperscaler", 0)
        auth = {"Authorization": f"Bearer {key}"}
        r = await self.http[port].post("/v1/capacity-requests", headers=auth, json={
            "region": REGION, "mw": mw, "start": to_rfc3339(start_ms), "end": to_rfc3339(end_ms)})  # fmt: skip  # noqa: E501
        assert r.status_code == 201 and r.json()["status"] == "quoted", r.text
        rid = str(r.json()["id"])
        r = await self.http[port].post(f"/v1/capacity-requests/{rid}/commit", headers=auth)
        assert r.status_code == 200 and r.json()["status"] == "committed", r.text
        return rid

    async def wait_service_ms(self, at_ms: int, timeout_s: float = 120) -> None:
        assert await wait_for(lambda: self.clock.now_ms() >= at_ms, timeout_s, 0.05)

    async def rows(self, model: Any, event_id: str) -> list[Any]:
        async with self.db.session() as s:
            q = select(model).where(model.event_id == event_id)
            return list((await s.execute(q)).scalars())

    async def event_status(self, event_id: str) -> str:
        from store.models import CapacityRequest, GridEvent

        async with self.db.session() as s:
            ev = await s.get(GridEvent, event_id) or await s.get(CapacityRequest, event_id)
            return str(ev.status) if ev is not None else "missing"


@contextlib.asynccontextmanager
async def cluster(
    fresh_pg_url: str,
    broker: MosquittoBroker,
    tmp_path: Path,
    *,
    scale: float = 60.0,
    **env_overrides: str,
) -> AsyncIterator[Cluster]:
    """Settings shared by every replica (only ``--port`` differs); stops everything after."""
    from store.database import Database
    from store.migrate import upgrade
    from store.state.redis import RedisStateStore

    origin = summer_origin_ms(scale)
    prefix = f"rep-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VPP_DATABASE_URL": fresh_pg_url,
        "VPP_REDIS_URL": REDIS_URL,
        "VPP_MQTT_URL": broker.service_url,
        "VPP_TIME_SCALE": str(scale),
        "VPP_TIME_ORIGIN": str(origin),
        "VPP_TOPIC_ROOT": broker.topic_root,
        "VPP_STATE_PREFIX": prefix,
        "VPP_SHARE_GROUP": f"g-{prefix}",
        "VPP_BROKER_CREDENTIALS": "none",
        "VPP_LOG_LEVEL": "warning",
        **env_overrides,
    }
    await asyncio.to_thread(upgrade, fresh_pg_url)
    db = Database(fresh_pg_url)
    c = Cluster(env, Clock(scale, origin), db, broker, tmp_path / "serve.log")
    try:
        yield c
    finally:
        if c.emulator is not None:
            c.emulator.stop()
        for port, proc in list(c.procs.items()):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            c.procs.pop(port, None)
        for http in c.http.values():
            await http.aclose()
        await db.dispose()
        store = RedisStateStore(REDIS_URL, prefix=prefix)
        with contextlib.suppress(Exception):
            await store.flush_prefix()
        await store.close()


def kill_broker(broker: MosquittoBroker, killed: subprocess.Popen[bytes] | None) -> None:
    """``kill -9`` the private Mosquitto (by pid, or the process a previous restart made)."""
    if killed is None:
        os.kill(broker.pid, signal.SIGKILL)
    else:
        killed.kill()
        killed.wait(5)


def start_broker_again(broker: MosquittoBroker) -> subprocess.Popen[bytes]:
    """Start Mosquitto again with the same config, port and dynsec file."""
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(broker.workdir / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc
