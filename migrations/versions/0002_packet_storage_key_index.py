"""index packets.storage_key

Garbage collection asks, for every blob it considers, whether a packet row references it
(``WHERE storage_key = …``), and so does the quota check of an upload; without an index both
scan the whole packets table (a million rows: milliseconds each, under the blob's lock).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 13:45:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("packets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_packets_storage_key"), ["storage_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("packets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_packets_storage_key"))
