"""Read-only queries behind the "Catalog tagging" Airflow UI page (``plugins/catalog_tagging_plugin.py``).

Every function takes an open connection from :func:`read_only` and returns plain data (dicts and
lists) that the page template renders; nothing here writes or knows about Airflow. The metrics
JSON of a model version is the evaluation report described in docs/DESIGN.md; it is read
defensively because older or partial reports may lack parts of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa

from fashion_tagging.db import repository
from fashion_tagging.objectstore import ObjectNotFound, local_path, open_uri
from fashion_tagging.review import reviewed_label_sql
from fashion_tagging.settings import HEADS, PRIMARY_HEAD, Settings

EVALUATION_MODES = ("fused", "image_only", "text_only")
CONFUSION_PNG = f"confusion_{PRIMARY_HEAD}.png"
REGISTRY_LIMIT = 30
RUNS_LIMIT = 20
TOP_CATEGORIES = 15
CONFIDENCE_BINS = 20
LOW_CONFIDENCE_LIMIT = 24
WEAK_SPOTS_LIMIT = 12
SIMILAR_LIMIT = 12
GATE_LIMIT = 10
DRIFT_LIMIT = 20


@contextlib.contextmanager
def read_only(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection inside a READ ONLY transaction: the page can never write to the catalog."""
    with engine.connect() as conn:
        with conn.begin():
            conn.execute(sa.text("SET TRANSACTION READ ONLY"))
            yield conn


# --- model registry and evaluation ---------------------------------------------------------------


def evaluation_modes(metrics: dict | None) -> dict[str, dict]:
    """``{mode: {head: scores}}`` of a report (test split preferred), with or without the ``modes`` level."""
    report = (metrics or {}).get("test") or (metrics or {}).get("val") or {}
    modes = report.get("modes", report) if isinstance(report, dict) else {}
    return {mode: modes[mode] for mode in EVALUATION_MODES if isinstance(modes.get(mode), dict)}


def head_scores(metrics: dict | None, head: str, mode: str = "fused") -> dict:
    """Scores of one head in one mode (``accuracy``, ``macro_f1``, ``per_class``...), ``{}`` if absent."""
    scores = evaluation_modes(metrics).get(mode, {}).get(head)
    return scores if isinstance(scores, dict) else {}


def model_registry(conn: sa.Connection) -> list[dict]:
    """Model versions, oldest first, with per-head fused accuracy and articleType accuracy per mode."""
    rows = conn.execute(sa.text("""
        SELECT version, backbone, image_size, fine_tuned, status, gate_reason, created_at, promoted_at,
               article_type_accuracy, metrics
        FROM (SELECT * FROM model_versions ORDER BY created_at DESC, version DESC LIMIT :limit) AS latest
        ORDER BY created_at, version
    """), {"limit": REGISTRY_LIMIT}).mappings()
    return [_registry_entry(row) for row in rows]


def _registry_entry(row) -> dict:
    metrics = row["metrics"] or {}
    accuracy = {head: head_scores(metrics, head).get("accuracy") for head in HEADS}
    if row["article_type_accuracy"] is not None:
        accuracy[PRIMARY_HEAD] = row["article_type_accuracy"]
    entry = {key: row[key] for key in row.keys() if key != "metrics"}
    entry["accuracy"] = accuracy
    entry["primary_accuracy_by_mode"] = {
        mode: accuracy[PRIMARY_HEAD] if mode == "fused" else head_scores(metrics, PRIMARY_HEAD, mode).get("accuracy")
        for mode in EVALUATION_MODES
    }
    return entry


def latest_evaluation(conn: sa.Connection) -> dict | None:
    """The newest evaluated version, its primary-head scores and its weakest classes (lowest F1, recall)."""
    row = conn.execute(sa.text("""
        SELECT version, status, metrics FROM model_versions
        WHERE metrics -> 'test' IS NOT NULL OR metrics -> 'val' IS NOT NULL
        ORDER BY created_at DESC, version DESC LIMIT 1
    """)).mappings().first()
    if row is None:
        return None
    scores = head_scores(row["metrics"], PRIMARY_HEAD)
    return {
        "version": row["version"],
        "status": row["status"],
        "accuracy": scores.get("accuracy"),
        "macro_f1": scores.get("macro_f1"),
        "weak_spots": weak_spots(row["metrics"]),
    }


def weak_spots(metrics: dict | None, limit: int = WEAK_SPOTS_LIMIT) -> list[dict]:
    """Primary-head classes with the lowest F1 then recall (classes without test products are skipped)."""
    per_class = head_scores(metrics, PRIMARY_HEAD).get("per_class")
    if isinstance(per_class, dict):
        classes = [{"label": label, **scores} for label, scores in per_class.items() if isinstance(scores, dict)]
    else:  # a report that only kept its precomputed list
        report = (metrics or {}).get("test") or {}
        classes = [spot for spot in report.get("weak_spots") or [] if isinstance(spot, dict)]
    classes = [spot for spot in classes if (spot.get("support") or 0) > 0]
    classes.sort(key=lambda spot: (spot.get("f1") or 0.0, spot.get("recall") or 0.0, str(spot.get("label"))))
    return classes[:limit]


def artifact_uri(conn: sa.Connection, version: str) -> str | None:
    """Where a registered version's artifact lives; None for an unknown version."""
    return conn.execute(sa.text("SELECT artifact_uri FROM model_versions WHERE version = :version"),
                        {"version": version}).scalar()


def read_artifact_file(settings: Settings, version: str, uri: str | None, name: str) -> bytes | None:
    """A file of a model artifact: the local copy under the artifacts dir, else where ``uri`` points."""
    local = settings.artifacts_dir / version / name
    if local.is_file():
        return local.read_bytes()
    if not uri:
        return None
    directory = local_path(uri)
    if directory is None:  # in S3: this one file, not the whole artifact
        store, prefix = open_uri(uri, endpoint_url=settings.s3_endpoint_url)
        try:
            return store.get(f"{prefix}/{name}")
        except ObjectNotFound:
            return None
    path = directory / name
    return path.read_bytes() if path.is_file() else None


def gate_decisions(conn: sa.Connection, limit: int = GATE_LIMIT) -> list[dict]:
    """The latest promotion-gate decisions, newest first: the candidate, the production model it was
    paired with, both accuracies on the same test products, the discordant pairs, the p-value."""
    rows = conn.execute(sa.text("""
        SELECT version, status, gate_reason, created_at, metrics -> 'gate' AS gate FROM model_versions
        WHERE metrics ? 'gate' ORDER BY created_at DESC, version DESC LIMIT :limit
    """), {"limit": limit}).mappings()
    decisions = []
    for row in rows:
        gate = row["gate"] if isinstance(row["gate"], dict) else {}
        decisions.append({"version": row["version"], "status": row["status"], "created_at": row["created_at"],
                          "reason": gate.get("reason") or row["gate_reason"], "promote": gate.get("promote"),
                          **{key: gate.get(key) for key in (
                              "candidate_accuracy", "production_version", "production_accuracy", "paired_products",
                              "candidate_only_right", "production_only_right", "p_value", "significance",
                              "baseline")}})
    return decisions


def drift_history(conn: sa.Connection, limit: int = DRIFT_LIMIT) -> list[dict]:
    """Drift of the latest tagging runs against their model's training distribution, oldest first."""
    rows = conn.execute(sa.text("""
        SELECT run_id, model_version, products, category_js, category_psi, confidence_js, confidence_psi,
               threshold, alert, details ->> 'verdict' AS verdict, details -> 'top_shifts' AS top_shifts,
               (details ->> 'min_products')::int AS min_products, measured_at
        FROM (SELECT * FROM tagging_drift ORDER BY measured_at DESC, run_id DESC LIMIT :limit) AS latest
        ORDER BY measured_at, run_id
    """), {"limit": limit}).mappings()
    return [dict(row) for row in rows]


# --- tagging runs and predictions --------------------------------------------------------------


def recent_runs(conn: sa.Connection, limit: int = RUNS_LIMIT) -> list[dict]:
    """The latest tagging runs, oldest first (chart order)."""
    rows = conn.execute(sa.text("""
        SELECT run_id, model_version, status, started_at, finished_at, products_seen, products_tagged,
               errors, batches, seconds, products_per_second
        FROM (SELECT * FROM tagging_runs ORDER BY started_at DESC, run_id DESC LIMIT :limit) AS latest
        ORDER BY started_at, run_id
    """), {"limit": limit}).mappings()
    return [dict(row) for row in rows]


def displayed_version(conn: sa.Connection) -> str | None:
    """Whose tags the page shows: the serving model (a promoted one only once it covers the catalog)."""
    serving = repository.serving_model(conn)
    return serving["version"] if serving else None


def backfill_progress(conn: sa.Connection) -> dict | None:
    """The promoted model still tagging the catalog: how far it got (from aggregates, no scan of tags)."""
    row = conn.execute(sa.text("""
        SELECT mv.version, mv.promoted_at,
               (SELECT coalesce(sum(products), 0) FROM tag_stats s WHERE s.model_version = mv.version) AS tagged
        FROM model_versions mv WHERE mv.status = 'promoted'
    """)).mappings().first()
    return dict(row) if row else None


def category_distribution(conn: sa.Connection, version: str, top: int = TOP_CATEGORIES) -> list[dict]:
    """Products per predicted articleType, the ``top`` largest then the rest summed as "(other)"."""
    rows = conn.execute(sa.text("""
        SELECT article_type AS label, sum(products)::bigint AS products FROM tag_stats
        WHERE model_version = :version GROUP BY article_type HAVING sum(products) > 0 ORDER BY products DESC, label
    """), {"version": version}).mappings().all()
    shown = [dict(row) for row in rows[:top]]
    rest = sum(row["products"] for row in rows[top:])
    if rest:
        shown.append({"label": f"(other {len(rows) - top})", "products": rest, "other": True})
    return shown


def confidence_histogram(conn: sa.Connection, version: str, bins: int = CONFIDENCE_BINS) -> list[dict]:
    """Counts of primary-head confidence in ``bins`` equal bins over [0, 1] (1.0 falls in the last).

    Read from ``tag_stats`` (kept in :data:`repository.CONFIDENCE_BINS` bins by every write),
    regrouped when the page asks for fewer bins.
    """
    stored = repository.CONFIDENCE_BINS
    if stored % bins:
        raise ValueError(f"the histogram has {stored} stored bins: ask for a divisor of it, not {bins}")
    counts = dict(conn.execute(sa.text("""
        SELECT (confidence_bin - 1) / :per + 1 AS bin, sum(products)::bigint FROM tag_stats
        WHERE model_version = :version GROUP BY 1
    """), {"version": version, "per": stored // bins}).all())
    return [{"low": (i - 1) / bins, "high": i / bins, "products": counts.get(i, 0)} for i in range(1, bins + 1)]


def low_confidence_products(conn: sa.Connection, version: str, limit: int = LOW_CONFIDENCE_LIMIT) -> list[dict]:
    """The least confident primary-head predictions: the products a person should review first.

    The label shown is a reviewer's value where there is one (``fashion_tagging.review``).

    Served by the version partition's (confidence, product_id) index, built when it started serving.
    """
    rows = conn.execute(sa.text(f"""
        SELECT t.product_id, p.title,
               coalesce({reviewed_label_sql('t.product_id')}, t.article_type) AS label,
               t.article_type_confidence AS confidence
        FROM tags t JOIN products p ON p.product_id = t.product_id
        WHERE t.model_version = :version AND p.deleted_at IS NULL
        ORDER BY t.article_type_confidence, t.product_id
        LIMIT :limit
    """), {"version": version, "limit": limit}).mappings()
    return [dict(row) for row in rows]


def catalog_counts(conn: sa.Connection, version: str | None) -> dict:
    """Products in the catalog (as the last tagging run counted them) and products tagged by ``version``."""
    products = conn.execute(sa.text("""
        SELECT (details ->> 'products_total')::bigint FROM tagging_runs
        WHERE details ? 'products_total' ORDER BY started_at DESC LIMIT 1
    """)).scalar()
    if products is None:  # no run counted yet: a young catalog, cheap to count
        products = conn.execute(sa.text("SELECT count(*) FROM products WHERE deleted_at IS NULL")).scalar()
    tagged = conn.execute(sa.text("SELECT coalesce(sum(products), 0)::bigint FROM tag_stats "
                                  "WHERE model_version = :version"), {"version": version}).scalar()
    return {"products": int(products), "tagged": int(tagged)}


def overview(conn: sa.Connection) -> dict:
    """Everything the page shows on load, from one read-only transaction (no query scans tags)."""
    version = displayed_version(conn)
    has_tags = version is not None
    return {
        "registry": model_registry(conn),
        "evaluation": latest_evaluation(conn),
        "runs": recent_runs(conn),
        "version": version,
        "backfill": backfill_progress(conn),
        "counts": catalog_counts(conn, version),
        "categories": category_distribution(conn, version) if has_tags else [],
        "confidence": confidence_histogram(conn, version) if has_tags else [],
        "low_confidence": low_confidence_products(conn, version) if has_tags else [],
        "gate_decisions": gate_decisions(conn),
        "drift": drift_history(conn),
    }


# --- products ----------------------------------------------------------------------------------


def product_cards(conn: sa.Connection, product_ids: list[int], version: str | None) -> list[dict]:
    """Title and label of products (a reviewer's value, else the model's), in the order of ``product_ids``
    (deleted ones left out)."""
    if not product_ids:
        return []
    rows = conn.execute(sa.text(f"""
        SELECT p.product_id, p.title,
               coalesce({reviewed_label_sql('p.product_id')}, t.article_type) AS label,
               t.article_type_confidence AS confidence
        FROM products p
        LEFT JOIN tags t ON t.product_id = p.product_id AND t.model_version = :version
        WHERE p.product_id = ANY(:ids) AND p.deleted_at IS NULL
    """), {"ids": list(product_ids), "version": version}).mappings()
    by_id = {row["product_id"]: dict(row) for row in rows}
    return [by_id[product_id] for product_id in product_ids if product_id in by_id]


def similar_products(conn: sa.Connection, product_id: int, version: str | None,
                     limit: int = SIMILAR_LIMIT) -> dict | None:
    """A product and its nearest neighbours by fused embedding; None when it has no embedding."""
    if version is None:
        return None
    try:
        neighbours = repository.similar_products(conn, product_id, limit, model_version=version)
    except repository.NotFound:
        return None
    return {
        "product": next(iter(product_cards(conn, [product_id], version)), None),
        "neighbours": [{"product_id": pid, "title": title, "label": label, "distance": distance}
                       for pid, title, label, distance in neighbours],
    }


def image_key(conn: sa.Connection, product_id: int) -> str | None:
    """Object-store key of a product photo; None when the product is missing or deleted, or has no photo."""
    return conn.execute(sa.text("SELECT image_key FROM products WHERE product_id = :product_id "
                                "AND deleted_at IS NULL"),
                        {"product_id": product_id}).scalar()
