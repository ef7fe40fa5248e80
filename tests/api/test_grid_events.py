"""/v1/grid-events: roles, validation naming the field, create/get/list/abort, 404 and 409."""

from __future__ import annotations

import re

from tests.helpers.settings import make_settings
from vpp.domain import CommandStatus, CommandType
from vpp.timefmt import to_rfc3339


async def test_grid_events_lifecycle_and_roles(sqlite_url, api_factory) -> None:  # type: ignore[no-untyped-def]
    client, make_key = await api_factory(make_settings(sqlite_url))
    op = await make_key("gridco", "operator")
    now = client.services.clock.now_ms()
    body = {"region": "ERCOT-NORTH", "mw": 5, "start": to_rfc3339(now + 3_600_000),
            "end": to_rfc3339(now + 7_200_000), "priority": 120, "preempt": True}  # fmt: skip
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
    # Times come back in the one wire format (vpp.timefmt): UTC, three ms digits, Z.
    assert (ev["start"], ev["end"]) == (body["start"], body["end"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ev["created_at"])
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
    ok = {"region": "ERCOT-NORTH", "mw": 5, "start": to_rfc3339(now + 60_000),
          "end": to_rfc3339(now + 3_600_000)}  # fmt: skip
    cases: list[tuple[dict[str, object], str]] = [
        ({"mw": -1}, "mw"),
        ({"region": "MARS-1"}, "region"),
        ({"end": to_rfc3339(now)}, "end"),
        ({"start": to_rfc3339(now - 3_600_000)}, "start"),
        ({"end": to_rfc3339(now + 30 * 3_600_000)}, "end"),
        ({"start": "yesterday"}, "start"),
        ({"priority": 5000}, "priority"),
    ]
    for change, field in cases:
        r = await client.post("/v1/grid-events", json={**ok, **change}, headers=op)
        assert r.status_code == 422, (change, r.text)
        assert field in str(r.json()["detail"]), (change, r.json())


async def test_grid_event_rejects_bad_windows_and_mw(sqlite_url, api_factory) -> None:  # type: ignore[no-untyped-def]
    client, make_key = await api_factory(make_settings(sqlite_url))
    op = await make_key("gridco", "operator")
    now = client.services.clock.now_ms()
    start, end = now + 600_000, now + 4_200_000
    ok = {"region": "ERCOT-NORTH", "mw": 5, "start": to_rfc3339(start), "end": to_rfc3339(end)}
    cases: list[tuple[dict[str, object], str]] = [
        ({"mw": 0}, "mw"),
        ({"mw": -0.001}, "mw"),
        ({"end": to_rfc3339(start)}, "end"),  # end = start
        ({"end": to_rfc3339(start - 60_000)}, "end"),  # end before start
        ({"region": "ercot-north"}, "region"),  # regions are named exactly
        ({"region": ""}, "region"),
        # A window wholly in the past.
        ({"start": to_rfc3339(now - 7_200_000), "end": to_rfc3339(now - 3_600_000)}, "end"),
        ({"start": "2026-07-15T19:00:00"}, "start"),  # no offset
        ({"start": start // 1000}, "start"),  # a number, not an RFC 3339 string
    ]
    for change, field in cases:
        r = await client.post("/v1/grid-events", json={**ok, **change}, headers=op)
        assert r.status_code == 422, (change, r.text)
        detail = r.json()["detail"]
        assert detail.startswith(field) or f"{field}:" in detail, (change, detail)
    # Nothing was stored by the bad requests; a good one still goes through.
    assert (await client.get("/v1/grid-events", headers=op)).json() == []
    assert (await client.post("/v1/grid-events", json=ok, headers=op)).status_code == 201


async def test_abort_roles_and_tenants(sqlite_url, api_factory) -> None:  # type: ignore[no-untyped-def]
    """Grid events belong to the grid, not to a tenant: any operator or admin key sees and may
    abort any grid event (another utility's operator included); buyers and fleet owners get 403,
    no key 401."""
    client, make_key = await api_factory(make_settings(sqlite_url))
    op = await make_key("gridco", "operator")
    now = client.services.clock.now_ms()
    body = {"region": "ERCOT-NORTH", "mw": 2, "start": to_rfc3339(now + 3_600_000),
            "end": to_rfc3339(now + 7_200_000)}  # fmt: skip

    async def new_event() -> str:
        r = await client.post("/v1/grid-events", json=body, headers=op)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    ev = await new_event()
    assert (await client.post(f"/v1/grid-events/{ev}/abort")).status_code == 401
    for tenant, role in (("gridco", "hyperscaler"), ("gridco", "fleet"), ("x", "hyperscaler")):
        r = await client.post(f"/v1/grid-events/{ev}/abort", headers=await make_key(tenant, role))
        assert r.status_code == 403, (role, r.text)
        assert r.json()["detail"]
        got = await client.get(f"/v1/grid-events/{ev}", headers=await make_key(tenant, role))
        assert got.status_code == 403
    assert (await client.get(f"/v1/grid-events/{ev}", headers=op)).json()["status"] == "scheduled"
    # Another tenant's operator: sees it and may abort it.
    other = await make_key("other-utility", "operator")
    assert (await client.get(f"/v1/grid-events/{ev}", headers=other)).status_code == 200
    r = await client.post(f"/v1/grid-events/{ev}/abort", headers=other)
    assert r.status_code == 200 and r.json()["status"] == "aborted"
    # An admin (of any tenant) too.
    ev2 = await new_event()
    r = await client.post(f"/v1/grid-events/{ev2}/abort", headers=await make_key("root", "admin"))
    assert r.status_code == 200 and r.json()["status"] == "aborted"
    r = await client.post("/v1/grid-events/ge-ffffffffffff/abort", headers=op)
    assert r.status_code == 404 and "id" in r.json()["detail"]


async def test_abort_restores_every_device_at_once(  # type: ignore[no-untyped-def]
    fresh_pg_url, redis_url, services_factory
) -> None:
    """On PostgreSQL + Redis with a simulated fleet: an abort sends every device under command a
    restore at the same moment, with no stagger (thermostats included), once per command, and
    leaves nothing under command."""
    from sqlalchemy import select

    from store.models import Command
    from tests.helpers.eventkit import running_stack, summer_clock, wait_for
    from vpp.flexibility import available_kw

    scale = 240.0
    svc = await services_factory(
        make_settings(fresh_pg_url, redis_url=redis_url, time_scale=scale),
        clock=summer_clock(scale),
    )
    async with running_stack(svc, 150, seed=53, fleet_options={"never_answer_share": 0.0}) as st:
        t0 = svc.clock.now_ms()
        assert await wait_for(lambda: svc.clock.now_ms() > t0 + 10 * 60_000, 30)
        snap = await svc.fleet.snapshot(force=True)
        mw = round(0.5 * float(available_kw(snap, window_h=1.0).sum()) / 1000.0, 3)
        start = svc.clock.now_ms() + 60_000
        headers = await st.operator()
        r = await st.client.post(
            "/v1/grid-events",
            json={"region": "ERCOT-NORTH", "mw": mw, "start": to_rfc3339(start),
                  "end": to_rfc3339(start + 2 * 3_600_000)},
            headers=headers,
        )  # fmt: skip
        assert r.status_code == 201, r.text
        ev = r.json()["id"]
        assert await wait_for(lambda: st.sim.summary()["under_command"] > 0, 20)
        assert await wait_for(lambda: svc.clock.now_ms() > start + 10 * 60_000, 20)

        async def commands() -> list[Command]:
            async with svc.db.session() as s:
                rows = await s.execute(select(Command).where(Command.event_id == ev))
                return list(rows.scalars())

        live = {
            CommandStatus.pending,
            CommandStatus.sent,
            CommandStatus.received,
            CommandStatus.started,
        }
        before = await commands()
        acting = {c.device_id for c in before if c.type != CommandType.restore and c.status in live}
        restored_before = {c.id for c in before if c.type == CommandType.restore}
        assert acting
        r = await st.client.post(f"/v1/grid-events/{ev}/abort", headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "aborted"

        async def abort_restores() -> list[Command]:
            return [c for c in await commands() if c.type == CommandType.restore]

        async def all_out() -> bool:
            return acting <= {c.device_id for c in await abort_restores()}

        assert await wait_for(all_out, 15)
        new = [c for c in await abort_restores() if c.id not in restored_before]
        devices = [c.device_id for c in new]
        assert len(devices) == len(set(devices))  # once each
        assert acting <= set(devices)
        # At once: one batch, valid from the abort, no randomised start.
        assert len({c.valid_from_ms for c in new}) == 1
        assert all(not c.randomize_start_s for c in new)
        assert await wait_for(lambda: st.sim.summary()["under_command"] == 0, 15)
