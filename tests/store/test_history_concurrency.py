"""Two writers of the interval history at once (two ingest replicas writing through the same
devices' rows), on PostgreSQL: no deadlock, no lost sample, whatever order each one holds."""

from __future__ import annotations

import asyncio

import numpy as np
from prometheus_client import REGISTRY
from sqlalchemy import select

from store.database import Database
from store.history import FIELDS, Partials, write_partials
from store.models import TelemetryInterval

INTERVAL_MS = 300_000
ROUNDS = 30


def partials(keys: list[tuple[str, int]], power_w: float) -> Partials:
    """One reading of ``power_w`` per row (only power_w present)."""
    n = len(keys)
    sums = np.zeros((n, len(FIELDS)))
    counts = np.zeros((n, len(FIELDS)), dtype=np.int64)
    sums[:, 0] = power_w
    counts[:, 0] = 1
    return Partials(keys=keys, sums=sums, counts=counts, samples=np.ones(n, dtype=np.int64))


def conflicts() -> float:
    return REGISTRY.get_sample_value("vpp_ingest_history_write_conflicts_total") or 0.0


async def test_two_writers_in_opposite_orders_neither_deadlock_nor_lose_samples(
    fresh_pg_url: str,
) -> None:
    # Overlapping row sets: 0..399 and 200..599, one writer ascending, the other descending.
    keys = [(f"dl-{i:04d}", 1_784_061_000_000 + (i % 2) * INTERVAL_MS) for i in range(600)]
    mine, theirs = keys[:400], keys[200:][::-1]
    before = conflicts()
    one, other = Database(fresh_pg_url), Database(fresh_pg_url)
    try:

        async def writer(db: Database, rows: list[tuple[str, int]], power_w: float) -> None:
            for _ in range(ROUNDS):
                await write_partials(db, partials(rows, power_w))

        await asyncio.gather(writer(one, mine, 1000.0), writer(other, theirs, 3000.0))
        async with one.session() as s:
            got = {
                (r.device_id, r.interval_start_ms): (r.samples, r.power_w)
                for r in (await s.execute(select(TelemetryInterval))).scalars()
            }
    finally:
        await one.dispose()
        await other.dispose()
    assert set(got) == set(keys)
    for i, key in enumerate(keys):
        samples, power = got[key]
        if 200 <= i < 400:  # both wrote it
            assert samples == 2 * ROUNDS and abs(power - 2000.0) < 1e-6, key
        else:
            assert samples == ROUNDS and abs(power - (1000.0 if i < 200 else 3000.0)) < 1e-6
    # One canonical lock order: the writers waited for each other, never deadlocked.
    assert conflicts() == before
