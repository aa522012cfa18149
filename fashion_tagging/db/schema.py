"""Catalog database schema (SQLAlchemy Core). Alembic migrations create exactly these tables.

One row per (product, model version) in ``tags`` and ``embeddings``: that primary key is what
makes every write idempotent (COPY into a temp table, then INSERT ... ON CONFLICT DO UPDATE).
"""

from __future__ import annotations

import sqlalchemy as sa
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import JSONB

from fashion_tagging.settings import IMAGE_EMBEDDING_DIM, PRODUCT_EMBEDDING_DIM

metadata = sa.MetaData()

products = sa.Table(
    "products",
    metadata,
    sa.Column("product_id", sa.BigInteger, primary_key=True),
    sa.Column("gender", sa.Text),
    sa.Column("master_category", sa.Text),
    sa.Column("sub_category", sa.Text),
    sa.Column("article_type", sa.Text),
    sa.Column("base_colour", sa.Text),
    sa.Column("season", sa.Text),
    sa.Column("year", sa.Integer),
    sa.Column("usage", sa.Text),
    sa.Column("title", sa.Text),
    sa.Column("brand", sa.Text),
    sa.Column("description", sa.Text),
    sa.Column("image_key", sa.Text),  # object-store key of the product photo, NULL if none
    sa.Column("split", sa.Text),  # train / val / test for the labelled reference catalog, NULL for new rows
    sa.Column("source", sa.Text),  # manifest object the row came from
    sa.Column("ingested_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
)
sa.Index("ix_products_ingested_at", products.c.ingested_at)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("version", sa.Text, primary_key=True),
    sa.Column("backbone", sa.Text, nullable=False),
    sa.Column("image_size", sa.Integer, nullable=False),
    sa.Column("fine_tuned", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("artifact_uri", sa.Text, nullable=False),
    sa.Column("metrics", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),  # evaluation report
    sa.Column("article_type_accuracy", sa.Float),  # fused test accuracy of the primary head
    sa.Column("status", sa.Text, nullable=False, server_default="registered"),  # registered|production|rejected|retired
    sa.Column("gate_reason", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column("promoted_at", sa.DateTime(timezone=True)),
)
# At most one production model, enforced by the database.
sa.Index(
    "uq_model_versions_one_production",
    model_versions.c.status,
    unique=True,
    postgresql_where=model_versions.c.status == "production",
)

tagging_runs = sa.Table(
    "tagging_runs",
    metadata,
    sa.Column("run_id", sa.Text, primary_key=True),  # Airflow run id, or a CLI-generated one
    sa.Column("model_version", sa.Text, sa.ForeignKey("model_versions.version"), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.Text, nullable=False, server_default="running"),  # running|success|failed
    sa.Column("products_seen", sa.Integer, nullable=False, server_default="0"),
    sa.Column("products_tagged", sa.Integer, nullable=False, server_default="0"),
    sa.Column("errors", sa.Integer, nullable=False, server_default="0"),
    sa.Column("batches", sa.Integer, nullable=False, server_default="0"),
    sa.Column("seconds", sa.Float),
    sa.Column("products_per_second", sa.Float),
    sa.Column("details", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
)

tags = sa.Table(
    "tags",
    metadata,
    sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.product_id"), primary_key=True),
    sa.Column("model_version", sa.Text, sa.ForeignKey("model_versions.version"), primary_key=True),
    sa.Column("article_type", sa.Text, nullable=False),
    sa.Column("article_type_confidence", sa.Float, nullable=False),
    # {"articleType": {"label": "Tshirts", "confidence": 0.98, "top_k": [["Tshirts", 0.98], ...]}, ...}
    sa.Column("heads", JSONB, nullable=False),
    sa.Column("has_image", sa.Boolean, nullable=False),
    sa.Column("has_text", sa.Boolean, nullable=False),
    sa.Column("run_id", sa.Text),
    sa.Column("tagged_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
)
sa.Index("ix_tags_model_article_type", tags.c.model_version, tags.c.article_type)
sa.Index("ix_tags_model_confidence", tags.c.model_version, tags.c.article_type_confidence)

embeddings = sa.Table(
    "embeddings",
    metadata,
    sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.product_id"), primary_key=True),
    sa.Column("model_version", sa.Text, sa.ForeignKey("model_versions.version"), primary_key=True),
    sa.Column("image_embedding", Vector(IMAGE_EMBEDDING_DIM)),  # NULL when the product has no image
    sa.Column("product_embedding", Vector(PRODUCT_EMBEDDING_DIM), nullable=False),  # L2-normalised fused
    sa.Column("run_id", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
)
sa.Index(
    "ix_embeddings_product_embedding_hnsw",
    embeddings.c.product_embedding,
    postgresql_using="hnsw",
    postgresql_with={"m": 16, "ef_construction": 64},
    postgresql_ops={"product_embedding": "vector_cosine_ops"},
)

product_errors = sa.Table(
    "product_errors",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("product_id", sa.BigInteger),  # NULL when the row was too broken to have an id
    sa.Column("stage", sa.Text, nullable=False),  # manifest|image|inference|write
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("source", sa.Text),  # manifest key / image key / row number
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    # A retried batch records the same error once.
    sa.UniqueConstraint("run_id", "product_id", "stage", "source", name="uq_product_errors_once",
                        postgresql_nulls_not_distinct=True),
)

# Ledger of catalog manifests already loaded into ``products``: a manifest is read again only when
# its fingerprint (ETag / size+mtime) changes, so nightly runs neither re-read nor re-report old files.
catalog_manifests = sa.Table(
    "catalog_manifests",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("products", sa.Integer, nullable=False, server_default="0"),
    sa.Column("errors", sa.Integer, nullable=False, server_default="0"),
    sa.Column("run_id", sa.Text),
    sa.Column("loaded_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
)
