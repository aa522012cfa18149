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
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fashion_tagging import dashboard  # noqa: E402
from fashion_tagging.db.engine import (  # noqa: E402
    embedded_postgres_url, engine_for_url, ensure_database, migrate, stop_embedded_postgres)
from fashion_tagging.settings import get_settings  # noqa: E402
from tests.synthetic_catalog import catalog_products, seed_synthetic_catalog  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "dashboard.json"


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


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
