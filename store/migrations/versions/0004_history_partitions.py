"""history partitions: telemetry_intervals partitioned by day on interval_start_ms (PostgreSQL)

Converts an existing table: the rows move into a new table partitioned by RANGE on
``interval_start_ms`` (one partition per UTC day with rows, and today plus two days ahead, and a
DEFAULT partition), which then takes the old name; the primary key ``(device_id,
interval_start_ms)`` holds the partition key as PostgreSQL requires. The move is one
``INSERT … SELECT`` in the migration's transaction: on a large table, run it in a maintenance
window. Partition names and bounds are those of ``store.history_partitions`` (spelled out here,
so this revision stays what it was when that module changes). SQLite keeps its plain table.

Revision ID: 0004_history_partitions
Revises: 0003_broker_logins
Create Date: 2026-12-02 14:50:00.000000
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from alembic import op

revision = "0004_history_partitions"
down_revision = "0003_broker_logins"
branch_labels = None
depends_on = None

DAY_MS = 86_400_000
AHEAD_DAYS = 2
COLUMNS = """
    device_id varchar(64) NOT NULL,
    interval_start_ms bigint NOT NULL,
    samples integer NOT NULL,
    power_w double precision,
    soc_pct double precision,
    indoor_c double precision,
    setpoint_c double precision,
    hvac_w double precision,
    outdoor_c double precision,
    CONSTRAINT telemetry_intervals_pkey PRIMARY KEY (device_id, interval_start_ms)
"""


def _name(day: int) -> str:
    return f"telemetry_intervals_p{datetime.fromtimestamp(day * 86_400, UTC):%Y%m%d}"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE telemetry_intervals RENAME TO telemetry_intervals_unpartitioned")
    op.execute(
        "ALTER INDEX telemetry_intervals_pkey RENAME TO telemetry_intervals_unpartitioned_pkey"
    )
    op.execute(
        "ALTER INDEX ix_telemetry_intervals_start RENAME TO ix_telemetry_intervals_old_start"
    )
    op.execute(
        f"CREATE TABLE telemetry_intervals ({COLUMNS}) PARTITION BY RANGE (interval_start_ms)"
    )
    op.execute(
        "CREATE INDEX ix_telemetry_intervals_start ON telemetry_intervals (interval_start_ms)"
    )
    op.execute("CREATE TABLE telemetry_intervals_default PARTITION OF telemetry_intervals DEFAULT")
    days = {
        int(d)
        for (d,) in bind.exec_driver_sql(
            f"SELECT DISTINCT floor(interval_start_ms / {DAY_MS}.0)::bigint "
            "FROM telemetry_intervals_unpartitioned"
        )
    }
    today = int(time.time() * 1000) // DAY_MS
    days |= set(range(today, today + AHEAD_DAYS + 1))
    for day in sorted(days):
        op.execute(
            f"CREATE TABLE {_name(day)} PARTITION OF telemetry_intervals "
            f"FOR VALUES FROM ({day * DAY_MS}) TO ({(day + 1) * DAY_MS})"
        )
    op.execute("INSERT INTO telemetry_intervals SELECT * FROM telemetry_intervals_unpartitioned")
    op.execute("DROP TABLE telemetry_intervals_unpartitioned")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE telemetry_intervals RENAME TO telemetry_intervals_partitioned")
    op.execute(
        "ALTER INDEX telemetry_intervals_pkey RENAME TO telemetry_intervals_partitioned_pkey"
    )
    op.execute(
        "ALTER INDEX ix_telemetry_intervals_start RENAME TO ix_telemetry_intervals_old_start"
    )
    op.execute(f"CREATE TABLE telemetry_intervals ({COLUMNS})")
    op.execute(
        "CREATE INDEX ix_telemetry_intervals_start ON telemetry_intervals (interval_start_ms)"
    )
    op.execute("INSERT INTO telemetry_intervals SELECT * FROM telemetry_intervals_partitioned")
    op.execute("DROP TABLE telemetry_intervals_partitioned")  # its partitions with it
