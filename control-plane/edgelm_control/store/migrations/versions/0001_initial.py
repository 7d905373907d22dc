"""The first schema: devices, desired states, models, rollouts, events, telemetry, jobs, tokens.

Revision ID: 0001
Revises:

Written out in full rather than built from :mod:`edgelm_control.store.schema`: a migration
must keep creating what it created on the day it was written, whatever the schema module
says later. A test checks that the migrated database equals the schema module's metadata.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("hardware_class", sa.String(64)),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("presence", sa.String(16), nullable=False),
        sa.Column("agent_version", sa.String(64)),
        sa.Column("first_seen_ms", sa.BigInteger, nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger),
        sa.Column("online_since_ms", sa.BigInteger),
        sa.Column("presence_changed_ms", sa.BigInteger),
        sa.Column("registered_ms", sa.BigInteger),
        sa.Column("active_model", sa.String(140)),
        sa.Column("active_sha256", sa.String(64)),
        sa.Column("previous_model", sa.String(140)),
        sa.Column("applied_sequence", sa.BigInteger, nullable=False),
        sa.Column("reported_state", sa.Text),
        sa.Column("state_updated_ms", sa.BigInteger),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
    )
    op.create_index("ix_devices_hardware_class", "devices", ["hardware_class"])
    op.create_index("ix_devices_presence", "devices", ["presence"])

    op.create_table(
        "desired_states",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("rollout_id", sa.String(64)),
        sa.Column("model", sa.String(140)),
        sa.Column("target_path", sa.String(512)),
        sa.Column("target_length", sa.BigInteger),
        sa.Column("target_sha256", sa.String(64)),
        sa.Column("issued_at_s", sa.BigInteger),
        sa.Column("expires_s", sa.BigInteger),
        sa.Column("document", sa.Text),
        sa.Column("published_sequence", sa.BigInteger, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("device_id", name="pk_desired_states"),
    )
    op.create_index("ix_desired_states_expires_s", "desired_states", ["expires_s"])

    op.create_table(
        "model_targets",
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("model", sa.String(140), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("length", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("quantization", sa.String(64), nullable=False),
        sa.Column("context_length", sa.Integer, nullable=False),
        sa.Column("min_ram_bytes", sa.BigInteger, nullable=False),
        sa.Column("custom", sa.Text, nullable=False),
        sa.Column("targets_version", sa.Integer, nullable=False),
        sa.Column("added_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("path", name="pk_model_targets"),
        sa.UniqueConstraint("model", name="uq_model_targets_model"),
    )

    op.create_table(
        "repository_state",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("targets_version", sa.Integer, nullable=False),
        sa.Column("timestamp_version", sa.Integer, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_repository_state"),
    )

    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(140), nullable=False),
        sa.Column("target_path", sa.String(512), nullable=False),
        sa.Column("target_length", sa.BigInteger, nullable=False),
        sa.Column("target_sha256", sa.String(64), nullable=False),
        sa.Column("selector", sa.Text, nullable=False),
        sa.Column("settings", sa.Text, nullable=False),
        sa.Column("baselines", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("current_wave", sa.Integer, nullable=False),
        sa.Column("wave_count", sa.Integer, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
        sa.Column("ended_ms", sa.BigInteger),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_index("ix_rollouts_created_ms_id", "rollouts", ["created_ms", "id"])

    op.create_table(
        "rollout_waves",
        sa.Column("rollout_id", sa.String(64), nullable=False),
        sa.Column("wave", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("started_ms", sa.BigInteger),
        sa.Column("decided_ms", sa.BigInteger),
        sa.Column("verdict", sa.String(16)),
        sa.Column("code", sa.String(32)),
        sa.Column("reason", sa.Text),
        sa.Column("tally", sa.Text),
        sa.PrimaryKeyConstraint("rollout_id", "wave", name="pk_rollout_waves"),
    )

    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("previous_model", sa.String(140)),
        sa.Column("previous_path", sa.String(512)),
        sa.Column("previous_length", sa.BigInteger),
        sa.Column("previous_sha256", sa.String(64)),
        sa.Column("desired_sequence", sa.BigInteger),
        sa.Column("abort_sequence", sa.BigInteger),
        sa.Column("pending_since_ms", sa.BigInteger),
        sa.Column("last_report_ms", sa.BigInteger),
        sa.Column("health_tokens_per_s", sa.Float),
        sa.Column("health_ttft_ms", sa.Float),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name="pk_rollout_devices"),
    )
    op.create_index("ix_rollout_devices_device_id_state", "rollout_devices", ["device_id", "state"])
    op.create_index("ix_rollout_devices_rollout_id_wave", "rollout_devices", ["rollout_id", "wave"])
    op.create_index("ix_rollout_devices_state", "rollout_devices", ["state"])

    op.create_table(
        "device_events",
        sa.Column("message_id", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("model", sa.String(140)),
        sa.Column("desired_sequence", sa.BigInteger),
        sa.Column("rollout_id", sa.String(64)),
        sa.Column("reason", sa.Text),
        sa.Column("health_tokens_per_s", sa.Float),
        sa.Column("health_ttft_ms", sa.Float),
        sa.Column("progress_done_bytes", sa.BigInteger),
        sa.Column("progress_total_bytes", sa.BigInteger),
        sa.Column("sent_ms", sa.BigInteger, nullable=False),
        sa.Column("received_ms", sa.BigInteger, nullable=False),
        sa.Column("processed_ms", sa.BigInteger),
        sa.PrimaryKeyConstraint("message_id", name="pk_device_events"),
    )
    op.create_index(
        "ix_device_events_device_id_received_ms", "device_events", ["device_id", "received_ms"]
    )
    op.create_index("ix_device_events_processed_ms", "device_events", ["processed_ms"])
    op.create_index("ix_device_events_kind_model", "device_events", ["kind", "model"])

    op.create_table(
        "telemetry",
        sa.Column("id", _AUTO_ID, nullable=False, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("received_ms", sa.BigInteger, nullable=False),
        sa.Column("sent_ms", sa.BigInteger, nullable=False),
        sa.Column("window_s", sa.Float, nullable=False),
        sa.Column("model", sa.String(140)),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("tokens_per_s_p50", sa.Float),
        sa.Column("tokens_per_s_p90", sa.Float),
        sa.Column("ttft_ms_p50", sa.Float),
        sa.Column("ttft_ms_p90", sa.Float),
        sa.Column("queue_depth", sa.BigInteger, nullable=False),
        sa.Column("cpu_percent", sa.Float),
        sa.Column("memory_bytes", sa.BigInteger),
        sa.Column("memory_total_bytes", sa.BigInteger),
        sa.Column("disk_free_bytes", sa.BigInteger),
        sa.Column("temperature_c", sa.Float),
        sa.PrimaryKeyConstraint("id", name="pk_telemetry"),
    )
    op.create_index("ix_telemetry_device_id_id", "telemetry", ["device_id", "id"])
    op.create_index("ix_telemetry_received_ms", "telemetry", ["received_ms"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("selector", sa.Text, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("ttl_s", sa.Float),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("metadata", sa.Text),
        sa.Column("wait_for_model", sa.Boolean, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_created_ms_id", "jobs", ["created_ms", "id"])

    op.create_table(
        "job_devices",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("sent_ms", sa.BigInteger),
        sa.Column("finished_ms", sa.BigInteger),
        sa.Column("result_message_id", sa.String(32)),
        sa.PrimaryKeyConstraint("job_id", "device_id", name="pk_job_devices"),
        sa.UniqueConstraint("message_id", name="uq_job_devices_message_id"),
    )
    op.create_index("ix_job_devices_state", "job_devices", ["state"])

    op.create_table(
        "job_results",
        sa.Column("message_id", sa.String(32), nullable=False),
        sa.Column("job_message_id", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("metadata", sa.Text),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("sent_ms", sa.BigInteger, nullable=False),
        sa.Column("received_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("message_id", name="pk_job_results"),
    )
    op.create_index("ix_job_results_job_message_id", "job_results", ["job_message_id"])

    op.create_table(
        "operator_tokens",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at_s", sa.BigInteger, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_operator_tokens"),
        sa.UniqueConstraint("sha256", name="uq_operator_tokens_sha256"),
    )


def downgrade() -> None:
    for table in (
        "operator_tokens", "job_results", "job_devices", "jobs", "telemetry", "device_events",
        "rollout_devices", "rollout_waves", "rollouts", "repository_state", "model_targets",
        "desired_states", "devices",
    ):  # fmt: skip
        op.drop_table(table)
