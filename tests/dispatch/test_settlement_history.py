"""The settlement's history reads, on SQLite and PostgreSQL: the event window's matrix and the
10-in-10 look-back pick the right rows of the right devices (the reads are columnar and keyed by
position, so a wrong join would put one home's load under another's name)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from sqlalchemy import insert

from dispatch.settlement import SettlementGrid
from dispatch.settlement_service import (
    ADJUST_FROM_H,
    DAY_MS,
    _history,
    _matrix,
    _ten_in_ten,
)
from store.database import Database
from store.migrate import upgrade
from store.models import Command, TelemetryInterval

START = 1_784_048_400_000  # 2026-07-14 17:00 UTC, on the 5-minute grid
SLOT = 300_000


@pytest.fixture()
async def db(db_url: str) -> Any:
    await asyncio.to_thread(upgrade, db_url)
    database = Database(db_url)
    yield database
    await database.dispose()


def hvac_of(device: int, back: int) -> float:
    """A value that says whose and which day's it is."""
    return 1000.0 + 10.0 * back + device


async def put_rows(db: Database, rows: list[dict[str, Any]]) -> None:
    async with db.session() as s, s.begin():
        for k in range(0, len(rows), 2000):
            await s.execute(insert(TelemetryInterval), rows[k : k + 2000])


async def test_event_window_matrix_puts_each_row_under_its_device(db: Database) -> None:
    ids = ["th-0", "th-1", "th-2"]
    rows = [
        {"device_id": d, "interval_start_ms": START + k * SLOT, "samples": 1,
         "power_w": None if d == "th-1" else 100.0 * i + k, "hvac_w": 2000.0 + i}
        for i, d in enumerate(ids)
        for k in range(6)
        if not (d == "th-2" and k == 3)  # a gap
    ]  # fmt: skip
    await put_rows(db, rows)
    services: Any = SimpleNamespace(db=db)
    hist = await _history(services, [*ids, "th-0", "nobody"], START, START + 6 * SLOT)
    power, starts = _matrix(hist, ["th-2", "th-0"], 0, SLOT, START, START + 6 * SLOT)
    assert starts.tolist() == [START + k * SLOT for k in range(6)]
    assert power[1].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert np.isnan(power[0, 3]) and power[0, 4] == 204.0
    hvac, _ = _matrix(hist, ["th-1", "nobody"], 1, SLOT, START, START + 6 * SLOT)
    assert np.all(hvac[0] == 2001.0) and np.all(np.isnan(hvac[1]))


async def test_ten_in_ten_takes_the_ten_latest_days_without_an_event(db: Database) -> None:
    ids = ["th-0", "th-1", "th-2"]
    grid = SettlementGrid(START, START + 3_600_000, 900)
    adj_lo = int(ADJUST_FROM_H * 3_600_000)
    rows = []
    for i, d in enumerate(ids):
        for back in range(0, 21):
            if d == "th-1" and back == 5:
                continue  # no history that day
            day_start = START - back * DAY_MS
            # From the adjustment window's start through the event's hour, and noise outside it
            # (which the look-back must not read).
            for k in range(-adj_lo // SLOT - 6, 12 + 6):
                t = day_start + k * SLOT
                inside = -adj_lo <= k * SLOT < 3_600_000
                value = hvac_of(i, back) if inside else 9e9
                rows.append({"device_id": d, "interval_start_ms": t, "samples": 1, "hvac_w": value})
    await put_rows(db, rows)
    async with db.session() as s, s.begin():
        await s.execute(
            insert(Command),
            [
                {"id": "c-ev", "event_id": "ev-old", "device_id": "th-0",
                 "type": "thermostat_offset", "valid_from_ms": START - 2 * DAY_MS,
                 "valid_until_ms": START - 2 * DAY_MS + 3_600_000, "status": "acked",
                 "created_ms": START - 2 * DAY_MS},
            ],
        )  # fmt: skip
    services: Any = SimpleNamespace(db=db)
    tt = await _ten_in_ten(services, ids, grid, SLOT)
    assert tt is not None
    expected_backs = {
        0: [1, 3, 4, 5, 6, 7, 8, 9, 10, 11],  # day 2 had an event
        1: [1, 2, 3, 4, 6, 7, 8, 9, 10, 11],  # day 5 has no history
        2: list(range(1, 11)),
    }
    for i, backs in expected_backs.items():
        got = tt.days_w[i, :10, :]
        want = np.array([[hvac_of(i, b)] * grid.n for b in backs])
        np.testing.assert_allclose(got, want)
        assert np.all(np.isnan(tt.days_w[i, 10:]))
        np.testing.assert_allclose(tt.adjust_days_w[i, :10], [hvac_of(i, b) for b in backs])
        assert tt.adjust_today_w[i] == hvac_of(i, 0)
