"""Lost dependencies under a running stack (API, the real ingest, the event runner, a simulated
fleet), with private servers the tests kill and restart:

- Redis killed and replaced by an empty one: while it is down the endpoints answer from what
  they have or 503 naming the state store, never 500; once it is back the registry is rebuilt
  from the database within seconds and every registered device's telemetry is accepted, also
  by an ingest worker that started while Redis was down (it held their messages meanwhile);
- PostgreSQL stopped (immediate) and started again: no 500 meanwhile (known keys keep working,
  the fleet view serves its snapshot), and everything works again without a restart.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from redis.exceptions import ConnectionError
from sqlalchemy import text

from api import deps
from devices.ingest import IngestWorker
from store.migrate import upgrade
from tests.helpers.devices import battery
from tests.helpers.eventkit import Stack, running_stack, summer_clock, wait_for
from tests.helpers.servers import postgres_available, private_postgres, private_redis
from tests.helpers.settings import make_settings
from vpp.fleet.records import unpack_states
from vpp.timefmt import to_rfc3339

SCALE = 20.0
N_DEVICES = 40
H = 3_600_000


def assert_answered(resp: httpx.Response, dependency: str) -> None:
    """Anything but a 5xx, or the 503 of a dependency that is down: JSON in the service's error
    shape naming ``dependency``, and a Retry-After."""
    if resp.status_code < 500:
        return
    assert resp.status_code == 503, f"{resp.request.url.path}: {resp.status_code} {resp.text}"
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    assert int(resp.headers["retry-after"]) > 0
    detail = resp.json()["detail"]
    assert detail.startswith(f"{dependency}:"), detail


def quote_body(services: Any) -> dict[str, Any]:
    now = services.clock.now_ms()
    return {"region": "ERCOT-NORTH", "mw": 0.01, "start": to_rfc3339(now + 2 * H),
            "end": to_rfc3339(now + 3 * H)}  # fmt: skip


async def calls(st: Stack, key: dict[str, str], device_id: str) -> dict[str, httpx.Response]:
    """The calls an operator and a buyer would make, by name."""
    c = st.client
    fleet_key = _bearer(st.fleet_key)
    return {
        "device": await c.get(f"/v1/devices/{device_id}", headers=fleet_key),
        "devices": await c.get("/v1/devices", params={"limit": 5}, headers=fleet_key),
        "fleet": await c.get("/v1/fleet", headers=_bearer(st.fleet_key)),
        "quote": await c.post("/v1/capacity-requests", json=quote_body(st.services), headers=key),
        "readyz": await c.get("/readyz"),
    }


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def publish_burst(st: Stack) -> dict[str, int]:
    """Every device reports at once; returns each device's sequence number in the burst."""
    fleet = st.sim.fleet
    now = st.services.clock.now_ms()
    idx, payloads = fleet.telemetry_payloads(now, mask=fleet.alive.copy())
    topics = [st.services.topic(fleet.ids[i], "telemetry") for i in idx.tolist()]
    pub = st.services.mqtt_client("burst")
    await pub.connect()
    try:
        await pub.publish_many((t, p, 0, False) for t, p in zip(topics, payloads, strict=True))
    finally:
        await pub.disconnect()
    return dict(zip([fleet.ids[i] for i in idx.tolist()], fleet.seq[idx].tolist(), strict=True))


async def burst_stored(st: Stack, seqs: dict[str, int], workers: list[IngestWorker]) -> None:
    """Each device's burst report (or a later one) is in the state store; no worker refused a
    registered device as unknown."""
    ids = list(seqs)

    async def all_stored() -> bool:
        try:
            recs = unpack_states(await st.services.state.get_states(ids))
        except ConnectionError:  # a pooled connection from before a restart
            return False
        return all(int(r["seq"]) >= seqs[d] for d, r in zip(ids, recs, strict=True))

    assert await wait_for(all_stored, 20), "the burst did not all reach the state store"
    for w in workers:
        assert w.rejected["unknown_device"] == 0, dict(w.rejected)


async def test_redis_lost_and_replaced_by_an_empty_one(fresh_pg_url: str, services_factory) -> None:  # type: ignore[no-untyped-def]
    with private_redis() as redis:
        settings = make_settings(fresh_pg_url, redis_url=redis.url, time_scale=SCALE,
                                 ingest_flush_ms=50)  # fmt: skip
        svc = await services_factory(settings, clock=summer_clock(SCALE))
        async with running_stack(svc, N_DEVICES, seed=61) as st:
            buyer = _bearer(await _key(svc, "acme", "hyperscaler"))
            device_id = st.sim.fleet.ids[0]
            await burst_stored(st, await publish_burst(st), [st.ingest])  # all reported once
            before = await calls(st, buyer, device_id)
            assert all(r.status_code < 300 for r in before.values()), {
                k: r.text for k, r in before.items() if r.status_code >= 300
            }
            registry = await svc.state.registry_all()
            assert len(registry) == N_DEVICES

            rebuilds = st.ingest.registry_rebuilds  # the first build of the new Redis

            redis.kill()
            during = await calls(st, buyer, device_id)
            for r in during.values():
                assert_answered(r, "state_store")
            # What is still known is served: the device from its snapshot record, the fleet.
            assert during["device"].status_code == 200
            assert during["device"].json()["last_telemetry"] is not None
            assert during["fleet"].status_code == 200
            assert during["fleet"].json()["totals"]["registered"] == N_DEVICES
            assert during["readyz"].json()["checks"]["state_store"] == "unreachable"
            # Onboarding needs the registry: refused whole, nothing stored.
            new = battery("late-1")
            refused = await st.client.post("/v1/devices", json=new, headers=_bearer(st.fleet_key))
            assert refused.status_code == 503, refused.text
            assert_answered(refused, "state_store")
            # So does offboarding: ingest could not be told, so the device stays.
            kept = st.sim.fleet.ids[1]
            gone = await st.client.delete(f"/v1/devices/{kept}", headers=_bearer(st.fleet_key))
            assert gone.status_code == 503, gone.text
            assert_answered(gone, "state_store")
            # An ingest worker started now (a `vpp ingest` restarted during the outage) knows
            # no device yet: it must hold their messages, not reject them.
            late = IngestWorker(svc, flush_ms=50)
            await late.start()
            try:
                # Every device reports while Redis is down: the workers share the messages, the
                # new one holds its share (it cannot tell a registered device yet).
                in_outage = await publish_burst(st)
                assert await wait_for(lambda: late.received > 0 and late.pending > 0, 10)
                redis.start()  # an empty Redis: no registry, no states, no generation

                async def rebuilt() -> bool:
                    try:
                        return await svc.state.registry_all() == registry
                    except ConnectionError:  # a pooled connection from before the restart
                        return False

                assert await wait_for(rebuilt, 10), "registry not rebuilt from the database"
                assert await svc.state.generation() is not None
                # Two workers saw the loss; one rebuilt, the other adopted its registry.
                assert st.ingest.registry_rebuilds + late.registry_rebuilds == rebuilds + 1
                # What arrived during the outage, held or kept, is all accepted; so is a burst
                # after it.
                await burst_stored(st, in_outage, [st.ingest, late])
                assert late.accepted["telemetry"] > 0
                await burst_stored(st, await publish_burst(st), [st.ingest, late])

                after = await calls(st, buyer, device_id)
                assert {k: r.status_code for k, r in after.items()} == {
                    k: r.status_code for k, r in before.items()
                }
                made = await st.client.post("/v1/devices", json=new, headers=_bearer(st.fleet_key))
                assert made.status_code == 201, made.text
                still = await st.client.get(f"/v1/devices/{kept}", headers=_bearer(st.fleet_key))
                assert still.status_code == 200, still.text
            finally:
                await late.stop(drain_timeout_s=2)


async def _key(svc: Any, tenant: str, role: str) -> str:
    from store.keys import create_api_key

    return await create_api_key(svc.db, tenant, role, svc.clock.now_ms())


@pytest.mark.skipif(not postgres_available(), reason="PostgreSQL server binaries not installed")
async def test_postgres_stopped_then_started(services_factory, redis_url: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Key lookups expire fast, so the outage outlasts them as a long one would.
    monkeypatch.setattr(deps, "_KEY_CACHE_TTL_S", 0.2)
    with private_postgres() as pg:
        await asyncio.to_thread(upgrade, pg.url)
        settings = make_settings(pg.url, redis_url=redis_url, time_scale=SCALE,
                                 ingest_flush_ms=50)  # fmt: skip
        svc = await services_factory(settings, clock=summer_clock(SCALE))
        async with running_stack(svc, N_DEVICES, seed=67) as st:
            buyer = _bearer(await _key(svc, "acme", "hyperscaler"))
            device_id = st.sim.fleet.ids[0]
            await burst_stored(st, await publish_burst(st), [st.ingest])  # all reported once
            before = await calls(st, buyer, device_id)
            assert all(r.status_code < 300 for r in before.values()), {
                k: r.text for k, r in before.items() if r.status_code >= 300
            }
            never_seen = _bearer(await _key(svc, "acme", "hyperscaler"))
            async with svc.db.session() as s:
                # The private server commits asynchronously (fast tests): make what was written
                # so far survive the crash, as every commit does on a production server.
                await s.execute(text("CHECKPOINT"))
            await asyncio.sleep(0.3)  # every cached key lookup has expired

            pg.stop(immediate=True)
            during = await calls(st, buyer, device_id)
            for r in during.values():
                assert_answered(r, "database")
            assert during["fleet"].status_code == 200  # a known key, the last snapshot
            assert during["readyz"].status_code == 503
            assert during["readyz"].json()["checks"]["database"] == "unreachable"
            assert during["readyz"].json()["detail"] == "database: unreachable"
            # A key the service has never looked up cannot be checked: 503, not 401.
            unknown = await st.client.get("/v1/fleet", headers=never_seen)
            assert unknown.status_code == 503
            assert_answered(unknown, "database")
            await asyncio.sleep(1.0)  # the background parts retry against the stopped server

            pg.start()

            async def all_back() -> bool:
                after = await calls(st, buyer, device_id)
                return all(after[k].status_code == before[k].status_code for k in before)

            assert await wait_for(all_back, 20, step_s=0.5), "not back after the restart"
            assert (await st.client.get("/v1/fleet", headers=never_seen)).status_code == 200
            assert st.runner.last_error is None or await wait_for(
                lambda: st.runner.last_error is None, 10
            )


async def test_a_state_store_that_never_answered_is_a_503_naming_it(
    api_factory, sqlite_url: str
) -> None:  # type: ignore[no-untyped-def]
    # Nothing cached yet: no fleet snapshot to serve, no registry to onboard into.
    client, make_key = await api_factory(
        make_settings(sqlite_url, redis_url="redis://127.0.0.1:1/0")
    )
    key = await make_key("fleetco", "fleet")
    for r in (
        await client.get("/v1/fleet", headers=key),
        await client.post("/v1/devices", json=battery("b-1"), headers=key),
        await client.get("/readyz"),
    ):
        assert r.status_code == 503, r.text
        assert_answered(r, "state_store")
    # The onboarding that could not register the device stored nothing.
    assert (await client.get("/v1/devices/b-1", headers=key)).status_code == 404


async def test_openapi_declares_the_503_of_every_operation(api_factory, sqlite_url: str) -> None:  # type: ignore[no-untyped-def]
    client, _ = await api_factory(make_settings(sqlite_url))
    doc = (await client.get("/openapi.json")).json()
    for path, item in doc["paths"].items():
        if path.startswith("/v1/"):
            for method, op in item.items():
                resp = op["responses"].get("503")
                assert resp is not None, (method, path)
                assert "Retry-After" in resp["headers"], (method, path)
                assert "$ref" in resp["content"]["application/json"]["schema"], (method, path)
