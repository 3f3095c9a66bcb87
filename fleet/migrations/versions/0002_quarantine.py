"""Quarantine: device messages that could not be stored faithfully, kept with the reason.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "quarantine",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantine")),
    )
    op.create_index(op.f("ix_quarantine_received_at"), "quarantine", ["received_at"])
    op.create_index(op.f("ix_quarantine_device_id"), "quarantine", ["device_id"])


def downgrade() -> None:
    op.drop_table("quarantine")
