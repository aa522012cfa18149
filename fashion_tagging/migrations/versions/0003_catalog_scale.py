"""Catalog scale: change sequence on products, per-version partitions, batch work table, tag aggregates.

* ``products.change_seq``: a sequence number given on insert and on every change (a trigger
  renumbers rows changed by any writer). Work
  for a model version is "products whose change_seq lies above the version's ``tagged_seq``": a
  quiet night is one index probe, and work is planned as ranges of it, never as id lists.
* ``tags`` / ``embeddings`` become LIST-partitioned by ``model_version``: a backfill loads a
  partition that has only its primary key, the vector and review indexes are built after the
  load (pgvector's bulk-loading advice), and a retired version is dropped as whole tables.
  The unread 1280-d ``image_embedding`` column is gone (5 KB a product a version).
* ``model_versions``: ``production`` splits into ``promoted`` (gate passed, backfilling) and
  ``serving`` (covers the catalog; what every reader uses). ``tagged_seq`` / ``planned_seq``
  track how far each version has got.
* ``tagging_batches``: one row per planned range (the work descriptors' home), its outcome and error.
* ``tag_stats``: per-version counts by predicted articleType and confidence bin, kept by every
  write, so the dashboard never scans tags.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PRODUCT_EMBEDDING_DIM = 256  # frozen here: a migration must not change when settings do
CONFIDENCE_BINS = 20


def _partition(table: str, version: str) -> str:
    return f"{table}_v_{hashlib.sha1(version.encode()).hexdigest()[:16]}"


def upgrade() -> None:
    op.execute("CREATE SEQUENCE product_change_seq")
    op.add_column("products", sa.Column("change_seq", sa.BigInteger))
    op.execute("UPDATE products SET change_seq = s.seq FROM (SELECT product_id, nextval('product_change_seq') AS seq "
               "FROM (SELECT product_id FROM products ORDER BY product_id) o) s WHERE s.product_id = products.product_id")
    op.alter_column("products", "change_seq", nullable=False,
                    server_default=sa.text("nextval('product_change_seq')"))
    op.execute("ALTER SEQUENCE product_change_seq OWNED BY products.change_seq")
    op.create_index("ix_products_change_seq", "products", ["change_seq"], unique=True)
    # Any other writer that changes a product (a catalog team's SQL fix) renumbers it too, so it
    # is re-tagged; a write that sets change_seq itself (upsert_products, requeue) is left alone.
    op.execute("""
        CREATE FUNCTION products_renumber_on_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.change_seq = OLD.change_seq AND NEW IS DISTINCT FROM OLD THEN
                NEW.change_seq := nextval('product_change_seq');
            END IF;
            RETURN NEW;
        END $$""")
    op.execute("CREATE TRIGGER products_renumber_on_change BEFORE UPDATE ON products "
               "FOR EACH ROW EXECUTE FUNCTION products_renumber_on_change()")

    op.add_column("model_versions", sa.Column("tagged_seq", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("model_versions", sa.Column("planned_seq", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("model_versions", sa.Column("serving_since", sa.DateTime(timezone=True)))
    op.drop_index("uq_model_versions_one_production", "model_versions")
    # The old production model tagged the catalog already: it serves, and its tags count as covering it.
    op.execute("UPDATE model_versions SET status = 'serving', serving_since = coalesce(promoted_at, now()), "
               "tagged_seq = (SELECT coalesce(max(change_seq), 0) FROM products), "
               "planned_seq = (SELECT coalesce(max(change_seq), 0) FROM products) WHERE status = 'production'")
    op.create_index("uq_model_versions_one_serving", "model_versions", ["status"], unique=True,
                    postgresql_where=sa.text("status = 'serving'"))
    op.create_index("uq_model_versions_one_promoted", "model_versions", ["status"], unique=True,
                    postgresql_where=sa.text("status = 'promoted'"))

    bind = op.get_bind()
    versions = bind.execute(sa.text("SELECT DISTINCT model_version FROM tags UNION "
                                    "SELECT DISTINCT model_version FROM embeddings")).scalars().all()
    op.rename_table("tags", "tags_unpartitioned")
    op.rename_table("embeddings", "embeddings_unpartitioned")
    for index in ("ix_tags_model_article_type", "ix_tags_model_confidence"):
        op.drop_index(index, "tags_unpartitioned")
    op.drop_index("ix_embeddings_product_embedding_hnsw", "embeddings_unpartitioned")
    op.execute("ALTER TABLE tags_unpartitioned RENAME CONSTRAINT tags_pkey TO tags_unpartitioned_pkey")
    op.execute("ALTER TABLE embeddings_unpartitioned RENAME CONSTRAINT embeddings_pkey TO embeddings_unpartitioned_pkey")
    op.create_table(
        "tags",
        sa.Column("product_id", sa.BigInteger, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("article_type", sa.Text, nullable=False),
        sa.Column("article_type_confidence", sa.Float, nullable=False),
        sa.Column("heads", JSONB, nullable=False),
        sa.Column("has_image", sa.Boolean, nullable=False),
        sa.Column("has_text", sa.Boolean, nullable=False),
        sa.Column("run_id", sa.Text),
        sa.Column("tagged_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("product_id", "model_version", name="tags_pkey"),
        postgresql_partition_by="LIST (model_version)",
    )
    op.create_table(
        "embeddings",
        sa.Column("product_id", sa.BigInteger, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("product_embedding", Vector(PRODUCT_EMBEDDING_DIM), nullable=False),
        sa.Column("run_id", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("product_id", "model_version", name="embeddings_pkey"),
        postgresql_partition_by="LIST (model_version)",
    )
    op.create_table(
        "tag_stats",
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("article_type", sa.Text, nullable=False),
        sa.Column("confidence_bin", sa.SmallInteger, nullable=False),
        sa.Column("products", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("model_version", "article_type", "confidence_bin", name="tag_stats_pkey"),
    )
    for version in versions:
        literal = version.replace("'", "''")
        for table in ("tags", "embeddings"):
            op.execute(f"CREATE TABLE {_partition(table, version)} PARTITION OF {table} FOR VALUES IN ('{literal}')")
        op.execute(f"INSERT INTO tags SELECT product_id, model_version, article_type, article_type_confidence, heads, "
                   f"has_image, has_text, run_id, tagged_at FROM tags_unpartitioned WHERE model_version = '{literal}'")
        op.execute(f"INSERT INTO embeddings SELECT product_id, model_version, product_embedding, run_id, created_at "
                   f"FROM embeddings_unpartitioned WHERE model_version = '{literal}'")
        op.execute(f"CREATE INDEX {_partition('tags', version)}_confidence ON {_partition('tags', version)} "
                   f"(article_type_confidence, product_id)")
        op.execute(f"CREATE INDEX {_partition('embeddings', version)}_hnsw ON {_partition('embeddings', version)} "
                   f"USING hnsw (product_embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)")
        op.execute(f"INSERT INTO tag_stats (model_version, article_type, confidence_bin, products) "
                   f"SELECT model_version, article_type, "
                   f"LEAST(width_bucket(article_type_confidence, 0.0, 1.0, {CONFIDENCE_BINS}), {CONFIDENCE_BINS}), "
                   f"count(*) FROM tags WHERE model_version = '{literal}' GROUP BY 1, 2, 3")
    op.drop_table("tags_unpartitioned")
    op.drop_table("embeddings_unpartitioned")

    op.create_table(
        "tagging_batches",
        sa.Column("batch_id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("seq_from", sa.BigInteger, nullable=False),  # exclusive
        sa.Column("seq_to", sa.BigInteger, nullable=False),  # inclusive
        sa.Column("done_seq", sa.BigInteger, nullable=False),  # progress inside the range (resumable)
        sa.Column("products", sa.Integer, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="planned"),  # planned|done|failed
        sa.Column("run_id", sa.Text, nullable=False),  # the run that last planned or ran it
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("tagged", sa.Integer, nullable=False, server_default="0"),
        sa.Column("text_only", sa.Integer, nullable=False, server_default="0"),
        sa.Column("errors", sa.Integer, nullable=False, server_default="0"),
        sa.Column("seconds", sa.Float, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("model_version", "seq_from", name="uq_tagging_batches_range"),
    )
    op.create_index("ix_tagging_batches_open", "tagging_batches", ["model_version", "seq_from"],
                    postgresql_where=sa.text("status <> 'done'"))
    op.create_index("ix_tagging_batches_run", "tagging_batches", ["run_id"])


def downgrade() -> None:
    raise NotImplementedError("0003 reshapes tags and embeddings into partitions: restore a backup to go back")
