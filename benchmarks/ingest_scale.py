"""Catalog ingest at scale: rows/s and peak memory loading one big CSV manifest into PostgreSQL.

The manifest replicates the rows of the real catalog (styles.csv + split.csv, 44,441 products)
under new ids 1..N, photos pointing at the original product's image key, in a local object
store. Each size is loaded by ``ingest.load_catalog_into_db`` (streamed, ``--chunk-rows`` rows at
a time, one transaction) into a fresh database of a throw-away embedded PostgreSQL (durable
settings), in a child process of its own so that its peak RSS (``ru_maxrss``) is that load's
alone. Sizes up to ``--whole-max-rows`` are also loaded as one chunk (the file read whole, as
before streaming) for comparison.

    .venv/bin/python benchmarks/ingest_scale.py [--rows 100000 1000000] [--chunk-rows 25000]

Prints a table and writes benchmarks/results/ingest_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from fashion_tagging.db.engine import embedded_postgres_url, engine_for_url, ensure_database, migrate, \
    stop_embedded_postgres  # noqa: E402
from fashion_tagging.ingest import MANIFEST_CHUNK_ROWS, MANIFEST_COLUMNS  # noqa: E402
from fashion_tagging.settings import get_settings  # noqa: E402

RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "ingest_scale.json"
MANIFEST_KEY = "catalog/scale.csv"
WHOLE_FILE = 10**12  # chunk_rows that makes the whole manifest one chunk


def write_manifest(data_dir: Path, store_dir: Path, rows: int) -> Path:
    """A CSV manifest of ``rows`` products: the real catalog's rows, repeated, ids 1..rows."""
    styles = pd.read_csv(data_dir / "styles.csv", dtype=str, keep_default_na=False, on_bad_lines="skip")
    split = pd.read_csv(data_dir / "split.csv", dtype=str)
    styles = styles.merge(split.drop_duplicates("id"), on="id", how="left")
    styles["image_key"] = get_settings().images_prefix + styles["id"] + ".jpg"
    for column in MANIFEST_COLUMNS:
        if column not in styles.columns:
            styles[column] = ""
    styles = styles[list(MANIFEST_COLUMNS)]
    path = store_dir / MANIFEST_KEY
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        for start in range(0, rows, len(styles)):
            block = styles.head(min(len(styles), rows - start)).copy()
            block["id"] = range(start + 1, start + 1 + len(block))
            block.to_csv(handle, index=False, header=start == 0)
    return path


def worker(store_dir: str, db_url: str, chunk_rows: int) -> None:
    """One load, in this (fresh) process; prints its figures as JSON."""
    from fashion_tagging.ingest import load_catalog_into_db
    from fashion_tagging.objectstore import open_store

    import sqlalchemy as sa

    store = open_store(Path(store_dir).as_uri())
    engine = engine_for_url(db_url)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with engine.begin() as conn:
        sync = load_catalog_into_db(conn, store, prefix="catalog/", run_id="bench", chunk_rows=chunk_rows)
    seconds = time.perf_counter() - started
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM products")).scalar_one()
    print(json.dumps({"seconds": round(seconds, 2), "products_written": sync.products_written,
                      "row_errors": len(sync.errors), "products_in_db": stored,
                      "peak_rss_mib_before_load": round(rss_before / 1024, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def measure(server_url: str, store_dir: Path, rows: int, chunk_rows: int, label: str) -> dict:
    db_url = ensure_database(server_url, f"bench_ingest_{label}_{rows}")
    migrate(engine_for_url(db_url))
    engine_for_url(db_url).dispose()
    child = subprocess.run([sys.executable, __file__, "--worker", str(store_dir), db_url, str(chunk_rows)],
                           capture_output=True, text=True, check=True)
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    assert figures["products_in_db"] == rows and figures["row_errors"] == 0, figures
    manifest_mib = (store_dir / MANIFEST_KEY).stat().st_size / 2**20
    return {"mode": label, "rows": rows, "chunk_rows": None if chunk_rows == WHOLE_FILE else chunk_rows,
            "manifest_mib": round(manifest_mib, 1), **figures, "rows_per_second": round(rows / figures["seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--chunk-rows", type=int, default=MANIFEST_CHUNK_ROWS)
    parser.add_argument("--whole-max-rows", type=int, default=100_000,
                        help="also load sizes up to this as one chunk (the whole file at once), for comparison")
    parser.add_argument("--data-dir", type=Path, default=get_settings().data_dir)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="ft-ingest-bench-") as folder:
        pgdata = Path(folder) / "pgdata"
        server_url = embedded_postgres_url(pgdata, durable=True)
        try:
            for rows in args.rows:
                store_dir = Path(folder) / f"store-{rows}"
                write_manifest(args.data_dir, store_dir, rows)
                results.append(measure(server_url, store_dir, rows, args.chunk_rows, "streamed"))
                print(json.dumps(results[-1]), flush=True)
                if rows <= args.whole_max_rows:
                    results.append(measure(server_url, store_dir, rows, WHOLE_FILE, "whole_file"))
                    print(json.dumps(results[-1]), flush=True)
                (store_dir / MANIFEST_KEY).unlink()
        finally:
            stop_embedded_postgres(pgdata)

    print(f"\nCSV manifest -> PostgreSQL (load_catalog_into_db, one transaction, {os.cpu_count()} CPUs)")
    print(f"{'mode':<11} {'rows':>9} {'chunk':>7} {'MiB':>6} {'seconds':>8} {'rows/s':>8} {'peak RSS MiB':>13}")
    for row in results:
        print(f"{row['mode']:<11} {row['rows']:>9} {row['chunk_rows'] or '-':>7} {row['manifest_mib']:>6.1f} "
              f"{row['seconds']:>8.1f} {row['rows_per_second']:>8.0f} {row['peak_rss_mib']:>13.1f}")
    load_after = os.getloadavg()
    print(f"load average (1 min) before/after: {load_before[0]:.1f}/{load_after[0]:.1f} on {os.cpu_count()} CPUs")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)]},
              "postgres": "embedded PostgreSQL (durable settings)", "manifest": "CSV, styles.csv + split rows repeated",
              "peak_rss": "ru_maxrss of the loading process (its own child), MiB", "loads": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
