"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("socket", sa.String(length=1024), nullable=True),
        sa.Column("url", sa.String(length=1024), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_agents")),
    )
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("account_url", sa.String(length=255), nullable=False),
        sa.Column("container", sa.String(length=63), nullable=False),
        sa.Column("prefix", sa.String(length=1024), nullable=False),
        sa.Column("visibility", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("name", name=op.f("uq_datasets_name")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("uid", sa.BigInteger(), nullable=False),
        sa.Column("gid", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_table(
        "dataset_access",
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_dataset_access_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_dataset_access_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("dataset_id", "user_id", name=op.f("pk_dataset_access")),
    )
    with op.batch_alter_table("dataset_access", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dataset_access_user_id"), ["user_id"], unique=False)

    op.create_table(
        "kernels",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("agent", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("mounts_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name=op.f("fk_kernels_owner_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kernels")),
    )
    with op.batch_alter_table("kernels", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_kernels_owner_id"), ["owner_id"], unique=False)

    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_tokens_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_tokens_token_hash")),
    )
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tokens_user_id"), ["user_id"], unique=False)

    op.create_table(
        "vfolders",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("volume", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("usage_mode", sa.String(length=16), nullable=False),
        sa.Column("permission", sa.String(length=16), nullable=False),
        sa.Column("quota_bytes", sa.BigInteger(), nullable=False),
        sa.Column("quota_files", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_vfolders_owner_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vfolders")),
    )
    with op.batch_alter_table("vfolders", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_vfolders_owner_id"), ["owner_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_vfolders_status"), ["status"], unique=False)
        batch_op.create_index(
            "uq_vfolders_owner_alias",
            ["owner_id", "alias"],
            unique=True,
            sqlite_where=sa.text("status != 'delete-complete'"),
            postgresql_where=sa.text("status != 'delete-complete'"),
        )

    op.create_table(
        "kernel_mounts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kernel_id", sa.String(length=128), nullable=False),
        sa.Column("vfolder_id", sa.Uuid(), nullable=True),
        sa.Column("dataset_id", sa.Integer(), nullable=True),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("mode", sa.String(length=4), nullable=False),
        sa.Column("target", sa.String(length=1024), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_kernel_mounts_dataset_id_datasets")
        ),
        sa.ForeignKeyConstraint(
            ["kernel_id"],
            ["kernels.id"],
            name=op.f("fk_kernel_mounts_kernel_id_kernels"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["vfolder_id"], ["vfolders.id"], name=op.f("fk_kernel_mounts_vfolder_id_vfolders")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kernel_mounts")),
    )
    with op.batch_alter_table("kernel_mounts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_kernel_mounts_kernel_id"), ["kernel_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_kernel_mounts_vfolder_id"), ["vfolder_id"], unique=False
        )

    op.create_table(
        "vfolder_shares",
        sa.Column("vfolder_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("permission", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_vfolder_shares_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["vfolder_id"],
            ["vfolders.id"],
            name=op.f("fk_vfolder_shares_vfolder_id_vfolders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("vfolder_id", "user_id", name=op.f("pk_vfolder_shares")),
    )
    with op.batch_alter_table("vfolder_shares", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_vfolder_shares_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("vfolder_shares", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vfolder_shares_user_id"))

    op.drop_table("vfolder_shares")
    with op.batch_alter_table("kernel_mounts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_kernel_mounts_vfolder_id"))
        batch_op.drop_index(batch_op.f("ix_kernel_mounts_kernel_id"))

    op.drop_table("kernel_mounts")
    with op.batch_alter_table("vfolders", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_vfolders_owner_alias",
            sqlite_where=sa.text("status != 'delete-complete'"),
            postgresql_where=sa.text("status != 'delete-complete'"),
        )
        batch_op.drop_index(batch_op.f("ix_vfolders_status"))
        batch_op.drop_index(batch_op.f("ix_vfolders_owner_id"))

    op.drop_table("vfolders")
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tokens_user_id"))

    op.drop_table("tokens")
    with op.batch_alter_table("kernels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_kernels_owner_id"))

    op.drop_table("kernels")
    with op.batch_alter_table("dataset_access", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dataset_access_user_id"))

    op.drop_table("dataset_access")
    op.drop_table("users")
    op.drop_table("datasets")
    op.drop_table("agents")
