"""Security as an admin and a buyer see it: the audit trail of every ledger, dispatch, device and
key action (``GET /v1/audit``, admin only), revoked and expired keys (401 saying why), and
per-key rate limits (429 with Retry-After, other keys unaffected, one limit across replicas)."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from store.keys import create_api_key, key_id_of, revoke_api_key
from store.ratelimit import LocalBuckets
from tests.helpers.devices import battery, uid
from tests.helpers.fleets import NOW, REGION, fleet_of
from tests.helpers.market import install_stub
from tests.helpers.mosquitto import free_port
from tests.helpers.settings import make_settings, settings_for
from vpp.clock import ManualClock
from vpp.fleet.snapshot import FleetSnapshot
from vpp.timefmt import to_rfc3339

H = 3_600_000
WIRE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def key_id(headers: dict[str, str]) -> str:
    found = key_id_of(headers["Authorization"].removeprefix("Bearer "))
    assert found is not None
    return found


async def market_api(db_url: str, api_factory: Any) -> Any:
    """An API with a stub forecaster (10 MW P90) so quotes and commits go through."""
    clock = ManualClock(NOW)
    client, make_key = await api_factory(settings_for(db_url), clock)
    install_stub(client.services, p90_mw=10.0)
    snap = fleet_of("b" * 400)

    async def snapshot(force: bool = False) -> FleetSnapshot:
        return snap

    client.services.fleet.snapshot = snapshot
    return client, make_key, clock


def request_body(mw: float = 1.0) -> dict[str, Any]:
    return {
        "region": REGION,
        "mw": mw,
        "start": to_rfc3339(NOW + 2 * H),
        "end": to_rfc3339(NOW + 4 * H),
    }


# --- the audit trail --------------------------------------------------------------------------
async def test_every_action_is_in_the_audit_trail(db_url: str, api_factory: Any) -> None:
    client, make_key, clock = await market_api(db_url, api_factory)
    buyer = await make_key("acme", "hyperscaler")
    op = await make_key("grid", "operator")
    fleet = await make_key("acme", "fleet")
    admin = await make_key("root", "admin")

    q = (await client.post("/v1/capacity-requests", json=request_body(), headers=buyer)).json()
    assert (await client.post(f"/v1/capacity-requests/{q['id']}/commit", headers=buyer)).is_success
    q2 = (await client.post("/v1/capacity-requests", json=request_body(), headers=buyer)).json()
    assert (await client.post(f"/v1/capacity-requests/{q2['id']}/cancel", headers=buyer)).is_success
    ge = await client.post(
        "/v1/grid-events",
        json={
            "region": REGION,
            "mw": 2,
            "start": to_rfc3339(NOW + H),
            "end": to_rfc3339(NOW + 2 * H),
        },
        headers=op,
    )
    assert ge.status_code == 201, ge.text
    ge_id = ge.json()["id"]
    assert (await client.post(f"/v1/grid-events/{ge_id}/abort", headers=op)).is_success
    device_id = uid("aud")
    assert (await client.post("/v1/devices", json=battery(device_id), headers=fleet)).is_success
    r = await client.patch(f"/v1/devices/{device_id}", json={"enrolled": False}, headers=fleet)
    assert r.is_success, r.text
    assert (await client.delete(f"/v1/devices/{device_id}", headers=fleet)).status_code == 204
    victim = await make_key("acme", "hyperscaler")
    r = await client.post(f"/v1/api-keys/{key_id(victim)}/revoke", headers=admin)
    assert r.status_code == 200 and r.json()["revoked_at"] == to_rfc3339(NOW), r.text

    r = await client.get("/v1/audit", params={"limit": 1000}, headers=admin)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert r.json()["next_cursor"] is None
    by_action: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_action.setdefault(item["action"], []).append(item)
        assert WIRE_TIME.fullmatch(item["at"]), item
    assert [i["id"] for i in items] == sorted((i["id"] for i in items), reverse=True)

    def one(action: str, target: str | None, caller: dict[str, str], tenant: str) -> None:
        rows = [i for i in by_action.get(action, []) if i["target_id"] == target]
        assert len(rows) == 1, (action, target, by_action.get(action))
        row = rows[0]
        assert (row["tenant"], row["key_id"], row["actor"]) == (tenant, key_id(caller), "api")
        assert row["at"] == to_rfc3339(NOW)

    one("request.quoted", q["id"], buyer, "acme")
    one("request.committed", q["id"], buyer, "acme")
    one("request.quoted", q2["id"], buyer, "acme")
    one("request.cancelled", q2["id"], buyer, "acme")
    one("grid_event.created", ge_id, op, "grid")
    one("grid_event.aborted", ge_id, op, "grid")
    one("device.created", device_id, fleet, "acme")
    one("device.updated", device_id, fleet, "acme")
    one("device.offboarded", device_id, fleet, "acme")
    one("key.revoked", key_id(victim), admin, "root")
    committed = next(i for i in by_action["request.committed"] if i["target_id"] == q["id"])
    assert committed["detail"]["region"] == REGION and committed["detail"]["quoted_mw"] == 1.0
    assert by_action["grid_event.aborted"][0]["detail"]["status"] == "aborted"
    # Keys made outside the API (vpp keys, here the test's own) are in it too, with no caller key.
    created = {i["target_id"]: i for i in by_action["key.created"]}
    assert created[key_id(buyer)]["actor"] == "local" and created[key_id(buyer)]["key_id"] is None
    assert created[key_id(buyer)]["detail"] == {"tenant": "acme", "role": "hyperscaler"}

    # Filters: action, tenant, time window; pages by cursor cover everything exactly once.
    r = await client.get("/v1/audit", params={"action": "request.committed"}, headers=admin)
    assert [i["target_id"] for i in r.json()["items"]] == [q["id"]]
    r = await client.get("/v1/audit", params={"tenant": "grid"}, headers=admin)
    assert {i["action"] for i in r.json()["items"]} == {"grid_event.created", "grid_event.aborted"}
    before = {"until": to_rfc3339(NOW)}
    assert (await client.get("/v1/audit", params=before, headers=admin)).json()["items"] == []
    window = {"since": to_rfc3339(NOW), "until": to_rfc3339(NOW + 1)}
    assert len(
        (await client.get("/v1/audit", params=window, headers=admin)).json()["items"]
    ) == len(items)
    clock.advance(60)
    late = await make_key("late", "fleet")
    since = {"since": "2026-07-14T20:30:30+00:00"}  # an offset, not Z: any RFC 3339 time
    r = await client.get("/v1/audit", params=since, headers=admin)
    assert [i["target_id"] for i in r.json()["items"]] == [key_id(late)]
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/audit", params=params, headers=admin)).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen)) == len(items) + 1


async def test_audit_is_for_admin_only_and_names_bad_filters(
    sqlite_url: str, api_factory: Any
) -> None:
    client, make_key = await api_factory(make_settings(sqlite_url))
    assert (await client.get("/v1/audit")).status_code == 401
    for role in ("operator", "hyperscaler", "fleet"):
        r = await client.get("/v1/audit", headers=await make_key("t", role))
        assert r.status_code == 403, (role, r.text)
        r = await client.post("/v1/api-keys/abc/revoke", headers=await make_key("t", role))
        assert r.status_code == 403, (role, r.text)
    admin = await make_key("root", "admin")
    for params, field in (
        ({"action": "request.stolen"}, "action"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-07-14T21:00:00Z", "until": "2026-07-14T20:00:00Z"}, "until"),
        ({"cursor": "abc"}, "cursor"),
        ({"limit": 0}, "limit"),
    ):
        r = await client.get("/v1/audit", params=params, headers=admin)
        assert r.status_code == 422 and field in r.json()["detail"], (params, r.text)
    r = await client.post("/v1/api-keys/000000000000/revoke", headers=admin)
    assert r.status_code == 404 and "key_id" in r.json()["detail"]


async def test_a_failed_audit_write_does_not_fail_the_action(
    sqlite_url: str, api_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from store import audit

    client, make_key, _ = await market_api(sqlite_url, api_factory)
    buyer = await make_key("acme", "hyperscaler")

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("audit table unavailable")

    monkeypatch.setattr(audit, "entry", broken)
    r = await client.post("/v1/capacity-requests", json=request_body(), headers=buyer)
    assert r.status_code == 201 and r.json()["status"] == "quoted", r.text
    r = await client.post(f"/v1/capacity-requests/{r.json()['id']}/commit", headers=buyer)
    assert r.status_code == 200 and r.json()["status"] == "committed", r.text


# --- revoked and expired keys -----------------------------------------------------------------
async def test_a_revoked_key_answers_401_within_the_cache_ttl(
    sqlite_url: str, api_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api import deps
    from tests.helpers.eventkit import wait_for

    monkeypatch.setattr(deps, "_KEY_CACHE_TTL_S", 1.0)  # the service's is 10 s; same code path
    client, make_key = await api_factory(make_settings(sqlite_url), ManualClock(NOW))
    fleet = await make_key("acme", "fleet")
    assert (await client.get("/v1/fleet", headers=fleet)).status_code == 200  # cached now
    # Revoked by another process (as `vpp keys revoke` does): this one learns it within the TTL.
    await revoke_api_key(client.services.db, key_id(fleet), NOW)

    async def refused() -> bool:
        return (await client.get("/v1/fleet", headers=fleet)).status_code == 401

    assert await wait_for(refused, deps._KEY_CACHE_TTL_S + 2.0)
    r = await client.get("/v1/fleet", headers=fleet)
    assert r.json()["detail"] == f"API key {key_id(fleet)} was revoked at {to_rfc3339(NOW)}"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    # Revoked through this process's API: refused on the very next call, cache or not.
    admin = await make_key("root", "admin")
    other = await make_key("acme", "fleet")
    assert (await client.get("/v1/fleet", headers=other)).status_code == 200
    assert (await client.post(f"/v1/api-keys/{key_id(other)}/revoke", headers=admin)).is_success
    assert (await client.get("/v1/fleet", headers=other)).status_code == 401
    # Revoking again changes nothing and writes no second audit row.
    assert (await client.post(f"/v1/api-keys/{key_id(other)}/revoke", headers=admin)).is_success
    trail = await client.get("/v1/audit", params={"action": "key.revoked"}, headers=admin)
    assert sorted(i["target_id"] for i in trail.json()["items"]) == sorted(
        [key_id(fleet), key_id(other)]
    )


async def test_an_expired_key_answers_401(sqlite_url: str, api_factory: Any) -> None:
    clock = ManualClock(NOW)
    client, _ = await api_factory(make_settings(sqlite_url), clock)
    key = await create_api_key(client.services.db, "acme", "fleet", NOW, expires_ms=NOW + 60_000)
    assert (await client.get("/v1/fleet", headers=bearer(key))).status_code == 200
    clock.advance(59)
    assert (await client.get("/v1/fleet", headers=bearer(key))).status_code == 200
    clock.advance(1)  # the entry is still in the key cache: expiry is checked on every call
    r = await client.get("/v1/fleet", headers=bearer(key))
    assert r.status_code == 401
    assert r.json()["detail"] == f"API key {key_id_of(key)} expired at {to_rfc3339(NOW + 60_000)}"
    with pytest.raises(ValueError, match="expires"):
        await create_api_key(client.services.db, "acme", "fleet", NOW, expires_ms=NOW)


# --- rate limits ------------------------------------------------------------------------------
def test_token_bucket_refills_at_its_rate() -> None:
    b = LocalBuckets()
    assert [b.take("k", 2.0, 3, now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("k", 2.0, 3, now=0.0) == pytest.approx(0.5)  # half a second to the next token
    assert b.take("k", 2.0, 3, now=0.5) == 0.0
    assert b.take("other", 2.0, 3, now=0.5) == 0.0  # a bucket per key
    assert [b.take("k", 2.0, 3, now=100.0) for _ in range(4)][-1] > 0  # full at burst, not more


async def test_a_key_over_its_limit_gets_429_and_others_do_not(
    db_url: str, api_factory: Any, services_factory: Any
) -> None:
    settings = settings_for(db_url)
    client, make_key = await api_factory(settings, ManualClock(NOW))
    db = client.services.db
    limited = await create_api_key(
        db, "acme", "fleet", NOW, rate_limit_per_s=0.01, rate_limit_burst=3
    )
    runaway = bearer(limited)
    calm = await make_key("acme", "fleet")
    for _ in range(3):
        assert (await client.get("/v1/fleet", headers=runaway)).status_code == 200
    r = await client.get("/v1/fleet", headers=runaway)
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1  # 0.01/s: about 100 s to the next token
    assert f"API key {key_id(runaway)}" in r.json()["detail"]
    for _ in range(5):  # another key of the same tenant is not slowed by it
        assert (await client.get("/v1/fleet", headers=calm)).status_code == 200
    if db_url.startswith("postgresql"):
        # A second replica on the same database and Redis shares the bucket: still empty there.
        second = await services_factory(settings, ManualClock(NOW))
        replica, _ = await api_factory(settings, ManualClock(NOW), second)
        assert (await replica.get("/v1/fleet", headers=runaway)).status_code == 429
        assert (await replica.get("/v1/fleet", headers=calm)).status_code == 200


async def test_rate_limit_fails_open_when_redis_is_down(
    sqlite_url: str, api_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis on a port nobody listens on. The grid-event list reads only the database, so what
    # is checked is the rate limit alone: no 5xx, a log line, and the replica's own bucket.
    settings = make_settings(
        sqlite_url,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        rate_limit_per_s=0.001,
        rate_limit_burst=2,
    )
    from vpp.metrics import RATE_LIMIT_STORE_ERRORS

    client, make_key = await api_factory(settings, ManualClock(NOW))
    op = await make_key("grid", "operator")
    errors_before = RATE_LIMIT_STORE_ERRORS._value.get()
    with caplog.at_level(logging.WARNING, logger="store.ratelimit"):
        codes = [(await client.get("/v1/grid-events", headers=op)).status_code for _ in range(3)]
    assert codes == [200, 200, 429]  # no 5xx; the local bucket limits instead
    assert any("state store did not answer" in m for m in caplog.messages)
    # Asked once, then left alone for a while: a dead Redis does not slow every request.
    assert RATE_LIMIT_STORE_ERRORS._value.get() - errors_before == 1


async def test_with_redis_a_key_revoked_by_the_cli_is_refused_at_once_by_every_replica(
    fresh_pg_url: str, api_factory: Any, services_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from typer.testing import CliRunner

    from api import deps
    from cli.main import app
    from vpp.settings import get_settings

    # A cache that would hold the key for an hour: only the revocation notice can stop it.
    monkeypatch.setattr(deps, "_KEY_CACHE_TTL_S", 3600.0)
    settings = settings_for(fresh_pg_url)
    first, make_key = await api_factory(settings, ManualClock(NOW))
    second_services = await services_factory(settings, ManualClock(NOW))
    second, _ = await api_factory(settings, ManualClock(NOW), second_services)
    key = await make_key("acme", "fleet")
    for replica in (first, second):
        assert (await replica.get("/v1/fleet", headers=key)).status_code == 200  # cached
    monkeypatch.setenv("VPP_DATABASE_URL", fresh_pg_url)
    monkeypatch.setenv("VPP_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("VPP_STATE_PREFIX", settings.state_prefix)
    get_settings.cache_clear()
    try:
        result = await asyncio.to_thread(CliRunner().invoke, app, ["keys", "revoke", key_id(key)])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "every API replica on this state store refuses it now" in result.output
    for replica in (first, second):
        r = await replica.get("/v1/fleet", headers=key)
        assert r.status_code == 401, r.text
        assert r.json()["detail"].startswith(f"API key {key_id(key)} was revoked at ")
