"""/v1/devices as a fleet operator uses it: register, read live state, page, change, offboard.

Runs on SQLite (in-process state store) and on PostgreSQL with the real Redis state store.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from store.models import Device
from tests.helpers.devices import (
    NOW,
    REGION,
    battery,
    fields_of,
    solar,
    state,
    stored_ids,
    thermostat,
    uid,
)
from tests.helpers.mosquitto import WAIT_S, Client, MosquittoBroker
from tests.helpers.settings import make_settings
from vpp.clock import ManualClock


# --- registering --------------------------------------------------------------------------------
async def test_register_each_kind_returns_device_and_mqtt_credentials(api: Any) -> None:
    bid, tid, sid = uid("bat"), uid("th"), uid("pv")
    for body in (battery(bid), thermostat(tid), solar(sid)):
        r = await api.post("/v1/devices", json=body)
        assert r.status_code == 201, r.text
        dev = r.json()
        assert dev["id"] == body["id"] and dev["tenant_id"] == "acme"
        assert dev["created_at"].endswith("Z") and dev["enrolled"] is True
        mqtt = dev["mqtt"]
        assert mqtt["username"] == body["id"] and len(mqtt["password"]) >= 24
        root = api.services.settings.topic_root
        assert mqtt["topics"] == {
            leaf: f"{root}/devices/{body['id']}/{leaf}"
            for leaf in ("telemetry", "status", "ack", "cmd")
        }
    got = (await api.get(f"/v1/devices/{bid}")).json()
    assert got["backup_reserve_pct"] == 20  # the contract's default
    assert got["rated_w"] is None and "mqtt" not in got  # credentials shown once only
    assert (await api.get(f"/v1/devices/{tid}")).json()["max_offset_c"] == 2
    # Onboarded devices are in the ingest registry with their kind code.
    registry = await api.services.state.registry_all()
    assert (registry[bid], registry[sid], registry[tid]) == (0, 1, 2)


async def test_id_is_generated_when_absent(api: Any) -> None:
    r = await api.post("/v1/devices", json=battery())
    assert r.status_code == 201, r.text
    assert r.json()["id"].startswith("d-") and r.json()["mqtt"]["username"] == r.json()["id"]


async def test_duplicate_id_is_409_and_the_first_device_is_untouched(api: Any) -> None:
    did = uid("bat")
    assert (await api.post("/v1/devices", json=battery(did))).status_code == 201
    r = await api.post("/v1/devices", json=battery(did, capacity_wh=9_000))
    assert r.status_code == 409
    assert fields_of(r) == {"id"} and did in r.json()["detail"]
    assert (await api.get(f"/v1/devices/{did}")).json()["capacity_wh"] == 13_500


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (battery(region="MARS-1"), "region"),
        (battery(capacity_wh=0), "capacity_wh"),
        (battery(capacity_wh=-5), "capacity_wh"),
        (battery(backup_reserve_pct=101), "backup_reserve_pct"),
        (battery(backup_reserve_pct=-1), "backup_reserve_pct"),
        (battery(max_discharge_w="lots"), "max_discharge_w"),
        (battery(rated_w=5_000), "rated_w"),  # a solar field on a battery
        (solar(capacity_wh=13_500), "capacity_wh"),  # a battery field on a solar system
        (thermostat(comfort_min_c=28, comfort_max_c=24), "comfort_min_c"),
        (thermostat(comfort_min_c=24, comfort_max_c=24), "comfort_min_c"),
        (thermostat(max_offset_c=0), "max_offset_c"),
        ({k: v for k, v in thermostat().items() if k != "hvac_rated_w"}, "hvac_rated_w"),
        ({k: v for k, v in battery().items() if k != "kind"}, "kind"),
        (battery(kind="windmill"), "kind"),
        (battery(id="a/b"), "id"),
        (battery(id="dev+1"), "id"),
        (battery(id="dev#"), "id"),
        (battery(id="x" * 65), "id"),
        (battery(id=""), "id"),
        (battery(site_id=""), "site_id"),
        (battery(lat=91), "lat"),
        (battery(colour="red"), "colour"),
    ],
)
async def test_bad_fields_are_422_naming_the_field_and_nothing_is_stored(
    api: Any, body: dict[str, Any], field: str
) -> None:
    r = await api.post("/v1/devices", json=body)
    assert r.status_code == 422, r.text
    assert field in fields_of(r), r.json()
    assert field in r.json()["detail"]
    assert await stored_ids(api) == set()


async def test_every_bad_field_of_one_device_is_named_at_once(api: Any) -> None:
    r = await api.post(
        "/v1/devices", json=battery(region="NOWHERE", capacity_wh=-1, rated_w=3, id="a/b")
    )
    assert r.status_code == 422
    assert fields_of(r) == {"region", "capacity_wh", "rated_w", "id"}


async def test_body_that_is_not_a_json_object_is_422(api: Any) -> None:
    r = await api.post(
        "/v1/devices", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and fields_of(r) == {"body"}
    r = await api.post("/v1/devices", json=[battery()])
    assert r.status_code == 422


# --- reading live state -------------------------------------------------------------------------
async def test_device_detail_shows_telemetry_freshness_and_flexibility_by_hand(api: Any) -> None:
    full, low, stale, th = uid("b"), uid("b"), uid("b"), uid("t")
    for body in (battery(full), battery(low), battery(stale), thermostat(th)):
        assert (await api.post("/v1/devices", json=body)).status_code == 201
    await api.services.state.put_states(
        {
            full: state(NOW - 60_000, soc_pct=100, power_w=-1_200, grid_up=1, seq=7),
            low: state(NOW - 60_000, soc_pct=40, power_w=0),
            stale: state(NOW - 700_000, soc_pct=100),  # > 2 intervals of 300 s ago
            th: state(NOW - 30_000, indoor_c=24, setpoint_c=24, outdoor_c=35, hvac_w=2_400, mode=1),
        }
    )
    d = (await api.get(f"/v1/devices/{full}")).json()
    # 13.5 kWh at 100 %, reserve 20 %: 10.8 kWh × 0.949 = 10.25 kW over 1 h, capped at 5 kW.
    assert d["freshness"] == "fresh" and d["online"] is True
    assert d["available_kw"] == pytest.approx(5.0)
    t = d["last_telemetry"]
    assert t["soc_pct"] == 100 and t["power_kw"] == pytest.approx(-1.2) and t["grid"] == "up"
    assert t["seq"] == 7 and t["received_ms"] == NOW - 60_000 and t["ts_ms"] == NOW - 61_000
    assert t["received_at"] == "2026-07-14T20:29:00.000Z" and t["clock_skewed"] is False

    # 40 %: (40 − 20) % × 13.5 kWh = 2.7 kWh × 0.949 = 2.5623 kW for one hour.
    d = (await api.get(f"/v1/devices/{low}")).json()
    assert d["available_kw"] == pytest.approx(2.5623, abs=1e-4)

    d = (await api.get(f"/v1/devices/{stale}")).json()
    assert d["freshness"] == "stale" and d["available_kw"] == 0  # stale counts 0
    assert d["capability_kw"] == pytest.approx(5.0)

    # RC home at 24 °C, 35 °C outside, +1.7 °C offset: T_eq = 35 + 2 × 0.5 = 36 °C;
    # baseline 12 / (2 × 2.5) = 2.4 kW, new 10.3 / 5 = 2.06 kW; off for 4 h × ln(12 / 10.3).
    t_off = 4 * math.log(12 / 10.3)
    expected = 2.4 * t_off + (2.4 - 2.06) * (1 - t_off)
    d = (await api.get(f"/v1/devices/{th}")).json()
    assert d["available_kw"] == pytest.approx(expected, abs=1e-4)
    assert d["last_telemetry"]["mode"] == "cool" and d["last_telemetry"]["hvac_kw"] == 2.4


async def test_never_heard_and_last_will_devices_are_offline(api: Any) -> None:
    quiet, gone = uid("b"), uid("b")
    for d in (quiet, gone):
        assert (await api.post("/v1/devices", json=battery(d))).status_code == 201
    await api.services.state.put_states({gone: state(NOW - 10_000, soc_pct=90)})
    await api.services.state.put_status({gone: (False, NOW - 5_000)})
    api.services.fleet.invalidate()
    for d in (quiet, gone):
        got = (await api.get(f"/v1/devices/{d}")).json()
        assert got["freshness"] == "offline" and got["online"] is False
        assert got["available_kw"] == 0
    assert (await api.get(f"/v1/devices/{quiet}")).json()["last_telemetry"] is None


async def test_list_filters_and_pages_with_a_cursor(api: Any) -> None:
    ids = sorted(uid("b") for _ in range(5))
    for i, d in enumerate(ids):
        region = REGION if i % 2 == 0 else "PJM-DOM"
        assert (await api.post("/v1/devices", json=battery(d, region=region))).status_code == 201
    pv = uid("pv")
    assert (await api.post("/v1/devices", json=solar(pv))).status_code == 201

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "kind": "battery"}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/v1/devices", params=params)).json()
        assert len(page["devices"]) <= 2
        seen += [d["id"] for d in page["devices"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids

    by_region = (await api.get("/v1/devices", params={"region": "PJM-DOM"})).json()["devices"]
    assert [d["id"] for d in by_region] == ids[1::2]
    everything = (await api.get("/v1/devices")).json()["devices"]
    assert {d["id"] for d in everything} == {*ids, pv}

    await api.services.state.put_states({ids[0]: state(NOW - 1_000, soc_pct=80)})
    api.services.fleet.invalidate()
    fresh = (await api.get("/v1/devices", params={"status": "fresh"})).json()["devices"]
    assert [d["id"] for d in fresh] == [ids[0]] and fresh[0]["available_kw"] > 0
    offline = (await api.get("/v1/devices", params={"status": "offline", "limit": 3})).json()
    assert len(offline["devices"]) == 3 and ids[0] not in [d["id"] for d in offline["devices"]]
    rest = (
        await api.get("/v1/devices", params={"status": "offline", "cursor": offline["next_cursor"]})
    ).json()
    assert len(offline["devices"]) + len(rest["devices"]) == 5


async def test_list_by_id_prefix(api: Any) -> None:
    stem = uid("pfx")
    ids = [f"{stem}-a1", f"{stem}-a2", f"{stem}-b1", f"{stem}_a9"]
    for d in ids:
        assert (await api.post("/v1/devices", json=battery(d))).status_code == 201
    other = uid("b")
    assert (await api.post("/v1/devices", json=battery(other))).status_code == 201
    got = (await api.get("/v1/devices", params={"id_prefix": f"{stem}-a"})).json()["devices"]
    assert [d["id"] for d in got] == ids[:2]
    # "_" and "%" are plain characters here, not patterns.
    got = (await api.get("/v1/devices", params={"id_prefix": f"{stem}_"})).json()["devices"]
    assert [d["id"] for d in got] == [f"{stem}_a9"]
    # With a status filter (read from the fleet snapshot) too, and paged.
    first = (
        await api.get("/v1/devices", params={"id_prefix": stem, "status": "offline", "limit": 3})
    ).json()
    rest = (
        await api.get(
            "/v1/devices",
            params={"id_prefix": stem, "status": "offline", "cursor": first["next_cursor"]},
        )
    ).json()
    assert [d["id"] for d in first["devices"] + rest["devices"]] == sorted(ids)
    r = await api.get("/v1/devices", params={"id_prefix": ""})
    assert r.status_code == 422 and "id_prefix" in fields_of(r)


async def test_list_rejects_bad_paging_parameters(api: Any) -> None:
    r = await api.get("/v1/devices", params={"limit": 5000})
    assert r.status_code == 422 and "limit" in fields_of(r)
    r = await api.get("/v1/devices", params={"cursor": "%%%"})
    assert r.status_code == 422 and "cursor" in fields_of(r)
    r = await api.get("/v1/devices", params={"status": "sleepy"})
    assert r.status_code == 422 and "status" in fields_of(r)


# --- changing -----------------------------------------------------------------------------------
async def test_patch_opts_a_device_out_of_events(api: Any) -> None:
    did = uid("b")
    assert (await api.post("/v1/devices", json=battery(did))).status_code == 201
    await api.services.state.put_states({did: state(NOW - 1_000, soc_pct=100)})
    assert (await api.get(f"/v1/devices/{did}")).json()["available_kw"] == pytest.approx(5.0)

    r = await api.patch(f"/v1/devices/{did}", json={"enrolled": False, "backup_reserve_pct": 50})
    assert r.status_code == 200, r.text
    assert r.json()["enrolled"] is False and r.json()["backup_reserve_pct"] == 50
    d = (await api.get(f"/v1/devices/{did}")).json()
    assert d["enrolled"] is False and d["available_kw"] == 0
    snap = await api.services.fleet.snapshot()
    assert not snap.enrolled[snap.index[did]] and not snap.dispatchable()[snap.index[did]]
    # Still registered for ingest: opted-out devices keep reporting.
    assert (await api.services.state.registry_all())[did] == 0

    assert (await api.patch(f"/v1/devices/{did}", json={"enrolled": True})).status_code == 200
    assert (await api.get(f"/v1/devices/{did}")).json()["available_kw"] > 0


async def test_patch_names_fields_that_may_not_change(api: Any) -> None:
    bid, tid = uid("b"), uid("t")
    assert (await api.post("/v1/devices", json=battery(bid))).status_code == 201
    assert (await api.post("/v1/devices", json=thermostat(tid))).status_code == 201
    r = await api.patch(f"/v1/devices/{bid}", json={"region": "PJM-DOM", "kind": "solar"})
    assert r.status_code == 422 and fields_of(r) == {"region", "kind"}
    r = await api.patch(f"/v1/devices/{bid}", json={"max_offset_c": 1.0})
    assert r.status_code == 422 and fields_of(r) == {"max_offset_c"}
    r = await api.patch(f"/v1/devices/{bid}", json={"backup_reserve_pct": 120})
    assert r.status_code == 422 and fields_of(r) == {"backup_reserve_pct"}
    r = await api.patch(f"/v1/devices/{bid}", json={"capacity_wh": None})
    assert r.status_code == 422 and fields_of(r) == {"capacity_wh"}
    # Checked against the stored comfort_max_c (28).
    r = await api.patch(f"/v1/devices/{tid}", json={"comfort_min_c": 29})
    assert r.status_code == 422 and fields_of(r) == {"comfort_min_c"}
    assert (await api.get(f"/v1/devices/{tid}")).json()["comfort_min_c"] == 18
    r = await api.patch(f"/v1/devices/{tid}", json={"max_offset_c": 1.0, "feeder": "F-12"})
    assert r.status_code == 200 and r.json()["feeder"] == "F-12"


# --- offboarding --------------------------------------------------------------------------------
async def test_offboarded_device_disappears_and_leaves_a_tombstone(api: Any) -> None:
    gone, kept = uid("b"), uid("b")
    for d in (gone, kept):
        assert (await api.post("/v1/devices", json=battery(d))).status_code == 201
    await api.services.state.put_states({gone: state(NOW - 1_000, soc_pct=90)})
    fleet = (await api.get("/v1/fleet")).json()["totals"]
    assert fleet["registered"] == 2

    r = await api.delete(f"/v1/devices/{gone}")
    assert r.status_code == 204
    assert (await api.get(f"/v1/devices/{gone}")).status_code == 404
    assert (await api.delete(f"/v1/devices/{gone}")).status_code == 404
    assert (await api.patch(f"/v1/devices/{gone}", json={"enrolled": True})).status_code == 404
    listed = [d["id"] for d in (await api.get("/v1/devices")).json()["devices"]]
    assert listed == [kept]
    registry = await api.services.state.registry_all()
    assert registry[gone] == -1 and registry[kept] == 0
    assert (await api.services.state.get_states([gone])) == [None]
    assert (await api.get("/v1/fleet")).json()["totals"]["registered"] == 1
    # The row stays (history), marked offboarded; its id is never handed out again.
    async with api.services.db.session() as s:
        row = (await s.execute(select(Device).where(Device.id == gone))).scalar_one()
        assert row.offboarded_ms == NOW and row.enrolled is False
        assert (await s.execute(select(func.count()).select_from(Device))).scalar_one() == 2
    assert (await api.post("/v1/devices", json=battery(gone))).status_code == 409


# --- against a real Mosquitto with dynamic security ---------------------------------------------
async def test_credentials_work_until_offboarding_revokes_them(
    mosquitto_broker: MosquittoBroker, sqlite_url: str, api_factory: Any
) -> None:
    broker = mosquitto_broker
    settings = make_settings(
        sqlite_url,
        mqtt_url=broker.service_url,
        broker_credentials="dynsec",
        topic_root=broker.topic_root,
    )
    client, make_key = await api_factory(settings, ManualClock(NOW))
    headers = await make_key("acme", "fleet")
    did = uid("bat")
    r = await client.post("/v1/devices", json=battery(did), headers=headers)
    assert r.status_code == 201, r.text
    creds = r.json()["mqtt"]
    device = Client(broker, creds["username"], creds["password"])
    try:
        assert not device.connect().is_failure
        assert (await client.delete(f"/v1/devices/{did}", headers=headers)).status_code == 204
        assert device.disconnected.wait(WAIT_S), "offboarded device still connected"
    finally:
        device.stop()
    again = Client(broker, creds["username"], creds["password"])
    try:
        assert again.connect().is_failure
    finally:
        again.stop()


def test_hand_figures_used_above() -> None:
    # Kept next to the tests so a reader can check the arithmetic.
    assert pytest.approx(10.2492) == 0.8 * 13_500 * 0.949 / 1000
    assert pytest.approx(2.5623) == 0.2 * 13_500 * 0.949 / 1000
    assert np.isclose(4 * math.log(12 / 10.3), 0.611049, atol=1e-6)


async def test_password_file_credentials_work_until_offboarding_revokes_them(
    fresh_pg_url: str, api_factory: Any
) -> None:
    """The same promise with VPP_BROKER_CREDENTIALS=password_file: the login the API returns
    works at the broker when the API answers (the agent has applied it), and offboarding drops
    the live session before it answers."""
    from tests.helpers.mosquitto import password_file_available, run_broker_agent, run_mosquitto

    if not password_file_available():
        pytest.skip("mosquitto and mosquitto_passwd are not installed")
    with (
        run_mosquitto(mechanism="password_file") as broker,
        run_broker_agent(broker, fresh_pg_url),
    ):
        settings = make_settings(
            fresh_pg_url,
            mqtt_url=broker.service_url,
            broker_credentials="password_file",
            topic_root=broker.topic_root,
        )
        client, make_key = await api_factory(settings, ManualClock(NOW))
        headers = await make_key("acme", "fleet")
        did = uid("bat")
        r = await client.post("/v1/devices", json=battery(did), headers=headers)
        assert r.status_code == 201, r.text
        creds = r.json()["mqtt"]
        device = Client(broker, creds["username"], creds["password"])
        try:
            assert not device.connect().is_failure
            assert not device.subscribe(creds["topics"]["cmd"]).is_failure
            assert (await client.delete(f"/v1/devices/{did}", headers=headers)).status_code == 204
            assert device.disconnected.wait(WAIT_S), "offboarded device still connected"
        finally:
            device.stop()
        again = Client(broker, creds["username"], creds["password"])
        try:
            assert again.connect().is_failure
        finally:
            again.stop()
        # An id the API allows but a password file cannot hold: refused by name, nothing stored.
        r = await client.post("/v1/devices", json=battery("bat:1"), headers=headers)
        assert r.status_code == 422, r.text
        assert "device_id" in r.text and "':'" in r.text
        assert (await client.get("/v1/devices/bat:1", headers=headers)).status_code == 404
