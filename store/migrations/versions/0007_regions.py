"""Regions as data: the load-zone registry, seeded with every load zone of ERCOT, CAISO, PJM,
MISO, NYISO, ISO-NE and SPP (``vpp.regions.SEED_REGIONS``, as this revision ships it).

Revision ID: 0007_regions
Revises: 0006_openadr
Create Date: 2026-12-03 14:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_regions"
down_revision = "0006_openadr"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from vpp.regions import SEED_REGIONS

    table = op.create_table(
        "regions",
        sa.Column("name", sa.String(48), primary_key=True),
        sa.Column("iso", sa.String(16), nullable=False),
        sa.Column("zone", sa.String(32), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("time_zone", sa.String(64), nullable=False),
        sa.Column("latitude", sa.Float, nullable=False),
        sa.Column("longitude", sa.Float, nullable=False),
        sa.Column("climate", sa.String(16), nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("modified_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_regions_iso", "regions", ["iso"])
    # The seed is data of this revision: a later release that adds zones adds a revision.
    op.bulk_insert(
        table,
        [{**r.as_dict(), "created_ms": 0, "modified_ms": 0} for r in SEED_REGIONS],
    )


def downgrade() -> None:
    op.drop_index("ix_regions_iso", table_name="regions")
    op.drop_table("regions")
