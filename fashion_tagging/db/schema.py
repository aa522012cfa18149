"""Catalog database schema (SQLAlchemy Core). Alembic migrations create exactly these tables.

One row per (product, model version) in ``tags`` and ``embeddings``: that primary key is what
makes every write idempotent (COPY into a temp table, then INSERT ... ON CONFLICT DO UPDATE).
Both are LIST-partitioned by model version: one partition pair per version, created by
``repository.ensure_version_partitions``; their review and vector indexes are built when the
version has tagged the whole catalog (``repository.build_version_indexes``), not row by row
during its backfill, and a retired version is dropped as whole tables.
"""

from __future__ import annotations

import sqlalchemy as sa
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import JSONB

from fashion_tagging.settings import PRODUCT_EMBEDDING_DIM

metadata = sa.MetaData()
product_change_seq = sa.Sequence("product_change_seq", metadata=metadata)

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
    # Renumbered on insert and on every content change: tagging work is "change_seq above what a
    # version has tagged", planned as ranges of it (see repository.plan_ranges).
    sa.Column("change_seq", sa.BigInteger, server_default=sa.text("nextval('product_change_seq')"), nullable=False),
    # Set by a manifest row with ``deleted`` true (a tombstone, ``source`` = that manifest): the
    # product's tags and embeddings are dropped, readers skip it, it is no tagging work (migration 0004).
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
)
sa.Index("ix_products_ingested_at", products.c.ingested_at)
sa.Index("ix_products_change_seq", products.c.change_seq, unique=True)

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
    # registered -> rejected | promoted (gate passed, backfilling) -> serving (covers the catalog) -> retired
    sa.Column("status", sa.Text, nullable=False, server_default="registered"),
    sa.Column("gate_reason", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column("promoted_at", sa.DateTime(timezone=True)),
    sa.Column("serving_since", sa.DateTime(timezone=True)),
    sa.Column("tagged_seq", sa.BigInteger, nullable=False, server_default="0"),  # every change_seq <= it is done
    sa.Column("planned_seq", sa.BigInteger, nullable=False, server_default="0"),  # ranges planned up to here
)
# At most one serving and one promoted (backfilling) model, enforced by the database.
for _status in ("serving", "promoted"):
    sa.Index(f"uq_model_versions_one_{_status}", model_versions.c.status, unique=True,
             postgresql_where=model_versions.c.status == _status)

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

# No foreign keys on the partitioned tables: per-row FK triggers would cost a bulk backfill a
# third of its speed; rows only ever come from tag_batch, which reads them from ``products``,
# and a version's rows live and die with its partition.
tags = sa.Table(
    "tags",
    metadata,
    sa.Column("product_id", sa.BigInteger, primary_key=True),
    sa.Column("model_version", sa.Text, primary_key=True),
    sa.Column("article_type", sa.Text, nullable=False),
    sa.Column("article_type_confidence", sa.Float, nullable=False),
    # {"articleType": {"label": "Tshirts", "confidence": 0.98, "top_k": [["Tshirts", 0.98], ...]}, ...}
    sa.Column("heads", JSONB, nullable=False),
    sa.Column("has_image", sa.Boolean, nullable=False),
    sa.Column("has_text", sa.Boolean, nullable=False),
    sa.Column("run_id", sa.Text),
    sa.Column("tagged_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    # auto_accepted | needs_review: the articleType tag's routing by the model's calibrated threshold
    # (each head's own is ``heads -> head -> status``); NULL before migration 0005 and without calibration.
    sa.Column("review_status", sa.Text),
    postgresql_partition_by="LIST (model_version)",
)

# The backbone's 1280-d image embedding is not stored: nothing read it, and it was 5 KB of the
# 8 KB a product cost per version. The fused 256-d embedding serves similar-product search.
embeddings = sa.Table(
    "embeddings",
    metadata,
    sa.Column("product_id", sa.BigInteger, primary_key=True),
    sa.Column("model_version", sa.Text, primary_key=True),
    sa.Column("product_embedding", Vector(PRODUCT_EMBEDDING_DIM), nullable=False),  # L2-normalised fused
    sa.Column("run_id", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    postgresql_partition_by="LIST (model_version)",
)

# Products per (version, predicted articleType, confidence bin), kept up to date by every tag
# write in the same transaction: the dashboard reads these few rows instead of scanning tags.
tag_stats = sa.Table(
    "tag_stats",
    metadata,
    sa.Column("model_version", sa.Text, primary_key=True),
    sa.Column("article_type", sa.Text, primary_key=True),
    sa.Column("confidence_bin", sa.SmallInteger, primary_key=True),  # 1..CONFIDENCE_BINS
    sa.Column("products", sa.BigInteger, nullable=False, server_default="0"),
)

# What one tagging run wrote, per (version, predicted articleType, confidence bin): kept by every tag
# write in the same transaction (a committed chunk counts once), read by the run's drift check.
run_tag_stats = sa.Table(
    "run_tag_stats",
    metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("model_version", sa.Text, primary_key=True),
    sa.Column("article_type", sa.Text, primary_key=True),
    sa.Column("confidence_bin", sa.SmallInteger, primary_key=True),  # 1..CONFIDENCE_BINS
    sa.Column("products", sa.BigInteger, nullable=False, server_default="0"),
)

# Drift of one run's tags from the model's training distribution (drift.py), one row per (run, version).
tagging_drift = sa.Table(
    "tagging_drift",
    metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("model_version", sa.Text, primary_key=True),
    sa.Column("products", sa.Integer, nullable=False),
    sa.Column("category_js", sa.Float),  # Jensen-Shannon divergence (base 2) of predicted articleType shares
    sa.Column("category_psi", sa.Float),  # population stability index of the same
    sa.Column("confidence_js", sa.Float),  # the same two for the articleType confidence histogram
    sa.Column("confidence_psi", sa.Float),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("alert", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("details", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("measured_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
)
sa.Index("ix_tagging_drift_measured_at", tagging_drift.c.measured_at)

# The work table: one row per planned range of products.change_seq for one version. The DAG's
# mapped tasks carry only batch ids; a task resumes a range from ``done_seq`` after a crash, and
# the next run re-issues ranges left planned or failed before planning new ones.
tagging_batches = sa.Table(
    "tagging_batches",
    metadata,
    sa.Column("batch_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("seq_from", sa.BigInteger, nullable=False),  # exclusive
    sa.Column("seq_to", sa.BigInteger, nullable=False),  # inclusive
    sa.Column("done_seq", sa.BigInteger, nullable=False),
    sa.Column("products", sa.Integer, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default="planned"),  # planned|done|failed|superseded
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tagged", sa.Integer, nullable=False, server_default="0"),
    sa.Column("text_only", sa.Integer, nullable=False, server_default="0"),
    sa.Column("errors", sa.Integer, nullable=False, server_default="0"),
    sa.Column("seconds", sa.Float, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.UniqueConstraint("model_version", "seq_from", name="uq_tagging_batches_range"),
)
sa.Index("ix_tagging_batches_open", tagging_batches.c.model_version, tagging_batches.c.seq_from,
         postgresql_where=tagging_batches.c.status != "done")
sa.Index("ix_tagging_batches_run", tagging_batches.c.run_id)

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

# The human review loop (fashion_tagging.review, migration 0006). A reviewed value belongs to the
# product and head, not to a model version: re-tagging by any version never replaces it, readers
# show it instead of the model's label, and the next retrain's snapshot uses it as the label.
product_reviews = sa.Table(
    "product_reviews",
    metadata,
    sa.Column("product_id", sa.BigInteger, primary_key=True),
    sa.Column("head", sa.Text, primary_key=True),
    sa.Column("label", sa.Text, nullable=False),  # the reviewed value
    sa.Column("predicted_label", sa.Text),  # the model's label the reviewer saw (NULL: untagged)
    sa.Column("model_version", sa.Text),  # whose tag that was
    sa.Column("corrected", sa.Boolean, nullable=False),  # label differs from predicted_label
    sa.Column("reviewed_by", sa.Text, nullable=False),
    sa.Column("reviewed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
)

# Append-only: one row per change of a reviewed value (who, when, before, after). A repeated
# submission of the value already stored changes nothing and adds no row.
review_audit = sa.Table(
    "review_audit",
    metadata,
    sa.Column("audit_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("product_id", sa.BigInteger, nullable=False),
    sa.Column("head", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),  # accepted | corrected
    sa.Column("before_label", sa.Text),  # what readers saw: the earlier reviewed value, else the model's label
    sa.Column("after_label", sa.Text, nullable=False),
    sa.Column("model_version", sa.Text),
    sa.Column("reviewer", sa.Text, nullable=False),
    sa.Column("reviewed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
)
sa.Index("ix_review_audit_product", review_audit.c.product_id, review_audit.c.audit_id)
