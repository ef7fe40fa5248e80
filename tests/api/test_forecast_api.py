"""GET /v1/forecast over HTTP: the contract's shape, defaults, and 422s that name the field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from api import errors
from api.deps import get_services
from api.routers.forecast import parse_duration_s, router
from dispatch.forecast_service import ForecastService
from sim.synthetic import make_fleet
from store.database import Database
from store.keys import create_api_key
from store.models import Base, CapacityRequest, LedgerEntry
from store.state.memory import MemoryStateStore
from tests.helpers.fleets import FixedFleet
from vpp.clock import ManualClock
from vpp.regions import RegionBook
from vpp.settings import Settings
from vpp.timefmt import to_rfc3339

NOW = 1_783_000_800_000  # on the 15-minute grid
H = 3_600_000


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'api.db'}")
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    snap = make_fleet(2000, ["ERCOT-NORTH"], now_ms=NOW, seed=9).snap
    services = SimpleNamespace(
        settings=Settings(regions=["ERCOT-NORTH", "PJM-DOM"], database_url=db.url),
        clock=ManualClock(NOW),
        db=db,
        state=MemoryStateStore(),
        fleet=FixedFleet(snap),
        regions=RegionBook(sold=["ERCOT-NORTH", "PJM-DOM"]),
    )
    services.forecast = ForecastService(services)  # type: ignore[arg-type]
    key = await create_api_key(db, "t-1", "hyperscaler", NOW)
    app = FastAPI()
    errors.install(app)  # domain errors answer as in the service's app
    app.include_router(router)
    app.dependency_overrides[get_services] = lambda: services
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers={"Authorization": f"Bearer {key}"}
    ) as c:
        yield c, services
    await db.dispose()


async def test_default_window_is_the_48h_horizon(client: Any) -> None:
    c, _ = client
    r = await c.get("/v1/forecast", params={"region": "ERCOT-NORTH"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["region"] == "ERCOT-NORTH" and body["step"] == "PT15M"
    assert body["calibrated"] is False  # no history yet: the brief's defaults
    assert body["event"] == "PT5H"  # a 48 h window is served as consecutive 5 h events
    rows = body["intervals"]
    assert len(rows) == 192
    assert rows[0]["start"] == "2026-07-02T14:00:00.000Z"  # NOW, three ms digits
    assert rows[1]["start"] == to_rfc3339(NOW + 900_000)
    for row in rows:
        assert set(row) == {"start", "p50_mw", "p90_mw", "committed_mw"}
        assert 0 <= row["p90_mw"] <= row["p50_mw"]
        assert row["committed_mw"] == 0


async def test_window_step_firmness_and_committed(client: Any) -> None:
    c, services = client
    async with services.db.session() as session:
        session.add(
            CapacityRequest(
                id="r1",
                tenant_id="t-1",
                region="ERCOT-NORTH",
                mw=0.4,
                start_ms=NOW + H,
                end_ms=NOW + 2 * H,
                status="committed",
                created_ms=NOW,
                updated_ms=NOW,
            )
        )
        await session.flush()
        for k in range(4):
            session.add(
                LedgerEntry(
                    request_id="r1",
                    interval_start_ms=NOW + H + k * 900_000,
                    region="ERCOT-NORTH",
                    mw=0.4,
                )
            )
        await session.commit()
    r = await c.get(
        "/v1/forecast",
        params={
            "region": "ERCOT-NORTH",
            "start": to_rfc3339(NOW),
            "end": to_rfc3339(NOW + 3 * H),
            "step": "PT1H",
            "firmness": 0.95,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["step"] == "PT1H"
    rows = body["intervals"]
    assert [row["start"] for row in rows] == [
        to_rfc3339(NOW),
        to_rfc3339(NOW + H),
        to_rfc3339(NOW + 2 * H),
    ]
    assert [row["committed_mw"] for row in rows] == [0, 0.4, 0]
    assert all(row["firm_mw"] <= row["p90_mw"] for row in rows)


async def test_shorter_events_shed_more_per_interval(client: Any) -> None:
    c, _ = client
    params = {
        "region": "ERCOT-NORTH",
        "start": to_rfc3339(NOW + 2 * H),
        "end": to_rfc3339(NOW + 6 * H),
    }
    long_ = (await c.get("/v1/forecast", params=params)).json()
    short = (await c.get("/v1/forecast", params={**params, "event": "PT1H"})).json()
    assert long_["event"] == "PT4H" and short["event"] == "PT1H"
    assert sum(r["p50_mw"] for r in short["intervals"]) > sum(
        r["p50_mw"] for r in long_["intervals"]
    )


async def test_region_without_devices_answers_zeros(client: Any) -> None:
    c, _ = client
    r = await c.get("/v1/forecast", params={"region": "PJM-DOM", "end": to_rfc3339(NOW + 2 * H)})
    assert r.status_code == 200, r.text
    rows = r.json()["intervals"]
    assert len(rows) == 8 and all(row["p90_mw"] == 0 and row["p50_mw"] == 0 for row in rows)


async def test_start_and_end_take_offsets_and_naive_utc(client: Any) -> None:
    """start/end go through vpp.timefmt.parse_rfc3339: a numeric offset is honoured, and a
    time without one is read as UTC (as this query always allowed)."""
    c, _ = client
    # NOW is 2026-07-02T14:00:00Z; the end is 15:00Z.
    for start in ("2026-07-02T16:00:00+02:00", "2026-07-02t14:00:00.000z", "2026-07-02T14:00:00"):
        params = {"region": "ERCOT-NORTH", "start": start, "end": "2026-07-02T10:00:00-05:00"}
        r = await c.get("/v1/forecast", params=params)
        assert r.status_code == 200, (start, r.text)
        starts = [row["start"] for row in r.json()["intervals"]]
        assert starts == [f"2026-07-02T14:{m:02d}:00.000Z" for m in (0, 15, 30, 45)]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"region": "MARS-1"}, "region"),
        (
            {
                "region": "ERCOT-NORTH",
                "start": to_rfc3339(NOW - 5 * H),
                "end": to_rfc3339(NOW - 4 * H),
            },
            "start",
        ),
        (
            {"region": "ERCOT-NORTH", "start": to_rfc3339(NOW + 2 * H), "end": to_rfc3339(NOW + H)},
            "end",
        ),
        ({"region": "ERCOT-NORTH", "end": to_rfc3339(NOW + 60 * H)}, "end"),
        ({"region": "ERCOT-NORTH", "end": to_rfc3339(NOW + H), "step": "PT7M"}, "step"),
        ({"region": "ERCOT-NORTH", "step": "fifteen minutes"}, "step"),
        ({"region": "ERCOT-NORTH", "start": "yesterday"}, "start"),
        ({"region": "ERCOT-NORTH", "end": "2026-13-45T00:00:00Z"}, "end"),
        ({"region": "ERCOT-NORTH", "firmness": 0.999}, "firmness"),
        ({"region": "ERCOT-NORTH", "event": "PT9H"}, "event"),
        ({"region": "ERCOT-NORTH", "event": "soon"}, "event"),
    ],
)
async def test_bad_input_is_422_naming_the_field(
    client: Any, params: dict[str, Any], field: str
) -> None:
    c, _ = client
    r = await c.get("/v1/forecast", params=params)
    assert r.status_code == 422, r.text
    assert field in str(r.json()["detail"])


async def test_needs_an_api_key(client: Any) -> None:
    c, _ = client
    r = await c.get("/v1/forecast", params={"region": "ERCOT-NORTH"}, headers={"Authorization": ""})
    assert r.status_code == 401


def test_parse_duration() -> None:
    assert parse_duration_s("PT15M") == 900
    assert parse_duration_s("PT1H") == 3600
    assert parse_duration_s("P1D") == 86_400
    assert parse_duration_s("PT1H30M") == 5400
    for bad in ("", "P", "PT", "15M", "PT1.5S"):
        with pytest.raises(ValueError):
            parse_duration_s(bad)
    assert np.int64(parse_duration_s("PT900S")) == 900
