"""Revoked devices: one row per device the operator revoked, with when and why.

Revision ID: 0002
Revises: 0001

Written out in full, as 0001 is: a migration keeps creating what it created on the day it was
written, whatever the schema module says later.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_revocations",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("revoked_ms", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.Text),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_revocations"),
    )


def downgrade() -> None:
    op.drop_table("device_revocations")
