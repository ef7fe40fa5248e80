"""Crash safety with a real process kill: ``vpp serve`` (API, ingest, runner) runs a grid event
for a simulated fleet on the real servers; mid-event it gets SIGKILL, then starts again. The
event carries on from the stored plan and commands, no device ever receives a second, different
command for the event, and nothing stays under command past its window."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import select

from tests.helpers.eventkit import summer_origin_ms, wait_for
from tests.helpers.settings import REDIS_URL
from vpp.clock import Clock
from vpp.settings import Settings
from vpp.timefmt import to_rfc3339

SCALE = 60.0
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    exe = ROOT / ".venv" / "bin" / "vpp"
    cmd = [str(exe), "serve"] if exe.exists() else [sys.executable, "-m", "cli.main", "serve"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


@pytest.mark.slow
async def test_kill_9_mid_event_resumes_without_conflicting_commands(
    fresh_pg_url, mqtt_url, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from devices.mqtt import make_client
    from sim.simulator import FleetSimulator
    from store.database import Database
    from store.keys import create_api_key
    from store.migrate import upgrade
    from store.models import Command, EventTimeline, GridEvent

    port = _free_port()
    origin = summer_origin_ms(SCALE)
    prefix = f"crash-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "VPP_DATABASE_URL": fresh_pg_url,
        "VPP_REDIS_URL": REDIS_URL,
        "VPP_MQTT_URL": mqtt_url,
        "VPP_TIME_SCALE": str(SCALE),
        "VPP_TIME_ORIGIN": str(origin),
        "VPP_TOPIC_ROOT": f"{prefix}/v1",
        "VPP_STATE_PREFIX": prefix,
        "VPP_BROKER_CREDENTIALS": "none",
        "VPP_API_PORT": str(port),
        "VPP_LOG_LEVEL": "warning",
    }
    settings = Settings(database_url=fresh_pg_url, redis_url=REDIS_URL, mqtt_url=mqtt_url,
                        time_scale=SCALE, time_origin=origin, topic_root=f"{prefix}/v1",
                        state_prefix=prefix, broker_credentials="none",
                        api_port=port)  # type: ignore[call-arg]  # fmt: skip
    clock = Clock(SCALE, origin)
    await asyncio.to_thread(upgrade, fresh_pg_url)
    db = Database(fresh_pg_url)
    log = tmp_path / "serve.log"
    proc = _serve(env, log)
    base = f"http://127.0.0.1:{port}"
    http = httpx.AsyncClient(base_url=base, timeout=60)

    async def healthy() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return (await http.get("/healthz")).status_code == 200
        return False

    # Every command a device is sent, as the devices see it.
    seen: dict[str, list[bytes]] = defaultdict(list)
    lock = threading.Lock()

    def on_cmd(topic: str, payload: bytes) -> None:
        with lock:
            seen[topic.split("/")[-2]].append(payload)

    spy = make_client(mqtt_url, f"spy-{prefix}")
    spy.on_message = on_cmd
    await spy.subscribe([f"{prefix}/v1/devices/+/cmd"], qos=1)
    await spy.connect()
    stop = asyncio.Event()
    sim_task = None
    try:
        assert await wait_for(healthy, 60, 0.3), log.read_text()[-3000:]
        fleet_key = await create_api_key(db, "fleetco", "fleet", clock.now_ms())
        op = {"Authorization": "Bearer " + await create_api_key(db, "grid", "operator", 0)}
        sim = FleetSimulator(settings, 400, ["ERCOT-NORTH"], clock=clock, api_url=base,
                             api_key=fleet_key, seed=5, id_prefix="crash", tick_s=15,
                             fleet_options={"never_answer_share": 0.0})  # fmt: skip
        assert await sim.onboard() == 400
        sim_task = asyncio.create_task(sim.run(stop))
        t0 = clock.now_ms()
        assert await wait_for(lambda: clock.now_ms() > t0 + 20 * 60_000, 60)
        start = (clock.now_ms() // 300_000 + 2) * 300_000
        end = start + 3_600_000
        r = await http.post("/v1/grid-events", headers=op, json={
            "region": "ERCOT-NORTH", "mw": 0.4,
            "start": to_rfc3339(start), "end": to_rfc3339(end)})  # fmt: skip
        assert r.status_code == 201, r.text
        ev_id = r.json()["id"]

        async def commands() -> list[Command]:
            async with db.session() as s:
                q = select(Command).where(Command.event_id == ev_id)
                return list((await s.execute(q)).scalars())

        assert await wait_for(lambda: clock.now_ms() > start + 15 * 60_000, 60)
        before = {c.id: c for c in await commands()}
        assert before and sim.summary()["under_command"] > 0

        proc.send_signal(signal.SIGKILL)  # kill -9, mid-event
        proc.wait(10)
        killed_at = clock.now_ms()
        await asyncio.sleep(2.0)  # two service minutes without a service
        proc = _serve(env, log)
        assert await wait_for(healthy, 60, 0.3), log.read_text()[-3000:]

        async def status() -> str:
            async with db.session() as s:
                return str((await s.get(GridEvent, ev_id)).status)  # type: ignore[union-attr]

        assert await wait_for(lambda: clock.now_ms() > end + 20 * 60_000, 120)
        assert await status() == "completed", log.read_text()[-3000:]
        after = await commands()
        async with db.session() as s:
            points = list((await s.execute(
                select(EventTimeline.ts_ms).where(EventTimeline.event_id == ev_id))).scalars())  # fmt: skip  # noqa: E501
        truth = sim.ground_truth()
    finally:
        stop.set()
        if sim_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sim_task, 20)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        await spy.disconnect()
        await http.aclose()
        await db.dispose()

    # The event carried on after the restart: the closed loop kept recording.
    assert any(p > killed_at + 60_000 for p in points)
    # Commands stored before the kill are unchanged (same id, same fields).
    by_id = {c.id: c for c in after}
    for cid, c in before.items():
        d = by_id[cid]
        assert (d.device_id, d.type, d.setpoint_w, d.offset_c, d.valid_from_ms, d.valid_until_ms) == (  # noqa: E501
            c.device_id, c.type, c.setpoint_w, c.offset_c, c.valid_from_ms, c.valid_until_ms)  # fmt: skip  # noqa: E501
    # No device received two different dispatch commands for the event (retries repeat the id).
    for dev, payloads in seen.items():
        docs = [orjson.loads(p) for p in payloads]
        dispatch = {d["command_id"]: p for d, p in zip(docs, payloads, strict=True)
                    if d.get("event_id") == ev_id and d["type"] != "restore"}  # fmt: skip
        assert len(dispatch) <= 1, (dev, dispatch)
        by_cmd = defaultdict(set)
        for d, p in zip(docs, payloads, strict=True):
            by_cmd[d["command_id"]].add(p)
        assert all(len(v) == 1 for v in by_cmd.values())  # a re-send is byte-identical
    # Nothing under command past its window (+ the thermostat release stagger and margin).
    assert all(c.valid_until_ms <= end + 16 * 60_000 + 60_000 for c in after)
    assert truth.under_command == []
    assert truth.batteries_below_reserve == 0
