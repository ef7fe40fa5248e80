"""The service as a VEN of an upstream utility VTN: our own VTN in a second process (``vpp
serve`` on its own SQLite file and port, its clients made with its CLI) plays the utility; a
real BL client (``openadr3``, every answer checked against the spec) creates programs and
events there; the service under test, configured by ``VPP_OPENADR_UPSTREAM``, polls it
(``tick()`` driven here), raises, keeps, updates and aborts grid events for them and writes
its delivery reports back, which the BL reads. A wrong secret and an upstream that goes away
cost a poll, show in ``/metrics`` and ``/readyz``, and it recovers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openadr3
import pytest
from pydantic import ValidationError

from api.app import create_app
from api.openadr.router import PREFIX
from dispatch import events as es
from dispatch.openadr import upstream
from dispatch.openadr.upstream import SOURCE, TENANT, UpstreamVens
from tests.helpers.eventkit import wait_for
from tests.helpers.mosquitto import free_port
from tests.helpers.openadr import LiveVtn, SpecCheck, event_body
from tests.helpers.settings import make_settings
from vpp.openadr import Delivered
from vpp.timefmt import to_rfc3339

ROOT = Path(__file__).resolve().parents[3]
VEN_NAME = "vpp-aggregator"


@dataclass
class Utility:
    """The upstream VTN: a ``vpp serve`` of its own, and its BL and VEN credentials."""

    env: dict[str, str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    bl: tuple[str, str] = ("", "")
    ven: tuple[str, str] = ("", "")
    check: SpecCheck = field(default_factory=SpecCheck)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def cli(self, *args: str) -> list[str]:
        out = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "cli.main", "serve", "--port", str(self.port)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("the upstream vpp serve did not come up: " + self.log.read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def bl_client(self) -> openadr3.OpenADRClient:
        live = LiveVtn(self.url, self.check)
        return live.client(live.token(*self.bl))


@pytest.fixture(scope="module")
def utility(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Utility]:
    d = tmp_path_factory.mktemp("utility")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPP_")}
    env.update({
        "VPP_DATABASE_URL": f"sqlite+aiosqlite:///{d / 'utility.db'}",
        "VPP_MQTT_URL": "memory://", "VPP_REDIS_URL": "memory://",
        "VPP_BROKER_CREDENTIALS": "none", "VPP_LOG_LEVEL": "warning",
        # The utility's own zone names, not ours: our config maps them.
        "VPP_REGIONS": json.dumps(["ZONE-7", "ERCOT-NORTH"]),
    })  # fmt: skip
    u = Utility(env, free_port(), d / "serve.log")
    u.bl = tuple(u.cli("openadr", "clients", "create", "--tenant", "gridco", "--role", "bl"))  # type: ignore[assignment]
    u.ven = tuple(u.cli("openadr", "clients", "create", "--tenant", "gridco", "--role", "ven",
                        "--ven-name", VEN_NAME))  # type: ignore[assignment]  # fmt: skip
    u.start()
    try:
        yield u
    finally:
        u.stop()


def call(fn: Any, *args: Any, **kw: Any) -> Any:
    return asyncio.to_thread(fn, *args, **kw)


def upstream_config(u: Utility, **overrides: Any) -> dict[str, Any]:
    cfg = {"url": u.url, "client_id": u.ven[0], "client_secret": u.ven[1],
           "ven_name": VEN_NAME, "programs": ["ercot-dr", "zone7-dr"],
           "regions": {"zone7-dr": "PJM-DOM"}}  # fmt: skip
    cfg.update(overrides)
    return cfg


async def service(services_factory: Any, sqlite_url: str, monkeypatch: Any,
                  upstreams: list[dict[str, Any]]) -> Any:  # fmt: skip
    """The service under test, configured the way an operator does it (the environment)."""
    monkeypatch.setenv("VPP_OPENADR_UPSTREAM", json.dumps(upstreams))
    return await services_factory(make_settings(sqlite_url))


async def live(svc: Any, source_id: str) -> list[es.EventRecord]:
    return [g for g in await es.grid_events_of_source(svc, SOURCE, source_id)
            if g.info.status in ("scheduled", "active")]  # fmt: skip


async def test_upstream_events_become_grid_events_and_get_reports(
    utility: Utility, services_factory: Any, sqlite_url: str, monkeypatch: Any
) -> None:
    tag = uuid.uuid4().hex[:6]  # the utility outlives the test (one per module)
    names = {n: f"{n}-{tag}" for n in ("ercot-dr", "zone7-dr", "other-dr")}
    cfg = upstream_config(utility, programs=[names["ercot-dr"], names["zone7-dr"]],
                          regions={names["zone7-dr"]: "PJM-DOM"})  # fmt: skip
    svc = await service(services_factory, sqlite_url, monkeypatch, [cfg])
    assert svc.settings.openadr_upstream[0].client_secret.get_secret_value() == utility.ven[1]
    bl = utility.bl_client()
    region = [{"type": "REGION", "values": ["ERCOT-NORTH"]}]
    ercot = {"programName": names["ercot-dr"], "attributes": region}
    zone7 = {"programName": names["zone7-dr"], "targets": ["ZONE-7"]}
    other = {"programName": names["other-dr"], "targets": ["ERCOT-NORTH"]}
    pids = {}
    for short, p in zip(names, (ercot, zone7, other), strict=True):
        r = await call(bl.create_program, p)
        assert r.status_code == 201, r.text
        pids[short] = r.json()["id"]
    now = svc.clock.now_ms()
    begun = to_rfc3339(now - 60_000)  # the first interval has begun a minute ago
    r = await call(bl.create_event, event_body(pids["ercot-dr"], begun, [500, 800]))
    assert r.status_code == 201, r.text
    ev = r.json()
    later = to_rfc3339(now + 3_600_000)
    r = await call(bl.create_event, event_body(pids["zone7-dr"], later, [2], units="MW"))
    z7 = r.json()
    r = await call(bl.create_event, event_body(pids["other-dr"], later, [900]))
    assert r.status_code == 201, r.text

    # The settlement's figures (computed as for the VTN's own reports, tests/api/openadr/
    # test_vtn_dispatch.py) need a dispatched fleet; here they are given.
    settled: list[Delivered] = [Delivered(now, now + 300_000, 3.0, 0.4)]

    async def fake_delivered(services: Any, grids: Any) -> tuple[list[Delivered], bool]:
        return list(settled), False

    monkeypatch.setattr(upstream, "delivered", fake_delivered)
    vens = UpstreamVens(svc)
    (link,) = vens.links
    host = f"127.0.0.1:{utility.port}"
    sid = f"{VEN_NAME}@{host}/{ev['id']}"
    assert await link.tick()
    # Our ven object upstream, made on first contact.
    (ven,) = (await call(bl.get_vens, venName=VEN_NAME)).json()
    assert link.ven_id == ven["id"]
    # The event's two runs: 0.5 MW from now (it had begun) for 14 min, then 0.8 MW for 15.
    a, b = await live(svc, sid)
    assert (a.info.region, a.info.mw, b.info.mw) == ("ERCOT-NORTH", 0.5, 0.8)
    assert a.info.tenant_id == TENANT and a.source == "openadr-upstream"
    assert now <= a.info.start_ms <= svc.clock.now_ms()
    assert a.info.end_ms == now - 60_000 + 15 * 60_000 == b.info.start_ms
    assert b.info.end_ms == b.info.start_ms + 15 * 60_000
    # The program mapped by the config: ZONE-7 upstream is PJM-DOM here.
    (z,) = await live(svc, f"{VEN_NAME}@{host}/{z7['id']}")
    assert (z.info.region, z.info.mw) == ("PJM-DOM", 2.0)
    # A program not configured is left alone.
    assert len(await es.grid_events_of_sources(svc, SOURCE, f"{VEN_NAME}@{host}/")) == 3

    # A delivery report for the event that has begun, readable by the BL, valid by the spec.
    (report,) = (await call(bl.get_reports, eventID=ev["id"])).json()
    assert report["clientName"] == VEN_NAME
    (res,) = report["resources"]
    assert res["resourceName"] == "AGGREGATED_REPORT"
    assert [payloads(i) for i in res["intervals"]] == [{"BASELINE": 3.0, "DEMAND": 0.4}]
    assert (await call(bl.get_reports, eventID=z7["id"])).json() == []  # not begun

    # Polling again changes nothing (the begun run is not raised again).
    assert await link.tick()
    assert [g.info.id for g in await live(svc, sid)] == [a.info.id, b.info.id]

    # The utility changes the second interval: the first run stays, the second is replaced.
    body = event_body(pids["ercot-dr"], begun, [500, 300])
    r = await call(bl.update_event, ev["id"], body)
    assert r.status_code == 200, r.text
    assert await link.tick()
    a2, c = await live(svc, sid)
    assert a2.info.id == a.info.id and c.info.mw == 0.3 and c.info.start_ms == b.info.start_ms
    assert (await es.get_grid_event(svc, b.info.id)).info.status == "aborted"
    # Another settlement interval measured: the same report, updated.
    settled.append(Delivered(now + 300_000, now + 600_000, 3.1, 0.5))
    assert await link.tick()
    (updated,) = (await call(bl.get_reports, eventID=ev["id"])).json()
    assert updated["id"] == report["id"]
    assert [payloads(i) for i in updated["resources"][0]["intervals"]] == [
        {"BASELINE": 3.0, "DEMAND": 0.4}, {"BASELINE": 3.1, "DEMAND": 0.5}]  # fmt: skip

    # A restart (a new poller, nothing in memory) finds it all again: no new grid event, the
    # same report.
    (link2,) = UpstreamVens(svc).links
    assert await link2.tick()
    assert [g.info.id for g in await live(svc, sid)] == [a.info.id, c.info.id]
    (again,) = (await call(bl.get_reports, eventID=ev["id"])).json()
    assert again == updated  # found, and not written again

    # The utility deletes the event: its grid events are aborted.
    assert (await call(bl.delete_event, ev["id"])).status_code == 200
    assert await link2.tick()
    assert await live(svc, sid) == []
    assert {g.info.status for g in await es.grid_events_of_source(svc, SOURCE, sid)} == {"aborted"}
    assert len(await live(svc, f"{VEN_NAME}@{host}/{z7['id']}")) == 1
    assert utility.check.checked >= 8
    await vens.stop()


def payloads(interval: dict[str, Any]) -> dict[str, float]:
    return {p["type"]: p["values"][0] for p in interval["payloads"]}


def metric(text: str, name: str, upstream: str) -> float:
    m = re.search(rf'^{name}{{upstream="{re.escape(upstream)}"}} (\S+)$', text, re.M)
    assert m, f"{name} for {upstream} not in /metrics"
    return float(m.group(1))


async def test_wrong_secret_and_upstream_down_cost_polls_not_the_loop(
    utility: Utility, services_factory: Any, sqlite_url: str, monkeypatch: Any
) -> None:
    wrong = upstream_config(utility, ven_name="vpp-wrong", client_secret="not-the-secret")
    svc = await service(services_factory, sqlite_url, monkeypatch,
                        [upstream_config(utility), wrong])  # fmt: skip
    svc.openadr_upstream = vens = UpstreamVens(svc)
    good, bad = vens.links
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(services=svc)),
                             base_url="http://t")  # fmt: skip
    try:
        await vens.tick()
        assert good.up is True and bad.up is False and "401" in str(bad.error)
        r = await http.get("/readyz")
        assert r.status_code == 200  # an upstream utility down does not make us unready
        states = {u["upstream"]: u["status"] for u in r.json()["openadr_upstream"]}
        assert states == {good.name: "ok", bad.name: "failing"}
        text = (await http.get("/metrics")).text
        assert metric(text, "vpp_openadr_upstream_up", bad.name) == 0
        assert metric(text, "vpp_openadr_upstream_up", good.name) == 1
        failures = metric(text, "vpp_openadr_upstream_failures_total", bad.name)
        assert failures >= 1
        # Backing off: the next poll is skipped, the one after tries (and fails) again, then 3
        # are skipped.
        await vens.tick()
        await vens.tick()
        for _ in range(3):
            assert not await bad.tick()
        text = (await http.get("/metrics")).text
        assert metric(text, "vpp_openadr_upstream_failures_total", bad.name) == failures + 1
        assert metric(text, "vpp_openadr_upstream_skipped_total", bad.name) >= 4

        # A token the utility no longer takes (expired, revoked there): one 401, a new token.
        good._token, good._token_until = "stale-token", time.monotonic() + 3600
        assert await good.tick() and good._token != "stale-token"

        # The utility goes away: a failed poll; it comes back: the next poll that runs works.
        await asyncio.to_thread(utility.stop)
        assert not await good.tick()
        r = await http.get("/readyz")
        states = {u["upstream"]: u["status"] for u in r.json()["openadr_upstream"]}
        assert states[good.name] == "failing"
        await asyncio.to_thread(utility.start)
        results = [await good.tick() for _ in range(2)]
        assert results == [False, True]  # one poll skipped, then back
        text = (await http.get("/metrics")).text
        assert metric(text, "vpp_openadr_upstream_up", good.name) == 1
        assert (await http.get("/readyz")).json()["openadr_upstream"][0]["status"] == "ok"
    finally:
        await http.aclose()
        await vens.stop()


async def test_serve_polls_from_the_background_and_bad_config_is_refused(
    utility: Utility, services_factory: Any, sqlite_url: str, monkeypatch: Any
) -> None:
    monkeypatch.setenv("VPP_OPENADR_UPSTREAM_POLL_S", "0.2")
    svc = await service(services_factory, sqlite_url, monkeypatch, [upstream_config(utility)])
    await svc.start_background()
    try:
        assert svc.openadr_upstream is not None
        (link,) = svc.openadr_upstream.links
        assert await wait_for(lambda: link.up is True, 20)  # the leader polls on its own
        assert link.ven_id is not None
        # Whatever an upstream sends as an event costs that event only (logged, not taken).
        for junk in ({"id": "e1", "intervals": "junk"}, {"id": "e2", "intervalPeriod": 5,
                     "intervals": [{"id": 0, "payloads": [{"type": None}]}]},
                     {"id": "e3" * 80, "intervals": []}):  # fmt: skip
            await link._sync_event(junk, "ERCOT-NORTH")
        assert await es.grid_events_of_sources(svc, SOURCE, link.prefix) == []
    finally:
        await svc.stop_background()
    # A region the service does not sell in, named by the config: refused at start.
    bad = upstream_config(utility, regions={"zone7-dr": "ZONE-7"})
    monkeypatch.setenv("VPP_OPENADR_UPSTREAM", json.dumps([bad]))
    with pytest.raises(ValidationError, match=r"openadr_upstream\[0\]\.regions\['zone7-dr'\]"):
        make_settings(sqlite_url)
