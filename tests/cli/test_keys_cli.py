"""``vpp keys create`` (with an expiry and a rate limit) and ``vpp keys revoke``, run as an
operator would, then the key tried against the API on the same database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cli.main import app
from store.database import Database
from store.keys import key_id_of
from store.models import ApiKey, AuditEntry
from tests.helpers.settings import make_settings
from vpp.clock import get_clock
from vpp.settings import get_settings
from vpp.timefmt import parse_rfc3339

runner = CliRunner()
DAY_MS = 86_400_000


@pytest.fixture()
def db_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite+aiosqlite:///{tmp_path}/keys.db"
    monkeypatch.setenv("VPP_DATABASE_URL", url)
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


def vpp(*args: str) -> Any:
    return runner.invoke(app, list(args))


def rows(url: str, model: Any) -> list[Any]:
    async def go() -> list[Any]:
        db = Database(url)
        try:
            async with db.session() as s:
                return list((await s.execute(select(model))).scalars().all())
        finally:
            await db.dispose()

    return asyncio.run(go())


def key_row(url: str, key_id: str) -> ApiKey:
    return next(r for r in rows(url, ApiKey) if r.id == key_id)


def test_create_with_expiry_and_rate_limit(db_file: str) -> None:
    before = get_clock().now_ms()
    r = vpp("keys", "create", "--tenant", "acme", "--role", "fleet", "--expires-in", "30d",
            "--rate-limit", "5", "--burst", "20")  # fmt: skip
    assert r.exit_code == 0, r.output
    key = r.stdout.strip()
    assert r.stdout == key + "\n" and key.startswith("vpp_")  # the key alone on one line
    kid = key_id_of(key)
    assert kid is not None
    row = key_row(db_file, kid)
    assert before + 30 * DAY_MS <= (row.expires_ms or 0) <= get_clock().now_ms() + 30 * DAY_MS
    assert (row.rate_limit_per_s, row.rate_limit_burst) == (5.0, 20)

    r = vpp("keys", "create", "--tenant", "acme", "--role", "fleet",
            "--expires-in", "2031-01-01T00:00:00+01:00")  # fmt: skip
    assert r.exit_code == 0, r.output
    row = key_row(db_file, key_id_of(r.stdout.strip()) or "")
    assert row.expires_ms == parse_rfc3339("2030-12-31T23:00:00Z")

    for bad in ("soon", "2020-01-01T00:00:00Z"):
        r = vpp("keys", "create", "--tenant", "acme", "--role", "fleet", "--expires-in", bad)
        assert r.exit_code == 2 and "expires" in r.output, (bad, r.output)


def test_revoke_stops_the_key_and_is_audited(db_file: str) -> None:
    key = vpp("keys", "create", "--tenant", "acme", "--role", "fleet").stdout.strip()
    kid = key_id_of(key)
    assert kid is not None
    r = vpp("keys", "revoke", kid)
    assert r.exit_code == 0 and f"revoked key {kid} (tenant acme, role fleet)" in r.output
    assert key_row(db_file, kid).revoked_ms is not None
    r = vpp("keys", "revoke", key)  # the whole key works too; again: nothing changes
    assert r.exit_code == 0 and "revoked already" in r.output
    r = vpp("keys", "revoke", "000000000000")
    assert r.exit_code == 1 and "key_id: no API key" in r.output
    trail = [(a.action, a.target_id, a.actor) for a in rows(db_file, AuditEntry)]
    assert trail == [("key.created", kid, "local"), ("key.revoked", kid, "local")]

    async def call_api() -> httpx.Response:
        from api.app import create_app
        from dispatch.services import Services

        svc = await Services.create(make_settings(db_file))
        try:
            transport = httpx.ASGITransport(app=create_app(services=svc))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.get("/v1/fleet", headers={"Authorization": f"Bearer {key}"})
        finally:
            await svc.close()

    r = asyncio.run(call_api())
    assert r.status_code == 401 and f"API key {kid} was revoked at" in r.json()["detail"]


def test_audit_command_lists_who_did_what(tmp_path: Path) -> None:
    from tests.cli.test_client_cli import LiveServer

    live = LiveServer(make_settings(f"sqlite+aiosqlite:///{tmp_path}/live.db")).start()
    try:
        admin = live.key("root", "admin")
        op = live.key("grid", "operator")
        env = {"VPP_API_KEY": "", "COLUMNS": "200"}
        now = get_clock().now_ms()
        from vpp.timefmt import to_rfc3339

        body = {
            "region": "ERCOT-NORTH",
            "mw": 2,
            "start": to_rfc3339(now + 3_600_000),
            "end": to_rfc3339(now + 7_200_000),
        }
        with httpx.Client(base_url=live.url) as http:
            r = http.post("/v1/grid-events", json=body, headers={"Authorization": f"Bearer {op}"})
            assert r.status_code == 201, r.text
            event_id = r.json()["id"]
        args = ["audit", "--since", "1h", "--url", live.url, "--key", admin]
        r = runner.invoke(app, [*args, "--json"], env=env)
        assert r.exit_code == 0, r.output
        rows = json.loads(r.stdout)
        newest = rows[0]
        assert (newest["action"], newest["target_id"]) == ("grid_event.created", event_id)
        r = runner.invoke(app, [*args, "--action", "grid_event.created"], env=env)
        assert r.exit_code == 0 and event_id in r.output and key_id_of(op) in r.output, r.output
        r = runner.invoke(app, ["audit", "--url", live.url, "--key", op], env=env)
        assert r.exit_code == 1 and "403" in r.output
    finally:
        live.stop()
