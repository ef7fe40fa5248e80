"""Keys, roles and tenants on the device endpoints: 401 without a valid key, 403 for a role that
may not, and another tenant's device answers 404 exactly like a missing one."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.devices import NOW, battery, uid
from tests.helpers.settings import settings_for
from vpp.clock import ManualClock

DEVICE_CALLS = [
    ("POST", "/v1/devices", battery()),
    ("POST", "/v1/devices/bulk", [battery()]),
    ("GET", "/v1/devices", None),
    ("GET", "/v1/devices/{id}", None),
    ("PATCH", "/v1/devices/{id}", {"enrolled": False}),
    ("DELETE", "/v1/devices/{id}", None),
]


@pytest.fixture()
async def world(db_url: str, api_factory: Any) -> Any:
    """Two tenants with a device each, and keys of every role."""
    client, make_key = await api_factory(settings_for(db_url), ManualClock(NOW))
    keys = {
        "acme": await make_key("acme", "fleet"),
        "other": await make_key("other", "fleet"),
        "admin": await make_key("root", "admin"),
        "hyperscaler": await make_key("acme", "hyperscaler"),
        "operator": await make_key("grid", "operator"),
    }
    devices = {"acme": uid("acme"), "other": uid("other")}
    for tenant, did in devices.items():
        r = await client.post("/v1/devices", json=battery(did), headers=keys[tenant])
        assert r.status_code == 201, r.text
    return client, keys, devices


async def call(client: Any, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
    return await client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), DEVICE_CALLS)
async def test_without_a_valid_key_is_401(world: Any, method: str, path: str, body: Any) -> None:
    client, _, devices = world
    path = path.format(id=devices["acme"])
    for headers in (
        {},
        {"Authorization": "Bearer vpp_nope_nope"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ):
        r = await call(client, method, path, body, headers)
        assert r.status_code == 401, (headers, r.text)
        assert "detail" in r.json()


@pytest.mark.parametrize("role", ["hyperscaler", "operator"])
@pytest.mark.parametrize(("method", "path", "body"), DEVICE_CALLS)
async def test_roles_that_may_not_manage_devices_get_403(
    world: Any, role: str, method: str, path: str, body: Any
) -> None:
    client, keys, devices = world
    r = await call(client, method, path.format(id=devices["acme"]), body, keys[role])
    assert r.status_code == 403, r.text
    assert role in r.json()["detail"]
    # ... and nothing happened.
    got = await client.get(f"/v1/devices/{devices['acme']}", headers=keys["acme"])
    assert got.status_code == 200 and got.json()["enrolled"] is True


@pytest.mark.parametrize(
    ("method", "body"), [("GET", None), ("PATCH", {"enrolled": False}), ("DELETE", None)]
)
async def test_another_tenants_device_is_404_exactly_like_a_missing_one(
    world: Any, method: str, body: Any
) -> None:
    client, keys, devices = world
    theirs = devices["other"]
    missing = "x" * len(theirs)
    r_theirs = await call(client, method, f"/v1/devices/{theirs}", body, keys["acme"])
    r_missing = await call(client, method, f"/v1/devices/{missing}", body, keys["acme"])
    assert r_theirs.status_code == r_missing.status_code == 404
    assert r_theirs.json() == orjson_replace(r_missing.json(), missing, theirs)
    # The owner still sees it unchanged.
    mine = await client.get(f"/v1/devices/{theirs}", headers=keys["other"])
    assert mine.status_code == 200 and mine.json()["enrolled"] is True


def orjson_replace(doc: Any, old: str, new: str) -> Any:
    import orjson

    return orjson.loads(orjson.dumps(doc).decode().replace(old, new))


async def test_lists_show_only_the_keys_tenant_and_admin_sees_all(world: Any) -> None:
    client, keys, devices = world
    for tenant in ("acme", "other"):
        listed = (await client.get("/v1/devices", headers=keys[tenant])).json()["devices"]
        assert [d["id"] for d in listed] == [devices[tenant]]
    listed = (await client.get("/v1/devices", headers=keys["admin"])).json()["devices"]
    assert {d["id"] for d in listed} == set(devices.values())
    assert (await client.get("/v1/fleet", headers=keys["acme"])).json()["totals"]["registered"] == 1
    for role in ("admin", "operator", "hyperscaler"):
        r = await client.get("/v1/fleet", headers=keys[role])
        assert r.status_code == 200 and r.json()["totals"]["registered"] == 2


async def test_a_tenant_cannot_take_an_id_another_tenant_uses(world: Any) -> None:
    client, keys, devices = world
    r = await client.post("/v1/devices", json=battery(devices["other"]), headers=keys["acme"])
    assert r.status_code == 409
    got = await client.get(f"/v1/devices/{devices['other']}", headers=keys["other"])
    assert got.json()["tenant_id"] == "other"


async def test_admin_manages_any_tenants_devices(world: Any) -> None:
    client, keys, devices = world
    r = await client.patch(
        f"/v1/devices/{devices['other']}", json={"enrolled": False}, headers=keys["admin"]
    )
    assert r.status_code == 200 and r.json()["tenant_id"] == "other"
    did = uid("adm")
    r = await client.post(
        "/v1/devices", json=battery(did, tenant_id="other"), headers=keys["admin"]
    )
    assert r.status_code == 201 and r.json()["tenant_id"] == "other"
    assert (await client.get(f"/v1/devices/{did}", headers=keys["other"])).status_code == 200
    r = await client.post(
        "/v1/devices", json=battery(uid("x"), tenant_id="nobody"), headers=keys["admin"]
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "tenant_id"
    assert (
        await client.delete(f"/v1/devices/{devices['acme']}", headers=keys["admin"])
    ).status_code == 204


async def test_a_fleet_key_cannot_register_for_another_tenant(world: Any) -> None:
    client, keys, _ = world
    r = await client.post(
        "/v1/devices", json=battery(uid("x"), tenant_id="other"), headers=keys["acme"]
    )
    assert r.status_code == 403 and r.json()["errors"][0]["field"] == "tenant_id"
