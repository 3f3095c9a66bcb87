"""Initial fleet registry schema.

Revision ID: 0001
Revises:
Create Date: 2026-05-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _device_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["device_id"], ["devices.id"], name=op.f(f"fk_{table}_device_id_devices"), ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "groups",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_groups")),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("group", sa.String(128), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("hardware", sa.String(128), nullable=True),
        sa.Column("credentials_kind", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=True),
        sa.Column("profile", sa.String(128), nullable=True),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("status_reason", sa.String(256), nullable=True),
        sa.Column("status_ts", sa.Double(), nullable=True),
        sa.Column("prev_status_ts", sa.Double(), nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=True),
        sa.Column("fps", sa.Double(), nullable=True),
        sa.Column("latency_ms", sa.Double(), nullable=True),
        sa.Column("temperature_c", sa.Double(), nullable=True),
        sa.Column("cpu_percent", sa.Double(), nullable=True),
        sa.Column("telemetry_ts", sa.Double(), nullable=True),
        sa.Column("results", sa.JSON(), nullable=True),
        sa.Column("update_state", sa.String(32), nullable=True),
        sa.Column("update_reason", sa.Text(), nullable=True),
        sa.Column("update_id", sa.String(128), nullable=True),
        sa.Column("update_ts", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["group"], ["groups.name"], name=op.f("fk_devices_group_groups")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    op.create_index(op.f("ix_devices_group"), "devices", ["group"])

    op.create_table(
        "telemetry",
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("fps_sum", sa.Double(), nullable=False),
        sa.Column("fps_n", sa.Integer(), nullable=False),
        sa.Column("latency_sum", sa.Double(), nullable=False),
        sa.Column("latency_n", sa.Integer(), nullable=False),
        sa.Column("temperature_sum", sa.Double(), nullable=False),
        sa.Column("temperature_n", sa.Integer(), nullable=False),
        sa.Column("temperature_max", sa.Double(), nullable=True),
        sa.Column("cpu_sum", sa.Double(), nullable=False),
        sa.Column("cpu_n", sa.Integer(), nullable=False),
        _device_fk("telemetry"),
        sa.PrimaryKeyConstraint("device_id", "bucket", name=op.f("pk_telemetry")),
    )
    op.create_index(op.f("ix_telemetry_bucket"), "telemetry", ["bucket"])

    op.create_table(
        "update_history",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("update_id", sa.String(128), nullable=False),
        sa.Column("command_id", sa.String(128), nullable=True),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("target", sa.String(512), nullable=True),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("progress", sa.BigInteger(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        _device_fk("update_history"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_update_history")),
        sa.UniqueConstraint(
            "device_id",
            "update_id",
            "state",
            "progress",
            name=op.f("uq_update_history_device_id_update_id_state_progress"),
        ),
    )
    op.create_index(op.f("ix_update_history_device_id"), "update_history", ["device_id"])
    op.create_index(op.f("ix_update_history_update_id"), "update_history", ["update_id"])
    op.create_index(op.f("ix_update_history_ts"), "update_history", ["ts"])
    op.create_index(op.f("ix_update_history_command_id"), "update_history", ["command_id"])

    op.create_table(
        "events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("digest", sa.String(16), nullable=False),
        _device_fk("events"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("device_id", "ts", "kind", "digest", name=op.f("uq_events_device_id_ts_kind_digest")),
    )
    op.create_index(op.f("ix_events_device_id"), "events", ["device_id"])
    op.create_index(op.f("ix_events_ts"), "events", ["ts"])

    op.create_table(
        "ingest_marks",
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        _device_fk("ingest_marks"),
        sa.PrimaryKeyConstraint("device_id", "kind", "key", name=op.f("pk_ingest_marks")),
    )
    op.create_index(op.f("ix_ingest_marks_ts"), "ingest_marks", ["ts"])

    op.create_table(
        "unknown_devices",
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("last_kind", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_unknown_devices")),
    )

    op.create_table(
        "audit",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit")),
    )
    op.create_index(op.f("ix_audit_ts"), "audit", ["ts"])
    op.create_index(op.f("ix_audit_action"), "audit", ["action"])

    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    op.create_index(op.f("ix_rollouts_status"), "rollouts", ["status"])

    op.create_table(
        "commands",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=True),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("issued", sa.Double(), nullable=False),
        sa.Column("expires", sa.Double(), nullable=True),
        sa.Column("acked", sa.Double(), nullable=True),
        sa.Column("ack_result", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_commands")),
    )
    op.create_index(op.f("ix_commands_id"), "commands", ["id"])
    op.create_index(op.f("ix_commands_device_id"), "commands", ["device_id"])

    counters = op.create_table(
        "counters",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_counters")),
    )
    op.bulk_insert(counters, [{"name": "command_seq", "value": 0}])


def downgrade() -> None:
    for table in (
        "counters",
        "commands",
        "rollouts",
        "audit",
        "unknown_devices",
        "ingest_marks",
        "events",
        "update_history",
        "telemetry",
        "devices",
        "groups",
    ):
        op.drop_table(table)
