"""What the contract audit fixed, as a caller sees it: one error shape naming the field, a true
`Allow` header, no silently ignored query parameters, readiness that looks at the broker."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.settings import make_settings


@pytest.fixture()
async def api(api_factory: Any, sqlite_url: str) -> tuple[Any, dict[str, str]]:
    client, make_key = await api_factory(make_settings(sqlite_url))
    return client, await make_key("acme", "admin")


async def test_a_wrong_method_names_every_allowed_one(api: Any) -> None:
    client, admin = api
    r = await client.request("OPTIONS", "/v1/devices", headers=admin)
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, POST"
    assert "detail" in r.json()
    r = await client.put("/v1/devices/some-id", headers=admin)
    assert r.headers["allow"] == "DELETE, GET, PATCH"
    # A literal path wins over /v1/devices/{device_id}.
    r = await client.get("/v1/devices/bulk/x", headers=admin)
    assert r.status_code == 404
    r = await client.request("OPTIONS", "/v1/devices/bulk", headers=admin)
    assert r.headers["allow"] == "POST"


async def test_an_unknown_or_repeated_query_parameter_is_422_naming_it(api: Any) -> None:
    client, admin = api
    r = await client.get("/v1/devices", params={"regoin": "ERCOT-NORTH"}, headers=admin)
    assert r.status_code == 422
    assert r.json()["detail"].startswith("regoin: unknown query parameter")
    r = await client.get("/v1/fleet?region=ERCOT-NORTH&region=PJM-DOM", headers=admin)
    assert r.status_code == 422
    assert r.json()["detail"] == "region: given more than once"
    # Without a key it is still 401 first.
    assert (await client.get("/v1/devices", params={"regoin": "x"})).status_code == 401
    ok = await client.get("/v1/devices", params={"region": "ERCOT-NORTH"}, headers=admin)
    assert ok.status_code == 200


async def test_a_body_that_is_not_utf8_is_422_naming_the_body(api: Any) -> None:
    client, admin = api
    r = await client.post(
        "/v1/devices",
        content=b"\xff5",
        headers={**admin, "Content-Type": "application/json"},
    )
    assert r.status_code == 422
    assert r.json()["detail"].startswith("body:")


async def test_unreadable_csv_is_422_not_a_crash(api: Any) -> None:
    client, admin = api
    long_cell = "id,kind\n" + "x" * 200_000 + ",battery\n"
    for text in ("\r0", long_cell):
        r = await client.post(
            "/v1/devices/bulk", content=text, headers={**admin, "Content-Type": "text/csv"}
        )
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith("body:")


async def test_forecast_errors_name_the_field_in_a_string_detail(api: Any) -> None:
    client, admin = api
    for params, field in (
        ({"region": "ERCOT-NORTH", "step": "15 minutes"}, "step"),
        ({"region": "ERCOT-NORTH", "start": "yesterday"}, "start"),
        ({"region": "NOWHERE"}, "region"),
        ({"region": "ERCOT-NORTH", "firmness": "2"}, "firmness"),
    ):
        r = await client.get("/v1/forecast", params=params, headers=admin)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and field in detail


async def test_readyz_says_when_the_broker_is_unreachable(
    api_factory: Any, sqlite_url: str
) -> None:
    client, _ = await api_factory(make_settings(sqlite_url, mqtt_url="mqtt://127.0.0.1:1"))
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["broker"] == "unreachable"


async def test_openapi_declares_each_error_in_the_one_error_shape(api: Any) -> None:
    client, _ = api
    doc = (await client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in str(doc)
    assert doc["components"]["schemas"]["Error"]["properties"]["detail"]["type"] == "string"
    for path, item in doc["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, op in item.items():
            codes = set(op["responses"])
            assert "401" in codes, (method, path)
            if (method, path) not in {("get", "/v1/fleet"), ("get", "/v1/forecast")}:
                assert "403" in codes, (method, path)
            if "{" in path:
                assert "404" in codes, (method, path)
            for code, resp in op["responses"].items():
                if code.startswith("4"):
                    assert "application/json" in resp["content"], (method, path, code)
