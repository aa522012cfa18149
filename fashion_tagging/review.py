"""The human review loop: a queue of tags to check, reviewers' accepts and corrections, their audit.

A reviewer accepts or corrects a product's tags, head by head. The reviewed value is stored per
(product, head) in ``product_reviews``, apart from any model version: re-tagging, by the same or
a newer model, never replaces it, and every reader (the page, similar products, the CLI's ``tags``)
shows it in place of the model's label. Every change is appended to ``review_audit`` (who, when,
before, after); submitting the value already stored changes nothing, so a retried request is
harmless. The retrain's snapshot uses reviewed values as labels (:func:`apply_review_labels`) and
the trained model reports how many it used.

Nothing here knows about Airflow: the page's plugin checks the reviewer's rights and passes the
reviewer's name in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from fashion_tagging.db import repository, schema
from fashion_tagging.settings import HEADS, PRIMARY_HEAD

QUEUE_LIMIT = 12
AUDIT_LIMIT = 20
DESCRIPTION_CHARS = 400
MAX_LABEL_LENGTH = 100
MAX_REVIEWER_LENGTH = 256
# The routing status a tag carries (migration 0005): ``heads -> <head> -> 'status'`` per head and
# ``tags.review_status`` for the primary head. A row written before routing existed, or by a model
# without calibration, has neither and counts as needing review.
NEEDS_REVIEW, AUTO_ACCEPTED = "needs_review", "auto_accepted"
ACCEPTED, CORRECTED = "accepted", "corrected"  # review_audit.action
REVIEW_LABELS_KEY = "review_labels"  # in the snapshot summary, the model's config.json and its registry metrics


class ReviewError(ValueError):
    """A review request that cannot be applied as sent (unknown head, empty label...)."""


def _head_status_sql(head_param: str = ":head") -> str:
    """A tag's routing status of one head; ``tags.review_status`` is the primary head's."""
    return (f"coalesce(t.heads -> {head_param} ->> 'status', "
            f"CASE WHEN {head_param} = '{PRIMARY_HEAD}' THEN t.review_status END, '{NEEDS_REVIEW}')")


def reviewed_label_sql(product_column: str, head: str = PRIMARY_HEAD) -> str:
    """SQL for a product's reviewed value of ``head`` (NULL if none); ``head`` must be one of HEADS."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}")
    return f"(SELECT r.label FROM product_reviews r WHERE r.product_id = {product_column} AND r.head = '{head}')"


# --- the queue -----------------------------------------------------------------------------------


def review_queue(conn: sa.Connection, version: str | None, *, head: str = PRIMARY_HEAD, category: str | None = None,
                 limit: int = QUEUE_LIMIT) -> dict:
    """Products whose ``head`` nobody has reviewed yet: needs-review first, then lowest confidence first.

    ``category`` keeps products whose articleType (reviewed value, else the model's) is that label.
    Returns ``{"head", "category", "pending", "items"}``; ``pending`` counts the needs-review
    products of the filter, ``items`` are :func:`product_tags` entries in queue order.
    """
    if head not in HEADS:
        raise ReviewError(f"unknown head {head!r}: one of {', '.join(HEADS)}")
    category = (category or "").strip() or None
    if version is None:
        return {"head": head, "category": category, "pending": 0, "items": []}
    where = f"""
        FROM tags t JOIN products p ON p.product_id = t.product_id
        WHERE t.model_version = :version AND p.deleted_at IS NULL AND t.heads ? :head
          AND NOT EXISTS (SELECT 1 FROM product_reviews r WHERE r.product_id = t.product_id AND r.head = :head)
          AND (CAST(:category AS text) IS NULL
               OR coalesce({reviewed_label_sql('t.product_id')}, t.article_type) = :category)
    """
    params = {"version": version, "head": head, "category": category}
    ids = conn.execute(sa.text(f"""
        SELECT t.product_id {where}
        ORDER BY ({_head_status_sql()} = '{NEEDS_REVIEW}') DESC,
                 CAST(t.heads -> :head ->> 'confidence' AS double precision), t.product_id
        LIMIT :limit
    """), {**params, "limit": int(limit)}).scalars().all()
    pending = conn.execute(sa.text(f"SELECT count(*) {where} AND {_head_status_sql()} = '{NEEDS_REVIEW}'"),
                           params).scalar_one()
    return {"head": head, "category": category, "pending": int(pending), "items": product_tags(conn, ids, version)}


def product_tags(conn: sa.Connection, product_ids: Sequence[int], version: str | None) -> list[dict]:
    """Products with their tags as readers see them, in the order of ``product_ids`` (deleted ones left out).

    Each entry: ``product_id``, ``title``, ``brand``, ``description`` (plain text, shortened),
    ``has_image`` and ``tags``, one dict per head the model tagged or a reviewer set: ``label``
    (the reviewed value, else the model's), ``predicted``, ``confidence``, ``status``
    (reviewed / needs_review / auto_accepted), ``top_k``, and ``reviewed_by`` / ``reviewed_at``.
    """
    from fashion_tagging.catalog import clean_html

    ids = [int(i) for i in product_ids]
    if not ids:
        return []
    rows = conn.execute(sa.text("""
        SELECT p.product_id, p.title, p.brand, p.description, p.image_key, t.heads, t.review_status
        FROM products p LEFT JOIN tags t ON t.product_id = p.product_id AND t.model_version = :version
        WHERE p.product_id = ANY(:ids) AND p.deleted_at IS NULL
    """), {"ids": ids, "version": version}).mappings().all()
    reviews: dict[int, dict[str, Mapping]] = {}
    for review in conn.execute(sa.select(schema.product_reviews)
                               .where(schema.product_reviews.c.product_id.in_(ids))).mappings():
        reviews.setdefault(review["product_id"], {})[review["head"]] = review
    by_id = {}
    for row in rows:
        predicted = row["heads"] or {}
        reviewed = reviews.get(row["product_id"], {})
        tags = []
        for head in HEADS:
            if head not in predicted and head not in reviewed:
                continue
            model = predicted.get(head) or {}
            review = reviewed.get(head)
            routed = model.get("status") or (row["review_status"] if head == PRIMARY_HEAD else None)
            status = "reviewed" if review else (routed or NEEDS_REVIEW)
            tags.append({"head": head, "label": review["label"] if review else model.get("label"),
                         "predicted": model.get("label"), "confidence": model.get("confidence"), "status": status,
                         "top_k": [label for label, _ in model.get("top_k") or []],
                         "reviewed_by": review["reviewed_by"] if review else None,
                         "reviewed_at": review["reviewed_at"] if review else None})
        description = clean_html(row["description"])
        if len(description) > DESCRIPTION_CHARS:
            description = description[:DESCRIPTION_CHARS].rsplit(" ", 1)[0] + " …"
        by_id[row["product_id"]] = {"product_id": row["product_id"], "title": row["title"], "brand": row["brand"],
                                    "description": description, "has_image": bool(row["image_key"]), "tags": tags}
    return [by_id[i] for i in ids if i in by_id]


def queue_categories(conn: sa.Connection, version: str | None) -> list[str]:
    """The articleType labels the version predicted (from ``tag_stats``: no scan of tags), for the filter."""
    if version is None:
        return []
    return conn.execute(sa.text("SELECT DISTINCT article_type FROM tag_stats WHERE model_version = :version "
                                "AND products > 0 ORDER BY 1"), {"version": version}).scalars().all()


def parse_labels_json(data: bytes | None) -> dict[str, list[str]]:
    """A model artifact's ``labels.json`` (head -> its classes); {} when missing or unreadable."""
    try:
        labels = json.loads(data) if data else {}
    except ValueError:
        return {}
    return {head: [str(label) for label in values] for head, values in labels.items()
            if head in HEADS and isinstance(values, list)} if isinstance(labels, dict) else {}


def label_choices(model_labels: Mapping[str, Sequence[str]], items: Sequence[dict]) -> dict[str, list[str]]:
    """Suggestions for each head's correction input: the model's classes plus the labels shown in ``items``."""
    choices: dict[str, set[str]] = {head: set(labels) for head, labels in model_labels.items()}
    for item in items:
        for tag in item["tags"]:
            choices.setdefault(tag["head"], set()).update(
                label for label in (tag["label"], tag["predicted"], *tag["top_k"]) if label)
    return {head: sorted(labels) for head, labels in choices.items()}


def recent_reviews(conn: sa.Connection, *, limit: int = AUDIT_LIMIT, product_id: int | None = None) -> list[dict]:
    """The newest audit rows (who, when, before, after), newest first; one product's with ``product_id``."""
    audit = schema.review_audit
    query = sa.select(audit).order_by(audit.c.audit_id.desc()).limit(limit)
    if product_id is not None:
        query = query.where(audit.c.product_id == int(product_id))
    return [dict(row) for row in conn.execute(query).mappings()]


# --- writes ----------------------------------------------------------------------------------------


def submit_review(conn: sa.Connection, product_id: int, labels: Mapping[str, str], reviewer: str, *,
                  version: str | None) -> dict:
    """Store a reviewer's values of a product's heads; returns what changed and what was already so.

    ``labels``: head -> the value the reviewer keeps (the model's label: accepted; another one:
    corrected). ``version``: the model whose tags the reviewer saw (its label is the "predicted"
    one). One audit row per head whose stored value changes; a head already holding that value is
    left alone (no audit row), so submitting twice is the same as once. Runs in the caller's
    transaction; concurrent reviews of one product are serialised.
    """
    reviewer = (reviewer or "").strip()
    if not reviewer or len(reviewer) > MAX_REVIEWER_LENGTH:
        raise ReviewError("a review needs the reviewer's name")
    cleaned = _clean_labels(labels)
    product_id = int(product_id)
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended('ft-review:' || :id, 0))"),
                 {"id": str(product_id)})
    alive = conn.execute(sa.text("SELECT deleted_at IS NULL FROM products WHERE product_id = :id"),
                         {"id": product_id}).scalar()
    if not alive:
        raise repository.NotFound(f"no product {product_id} in the catalog")
    predicted_heads = conn.execute(sa.text("SELECT heads FROM tags WHERE product_id = :id AND model_version = :v"),
                                   {"id": product_id, "v": version}).scalar() or {}
    reviews = schema.product_reviews
    stored = {row["head"]: row["label"] for row in conn.execute(
        sa.select(reviews.c.head, reviews.c.label).where(reviews.c.product_id == product_id)).mappings()}
    changed, unchanged = [], []
    for head, label in cleaned.items():
        if stored.get(head) == label:
            unchanged.append(head)
            continue
        predicted = (predicted_heads.get(head) or {}).get("label")
        action = ACCEPTED if label == predicted else CORRECTED
        before = stored.get(head, predicted)
        values = {"product_id": product_id, "head": head, "label": label, "predicted_label": predicted,
                  "model_version": version if predicted is not None else None,
                  "corrected": action == CORRECTED, "reviewed_by": reviewer}
        statement = pg_insert(reviews).values(**values)
        conn.execute(statement.on_conflict_do_update(
            index_elements=["product_id", "head"],
            set_={**{k: statement.excluded[k] for k in values if k not in ("product_id", "head")},
                  "reviewed_at": sa.func.now()}))
        conn.execute(schema.review_audit.insert().values(
            product_id=product_id, head=head, action=action, before_label=before, after_label=label,
            model_version=values["model_version"], reviewer=reviewer))
        changed.append({"head": head, "action": action, "before": before, "after": label})
    return {"product_id": product_id, "changed": changed, "unchanged": unchanged}


def _clean_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(labels, Mapping) or not labels:
        raise ReviewError("a review names at least one head and its label")
    cleaned = {}
    for head in sorted(labels):
        if head not in HEADS:
            raise ReviewError(f"unknown head {head!r}: one of {', '.join(HEADS)}")
        label = labels[head]
        label = label.strip() if isinstance(label, str) else ""
        if not label or len(label) > MAX_LABEL_LENGTH:
            raise ReviewError(f"{head}: a label of 1 to {MAX_LABEL_LENGTH} characters")
        cleaned[head] = label
    return cleaned


# --- training labels ---------------------------------------------------------------------------------


def reviewed_products_clause(product_id_column):
    """A WHERE clause part: the product has a reviewed value (the snapshot adds such products)."""
    return product_id_column.in_(sa.select(schema.product_reviews.c.product_id))


def apply_review_labels(conn: sa.Connection, frame):
    """Reviewed values as the labels of a training snapshot (Kaggle column names); returns (frame, summary).

    A reviewed value replaces the catalog's label of that head, in whichever split the product is;
    a reviewed product without a split (a new arrival) joins ``train``. Deleted products are not
    in ``frame`` and their reviews are not used. The summary counts the labels used, how many of
    them were corrections of the model, how many changed the catalog's label, and the products.
    """
    reviews = conn.execute(sa.text("""
        SELECT r.product_id, r.head, r.label, r.corrected FROM product_reviews r
        JOIN products p ON p.product_id = r.product_id AND p.deleted_at IS NULL
        ORDER BY r.product_id, r.head
    """)).mappings().all()
    frame = frame.copy()
    position = {int(pid): i for i, pid in enumerate(frame["id"])}
    summary = {"labels": 0, "corrections": 0, "changed_labels": 0, "products": 0, "added_to_train": 0,
               "by_head": {}}
    touched: set[int] = set()
    for review in reviews:
        row = position.get(int(review["product_id"]))
        if row is None or review["head"] not in frame.columns:
            continue
        column = frame.columns.get_loc(review["head"])
        old = frame.iat[row, column]
        frame.iat[row, column] = review["label"]
        head = summary["by_head"].setdefault(review["head"], {"labels": 0, "corrections": 0})
        summary["labels"] += 1
        head["labels"] += 1
        if review["corrected"]:
            summary["corrections"] += 1
            head["corrections"] += 1
        if not isinstance(old, str) or old.strip() != review["label"]:
            summary["changed_labels"] += 1
        touched.add(row)
    if "split" in frame.columns:
        without_split = [row for row in sorted(touched) if not isinstance(frame["split"].iat[row], str)]
        frame.loc[frame.index[without_split], "split"] = "train"
        summary["added_to_train"] = len(without_split)
    summary["products"] = len(touched)
    return frame, summary


def record_in_artifact(artifact_dir: str | os.PathLike, summary: Mapping | None) -> None:
    """Add the snapshot's review summary to a model artifact's ``config.json`` (replaced atomically)."""
    path = Path(artifact_dir) / "config.json"
    config = json.loads(path.read_text())
    config[REVIEW_LABELS_KEY] = dict(summary or {})
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(config, indent=1, default=str))
    partial.replace(path)
