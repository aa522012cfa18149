"""A catalog database seeded with real products and SYNTHETIC registry, runs, tags and embeddings.

Query cost depends on row counts, not on label quality, so the dashboard's tests and its latency
benchmark (``benchmarks/dashboard_latency.py``) share this seeding instead of training a model.

The seeded registry ends as it does in production: the newest passing version is *serving*
(promoted, its partition loaded by a backfill, then activated: HNSW + confidence indexes built,
``tag_stats`` kept by every write). ``backfill`` > 0 also leaves a newer *promoted* version that
has tagged that share of the catalog (its rows sit in their own partition).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import sqlalchemy as sa

from fashion_tagging import dashboard
from fashion_tagging.catalog import load_kaggle_catalog
from fashion_tagging.db import repository
from fashion_tagging.settings import HEADS, PRIMARY_HEAD, PRODUCT_EMBEDDING_DIM

# (version, backbone, fused articleType accuracy, image-only, text-only, final status)
SYNTHETIC_VERSIONS = (
    ("v001", "efficientnet-lite0", 0.884, 0.842, 0.801, "retired"),
    ("v002", "efficientnet-lite0", 0.903, 0.861, 0.812, "rejected"),
    ("v003", "efficientnet-b0", 0.927, 0.889, 0.815, "serving"),
)
# A newer version that passed the gate and is still tagging the catalog (seeded when backfill > 0).
BACKFILL_VERSION = ("v004", "efficientnet-b0", 0.936, 0.893, 0.822, "promoted")
SYNTHETIC_RUNS = 12
WRITE_BATCH = 5000


def catalog_products(data_dir: Path, limit: int | None = None) -> pd.DataFrame:
    """The real catalog rows with ``image_key`` = ``images/<id>.jpg`` (a store rooted at ``data_dir``)."""
    products = load_kaggle_catalog(data_dir).products
    if limit:
        products = products.groupby("articleType", group_keys=False).head(max(2, limit // 40)).head(limit)
    products = products.copy()
    products["image_key"] = [f"images/{pid}.jpg" if path else None
                             for pid, path in zip(products["id"], products["image_path"], strict=True)]
    return products.reset_index(drop=True)


def synthetic_metrics(products: pd.DataFrame, accuracy: dict[str, float], rng: np.random.Generator) -> dict:
    """An evaluation report in the docs/DESIGN.md shape, with plausible per-class scores."""
    labels = products[PRIMARY_HEAD].value_counts()
    per_class = {}
    for label, count in labels.items():
        recall = float(np.clip(rng.normal(accuracy["fused"], 0.12), 0.0, 1.0))
        precision = float(np.clip(rng.normal(accuracy["fused"], 0.1), 0.0, 1.0))
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": max(1, int(count) // 10)}
    modes = {"fused": {head: {"accuracy": min(0.99, accuracy["fused"] + 0.02 * i), "macro_f1": accuracy["fused"] - 0.08,
                              "n": len(products) // 10} for i, head in enumerate(HEADS)}}
    modes["fused"][PRIMARY_HEAD]["per_class"] = per_class
    for mode in ("image_only", "text_only"):
        modes[mode] = {PRIMARY_HEAD: {"accuracy": accuracy[mode], "macro_f1": accuracy[mode] - 0.1}}
    return {"test": {"split": "test", "baseline": 0.91, "article_type_accuracy": accuracy["fused"], "modes": modes}}


def synthetic_predictions(products: pd.DataFrame, accuracy: float, rng: np.random.Generator) -> SimpleNamespace:
    """Predictions shaped like ``Tagger.predict`` output: mostly right labels, clustered embeddings."""
    n = len(products)
    truth = products[PRIMARY_HEAD].to_numpy()
    classes = np.unique(truth)
    correct = rng.random(n) < accuracy
    predicted = np.where(correct, truth, rng.choice(classes, n))
    confidence = np.where(correct, rng.beta(8, 1.5, n), rng.beta(2, 3, n))
    centroids = {label: rng.normal(size=PRODUCT_EMBEDDING_DIM) for label in classes}
    embeddings = np.stack([centroids[label] for label in truth]) + rng.normal(scale=0.6, size=(n, PRODUCT_EMBEDDING_DIM))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = {head: products[head].tolist() for head in HEADS}
    labels[PRIMARY_HEAD] = predicted.tolist()
    confidences = {head: np.full(n, 0.95) for head in HEADS}
    confidences[PRIMARY_HEAD] = confidence
    return SimpleNamespace(
        labels=labels, confidences=confidences,
        top_k={head: [[(label, float(conf))] for label, conf in zip(labels[head], confidences[head], strict=True)]
               for head in HEADS},
        has_image=products["image_key"].notna().to_numpy(), has_text=np.ones(n, dtype=bool),
        image_embeddings=[None] * n, product_embeddings=embeddings.astype(np.float32))


def seed_synthetic_catalog(engine: sa.Engine, products: pd.DataFrame, artifacts_dir: Path, *, seed: int = 7,
                           backfill: float = 0.0) -> str:
    """Products, a registry history, runs, and the serving model's tags + embeddings; returns its version.

    The serving version goes the production way: promoted, its partition loaded, then activated
    (indexes built after the load). With ``backfill`` > 0 a newer version is promoted too and has
    tagged that share of the catalog (it does not serve: readers keep the serving version).
    """
    rng = np.random.default_rng(seed)
    start = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
    versions = SYNTHETIC_VERSIONS + ((BACKFILL_VERSION,) if backfill > 0 else ())
    with engine.begin() as conn:
        repository.upsert_products(conn, products)
        for week, (version, backbone, fused, image_only, text_only, status) in enumerate(versions):
            accuracy = {"fused": fused, "image_only": image_only, "text_only": text_only}
            repository.register_model(conn, version, backbone, 224, backbone == "efficientnet-b0",
                                      str(artifacts_dir / version), synthetic_metrics(products, accuracy, rng), fused)
            conn.execute(sa.text("UPDATE model_versions SET created_at = :at WHERE version = :version"),
                         {"at": start + timedelta(weeks=week), "version": version})
            if status == "retired":  # served before v003 (its partitions long dropped)
                conn.execute(sa.text("UPDATE model_versions SET status = 'retired' WHERE version = :version"),
                             {"version": version})
            elif status == "rejected":
                repository.reject_model(conn, version, f"articleType accuracy {fused:.3f} below the production model")
    serving = SYNTHETIC_VERSIONS[-1]
    _seed_runs(engine, serving[0], len(products), start + timedelta(weeks=len(SYNTHETIC_VERSIONS)), rng)
    _seed_lifecycle(engine, serving[0], start + timedelta(weeks=len(SYNTHETIC_VERSIONS)))
    ids = products["id"].astype(int).tolist()
    repository.promote_model(engine, serving[0])
    _write_tags(engine, serving[0], ids, synthetic_predictions(products, serving[2], rng))
    repository.activate_model(engine, serving[0])  # builds the partition's HNSW + confidence indexes
    write_stand_in_confusion_png(artifacts_dir / serving[0])
    if backfill > 0:
        promoted = BACKFILL_VERSION
        repository.promote_model(engine, promoted[0])
        share = max(1, int(len(ids) * min(backfill, 1.0)))
        _write_tags(engine, promoted[0], ids[:share], _rows(synthetic_predictions(products, promoted[2], rng),
                                                             slice(0, share)))
        write_stand_in_confusion_png(artifacts_dir / promoted[0])
    settle(engine, serving[0])
    return serving[0]


def _write_tags(engine: sa.Engine, version: str, ids: list[int], predictions: SimpleNamespace) -> None:
    """Tags + embeddings (and tag_stats) of ``version``, WRITE_BATCH products per write, one transaction."""
    with engine.begin() as conn:
        for begin in range(0, len(ids), WRITE_BATCH):
            part = slice(begin, begin + WRITE_BATCH)
            repository.write_tags_and_embeddings(conn, version, "synthetic-run-0", ids[part], _rows(predictions, part))


def settle(engine: sa.Engine, version: str, attempts: int = 20) -> None:
    """VACUUM ANALYZE until the serving partitions' visibility maps are complete (autovacuum caught up).

    A VACUUM racing an autovacuum snapshot taken before the bulk load cannot mark those pages yet,
    so it is retried; the page then reads a settled catalog, as in steady production.
    """
    partitions = [repository.partition_name(table, version) for table in ("tags", "embeddings")]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for _ in range(attempts):
            conn.execute(sa.text("VACUUM ANALYZE"))
            unsettled = conn.execute(sa.text(
                "SELECT count(*) FROM pg_class WHERE relname = ANY(:names) AND relallvisible < relpages"),
                {"names": partitions}).scalar()
            if not unsettled:
                return
            time.sleep(1)


def _rows(predictions: SimpleNamespace, part: slice) -> SimpleNamespace:
    """A slice of every field of a predictions namespace."""
    return SimpleNamespace(**{name: ({head: values[part] for head, values in field.items()}
                                     if isinstance(field, dict) else field[part])
                              for name, field in vars(predictions).items()})


def _seed_runs(engine: sa.Engine, version: str, products: int, first_night: datetime, rng: np.random.Generator) -> None:
    with engine.begin() as conn:
        for night in range(SYNTHETIC_RUNS):
            run_id = f"scheduled__{(first_night + timedelta(days=night)).date()}"
            seen = products if night == 0 else int(rng.integers(200, 2500))
            errors = int(rng.integers(0, 12))
            repository.start_run(conn, run_id, model_version=version)
            # A real run stores its summary in details; the page reads the catalog size from there.
            repository.finish_run(conn, run_id, status="failed" if night == 7 else "success", products_seen=seen,
                                  products_tagged=seen - errors, errors=errors, batches=max(1, seen // 1000),
                                  seconds=float(seen / rng.uniform(150, 400)), details={"products_total": products})
            conn.execute(sa.text("UPDATE tagging_runs SET started_at = :at WHERE run_id = :run_id"),
                         {"at": first_night + timedelta(days=night), "run_id": run_id})


# Gate figures of the seeded versions: (version, promote, production it was paired with, its accuracy on the
# same products, discordant pairs (candidate only, production only), p-value).
SYNTHETIC_GATES = (
    ("v002", False, "v001", 0.884, (41, 30), 0.1181),
    ("v003", True, "v001", 0.884, (95, 27), 2.1e-10),
    ("v004", True, "v003", 0.927, (58, 18), 3.2e-06),
)


def _seed_lifecycle(engine: sa.Engine, serving: str, first_night: datetime) -> None:
    """Gate decisions in the registry's metrics, and drift figures for the last two runs (the last one alerts)."""
    with engine.begin() as conn:
        for version, promote, production, production_accuracy, (b, c), p_value in SYNTHETIC_GATES:
            candidate = conn.execute(sa.text("SELECT article_type_accuracy FROM model_versions WHERE version = :v"),
                                     {"v": version}).scalar()
            if candidate is None:
                continue
            gate = {"promote": promote, "candidate_version": version, "candidate_accuracy": candidate,
                    "production_version": production, "production_accuracy": production_accuracy,
                    "paired_products": 4378, "candidate_only_right": b, "production_only_right": c,
                    "p_value": p_value, "significance": 0.05, "baseline": 0.91,
                    "reason": "significantly better than production" if promote else "not significantly better"}
            conn.execute(sa.text("UPDATE model_versions SET metrics = metrics || jsonb_build_object('gate', "
                                 "CAST(:gate AS jsonb)) WHERE version = :v"), {"gate": json.dumps(gate), "v": version})
        for night, (category_js, alert) in ((SYNTHETIC_RUNS - 2, (0.012, False)), (SYNTHETIC_RUNS - 1, (0.41, True))):
            run_id = f"scheduled__{(first_night + timedelta(days=night)).date()}"
            repository.record_drift(conn, {
                "run_id": run_id, "model_version": serving, "products": 1500, "category_js": category_js,
                "category_psi": category_js * 8, "confidence_js": 0.01, "confidence_psi": 0.05, "threshold": 0.1,
                "alert": alert, "details": {"verdict": "drift" if alert else "no drift", "min_products": 100,
                                            "top_shifts": [{"label": "Watches", "run_share": 0.6,
                                                            "training_share": 0.06}]}})
            conn.execute(sa.text("UPDATE tagging_drift SET measured_at = :at WHERE run_id = :run_id"),
                         {"at": first_night + timedelta(days=night, hours=1), "run_id": run_id})


def write_stand_in_confusion_png(directory: Path) -> None:
    """A stand-in confusion picture, since the synthetic versions have no real evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(5, 5))
    matrix = np.eye(12) * 0.9 + np.random.default_rng(1).random((12, 12)) * 0.1
    axes.imshow(matrix, cmap="Blues")
    axes.set_title("synthetic confusion (articleType)")
    figure.savefig(directory / dashboard.CONFUSION_PNG, dpi=80)
    plt.close(figure)
