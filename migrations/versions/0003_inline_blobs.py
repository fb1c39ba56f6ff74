"""inline_blobs: small packets' bytes kept in the database

With ``M2KT_INLINE_BLOB_MAX_BYTES`` set, a packet of at most that many bytes is stored in this table
instead of the blob store (one INSERT instead of an S3 round trip); larger ones go to the store as before.
The table is empty, and unused, when the setting is 0 (the default).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 23:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inline_blobs",
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("modified", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_inline_blobs")),
    )


def downgrade() -> None:
    op.drop_table("inline_blobs")
