"""OpenADR 3.1 VTN: clients, tokens, objects; grid events say where they came from

``openadr_clients`` (secrets as SHA-256), ``openadr_tokens`` (bearer tokens as SHA-256, with
scopes and expiry), ``openadr_objects`` (every program, event, report, subscription, ven and
resource as JSON with the columns tenancy and uniqueness need), and ``grid_events.source``
(``api`` or ``openadr``) with ``source_id`` (the OpenADR event's id).

Revision ID: 0006_openadr
Revises: 0005_commands_fillfactor
Create Date: 2026-12-03 08:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_openadr"
down_revision = "0005_commands_fillfactor"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("grid_events") as batch:
        batch.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="api"))
        batch.add_column(sa.Column("source_id", sa.String(128), nullable=True))
    op.create_index("ix_grid_events_source_id", "grid_events", ["source_id"])
    op.create_table(
        "openadr_clients",
        sa.Column("client_id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("ven_name", sa.String(128), nullable=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("revoked_ms", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_openadr_clients_tenant_id", "openadr_clients", ["tenant_id"])
    op.create_table(
        "openadr_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column(
            "client_id",
            sa.String(64),
            sa.ForeignKey("openadr_clients.client_id"),
            nullable=False,
        ),
        sa.Column("scopes", sa.String(400), nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("expires_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_openadr_tokens_client_id", "openadr_tokens", ["client_id"])
    op.create_index("ix_openadr_tokens_expires_ms", "openadr_tokens", ["expires_ms"])
    op.create_table(
        "openadr_objects",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("object_type", sa.String(16), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=True),
        sa.Column("ven_id", sa.String(64), nullable=True),
        sa.Column("parent_id", sa.String(64), nullable=True),
        sa.Column("unique_name", sa.String(128), nullable=True),
        sa.Column("state", sa.String(16), nullable=True),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("modified_ms", sa.BigInteger, nullable=False),
        sa.UniqueConstraint(
            "tenant_id", "object_type", "parent_id", "unique_name", name="uq_openadr_name"
        ),
    )
    op.create_index("ix_openadr_objects_tenant_id", "openadr_objects", ["tenant_id"])
    op.create_index(
        "ix_openadr_objects_tenant_type", "openadr_objects", ["tenant_id", "object_type"]
    )
    op.create_index("ix_openadr_objects_ven_id", "openadr_objects", ["ven_id"])
    op.create_index("ix_openadr_objects_parent_id", "openadr_objects", ["parent_id"])


def downgrade() -> None:
    op.drop_table("openadr_objects")
    op.drop_table("openadr_tokens")
    op.drop_table("openadr_clients")
    op.drop_index("ix_grid_events_source_id", table_name="grid_events")
    with op.batch_alter_table("grid_events") as batch:
        batch.drop_column("source_id")
        batch.drop_column("source")
