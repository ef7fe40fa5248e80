"""/v1/grid-events: roles, validation naming the field, create/get/list/abort, 404 and 409."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.conftest import make_settings


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


async def test_grid_events_lifecycle_and_roles(sqlite_url, api_factory) -> None:  # type: ignore[no-untyped-def]
    client, make_key = await api_factory(make_settings(sqlite_url))
    op = await make_key("gridco", "operator")
    now = client.services.clock.now_ms()
    body = {"region": "ERCOT-NORTH", "mw": 5, "start": _iso(now + 3_600_000),
            "end": _iso(now + 7_200_000), "priority": 120, "preempt": True}  # fmt: skip
    # Roles: no key 401, buyer and fleet keys 403.
    assert (await client.post("/v1/grid-events", json=body)).status_code == 401
    for role in ("hyperscaler", "fleet"):
        r = await client.post("/v1/grid-events", json=body, headers=await make_key("x", role))
        assert r.status_code == 403
    r = await client.post("/v1/grid-events", json=body, headers=op)
    assert r.status_code == 201, r.text
    ev = r.json()
    assert ev["id"].startswith("ge-") and ev["status"] == "scheduled"
    assert ev["priority"] == 120 and ev["preempt"] is True and ev["mw"] == 5
    got = await client.get(f"/v1/grid-events/{ev['id']}", headers=op)
    assert got.status_code == 200 and got.json()["intervals"] == []
    admin = await make_key("root", "admin")
    listed = await client.get("/v1/grid-events", headers=admin)
    assert [e["id"] for e in listed.json()] == [ev["id"]]
    # Abort: aborted once, 409 after.
    a = await client.post(f"/v1/grid-events/{ev['id']}/abort", headers=op)
    assert a.status_code == 200 and a.json()["status"] == "aborted"
    assert (await client.post(f"/v1/grid-events/{ev['id']}/abort", headers=op)).status_code == 409
    assert (await client.get("/v1/grid-events/ge-000000000000", headers=op)).status_code == 404
    csv = await client.get(f"/v1/grid-events/{ev['id']}/settlement.csv", headers=op)
    assert csv.status_code == 200 and csv.text.startswith("event_id,interval_start")
    recent = await client.get("/v1/events", params={"status": "recent"}, headers=op)
    assert recent.status_code == 200


async def test_grid_event_validation_names_the_field(sqlite_url, api_factory) -> None:  # type: ignore[no-untyped-def]
    client, make_key = await api_factory(make_settings(sqlite_url))
    op = await make_key("gridco", "operator")
    now = client.services.clock.now_ms()
    ok = {"region": "ERCOT-NORTH", "mw": 5, "start": _iso(now + 60_000),
          "end": _iso(now + 3_600_000)}  # fmt: skip
    cases = [
        ({"mw": -1}, "mw"),
        ({"region": "MARS-1"}, "region"),
        ({"end": _iso(now)}, "end"),
        ({"start": _iso(now - 3_600_000)}, "start"),
        ({"end": _iso(now + 30 * 3_600_000)}, "end"),
        ({"start": "yesterday"}, "start"),
        ({"priority": 5000}, "priority"),
    ]
    for change, field in cases:
        r = await client.post("/v1/grid-events", json={**ok, **change}, headers=op)
        assert r.status_code == 422, (change, r.text)
        assert field in str(r.json()["detail"]), (change, r.json())
