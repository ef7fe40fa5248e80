"""broker_logins and broker_tier: device logins for a password-file broker tier

Revision ID: 0003_broker_logins
Revises: 0002
Create Date: 2026-12-02 14:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_broker_logins"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "broker_logins",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    with op.batch_alter_table("broker_logins", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_broker_logins_generation"), ["generation"], unique=False
        )
    op.create_table(
        "broker_tier",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("applied_generation", sa.BigInteger(), nullable=False),
        sa.Column("applied_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("broker_tier")
    with op.batch_alter_table("broker_logins", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_broker_logins_generation"))
    op.drop_table("broker_logins")
