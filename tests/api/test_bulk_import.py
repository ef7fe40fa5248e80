"""POST /v1/devices/bulk: JSON or CSV, all or nothing, every bad row named by index and field."""

from __future__ import annotations

from typing import Any

import orjson

from tests.helpers.devices import battery, fields_of, solar, stored_ids, thermostat, uid

CSV_HEADER = (
    "id,kind,site_id,region,capacity_wh,max_discharge_w,max_charge_w,backup_reserve_pct,"
    "rated_w,hvac_rated_w,comfort_max_c,comfort_min_c,vendor\n"
)


def csv_row(*cells: object) -> str:
    return ",".join("" if c is None else str(c) for c in cells) + "\n"


def bad_rows(resp: Any) -> set[tuple[int, str]]:
    return {(e["index"], e["field"]) for e in resp.json()["errors"]}


async def assert_nothing_stored(api: Any) -> None:
    assert await stored_ids(api) == set()
    assert await api.services.state.registry_all() == {}
    assert (await api.get("/v1/fleet")).json()["totals"]["registered"] == 0


async def test_json_import_returns_credentials_for_each_device(api: Any) -> None:
    rows = [battery(uid("b")), thermostat(uid("t")), solar(uid("s")), battery()]
    r = await api.post("/v1/devices/bulk", json=rows)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["count"] == 4 and len(out["devices"]) == 4
    ids = [d["id"] for d in out["devices"]]
    assert ids[:3] == [row["id"] for row in rows[:3]]  # input order
    assert ids[3].startswith("d-")  # generated
    passwords = {d["mqtt"]["password"] for d in out["devices"]}
    assert len(passwords) == 4
    for d in out["devices"]:
        assert d["mqtt"]["username"] == d["id"]
        assert d["mqtt"]["topics"]["cmd"].endswith(f"/devices/{d['id']}/cmd")
    assert await stored_ids(api) == set(ids)
    assert set(await api.services.state.registry_all()) == set(ids)
    assert (await api.get("/v1/fleet")).json()["totals"]["registered"] == 4


async def test_csv_import_with_empty_cells_for_other_kinds(api: Any) -> None:
    b, s, t = uid("b"), uid("s"), uid("t")
    body = (
        CSV_HEADER
        + csv_row(
            b,
            "battery",
            "s1",
            "ERCOT-NORTH",
            13500,
            5000,
            5000,
            30,
            None,
            None,
            None,
            None,
            "acme-oem",
        )
        + csv_row(
            s, "solar", "s1", "ERCOT-NORTH", None, None, None, None, 7600, None, None, None, None
        )
        + csv_row(
            t, "thermostat", "s2", "PJM-DOM", None, None, None, None, None, 5600, 27, 19, None
        )
    )
    r = await api.post("/v1/devices/bulk", content=body, headers={"content-type": "text/csv"})
    assert r.status_code == 201, r.text
    assert [d["id"] for d in r.json()["devices"]] == [b, s, t]
    got = (await api.get(f"/v1/devices/{b}")).json()
    assert got["backup_reserve_pct"] == 30 and got["vendor"] == "acme-oem"
    assert got["capacity_wh"] == 13_500 and got["rated_w"] is None
    got = (await api.get(f"/v1/devices/{t}")).json()
    assert (got["comfort_min_c"], got["comfort_max_c"], got["max_offset_c"]) == (19, 27, 2)


async def test_json_bad_rows_are_all_listed_and_nothing_is_stored(api: Any) -> None:
    dup = uid("b")
    rows = [
        battery(uid("b")),  # 0 good
        battery(uid("b"), capacity_wh=-1),  # 1
        solar(uid("s"), region="ATLANTIS"),  # 2
        thermostat(uid("t"), comfort_min_c=30),  # 3 (above comfort_max_c 28)
        battery(dup),  # 4 good, first of a pair
        battery(dup),  # 5 repeats row 4
        battery(uid("b"), rated_w=7_000, backup_reserve_pct=150),  # 6: two fields
        {"kind": "battery"},  # 7: missing fields
        "not an object",  # 8
        solar(uid("s")),  # 9 good
        battery("bad/id"),  # 10
    ]
    r = await api.post("/v1/devices/bulk", json=rows)
    assert r.status_code == 422, r.text
    got = bad_rows(r)
    assert {
        (1, "capacity_wh"),
        (2, "region"),
        (3, "comfort_min_c"),
        (5, "id"),
        (6, "rated_w"),
        (6, "backup_reserve_pct"),
        (7, "site_id"),
        (7, "region"),
        (7, "capacity_wh"),
        (8, "row"),
        (10, "id"),
    } <= got
    assert {i for i, _ in got} == {1, 2, 3, 5, 6, 7, 8, 10}  # the good rows are not blamed
    assert r.json()["bad_rows"] == 8
    assert "row 1: capacity_wh" in r.json()["detail"]
    await assert_nothing_stored(api)


async def test_csv_bad_rows_are_all_listed_and_nothing_is_stored(api: Any) -> None:
    body = (
        CSV_HEADER
        + csv_row(
            uid("b"),
            "battery",
            "s1",
            "ERCOT-NORTH",
            13500,
            5000,
            5000,
            None,
            None,
            None,
            None,
            None,
            None,
        )
        + csv_row(
            uid("b"),
            "battery",
            "s1",
            "ERCOT-NORTH",
            "big",
            5000,
            5000,
            None,
            None,
            None,
            None,
            None,
            None,
        )
        + csv_row(
            uid("s"),
            "solar",
            "s1",
            "ERCOT-NORTH",
            100,
            None,
            None,
            None,
            7600,
            None,
            None,
            None,
            None,
        )
        + csv_row(
            uid("x"),
            "heatpump",
            "s1",
            "ERCOT-NORTH",
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
    )
    r = await api.post("/v1/devices/bulk", content=body, headers={"content-type": "text/csv"})
    assert r.status_code == 422, r.text
    assert bad_rows(r) == {(1, "capacity_wh"), (2, "capacity_wh"), (3, "kind")}
    await assert_nothing_stored(api)


async def test_csv_row_with_more_cells_than_the_header_is_named(api: Any) -> None:
    body = "id,kind,site_id,region,rated_w\n" + "pv-1,solar,s,ERCOT-NORTH,7600,extra\n"
    r = await api.post("/v1/devices/bulk", content=body, headers={"content-type": "text/csv"})
    assert r.status_code == 422 and bad_rows(r) == {(0, "row")}


async def test_an_id_already_registered_is_409_and_nothing_else_is_stored(api: Any) -> None:
    taken = uid("b")
    assert (await api.post("/v1/devices", json=battery(taken))).status_code == 201
    fresh = [battery(uid("b")), battery(taken), solar(uid("s"))]
    r = await api.post("/v1/devices/bulk", json=fresh)
    assert r.status_code == 409, r.text
    assert bad_rows(r) == {(1, "id")}
    assert await stored_ids(api) == {taken}
    assert set(await api.services.state.registry_all()) == {taken}


async def test_body_level_problems(api: Any) -> None:
    r = await api.post("/v1/devices/bulk", json=[])
    assert r.status_code == 422 and fields_of(r) == {"body"}
    r = await api.post("/v1/devices/bulk", json={"devices": []})
    assert r.status_code == 422 and fields_of(r) == {"body"}
    r = await api.post(
        "/v1/devices/bulk", content=b"[{", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and fields_of(r) == {"body"}
    r = await api.post("/v1/devices/bulk", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = await api.post("/v1/devices/bulk", content=b"", headers={"content-type": "text/csv"})
    assert r.status_code == 422
    await assert_nothing_stored(api)


async def test_more_than_100000_devices_is_refused(api: Any) -> None:
    row = orjson.dumps(solar()).decode()
    body = "[" + ",".join([row] * 100_001) + "]"
    r = await api.post(
        "/v1/devices/bulk", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and fields_of(r) == {"body"}
    await assert_nothing_stored(api)


async def test_a_broker_failure_rolls_everything_back(api: Any) -> None:
    from devices.credentials import CredentialError

    revoked: list[str] = []

    class FailingCredentials:
        async def provision(self, device_ids: list[str]) -> dict[str, str]:
            raise CredentialError("broker said no")

        async def revoke(self, device_ids: list[str]) -> None:
            revoked.extend(device_ids)

        async def ping(self) -> bool:
            return True

        async def close(self) -> None:
            return None

    real = api.services.credentials
    api.services.credentials = FailingCredentials()
    try:
        rows = [battery(uid("b")), solar(uid("s"))]
        r = await api.post("/v1/devices/bulk", json=rows)
        assert r.status_code == 503 and fields_of(r) == {"broker"}
        assert sorted(revoked) == sorted(row["id"] for row in rows)  # half-made logins undone
        await assert_nothing_stored(api)
    finally:
        api.services.credentials = real
