"""The region registry as a new fleet team and an admin meet it: every US load zone is there on a
fresh database with no settings, devices onboard in any of them, ``VPP_REGIONS`` narrows what is
sold, and an admin adds or corrects a zone (seen by another replica too)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.devices import NOW, battery, uid
from tests.helpers.settings import settings_for
from vpp.clock import ManualClock
from vpp.regions import SEED_REGIONS
from vpp.weather import weather_for_region

ISSUE_ZONES = (
    "ERCOT-WEST",
    "CAISO-NP15",
    "CAISO-ZP26",
    "PJM-AEP",
    "PJM-COMED",
    "MISO-Z4",
    "NYISO-J",
    "ISONE-NEMA",
)
NEW_ZONE = {
    "name": "FPL-SOUTH",
    "iso": "FPL",
    "label": "South Florida",
    "time_zone": "America/New_York",
    "latitude": 25.76,
    "longitude": -80.19,
    "climate": "hot",
}


async def _client(db_url: str, api_factory: Any, role: str = "fleet", **settings: Any) -> Any:
    client, make_key = await api_factory(settings_for(db_url, **settings), ManualClock(NOW))
    client.headers.update(await make_key("acme", role))
    client.make_key = make_key
    return client


async def test_every_load_zone_is_there_and_onboards_with_no_settings(
    db_url: str, api_factory: Any
) -> None:
    api = await _client(db_url, api_factory)
    r = await api.get("/v1/regions")
    assert r.status_code == 200, r.text
    body = r.json()
    by_name = {z["name"]: z for z in body["regions"]}
    assert set(by_name) == {z.name for z in SEED_REGIONS}
    assert {z["iso"] for z in body["regions"]} == {
        "ERCOT", "CAISO", "PJM", "MISO", "NYISO", "ISONE", "SPP"
    }  # fmt: skip
    # Every zone an ISO settles: MISO's ten, NYISO's eleven, ISO-NE's eight.
    assert sum(z["iso"] == "MISO" for z in body["regions"]) == 10
    assert sum(z["iso"] == "NYISO" for z in body["regions"]) == 11
    assert sum(z["iso"] == "ISONE" for z in body["regions"]) == 8
    assert body["sold"] == len(SEED_REGIONS) and all(z["sold"] for z in body["regions"])
    np15 = by_name["CAISO-NP15"]
    assert np15["time_zone"] == "America/Los_Angeles" and np15["utc_offset_h"] == -8
    assert 37 < np15["latitude"] < 38.5 and -123 < np15["longitude"] < -121.5
    assert np15["weather"]["typical_year"] and np15["weather"]["distance_km"] > 1000
    for zone in ISSUE_ZONES:
        r = await api.post("/v1/devices", json=battery(uid("bat"), region=zone))
        assert r.status_code == 201, (zone, r.text)
    listed = (await api.get("/v1/regions", params={"iso": "ERCOT"})).json()["regions"]
    assert [z["name"] for z in listed] == sorted(z.name for z in SEED_REGIONS if z.iso == "ERCOT")


async def test_an_unknown_region_is_refused_naming_the_field(db_url: str, api_factory: Any) -> None:
    api = await _client(db_url, api_factory)
    r = await api.post("/v1/devices", json=battery(uid("bat"), region="CAISO-NP16"))
    assert r.status_code == 422
    err = r.json()["errors"]
    assert [e["field"] for e in err] == ["region"]
    assert "not a region of this service" in err[0]["message"]
    assert "GET /v1/regions" in err[0]["message"]  # 77 names are too many to list
    assert (await api.get("/v1/devices")).json()["devices"] == []


async def test_vpp_regions_narrows_what_is_sold(db_url: str, api_factory: Any) -> None:
    api = await _client(db_url, api_factory, regions=["ERCOT-NORTH", "MISO-Z4"])
    body = (await api.get("/v1/regions")).json()
    assert body["sold"] == 2
    sold = [
        z["name"] for z in (await api.get("/v1/regions", params={"sold": "true"})).json()["regions"]
    ]
    assert sorted(sold) == ["ERCOT-NORTH", "MISO-Z4"]
    assert (
        await api.post("/v1/devices", json=battery(uid("b"), region="MISO-Z4"))
    ).status_code == 201
    r = await api.post("/v1/devices", json=battery(uid("b"), region="CAISO-NP15"))
    assert r.status_code == 422
    msg = r.json()["errors"][0]["message"]
    assert "not sold here" in msg and "ERCOT-NORTH, MISO-Z4" in msg
    # Quotes follow the same list.
    q = await api.post(
        "/v1/capacity-requests",
        json={
            "region": "CAISO-NP15",
            "mw": 1,
            "start": "2026-06-01T23:00:00Z",
            "end": "2026-06-02T00:00:00Z",
        },
        headers=await api.make_key("dc", "hyperscaler"),
    )
    assert q.status_code == 422 and q.json()["detail"].startswith("region"), q.text


async def test_admin_adds_and_corrects_a_zone_others_only_read(
    db_url: str, api_factory: Any
) -> None:
    api = await _client(db_url, api_factory)
    admin = await api.make_key("ops", "admin")
    assert (await api.post("/v1/regions", json=NEW_ZONE)).status_code == 403  # a fleet key
    bad = {**NEW_ZONE, "name": "FPL-BAD", "latitude": 125, "time_zone": "Mars/Olympus"}
    r = await api.post("/v1/regions", json=bad, headers=admin)
    assert r.status_code == 422
    assert {e["field"] for e in r.json()["errors"]} >= {"latitude"}
    r = await api.post(
        "/v1/regions",
        json={**NEW_ZONE, "name": "FPL-BAD", "time_zone": "Mars/Olympus"},
        headers=admin,
    )
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["time_zone"]
    assert (await api.get("/v1/regions/FPL-BAD")).status_code == 404  # nothing stored
    r = await api.post("/v1/regions", json=NEW_ZONE, headers=admin)
    assert r.status_code == 201, r.text
    assert r.json()["sold"] is True and r.json()["weather"]["typical_year"] == "Miami"
    assert (await api.post("/v1/regions", json=NEW_ZONE, headers=admin)).status_code == 409
    assert (
        await api.post("/v1/devices", json=battery(uid("b"), region="FPL-SOUTH"))
    ).status_code == 201
    # A correction: the load centre moves; the name cannot.
    r = await api.patch(
        "/v1/regions/FPL-SOUTH", json={"latitude": 26.12, "label": "Broward"}, headers=admin
    )
    assert r.status_code == 200 and r.json()["latitude"] == 26.12 and r.json()["label"] == "Broward"
    r = await api.patch("/v1/regions/FPL-SOUTH", json={"name": "FPL-NORTH"}, headers=admin)
    assert r.status_code == 422 and "name" in r.text
    assert (
        await api.patch("/v1/regions/NOPE-1", json={"label": "x"}, headers=admin)
    ).status_code == 404
    assert (await api.get("/v1/regions/FPL-SOUTH")).json()["latitude"] == 26.12


async def test_a_zone_added_on_one_replica_onboards_on_another(
    db_url: str, api_factory: Any
) -> None:
    one = await _client(db_url, api_factory)
    if db_url.startswith("sqlite"):
        pytest.skip("replicas share a PostgreSQL database")
    settings = one.services.settings
    two, make_key = await api_factory(settings, ManualClock(NOW))
    two.headers.update(await make_key("acme", "fleet"))
    # The second replica has read the registry already (it onboards a seeded zone).
    assert (
        await two.post("/v1/devices", json=battery(uid("b"), region="PJM-DOM"))
    ).status_code == 201
    admin = await one.make_key("ops", "admin")
    assert (await one.post("/v1/regions", json=NEW_ZONE, headers=admin)).status_code == 201
    r = await two.post("/v1/devices", json=battery(uid("b"), region="FPL-SOUTH"))
    assert r.status_code == 201, r.text


def test_local_time_and_solar_geometry_are_the_zones_own() -> None:
    la, nyc = weather_for_region("CAISO-SP15"), weather_for_region("NYISO-J")
    assert la.tz_offset_h == -8 and nyc.tz_offset_h == -5
    # Both take Greensboro's clouds; the sun rises about three hours later (UTC) in LA, and at
    # local solar noon it stands higher than in New York (34° N against 41° N).
    day = 172 * 24  # the June solstice, local hours
    la_day, nyc_day = la.ghi_w_m2[day : day + 24], nyc.ghi_w_m2[day : day + 24]
    assert la.source == nyc.source
    assert la_day.argmax() in range(11, 15) and nyc_day.argmax() in range(11, 15)
