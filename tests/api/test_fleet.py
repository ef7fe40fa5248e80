"""GET /v1/fleet: per region and kind, devices registered, online, and MW available now."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.helpers.devices import NOW, battery, solar, state, thermostat, uid


def row(fleet: dict[str, Any], region: str, kind: str) -> dict[str, Any]:
    (found,) = [r for r in fleet["regions"] if r["region"] == region and r["kind"] == kind]
    return found


async def test_fleet_sums_match_the_devices(api: Any) -> None:
    north = [uid("bn") for _ in range(3)]
    pjm = [uid("bp") for _ in range(2)]
    th = uid("t")
    pv = uid("pv")
    rows = [battery(d) for d in north] + [battery(d, region="PJM-DOM") for d in pjm]
    rows += [thermostat(th), solar(pv)]
    assert (await api.post("/v1/devices/bulk", json=rows)).status_code == 201
    await api.services.state.put_states(
        {
            north[0]: state(NOW - 60_000, soc_pct=100),  # 5 kW (rating-limited)
            north[1]: state(NOW - 60_000, soc_pct=40),  # 2.5623 kW (energy-limited)
            north[2]: state(NOW - 800_000, soc_pct=100),  # stale: 0
            pjm[0]: state(NOW - 10_000, soc_pct=60),  # 0.4 × 13.5 kWh × 0.949 = 5.1246 → 5
            pjm[1]: state(NOW - 10_000, soc_pct=25),  # 0.05 × 13.5 × 0.949 = 0.640575
            th: state(NOW - 10_000, indoor_c=24, setpoint_c=24, outdoor_c=35, mode=1),
            pv: state(NOW - 10_000, power_w=4_000),  # solar: nothing upward
        }
    )
    await api.services.state.put_status({pjm[1]: (False, NOW - 1_000)})  # Last Will: offline
    api.services.fleet.invalidate()

    r = await api.get("/v1/fleet")
    assert r.status_code == 200, r.text
    fleet = r.json()
    assert fleet["as_of"] == "2026-07-14T20:30:00.000Z" and fleet["window_h"] == 1

    n = row(fleet, "ERCOT-NORTH", "battery")
    assert (n["registered"], n["enrolled"], n["online"], n["fresh"]) == (3, 3, 3, 2)
    assert n["available_mw"] == pytest.approx((5 + 2.5623) / 1000, abs=1e-6)
    p = row(fleet, "PJM-DOM", "battery")
    assert (p["registered"], p["online"], p["fresh"]) == (2, 1, 1)
    assert p["available_mw"] == pytest.approx(5 / 1000, abs=1e-6)
    t_off = 4 * math.log(12 / 10.3)
    shed_kw = 2.4 * t_off + 0.34 * (1 - t_off)
    assert row(fleet, "ERCOT-NORTH", "thermostat")["available_mw"] == pytest.approx(
        shed_kw / 1000, abs=1e-6
    )
    assert row(fleet, "ERCOT-NORTH", "solar")["available_mw"] == 0

    totals = fleet["totals"]
    assert totals["registered"] == 7
    assert totals["available_mw"] == pytest.approx(sum(r["available_mw"] for r in fleet["regions"]))
    # Per-device figures add up to the aggregate.
    listed = (await api.get("/v1/devices", params={"limit": 1000})).json()["devices"]
    assert sum(d["available_kw"] for d in listed) / 1000 == pytest.approx(
        totals["available_mw"], abs=1e-6
    )

    only = (await api.get("/v1/fleet", params={"region": "PJM-DOM"})).json()
    assert [(r["region"], r["kind"]) for r in only["regions"]] == [("PJM-DOM", "battery")]
    assert only["totals"]["registered"] == 2
    kinds = (await api.get("/v1/fleet", params={"kind": "thermostat"})).json()
    assert kinds["totals"]["registered"] == 1


async def test_opted_out_devices_count_as_registered_but_offer_nothing(api: Any) -> None:
    did = uid("b")
    assert (await api.post("/v1/devices", json=battery(did))).status_code == 201
    await api.services.state.put_states({did: state(NOW - 1_000, soc_pct=100)})
    assert (await api.patch(f"/v1/devices/{did}", json={"enrolled": False})).status_code == 200
    fleet = (await api.get("/v1/fleet")).json()
    r = row(fleet, "ERCOT-NORTH", "battery")
    assert (r["registered"], r["enrolled"], r["available_mw"]) == (1, 0, 0)


async def test_empty_fleet_and_bad_filter(api: Any) -> None:
    fleet = (await api.get("/v1/fleet")).json()
    assert fleet["regions"] == [] and fleet["totals"]["available_mw"] == 0
    r = await api.get("/v1/fleet", params={"kind": "boat"})
    assert r.status_code == 422
