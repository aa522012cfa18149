"""Latency of the "Catalog tagging" Airflow page on the full catalog (44k products).

    .venv/bin/python benchmarks/dashboard_latency.py [--repeat 20] [--products N] [--backfill 0.5]

Fills a fresh database on an embedded PostgreSQL (pgvector) with the real ``styles.csv`` products
and SYNTHETIC model versions, runs, tags and embeddings (the real tagged catalog is not needed:
query cost depends on row counts, not on label quality), starts a real Airflow api-server with
the plugin, then times authenticated HTTP requests to the page and its endpoints, and each
dashboard query on its own. Prints a table and writes ``benchmarks/results/dashboard.json``.
The object store is the shared data folder itself (``images/<id>.jpg``), read in place.

The seeded registry ends as it does in production: the newest passing version is *serving*
(promoted, its partition loaded by a backfill, then activated: HNSW + confidence indexes built,
``tag_stats`` kept by every write). ``--backfill F`` also leaves a newer *promoted* version that
has tagged a share F of the catalog (the page's backfill line; its rows sit in their own partition).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fashion_tagging import dashboard  # noqa: E402
from fashion_tagging.catalog import load_kaggle_catalog  # noqa: E402
from fashion_tagging.db import repository  # noqa: E402
from fashion_tagging.db.engine import (  # noqa: E402
    embedded_postgres_url, engine_for_url, ensure_database, migrate, stop_embedded_postgres)
from fashion_tagging.settings import HEADS, PRIMARY_HEAD, PRODUCT_EMBEDDING_DIM, get_settings  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "dashboard.json"
# (version, backbone, fused articleType accuracy, image-only, text-only, final status)
SYNTHETIC_VERSIONS = (
    ("v001", "efficientnet-lite0", 0.884, 0.842, 0.801, "retired"),
    ("v002", "efficientnet-lite0", 0.903, 0.861, 0.812, "rejected"),
    ("v003", "efficientnet-b0", 0.927, 0.889, 0.815, "serving"),
)
# A newer version that passed the gate and is still tagging the catalog (seeded with --backfill).
BACKFILL_VERSION = ("v004", "efficientnet-b0", 0.936, 0.893, 0.822, "promoted")
SYNTHETIC_RUNS = 12
WRITE_BATCH = 5000


# --- synthetic catalog -------------------------------------------------------------------------


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


# --- timing ------------------------------------------------------------------------------------


def time_calls(call, repeat: int) -> dict:
    """p50 / p95 / max milliseconds of ``repeat`` calls after one warm-up call."""
    call()
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    return {"p50_ms": round(statistics.median(samples), 2),
            "p95_ms": round(samples[min(len(samples) - 1, int(0.95 * len(samples)))], 2),
            "max_ms": round(samples[-1], 2), "n": repeat}


def http_timings(base_url: str, token: str, product_id: int, version: str, repeat: int) -> dict:
    import requests

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"

    def get(path: str):
        def call():
            response = session.get(f"{base_url}/catalog-tagging/{path}", timeout=60)
            response.raise_for_status()
        return call

    return {
        "GET page (all sections)": time_calls(get(""), repeat),
        "GET similar products (k=12)": time_calls(get(f"similar?product_id={product_id}"), repeat),
        "GET thumbnail": time_calls(get(f"thumbnail/{product_id}"), repeat),
        "GET confusion PNG": time_calls(get(f"confusion/{version}.png"), repeat),
    }


def query_timings(engine: sa.Engine, version: str, product_id: int, repeat: int) -> dict:
    def query(function, *args):
        def call():
            with dashboard.read_only(engine) as conn:
                function(conn, *args)
        return call

    return {
        "query model_registry": time_calls(query(dashboard.model_registry), repeat),
        "query latest_evaluation": time_calls(query(dashboard.latest_evaluation), repeat),
        "query recent_runs": time_calls(query(dashboard.recent_runs), repeat),
        "query backfill_progress": time_calls(query(dashboard.backfill_progress), repeat),
        "query catalog_counts": time_calls(query(dashboard.catalog_counts, version), repeat),
        "query category_distribution": time_calls(query(dashboard.category_distribution, version), repeat),
        "query confidence_histogram": time_calls(query(dashboard.confidence_histogram, version), repeat),
        "query low_confidence_products": time_calls(query(dashboard.low_confidence_products, version), repeat),
        "query similar_products": time_calls(query(dashboard.similar_products, product_id, version), repeat),
        "query overview (whole page)": time_calls(query(dashboard.overview), repeat),
    }


def main() -> None:
    from tests.airflow_api_server import AirflowApiServer, api_token

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--products", type=int, default=None, help="catalog subset (default: all)")
    parser.add_argument("--backfill", type=float, default=0.0,
                        help="also seed a promoted version that has tagged this share of the catalog")
    args = parser.parse_args()
    settings = get_settings()
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        pgdata = Path(tmp) / "pgdata"
        server_url = embedded_postgres_url(pgdata, durable=False)
        try:
            catalog_url = ensure_database(server_url, "catalog")
            engine = engine_for_url(catalog_url)
            migrate(engine)
            began = time.perf_counter()
            products = catalog_products(settings.data_dir, args.products)
            version = seed_synthetic_catalog(engine, products, Path(tmp) / "models", backfill=args.backfill)
            seed_seconds = time.perf_counter() - began
            product_id = int(products["id"].iloc[len(products) // 2])
            results = query_timings(engine, version, product_id, args.repeat)
            env = {"FT_DATABASE_URL": catalog_url, "FT_HOME": tmp, "FT_OBJECT_STORE_URL": settings.data_dir.as_uri()}
            with AirflowApiServer(Path(tmp) / "airflow", ensure_database(server_url, "airflow"), env) as server:
                results.update(http_timings(server.base_url, api_token(server), product_id, version, args.repeat))
        finally:
            stop_embedded_postgres(pgdata)
    report = {
        "what": "Catalog tagging page: authenticated HTTP GETs to a real Airflow api-server (1 uvicorn worker) "
                "and each dashboard query alone; catalog = real styles.csv products + synthetic tags/embeddings",
        "products": len(products), "tagged": len(products), "serving_version": version,
        "backfilling_share": args.backfill or None, "seed_seconds": round(seed_seconds, 1),
        "machine": f"{platform.machine()}, {_cpus()} CPUs",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine skews timings
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "timings": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report['products']:,} products, {report['tagged']:,} tagged; {report['machine']}, "
          f"load average {report['load_average_1m_at_end']}")
    print(f"{'measurement':<36}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for name, timing in report["timings"].items():
        print(f"{name:<36}{timing['p50_ms']:>10.1f}{timing['p95_ms']:>10.1f}{timing['max_ms']:>10.1f}")
    print(f"results: {RESULTS.relative_to(REPO)}")


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


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
