"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22 22:36:06.126083
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "flagged_concept_sets",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("d_model", sa.Integer(), nullable=False),
        sa.Column(
            "labels", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column(
            "directions", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flagged_concept_sets")),
        sa.UniqueConstraint("name", name=op.f("uq_flagged_concept_sets_name")),
    )
    op.create_table(
        "nodes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column(
            "role", sa.Enum("teacher", "student", "admin", name="role", native_enum=False, length=16), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
        sa.UniqueConstraint("name", name=op.f("uq_nodes_name")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("node_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column(
            "scopes", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_api_tokens_node_id_nodes"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_tokens_node_id"), ["node_id"], unique=False)

    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=True),
        sa.Column(
            "detail", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.ForeignKeyConstraint(["actor_id"], ["nodes.id"], name=op.f("fk_audit_log_actor_id_nodes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_log_at"), ["at"], unique=False)

    op.create_table(
        "public_keys",
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("owner_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["owner_id"], ["nodes.id"], name=op.f("fk_public_keys_owner_id_nodes")),
        sa.PrimaryKeyConstraint("fingerprint", name=op.f("pk_public_keys")),
    )
    with op.batch_alter_table("public_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_public_keys_owner_id"), ["owner_id"], unique=False)

    op.create_table(
        "topics",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("safety_threshold", sa.Float(), nullable=True),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.ForeignKeyConstraint(["created_by"], ["nodes.id"], name=op.f("fk_topics_created_by_nodes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_topics")),
        sa.UniqueConstraint("name", name=op.f("uq_topics_name")),
    )
    op.create_table(
        "packets",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("topic_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("publisher_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("key_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("data_sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "manifest", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column(
            "safety", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column(
            "status",
            sa.Enum("accepted", "quarantined", "revoked", name="packet_status", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("storage_key", sa.String(length=300), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_fingerprint"], ["public_keys.fingerprint"], name=op.f("fk_packets_key_fingerprint_public_keys")
        ),
        sa.ForeignKeyConstraint(["publisher_id"], ["nodes.id"], name=op.f("fk_packets_publisher_id_nodes")),
        sa.ForeignKeyConstraint(["topic_id"], ["topics.id"], name=op.f("fk_packets_topic_id_topics")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_packets")),
    )
    with op.batch_alter_table("packets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_packets_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_packets_key_fingerprint"), ["key_fingerprint"], unique=False)
        batch_op.create_index(batch_op.f("ix_packets_publisher_id"), ["publisher_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_packets_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_packets_topic_id"), ["topic_id"], unique=False)

    op.create_table(
        "subscriptions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("node_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("topic_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_subscriptions_node_id_nodes"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["topic_id"], ["topics.id"], name=op.f("fk_subscriptions_topic_id_topics")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
        sa.UniqueConstraint("node_id", "name", name="uq_subscriptions_node_name"),
    )
    op.create_table(
        "ingestion_receipts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("packet_id", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=False),
        sa.Column(
            "scores", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column(
            "report", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_ingestion_receipts_node_id_nodes")),
        sa.ForeignKeyConstraint(
            ["packet_id"], ["packets.id"], name=op.f("fk_ingestion_receipts_packet_id_packets"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingestion_receipts")),
    )
    with op.batch_alter_table("ingestion_receipts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ingestion_receipts_packet_id"), ["packet_id"], unique=False)

    op.create_table(
        "lineage_edges",
        sa.Column("parent_id", sa.String(length=64), nullable=False),
        sa.Column("child_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["child_id"], ["packets.id"], name=op.f("fk_lineage_edges_child_id_packets"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("parent_id", "child_id", name=op.f("pk_lineage_edges")),
    )
    with op.batch_alter_table("lineage_edges", schema=None) as batch_op:
        batch_op.create_index("ix_lineage_edges_child_id", ["child_id"], unique=False)

    op.create_table(
        "topic_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("topic_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("published", "revoked", "quarantined", name="event_kind", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("packet_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["packet_id"], ["packets.id"], name=op.f("fk_topic_events_packet_id_packets"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["topic_id"], ["topics.id"], name=op.f("fk_topic_events_topic_id_topics")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_topic_events")),
        sa.UniqueConstraint("topic_id", "seq", name="uq_topic_events_topic_seq"),
    )


def downgrade() -> None:
    op.drop_table("topic_events")
    with op.batch_alter_table("lineage_edges", schema=None) as batch_op:
        batch_op.drop_index("ix_lineage_edges_child_id")

    op.drop_table("lineage_edges")
    with op.batch_alter_table("ingestion_receipts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ingestion_receipts_packet_id"))

    op.drop_table("ingestion_receipts")
    op.drop_table("subscriptions")
    with op.batch_alter_table("packets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_packets_topic_id"))
        batch_op.drop_index(batch_op.f("ix_packets_status"))
        batch_op.drop_index(batch_op.f("ix_packets_publisher_id"))
        batch_op.drop_index(batch_op.f("ix_packets_key_fingerprint"))
        batch_op.drop_index(batch_op.f("ix_packets_created_at"))

    op.drop_table("packets")
    op.drop_table("topics")
    with op.batch_alter_table("public_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_public_keys_owner_id"))

    op.drop_table("public_keys")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_at"))
        batch_op.drop_index(batch_op.f("ix_audit_log_action"))

    op.drop_table("audit_log")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_tokens_node_id"))

    op.drop_table("api_tokens")
    op.drop_table("nodes")
    op.drop_table("flagged_concept_sets")
