"""Review routing and drift: ``tags.review_status``, ``run_tag_stats``, ``tagging_drift``.

* ``tags.review_status``: ``auto_accepted`` or ``needs_review``, the articleType tag's routing by
  the model's calibrated threshold (calibration.py); each head's own status is in ``heads``
  (``"status"``). NULL on rows written before this revision and by models without calibration.
* ``run_tag_stats``: products per (run, version, predicted articleType, confidence bin), kept by
  every tag write in the same transaction (like ``tag_stats``, but per run): what a run tagged,
  without scanning ``tags``.
* ``tagging_drift``: per run and version, the divergence of what it tagged from the model's
  training distribution (drift.py), and whether it alerted.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tags", sa.Column("review_status", sa.Text))
    op.create_table(
        "run_tag_stats",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("article_type", sa.Text, nullable=False),
        sa.Column("confidence_bin", sa.SmallInteger, nullable=False),
        sa.Column("products", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("run_id", "model_version", "article_type", "confidence_bin",
                                name="run_tag_stats_pkey"),
    )
    op.create_table(
        "tagging_drift",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("products", sa.Integer, nullable=False),
        sa.Column("category_js", sa.Float),
        sa.Column("category_psi", sa.Float),
        sa.Column("confidence_js", sa.Float),
        sa.Column("confidence_psi", sa.Float),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("alert", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("details", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("measured_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "model_version", name="tagging_drift_pkey"),
    )
    op.create_index("ix_tagging_drift_measured_at", "tagging_drift", ["measured_at"])


def downgrade() -> None:
    op.drop_index("ix_tagging_drift_measured_at", table_name="tagging_drift")
    op.drop_table("tagging_drift")
    op.drop_table("run_tag_stats")
    op.drop_column("tags", "review_status")
