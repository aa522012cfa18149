"""Catalog database speed on this machine: tag + embedding writes and similar-product queries.

1. Write throughput of tag + embedding rows (256-d fused product vectors, random; the 1280-d
   image embedding is no longer stored), in tagging-sized batches of one transaction each, into
   a model version's own partition of ``tags`` / ``embeddings``, in its two states:
   * ``hnsw_index`` true: the *serving* version's partition (promoted then activated, so the
     HNSW and confidence indexes exist and every write maintains them): nightly new arrivals;
   * ``hnsw_index`` false: a *promoted* version's partition, primary keys only: its backfill
     (the indexes are built once at activation; see the build time in part 2).
   The write path is ``write_tags_and_embeddings`` (COPY, then an upsert through a temp table
   for rows already there; it also keeps the version's ``tag_stats`` in the same transaction).
2. Similar-product query latency (p50/p95 of ``repository.similar_products``) on the real
   44,441-product catalog (ids, titles, article types from styles.csv) with SYNTHETIC embeddings
   clustered by article type (no trained model needed): the version is promoted, its partition
   bulk-loaded, then activated (``repository.activate_model`` builds the indexes after the load,
   timed); exact brute-force scan for comparison, and the HNSW recall@k against it.

Runs a throw-away embedded PostgreSQL (durable settings) in a temp dir.

    .venv/bin/python benchmarks/storage_benchmark.py [--rows 20000] [--batch 1000] [--queries 300] [--catalog N]

Prints a table and writes benchmarks/results/storage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from fashion_tagging.db import repository, schema  # noqa: E402
from fashion_tagging.db.engine import embedded_postgres_url, engine_for_url, ensure_database, migrate, \
    stop_embedded_postgres  # noqa: E402
from fashion_tagging.settings import PRODUCT_EMBEDDING_DIM, get_settings  # noqa: E402
from tests.fixtures_services import synthetic_predictions  # noqa: E402

RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "storage.json"
VERSION = "bench"
HNSW_INDEX = f"{repository.partition_name('embeddings', VERSION)}_hnsw"  # built by activate_model
LOAD_BATCH = 5000
WARMUP_QUERIES = 20
K = 10
CLUSTER_NOISE = 0.8  # spread of a product around its article type's centre (relative to unit centres)
SEED = 7


def fresh_database(server_url: str, name: str) -> sa.Engine:
    url = ensure_database(server_url, name)
    engine = engine_for_url(url)
    migrate(engine)
    return engine


def prepare_catalog(engine: sa.Engine, products: pd.DataFrame) -> None:
    """Products and a promoted (backfilling) VERSION: its partitions exist, with primary keys only."""
    with engine.begin() as conn:
        repository.upsert_products(conn, products)
        repository.register_model(conn, VERSION, "synthetic", 224, False, "file:///dev/null", {}, None)
        repository.promote_model(conn, VERSION)


def write_throughput(server_url: str, label: str, rows: int, batch: int, *, with_index: bool) -> dict:
    """Rows/s writing ``rows`` tag+embedding rows in ``batch``-sized transactions.

    ``with_index``: into the serving version's indexed partition (activated before the writes),
    else into the promoted version's primary-key-only partition (a backfill).
    """
    engine = fresh_database(server_url, f"bench_write_{label}")
    ids = list(range(1, rows + 1))
    prepare_catalog(engine, pd.DataFrame({"id": ids, "productDisplayName": [f"product {i}" for i in ids]}))
    if with_index:
        repository.activate_model(engine, VERSION)
    with engine.connect() as conn:
        indexes = set(conn.execute(sa.text("SELECT indexname FROM pg_indexes WHERE tablename = :t"),
                                   {"t": repository.partition_name("embeddings", VERSION)}).scalars())
    assert (HNSW_INDEX in indexes) == with_index, indexes
    predictions = synthetic_predictions(rows, seed=SEED)
    batches = [(ids[start:start + batch], _slice(predictions, start, start + batch)) for start in range(0, rows, batch)]
    started = time.perf_counter()
    for batch_ids, batch_predictions in batches:
        with engine.begin() as conn:
            repository.write_tags_and_embeddings(conn, VERSION, "bench", batch_ids, batch_predictions)
    seconds = time.perf_counter() - started
    with engine.connect() as conn:
        written = conn.execute(sa.select(sa.func.count()).select_from(schema.embeddings)).scalar_one()
    assert written == rows, f"{label}: wrote {written} of {rows} rows"
    return {"path": label, "rows": rows, "batch": batch, "hnsw_index": with_index,
            "partition": "serving (HNSW + confidence indexes)" if with_index else "promoted, backfilling (primary key only)",
            "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds, 1)}


def clustered_predictions(products: pd.DataFrame):
    """Synthetic fused embeddings: one random centre per article type, products scattered around it."""
    rng = np.random.default_rng(SEED)
    predictions = synthetic_predictions(len(products), seed=SEED)
    types = products["articleType"].astype("category").cat.codes.to_numpy()
    centres = rng.normal(size=(types.max() + 1, PRODUCT_EMBEDDING_DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.normal(size=(len(products), PRODUCT_EMBEDDING_DIM)) * CLUSTER_NOISE / np.sqrt(PRODUCT_EMBEDDING_DIM)
    vectors = (centres[types] + noise).astype(np.float32)
    predictions.product_embeddings = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    predictions.labels["articleType"] = products["articleType"].tolist()
    return predictions


def query_latency(server_url: str, data_dir: Path, queries: int, catalog: int | None = None) -> dict:
    """p50/p95 of similar_products on the full catalog (or its first ``catalog`` rows); exact scan and
    recall@K for comparison."""
    styles = pd.read_csv(data_dir / "styles.csv", usecols=["id", "articleType", "productDisplayName"],
                         dtype=str, keep_default_na=False, nrows=catalog)
    styles["id"] = styles["id"].astype("int64")
    engine = fresh_database(server_url, "bench_similar")
    prepare_catalog(engine, styles)
    predictions = clustered_predictions(styles)
    ids = styles["id"].tolist()
    with engine.begin() as conn:  # the backfill: into the promoted version's index-less partition
        for start in range(0, len(ids), LOAD_BATCH):
            repository.write_tags_and_embeddings(conn, VERSION, "bench", ids[start:start + LOAD_BATCH],
                                                 _slice(predictions, start, start + LOAD_BATCH))
    started = time.perf_counter()
    activation = repository.activate_model(engine, VERSION)  # indexes after the data, as pgvector recommends
    activate_seconds = time.perf_counter() - started
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
        query = repository.similar_products_query(ids[0], K, VERSION).compile(
            dialect=conn.dialect, compile_kwargs={"literal_binds": True})
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {query}").scalars())

    probe_ids = [int(i) for i in np.random.default_rng(SEED).choice(ids, size=min(queries + WARMUP_QUERIES, len(ids)),
                                                                    replace=False)]
    hnsw_ms, hnsw_results = _timed_queries(engine, probe_ids, exact=False)
    exact_ms, exact_results = _timed_queries(engine, probe_ids[:max(queries // 5, 20) + WARMUP_QUERIES], exact=True)
    recall = np.mean([len(set(hnsw_results[i]) & set(exact_results[i])) / K for i in exact_results])
    return {"products": len(ids), "embeddings": "synthetic, clustered by real articleType", "k": K,
            "queries": len(hnsw_ms), "hnsw_build_seconds": round(activation["hnsw_index_seconds"], 1),
            "confidence_index_build_seconds": round(activation["confidence_index_seconds"], 1),
            "activate_seconds": round(activate_seconds, 1), "uses_hnsw_index": HNSW_INDEX in plan,
            "hnsw_p50_ms": _percentile(hnsw_ms, 50), "hnsw_p95_ms": _percentile(hnsw_ms, 95),
            "exact_p50_ms": _percentile(exact_ms, 50), "exact_p95_ms": _percentile(exact_ms, 95),
            "exact_queries": len(exact_ms), "hnsw_recall_at_k": round(float(recall), 3)}


def _timed_queries(engine: sa.Engine, product_ids: list[int], *, exact: bool) -> tuple[list[float], dict]:
    """Latency per query (one transaction each, like the UI), after WARMUP_QUERIES untimed ones."""
    latencies, results = [], {}
    for n, product_id in enumerate(product_ids):
        started = time.perf_counter()
        with engine.begin() as conn:
            if exact:
                conn.exec_driver_sql("SET LOCAL enable_indexscan = off")
            neighbours = repository.similar_products(conn, product_id, k=K, model_version=VERSION)
        if n >= WARMUP_QUERIES:
            latencies.append((time.perf_counter() - started) * 1000)
            results[product_id] = [row[0] for row in neighbours]
    return latencies, results


def _slice(predictions, start: int, stop: int):
    """Rows start:stop of a TagPredictions."""
    import dataclasses

    return dataclasses.replace(
        predictions,
        labels={h: v[start:stop] for h, v in predictions.labels.items()},
        confidences={h: v[start:stop] for h, v in predictions.confidences.items()},
        top_k={h: v[start:stop] for h, v in predictions.top_k.items()},
        image_embeddings=predictions.image_embeddings[start:stop],
        product_embeddings=predictions.product_embeddings[start:stop],
        has_image=predictions.has_image[start:stop], has_text=predictions.has_text[start:stop])


def _percentile(values: list[float], q: int) -> float:
    return round(float(np.percentile(values, q)), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="tag+embedding rows per write path")
    parser.add_argument("--batch", type=int, default=get_settings().tagging_batch_size)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--catalog", type=int, default=None, help="first N styles.csv rows (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ft-storage-bench-") as folder:
        pgdata = Path(folder) / "pgdata"
        server_url = embedded_postgres_url(pgdata, durable=True)
        try:
            writes = [
                write_throughput(server_url, "copy_upsert", args.rows, args.batch, with_index=True),
                write_throughput(server_url, "copy_upsert_no_hnsw", args.rows, args.batch, with_index=False),
            ]
            similar = query_latency(server_url, get_settings().data_dir, args.queries, args.catalog)
        finally:
            stop_embedded_postgres(pgdata)

    print(f"\nTag + embedding writes ({args.rows} rows, batches of {args.batch}, one transaction each)")
    print(f"{'path':<26} {'partition':<10} {'HNSW':>5} {'seconds':>9} {'rows/s':>9}")
    for row in writes:
        print(f"{row['path']:<26} {'serving' if row['hnsw_index'] else 'promoted':<10} "
              f"{'yes' if row['hnsw_index'] else 'no':>5} {row['seconds']:>9.2f} {row['rows_per_second']:>9.1f}")
    print(f"\nSimilar products, k={K}, {similar['products']} products ({similar['embeddings']} embeddings)")
    print(f"{'method':<14} {'p50 ms':>8} {'p95 ms':>8}")
    print(f"{'HNSW':<14} {similar['hnsw_p50_ms']:>8.2f} {similar['hnsw_p95_ms']:>8.2f}")
    print(f"{'exact scan':<14} {similar['exact_p50_ms']:>8.2f} {similar['exact_p95_ms']:>8.2f}")
    print(f"HNSW recall@{K}: {similar['hnsw_recall_at_k']}, index build {similar['hnsw_build_seconds']} s "
          f"(activation {similar['activate_seconds']} s), planner uses HNSW: {similar['uses_hnsw_index']}")

    load_after = os.getloadavg()
    print(f"load average (1 min) before/after: {load_before[0]:.1f}/{load_after[0]:.1f} on {os.cpu_count()} CPUs")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)]},
              "postgres": "embedded PostgreSQL 18 + pgvector 0.8 (durable settings)",
              "writes": writes, "similar_products": similar}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
