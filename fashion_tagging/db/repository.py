"""Reads and writes of the catalog database. Every function takes an open SQLAlchemy connection;
the caller owns the transaction (``with engine.begin() as conn``), so one batch = one transaction.

Bulk writes go COPY (binary) -> temp table -> ``INSERT ... ON CONFLICT DO UPDATE``: fast, and
idempotent because of the (product_id, model_version) primary keys. A batch that dies half-way
rolls back entirely; its retry writes each row exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence

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
               "has_image", "has_text", "run_id", "review_status")
_TAG_TYPES = ("int8", "text", "text", "float8", "jsonb", "bool", "bool", "text", "text")
REVIEW_STATUSES = ("auto_accepted", "needs_review")  # tags.review_status and heads -> head -> status
EMBEDDING_COLUMNS = ("product_id", "model_version", "product_embedding", "run_id")
_EMBEDDING_TYPES = ("int8", "text", "vector", "text")
PROMOTION_LOCK_KEY = 0x46545F70726F  # pg advisory lock id: "FT_pro"
# Held by every product write until it commits, and by the planner while it reads the newest
# change_seq: a sequence number handed out but not yet committed can never be skipped by a range.
CHANGE_LOCK_KEY = 0x46545F636867  # "FT_chg"
CONFIDENCE_BINS = 20  # tag_stats' confidence histogram (the dashboard's bins)
# tagging_batches.status: planned | done | failed | superseded (its version was retired before it finished).
BATCH_CLOSED = ("done", "superseded")
RETIRED_VERSIONS_KEPT = 1  # retired versions whose partitions stay (a rollback target); older ones are dropped
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
    field_count = struct.pack(">h", len(columns))
    body = b"".join(field_count + b"".join(_encode_field(value, kind) for value, kind in zip(row, kinds, strict=True))
                    for row in rows)
    _copy_encoded(conn, table, columns, body)


def _copy_encoded(conn: sa.Connection, table: str, columns: Sequence[str], body: bytes) -> None:
    """COPY an already-encoded binary body (rows, without header and trailer) into ``table``."""
    buffer = io.BytesIO(_COPY_HEADER + body + struct.pack(">h", -1))
    cursor = conn.connection.cursor()
    try:
        cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT binary)", buffer)
    finally:
        cursor.close()


def _upsert_via_temp(conn: sa.Connection, table: sa.Table, columns: Sequence[str], kinds: Sequence[str],
                     rows: Iterable[Sequence] | bytes, *, conflict: Sequence[str], touch: str | None,
                     only_if_changed: bool = False, extra_updates: Sequence[str] = (),
                     before_upsert=None, update_only_where: str | None = None) -> int:
    """COPY into a temp clone of ``table`` then upsert from it; returns rows inserted or changed.

    ``rows`` are encoded by ``kinds``, or are ``bytes``: a body already encoded for ``columns``.
    ``before_upsert(staging_table_name)`` runs between the COPY and the upsert (tag statistics
    read the rows about to be replaced there). ``update_only_where``: an SQL condition an existing
    row must meet to be updated (it may name ``{table}.<column>`` and ``EXCLUDED.<column>``).
    """
    staging = f"staging_{table.name}"
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS pg_temp.{staging}")
    conn.exec_driver_sql(f"CREATE TEMP TABLE {staging} (LIKE {table.name} INCLUDING DEFAULTS) ON COMMIT DROP")
    if isinstance(rows, bytes):
        _copy_encoded(conn, staging, columns, rows)
    else:
        copy_rows(conn, staging, columns, kinds, rows)
    if before_upsert is not None:
        before_upsert(staging)
    updates = [f"{c} = EXCLUDED.{c}" for c in columns if c not in conflict]
    if touch:
        updates.append(f"{touch} = now()")
    updates.extend(extra_updates)
    changed = ""
    if only_if_changed:
        compared = [c for c in columns if c not in conflict]
        changed = (f" WHERE ({', '.join(f'{table.name}.{c}' for c in compared)})"
                   f" IS DISTINCT FROM ({', '.join(f'EXCLUDED.{c}' for c in compared)})")
    if update_only_where:
        changed = f"{changed} AND ({update_only_where})" if changed else f" WHERE {update_only_where}"
    result = conn.exec_driver_sql(
        f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM {staging}"
        f" ON CONFLICT ({', '.join(conflict)}) DO UPDATE SET {', '.join(updates)}{changed}")
    return result.rowcount


# --- products ---------------------------------------------------------------------------------


@accepts_engine
def upsert_products(conn: sa.Connection, frame: pd.DataFrame) -> int:
    """Insert or update catalog rows (styles.csv or products column names); returns rows written.

    Unchanged rows are left alone (``updated_at`` keeps its value), so a re-import neither
    duplicates products nor gives them a new ``change_seq`` (which would have them tagged again).
    Rows are written in product_id order: besides the lock below, writers that overlap take
    their row locks in one order and cannot deadlock.

    A written product is in the catalog: a deleted one (tombstone) is restored. With a ``source``
    (the manifest key), a product whose current source sorts after it (byte order) is left alone:
    the manifest latest in key order wins, whichever night each was loaded.
    """
    frame = frame.rename(columns=PRODUCT_COLUMN_MAP)
    columns = [c for c in PRODUCT_COLUMNS if c in frame.columns]
    if "product_id" not in columns:
        raise ValueError("products need an 'id' / 'product_id' column")
    frame = frame.drop_duplicates("product_id", keep="last").sort_values("product_id", kind="stable")
    kinds = [_PRODUCT_TYPES.get(c, "text") for c in columns]
    values = frame[columns].astype(object).where(frame[columns].notna(), None)
    rows = [[*(_none_if_blank(v, k) for v, k in zip(row, kinds, strict=True)), None]  # deleted_at: live
            for row in values.itertuples(index=False, name=None)]
    lock_product_changes(conn)
    return _upsert_via_temp(conn, schema.products, [*columns, "deleted_at"], [*kinds, "text"], rows,
                            conflict=("product_id",), touch="updated_at", only_if_changed=True,
                            extra_updates=("change_seq = nextval('product_change_seq')",),
                            update_only_where=_LATER_SOURCE_KEPT)


# An existing product is updated by a manifest row only if that manifest does not sort before the
# one the product came from (byte order, whatever the database's collation).
_LATER_SOURCE_KEPT = ('products.source IS NULL OR EXCLUDED.source IS NULL '
                      'OR products.source COLLATE "C" <= EXCLUDED.source COLLATE "C"')


@accepts_engine
def delete_products(conn: sa.Connection, product_ids: Sequence[int], source: str | None = None) -> int:
    """Tombstone products (manifest rows with ``deleted`` true); returns the rows that changed.

    The row stays with ``deleted_at`` set and ``source`` = the deleting manifest (an unknown id
    gets a tombstone row, so an earlier manifest read later cannot bring it in); its tags and
    embeddings in every version go, ``tag_stats`` following, and readers skip it. The same
    precedence as :func:`upsert_products`: a product from a manifest later in key order stays.
    A deleted product keeps its ``change_seq`` (no tagging work); being written again restores it.
    """
    ids = sorted({int(i) for i in product_ids})
    if not ids:
        return 0
    lock_product_changes(conn)
    changed = conn.execute(sa.text(f"""
        INSERT INTO products (product_id, source, deleted_at)
        SELECT id, :source, now() FROM unnest(CAST(:ids AS bigint[])) AS id ORDER BY id
        ON CONFLICT (product_id) DO UPDATE
        SET deleted_at = coalesce(products.deleted_at, now()), source = coalesce(EXCLUDED.source, products.source),
            updated_at = CASE WHEN products.deleted_at IS NULL THEN now() ELSE products.updated_at END
        WHERE (products.deleted_at IS NULL OR products.source IS DISTINCT FROM EXCLUDED.source)
          AND ({_LATER_SOURCE_KEPT})
        RETURNING product_id
    """), {"ids": ids, "source": source}).scalars().all()
    drop_tags(conn, changed)
    return len(changed)


def drop_tags(conn: sa.Connection, product_ids: Sequence[int]) -> None:
    """Remove products' tags and embeddings in every version, ``tag_stats`` following (keys in lock order)."""
    ids = [int(i) for i in product_ids]
    if not ids:
        return
    conn.execute(sa.text(f"""
        INSERT INTO tag_stats (model_version, article_type, confidence_bin, products)
        SELECT model_version, article_type, {_CONFIDENCE_BIN_SQL}, -count(*) FROM tags
        WHERE product_id = ANY(:ids) GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (model_version, article_type, confidence_bin)
        DO UPDATE SET products = tag_stats.products + EXCLUDED.products
    """), {"ids": ids})
    conn.execute(sa.text("DELETE FROM tags WHERE product_id = ANY(:ids)"), {"ids": ids})
    conn.execute(sa.text("DELETE FROM embeddings WHERE product_id = ANY(:ids)"), {"ids": ids})


def _deleted_among(conn: sa.Connection, product_ids: Sequence[int]) -> list[int]:
    """Which of ``product_ids`` are deleted, read under the product-change lock (shared).

    Taken before a tag write touches anything: a tombstone committed earlier is seen here, and
    one not yet made waits (its writer takes the lock exclusively) until this write commits, then
    drops the tags just written. Either way a deleted product keeps no tags.
    """
    conn.execute(sa.text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": CHANGE_LOCK_KEY})
    return conn.execute(sa.text("SELECT product_id FROM products WHERE product_id = ANY(:ids) "
                                "AND deleted_at IS NOT NULL"), {"ids": [int(i) for i in product_ids]}).scalars().all()


def lock_product_changes(conn: sa.Connection) -> None:
    """Serialise product writes with the planner's read of the newest change_seq (until commit)."""
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHANGE_LOCK_KEY})


@accepts_engine
def requeue_products(conn: sa.Connection, product_ids: Sequence[int]) -> int:
    """Give products a new change_seq, so every version tags them again in a later range.

    Used for products a batch could not tag for a transient reason (a photo fetch that failed
    after its retries): their range is done, yet they are not lost.
    """
    if not product_ids:
        return 0
    lock_product_changes(conn)
    return conn.execute(sa.text("UPDATE products SET change_seq = nextval('product_change_seq') "
                                "WHERE product_id = ANY(:ids)"), {"ids": [int(i) for i in product_ids]}).rowcount


@accepts_engine
def fetch_products(conn: sa.Connection, product_ids: Sequence[int]) -> list[sa.Row]:
    """Product rows for ``product_ids`` (ids that do not exist are simply absent)."""
    if not product_ids:
        return []
    query = sa.select(schema.products).where(schema.products.c.product_id.in_([int(i) for i in product_ids]))
    return list(conn.execute(query.order_by(schema.products.c.product_id)))


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


@accepts_engine
def write_tags_and_embeddings(conn: sa.Connection, model_version: str, run_id: str,
                              product_ids: Sequence[int], predictions) -> int:
    """Write one batch of predictions; re-writing the same batch changes nothing else.

    Fresh rows (a backfill, new arrivals: none of the ids tagged by this version yet, one index
    probe to know) are COPYed straight into the version's partition. Otherwise the batch goes
    COPY -> temp table -> ``INSERT ... ON CONFLICT DO UPDATE``. Either way the version's
    ``tag_stats`` move by exactly the rows added or replaced, in the same transaction.
    Products deleted since the caller read them keep no tags (:func:`_deleted_among`).
    """
    if len(product_ids) != len(predictions.has_image):
        raise ValueError(f"{len(product_ids)} product ids but {len(predictions.has_image)} predictions")
    if not len(product_ids):
        return 0
    ensure_version_partitions(conn, model_version)
    ids = [int(i) for i in product_ids]
    deleted = _deleted_among(conn, ids)
    tag_body, embedding_body = _encoded_rows(model_version, run_id, ids, predictions)
    already = conn.execute(sa.text("SELECT 1 FROM tags WHERE model_version = :v AND product_id = ANY(:ids) LIMIT 1"),
                           {"v": model_version, "ids": ids}).first()
    # What this run wrote (its drift check reads it); a product it had written before counts once.
    _add_run_stats(conn, run_id, model_version, predictions, rewritten_ids=ids if already is not None else None)
    if already is None:
        _copy_encoded(conn, "tags", TAG_COLUMNS, tag_body)
        _copy_encoded(conn, "embeddings", EMBEDDING_COLUMNS, embedding_body)
        _add_stats(conn, model_version, predictions)
        drop_tags(conn, deleted)
        return len(ids)
    _upsert_via_temp(conn, schema.tags, TAG_COLUMNS, _TAG_TYPES, tag_body,
                     conflict=("product_id", "model_version"), touch="tagged_at",
                     before_upsert=lambda staging: _stats_delta_before(conn, staging, model_version))
    _apply_stats_delta(conn, model_version)
    _upsert_via_temp(conn, schema.embeddings, EMBEDDING_COLUMNS, _EMBEDDING_TYPES, embedding_body,
                     conflict=("product_id", "model_version"), touch="created_at")
    drop_tags(conn, deleted)
    return len(ids)


def _text_field(value: str) -> bytes:
    payload = value.encode()
    return struct.pack(">i", len(payload)) + payload


def _encoded_rows(model_version: str, run_id: str, product_ids: Sequence[int], predictions) -> tuple[bytes, bytes]:
    """Binary COPY bodies of the tag and embedding rows, built without per-field dispatch.

    The same bytes :func:`copy_rows` would send for the plain rows (a test compares them; the
    heads JSON is assembled from pre-escaped labels; numbers as ``json`` writes them). Both write
    paths send these bodies: straight into the partition, or into the upsert's temp table.
    """
    if PRIMARY_HEAD not in predictions.labels:
        raise ValueError(f"predictions lack the primary head {PRIMARY_HEAD!r}")
    heads = list(predictions.labels)
    escaped: dict[str, str] = {}
    routed = getattr(predictions, "auto_accepted", None) or {}
    status_json = {head: np.where(np.asarray(routed[head], dtype=bool), ',"status":"auto_accepted"',
                                  ',"status":"needs_review"') for head in heads if head in routed}
    primary_status = routed.get(PRIMARY_HEAD)
    status_fields = (_text_field(REVIEW_STATUSES[0]), _text_field(REVIEW_STATUSES[1]))

    def quoted(label: str) -> str:
        if label not in escaped:
            escaped[label] = json.dumps(label)
        return escaped[label]

    version_field, run_field = _text_field(model_version), _text_field(run_id)
    tag_count, embedding_count = struct.pack(">h", len(TAG_COLUMNS)), struct.pack(">h", len(EMBEDDING_COLUMNS))
    vectors = np.ascontiguousarray(predictions.product_embeddings, dtype=">f4")
    vector_header = struct.pack(">iHH", 4 + 4 * vectors.shape[1], vectors.shape[1], 0)
    confidences = {head: np.asarray(predictions.confidences[head], dtype=np.float64) for head in heads}
    true, false = struct.pack(">i", 1) + b"\x01", struct.pack(">i", 1) + b"\x00"
    tag_parts, embedding_parts = [], []
    for i, product_id in enumerate(product_ids):
        id_field = struct.pack(">iq", 8, product_id)
        head_json = ",".join(
            f'{quoted(head)}:{{"label":{quoted(predictions.labels[head][i])},'
            f'"confidence":{round(float(confidences[head][i]), 6)!r},"top_k":['
            + ",".join(f"[{quoted(label)},{float(score)!r}]" for label, score in predictions.top_k[head][i])
            + "]" + (status_json[head][i] if head in status_json else "") + "}" for head in heads)
        tag_parts += [tag_count, id_field, version_field, _text_field(predictions.labels[PRIMARY_HEAD][i]),
                      struct.pack(">id", 8, confidences[PRIMARY_HEAD][i]),
                      _text_field("\x01{" + head_json + "}"),
                      true if predictions.has_image[i] else false, true if predictions.has_text[i] else false,
                      run_field,
                      _NULL_FIELD if primary_status is None else status_fields[0 if primary_status[i] else 1]]
        embedding_parts += [embedding_count, id_field, version_field, vector_header, vectors[i].tobytes(), run_field]
    return b"".join(tag_parts), b"".join(embedding_parts)


def _add_stats(conn: sa.Connection, model_version: str, predictions) -> None:
    """Count fresh rows into tag_stats (bins as width_bucket computes them), keys in lock order."""
    confidences = np.asarray(predictions.confidences[PRIMARY_HEAD], dtype=np.float64)
    bins = np.minimum(np.floor(confidences * CONFIDENCE_BINS).astype(int) + 1, CONFIDENCE_BINS)
    counts: dict[tuple[str, int], int] = {}
    for label, confidence_bin in zip(predictions.labels[PRIMARY_HEAD], bins.tolist(), strict=True):
        counts[(label, confidence_bin)] = counts.get((label, confidence_bin), 0) + 1
    keys = sorted(counts)
    conn.execute(sa.text("""
        INSERT INTO tag_stats (model_version, article_type, confidence_bin, products)
        SELECT :version, label, bin, n FROM unnest(:labels, :bins, :counts) AS fresh(label, bin, n)
        ORDER BY label, bin
        ON CONFLICT (model_version, article_type, confidence_bin)
        DO UPDATE SET products = tag_stats.products + EXCLUDED.products
    """), {"version": model_version, "labels": [label for label, _ in keys], "bins": [b for _, b in keys],
           "counts": [counts[key] for key in keys]})


def _add_run_stats(conn: sa.Connection, run_id: str, model_version: str, predictions,
                   rewritten_ids: Sequence[int] | None = None) -> None:
    """Count a batch about to be written into ``run_tag_stats`` (what this run tagged, by label and bin).

    In the batch's transaction: a committed chunk counts once, a rolled-back one not at all.
    ``rewritten_ids``: the batch may replace rows; those this same run wrote before are taken
    back (read before the write), so a product written twice by one run counts once. One
    statement with its keys in order: concurrent batches of a run never deadlock on these rows.
    """
    confidences = np.asarray(predictions.confidences[PRIMARY_HEAD], dtype=np.float64)
    bins = np.minimum(np.floor(confidences * CONFIDENCE_BINS).astype(int) + 1, CONFIDENCE_BINS)
    counts: dict[tuple[str, int], int] = {}
    for label, confidence_bin in zip(predictions.labels[PRIMARY_HEAD], bins.tolist(), strict=True):
        counts[(label, confidence_bin)] = counts.get((label, confidence_bin), 0) + 1
    if rewritten_ids is not None:
        earlier = conn.execute(sa.text(f"""
            SELECT article_type, {_CONFIDENCE_BIN_SQL}, count(*) FROM tags
            WHERE model_version = :v AND run_id = :run AND product_id = ANY(:ids) GROUP BY 1, 2
        """), {"v": model_version, "run": run_id, "ids": [int(i) for i in rewritten_ids]}).all()
        for label, confidence_bin, n in earlier:
            counts[(label, int(confidence_bin))] = counts.get((label, int(confidence_bin)), 0) - int(n)
    keys = sorted(key for key, n in counts.items() if n)
    if not keys:
        return
    conn.execute(sa.text("""
        INSERT INTO run_tag_stats (run_id, model_version, article_type, confidence_bin, products)
        SELECT :run_id, :version, label, bin, n FROM unnest(:labels, :bins, :counts) AS fresh(label, bin, n)
        ORDER BY label, bin
        ON CONFLICT (run_id, model_version, article_type, confidence_bin)
        DO UPDATE SET products = run_tag_stats.products + EXCLUDED.products
    """), {"run_id": run_id, "version": model_version, "labels": [label for label, _ in keys],
           "bins": [b for _, b in keys], "counts": [counts[key] for key in keys]})


@accepts_engine
def run_tag_counts(conn: sa.Connection, run_id: str) -> dict[str, list[tuple[str, int, int]]]:
    """What a run tagged: {version: [(articleType, confidence bin, products), ...]}."""
    rows = conn.execute(sa.text("SELECT model_version, article_type, confidence_bin, products FROM run_tag_stats "
                                "WHERE run_id = :run_id AND products > 0 ORDER BY 1, 2, 3"), {"run_id": run_id}).all()
    counts: dict[str, list[tuple[str, int, int]]] = {}
    for version, label, confidence_bin, products in rows:
        counts.setdefault(version, []).append((label, int(confidence_bin), int(products)))
    return counts


@accepts_engine
def record_drift(conn: sa.Connection, report: Mapping) -> None:
    """Store (or replace, for a retried check) a run's drift figures for one version."""
    columns = ("run_id", "model_version", "products", "category_js", "category_psi", "confidence_js",
               "confidence_psi", "threshold", "alert")
    values = {key: report[key] for key in columns}
    values["details"] = _json_safe(report.get("details") or {})
    statement = pg_insert(schema.tagging_drift).values(**values)
    conn.execute(statement.on_conflict_do_update(
        index_elements=["run_id", "model_version"],
        set_={**{k: statement.excluded[k] for k in values if k not in ("run_id", "model_version")},
              "measured_at": sa.func.now()}))


_CONFIDENCE_BIN_SQL = f"LEAST(width_bucket(article_type_confidence, 0.0, 1.0, {CONFIDENCE_BINS}), {CONFIDENCE_BINS})"


def _stats_delta_before(conn: sa.Connection, staging: str, model_version: str) -> None:
    """Stage -1 per replaced tag (old label and bin) and +1 per incoming one."""
    conn.exec_driver_sql("DROP TABLE IF EXISTS pg_temp.staging_tag_stats")
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE staging_tag_stats ON COMMIT DROP AS "
        f"SELECT article_type, {_CONFIDENCE_BIN_SQL} AS confidence_bin, -count(*) AS products FROM tags "
        f"WHERE model_version = %(version)s AND product_id IN (SELECT product_id FROM {staging}) GROUP BY 1, 2 "
        f"UNION ALL SELECT article_type, {_CONFIDENCE_BIN_SQL}, count(*) FROM {staging} GROUP BY 1, 2",
        {"version": model_version})


def _apply_stats_delta(conn: sa.Connection, model_version: str) -> None:
    """Add the staged deltas, rows locked in key order (concurrent batches never deadlock)."""
    conn.exec_driver_sql(
        "INSERT INTO tag_stats (model_version, article_type, confidence_bin, products) "
        "SELECT %(version)s, article_type, confidence_bin, sum(products) FROM staging_tag_stats "
        "GROUP BY article_type, confidence_bin HAVING sum(products) <> 0 ORDER BY article_type, confidence_bin "
        "ON CONFLICT (model_version, article_type, confidence_bin) "
        "DO UPDATE SET products = tag_stats.products + EXCLUDED.products", {"version": model_version})


# --- per-version partitions ------------------------------------------------------------------


def partition_name(table: str, model_version: str) -> str:
    """The partition of ``tags`` / ``embeddings`` holding one version (same rule as migration 0003)."""
    return f"{table}_v_{hashlib.sha1(model_version.encode()).hexdigest()[:16]}"


@accepts_engine
def ensure_version_partitions(conn: sa.Connection, model_version: str) -> None:
    """Create the version's tags and embeddings partitions if absent (primary keys only, no other index)."""
    if conn.execute(sa.text("SELECT to_regclass(:name)"), {"name": partition_name("embeddings", model_version)}).scalar():
        return
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PROMOTION_LOCK_KEY})
    literal = model_version.replace("'", "''")
    for table in ("tags", "embeddings"):
        conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {partition_name(table, model_version)} "
                             f"PARTITION OF {table} FOR VALUES IN ('{literal}')")


@accepts_engine
def build_version_indexes(conn: sa.Connection, model_version: str, *,
                          maintenance_work_mem: str | None = "1GB", vector_index: bool = True) -> dict:
    """Build the review (confidence) and HNSW vector indexes of a version's partitions, once loaded.

    pgvector builds an HNSW index far faster over loaded rows than row by row; the build's
    memory is raised for this transaction only. ``vector_index=False`` builds the review index
    only (benchmarks that cannot afford the HNSW build). Returns seconds per index.
    """
    import time

    ensure_version_partitions(conn, model_version)
    tags_table, embeddings_table = partition_name("tags", model_version), partition_name("embeddings", model_version)
    if maintenance_work_mem:
        conn.exec_driver_sql(f"SET LOCAL maintenance_work_mem = '{maintenance_work_mem}'")
    timings = {}
    for name, statement in (
            ("confidence", f"CREATE INDEX IF NOT EXISTS {tags_table}_confidence ON {tags_table} "
                           f"(article_type_confidence, product_id)"),
            ("hnsw", f"CREATE INDEX IF NOT EXISTS {embeddings_table}_hnsw ON {embeddings_table} "
                     f"USING hnsw (product_embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)")):
        if name == "hnsw" and not vector_index:
            continue
        tick = time.perf_counter()
        conn.exec_driver_sql(statement)
        timings[f"{name}_index_seconds"] = round(time.perf_counter() - tick, 2)
    return timings


@accepts_engine
def drop_version_partitions(conn: sa.Connection, model_version: str) -> None:
    """Drop a version's tags, embeddings and statistics: whole tables, no row-by-row delete."""
    for table in ("tags", "embeddings"):
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {partition_name(table, model_version)}")
    conn.execute(sa.delete(schema.tag_stats).where(schema.tag_stats.c.model_version == model_version))


# --- tagging work: ranges of products.change_seq ----------------------------------------------


@accepts_engine
def newest_change_seq(conn: sa.Connection) -> int:
    """The highest change_seq, read once every product write in flight has committed (one index probe)."""
    lock_product_changes(conn)
    return int(conn.execute(sa.text("SELECT coalesce(max(change_seq), 0) FROM products")).scalar())


@accepts_engine
def count_products(conn: sa.Connection) -> int:
    """Products in the catalog, tombstones left out (once per run; the dashboard reads the run's figure)."""
    return int(conn.execute(sa.text("SELECT count(*) FROM products WHERE deleted_at IS NULL")).scalar())


@accepts_engine
def count_changes_between(conn: sa.Connection, after_seq: int, upto_seq: int, *, limit: int | None = None) -> int:
    """Products with after_seq < change_seq <= upto_seq (counted up to ``limit``: an index-only scan)."""
    inner = "SELECT 1 FROM products WHERE change_seq > :lo AND change_seq <= :hi"
    if limit is not None:
        inner += f" LIMIT {int(limit)}"
    return int(conn.execute(sa.text(f"SELECT count(*) FROM ({inner}) s"), {"lo": after_seq, "hi": upto_seq}).scalar())


@accepts_engine
def plan_tagging_batches(conn: sa.Connection, model_version: str, run_id: str, *, target_seq: int,
                         max_batches: int, products_per_batch: int) -> list[sa.RowMapping]:
    """This run's work for one version, at most ``max_batches`` ranges of ~``products_per_batch`` products.

    Ranges an earlier run left planned or failed come first (re-issued as they are, so a re-run
    finishes exactly what is left); then new ranges from the version's ``planned_seq`` up to
    ``target_seq``, cut every ``products_per_batch`` products by a window over the change_seq
    index (only the rows being planned are read). Returns the batch rows.
    """
    b, mv = schema.tagging_batches, schema.model_versions
    if max_batches <= 0:
        return []
    leftover = conn.execute(sa.select(b.c.batch_id).where(b.c.model_version == model_version, b.c.status != "done")
                            .order_by(b.c.seq_from).limit(max_batches)).scalars().all()
    if leftover:
        conn.execute(b.update().where(b.c.batch_id.in_(leftover))
                     .values(run_id=run_id, status="planned", updated_at=sa.func.now()))
    room = max_batches - len(leftover)
    planned_seq = int(conn.execute(sa.select(mv.c.planned_seq).where(mv.c.version == model_version)
                                   .with_for_update()).scalar_one())
    if room > 0 and planned_seq < target_seq:
        cuts = conn.execute(sa.text("""
            SELECT change_seq, n, total FROM (
                SELECT change_seq, row_number() OVER (ORDER BY change_seq) AS n, count(*) OVER () AS total
                FROM (SELECT change_seq FROM products WHERE change_seq > :lo AND change_seq <= :hi
                      ORDER BY change_seq LIMIT :limit) AS planned
            ) AS numbered WHERE n % :size = 0 OR n = total ORDER BY n
        """), {"lo": planned_seq, "hi": target_seq, "limit": room * products_per_batch,
               "size": products_per_batch}).all()
        ranges, low, counted = [], planned_seq, 0
        for seq, n, total in cuts:
            last = n == total and total < room * products_per_batch
            high = target_seq if last else int(seq)  # the final range reaches the target
            ranges.append({"model_version": model_version, "seq_from": low, "seq_to": high, "done_seq": low,
                           "products": int(n) - counted, "run_id": run_id})
            low, counted = high, int(n)
        if not cuts:  # nothing left in (planned_seq, target]: products moved on; the range is empty
            low = target_seq
        if ranges:
            conn.execute(pg_insert(b).values(ranges).on_conflict_do_nothing(constraint="uq_tagging_batches_range"))
        conn.execute(mv.update().where(mv.c.version == model_version).values(planned_seq=low))
    return list(conn.execute(sa.select(b).where(b.c.model_version == model_version, b.c.run_id == run_id,
                                                b.c.status == "planned").order_by(b.c.seq_from)).mappings())


@accepts_engine
def get_batch(conn: sa.Connection, batch_id: int) -> sa.RowMapping:
    b = schema.tagging_batches
    row = conn.execute(sa.select(b).where(b.c.batch_id == int(batch_id))).mappings().first()
    if row is None:
        raise NotFound(f"no tagging batch {batch_id}")
    return row


@accepts_engine
def start_batch_attempt(conn: sa.Connection, batch_id: int) -> sa.RowMapping:
    """Count an attempt at a batch and return it (its ``done_seq`` says where to resume).

    A batch ``done`` or ``superseded`` stays so (the attempt has nothing to do); a failed one is
    ``planned`` again.
    """
    b = schema.tagging_batches
    conn.execute(b.update().where(b.c.batch_id == int(batch_id))
                 .values(attempts=b.c.attempts + 1,
                         status=sa.case((b.c.status.in_(BATCH_CLOSED), b.c.status), else_="planned"),
                         updated_at=sa.func.now()))
    return get_batch(conn, batch_id)


def lock_batch(conn: sa.Connection, batch_id: int) -> sa.RowMapping | None:
    """The batch row, locked (``FOR UPDATE``) until the caller's transaction ends; None if deleted.

    Each chunk of a batch takes it before writing, so two workers on one batch (a task thought
    lost and re-run while the first still runs) write each chunk once, and a promotion that
    supersedes the batch waits for the chunk in flight.
    """
    b = schema.tagging_batches
    return conn.execute(sa.select(b).where(b.c.batch_id == int(batch_id)).with_for_update()).mappings().first()


@accepts_engine
def products_in_range(conn: sa.Connection, after_seq: int, upto_seq: int, limit: int) -> list[sa.Row]:
    """The next ``limit`` product rows of a range, in change_seq order (keyset pagination); deleted ones skipped."""
    p = schema.products
    return list(conn.execute(sa.select(p).where(p.c.change_seq > after_seq, p.c.change_seq <= upto_seq,
                                                p.c.deleted_at.is_(None))
                             .order_by(p.c.change_seq).limit(limit)))


@accepts_engine
def advance_batch(conn: sa.Connection, batch_id: int, done_seq: int, *, tagged: int, text_only: int, errors: int,
                  seconds: float) -> None:
    """Record progress inside a batch (same transaction as the chunk's tags: crash-consistent)."""
    b = schema.tagging_batches
    conn.execute(b.update().where(b.c.batch_id == int(batch_id))
                 .values(done_seq=sa.func.greatest(b.c.done_seq, int(done_seq)), tagged=b.c.tagged + tagged,
                         text_only=b.c.text_only + text_only, errors=b.c.errors + errors,
                         seconds=b.c.seconds + seconds, updated_at=sa.func.now()))


@accepts_engine
def finish_batch(conn: sa.Connection, batch_id: int, *, error: str | None = None) -> None:
    """Mark a batch done, or failed with the error that ended its attempt.

    A superseded batch stays superseded, and a failure never undoes ``done`` (another worker on
    the same batch finished it).
    """
    b = schema.tagging_batches
    if error:
        values, keep = {"status": "failed", "error": error[:2000]}, BATCH_CLOSED
    else:
        values, keep = {"status": "done", "done_seq": b.c.seq_to, "error": None}, ("superseded",)
    conn.execute(b.update().where(b.c.batch_id == int(batch_id), b.c.status.not_in(keep))
                 .values(**values, updated_at=sa.func.now()))


def supersede_batches(conn: sa.Connection, model_version: str) -> int:
    """Close the open batches of a version that stopped tagging (retired): they must not write.

    Waits for a chunk of theirs in flight (its row lock); the next chunk sees ``superseded`` and
    stops. Returns the batches closed.
    """
    b = schema.tagging_batches
    return conn.execute(b.update().where(b.c.model_version == model_version, b.c.status.not_in(BATCH_CLOSED))
                        .values(status="superseded", error=None, updated_at=sa.func.now())).rowcount


@accepts_engine
def run_batches(conn: sa.Connection, run_id: str) -> list[sa.RowMapping]:
    b = schema.tagging_batches
    return list(conn.execute(sa.select(b).where(b.c.run_id == run_id).order_by(b.c.model_version, b.c.seq_from))
                .mappings())


@accepts_engine
def advance_tagged_seq(conn: sa.Connection, model_version: str) -> int:
    """Move a version's ``tagged_seq`` to the end of its contiguous finished work; returns it."""
    b, mv = schema.tagging_batches, schema.model_versions
    open_from = conn.execute(sa.select(sa.func.min(b.c.done_seq))
                             .where(b.c.model_version == model_version, b.c.status != "done")).scalar()
    planned = conn.execute(sa.select(mv.c.planned_seq).where(mv.c.version == model_version)).scalar_one()
    tagged = int(planned if open_from is None else open_from)
    conn.execute(mv.update().where(mv.c.version == model_version)
                 .values(tagged_seq=sa.func.greatest(mv.c.tagged_seq, tagged)))
    return int(conn.execute(sa.select(mv.c.tagged_seq).where(mv.c.version == model_version)).scalar_one())


# --- errors and runs --------------------------------------------------------------------------


@accepts_engine
def record_errors(conn: sa.Connection, run_id: str, errors: Iterable) -> int:
    """Store :class:`~fashion_tagging.errors.RowError` s; the same error of the same run is kept once."""
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
def serving_model(conn: sa.Connection) -> sa.RowMapping | None:
    """The version every reader uses (UI, similar products, CLI): it has tagged the whole catalog."""
    mv = schema.model_versions
    return conn.execute(sa.select(mv).where(mv.c.status == "serving")).mappings().first()


@accepts_engine
def production_model(conn: sa.Connection) -> sa.RowMapping | None:
    """The newest model that passed the gate: the promoted one while it backfills, else the serving one.

    This is what a retrain must beat and what tagging without an explicit version runs; readers
    use :func:`serving_model` instead. None before the first promotion.
    """
    mv = schema.model_versions
    return conn.execute(sa.select(mv).where(mv.c.status.in_(("promoted", "serving")))
                        .order_by((mv.c.status == "promoted").desc())).mappings().first()


@accepts_engine
def tagging_models(conn: sa.Connection) -> list[sa.RowMapping]:
    """Versions the nightly run tags for: the serving one first (new arrivals stay visible), then
    the promoted one (its backfill)."""
    mv = schema.model_versions
    return list(conn.execute(sa.select(mv).where(mv.c.status.in_(("serving", "promoted")))
                             .order_by((mv.c.status == "promoted").asc())).mappings())


@accepts_engine
def get_model(conn: sa.Connection, version: str) -> sa.RowMapping:
    mv = schema.model_versions
    row = conn.execute(sa.select(mv).where(mv.c.version == version)).mappings().first()
    if row is None:
        raise NotFound(f"no model version {version!r} in the registry")
    return row


@accepts_engine
def promote_model(conn: sa.Connection, version: str, reason: str | None = None) -> None:
    """Mark ``version`` promoted: it starts its backfill, and serves once it covers the catalog.

    ``reason``: why the gate promoted it (``gate_reason``; the gate's figures are in ``metrics``).

    A promoted version that had not finished its backfill is superseded (retired, its partitions
    dropped); the serving version keeps serving until :func:`activate_model`.
    """
    mv = schema.model_versions
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PROMOTION_LOCK_KEY})
    if get_model(conn, version)["status"] in ("promoted", "serving"):
        return
    superseded = conn.execute(mv.update().where(mv.c.status == "promoted").values(status="retired")
                              .returning(mv.c.version)).scalars().all()
    for old in superseded:
        supersede_batches(conn, old)  # before the drop: a chunk in flight commits first, the next one stops
        drop_version_partitions(conn, old)
    conn.execute(mv.update().where(mv.c.version == version)
                 .values(status="promoted", promoted_at=sa.func.now(), gate_reason=reason, tagged_seq=0, planned_seq=0))
    # A version promoted again (a rollback to a retired one) re-plans from the start: its old ranges go.
    conn.execute(sa.delete(schema.tagging_batches).where(schema.tagging_batches.c.model_version == version))
    ensure_version_partitions(conn, version)


@accepts_engine
def activate_model(conn: sa.Connection, version: str, *, build_indexes: bool = True) -> dict:
    """Make a promoted version serve: build its indexes, retire the old serving one, drop old partitions.

    Returns index build timings and the versions whose partitions were dropped.
    """
    mv = schema.model_versions
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PROMOTION_LOCK_KEY})
    if get_model(conn, version)["status"] == "serving":
        return {}
    timings = build_version_indexes(conn, version) if build_indexes else {}
    for old in conn.execute(mv.update().where(mv.c.status == "serving").values(status="retired")
                            .returning(mv.c.version)).scalars().all():
        supersede_batches(conn, old)
    conn.execute(mv.update().where(mv.c.version == version).values(status="serving", serving_since=sa.func.now()))
    retired = conn.execute(sa.select(mv.c.version).where(mv.c.status == "retired")
                           .order_by(mv.c.serving_since.desc().nulls_last(), mv.c.created_at.desc())).scalars().all()
    dropped = retired[RETIRED_VERSIONS_KEPT:]
    for old in dropped:
        drop_version_partitions(conn, old)
    return {**timings, "dropped_versions": list(dropped)}


@accepts_engine
def reject_model(conn: sa.Connection, version: str, reason: str) -> None:
    """Mark a candidate as rejected by the quality gate, with the reason shown in the UI."""
    mv = schema.model_versions
    if get_model(conn, version)["status"] in ("promoted", "serving"):
        raise ValueError(f"model {version!r} is promoted or serving: promote another version before rejecting it")
    conn.execute(mv.update().where(mv.c.version == version).values(status="rejected", gate_reason=reason))


# --- similarity search ------------------------------------------------------------------------


@accepts_engine
def similar_products(conn: sa.Connection, product_id: int, k: int = 10,
                     model_version: str | None = None) -> list[tuple[int, str | None, str | None, float]]:
    """The ``k`` nearest products by cosine distance of fused embeddings (HNSW index).

    Returns (product_id, title, article_type, distance); article_type is a reviewer's value
    (``product_reviews``), else the model's tag, else the catalog label. Uses the serving model
    unless a version is given.
    """
    if model_version is None:
        serving = serving_model(conn)
        if serving is None:
            raise NotFound("no serving model: pass model_version, or wait until a promoted model has tagged "
                           "the catalog")
        model_version = serving["version"]
    query_vector = _embedding_of(product_id, model_version)
    if conn.execute(sa.select(sa.literal(1)).where(query_vector.is_not(None))).first() is None:
        raise NotFound(f"product {product_id} has no embedding from model {model_version!r}")
    for setting in SIMILAR_SEARCH_SETTINGS:  # SET LOCAL: ends with the caller's transaction
        conn.exec_driver_sql(setting)
    rows = conn.execute(similar_products_query(product_id, k, model_version))
    return [(int(pid), title, article_type, float(dist)) for pid, title, article_type, dist in rows]


def similar_products_query(product_id: int, k: int, model_version: str) -> sa.Select:
    """ORDER BY embedding <=> (subquery) LIMIT k: the shape the HNSW index serves."""
    e, p, t, r = schema.embeddings, schema.products, schema.tags, schema.product_reviews
    distance = e.c.product_embedding.cosine_distance(_embedding_of(product_id, model_version))
    return (
        sa.select(e.c.product_id, p.c.title, sa.func.coalesce(r.c.label, t.c.article_type, p.c.article_type),
                  distance)
        .select_from(e.join(p, p.c.product_id == e.c.product_id)
                     .outerjoin(t, sa.and_(t.c.product_id == e.c.product_id, t.c.model_version == model_version))
                     .outerjoin(r, sa.and_(r.c.product_id == e.c.product_id, r.c.head == PRIMARY_HEAD)))
        .where(e.c.model_version == model_version, e.c.product_id != product_id, p.c.deleted_at.is_(None))
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
