"""The history's COPY write path on PostgreSQL: rows not stored yet go straight in by COPY, a
batch that meets a stored row still merges every reading (nothing doubled, nothing lost), and
after such a batch the writer goes to the merge first for a while, then tries COPY again."""

from __future__ import annotations

import numpy as np
from sqlalchemy import func, select

from store.database import Database
from store.history import FIELDS, Partials, _CopyFirst, write_intervals, write_partials
from store.models import TelemetryInterval

NOW = 1_784_061_000_000
INTERVAL_MS = 300_000


def readings(keys: list[tuple[str, int]], power_w: float) -> Partials:
    n = len(keys)
    sums = np.zeros((n, len(FIELDS)))
    counts = np.zeros((n, len(FIELDS)), dtype=np.int64)
    sums[:, 0], counts[:, 0] = power_w, 1
    sums[:, 1], counts[:, 1] = 50.0, 1
    return Partials(keys=keys, sums=sums, counts=counts, samples=np.ones(n, dtype=np.int64))


async def rows(db: Database) -> dict[tuple[str, int], tuple[int, float | None, float | None]]:
    async with db.session() as s:
        got = (await s.execute(select(TelemetryInterval))).scalars().all()
        n = (await s.execute(select(func.count()).select_from(TelemetryInterval))).scalar_one()
    assert n == len(got)
    return {(r.device_id, r.interval_start_ms): (r.samples, r.power_w, r.soc_pct) for r in got}


async def test_a_batch_meeting_stored_rows_merges_every_reading(fresh_pg_url: str) -> None:
    db = Database(fresh_pg_url)
    try:
        first = [(f"d-{i:03d}", NOW) for i in range(100)]
        assert await write_partials(db, readings(first[::-1], 1000.0)) == 100  # all new
        # Half stored, half new, in no particular order: one unique violation, then the merge.
        mixed = [(f"d-{i:03d}", NOW) for i in range(50, 150)]
        assert await write_partials(db, readings(mixed[::-1], 3000.0)) == 100
        got = await rows(db)
        assert len(got) == 150
        for i in range(150):
            samples, power, soc = got[(f"d-{i:03d}", NOW)]
            want = (1, 1000.0) if i < 50 else (2, 2000.0) if i < 100 else (1, 3000.0)
            assert (samples, power, soc) == (*want, 50.0), i
        # Closed-interval rows (write_intervals) take the same path.
        later = [
            {"device_id": f"d-{i:03d}", "interval_start_ms": NOW + INTERVAL_MS, "samples": 2}
            | {f: None for f in FIELDS}
            | {"power_w": 10.0}
            for i in range(3)
        ]
        assert await write_intervals(db, later) == 3
        assert await write_intervals(db, later) == 3
        got = await rows(db)
        assert got[("d-000", NOW + INTERVAL_MS)] == (4, 10.0, None)
    finally:
        await db.dispose()


def test_after_meeting_a_stored_row_the_writer_merges_first_for_longer_each_time() -> None:
    policy = _CopyFirst()
    assert policy.should_try()
    skipped: list[int] = []
    for _ in range(8):
        policy.met_stored_row()
        n = 0
        while not policy.should_try():
            n += 1
        skipped.append(n)
    assert skipped == [1, 2, 4, 8, 16, 32, 64, 64]
    policy.all_new()  # a COPY went through: back to trying every time after the next miss
    policy.met_stored_row()
    assert not policy.should_try() and policy.should_try()
