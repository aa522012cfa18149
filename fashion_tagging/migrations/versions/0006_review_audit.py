"""Human review loop: ``product_reviews`` (the reviewed value per product and head) and ``review_audit``.

A reviewer of the Catalog tagging page accepts or corrects a product's tags. The reviewed value
is kept per (product, head), independent of model versions, so re-tagging never replaces it;
readers show it in place of the model's label and the retrain's snapshot trains on it.
``review_audit`` records every change: who, when, the value before and after.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "product_reviews",
        sa.Column("product_id", sa.BigInteger, primary_key=True),
        sa.Column("head", sa.Text, primary_key=True),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("predicted_label", sa.Text),
        sa.Column("model_version", sa.Text),
        sa.Column("corrected", sa.Boolean, nullable=False),
        sa.Column("reviewed_by", sa.Text, nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "review_audit",
        sa.Column("audit_id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("product_id", sa.BigInteger, nullable=False),
        sa.Column("head", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("before_label", sa.Text),
        sa.Column("after_label", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text),
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_review_audit_product", "review_audit", ["product_id", "audit_id"])


def downgrade() -> None:
    op.drop_index("ix_review_audit_product", "review_audit")
    op.drop_table("review_audit")
    op.drop_table("product_reviews")
