"""Bulk onboarding speed: POST /v1/devices/bulk with N devices on SQLite and PostgreSQL.

    .venv/bin/python bench/bulk_import.py            # 100 000 devices
    .venv/bin/python bench/bulk_import.py --small    # 5 000 devices

Prints, per database, the time of the whole HTTP call (JSON and CSV) and of its parts.
Needs PostgreSQL on 127.0.0.1:5432 (trust auth) for the PostgreSQL figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import orjson
import psycopg

# Run as a script, bench/ comes first on sys.path and its dispatch.py would shadow the package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

PG_ADMIN = os.environ.get("VPP_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def rows(n: int, prefix: str) -> list[dict[str, object]]:
    regions = ["ERCOT-NORTH", "ERCOT-HOUSTON", "CAISO-SP15", "PJM-DOM"]
    out: list[dict[str, object]] = []
    for i in range(n):
        base: dict[str, object] = {
            "id": f"{prefix}-{i:06d}",
            "site_id": f"s-{i}",
            "region": regions[i % 4],
        }
        if i % 3 == 0:
            base |= {
                "kind": "battery",
                "capacity_wh": 13500,
                "max_discharge_w": 5000,
                "max_charge_w": 5000,
            }
        elif i % 3 == 1:
            base |= {
                "kind": "thermostat",
                "hvac_rated_w": 5600,
                "comfort_max_c": 26,
                "comfort_min_c": 19,
            }
        else:
            base |= {"kind": "solar", "rated_w": 7600}
        out.append(base)
    return out


def to_csv(data: list[dict[str, object]]) -> bytes:
    fields = [
        "id",
        "kind",
        "site_id",
        "region",
        "capacity_wh",
        "max_discharge_w",
        "max_charge_w",
        "hvac_rated_w",
        "comfort_max_c",
        "comfort_min_c",
        "rated_w",
    ]
    lines = [",".join(fields)]
    lines += [",".join(str(r.get(f, "")) for f in fields) for r in data]
    return ("\n".join(lines) + "\n").encode()


async def run(db_url: str, n: int, label: str) -> None:
    from api.app import create_app
    from devices import onboarding
    from dispatch.services import Services
    from store.keys import create_api_key
    from store.migrate import upgrade
    from vpp.regions import RegionBook
    from vpp.settings import Settings

    await asyncio.to_thread(upgrade, db_url)
    settings = Settings(
        database_url=db_url, mqtt_url="memory://", redis_url="memory://", broker_credentials="none"
    )
    svc = await Services.create(settings)
    app = create_app(services=svc)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://b", timeout=600
    )
    key = await create_api_key(svc.db, "bench", "fleet", svc.clock.now_ms())
    h = {"Authorization": f"Bearer {key}"}

    data = rows(n, "j")
    t0 = time.perf_counter()
    specs = onboarding.validate_rows(data, RegionBook(sold=settings.regions))
    t_validate = time.perf_counter() - t0
    del specs

    body = orjson.dumps(data)
    t0 = time.perf_counter()
    r = await client.post(
        "/v1/devices/bulk", content=body, headers={**h, "content-type": "application/json"}
    )
    t_json = time.perf_counter() - t0
    assert r.status_code == 201, r.text[:500]
    assert r.json()["count"] == n

    csv_body = to_csv(rows(n, "c"))
    t0 = time.perf_counter()
    r = await client.post(
        "/v1/devices/bulk", content=csv_body, headers={**h, "content-type": "text/csv"}
    )
    t_csv = time.perf_counter() - t0
    assert r.status_code == 201, r.text[:500]

    bad = rows(n, "x")
    bad[n // 2]["capacity_wh"] = -1
    t0 = time.perf_counter()
    r = await client.post(
        "/v1/devices/bulk",
        content=orjson.dumps(bad),
        headers={**h, "content-type": "application/json"},
    )
    t_bad = time.perf_counter() - t0
    assert r.status_code == 422

    t0 = time.perf_counter()
    r = await client.get("/v1/fleet", headers=h)
    t_fleet_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = await client.get("/v1/fleet", headers=h)
    t_fleet_warm = time.perf_counter() - t0
    assert r.json()["totals"]["registered"] == 2 * n

    print(
        f"{label:10s} n={n:>7d}  validate {t_validate:6.2f} s | bulk JSON {t_json:6.2f} s "
        f"({n / t_json:8.0f}/s) | bulk CSV {t_csv:6.2f} s | one bad row -> 422 in "
        f"{t_bad:5.2f} s | /v1/fleet cold {t_fleet_cold * 1000:6.0f} ms, "
        f"warm {t_fleet_warm * 1000:5.1f} ms"
    )
    await client.aclose()
    await svc.close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="5 000 devices")
    p.add_argument("-n", type=int, default=None)
    p.add_argument("--sqlite-only", action="store_true")
    a = p.parse_args()
    n = a.n or (5_000 if a.small else 100_000)
    with tempfile.TemporaryDirectory() as tmp:
        await run(f"sqlite+aiosqlite:///{tmp}/bench.db", n, "sqlite")
    if a.sqlite_only:
        return
    name = f"vpp_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        await run(f"{base}/{name}", n, "postgresql")
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main())
