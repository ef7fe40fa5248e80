"""Partitions and retention of the interval history (``telemetry_intervals``).

PostgreSQL: the table is partitioned by RANGE on ``interval_start_ms``, one partition per UTC
day, named ``telemetry_intervals_pYYYYMMDD`` and bounded ``[day × 86 400 000, next day)``, plus a
DEFAULT partition. Daily, because retention (35 days by default) then drops whole days and the
10-day baseline read touches 11 partitions; a day at a million devices is 288 M rows, the size
of partition a vacuum or an index build handles in one go.

Writers never create partitions: a row of a day that has none lands in the DEFAULT partition,
so no write fails and no reading is lost if maintenance has not run. :func:`maintain` (the
leader runs it periodically, ``dispatch.housekeeping.HistoryHousekeeper``):

1. creates the partitions of yesterday, today and ``ahead_days`` days ahead that are missing;
2. moves what the DEFAULT partition caught into the partition of its day (creating it), in one
   transaction per day (a new table filled from the DEFAULT partition's rows, then ATTACHed), so
   the DEFAULT partition stays empty and the planner prunes it;
3. drops the partitions whose whole day is older than ``retention_days`` (DROP TABLE of the
   partition: no DELETE, no vacuum debt), and deletes the DEFAULT partition's rows that old.

Plain SQL instead of pg_partman: three statements a day need no extension on the server (a
managed PostgreSQL may not offer it, and its background worker needs shared_preload_libraries),
and the job runs where the service's other leader-only jobs run, with the service's clock.
Each DDL transaction sets a short ``lock_timeout``: DROP and ATTACH take strong locks on the
parent for a moment; behind a long reader they give up and the next run tries again, instead of
queueing every writer behind them.

SQLite keeps one plain table; retention there is a DELETE.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from store.database import Database

log = logging.getLogger(__name__)

TABLE = "telemetry_intervals"
DEFAULT_PARTITION = f"{TABLE}_default"
DAY_MS = 86_400_000
DEFAULT_AHEAD_DAYS = 2
LOCK_TIMEOUT = "2s"
_DAY_NAME = re.compile(rf"^{TABLE}_p(\d{{8}})$")


def day_of(ms: int) -> int:
    """The UTC day number (days since the epoch) holding ``ms``."""
    return ms // DAY_MS


def partition_name(day: int) -> str:
    return f"{TABLE}_p{datetime.fromtimestamp(day * 86_400, UTC):%Y%m%d}"


def day_of_partition(name: str) -> int | None:
    """The day of a daily partition's name; None for any other name (the DEFAULT one)."""
    m = _DAY_NAME.match(name)
    if m is None:
        return None
    return int(datetime.strptime(m.group(1), "%Y%m%d").replace(tzinfo=UTC).timestamp()) // 86_400


def is_partition_name(name: str) -> bool:
    """A partition of the history, not a table of the models (for schema comparisons)."""
    return name == DEFAULT_PARTITION or _DAY_NAME.match(name) is not None


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's ``include_name``: the partitions are made by maintenance, not by the models, so
    autogenerate and schema comparisons leave them alone."""
    return not (type_ == "table" and name is not None and is_partition_name(name))


def first_kept_day(now_ms: int, retention_days: int) -> int:
    """The oldest day retention keeps: every day that ends after ``now − retention``."""
    return day_of(now_ms - retention_days * DAY_MS)


@dataclass
class MaintenanceReport:
    created: list[str] = field(default_factory=list)
    moved_rows: int = 0
    dropped: list[str] = field(default_factory=list)
    deleted_rows: int = 0


async def partition_days(conn: AsyncConnection) -> dict[int, str]:
    """The daily partitions that exist now: day → name."""
    rows = await conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            f"WHERE i.inhparent = '{TABLE}'::regclass"
        )
    )
    out: dict[int, str] = {}
    for (name,) in rows:
        day = day_of_partition(name)
        if day is not None:
            out[day] = name
    return out


async def _create_day(conn: AsyncConnection, day: int) -> int:
    """Create the partition of ``day``, moving into it the rows the DEFAULT partition holds for
    that day; returns the rows moved. Runs inside the caller's transaction."""
    name, lo, hi = partition_name(day), day * DAY_MS, (day + 1) * DAY_MS
    await conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    # A table of its own first, attached after: ATTACH takes a weaker lock on the parent than
    # CREATE … PARTITION OF, and the rows caught by the DEFAULT partition can move in first.
    await conn.execute(
        text(f"CREATE TABLE {name} (LIKE {TABLE} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    )
    moved = await conn.execute(
        text(
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} "
            f"WHERE interval_start_ms >= {lo} AND interval_start_ms < {hi} RETURNING *) "
            f"INSERT INTO {name} SELECT * FROM moved"
        )
    )
    # The bound as a CHECK constraint lets ATTACH skip scanning the new table for it.
    await conn.execute(
        text(
            f"ALTER TABLE {name} ADD CONSTRAINT {name}_bound "
            f"CHECK (interval_start_ms >= {lo} AND interval_start_ms < {hi})"
        )
    )
    await conn.execute(
        text(f"ALTER TABLE {TABLE} ATTACH PARTITION {name} FOR VALUES FROM ({lo}) TO ({hi})")
    )
    await conn.execute(text(f"ALTER TABLE {name} DROP CONSTRAINT {name}_bound"))
    return int(moved.rowcount or 0)


async def ensure_day(db: Database, day: int) -> bool:
    """Create the partition of ``day`` if it is missing (own transaction); True if created."""
    async with db.engine.begin() as conn:
        if day in await partition_days(conn):
            return False
        await _create_day(conn, day)
    return True


async def maintain(
    db: Database, now_ms: int, retention_days: int, ahead_days: int = DEFAULT_AHEAD_DAYS
) -> MaintenanceReport:
    """One maintenance run at service time ``now_ms`` (see the module doc)."""
    report = MaintenanceReport()
    keep_from = first_kept_day(now_ms, retention_days)
    if db.is_sqlite:
        async with db.engine.begin() as conn:
            res = await conn.execute(
                text(f"DELETE FROM {TABLE} WHERE interval_start_ms < :lo"),
                {"lo": keep_from * DAY_MS},
            )
            report.deleted_rows = int(res.rowcount or 0)
        return report

    today = day_of(now_ms)
    async with db.engine.connect() as conn:
        have = await partition_days(conn)
        caught = await conn.execute(
            text(
                f"SELECT DISTINCT floor(interval_start_ms / {DAY_MS}.0)::bigint "
                f"FROM {DEFAULT_PARTITION}"
            )
        )
        stray = {int(d) for (d,) in caught}
    # Days caught by DEFAULT older than retention are deleted below, not given a partition;
    # those far ahead (a device clock gone wild) wait in DEFAULT until their day comes near.
    wanted = set(range(max(today - 1, keep_from), today + ahead_days + 1))
    wanted |= {d for d in stray if keep_from <= d <= today + ahead_days}
    for day in sorted(wanted - set(have)):
        async with db.engine.begin() as conn:
            report.moved_rows += await _create_day(conn, day)
        report.created.append(partition_name(day))

    for day, name in sorted(have.items()):
        if day >= keep_from:
            continue
        async with db.engine.begin() as conn:
            await conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            await conn.execute(text(f"DROP TABLE {name}"))
        report.dropped.append(name)
    if any(d < keep_from for d in stray):
        async with db.engine.begin() as conn:
            res = await conn.execute(
                text(f"DELETE FROM {DEFAULT_PARTITION} WHERE interval_start_ms < :lo"),
                {"lo": keep_from * DAY_MS},
            )
            report.deleted_rows = int(res.rowcount or 0)
    if report.created or report.dropped or report.moved_rows or report.deleted_rows:
        log.info(
            "history partitions: created %s, moved %d rows out of DEFAULT, dropped %s, "
            "deleted %d rows past retention from DEFAULT",
            report.created,
            report.moved_rows,
            report.dropped,
            report.deleted_rows,
        )
    return report
