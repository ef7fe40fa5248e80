"""One figure per question: a settled request shows the same delivered MW and performance in its
JSON, the requests list, its settlement CSV, its event timeline and the report function
(dispatch.settlement.delivery_summary), over the same intervals."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
import pytest

import dispatch.settlement_service as settlement_service
from dispatch import events as es
from dispatch.settlement import SettlementGrid, SettlementInputs, delivery_summary, settle
from tests.helpers.fleets import NOW, REGION, fleet_of
from tests.helpers.market import install_stub
from tests.helpers.settings import make_settings
from vpp.clock import ManualClock
from vpp.fleet.snapshot import FleetSnapshot
from vpp.timefmt import parse_rfc3339, to_rfc3339

H = 3_600_000


@pytest.fixture()
async def api(db_url: str, api_factory: Any) -> Any:
    clock = ManualClock(NOW)
    client, make_key = await api_factory(make_settings(db_url), clock)
    install_stub(client.services, p90_mw=10.0)
    snap = fleet_of("b" * 400)

    async def snapshot(force: bool = False) -> FleetSnapshot:
        return snap

    client.services.fleet.snapshot = snapshot
    keys = {
        "acme": await make_key("acme", "hyperscaler"),
        "op": await make_key("grid", "operator"),
    }
    return client, keys, clock


async def test_json_csv_timeline_and_report_function_agree(api: Any, monkeypatch: Any) -> None:
    client, keys, clock = api
    start, end = NOW + 2 * H, NOW + 4 * H
    r = await client.post(
        "/v1/capacity-requests",
        json={"region": REGION, "mw": 1.0, "start": to_rfc3339(start), "end": to_rfc3339(end)},
        headers=keys["acme"],
    )
    rid = r.json()["id"]
    r = await client.post(f"/v1/capacity-requests/{rid}/commit", headers=keys["acme"])
    assert r.status_code == 200, r.text

    # What the fleet delivered, per 5-minute interval: over, under, a rebound, no reading.
    grid = SettlementGrid(start, end, client.services.settings.settlement_interval_min * 60)
    assert grid.n == 24
    delivered = np.linspace(0.6, 1.3, grid.n)
    delivered[5] = -0.2
    output_w = (delivered * 1e6)[None, :]
    output_w[0, 9] = np.nan  # no reading: nothing proven

    async def computed(services: Any, event_id: str) -> Any:
        ev = await es.load_event(services, event_id)
        return ev, settle(
            SettlementInputs(
                grid=grid,
                target_mw=np.full(grid.n, 1.0),
                battery_actual_w=output_w,
                battery_before_w=np.zeros(1),
                battery_after_w=np.zeros(1),
                battery_active=np.ones((1, grid.n), bool),
            )
        )

    monkeypatch.setattr(settlement_service, "compute_settlement", computed)
    clock.advance((end + H - NOW) / 1000)
    await settlement_service.settle_event(client.services, rid)

    # By hand, the documented rule: the window's 24 full intervals, equal weight.
    proven = np.where(np.isnan(output_w[0]), 0.0, delivered)
    want_delivered = float(proven.mean())
    want_perf = float(np.minimum(np.maximum(proven, 0), 1.0).sum() / grid.n)

    detail = (await client.get(f"/v1/capacity-requests/{rid}", headers=keys["acme"])).json()
    assert detail["settled"] is True
    d = detail["delivery"]
    assert d["intervals"] == d["expected_intervals"] == 24
    assert d["delivered_mw"] == pytest.approx(want_delivered, abs=1e-6)
    assert d["committed_mw"] == pytest.approx(1.0)
    assert d["performance"] == pytest.approx(want_perf, abs=1e-6)
    assert detail["performance"] == d["performance"]

    listed = (await client.get("/v1/capacity-requests", headers=keys["acme"])).json()["items"]
    assert [x["performance"] for x in listed if x["id"] == rid] == [detail["performance"]]

    text = (
        await client.get(f"/v1/capacity-requests/{rid}/settlement.csv", headers=keys["acme"])
    ).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 24
    assert [float(x["performance"]) for x in rows] == pytest.approx(
        [iv["performance"] for iv in detail["intervals"]], abs=1e-4
    )
    from_csv = delivery_summary(
        starts_ms=[parse_rfc3339(x["interval_start"], "start") for x in rows],
        ends_ms=[parse_rfc3339(x["interval_end"], "end") for x in rows],
        committed_mw=[float(x["target_mw"]) for x in rows],
        delivered_mw=[float(x["delivered_mw"]) for x in rows],
        window_start_ms=start,
        window_end_ms=end,
        interval_s=grid.interval_s,
    )
    assert round(from_csv.delivered_mw or 0, 6) == d["delivered_mw"]
    assert round(from_csv.performance or 0, 6) == d["performance"]

    timeline = (await client.get(f"/v1/events/{rid}/timeline", headers=keys["acme"])).json()
    assert timeline["delivery"] == d


async def test_grid_event_with_a_partial_last_interval(api: Any, monkeypatch: Any) -> None:
    client, keys, clock = api
    # 62 minutes: twelve 5-minute intervals and a 2-minute one.
    start = NOW + H
    end = start + 62 * 60_000
    r = await client.post(
        "/v1/grid-events",
        json={"region": REGION, "mw": 1.0, "start": to_rfc3339(start), "end": to_rfc3339(end)},
        headers=keys["op"],
    )
    assert r.status_code == 201, r.text
    gid = r.json()["id"]
    grid = SettlementGrid(start, end, client.services.settings.settlement_interval_min * 60)
    assert grid.n == 13
    delivered = np.full(grid.n, 1.0)
    delivered[-1] = 0.0  # the devices stopped for the last two minutes

    async def computed(services: Any, event_id: str) -> Any:
        ev = await es.load_event(services, event_id)
        return ev, settle(
            SettlementInputs(
                grid=grid,
                target_mw=np.full(grid.n, 1.0),
                battery_actual_w=(delivered * 1e6)[None, :],
                battery_before_w=np.zeros(1),
                battery_after_w=np.zeros(1),
                battery_active=np.ones((1, grid.n), bool),
            )
        )

    monkeypatch.setattr(settlement_service, "compute_settlement", computed)
    clock.advance((end + H - NOW) / 1000)
    await settlement_service.settle_event(client.services, gid)

    got = (await client.get(f"/v1/grid-events/{gid}", headers=keys["op"])).json()
    d = got["delivery"]
    # 60 of 62 minutes delivered: the partial interval weighs 2/5 of a full one.
    assert d["intervals"] == d["expected_intervals"] == 13
    assert d["delivered_mw"] == pytest.approx(60 / 62, abs=1e-6)
    assert d["performance"] == pytest.approx(60 / 62, abs=1e-6) == got["performance"]
    text = (await client.get(f"/v1/grid-events/{gid}/settlement.csv", headers=keys["op"])).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[-1]["interval_end"] == to_rfc3339(end)
    assert [float(x["performance"]) for x in rows] == [1.0] * 12 + [0.0]
    timeline = (await client.get(f"/v1/events/{gid}/timeline", headers=keys["op"])).json()
    assert timeline["delivery"] == d
