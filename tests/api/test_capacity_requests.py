"""/v1/capacity-requests as a buyer uses it: quote, commit, cancel, read; bad input; tenants."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from dispatch import events as es
from store.models import LedgerEntry, SettlementLine
from tests.helpers.fleets import NOW, REGION, fleet_of
from tests.helpers.market import install_stub
from tests.helpers.settings import make_settings
from vpp.clock import ManualClock
from vpp.fleet.snapshot import FleetSnapshot
from vpp.timefmt import to_rfc3339

H = 3_600_000


def body(mw: float = 5.0, start_h: float = 2.0, end_h: float = 4.0, **kw: Any) -> dict[str, Any]:
    return {
        "region": REGION,
        "mw": mw,
        "start": to_rfc3339(NOW + int(start_h * H)),
        "end": to_rfc3339(NOW + int(end_h * H)),
        **kw,
    }


@pytest.fixture()
async def api(db_url: str, api_factory: Any) -> Any:
    clock = ManualClock(NOW)
    client, make_key = await api_factory(make_settings(db_url), clock)
    services = client.services
    install_stub(services, p90_mw=10.0)
    snap = fleet_of("b" * 400)

    async def snapshot(force: bool = False) -> FleetSnapshot:
        return snap

    services.fleet.snapshot = snapshot
    keys = {
        "acme": await make_key("acme", "hyperscaler"),
        "other": await make_key("other", "hyperscaler"),
        "op": await make_key("grid", "operator"),
        "fleet": await make_key("acme", "fleet"),
    }
    return client, keys, clock


async def ledger(client: Any) -> list[tuple[str, int, float]]:
    async with client.services.db.session() as s:
        rows = (
            await s.execute(
                select(
                    LedgerEntry.request_id, LedgerEntry.interval_start_ms, LedgerEntry.mw
                ).order_by(LedgerEntry.request_id, LedgerEntry.interval_start_ms)
            )
        ).all()
    return [tuple(r) for r in rows]


async def test_quote_commit_and_read_with_plan(api: Any) -> None:
    client, keys, _clock = api
    r = await client.post("/v1/capacity-requests", json=body(mw=1.0), headers=keys["acme"])
    assert r.status_code == 201, r.text
    q = r.json()
    assert q["status"] == "quoted" and q["quoted_mw"] == 1.0 and q["firmness"] == 0.9
    assert q["id"].startswith("cr-") and q["quote_expires_at"] == "2026-07-14T20:45:00.000Z"
    assert q["plan"] is None and q["committed_mw"] == 0.0
    r = await client.post(f"/v1/capacity-requests/{q['id']}/commit", headers=keys["acme"])
    assert r.status_code == 200, r.text
    c = r.json()
    assert c["status"] == "committed" and c["committed_mw"] == 1.0
    assert [b["mw"] for b in c["booked"]] == [1.0] * 8
    plan = c["plan"]
    assert plan["version"] == 1 and len(plan["intervals"]) == 8
    assert plan["intervals"][0]["start"] == to_rfc3339(NOW + 2 * H)
    assert plan["intervals"][0]["planned_mw"] == pytest.approx(1.0, rel=1e-3)
    assert plan["devices_by_kind"]["battery"]["assigned"] > 0
    # Committing again is harmless: same request, no second booking.
    again = await client.post(f"/v1/capacity-requests/{q['id']}/commit", headers=keys["acme"])
    assert again.status_code == 200 and again.json()["status"] == "committed"
    assert len(await ledger(client)) == 8
    got = (await client.get(f"/v1/capacity-requests/{q['id']}", headers=keys["acme"])).json()
    assert got["plan"]["version"] == 1 and got["intervals"] == [] and got["performance"] is None
    # Once it has run: delivered per interval and performance capped at 1.
    async with client.services.db.session() as s, s.begin():
        for i, delivered in enumerate([1.2, 0.5]):
            t = NOW + 2 * H + i * 900_000
            s.add(
                SettlementLine(
                    event_id=q["id"],
                    interval_start_ms=t,
                    interval_end_ms=t + 900_000,
                    target_mw=1.0,
                    baseline_mw=3.0,
                    actual_mw=3.0 - delivered,
                    delivered_mw=delivered,
                    method="meter",
                    inputs={},
                )
            )
    got = (await client.get(f"/v1/capacity-requests/{q['id']}", headers=keys["acme"])).json()
    assert [iv["performance"] for iv in got["intervals"]] == [1.0, 0.5]
    assert got["intervals"][0]["delivered_mw"] == 1.2 and got["performance"] == 0.75


async def test_idempotency_key(api: Any) -> None:
    client, keys, _ = api
    h = {**keys["acme"], "Idempotency-Key": "order-17"}
    a = await client.post("/v1/capacity-requests", json=body(mw=2.0), headers=h)
    b = await client.post("/v1/capacity-requests", json=body(mw=2.0), headers=h)
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] == b.json()["id"] and b.headers.get("Idempotent-Replayed") == "true"
    listed = (await client.get("/v1/capacity-requests", headers=keys["acme"])).json()
    assert listed["total"] == 1
    c = await client.post("/v1/capacity-requests", json=body(mw=3.0), headers=h)
    assert c.status_code == 422 and c.json()["detail"].startswith("Idempotency-Key: ")
    # Keys are per tenant.
    d = await client.post(
        "/v1/capacity-requests",
        json=body(mw=2.0),
        headers={**keys["other"], "Idempotency-Key": "order-17"},
    )
    assert d.status_code == 201 and d.json()["id"] != a.json()["id"]


async def test_tenants_and_roles(api: Any) -> None:
    client, keys, _ = api
    mine = (await client.post("/v1/capacity-requests", json=body(), headers=keys["acme"])).json()
    theirs = (await client.post("/v1/capacity-requests", json=body(), headers=keys["other"])).json()
    for path in ("", "/commit", "/cancel"):
        method = client.get if path == "" else client.post
        r = await method(f"/v1/capacity-requests/{theirs['id']}{path}", headers=keys["acme"])
        assert r.status_code == 404 and r.json()["detail"].startswith("id: ")
        missing = await method(f"/v1/capacity-requests/cr-000000000000{path}", headers=keys["acme"])
        assert missing.status_code == 404 and missing.json() == {
            "detail": "id: no capacity request 'cr-000000000000'"
        }
    own = (await client.get("/v1/capacity-requests", headers=keys["acme"])).json()
    assert [x["id"] for x in own["items"]] == [mine["id"]]
    everyone = (await client.get("/v1/capacity-requests", headers=keys["op"])).json()
    assert {x["id"] for x in everyone["items"]} == {mine["id"], theirs["id"]}
    assert (
        await client.get(f"/v1/capacity-requests/{theirs['id']}", headers=keys["op"])
    ).is_success
    assert (await client.get("/v1/capacity-requests", headers=keys["fleet"])).status_code == 403
    assert (await client.post("/v1/capacity-requests", json=body())).status_code == 401
    assert await ledger(client) == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (body(mw=0), "mw"),
        (body(mw=-3), "mw"),
        (body(mw=100_001), "mw"),
        ({**body(), "mw": "lots"}, "mw"),
        (body(end_h=2.0), "end"),
        (body(start_h=3.0, end_h=2.0), "end"),
        (body(start_h=-2.0, end_h=1.0), "start"),
        (body(start_h=47.0, end_h=49.0), "end"),
        (body(firmness=0.3), "firmness"),
        (body(firmness=1.0), "firmness"),
        (body(region="MARS-1"), "region"),
        (body(direction="sideways"), "direction"),
        ({**body(), "start": "2026-07-14T22:30:00"}, "start"),  # no offset
        ({**body(), "end": "tomorrow"}, "end"),
        ({k: v for k, v in body().items() if k != "region"}, "region"),
    ],
)
async def test_bad_input_is_422_naming_the_field(
    api: Any, payload: dict[str, Any], field: str
) -> None:
    client, keys, _ = api
    # A committed request first, so "ledger unchanged" means something.
    ok = (await client.post("/v1/capacity-requests", json=body(mw=1), headers=keys["acme"])).json()
    await client.post(f"/v1/capacity-requests/{ok['id']}/commit", headers=keys["acme"])
    before = await ledger(client)
    r = await client.post("/v1/capacity-requests", json=payload, headers=keys["acme"])
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{field}: "), r.json()
    assert await ledger(client) == before
    listed = (await client.get("/v1/capacity-requests", headers=keys["acme"])).json()
    assert listed["total"] == 1


async def test_state_errors_are_409_naming_the_state(api: Any) -> None:
    client, keys, clock = api
    h = keys["acme"]
    # Cancelled quote cannot be committed.
    q = (await client.post("/v1/capacity-requests", json=body(mw=1), headers=h)).json()
    r = await client.post(f"/v1/capacity-requests/{q['id']}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = await client.post(f"/v1/capacity-requests/{q['id']}/commit", headers=h)
    assert r.status_code == 409 and r.json()["detail"] == "status: request is cancelled"
    # A committed request to hold ledger rows through the rest.
    c = (await client.post("/v1/capacity-requests", json=body(mw=2), headers=h)).json()
    await client.post(f"/v1/capacity-requests/{c['id']}/commit", headers=h)
    before = await ledger(client)
    assert len(before) == 8
    # Expired quote.
    e = (await client.post("/v1/capacity-requests", json=body(mw=1), headers=h)).json()
    clock.advance(901)
    r = await client.post(f"/v1/capacity-requests/{e['id']}/commit", headers=h)
    assert r.status_code == 409
    assert r.json()["detail"] == f"status: quote expired at {to_rfc3339(NOW + 900_000)}"
    got = (await client.get(f"/v1/capacity-requests/{e['id']}", headers=h)).json()
    assert got["status"] == "expired"
    # Once the runner has started it (committed → active), then closed it (→ completed), the
    # request cannot be cancelled.
    services = client.services
    clock.advance(2 * 3600)
    ev = await es.load_event(services, c["id"])
    assert ev is not None
    assert await es.set_status(services, ev, "active", only_from=("committed",))
    r = await client.post(f"/v1/capacity-requests/{c['id']}/cancel", headers=h)
    assert r.status_code == 409 and "request is active" in r.json()["detail"]
    assert await es.set_status(services, ev, "completed", only_from=("active",))
    r = await client.post(f"/v1/capacity-requests/{c['id']}/cancel", headers=h)
    assert r.status_code == 409 and "request is completed" in r.json()["detail"]
    assert await ledger(client) == before


async def test_commit_after_capacity_went_is_409_and_cancel_releases(api: Any) -> None:
    client, keys, _ = api
    a = (await client.post("/v1/capacity-requests", json=body(mw=6), headers=keys["acme"])).json()
    b = (await client.post("/v1/capacity-requests", json=body(mw=6), headers=keys["other"])).json()
    assert a["quoted_mw"] == b["quoted_mw"] == 6.0
    assert (
        await client.post(f"/v1/capacity-requests/{a['id']}/commit", headers=keys["acme"])
    ).is_success
    r = await client.post(f"/v1/capacity-requests/{b['id']}/commit", headers=keys["other"])
    assert r.status_code == 409
    assert r.json()["detail"].startswith(
        "mw: capacity no longer available: 3.5 MW free in interval"
    )
    # What a new quote offers never exceeds what is left.
    c = (await client.post("/v1/capacity-requests", json=body(mw=6), headers=keys["other"])).json()
    assert c["quoted_mw"] == 3.5
    r = await client.post(f"/v1/capacity-requests/{a['id']}/cancel", headers=keys["acme"])
    assert r.json()["status"] == "cancelled" and r.json()["booked"] == []
    async with client.services.db.session() as s:
        total = (await s.execute(select(func.count()).select_from(LedgerEntry))).scalar()
    assert total == 0
    assert (
        await client.post(f"/v1/capacity-requests/{b['id']}/commit", headers=keys["other"])
    ).is_success


async def test_long_window_is_rejected_with_the_rule(api: Any) -> None:
    client, keys, _ = api
    r = await client.post("/v1/capacity-requests", json=body(end_h=8.0), headers=keys["acme"])
    assert r.status_code == 201
    assert r.json()["status"] == "rejected" and "at most 5 h" in r.json()["reason"]
    assert r.json()["quote_expires_at"] is None


async def test_openapi_documents_the_fields(api: Any) -> None:
    client, _, _ = api
    spec = (await client.get("/openapi.json")).json()
    schema = spec["components"]["schemas"]["CapacityRequestIn"]["properties"]
    assert {"region", "mw", "start", "end", "firmness", "direction"} <= set(schema)
    assert all(schema[f].get("description") for f in ("region", "mw", "start", "end"))
    params = spec["paths"]["/v1/capacity-requests"]["post"]["parameters"]
    assert any(p["name"] == "Idempotency-Key" for p in params)


async def test_quote_preview_says_what_a_quote_would_and_stores_nothing(api: Any) -> None:
    client, keys, _ = api
    h = keys["acme"]
    url = "/v1/capacity-requests/preview"
    r = await client.post(url, json=body(mw=20), headers=h)
    assert r.status_code == 200, r.text
    pre = r.json()
    # P90 10 MW less the 5 % margin: 9.5 MW is what the window holds; asked 20, short.
    assert pre["status"] == "quoted" and pre["quoted_mw"] == 9.5 and pre["available_mw"] == 9.5
    assert pre["reason"].startswith("partial: 9.5 of 20 MW")
    assert pre["intervals"] == 8 and pre["stored"] is False
    assert pre["quote_would_expire_at"] == "2026-07-14T20:45:00.000Z"
    listed = (await client.get("/v1/capacity-requests", headers=h)).json()
    assert listed["total"] == 0 and await ledger(client) == []
    # The real quote that follows says the same.
    q = (await client.post("/v1/capacity-requests", json=body(mw=20), headers=h)).json()
    assert (q["status"], q["quoted_mw"], q["reason"]) == (
        pre["status"],
        pre["quoted_mw"],
        pre["reason"],
    )
    # What is committed is no longer available to a preview.
    small = (await client.post("/v1/capacity-requests", json=body(mw=6), headers=h)).json()
    await client.post(f"/v1/capacity-requests/{small['id']}/commit", headers=h)
    after = (await client.post(url, json=body(mw=1), headers=keys["op"])).json()
    assert after["quoted_mw"] == 1.0 and after["available_mw"] == 3.5 and after["reason"] is None
    # A window longer than an event: rejected with the rule, no figure.
    long = (await client.post(url, json=body(end_h=8.0), headers=h)).json()
    assert long["status"] == "rejected" and "at most 5 h" in long["reason"]
    assert long["available_mw"] is None and long["quote_would_expire_at"] is None


@pytest.mark.parametrize(
    ("payload", "field"),
    [(body(mw=0), "mw"), (body(region="MARS-1"), "region"), (body(end_h=2.0), "end")],
)
async def test_quote_preview_bad_input_is_422_naming_the_field(
    api: Any, payload: dict[str, Any], field: str
) -> None:
    client, keys, _ = api
    r = await client.post("/v1/capacity-requests/preview", json=payload, headers=keys["acme"])
    assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: "), r.text


async def test_quote_preview_is_for_buyers(api: Any) -> None:
    client, keys, _ = api
    url = "/v1/capacity-requests/preview"
    assert (await client.post(url, json=body(), headers=keys["fleet"])).status_code == 403
    assert (await client.post(url, json=body())).status_code == 401
