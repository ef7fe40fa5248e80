"""ForecastService against a real (SQLite) database: validation, calibration, staying current."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from sqlalchemy import insert

from dispatch.forecast_service import ForecastInputError, ForecastService
from sim.synthetic import make_fleet
from store.database import Database
from store.models import (
    Base,
    CapacityRequest,
    Device,
    LedgerEntry,
    TelemetryInterval,
    Tenant,
)
from tests.helpers.fleets import FixedFleet
from vpp.clock import ManualClock
from vpp.fleet.snapshot import FleetSnapshot
from vpp.regions import RegionBook
from vpp.settings import Settings

NOW = 1_783_000_800_000
H = 3_600_000
REGIONS = ["ERCOT-NORTH", "PJM-DOM", "CAISO-SP15"]


async def make_services(tmp_path: Path, snap: FleetSnapshot) -> Any:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'forecast.db'}")
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    settings = Settings(regions=REGIONS, database_url=db.url)
    return SimpleNamespace(
        settings=settings,
        clock=ManualClock(NOW),
        db=db,
        state=None,
        fleet=FixedFleet(snap),
        regions=RegionBook(sold=settings.regions),
    )


@pytest.fixture
async def setup(tmp_path: Path) -> Any:
    fleet = make_fleet(4000, ["ERCOT-NORTH", "PJM-DOM"], now_ms=NOW, seed=5)
    services = await make_services(tmp_path, fleet.snap)
    yield services, ForecastService(services, n_scenarios=400), fleet
    await services.db.dispose()


@pytest.mark.parametrize(
    ("region", "start", "end", "step", "field"),
    [
        ("NOWHERE", NOW, NOW + H, 900, "region"),
        ("ERCOT-NORTH", NOW - 3 * H, NOW - H, 900, "start"),
        ("ERCOT-NORTH", NOW + 2 * H, NOW + H, 900, "end"),
        ("ERCOT-NORTH", NOW, NOW + 49 * H, 900, "end"),
        ("ERCOT-NORTH", NOW + 40 * H, NOW + 50 * H, 900, "end"),
        ("ERCOT-NORTH", NOW, NOW + H, 7 * 60, "step"),
        ("ERCOT-NORTH", NOW, NOW + H, 0, "step"),
    ],
)
async def test_bad_input_names_the_field(
    setup: Any, region: str, start: int, end: int, step: int, field: str
) -> None:
    _, svc, _ = setup
    with pytest.raises(ForecastInputError) as err:
        await svc.forecast(region, start, end, step)
    assert err.value.field == field


async def test_forecast_48h_without_history_uses_defaults(setup: Any) -> None:
    _, svc, _ = setup
    res = await svc.forecast("ERCOT-NORTH", NOW, NOW + 48 * H)
    assert res.starts_ms.size == 192
    assert res.calibrated is False
    assert res.n_devices == 2000
    assert (res.p90_mw <= res.p50_mw).all() and (res.p90_mw >= 0).all()
    assert res.p50_mw.max() > 0.5  # 2 000 devices held flat for 5 h: MW, not kW
    firm = await svc.forecast("ERCOT-NORTH", NOW, NOW + 2 * H, 900, firmness=0.97)
    assert (firm.firm_mw <= firm.p90_mw + 1e-9).all()


async def test_region_without_devices_answers_zeros(setup: Any) -> None:
    _, svc, _ = setup
    res = await svc.forecast("CAISO-SP15", NOW, NOW + 4 * H, 3600)
    assert res.starts_ms.size == 4
    assert (res.p50_mw == 0).all() and (res.p90_mw == 0).all()
    assert res.n_devices == 0 and res.calibrated is False


async def test_a_fifth_of_batteries_offline_moves_next_hour_p90(setup: Any) -> None:
    services, svc, fleet = setup
    snap: FleetSnapshot = fleet.snap
    before = await svc.forecast("ERCOT-NORTH", NOW, NOW + H)
    again = await svc.forecast("ERCOT-NORTH", NOW, NOW + H)
    np.testing.assert_array_equal(before.p90_mw, again.p90_mw)  # stable for one snapshot
    region = snap.region_codes == snap.region_code("ERCOT-NORTH")
    batteries = np.flatnonzero(region & (snap.kind_codes == 0))
    online = snap.online.copy()
    online[batteries[: batteries.size // 5]] = False
    services.fleet.snap = replace(snap, online=online)  # the fleet cache's next snapshot
    after = await svc.forecast("ERCOT-NORTH", NOW, NOW + H)
    assert after.p90_mw.mean() < before.p90_mw.mean() * 0.95


async def _add_history(services: Any, snap: FleetSnapshot, share_online: float) -> None:
    """Three days of 5-minute telemetry rows for the ERCOT devices, present ``share_online`` of
    the time, written in bulk; the PJM devices joined as long ago and never reported."""
    async with services.db.session() as session:
        session.add(Tenant(id="t-1", name="t", created_ms=0))
        await session.flush()
        start = NOW - 3 * 24 * H
        for i, d in enumerate(snap.device_ids):
            session.add(
                Device(
                    id=d,
                    tenant_id="t-1",
                    kind="battery",
                    site_id=f"s{i}",
                    region=snap.regions[snap.region_codes[i]],
                    created_ms=start,
                    updated_ms=start,
                )
            )
        await session.flush()
        n_int = 3 * 288
        rows = []
        keep_every = round(1 / share_online)
        for d in snap.device_ids[snap.region_codes == 0]:
            for k in range(0, n_int, keep_every):
                rows.append(
                    {"device_id": d, "interval_start_ms": start + k * 300_000, "samples": 1}
                )
        await session.execute(insert(TelemetryInterval), rows)
        await session.commit()


async def test_history_calibrates_and_lowers_a_flaky_fleet(tmp_path: Path) -> None:
    snap = make_fleet(400, ["ERCOT-NORTH", "PJM-DOM"], now_ms=NOW, seed=6).snap
    services = await make_services(tmp_path, snap)
    svc = ForecastService(services, n_scenarios=400)
    # The far window: present status forgotten, the long-run online rate decides.
    start, end = NOW + 30 * H, NOW + 33 * H
    default = await svc.forecast("ERCOT-NORTH", start, end)
    assert default.calibrated is False
    await _add_history(services, snap, share_online=0.5)
    svc.invalidate()
    learnt = await svc.forecast("ERCOT-NORTH", start, end)
    assert learnt.calibrated is True
    # Devices reported half the time: about half the MW of the 95 % default.
    ratio = learnt.p50_mw.mean() / default.p50_mw.mean()
    assert 0.4 < ratio < 0.65
    # PJM devices never reported in three days: calibrated, and the forecast knows they are gone.
    pjm = await svc.forecast("PJM-DOM", start, end)
    assert pjm.calibrated is True and pjm.p50_mw.max() < 0.01
    await services.db.dispose()


async def test_committed_mw_sums_ledger_per_interval(setup: Any) -> None:
    services, svc, _ = setup
    async with services.db.session() as session:
        session.add(Tenant(id="t-2", name="t", created_ms=0))
        await session.flush()
        for rid, mw in (("r1", 1.5), ("r2", 0.25)):
            session.add(
                CapacityRequest(
                    id=rid,
                    tenant_id="t-2",
                    region="ERCOT-NORTH",
                    mw=mw,
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
                        request_id=rid,
                        interval_start_ms=NOW + H + k * 900_000,
                        region="ERCOT-NORTH",
                        mw=mw,
                    )
                )
        await session.commit()
    starts = NOW + np.arange(12) * 900_000
    got = await svc.committed_mw("ERCOT-NORTH", starts, 900)
    np.testing.assert_allclose(got, [0, 0, 0, 0, 1.75, 1.75, 1.75, 1.75, 0, 0, 0, 0])
    hourly = await svc.committed_mw("ERCOT-NORTH", NOW + np.arange(3) * H, 3600)
    np.testing.assert_allclose(hourly, [0, 1.75, 0])
    assert (await svc.committed_mw("PJM-DOM", starts, 900)).sum() == 0
