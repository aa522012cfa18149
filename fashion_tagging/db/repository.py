"""Reads and writes of the catalog database. Every function takes an open SQLAlchemy connection;
the caller owns the transaction (``with engine.begin() as conn``), so one batch = one transaction.

Bulk writes go COPY (binary) -> temp table -> ``INSERT ... ON CONFLICT DO UPDATE``: fast, and
idempotent because of the (product_id, model_version) primary keys. A batch that dies half-way
rolls back entirely; its retry writes each row exactly once.
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from fashion_tagging.db import schema
from fashion_tagging.settings import PRIMARY_HEAD

# Catalog (styles.csv / manifest) column -> products column.
PRODUCT_COLUMN_MAP = {
    "id": "product_id", "gender": "gender", "masterCategory": "master_category", "subCategory": "sub_category",
    "articleType": "article_type", "baseColour": "base_colour", "season": "season", "year": "year",
    "usage": "usage", "productDisplayName": "title", "brandName": "brand", "description": "description",
    "image_key": "image_key", "split": "split", "source": "source",
}
PRODUCT_COLUMNS = tuple(PRODUCT_COLUMN_MAP.values())
_PRODUCT_TYPES = {"product_id": "int8", "year": "int4"}
TAG_COLUMNS = ("product_id", "model_version", "article_type", "article_type_confidence", "heads",
               "has_image", "has_text", "run_id")
_TAG_TYPES = ("int8", "text", "text", "float8", "jsonb", "bool", "bool", "text")
EMBEDDING_COLUMNS = ("product_id", "model_version", "image_embedding", "product_embedding", "run_id")
_EMBEDDING_TYPES = ("int8", "text", "vector", "vector", "text")
MODEL_STATUSES = ("registered", "production", "rejected", "retired")
PROMOTION_LOCK_KEY = 0x46545F70726F  # pg advisory lock id: "FT_pro"
# HNSW + a model_version filter: keep scanning the graph until k rows match (pgvector >= 0.8).
SIMILAR_SEARCH_SETTINGS = ("SET LOCAL hnsw.iterative_scan = relaxed_order", "SET LOCAL hnsw.ef_search = 100")


def accepts_engine(function):
    """Let a repository function take an Engine too: it then runs in its own transaction."""

    @functools.wraps(function)
    def wrapper(bind, *args, **kwargs):
        if isinstance(bind, sa.Engine):
            with bind.begin() as conn:
                return function(conn, *args, **kwargs)
        return function(bind, *args, **kwargs)

    return wrapper


class NotFound(LookupError):
    """A product, model version or embedding the caller asked for does not exist."""


# --- binary COPY ------------------------------------------------------------------------------

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_NULL_FIELD = struct.pack(">i", -1)


def _encode_field(value, kind: str) -> bytes:
    """One field of PostgreSQL's binary COPY format (length-prefixed; -1 = NULL)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return _NULL_FIELD
    if kind == "vector":  # pgvector binary: int16 dim, int16 unused, float32[dim] big-endian
        vector = np.asarray(value, dtype=">f4")
        payload = struct.pack(">HH", vector.shape[0], 0) + vector.tobytes()
    elif kind == "int8":
        payload = struct.pack(">q", int(value))
    elif kind == "int4":
        payload = struct.pack(">i", int(value))
    elif kind == "float8":
        payload = struct.pack(">d", float(value))
    elif kind == "bool":
        payload = b"\x01" if value else b"\x00"
    elif kind == "jsonb":
        payload = b"\x01" + json.dumps(value, separators=(",", ":")).encode()
    else:
        payload = str(value).encode()
    return struct.pack(">i", len(payload)) + payload


def copy_rows(conn: sa.Connection, table: str, columns: Sequence[str], kinds: Sequence[str],
              rows: Iterable[Sequence]) -> None:
    """COPY rows into ``table`` with the binary protocol, inside the connection's transaction."""
    buffer = io.BytesIO()
    buffer.write(_COPY_HEADER)
    field_count = struct.pack(">h", len(columns))
    for row in rows:
        buffer.write(field_count)
        buffer.write(b"".join(_encode_field(value, kind) for value, kind in zip(row, kinds, strict=True)))
    buffer.write(struct.pack(">h", -1))
    buffer.seek(0)
    cursor = conn.connection.cursor()
    try:
        cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT binary)", buffer)
    finally:
        cursor.close()


def _upsert_via_temp(conn: sa.Connection, table: sa.Table, columns: Sequence[str], kinds: Sequence[str],
                     rows: Iterable[Sequence], *, conflict: Sequence[str], touch: str | None,
                     only_if_changed: bool = False) -> int:
    """COPY into a temp clone of ``table`` then upsert from it; returns rows inserted or changed."""
    staging = f"staging_{table.name}"
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS pg_temp.{staging}")
    conn.exec_driver_sql(f"CREATE TEMP TABLE {staging} (LIKE {table.name} INCLUDING DEFAULTS) ON COMMIT DROP")
    copy_rows(conn, staging, columns, kinds, rows)
    updates = [f"{c} = EXCLUDED.{c}" for c in columns if c not in conflict]
    if touch:
        updates.append(f"{touch} = now()")
    changed = ""
    if only_if_changed:
        compared = [c for c in columns if c not in conflict]
        changed = (f" WHERE ({', '.join(f'{table.name}.{c}' for c in compared)})"
                   f" IS DISTINCT FROM ({', '.join(f'EXCLUDED.{c}' for c in compared)})")
    result = conn.exec_driver_sql(
        f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM {staging}"
        f" ON CONFLICT ({', '.join(conflict)}) DO UPDATE SET {', '.join(updates)}{changed}")
    return result.rowcount


# --- products ---------------------------------------------------------------------------------


@accepts_engine
def upsert_products(conn: sa.Connection, frame: pd.DataFrame) -> int:
    """Insert or update catalog rows (styles.csv or products column names); returns rows written.

    Unchanged rows are left alone (``updated_at`` keeps its value), so a re-import neither
    duplicates products nor makes them look new to :func:`products_needing_tags`.
    """
    frame = frame.rename(columns=PRODUCT_COLUMN_MAP)
    columns = [c for c in PRODUCT_COLUMNS if c in frame.columns]
    if "product_id" not in columns:
        raise ValueError("products need an 'id' / 'product_id' column")
    frame = frame.drop_duplicates("product_id", keep="last")
    kinds = [_PRODUCT_TYPES.get(c, "text") for c in columns]
    values = frame[columns].astype(object).where(frame[columns].notna(), None)
    rows = [[_none_if_blank(v, k) for v, k in zip(row, kinds, strict=True)]
            for row in values.itertuples(index=False, name=None)]
    return _upsert_via_temp(conn, schema.products, columns, kinds, rows, conflict=("product_id",),
                            touch="updated_at", only_if_changed=True)


@accepts_engine
def fetch_products(conn: sa.Connection, product_ids: Sequence[int]) -> list[sa.Row]:
    """Product rows for ``product_ids`` (ids that do not exist are simply absent)."""
    if not product_ids:
        return []
    query = sa.select(schema.products).where(schema.products.c.product_id.in_([int(i) for i in product_ids]))
    return list(conn.execute(query.order_by(schema.products.c.product_id)))


@accepts_engine
def products_needing_tags(conn: sa.Connection, model_version: str, *, ingested_after: datetime | None = None,
                          limit: int | None = None) -> list[int]:
    """Ids of products with no tags from ``model_version`` yet, or changed since they were tagged."""
    p, t = schema.products, schema.tags
    query = (
        sa.select(p.c.product_id)
        .select_from(p.outerjoin(t, sa.and_(t.c.product_id == p.c.product_id, t.c.model_version == model_version)))
        .where(sa.or_(t.c.product_id.is_(None), t.c.tagged_at < p.c.updated_at))
        .order_by(p.c.product_id)
    )
    if ingested_after is not None:
        query = query.where(p.c.ingested_at > ingested_after)
    if limit is not None:
        query = query.limit(limit)
    return list(conn.execute(query).scalars())


@accepts_engine
def loaded_manifests(conn: sa.Connection) -> dict[str, str]:
    """Manifest key -> fingerprint of every manifest already loaded into ``products``."""
    ledger = schema.catalog_manifests
    return dict(conn.execute(sa.select(ledger.c.key, ledger.c.fingerprint)).all())


@accepts_engine
def mark_manifests_loaded(conn: sa.Connection, run_id: str, manifests: Sequence[Mapping]) -> None:
    """Upsert ledger rows: dicts with ``key``, ``fingerprint``, ``products`` and ``errors``."""
    if not manifests:
        return
    statement = pg_insert(schema.catalog_manifests)
    conn.execute(statement.on_conflict_do_update(
        index_elements=["key"],
        set_={"fingerprint": statement.excluded.fingerprint, "products": statement.excluded.products,
              "errors": statement.excluded.errors, "run_id": statement.excluded.run_id, "loaded_at": sa.func.now()}),
        [{**dict(manifest), "run_id": run_id} for manifest in manifests])


# --- tags + embeddings ------------------------------------------------------------------------


def _tag_and_embedding_rows(model_version: str, run_id: str, product_ids: Sequence[int], predictions):
    heads = list(predictions.labels)
    if PRIMARY_HEAD not in predictions.labels:
        raise ValueError(f"predictions lack the primary head {PRIMARY_HEAD!r}")
    if len(product_ids) != len(predictions.has_image):
        raise ValueError(f"{len(product_ids)} product ids but {len(predictions.has_image)} predictions")
    tag_rows, embedding_rows = [], []
    for i, product_id in enumerate(product_ids):
        head_json = {head: {"label": predictions.labels[head][i],
                            "confidence": round(float(predictions.confidences[head][i]), 6),
                            "top_k": [[label, float(score)] for label, score in predictions.top_k[head][i]]}
                     for head in heads}
        has_image = bool(predictions.has_image[i])
        tag_rows.append((int(product_id), model_version, predictions.labels[PRIMARY_HEAD][i],
                         float(predictions.confidences[PRIMARY_HEAD][i]), head_json, has_image,
                         bool(predictions.has_text[i]), run_id))
        embedding_rows.append((int(product_id), model_version,
                               predictions.image_embeddings[i] if has_image else None,
                               predictions.product_embeddings[i], run_id))
    return tag_rows, embedding_rows


@accepts_engine
def write_tags_and_embeddings(conn: sa.Connection, model_version: str, run_id: str,
                              product_ids: Sequence[int], predictions) -> int:
    """Upsert one batch of predictions (COPY path); re-writing the same batch changes nothing else."""
    tag_rows, embedding_rows = _tag_and_embedding_rows(model_version, run_id, product_ids, predictions)
    if not tag_rows:
        return 0
    _upsert_via_temp(conn, schema.tags, TAG_COLUMNS, _TAG_TYPES, tag_rows,
                     conflict=("product_id", "model_version"), touch="tagged_at")
    _upsert_via_temp(conn, schema.embeddings, EMBEDDING_COLUMNS, _EMBEDDING_TYPES, embedding_rows,
                     conflict=("product_id", "model_version"), touch="created_at")
    return len(tag_rows)


@accepts_engine
def write_tags_and_embeddings_plain(conn: sa.Connection, model_version: str, run_id: str,
                                    product_ids: Sequence[int], predictions) -> int:
    """The same upsert through SQLAlchemy executemany; only the benchmark uses it, for comparison."""
    tag_rows, embedding_rows = _tag_and_embedding_rows(model_version, run_id, product_ids, predictions)
    if not tag_rows:
        return 0
    for table, columns, rows in ((schema.tags, TAG_COLUMNS, tag_rows),
                                 (schema.embeddings, EMBEDDING_COLUMNS, embedding_rows)):
        statement = pg_insert(table)
        updates = {c: statement.excluded[c] for c in columns if c not in ("product_id", "model_version")}
        statement = statement.on_conflict_do_update(index_elements=["product_id", "model_version"], set_=updates)
        conn.execute(statement, [dict(zip(columns, row, strict=True)) for row in rows])
    return len(tag_rows)


# --- errors and runs --------------------------------------------------------------------------


@accepts_engine
def record_errors(conn: sa.Connection, run_id: str, errors: Iterable) -> int:
    """Store :class:`~fashion_tagging.catalog.RowError` s; the same error of the same run is kept once."""
    rows = [{"run_id": run_id, "product_id": getattr(e, "product_id", None), "stage": e.stage,
             "reason": e.reason, "source": getattr(e, "source", None) or None} for e in errors]
    if not rows:
        return 0
    rows = list({(r["product_id"], r["stage"], r["source"]): r for r in rows}.values())
    statement = pg_insert(schema.product_errors)
    statement = statement.on_conflict_do_update(constraint="uq_product_errors_once",
                                                set_={"reason": statement.excluded.reason})
    conn.execute(statement, rows)
    return len(rows)


@accepts_engine
def start_run(conn: sa.Connection, run_id: str, *, model_version: str | None = None,
              details: Mapping | None = None) -> None:
    """Open (or re-open, for a retried run) a tagging run."""
    statement = pg_insert(schema.tagging_runs).values(run_id=run_id, model_version=model_version,
                                                       details=dict(details or {}))
    conn.execute(statement.on_conflict_do_update(
        index_elements=["run_id"],
        set_={"status": "running", "finished_at": None, "model_version": statement.excluded.model_version}))


@accepts_engine
def finish_run(conn: sa.Connection, run_id: str, *, status: str = "success", products_seen: int = 0,
               products_tagged: int = 0, errors: int = 0, batches: int = 0, seconds: float | None = None,
               details: Mapping | None = None) -> None:
    """Close a run with its totals (``products_per_second`` derived from them)."""
    runs = schema.tagging_runs
    rate = products_tagged / seconds if seconds else None
    values = dict(status=status, finished_at=sa.func.now(), products_seen=products_seen,
                  products_tagged=products_tagged, errors=errors, batches=batches, seconds=seconds,
                  products_per_second=rate)
    if details is not None:
        values["details"] = dict(details)
    if conn.execute(runs.update().where(runs.c.run_id == run_id).values(**values)).rowcount == 0:
        raise NotFound(f"no tagging run {run_id!r}: call start_run first")


# --- model registry ---------------------------------------------------------------------------


@accepts_engine
def register_model(conn: sa.Connection, version: str, backbone: str, image_size: int, fine_tuned: bool,
                   artifact_uri: str, metrics: Mapping | None = None,
                   article_type_accuracy: float | None = None) -> None:
    """Add a trained version as ``registered`` (re-registering updates its metadata, never its status)."""
    values = dict(version=version, backbone=backbone, image_size=int(image_size), fine_tuned=bool(fine_tuned),
                  artifact_uri=artifact_uri, metrics=_json_safe(metrics or {}),
                  article_type_accuracy=None if article_type_accuracy is None else float(article_type_accuracy))
    statement = pg_insert(schema.model_versions).values(**values)
    conn.execute(statement.on_conflict_do_update(
        index_elements=["version"], set_={k: statement.excluded[k] for k in values if k != "version"}))


@accepts_engine
def production_model(conn: sa.Connection) -> sa.RowMapping | None:
    """The one model with status ``production``, or None before the first promotion."""
    mv = schema.model_versions
    return conn.execute(sa.select(mv).where(mv.c.status == "production")).mappings().first()


@accepts_engine
def get_model(conn: sa.Connection, version: str) -> sa.RowMapping:
    mv = schema.model_versions
    row = conn.execute(sa.select(mv).where(mv.c.version == version)).mappings().first()
    if row is None:
        raise NotFound(f"no model version {version!r} in the registry")
    return row


@accepts_engine
def promote_model(conn: sa.Connection, version: str) -> None:
    """Make ``version`` the production model, retiring the previous one in the same transaction."""
    mv = schema.model_versions
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PROMOTION_LOCK_KEY})
    if get_model(conn, version)["status"] == "production":
        return
    conn.execute(mv.update().where(mv.c.status == "production").values(status="retired"))
    conn.execute(mv.update().where(mv.c.version == version)
                 .values(status="production", promoted_at=sa.func.now(), gate_reason=None))


@accepts_engine
def reject_model(conn: sa.Connection, version: str, reason: str) -> None:
    """Mark a candidate as rejected by the quality gate, with the reason shown in the UI."""
    mv = schema.model_versions
    if get_model(conn, version)["status"] == "production":
        raise ValueError(f"model {version!r} is in production: promote another version before rejecting it")
    conn.execute(mv.update().where(mv.c.version == version).values(status="rejected", gate_reason=reason))


@accepts_engine
def list_models(conn: sa.Connection) -> list[sa.RowMapping]:
    """The registry, newest first."""
    mv = schema.model_versions
    return list(conn.execute(sa.select(mv).order_by(mv.c.created_at.desc(), mv.c.version.desc())).mappings())


# --- similarity search ------------------------------------------------------------------------


@accepts_engine
def similar_products(conn: sa.Connection, product_id: int, k: int = 10,
                     model_version: str | None = None) -> list[tuple[int, str | None, str | None, float]]:
    """The ``k`` nearest products by cosine distance of fused embeddings (HNSW index).

    Returns (product_id, title, article_type, distance); article_type is the model's tag,
    falling back to the catalog label. Uses the production model unless a version is given.
    """
    if model_version is None:
        production = production_model(conn)
        if production is None:
            raise NotFound("no production model: pass model_version or promote a model first")
        model_version = production["version"]
    query_vector = _embedding_of(product_id, model_version)
    if conn.execute(sa.select(sa.literal(1)).where(query_vector.is_not(None))).first() is None:
        raise NotFound(f"product {product_id} has no embedding from model {model_version!r}")
    for setting in SIMILAR_SEARCH_SETTINGS:  # SET LOCAL: ends with the caller's transaction
        conn.exec_driver_sql(setting)
    rows = conn.execute(similar_products_query(product_id, k, model_version))
    return [(int(pid), title, article_type, float(dist)) for pid, title, article_type, dist in rows]


def similar_products_query(product_id: int, k: int, model_version: str) -> sa.Select:
    """ORDER BY embedding <=> (subquery) LIMIT k: the shape the HNSW index serves."""
    e, p, t = schema.embeddings, schema.products, schema.tags
    distance = e.c.product_embedding.cosine_distance(_embedding_of(product_id, model_version))
    return (
        sa.select(e.c.product_id, p.c.title, sa.func.coalesce(t.c.article_type, p.c.article_type), distance)
        .select_from(e.join(p, p.c.product_id == e.c.product_id)
                     .outerjoin(t, sa.and_(t.c.product_id == e.c.product_id, t.c.model_version == model_version)))
        .where(e.c.model_version == model_version, e.c.product_id != product_id)
        .order_by(distance)
        .limit(k)
    )


def _embedding_of(product_id: int, model_version: str) -> sa.ScalarSelect:
    e = schema.embeddings
    return (sa.select(e.c.product_embedding)
            .where(e.c.product_id == product_id, e.c.model_version == model_version).scalar_subquery())


# --- helpers ----------------------------------------------------------------------------------


def _none_if_blank(value, kind: str):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if kind in ("int8", "int4"):
        return int(value)
    return value


def _json_safe(value):
    """numpy scalars/arrays inside metrics -> plain JSON types."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
