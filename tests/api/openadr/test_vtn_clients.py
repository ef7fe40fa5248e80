"""The VTN driven by the real ``openadr3`` client (PyPI) over HTTP, every answer checked against
the vendored OpenADR 3.1.0 description: a BL's program and event become grid events of the
core (updated, aborted), a VEN sees only its own objects and the events that target it, scopes
and tokens are enforced, bad input changes nothing, webhooks reach a local receiver, and the
CLI makes the credentials."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from sqlalchemy import func, select
from typer.testing import CliRunner

from api.app import create_app
from dispatch import events as es
from dispatch.openadr.webhooks import check_callback_url
from store.keys import create_api_key
from store.models import AuditEntry, GridEvent, OpenAdrObject
from store.openadr import create_client
from tests.helpers.openadr import event_body, live_vtn, serve
from tests.helpers.settings import settings_for
from vpp.clock import ManualClock
from vpp.errors import InvalidInput
from vpp.settings import get_settings
from vpp.timefmt import to_rfc3339

NOW = 1_784_061_000_000  # 2026-07-14T20:30:00Z
START = to_rfc3339(NOW + 3_600_000)
PROGRAM = {"programName": "summer-peak", "targets": ["ERCOT-NORTH"], "intervalPeriod": None}


def call(fn: Any, *args: Any) -> Any:
    """The synchronous client, off the event loop that serves it."""
    return asyncio.to_thread(fn, *args)


@pytest.fixture()
async def vtn(db_url: str, services_factory: Any) -> Any:
    """The VTN on SQLite, then on PostgreSQL with Redis, served over HTTP."""
    settings = settings_for(db_url, openadr_webhook_private=True, openadr_token_ttl_s=60)
    svc = await services_factory(settings, clock=ManualClock(NOW))
    app = create_app(services=svc)
    async with live_vtn(app) as live:
        live.services = svc  # type: ignore[attr-defined]
        live.app = app  # type: ignore[attr-defined]
        live.db_url = db_url  # type: ignore[attr-defined]
        yield live
    assert live.check.checked > 0


async def client_of(vtn: Any, tenant: str, role: str, ven_name: str | None = None) -> Any:
    cid, secret = await create_client(
        vtn.services.db, tenant, role, vtn.services.clock.now_ms(), ven_name=ven_name
    )
    scopes = None
    if role == "ven":  # what the library asks for a VEN; read_all is trimmed off
        import openadr3

        scopes = sorted(openadr3.VEN_SCOPES)
    token = await call(vtn.token, cid, secret, scopes)
    return vtn.client(token, role), cid, secret


async def grid_events(svc: Any, event_id: str) -> list[tuple[float, int, str]]:
    recs = await es.grid_events_of_source(svc, es.SOURCE_OPENADR, event_id)
    return [(g.info.mw, (g.info.end_ms - g.info.start_ms) // 60_000, g.info.status) for g in recs]


async def count(svc: Any, model: Any) -> int:
    async with svc.db.session() as s:
        return int(await s.scalar(select(func.count()).select_from(model)) or 0)


async def test_bl_event_becomes_grid_events_updated_and_aborted(vtn: Any) -> None:
    svc = vtn.services
    bl, _, _ = await client_of(vtn, "gridco", "bl")
    r = await call(bl.create_program, PROGRAM)
    assert r.status_code == 201, r.text
    program = r.json()
    assert program["objectType"] == "PROGRAM" and program["id"]
    assert (await call(bl.create_program, PROGRAM)).status_code == 409  # programName taken

    r = await call(bl.create_event, event_body(program["id"], START, [2000, 2000, 5000]))
    assert r.status_code == 201, r.text
    event = r.json()
    assert event["objectType"] == "EVENT"
    # One grid event per run of equal values: 2 MW for 30 min, then 5 MW for 15 min.
    assert await grid_events(svc, event["id"]) == [(2.0, 30, "scheduled"), (5.0, 15, "scheduled")]
    # The library reads it back as its own entity.
    (coerced,) = await call(bl.events)
    assert coerced.id == event["id"]
    # The core shows where it came from.
    operator = {"Authorization": "Bearer " + await create_api_key(svc.db, "ops", "operator", NOW)}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=vtn.app), base_url="http://t"
    ) as c:
        listed = (await c.get("/v1/grid-events", headers=operator)).json()
    assert {(g["source"], g["source_id"]) for g in listed} == {("openadr", event["id"])}

    # Update: the same three intervals at 2 MW: the two old runs are aborted, one run raised.
    r = await call(bl.update_event, event["id"], event_body(program["id"], START, [2000] * 3))
    assert r.status_code == 200, r.text
    assert sorted(await grid_events(svc, event["id"])) == [
        (2.0, 30, "aborted"),
        (2.0, 45, "scheduled"),
        (5.0, 15, "aborted"),
    ]
    # The same event sent again changes no grid event.
    before = await grid_events(svc, event["id"])
    r = await call(bl.update_event, event["id"], event_body(program["id"], START, [2000] * 3))
    assert r.status_code == 200 and await grid_events(svc, event["id"]) == before
    # MW in the descriptor's units.
    r = await call(bl.create_event, event_body(program["id"], START, [1.5], units="MW"))
    assert r.status_code == 201 and await grid_events(svc, r.json()["id"]) == [
        (1.5, 15, "scheduled")
    ]

    # Delete: every grid event of the event is aborted.
    r = await call(bl.delete_event, event["id"])
    assert r.status_code == 200 and r.json()["id"] == event["id"]
    assert all(s == "aborted" for _, _, s in await grid_events(svc, event["id"]))
    assert (await call(bl.get_event_by_id, event["id"])).status_code == 404
    # The live-events list (the dashboard's) shows it with its source.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=vtn.app), base_url="http://t"
    ) as c:
        recent = (await c.get("/v1/events", params={"status": "recent"}, headers=operator)).json()
    assert {e["source"] for e in recent} == {"openadr"}
    assert event["id"] in {e["source_id"] for e in recent}
    # The audit trail names the OpenADR client for each grid event raised or aborted.
    async with svc.db.session() as s:
        rows = (await s.execute(select(AuditEntry).where(AuditEntry.actor == "openadr"))).scalars()
        actions = [(r.action, r.tenant_id) for r in rows]
    assert actions.count(("grid_event.created", "gridco")) == 4
    assert actions.count(("grid_event.aborted", "gridco")) == 3


async def test_an_unchanged_run_that_has_begun_survives_an_update(vtn: Any) -> None:
    svc = vtn.services
    bl, _, _ = await client_of(vtn, "gridco", "bl")
    program = (await call(bl.create_program, PROGRAM)).json()
    begun = to_rfc3339(NOW - 60_000)  # raised a minute late: its grid event starts now
    r = await call(bl.create_event, event_body(program["id"], begun, [1000, 3000]))
    assert r.status_code == 201, r.text
    first = await es.grid_events_of_source(svc, es.SOURCE_OPENADR, r.json()["id"])
    assert [g.info.start_ms for g in first] == [NOW, NOW - 60_000 + 15 * 60_000]
    body = event_body(program["id"], begun, [1000, 2000])
    assert (await call(bl.update_event, r.json()["id"], body)).status_code == 200
    after = await es.grid_events_of_source(svc, es.SOURCE_OPENADR, r.json()["id"])
    # The begun 1 MW run is the same grid event, still live; only the changed one is replaced.
    statuses = {g.info.id: (g.info.mw, g.info.status) for g in after}
    assert statuses[first[0].info.id] == (1.0, "scheduled")
    assert statuses[first[1].info.id] == (3.0, "aborted")
    assert sorted(statuses.values()) == [(1.0, "scheduled"), (2.0, "scheduled"), (3.0, "aborted")]


async def test_bad_input_is_a_problem_naming_the_field_and_changes_nothing(vtn: Any) -> None:
    svc = vtn.services
    bl, _, _ = await client_of(vtn, "gridco", "bl")
    program = (await call(bl.create_program, PROGRAM)).json()
    before = (await count(svc, OpenAdrObject), await count(svc, GridEvent))
    no_start = event_body(program["id"], START, [1000])
    no_start["intervalPeriod"] = None
    simple = event_body(program["id"], START, [1000])
    simple["intervals"][0]["payloads"] = [{"type": "SIMPLE", "values": [1]}]
    past = event_body(program["id"], to_rfc3339(NOW - 7_200_000), [1000])
    cases = [
        (no_start, "intervals[0].intervalPeriod.start"),
        (simple, "SIMPLE"),
        ({**event_body(program["id"], START, [1000]), "programID": "pro-nope"}, "programID"),
        ({**event_body(program["id"], START, [1000]), "intervals": [{"id": 0}]}, "payloads"),
        (event_body(program["id"], START, [-5]), "intervals[0].payloads[0].values"),
        (event_body(program["id"], START, [1000], units="KWH"), "units"),
        (past, "intervals"),
        ({"eventName": "no program"}, "programID"),
    ]
    for body, field in cases:
        r = await call(bl.create_event, body)
        assert r.status_code == 400, (field, r.text)
        problem = r.json()
        assert problem["status"] == 400 and field in problem["detail"], (field, problem)
    for kind in ("IMPORT_CAPACITY_LIMIT", "EXPORT_CAPACITY_LIMIT", "DISPATCH_SETPOINT"):
        body = event_body(program["id"], START, [1000])
        body["intervals"][0]["payloads"][0]["type"] = kind
        r = await call(bl.create_event, body)
        assert r.status_code == 400 and kind in r.json()["detail"]
    r = await call(bl.create_program, {"programName": "nowhere", "targets": ["group-1"]})
    assert r.status_code == 400 and "targets" in r.json()["detail"]
    r = await call(bl.create_program, {"programName": "two", "targets": ["ERCOT-NORTH", "PJM-DOM"]})
    assert r.status_code == 400
    # An update with bad intervals leaves the event and its grid events as they were.
    ok = (await call(bl.create_event, event_body(program["id"], START, [1000]))).json()
    before = (await count(svc, OpenAdrObject), await count(svc, GridEvent))
    r = await call(bl.update_event, ok["id"], no_start)
    assert r.status_code == 400
    assert (await count(svc, OpenAdrObject), await count(svc, GridEvent)) == before
    assert await grid_events(svc, ok["id"]) == [(1.0, 15, "scheduled")]
    assert (await call(bl.get_event_by_id, ok["id"])).json()["intervals"] == ok["intervals"]


async def test_ven_sees_only_its_own_and_scopes_are_enforced(vtn: Any) -> None:
    bl, _, _ = await client_of(vtn, "gridco", "bl")
    ven_a, a_id, _ = await client_of(vtn, "gridco", "ven", "ven-a")
    ven_b, _, _ = await client_of(vtn, "gridco", "ven", "ven-b")
    stranger, _, _ = await client_of(vtn, "othergrid", "bl")

    r = await call(ven_a.create_ven, {"objectType": "VEN_VEN_REQUEST", "venName": "ven-a"})
    assert r.status_code == 201, r.text
    va = r.json()
    assert va["objectType"] == "VEN" and va["clientID"] == a_id
    assert (await call(ven_a.create_ven, {"venName": "someone-else"})).status_code == 403
    vb = (await call(ven_b.create_ven, {"venName": "ven-b"})).json()
    attrs = [{"type": "REGION", "values": ["ERCOT-NORTH"]}]  # no KIND: not a fleet device
    ra = await call(
        ven_a.create_resource, {"resourceName": "bat-1", "venID": va["id"], "attributes": attrs}
    )
    assert ra.status_code == 201, ra.text
    rb = await call(ven_b.create_resource, {"resourceName": "bat-1", "venID": vb["id"]})
    assert rb.status_code == 201
    # A's resource under B's ven: as if B's ven did not exist.
    r = await call(ven_a.create_resource, {"resourceName": "x", "venID": vb["id"]})
    assert r.status_code == 404

    program = (await call(bl.create_program, PROGRAM)).json()
    to_a = (
        await call(bl.create_event, event_body(program["id"], START, [100], targets=["ven-a"]))
    ).json()
    to_b = (
        await call(bl.create_event, event_body(program["id"], START, [100], targets=["bat-1-b"]))
    ).json()
    to_all = (await call(bl.create_event, event_body(program["id"], START, [100]))).json()
    await call(
        bl.update_event, to_b["id"], event_body(program["id"], START, [100], targets=["ven-b"])
    )

    assert {e["id"] for e in (await call(ven_a.get_events)).json()} == {to_a["id"], to_all["id"]}
    assert (await call(ven_a.get_event_by_id, to_b["id"])).status_code == 404
    assert [v["id"] for v in (await call(ven_a.get_vens)).json()] == [va["id"]]
    assert (await call(ven_a.get_ven_by_id, vb["id"])).status_code == 404
    assert (await call(ven_a.update_ven, vb["id"], {"venName": "ven-b"})).status_code == 404
    assert [r["id"] for r in (await call(ven_a.get_resources)).json()] == [ra.json()["id"]]
    assert (await call(ven_a.get_resource_by_id, rb.json()["id"])).status_code == 404
    # 3.0-style sub-paths.
    sub = await call(ven_a._request, "GET", f"/vens/{va['id']}/resources")
    assert [r["id"] for r in sub.json()] == [ra.json()["id"]]
    assert (await call(ven_a._request, "GET", f"/vens/{vb['id']}/resources")).status_code == 404
    # BL sees all of its tenant; another tenant sees nothing of it.
    assert len((await call(bl.get_vens)).json()) == 2
    assert (await call(stranger.get_program_by_id, program["id"])).status_code == 404
    assert (await call(stranger.get_events)).json() == []

    # Scopes: a VEN may not write programs or events, a BL may not write reports.
    r = await call(ven_a.create_program, {"programName": "mine", "targets": ["ERCOT-NORTH"]})
    assert r.status_code == 403 and "write_programs" in r.json()["detail"]
    report = {
        "eventID": to_a["id"],
        "clientName": "ven-a",
        "resources": [
            {
                "resourceName": "bat-1",
                "intervals": [{"id": 0, "payloads": [{"type": "USAGE", "values": [1.5]}]}],
            }
        ],
    }
    assert (await call(bl.create_report, report)).status_code == 403
    r = await call(ven_a.create_report, report)
    assert r.status_code == 201 and r.json()["clientID"] == a_id
    assert (await call(ven_b.get_report_by_id, r.json()["id"])).status_code == 404
    assert (await call(ven_b.get_reports)).json() == []
    # A VEN may not report on an event it does not see.
    assert (await call(ven_a.create_report, {**report, "eventID": to_b["id"]})).status_code == 400
    assert len((await call(bl.get_reports)).json()) == 1
    # MQTT notifier binding: not offered.
    assert (await call(bl.get_notifiers)).json() == {"WEBHOOK": True}
    r = await call(bl.get_mqtt_topics_programs)
    assert r.status_code == 501 and r.json()["status"] == 501


async def test_tokens_basic_auth_expiry_and_revocation(vtn: Any, monkeypatch: Any) -> None:
    svc = vtn.services
    # The CLI makes the credentials: two lines, id then secret.
    monkeypatch.setenv("VPP_DATABASE_URL", vtn.db_url)
    get_settings.cache_clear()
    try:
        from cli.main import app as cli

        create = [
            "openadr",
            "clients",
            "create",
            "--tenant",
            "gridco",
            "--role",
            "ven",
            "--ven-name",
            "oem",
        ]
        out = await call(CliRunner().invoke, cli, create)
        assert out.exit_code == 0, out.output
        lines = out.stdout.splitlines()
        assert len(lines) == 2
        client_id, secret = lines
        token_url = vtn.base_url + "/auth/token"
        async with httpx.AsyncClient() as h:
            basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
            r = await h.post(
                token_url,
                data={"grant_type": "client_credentials", "scope": "read_all read_targets"},
                headers={"Authorization": f"Basic {basic}"},
            )
            assert r.status_code == 200, r.text
            vtn.check(r)
            assert r.json()["scope"] == "read_targets" and r.json()["expires_in"] == 60
            bearer = {"Authorization": "Bearer " + r.json()["access_token"]}
            assert (await h.get(vtn.base_url + "/programs", headers=bearer)).status_code == 200
            # read_targets only: reading vens needs read_ven_objects.
            assert (await h.get(vtn.base_url + "/vens", headers=bearer)).status_code == 403
            wrong = await h.post(
                token_url,
                data={
                    "grant_type": "client_credentials",
                    "client_id": client_id,
                    "client_secret": "nope",
                },
            )
            assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
            grant = await h.post(
                token_url,
                data={"grant_type": "password", "client_id": client_id, "client_secret": secret},
            )
            assert grant.status_code == 400 and grant.json()["error"] == "unsupported_grant_type"
            assert (await h.get(vtn.base_url + "/programs")).status_code == 401
            patch = await h.patch(vtn.base_url + "/programs", headers=bearer)
            assert patch.status_code == 405 and patch.headers["allow"] == "GET, POST"
            assert patch.json()["status"] == 405
            svc.clock.advance(61)
            expired = await h.get(vtn.base_url + "/programs", headers=bearer)
            assert expired.status_code == 401 and "expired" in expired.json()["detail"]
            vtn.check(expired)
            # Revoked: its fresh token stops, and no new one is issued.
            r = await h.post(
                token_url,
                data={
                    "grant_type": "client_credentials",
                    "client_id": client_id,
                    "client_secret": secret,
                },
            )
            fresh = {"Authorization": "Bearer " + r.json()["access_token"]}
            out = await call(CliRunner().invoke, cli, ["openadr", "clients", "revoke", client_id])
            assert out.exit_code == 0 and "revoked" in out.output
            assert (await h.get(vtn.base_url + "/programs", headers=fresh)).status_code == 401
            again = await h.post(
                token_url,
                data={
                    "grant_type": "client_credentials",
                    "client_id": client_id,
                    "client_secret": secret,
                },
            )
            assert again.status_code == 401
    finally:
        get_settings.cache_clear()


async def test_webhooks_reach_a_local_receiver(vtn: Any) -> None:
    svc = vtn.services
    got: list[tuple[str, dict[str, Any], str | None]] = []
    receiver = FastAPI()

    @receiver.post("/hook/{who}")
    async def hook(who: str, request: Request) -> dict[str, str]:
        got.append((who, await request.json(), request.headers.get("authorization")))
        return {"ok": "yes"}

    async with serve(receiver) as base:
        bl, _, _ = await client_of(vtn, "gridco", "bl")
        ven_b, _, _ = await client_of(vtn, "gridco", "ven", "ven-b")
        await call(ven_b.create_ven, {"venName": "ven-b"})
        ops = ["CREATE", "UPDATE", "DELETE"]
        r = await call(
            bl.create_subscription,
            {
                "clientName": "utility",
                "objectOperations": [
                    {
                        "objects": ["PROGRAM", "EVENT"],
                        "operations": ops,
                        "callbackUrl": f"{base}/hook/bl",
                        "bearerToken": "s3cret",
                    }
                ],
            },
        )
        assert r.status_code == 201, r.text
        assert r.json()["objectType"] == "SUBSCRIPTION"
        r = await call(
            ven_b.create_subscription,
            {
                "clientName": "ven-b",
                "objectOperations": [
                    {"objects": ["EVENT"], "operations": ops, "callbackUrl": f"{base}/hook/b"}
                ],
            },
        )
        assert r.status_code == 201
        program = (await call(bl.create_program, PROGRAM)).json()
        ev = (
            await call(bl.create_event, event_body(program["id"], START, [100], targets=["ven-a"]))
        ).json()
        await call(bl.delete_event, ev["id"])
        await svc.openadr.webhooks.drain()
        bl_got = [(n["objectType"], n["operation"]) for who, n, _ in got if who == "bl"]
        assert bl_got == [("PROGRAM", "CREATE"), ("EVENT", "CREATE"), ("EVENT", "DELETE")]
        assert {auth for who, _, auth in got if who == "bl"} == {"Bearer s3cret"}
        assert [n["object"]["id"] for who, n, _ in got if who == "bl"][1] == ev["id"]
        # ven-b is not targeted by the event: it hears nothing of it.
        assert [n for who, n, _ in got if who == "b"] == []
        shared = (await call(bl.create_event, event_body(program["id"], START, [100]))).json()
        await svc.openadr.webhooks.drain()
        assert [n["object"]["id"] for who, n, _ in got if who == "b"] == [shared["id"]]
        # A receiver that fails never fails the request.
        await call(
            bl.create_subscription,
            {
                "clientName": "broken",
                "objectOperations": [
                    {
                        "objects": ["EVENT"],
                        "operations": ["CREATE"],
                        "callbackUrl": f"{base}/missing",
                    }
                ],
            },
        )
        assert (
            await call(bl.create_event, event_body(program["id"], START, [50]))
        ).status_code == 201
        await svc.openadr.webhooks.drain()
        assert svc.openadr.webhooks.failed >= 1
        # Private and loopback callback addresses are refused unless the setting allows them.
        svc.settings.openadr_webhook_private = False
        try:
            r = await call(
                bl.create_subscription,
                {
                    "clientName": "x",
                    "objectOperations": [
                        {
                            "objects": ["EVENT"],
                            "operations": ["CREATE"],
                            "callbackUrl": f"{base}/hook/x",
                        }
                    ],
                },
            )
            assert r.status_code == 400 and "objectOperations[0].callbackUrl" in r.json()["detail"]
        finally:
            svc.settings.openadr_webhook_private = True
    for url in ("http://10.0.0.1/x", "http://localhost/x", "http://[::1]/x", "ftp://example.com/x"):
        with pytest.raises(InvalidInput):
            await check_callback_url(url, "callbackUrl", allow_private=False)
    await check_callback_url("http://93.184.215.14/x", "callbackUrl", allow_private=False)
