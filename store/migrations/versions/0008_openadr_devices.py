"""Devices reached over OpenADR: ``devices.transport``

``mqtt`` (the default: a device with its own broker login, commanded on its ``cmd`` topic) or
``openadr`` (a VEN's resource: no broker login; commanded by OpenADR events the VEN reads,
telemetry from the VEN's reports). A partial index keeps the OpenADR ones cheap to list.

Revision ID: 0008_openadr_devices
Revises: 0007_regions
Create Date: 2026-12-03 14:05:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_openadr_devices"
down_revision = "0007_regions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(
            sa.Column("transport", sa.String(16), nullable=False, server_default="mqtt")
        )
    op.create_index(
        "ix_devices_transport_openadr",
        "devices",
        ["transport"],
        postgresql_where=sa.text("transport <> 'mqtt'"),
        sqlite_where=sa.text("transport <> 'mqtt'"),
    )


def downgrade() -> None:
    op.drop_index("ix_devices_transport_openadr", table_name="devices")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("transport")
