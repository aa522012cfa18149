"""Tagging at catalog scale: discover + plan, backfill writes, index build, quiet night, 1,000 arrivals, dashboard.

For each size it builds a synthetic catalog in the embedded PostgreSQL (the product's default
set-up: durable, ``FT_HOME``'s server) by replicating the real 44,441 products under new ids
(photo keys point at the real photos), then measures, on the code as it is:

1. discover + plan with every product needing tags (a freshly promoted model): wall time and
   peak RSS of each step, each in its own process as an Airflow task would be; mapped tasks;
   the XCom bytes of a whole run (discover and plan outputs as returned, plus one measured
   ``tag_batch`` return per mapped task and the ``finish`` summary);
2. the backfill write rate through the real write path (the work table's ranges, a task's
   row selection, COPY upserts of tags + embeddings + tag_stats, progress per transaction) with
   PRECOMPUTED tags and embeddings instead of the model: the model's cost is not what is
   measured here, and at CPU speed it would be days of inference; then the vector (HNSW) and
   review index build on the loaded partition, and disk used per table;
3. a quiet night (nothing new) over the fully tagged catalog: the real nightly DAG with
   ``dag.test()`` (``airflow dags test``), whole DAG run;
4. 1,000 new products arriving as a manifest in the object store: the nightly DAG end to end
   with ``dag.test()`` and a real model (ingest, plan, tagging with photos, finish);
5. the dashboard's page queries (``dashboard.overview`` and a similar-products lookup): p50/p95.

Prints a table and writes ``benchmarks/results/catalog_scale.json``.

    .venv/bin/python benchmarks/catalog_scale.py --sizes 1000000 10000000 --model /path/to/artifact
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "catalog_scale.json"
ID_STRIDE = 100_000  # real ids are < 100,000: copy g of product i gets id g * 100,000 + i
ARRIVALS = 1000
DASHBOARD_REPEAT = 40


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- building the synthetic catalog ---------------------------------------------------------------


def build_catalog(engine, data_dir: Path, size: int) -> dict:
    """Real products copied under new ids until ``size`` rows, in SQL (one statement per copy)."""
    import sqlalchemy as sa

    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.db import repository

    tick = time.perf_counter()
    seed = load_kaggle_catalog(data_dir).products
    seed = seed.assign(image_key=[f"images/{i}.jpg" if isinstance(p, str) and p else None
                                  for i, p in zip(seed["id"], seed["image_path"], strict=True)])
    columns = {alias: name for alias, name in repository.PRODUCT_COLUMN_MAP.items()
               if alias in seed.columns and alias not in ("split", "source")}
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS seed_products")
        conn.exec_driver_sql("CREATE UNLOGGED TABLE seed_products (LIKE products INCLUDING DEFAULTS)")
        frame = seed[list(columns)].rename(columns=columns)
        kinds = [repository._PRODUCT_TYPES.get(c, "text") for c in frame.columns]
        rows = [[repository._none_if_blank(v, k) for v, k in zip(row, kinds, strict=True)]
                for row in frame.astype(object).where(frame.notna(), None).itertuples(index=False, name=None)]
        repository.copy_rows(conn, "seed_products", list(frame.columns), kinds, rows)
    names = ", ".join(frame.columns.drop("product_id"))
    copies = -(-size // len(seed))
    for copy in range(copies):
        remaining = size - copy * len(seed)
        with engine.begin() as conn:
            repository.lock_product_changes(conn)
            conn.execute(sa.text(
                f"INSERT INTO products (product_id, {names}, source) "
                f"SELECT :copy * {ID_STRIDE} + product_id, {names}, 'synthetic' FROM seed_products "
                f"ORDER BY product_id LIMIT :n"), {"copy": copy, "n": min(remaining, len(seed))})
        if copy % 20 == 0:
            log(f"  catalog: {min(size, (copy + 1) * len(seed)):,} / {size:,} products")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE products")
    return {"products": size, "seed_products": len(seed), "seconds": round(time.perf_counter() - tick, 1)}


# --- one pipeline step in its own process (as an Airflow task), with its peak RSS -----------------


STEP_RUNNER = r"""
import json, sys, time
from fashion_tagging import pipeline
from fashion_tagging.settings import get_settings
step, argument = sys.argv[1], json.loads(sys.argv[2])
settings = get_settings()
tick = time.perf_counter()
result = getattr(pipeline, step)(settings, argument)
seconds = time.perf_counter() - tick
# VmHWM: this process image's own peak (ru_maxrss would include the parent's size at fork)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mib": peak / 1024, "result": result}, default=str))
"""


def run_step(settings, step: str, argument) -> dict:
    from fashion_tagging import pipeline

    env = {**os.environ, **pipeline.settings_env(settings), "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.run([sys.executable, "-c", STEP_RUNNER, step, json.dumps(argument)], env=env,
                             capture_output=True, text=True, timeout=3600)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        raise RuntimeError(f"{step} failed:\n{process.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --- backfill with precomputed predictions ----------------------------------------------------------


def precomputed_predictions(n: int, labels: list[str], seed: int = 0):
    """Well-formed model output (real articleType names, 7 heads, top-3) to write instead of inferring.

    The same fields as ``artifacts.TagPredictions``, without importing Keras into every writer.
    """
    from fashion_tagging.settings import HEADS, PRODUCT_EMBEDDING_DIM

    rng = np.random.default_rng(seed)
    head_labels, confidences, top_k = {}, {}, {}
    for head in HEADS:
        names = labels if head == "articleType" else [f"{head}-{i}" for i in range(12)]
        picks = rng.integers(0, len(names), n)
        head_labels[head] = [names[i] for i in picks]
        confidences[head] = rng.uniform(0.2, 1.0, n).astype(np.float32)
        top_k[head] = [[(names[i], float(c)), (names[(i + 1) % len(names)], float(1 - c) / 2),
                        (names[(i + 2) % len(names)], float(1 - c) / 4)]
                       for i, c in zip(picks, confidences[head], strict=True)]
    product = rng.normal(size=(n, PRODUCT_EMBEDDING_DIM)).astype(np.float32)
    product /= np.linalg.norm(product, axis=1, keepdims=True)
    return SimpleNamespace(labels=head_labels, confidences=confidences, top_k=top_k, product_embeddings=product,
                           has_image=np.ones(n, bool), has_text=np.ones(n, bool))


def write_range(args) -> dict:
    """A tag_batch task's write path over one planned range, predictions precomputed."""
    settings_env, batch_id, run_id, labels, chunk = args
    os.environ.update(settings_env)
    from fashion_tagging.db import repository
    from fashion_tagging.db.engine import get_engine
    from fashion_tagging.settings import get_settings

    engine = get_engine(get_settings())
    predictions = precomputed_predictions(chunk, labels, seed=batch_id)
    batch = repository.start_batch_attempt(engine, batch_id)
    done_seq, written = batch["done_seq"], 0
    while True:
        with engine.connect() as conn:
            rows = repository.products_in_range(conn, done_seq, batch["seq_to"], chunk)
        if not rows:
            break
        ids = [row.product_id for row in rows]
        part = predictions if len(ids) == chunk else _head(predictions, len(ids))
        with engine.begin() as conn:
            repository.write_tags_and_embeddings(conn, batch["model_version"], run_id, ids, part)
            repository.advance_batch(conn, batch_id, rows[-1].change_seq, tagged=len(ids), text_only=0, errors=0,
                                     seconds=0.0)
        done_seq, written = rows[-1].change_seq, written + len(ids)
    repository.finish_batch(engine, batch_id)
    return {"batch_id": batch_id, "written": written}


def _head(predictions, n: int):
    return SimpleNamespace(labels={h: v[:n] for h, v in predictions.labels.items()},
                           confidences={h: v[:n] for h, v in predictions.confidences.items()},
                           top_k={h: v[:n] for h, v in predictions.top_k.items()},
                           product_embeddings=predictions.product_embeddings[:n], has_image=predictions.has_image[:n],
                           has_text=predictions.has_text[:n])


def backfill(settings, version: str, labels: list[str], writers: int, build_index_up_to: int, size: int) -> dict:
    """Whole-catalog backfill: runs of discover -> plan -> writers over the ranges -> finish."""
    from fashion_tagging import pipeline
    from fashion_tagging.db import repository

    env = pipeline.settings_env(settings)
    timings = {}
    real_build = repository.build_version_indexes

    def build_or_skip(conn, model_version, **kwargs):
        vector_index = size <= build_index_up_to  # above it: the review index only, no HNSW (too long here)
        tick = time.perf_counter()
        result = real_build(conn, model_version, vector_index=vector_index, **kwargs)
        timings["index_build"] = {**result, "seconds": round(time.perf_counter() - tick, 1),
                                  "hnsw": "built" if vector_index else "NOT BUILT (size above --build-index-up-to)"}
        return result

    repository.build_version_indexes = build_or_skip
    written, runs, write_seconds, started = 0, 0, 0.0, time.perf_counter()
    try:
        with multiprocessing.get_context("spawn").Pool(writers) as pool:
            while True:
                run_id = f"backfill-{runs}"
                discovered = pipeline.discover_tagging_work(settings, run_id)
                descriptors = pipeline.plan_tagging_run(settings, discovered)
                if not descriptors:
                    break
                tick = time.perf_counter()
                results = pool.map(write_range, [(env, d["batch_id"], run_id, labels, settings.tagging_batch_size)
                                                 for d in descriptors], chunksize=1)
                write_seconds += time.perf_counter() - tick
                written += sum(r["written"] for r in results)
                summary = pipeline.finish_tagging_run(settings, discovered)
                runs += 1
                log(f"  backfill run {runs}: {len(descriptors)} tasks, {written:,} products written "
                    f"({written / write_seconds:,.0f} products/s in the writers)")
                if summary["activated"]:
                    break
    finally:
        repository.build_version_indexes = real_build
    return {"products_written": written, "runs": runs, "writers": writers,
            "write_seconds": round(write_seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
            "products_per_second": round(written / write_seconds, 1),
            "rows_per_second_tags_plus_embeddings": round(2 * written / write_seconds, 1),
            "products_per_second_with_planning": round(written / (time.perf_counter() - started), 1),
            "index_build": timings.get("index_build"), "predictions": "PRECOMPUTED (model not run)"}


def disk_usage(engine, version: str) -> dict:
    from fashion_tagging.db import repository

    with engine.connect() as conn:
        sizes = {table: int(conn.exec_driver_sql(f"SELECT pg_total_relation_size('{table}')").scalar())
                 for table in ("products", repository.partition_name("tags", version),
                               repository.partition_name("embeddings", version), "tag_stats", "tagging_batches")}
        database = int(conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar())
    gib = {name: round(value / 2**30, 3) for name, value in sizes.items()}
    return {"gib": gib, "database_gib": round(database / 2**30, 3)}


# --- the nightly DAG, for real ------------------------------------------------------------------


def xcom_bytes(run: dict) -> int:
    return sum(len(json.dumps(value)) for value in _flatten(run.get("xcom", {})))


def _flatten(xcom: dict):
    for value in xcom.values():
        if isinstance(value, list):
            yield from value
        else:
            yield value


def arrivals_manifest(settings, engine, count: int) -> dict:
    """``count`` new products (real rows under new ids) as a CSV manifest in the store, photos included."""
    import pandas as pd
    import sqlalchemy as sa

    from fashion_tagging.objectstore import open_configured_store

    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT product_id AS id, title AS \"productDisplayName\", description, brand AS \"brandName\", image_key "
            "FROM seed_products WHERE image_key IS NOT NULL ORDER BY product_id LIMIT :n"), {"n": count}).mappings().all()
    frame = pd.DataFrame(rows)
    store = open_configured_store(settings)
    for key in frame["image_key"]:
        store.put(key, (settings.data_dir / key).read_bytes())
    frame["id"] = frame["id"] + 900 * ID_STRIDE
    store.put(f"{settings.catalog_prefix}arrivals-{int(time.time())}.csv", frame.to_csv(index=False).encode())
    return {"products": len(frame)}


def nightly_dag(settings) -> dict:
    from fashion_tagging import pipeline

    run = pipeline.run_dag_locally("catalog_tagging", settings=settings, timeout_s=3600)
    return {"state": run["state"], "dag_run_seconds": run["run_seconds"], "airflow_dags_test_seconds": run["seconds"],
            "tasks": run["tasks"], "task_seconds": run["task_seconds"], "xcom_bytes": xcom_bytes(run),
            "summary": run["xcom"].get("finish"), "log_tail": run.get("log_tail", "")[-1500:] or None}


def dashboard_latency(engine, *, with_similar: bool) -> dict:
    """The page's queries (``dashboard.overview``), and a similar-products lookup where HNSW exists."""
    from fashion_tagging import dashboard

    timings, similar = [], []
    with dashboard.read_only(engine) as conn:
        version = dashboard.displayed_version(conn)
    for i in range(DASHBOARD_REPEAT):
        tick = time.perf_counter()
        with dashboard.read_only(engine) as conn:
            overview = dashboard.overview(conn)
        timings.append(time.perf_counter() - tick)
        if not with_similar:
            continue
        product = overview["low_confidence"][i % len(overview["low_confidence"])]["product_id"]
        tick = time.perf_counter()
        with dashboard.read_only(engine) as conn:
            dashboard.similar_products(conn, product, version)
        similar.append(time.perf_counter() - tick)

    def pct(values, q):
        return round(1000 * float(np.percentile(values, q)), 1)

    return {"overview_ms": {"p50": pct(timings, 50), "p95": pct(timings, 95)},
            "similar_products_ms": {"p50": pct(similar, 50), "p95": pct(similar, 95)} if similar else
            "not measured: no HNSW index at this size (see index_build)",
            "requests": DASHBOARD_REPEAT, "version": version}


# --- one size -------------------------------------------------------------------------------------


def measure(size: int, args) -> dict:
    import sqlalchemy as sa

    from fashion_tagging import pipeline
    from fashion_tagging.artifacts import read_config
    from fashion_tagging.db import repository
    from fashion_tagging.db.engine import get_engine, stop_embedded_postgres
    from fashion_tagging.settings import get_settings

    home = Path(args.home) / f"catalog-{size}"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    settings = get_settings(home=home, database_url=None, object_store_url=(home / "store").as_uri(),
                            data_dir=Path(args.data_dir))
    os.environ.update(pipeline.settings_env(settings))
    result = {"size": size}
    try:
        engine = pipeline.catalog_engine(settings)
        log(f"{size:,}: building the catalog")
        result["catalog"] = build_catalog(engine, settings.data_dir, size)

        artifact = Path(args.model).resolve()
        version = artifact.name
        read_config(artifact)  # fails early on a folder that is no artifact
        with engine.connect() as conn:
            labels = conn.execute(sa.text("SELECT DISTINCT article_type FROM seed_products "
                                                    "WHERE article_type IS NOT NULL")).scalars().all()
        repository.register_model(engine, version, "efficientnet-lite0", 224, True, artifact.as_uri(), {}, 0.95)
        repository.promote_model(engine, version)

        log(f"{size:,}: discover + plan, every product untagged")
        discovered = run_step(settings, "discover_tagging_work", f"scale-{size}-first")
        planned = run_step(settings, "plan_tagging_run", discovered["result"])
        descriptors = planned["result"]
        sample_return = {"model_version": version, "requested": 50000, "tagged": 50000, "errors": 0,
                         "total_seconds": 1234.5}
        finish_return = {"status": "success", "batches": len(descriptors), "products_tagged": 10_000_000,
                         "errors": 0, "more_work": True}
        run_xcom = (len(json.dumps(discovered["result"])) + len(json.dumps(descriptors))
                    + len(descriptors) * len(json.dumps(sample_return)) + len(json.dumps(finish_return)))
        result["discover_plan_all_untagged"] = {
            "discover": {"seconds": round(discovered["seconds"], 2), "peak_rss_mib": round(discovered["peak_rss_mib"])},
            "plan": {"seconds": round(planned["seconds"], 2), "peak_rss_mib": round(planned["peak_rss_mib"])},
            "mapped_tasks": len(descriptors), "cap": pipeline.max_tasks(settings),
            "products_planned": sum(int(d["label"].split("(")[-1].split()[0]) for d in descriptors),
            "xcom_bytes_run": run_xcom,
            "xcom_note": "discover + plan outputs as returned; each tag_batch return and the finish return at "
                         "their real shape (their values do not change the size by more than a few bytes)",
        }
        log(f"  {result['discover_plan_all_untagged']}")
        with engine.begin() as conn:  # the benchmark's backfill plans its own runs from the start
            conn.exec_driver_sql("DELETE FROM tagging_batches")
            conn.execute(sa.text("UPDATE model_versions SET planned_seq = 0, tagged_seq = 0 WHERE version = :v"),
                         {"v": version})

        log(f"{size:,}: backfill with precomputed predictions")
        result["backfill"] = backfill(settings, version, list(labels), args.writers, args.build_index_up_to, size)
        result["disk"] = disk_usage(engine, version)
        log(f"  {result['backfill']} {result['disk']}")
        with engine.connect() as conn:
            result["serving_after_backfill"] = (repository.serving_model(conn) or {}).get("version")

        log(f"{size:,}: quiet nights (dag.test)")
        result["quiet_night"] = [nightly_dag(settings) for _ in range(args.quiet_runs)]
        log(f"  {[(r['state'], r['dag_run_seconds']) for r in result['quiet_night']]}")

        if size >= args.arrivals_from:
            log(f"{size:,}: {ARRIVALS} new products arrive (dag.test, real model)")
            arrivals_manifest(settings, engine, ARRIVALS)
            result["arrivals"] = {"products": ARRIVALS, **nightly_dag(settings)}
            log(f"  {result['arrivals']['state']} {result['arrivals']['dag_run_seconds']} s "
                f"{result['arrivals']['summary']}")

        log(f"{size:,}: dashboard")
        result["dashboard"] = dashboard_latency(get_engine(settings), with_similar=size <= args.build_index_up_to)
        log(f"  {result['dashboard']}")
    finally:
        stop_embedded_postgres(settings.pgdata_dir)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    return result


TARGETS = {
    "mapped tasks <= cap": lambda r: r["discover_plan_all_untagged"]["mapped_tasks"] <= r["discover_plan_all_untagged"]["cap"],
    "XCom <= 1 MB a run": lambda r: r["discover_plan_all_untagged"]["xcom_bytes_run"] <= 1_000_000,
    "discover + plan <= 120 s": lambda r: (r["discover_plan_all_untagged"]["discover"]["seconds"]
                                           + r["discover_plan_all_untagged"]["plan"]["seconds"]) <= 120,
    "discover, plan <= 1 GiB RSS each": lambda r: max(r["discover_plan_all_untagged"]["discover"]["peak_rss_mib"],
                                                      r["discover_plan_all_untagged"]["plan"]["peak_rss_mib"]) <= 1024,
    "quiet night <= 60 s": lambda r: max(q["dag_run_seconds"] or 1e9 for q in r["quiet_night"]) <= 60,
    "backfill >= 20,000 rows/s": lambda r: r["backfill"]["rows_per_second_tags_plus_embeddings"] >= 20000,
    "dashboard p95 <= 300 ms": lambda r: r["dashboard"]["overview_ms"]["p95"] <= 300,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--model", required=True, help="a trained model artifact directory (real inference)")
    parser.add_argument("--home", default="/tmp/ft-catalog-scale")
    parser.add_argument("--data-dir", default=os.environ.get("FT_DATA_DIR", str(PROJECT_ROOT.parent / "shared/data/fashion-product-images")))
    parser.add_argument("--writers", type=int, default=2, help="parallel backfill writers (as tagging workers)")
    parser.add_argument("--build-index-up-to", type=int, default=10_000_000,
                        help="build the HNSW vector index after the backfill only up to this catalog size "
                             "(the review index is always built)")
    parser.add_argument("--arrivals-from", type=int, default=1_000_000,
                        help="run the 1,000-arrivals night from this size")
    parser.add_argument("--quiet-runs", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep each size's database afterwards")
    args = parser.parse_args()

    results = []
    for size in args.sizes:
        results.append(measure(size, args))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report(results, args), indent=1, default=str))
    print(f"\n{'products':>11} {'tasks':>5} {'XCom B':>7} {'disc s':>7} {'plan s':>7} {'RSS MiB':>8} "
          f"{'write rows/s':>12} {'HNSW s':>8} {'quiet s':>8} {'+1000 s':>8} {'dash p95':>9}")
    for r in results:
        d = r["discover_plan_all_untagged"]
        index = r["backfill"]["index_build"] or {}
        print(f"{r['size']:>11,} {d['mapped_tasks']:>5} {d['xcom_bytes_run']:>7} {d['discover']['seconds']:>7.1f} "
              f"{d['plan']['seconds']:>7.1f} {max(d['discover']['peak_rss_mib'], d['plan']['peak_rss_mib']):>8} "
              f"{r['backfill']['rows_per_second_tags_plus_embeddings']:>12,.0f} "
              f"{index.get('hnsw_index_seconds', '-'):>8} "
              f"{max(q['dag_run_seconds'] or 0 for q in r['quiet_night']):>8.1f} "
              f"{(r.get('arrivals') or {}).get('dag_run_seconds') or '-':>8} {r['dashboard']['overview_ms']['p95']:>9}")
        for name, check in TARGETS.items():
            print(f"    {'met ' if check(r) else 'MISS'} {name}")
    print("backfill writes used PRECOMPUTED tags/embeddings (the model was not run); the 1,000 arrivals ran the model")
    print(f"wrote {RESULTS.relative_to(PROJECT_ROOT)}")


def report(results: list[dict], args) -> dict:
    return {
        "what": "tagging at catalog scale (issue 12); backfill writes use PRECOMPUTED predictions, the 1,000 "
                "arrivals and quiet nights run the real nightly DAG with dag.test()",
        "command": "python benchmarks/catalog_scale.py " + " ".join(sys.argv[1:]),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "peak_rss_benchmark_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
        "targets": {str(r["size"]): {name: bool(check(r)) for name, check in TARGETS.items()} for r in results},
        "results": results,
    }


if __name__ == "__main__":
    main()
