"""kernel dataset mounts: hash of the SAS renewal key handed to the agent

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("kernel_mounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("renew_hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("kernel_mounts", schema=None) as batch_op:
        batch_op.drop_column("renew_hash")
