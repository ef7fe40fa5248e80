"""A VEN client (a device maker's cloud) with the real ``openadr3`` client from PyPI: its
resources join the fleet as devices reached over OpenADR, its reports are their telemetry, and
when a BL's event is dispatched onto them the service publishes OpenADR events targeting them,
seen by that VEN and not by another. Bad input gets the spec's problem object and changes
nothing. Every VTN answer is checked against the vendored spec (``SpecCheck``)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openadr3
from sqlalchemy import func, select

from api.app import create_app
from devices.ingest import IngestWorker
from dispatch import events as es
from dispatch.openadr.ven_devices import VenCommands
from dispatch.runner.loop import EventRunner
from store.keys import create_api_key
from store.models import Command, Device, OpenAdrObject, TelemetryInterval
from store.openadr import create_client
from tests.helpers.eventkit import summer_clock, wait_for
from tests.helpers.openadr import event_body, live_vtn
from tests.helpers.settings import settings_for
from vpp.timefmt import parse_rfc3339, to_rfc3339

SCALE = 60.0
REGION = "ERCOT-NORTH"


def call(fn: Any, *args: Any, **kw: Any) -> Any:
    return asyncio.to_thread(fn, *args, **kw)


def battery(name: str, ven_id: str, kw: float, kwh: float, region: str = REGION) -> dict[str, Any]:
    attrs = {"KIND": ["battery"], "REGION": [region], "MAX_POWER_EXPORT": [kw],
             "MAX_POWER_CONSUMPTION": [kw], "STORAGE_USABLE_CAPACITY": [kwh]}  # fmt: skip
    return {
        "resourceName": name,
        "venID": ven_id,
        "attributes": [{"type": k, "values": v} for k, v in attrs.items()],
    }


def usage_report(event_id: str, program_id: str, readings: dict[str, tuple[float, float]],
                 start_ms: int) -> dict[str, Any]:  # fmt: skip
    """A report of USAGE (kW, + consumed) and STORAGE_CHARGE_LEVEL (%) per resource over the
    5 minutes from ``start_ms``."""
    return {
        "programID": program_id,
        "eventID": event_id,
        "clientName": "oem-cloud",
        "resources": [
            {
                "resourceName": name,
                "intervalPeriod": {"start": to_rfc3339(start_ms), "duration": "PT5M"},
                "intervals": [{"id": 0, "payloads": [
                    {"type": "USAGE", "values": [usage]},
                    {"type": "STORAGE_CHARGE_LEVEL", "values": [soc]},
                    {"type": "BASELINE", "values": [usage]},
                ]}],
            }
            for name, (usage, soc) in readings.items()
        ],
    }  # fmt: skip


async def _is(value: Any, want: str) -> bool:
    return bool(await value == want)


async def counts(svc: Any) -> tuple[int, int]:
    async with svc.db.session() as s:
        objects = await s.scalar(select(func.count()).select_from(OpenAdrObject))
        devices = await s.scalar(select(func.count()).select_from(Device))
    return int(objects or 0), int(devices or 0)


async def test_ven_resources_are_devices_commanded_by_events(
    db_url: str, services_factory: Any
) -> None:
    """On SQLite, then on PostgreSQL with Redis."""
    settings = settings_for(db_url, time_scale=SCALE, openadr_token_ttl_s=30 * 86_400)
    svc = await services_factory(settings, clock=summer_clock(SCALE))
    ingest = IngestWorker(svc)
    await ingest.start()
    svc.openadr.devices.ingest = ingest  # as `vpp serve` wires it
    runner = EventRunner(svc, owner="ven-test", openadr=VenCommands(svc, svc.openadr.webhooks))
    await runner.start()
    app = create_app(services=svc)
    api = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    fleet_key = await create_api_key(svc.db, "oemco", "fleet", svc.clock.now_ms())
    v1 = {"Authorization": f"Bearer {fleet_key}"}
    try:
        async with live_vtn(app) as vtn:
            now = svc.clock.now_ms
            bl_id, bl_secret = await create_client(svc.db, "oemco", "bl", now())
            bl = vtn.client(await call(vtn.token, bl_id, bl_secret))
            clients = {}
            for name in ("oem-a", "oem-b"):
                cid, secret = await create_client(svc.db, "oemco", "ven", now(), ven_name=name)
                token = await call(vtn.token, cid, secret, sorted(openadr3.VEN_SCOPES))
                clients[name] = vtn.client(token, "ven")
            ven_a, ven_b = clients["oem-a"], clients["oem-b"]
            va = (await call(ven_a.create_ven, {"venName": "oem-a"})).json()
            vb = (await call(ven_b.create_ven, {"venName": "oem-b"})).json()

            # Resources join the fleet: one home battery, one aggregated group (the summed
            # figures of its homes), and B's battery in another region.
            r = await call(ven_a.create_resource, battery("home-1", va["id"], 5.0, 13.5))
            assert r.status_code == 201, r.text
            home = r.json()
            r = await call(ven_a.create_resource, battery("group-1", va["id"], 50.0, 135.0))
            group = r.json()
            elsewhere = battery("b-1", vb["id"], 5.0, 13.5, "ERCOT-HOUSTON")
            r = await call(ven_b.create_resource, elsewhere)
            assert r.status_code == 201, r.text
            b1 = r.json()
            listed = (await api.get("/v1/devices", headers=v1)).json()["devices"]
            by_id = {d["id"]: d for d in listed}
            assert set(by_id) == {home["id"], group["id"], b1["id"]}
            g = by_id[group["id"]]
            assert g["region"] == REGION and g["kind"] == "battery" and g["transport"] == "openadr"
            assert g["capacity_wh"] == 135_000 and g["max_discharge_w"] == 50_000
            assert g["vendor"] == "oem-a" and by_id[b1["id"]]["region"] == "ERCOT-HOUSTON"

            # Bad input: the spec's problem, the attribute or field named, nothing changed.
            before = await counts(svc)
            bad = battery("home-2", va["id"], 5.0, 13.5)
            bad["attributes"] = bad["attributes"][:-1]  # no STORAGE_USABLE_CAPACITY
            r = await call(ven_a.create_resource, bad)
            assert r.status_code == 400 and "STORAGE_USABLE_CAPACITY" in r.json()["detail"]
            r = await call(ven_a.create_resource, battery("home-2", va["id"], 5.0, 13.5, "MARS"))
            assert r.status_code == 400 and "attributes[1].values" in r.json()["detail"]
            r = await call(ven_a.create_resource, battery("home-2", va["id"], -5.0, 13.5))
            assert r.status_code == 400 and "MAX_POWER_EXPORT" in r.json()["detail"]
            # Another VEN's object: B cannot change A's resource (it does not exist for B).
            r = await call(ven_b.update_resource, home["id"], battery("home-1", va["id"], 9, 9))
            assert r.status_code == 404 and r.json()["status"] == 404
            # Wrong scope: a VEN does not write programs.
            r = await call(ven_a.create_program, {"programName": "mine", "targets": [REGION]})
            assert r.status_code == 403 and "write_programs" in r.json()["detail"]
            assert await counts(svc) == before

            # The BL's program and event: one grid event in the region, starting in 8 minutes.
            program = await call(bl.create_program, {"programName": "dr", "targets": [REGION]})
            assert program.status_code == 201, program.text
            pid = program.json()["id"]
            start = (now() // 60_000 + 8) * 60_000
            r = await call(bl.create_event, event_body(pid, to_rfc3339(start), [20.0]))
            assert r.status_code == 201, r.text
            bl_event = r.json()["id"]
            (grid,) = await es.grid_events_of_source(svc, es.SOURCE_OPENADR, bl_event)

            # More bad input: an unknown program or event, a resource of another VEN,
            # malformed intervals.
            before = await counts(svc)
            r = await call(bl.create_event, event_body("pro-nope", to_rfc3339(start), [20.0]))
            assert r.status_code == 400 and "programID" in r.json()["detail"]
            t = now() - 300_000
            report = usage_report(bl_event, pid, {"home-1": (-1.0, 80.0)}, t)
            r = await call(ven_a.create_report, {**report, "eventID": "eve-nope"})
            assert r.status_code == 400 and "eventID" in r.json()["detail"]
            r = await call(ven_a.create_report, usage_report(bl_event, pid, {"b-1": (1, 50)}, t))
            assert r.status_code == 400 and "resources[0].resourceName" in r.json()["detail"]
            broken = usage_report(bl_event, pid, {"home-1": (-1.0, 80.0)}, t)
            broken["resources"][0]["intervalPeriod"]["duration"] = "soon"
            r = await call(ven_a.create_report, broken)
            assert r.status_code == 400
            assert "resources[0].intervalPeriod.duration" in r.json()["detail"]
            over = usage_report(bl_event, pid, {"home-1": (1, 150)}, t)
            r = await call(ven_a.create_report, over)
            assert r.status_code == 400 and "STORAGE_CHARGE_LEVEL" in r.json()["detail"]
            assert await counts(svc) == before
            detail = (await api.get(f"/v1/devices/{home['id']}", headers=v1)).json()
            assert detail["last_telemetry"] is None  # nothing taken from the refused reports

            # The VEN's report is its devices' telemetry: USAGE −2 kW is 2 kW of output.
            async def report_now() -> None:
                readings = {"home-1": (-2.0, 90.0), "group-1": (0.0, 95.0)}
                body = usage_report(bl_event, pid, readings, now() - 300_000)
                r = await call(ven_a.create_report, body)
                assert r.status_code == 201, r.text

            await report_now()

            async def heard() -> bool:
                d = (await api.get(f"/v1/devices/{home['id']}", headers=v1)).json()
                return d["last_telemetry"] is not None

            assert await wait_for(heard, 10)
            d = (await api.get(f"/v1/devices/{home['id']}", headers=v1)).json()
            assert d["last_telemetry"]["power_kw"] == 2.0 and d["last_telemetry"]["soc_pct"] == 90
            assert d["freshness"] == "fresh" and d["available_kw"] > 0

            async def in_history() -> bool:  # what the forecast and settlement read
                async with svc.db.session() as s:
                    rows = (
                        await s.execute(
                            select(TelemetryInterval).where(
                                TelemetryInterval.device_id == home["id"]
                            )
                        )
                    ).scalars()
                    return any(r.power_w == 2000.0 and r.soc_pct == 90.0 for r in rows)

            assert await wait_for(in_history, 10)

            async def in_fleet_view() -> bool:  # GET /v1/fleet: the region's batteries
                rows = (await api.get("/v1/fleet", headers=v1)).json()["regions"]
                row = next(r for r in rows if (r["region"], r["kind"]) == (REGION, "battery"))
                return bool(
                    row["registered"] == 2 and row["fresh"] >= 1 and row["available_mw"] > 0
                )

            assert await wait_for(in_fleet_view, 10)

            # The core dispatches the grid event onto A's devices: OpenADR events target them.
            async def dispatched() -> list[dict[str, Any]]:
                evs = (await call(ven_a.get_events)).json()
                return [e for e in evs if e["id"] != bl_event]

            async def commanded() -> bool:
                await report_now()  # the VEN keeps reporting: its devices stay fresh
                return bool(await dispatched())

            assert await wait_for(commanded, 20, step_s=1.0)
            mine = await dispatched()
            names = {home["id"]: "home-1", group["id"]: "group-1"}
            async with svc.db.session() as s:
                cmds = list(
                    (
                        await s.execute(select(Command).where(Command.event_id == grid.info.id))
                    ).scalars()
                )
            assert cmds and {c.device_id for c in cmds} <= set(names)
            for ev in mine:
                assert ev["targets"][0] == "oem-a" and ev["targets"][1] in names.values()
                (iv,) = ev["intervals"]
                (payload,) = iv["payloads"]
                assert payload["type"] == "DISPATCH_SETPOINT" and payload["values"][0] > 0
                assert parse_rfc3339(ev["intervalPeriod"]["start"]) == start
                # Not visible to the other VEN, by list or by id.
                r = await call(ven_b.get_event_by_id, ev["id"])
                assert r.status_code == 404
            assert {e["id"] for e in (await call(ven_b.get_events)).json()} == {bl_event}

            # Reading its event acknowledges the device's command as received, a report on
            # it as started.
            ev = mine[0]
            device = next(k for k, v in names.items() if v == ev["targets"][1])

            async def status() -> str | None:
                async with svc.db.session() as s:
                    return await s.scalar(
                        select(Command.status).where(
                            Command.event_id == grid.info.id, Command.device_id == device
                        )
                    )

            assert await wait_for(lambda: _is(status(), "received"), 10)
            body = usage_report(ev["id"], ev["programID"], {ev["targets"][1]: (-3.0, 88.0)},
                                now() - 60_000)  # fmt: skip
            assert (await call(ven_a.create_report, body)).status_code == 201

            assert await wait_for(lambda: _is(status(), "started"), 10)

            # Aborting the grid event restores the devices: their events end now.
            await es.abort_grid_event(svc, grid.info.id)

            async def cut() -> bool:
                e = (await call(ven_a.get_event_by_id, ev["id"])).json()
                return e["intervalPeriod"]["duration"] != ev["intervalPeriod"]["duration"]

            assert await wait_for(cut, 10)

            # Updating a resource updates its device; its KIND stays; deleting offboards it.
            r = await call(
                ven_a.update_resource, group["id"], battery("group-1", va["id"], 60, 135)
            )
            assert r.status_code == 200, r.text
            g = (await api.get(f"/v1/devices/{group['id']}", headers=v1)).json()
            assert g["max_discharge_w"] == 60_000 and g["capacity_wh"] == 135_000
            solar = {**battery("group-1", va["id"], 60, 135)}
            solar["attributes"] = [{"type": "KIND", "values": ["solar"]}, *solar["attributes"][1:]]
            r = await call(ven_a.update_resource, group["id"], solar)
            assert r.status_code == 400 and "KIND" in r.json()["detail"]
            got = (await call(ven_a.get_resource_by_id, group["id"])).json()
            assert got["attributes"][0]["values"] == ["battery"]
            assert (await call(ven_b.delete_resource, b1["id"])).status_code == 200
            r = await api.get(f"/v1/devices/{b1['id']}", headers=v1)
            assert r.status_code == 404
            assert vtn.check.checked >= 20
    finally:
        await runner.stop()
        await ingest.stop()
        await api.aclose()
