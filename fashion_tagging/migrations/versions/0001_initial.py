"""Initial catalog schema: products, model registry, runs, tags, embeddings (pgvector + HNSW), errors.

Written out table by table (not ``metadata.create_all``) so that later edits of ``schema.py`` need
their own revision; ``tests/test_db.py`` checks that migrations and ``schema.py`` agree.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

IMAGE_EMBEDDING_DIM = 1280  # frozen here: a migration must not change when settings do
PRODUCT_EMBEDDING_DIM = 256


def _timestamp(name: str, nullable: bool = False) -> sa.Column:
    default = None if nullable else sa.func.now()
    return sa.Column(name, sa.DateTime(timezone=True), server_default=default, nullable=nullable)


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")

    op.create_table(
        "products",
        sa.Column("product_id", sa.BigInteger, primary_key=True, autoincrement=False),
        *(sa.Column(name, sa.Text) for name in ("gender", "master_category", "sub_category", "article_type",
                                                  "base_colour", "season")),
        sa.Column("year", sa.Integer),
        *(sa.Column(name, sa.Text) for name in ("usage", "title", "brand", "description", "image_key",
                                                  "split", "source")),
        _timestamp("ingested_at"),
        _timestamp("updated_at"),
    )
    op.create_index("ix_products_ingested_at", "products", ["ingested_at"])

    op.create_table(
        "model_versions",
        sa.Column("version", sa.Text, primary_key=True),
        sa.Column("backbone", sa.Text, nullable=False),
        sa.Column("image_size", sa.Integer, nullable=False),
        sa.Column("fine_tuned", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("artifact_uri", sa.Text, nullable=False),
        sa.Column("metrics", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("article_type_accuracy", sa.Float),
        sa.Column("status", sa.Text, nullable=False, server_default="registered"),
        sa.Column("gate_reason", sa.Text),
        _timestamp("created_at"),
        _timestamp("promoted_at", nullable=True),
    )
    op.create_index("uq_model_versions_one_production", "model_versions", ["status"], unique=True,
                    postgresql_where=sa.text("status = 'production'"))

    op.create_table(
        "tagging_runs",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("model_version", sa.Text, sa.ForeignKey("model_versions.version"), nullable=True),
        _timestamp("started_at"),
        _timestamp("finished_at", nullable=True),
        sa.Column("status", sa.Text, nullable=False, server_default="running"),
        *(sa.Column(name, sa.Integer, nullable=False, server_default="0")
          for name in ("products_seen", "products_tagged", "errors", "batches")),
        sa.Column("seconds", sa.Float),
        sa.Column("products_per_second", sa.Float),
        sa.Column("details", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )

    op.create_table(
        "tags",
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.product_id"), primary_key=True),
        sa.Column("model_version", sa.Text, sa.ForeignKey("model_versions.version"), primary_key=True),
        sa.Column("article_type", sa.Text, nullable=False),
        sa.Column("article_type_confidence", sa.Float, nullable=False),
        sa.Column("heads", JSONB, nullable=False),
        sa.Column("has_image", sa.Boolean, nullable=False),
        sa.Column("has_text", sa.Boolean, nullable=False),
        sa.Column("run_id", sa.Text),
        _timestamp("tagged_at"),
    )
    op.create_index("ix_tags_model_article_type", "tags", ["model_version", "article_type"])
    op.create_index("ix_tags_model_confidence", "tags", ["model_version", "article_type_confidence"])

    op.create_table(
        "embeddings",
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.product_id"), primary_key=True),
        sa.Column("model_version", sa.Text, sa.ForeignKey("model_versions.version"), primary_key=True),
        sa.Column("image_embedding", Vector(IMAGE_EMBEDDING_DIM)),
        sa.Column("product_embedding", Vector(PRODUCT_EMBEDDING_DIM), nullable=False),
        sa.Column("run_id", sa.Text),
        _timestamp("created_at"),
    )
    op.create_index("ix_embeddings_product_embedding_hnsw", "embeddings", ["product_embedding"],
                    postgresql_using="hnsw", postgresql_with={"m": 16, "ef_construction": 64},
                    postgresql_ops={"product_embedding": "vector_cosine_ops"})

    op.create_table(
        "product_errors",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("product_id", sa.BigInteger),
        sa.Column("stage", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("source", sa.Text),
        _timestamp("created_at"),
        sa.UniqueConstraint("run_id", "product_id", "stage", "source", name="uq_product_errors_once",
                            postgresql_nulls_not_distinct=True),
    )


def downgrade() -> None:
    for table in ("product_errors", "embeddings", "tags", "tagging_runs", "model_versions", "products"):
        op.drop_table(table)
