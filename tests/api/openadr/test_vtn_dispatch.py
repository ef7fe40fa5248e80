"""An OpenADR event from a real BL client (``openadr3``) dispatched by the core on the embedded
stack with a simulated fleet: the event's run becomes a grid event, the event runner commands
devices for it, and once it is settled the service's delivery report (AGGREGATED_REPORT,
BASELINE and DEMAND per 5 minutes, in MW) is there for the BL to read, valid against the spec."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi import FastAPI, Request
from sqlalchemy import select

from api.app import create_app
from dispatch import events as es
from dispatch.openadr.reports import FINAL, DeliveryReporter
from store.models import Command, OpenAdrObject
from store.openadr import create_client
from tests.helpers.eventkit import running_stack, summer_clock, wait_for
from tests.helpers.openadr import event_body, live_vtn, serve
from tests.helpers.settings import make_settings
from vpp.fleet.snapshot import FleetSnapshot
from vpp.flexibility import available_kw
from vpp.timefmt import to_rfc3339

SCALE = 240.0


async def test_openadr_event_is_dispatched_and_reported(
    sqlite_url: str, services_factory: Any
) -> None:
    # Tokens live in service time: at ×240 an hour passes in 15 s.
    settings = make_settings(
        sqlite_url, time_scale=SCALE, openadr_token_ttl_s=30 * 86_400, openadr_webhook_private=True
    )
    svc = await services_factory(settings, clock=summer_clock(SCALE))
    async with running_stack(svc, 400, fleet_options={"never_answer_share": 0.0}) as st:
        t0 = svc.clock.now_ms()
        assert await wait_for(lambda: svc.clock.now_ms() > t0 + 35 * 60_000, 60)
        snap: FleetSnapshot = await svc.fleet.snapshot(force=True)
        avail_mw = float(available_kw(snap, window_h=1.0).sum()) / 1000.0
        start = (svc.clock.now_ms() // 300_000 + 2) * 300_000
        kw = round(0.4 * avail_mw * 1000, 1)
        heard: list[dict[str, Any]] = []
        receiver = FastAPI()

        @receiver.post("/hook")
        async def hook(request: Request) -> dict[str, str]:
            heard.append(await request.json())
            return {}

        async with live_vtn(create_app(services=svc)) as vtn, serve(receiver) as hooks:
            cid, secret = await create_client(svc.db, "gridco", "bl", svc.clock.now_ms())
            bl = vtn.client(await asyncio.to_thread(vtn.token, cid, secret))
            region = [{"type": "REGION", "values": ["ERCOT-NORTH"]}]
            program = {"programName": "ercot-dr", "attributes": region}
            r = await asyncio.to_thread(bl.create_program, program)
            assert r.status_code == 201, r.text
            op = {"objects": ["REPORT"], "operations": ["CREATE", "UPDATE"],
                  "callbackUrl": f"{hooks}/hook"}  # fmt: skip
            sub = {"clientName": "utility", "objectOperations": [op]}
            assert (await asyncio.to_thread(bl.create_subscription, sub)).status_code == 201
            body = event_body(r.json()["id"], to_rfc3339(start), [kw, kw], duration="PT15M")
            r = await asyncio.to_thread(bl.create_event, body)
            assert r.status_code == 201, r.text
            event_id = r.json()["id"]
            (grid,) = await es.grid_events_of_source(svc, es.SOURCE_OPENADR, event_id)
            assert grid.info.region == "ERCOT-NORTH" and abs(grid.info.mw - kw / 1000) < 1e-9
            assert grid.info.end_ms - grid.info.start_ms == 30 * 60_000
            ge = grid.info.id

            assert await wait_for(lambda: svc.clock.now_ms() > start + 10 * 60_000, 60)
            assert (await es.get_grid_event(svc, ge)).info.status == "active"
            async with svc.db.session() as s:
                cmds = (await s.execute(select(Command).where(Command.event_id == ge))).scalars()
                assert len(list(cmds)) > 0  # dispatched like any other grid event

            reporter = DeliveryReporter(svc, svc.openadr)
            assert await reporter.tick() == 1  # a provisional report while it runs

            async def final() -> bool:
                await reporter.tick()
                async with svc.db.session() as s:
                    rows = (
                        await s.execute(
                            select(OpenAdrObject).where(
                                OpenAdrObject.object_type == "REPORT",
                                OpenAdrObject.parent_id == event_id,
                            )
                        )
                    ).scalars()
                    return any(r.state == FINAL for r in rows)

            assert await wait_for(lambda: svc.clock.now_ms() > start + 55 * 60_000, 90)
            assert await wait_for(final, 60, step_s=0.5)
            r = await asyncio.to_thread(bl.get_reports, eventID=event_id)
            (report,) = r.json()
            assert report["clientName"] == svc.settings.openadr_vtn_name
            (res,) = report["resources"]
            assert res["resourceName"] == "AGGREGATED_REPORT" and len(res["intervals"]) == 6
            demand = [
                p["values"][0]
                for i in res["intervals"]
                for p in i["payloads"]
                if p["type"] == "DEMAND"
            ]
            baseline = [
                p["values"][0]
                for i in res["intervals"]
                for p in i["payloads"]
                if p["type"] == "BASELINE"
            ]
            assert all(i["intervalPeriod"]["duration"] == "PT5M" for i in res["intervals"])
            # Delivered about what was asked (the settlement's figures; a net baseline may be
            # negative: batteries charging, solar exporting).
            assert len(baseline) == 6 and all(math.isfinite(b) for b in baseline)
            assert sum(demand) / len(demand) >= 0.5 * kw / 1000
            print("asked", kw / 1000, "MW; delivered", demand)
            assert vtn.check.checked >= 3
            assert not st.sim.ground_truth().under_command  # everyone restored
            # The BL heard of its delivery report: created, then updated until final.
            await svc.openadr.webhooks.drain()
            ops = [(n["objectType"], n["operation"], n["object"]["eventID"]) for n in heard]
            assert ops[0] == ("REPORT", "CREATE", event_id) and ops[-1][1] == "UPDATE"
