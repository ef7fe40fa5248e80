"""The interval history's partitions on PostgreSQL (and retention on SQLite): the migration
converts a table that has rows, a day nobody made a partition for still takes every reading,
maintenance moves it into its day and drops whole days past retention, the retention setting
refuses what the settlement still needs, and the baseline query reads only its days' partitions."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import psycopg
import pytest
from alembic import command
from pydantic import ValidationError
from sqlalchemy import func, select, text

from dispatch.housekeeping import HistoryHousekeeper
from dispatch.settlement_service import TEN_IN_TEN_LOOKBACK_DAYS
from store.database import Database
from store.history import FIELDS, HISTORY_SQL, Partials, read_history, write_partials
from store.history_partitions import (
    DAY_MS,
    DEFAULT_PARTITION,
    day_of,
    maintain,
    partition_days,
    partition_name,
)
from store.migrate import alembic_config, upgrade
from store.models import TelemetryInterval
from tests.helpers.settings import make_settings
from vpp.settings import HISTORY_MIN_RETENTION_DAYS, Settings

NOW = 1_784_061_000_000  # 2026-07-14 20:30 UTC: far from the wall clock's days, none made yet
TODAY = day_of(NOW)
INTERVAL_MS = 300_000


def one_reading(keys: list[tuple[str, int]], power_w: float = 1000.0) -> Partials:
    n = len(keys)
    sums = np.zeros((n, len(FIELDS)))
    counts = np.zeros((n, len(FIELDS)), dtype=np.int64)
    sums[:, 0], counts[:, 0] = power_w, 1
    return Partials(keys=keys, sums=sums, counts=counts, samples=np.ones(n, dtype=np.int64))


async def stored(db: Database) -> dict[tuple[str, int], tuple[int, float | None]]:
    async with db.session() as s:
        rows = (await s.execute(select(TelemetryInterval))).scalars().all()
    return {(r.device_id, r.interval_start_ms): (r.samples, r.power_w) for r in rows}


async def in_default(db: Database) -> int:
    async with db.session() as s:
        return int(
            (await s.execute(text(f"SELECT count(*) FROM {DEFAULT_PARTITION}"))).scalar_one()
        )


async def days(db: Database) -> set[int]:
    async with db.engine.connect() as conn:
        return set(await partition_days(conn))


@pytest.fixture()
async def pg(fresh_pg_url: str) -> Any:
    db = Database(fresh_pg_url)
    yield db
    await db.dispose()


def test_migration_converts_a_table_with_rows_into_day_partitions(fresh_pg_url: str) -> None:
    cfg = alembic_config(fresh_pg_url)
    command.downgrade(cfg, "0003_broker_logins")  # the plain table, as a service before 0004 has it
    dsn = fresh_pg_url.replace("postgresql+asyncpg://", "postgresql://")
    rows = [(f"bat-{i}", NOW - k * DAY_MS, 3, 100.0 * i) for i in range(3) for k in range(3)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = "
            "'telemetry_intervals'::regclass"
        ).fetchone() == (0,)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO telemetry_intervals (device_id, interval_start_ms, samples, power_w) "
                "VALUES (%s, %s, %s, %s)",
                rows,
            )
    upgrade(fresh_pg_url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = "
            "'telemetry_intervals'::regclass"
        ).fetchone() == ("r",)
        got = conn.execute(
            "SELECT tableoid::regclass::text, device_id, interval_start_ms, samples, power_w "
            "FROM telemetry_intervals"
        ).fetchall()
        pk = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'telemetry_intervals'::regclass AND contype = 'p'"
        ).fetchone()
    # Every row kept, each in the partition of its own day (none left in DEFAULT).
    assert sorted(r[1:] for r in got) == sorted(rows)
    assert {r[0] for r in got} == {partition_name(TODAY - k) for k in range(3)}
    assert pk == ("PRIMARY KEY (device_id, interval_start_ms)",)
    # And back: the downgrade restores the plain table with the rows.
    command.downgrade(cfg, "0003_broker_logins")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM telemetry_intervals").fetchone() == (len(rows),)
    upgrade(fresh_pg_url)


async def test_a_day_without_partition_loses_nothing_and_maintenance_moves_it(pg: Database) -> None:
    assert TODAY not in await days(pg)
    keys = [(f"bat-{i}", NOW - INTERVAL_MS * (i % 2)) for i in range(50)]
    assert await write_partials(pg, one_reading(keys, 1000.0)) == 50
    assert await write_partials(pg, one_reading(keys, 3000.0)) == 50  # merges in DEFAULT too
    assert await in_default(pg) == 50

    report = await maintain(pg, NOW, retention_days=35)
    assert partition_name(TODAY) in report.created and report.moved_rows == 50
    # Yesterday, today and two days ahead exist now; DEFAULT is empty again.
    assert {TODAY - 1, TODAY, TODAY + 1, TODAY + 2} <= await days(pg)
    assert await in_default(pg) == 0
    got = await stored(pg)
    assert set(got) == set(keys) and all(v == (2, 2000.0) for v in got.values())
    # The next write of those rows goes to today's partition and still merges.
    await write_partials(pg, one_reading(keys, 5000.0))
    got = await stored(pg)
    assert all(s == 3 and abs(p - 3000.0) < 1e-9 for s, p in got.values() if p is not None)
    assert await in_default(pg) == 0
    # Run again: nothing to do.
    again = await maintain(pg, NOW, retention_days=35)
    assert again.created == [] and again.dropped == [] and again.moved_rows == 0


async def test_retention_drops_whole_days_and_keeps_the_rest(pg: Database) -> None:
    ages = [40, 36, 35, 34, 21, 1, 0]  # days before NOW
    keys = [(f"th-{a}", NOW - a * DAY_MS) for a in ages]
    await write_partials(pg, one_reading(keys))
    await maintain(pg, NOW - 50 * DAY_MS, retention_days=35)  # a run long ago made the old days
    await maintain(pg, NOW - 36 * DAY_MS, retention_days=35)
    have = await days(pg)
    assert TODAY - 40 in have and TODAY - 36 in have  # caught by DEFAULT, moved into their days

    report = await maintain(pg, NOW, retention_days=35)
    # Whole days older than 35 days are gone (their partitions dropped, not rows deleted);
    # the day that holds NOW − 35 days is kept whole.
    assert partition_name(TODAY - 40) in report.dropped
    assert partition_name(TODAY - 36) in report.dropped
    left = await days(pg)
    assert min(left) == TODAY - 35
    assert sorted(k[0] for k in await stored(pg)) == sorted(f"th-{a}" for a in ages if a <= 35)
    assert report.deleted_rows == 0 and await in_default(pg) == 0


async def test_retention_on_sqlite_deletes_the_old_rows(sqlite_url: str) -> None:
    await asyncio.to_thread(upgrade, sqlite_url)
    db = Database(sqlite_url)
    try:
        keys = [(f"th-{a}", NOW - a * DAY_MS) for a in (40, 36, 35, 1)]
        await write_partials(db, one_reading(keys))
        report = await maintain(db, NOW, retention_days=35)
        assert report.deleted_rows == 2
        assert sorted(k[0] for k in await stored(db)) == ["th-1", "th-35"]
    finally:
        await db.dispose()


async def test_baseline_query_reads_only_the_partitions_of_its_window(pg: Database) -> None:
    # 25 days of history, each day in its own partition.
    keys = [(f"bat-{i}", NOW - k * DAY_MS) for i in range(20) for k in range(25)]
    await write_partials(pg, one_reading(keys))
    await maintain(pg, NOW, retention_days=35)
    assert set(range(TODAY - 24, TODAY + 3)) <= await days(pg)

    # The settlement's own read of the history for a 10-day baseline window ending at an
    # event (one COPY of the device list joined to the history), EXPLAINed with its parameters.
    start, end = NOW - 3_600_000, NOW
    lo = start - 10 * DAY_MS
    ids = [f"bat-{i}" for i in range(20)]
    hist = await read_history(pg, ids, lo, end)
    assert len(hist) == 20 * 10  # one row a day, 10 days back
    assert sorted(set(hist.row.tolist())) == list(range(20))
    assert np.all(hist.power_w == 1000.0)
    async with pg.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        answer = await driver.fetchval("EXPLAIN (FORMAT JSON) " + HISTORY_SQL, ids, lo, end)
        plan = orjson.loads(answer) if isinstance(answer, str | bytes) else answer

    def relations(node: dict[str, Any]) -> set[str]:
        out = {node["Relation Name"]} if "Relation Name" in node else set()
        for child in node.get("Plans", []):
            out |= relations(child)
        return out

    scanned = relations(plan[0]["Plan"] if isinstance(plan, list) else plan["Plan"])
    assert scanned == {partition_name(d) for d in range(day_of(lo), day_of(end - 1) + 1)}
    assert len(scanned) == 11 and DEFAULT_PARTITION not in scanned


class StillClock:
    """Service time stands at NOW; a sleep lets the loop turn without moving it."""

    def now_ms(self) -> int:
        return NOW

    async def sleep(self, _service_seconds: float) -> None:
        await asyncio.sleep(0.01)


async def test_housekeeper_runs_on_the_leader_only(pg: Database) -> None:
    settings = make_settings(database_url=pg.url)
    services = SimpleNamespace(settings=settings, db=pg, clock=StillClock())
    follower = HistoryHousekeeper(services, leadership=SimpleNamespace(is_leader=False))  # type: ignore[arg-type]
    await follower.start()
    await asyncio.sleep(0.3)
    await follower.stop()
    assert TODAY not in await days(pg)
    leader = HistoryHousekeeper(services, leadership=SimpleNamespace(is_leader=True))  # type: ignore[arg-type]
    await leader.start()
    for _ in range(100):
        if leader.last is not None:
            break
        await asyncio.sleep(0.05)
    await leader.stop()
    assert TODAY in await days(pg) and TODAY + 2 in await days(pg)


def test_retention_setting_refuses_what_settlement_still_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().history_retention_days == 35
    # The 10-in-10 baseline looks back 20 days and a settlement may wait a day after its event.
    assert HISTORY_MIN_RETENTION_DAYS >= TEN_IN_TEN_LOOKBACK_DAYS + 1
    monkeypatch.setenv("VPP_HISTORY_RETENTION_DAYS", "10")
    with pytest.raises(ValidationError, match="history_retention_days"):
        Settings()
    monkeypatch.setenv("VPP_HISTORY_RETENTION_DAYS", str(HISTORY_MIN_RETENTION_DAYS))
    assert Settings().history_retention_days == HISTORY_MIN_RETENTION_DAYS


async def test_row_count_is_unchanged_by_maintenance(pg: Database) -> None:
    """Moving rows out of DEFAULT keeps their values exactly (samples and every field)."""
    keys = [(f"bat-{i}", NOW - k * INTERVAL_MS) for i in range(30) for k in range(4)]
    await write_partials(pg, one_reading(keys, 1234.5678))
    before = await stored(pg)
    await maintain(pg, NOW, retention_days=35)
    assert await stored(pg) == before
    async with pg.session() as s:
        n = (await s.execute(select(func.count()).select_from(TelemetryInterval))).scalar()
    assert n == len(keys)
