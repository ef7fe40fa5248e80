from tests.helpers.settings import make_settings


async def test_healthz_and_readyz_on_embedded_defaults(api_factory, sqlite_url):
    client, _ = await api_factory(make_settings(sqlite_url))
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "state_store": "ok"}


async def test_readyz_names_the_unreachable_dependency(api_factory, sqlite_url):
    client, _ = await api_factory(make_settings(sqlite_url, redis_url="redis://127.0.0.1:1/0"))
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["state_store"] == "unreachable"


async def test_metrics_are_prometheus_text(api_factory, sqlite_url):
    client, _ = await api_factory(make_settings(sqlite_url))
    body = (await client.get("/metrics")).text
    assert "vpp_ingest_rejected_total" in body


async def test_unknown_and_missing_keys_are_401(api_factory, sqlite_url):
    client, make_key = await api_factory(make_settings(sqlite_url))
    assert (await client.get("/v1/fleet")).status_code == 401
    bad = {"Authorization": "Bearer vpp_nope_nope"}
    assert (await client.get("/v1/fleet", headers=bad)).status_code == 401
    assert (await client.get("/v1/fleet", headers=await make_key("t1", "fleet"))).status_code == 200
