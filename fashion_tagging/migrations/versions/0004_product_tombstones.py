"""Product tombstones: ``products.deleted_at``.

A manifest row with ``deleted`` true removes a product from the catalog: the row stays as a
tombstone (``deleted_at`` set, ``source`` = the manifest that deleted it), its tags and embeddings
are dropped, and readers skip it. A deleted product is no tagging work: the renumbering trigger of
0003 now leaves a deleted row's ``change_seq`` alone; a manifest listing the product again
restores it with a new ``change_seq``, so it is tagged again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("products", sa.Column("deleted_at", sa.DateTime(timezone=True)))
    op.execute("""
        CREATE OR REPLACE FUNCTION products_renumber_on_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.change_seq = OLD.change_seq AND NEW IS DISTINCT FROM OLD AND NEW.deleted_at IS NULL THEN
                NEW.change_seq := nextval('product_change_seq');
            END IF;
            RETURN NEW;
        END $$""")


def downgrade() -> None:
    op.execute("""
        CREATE OR REPLACE FUNCTION products_renumber_on_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.change_seq = OLD.change_seq AND NEW IS DISTINCT FROM OLD THEN
                NEW.change_seq := nextval('product_change_seq');
            END IF;
            RETURN NEW;
        END $$""")
    op.drop_column("products", "deleted_at")
