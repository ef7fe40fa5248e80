"""Two buyers commit at once for the last megawatts: exactly one wins, the ledger never holds more
than P90 − margin. Real HTTP against a uvicorn server on PostgreSQL (and, serialised by its write
lock, on SQLite)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from api.app import create_app
from store.keys import create_api_key
from store.models import LedgerEntry
from tests.helpers.market import install_stub
from tests.helpers.settings import make_settings
from vpp.clock import Clock
from vpp.timefmt import to_rfc3339

H = 3_600_000
REGION = "PJM-DOM"
ROUNDS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_only_one_of_two_racing_commits_wins(
    backend: str, request: Any, services_factory: Any
) -> None:
    url = (
        request.getfixturevalue("fresh_pg_url")
        if backend == "postgres"
        else request.getfixturevalue("sqlite_url")
    )
    services = await services_factory(make_settings(url), Clock())
    # A small delay in the forecast lines both commits up at the region lock.
    install_stub(services, p90_mw=10.0, delay_s=0.02)
    app = create_app(services=services)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        now = services.clock.now_ms()
        keys = [
            {"Authorization": f"Bearer {await create_api_key(services.db, t, 'hyperscaler', now)}"}
            for t in ("alpha", "beta")
        ]
        base = f"http://127.0.0.1:{port}"
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as one,
            httpx.AsyncClient(base_url=base, timeout=30) as two,
        ):
            clients = [one, two]
            for k in range(ROUNDS):
                start = (now // 900_000 + 8 + 8 * k) * 900_000  # 2 h on, a fresh window each
                body = {
                    "region": REGION,
                    "mw": 6.0,
                    "start": to_rfc3339(start),
                    "end": to_rfc3339(start + H),
                }
                quotes = [
                    (await c.post("/v1/capacity-requests", json=body, headers=h)).json()
                    for c, h in zip(clients, keys, strict=True)
                ]
                # Each quote alone fits (9.5 MW sellable); together they do not.
                assert [q["quoted_mw"] for q in quotes] == [6.0, 6.0]
                results = await asyncio.gather(
                    *(
                        c.post(f"/v1/capacity-requests/{q['id']}/commit", headers=h)
                        for c, q, h in zip(clients, quotes, keys, strict=True)
                    )
                )
                codes = sorted(r.status_code for r in results)
                assert codes == [200, 409], [r.text for r in results]
                loser = next(r for r in results if r.status_code == 409)
                assert "capacity no longer available: 3.5 MW free" in loser.json()["detail"]
                async with services.db.session() as s:
                    per_slot = (
                        await s.execute(
                            select(LedgerEntry.interval_start_ms, func.sum(LedgerEntry.mw))
                            .where(LedgerEntry.region == REGION)
                            .group_by(LedgerEntry.interval_start_ms)
                        )
                    ).all()
                assert max(float(v) for _, v in per_slot) <= 9.5
                assert len(per_slot) == 4 * (k + 1)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
