"""Issue 3's numbers: end-to-end tagging throughput (object store -> Postgres) vs the raw model.

In one process: import N real products into a local object store + embedded PostgreSQL, register
and promote the model, time the raw model forward pass (decoded images + texts -> predictions) on
those products, then tag them the way one nightly run does, step by step without Airflow:
``discover_tagging_work`` -> ``plan_tagging_run`` (ranges of products.change_seq in the work
table) -> ``tag_work_batch`` per descriptor (fetch, decode, infer, COPY + upsert, progress; run
one after another here) -> ``finish_tagging_run`` (which activates the model: HNSW + confidence
indexes built once over the loaded partition). Reports the end-to-end to raw-model ratio (over
the tagging tasks), the planning and activation costs apart, and the peak memory.

    .venv/bin/python benchmarks/tagging_throughput.py --products 2000
    .venv/bin/python benchmarks/tagging_throughput.py --products 44441   # the whole catalog
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fashion_tagging.settings import get_settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


SIMILAR_QUERIES = 200


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (``/proc/stat``): our process,
    the PostgreSQL server and anything else running. Differences of it over a phase, against the
    phase's wall time x cores, say whether the cores were kept busy and how much work the phase was."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class PhaseCpu:
    """Wall time and machine-wide busy CPU seconds of a phase, summed over every ``with`` of it."""

    def __init__(self):
        self.busy = self.wall = 0.0

    def __enter__(self):
        self._started = machine_busy_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.busy += machine_busy_seconds() - self._started[0]
        self.wall += time.perf_counter() - self._started[1]

    def figures(self, products: int) -> dict:
        cores = os.cpu_count() or 1
        return {"wall_seconds": round(self.wall, 1), "busy_core_seconds": round(self.busy, 1),
                "cores_busy_fraction": round(self.busy / (self.wall * cores), 3),
                "busy_core_ms_per_product": round(self.busy / max(products, 1) * 1000, 2)}


def similar_products_latency(engine, ids: list[int], similar_products) -> dict:
    """p50/p95 of the k=10 similar-products query over the embeddings this run just wrote."""
    import random

    import numpy as np

    rng = random.Random(42)
    timings = []
    with engine.connect() as conn:
        for product_id in (rng.choice(ids) for _ in range(SIMILAR_QUERIES)):
            with conn.begin():
                tick = time.perf_counter()
                try:
                    similar_products(conn, product_id, 10)
                except LookupError:  # a product that could not be tagged has no embedding
                    continue
                timings.append((time.perf_counter() - tick) * 1000)
    return {"queries": len(timings), "p50": round(float(np.percentile(timings, 50)), 2),
            "p95": round(float(np.percentile(timings, 95)), 2)} if timings else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=2000)
    parser.add_argument("--artifact", help="model artifact dir (default: newest under ./.fashion-tagging/models)")
    parser.add_argument("--home", help="state dir for the run (default: a temp dir)")
    args = parser.parse_args()

    from fashion_tagging.db.engine import stop_embedded_postgres

    home = Path(args.home or tempfile.mkdtemp(prefix="ft-tagging-bench-"))
    settings = get_settings(home=home)
    try:
        return measure(args, settings)
    finally:
        if args.home is None and settings.database_url is None:  # our throw-away embedded server
            stop_embedded_postgres(settings.pgdata_dir)
            shutil.rmtree(home, ignore_errors=True)


def measure(args, settings) -> int:
    import pandas as pd

    from fashion_tagging import pipeline
    from fashion_tagging.artifacts import Tagger, find_artifact
    from fashion_tagging.catalog import product_text
    from fashion_tagging.db import repository
    from fashion_tagging.images import decode_image
    from fashion_tagging.ingest import import_catalog
    from fashion_tagging.objectstore import open_configured_store
    from fashion_tagging.pipeline import catalog_engine
    from fashion_tagging.tagging import tag_work_batch

    artifact = Path(args.artifact) if args.artifact else find_artifact(get_settings())
    tagger = Tagger.load(artifact, engine=settings.inference_engine)  # FT_INFERENCE_ENGINE, auto by default
    ids = pd.read_csv(settings.data_dir / "styles.csv", usecols=["id"])["id"].head(args.products).astype(int).tolist()

    engine = catalog_engine(settings)
    import_catalog(settings, ids=ids, batch_name="bench", load_into_db=True)
    with engine.begin() as conn:
        repository.register_model(conn, tagger.version, tagger.backbone_name, tagger.image_size, False,
                                  artifact.resolve().as_uri(), {}, None)
        repository.promote_model(conn, tagger.version)
        rows = repository.fetch_products(conn, ids)

    # Raw model: what the model alone sustains on these products (decoding done beforehand, untimed).
    store = open_configured_store(settings)
    sample = rows[: min(len(rows), 2000)]
    blobs = store.get_many([r.image_key for r in sample if r.image_key])
    images = [decode_image(blobs[r.image_key], tagger.image_size)
              if r.image_key and not isinstance(blobs.get(r.image_key), (Exception, type(None))) else None
              for r in sample]
    texts = [product_text(r.title, r.description) for r in sample]
    def raw_model_rate() -> float:
        tick = time.perf_counter()
        for start in range(0, len(sample), settings.tagging_batch_size):
            tagger.predict(images[start:start + settings.tagging_batch_size],
                           texts[start:start + settings.tagging_batch_size], batch_size=settings.inference_batch_size)
        return len(sample) / (time.perf_counter() - tick)

    raw_model_rate()  # warm-up: graph tracing for every batch shape is not throughput
    with PhaseCpu() as raw_cpu:
        raw_per_second = raw_model_rate()
    e2e_cpu = PhaseCpu()

    # Runs until the model serves: one run when the catalog fits FT_TAGGING_MAX_TASKS tasks (the usual
    # case here), several otherwise, exactly as the DAG continues a backlog.
    results, descriptors, runs = [], [], []
    plan_seconds = e2e_seconds = finish_seconds = 0.0
    while True:
        run_id = f"bench-{len(runs)}"
        tick = time.perf_counter()
        discovered = pipeline.discover_tagging_work(settings, run_id)
        planned = pipeline.plan_tagging_run(settings, discovered)
        plan_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        with e2e_cpu:
            results += [tag_work_batch(d["batch_id"], settings=settings, run_id=run_id, engine=engine, tagger=tagger)
                        for d in planned]
        e2e_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        summary = pipeline.finish_tagging_run(settings, discovered)
        finish_seconds += time.perf_counter() - tick
        descriptors += planned
        runs.append(summary)
        if summary["status"] != "success":
            raise SystemExit(f"tagging run {run_id} failed: {summary['failed_batches']}")
        if summary["activated"] or not planned:
            break
    if not summary["activated"]:
        raise SystemExit(f"the model did not come to serve: {summary}")
    tagged = sum(r.tagged for r in results)
    similar_ms = similar_products_latency(engine, ids, repository.similar_products)  # the now-serving model
    stages = {stage: round(sum(getattr(r, f"{stage}_seconds") for r in results), 1)
              for stage in ("fetch", "decode", "infer", "write")}
    result = {
        "model_version": tagger.version, "engine": tagger.engine, "image_size": tagger.image_size,
        "cpu_count": os.cpu_count(),
        "products": len(ids), "tagged": tagged, "errors": sum(r.errors for r in results),
        "text_only": sum(r.text_only for r in results),
        "raw_model_products_per_second": round(raw_per_second, 1),
        "end_to_end_products_per_second": round(tagged / e2e_seconds, 1),
        "ratio_end_to_end_to_raw": round(tagged / e2e_seconds / raw_per_second, 3),
        "end_to_end_seconds": round(e2e_seconds, 1), "stage_seconds": stages,
        # Machine-wide busy CPU (this process, PostgreSQL, anything else) over each phase: whether the
        # cores were kept busy, and the work per product beyond the model's (decode, fetch, write, server).
        "cpu": {"raw_model": raw_cpu.figures(len(sample)), "end_to_end": e2e_cpu.figures(tagged)},
        "runs": len(runs), "batches": len(descriptors), "discover_plan_seconds": round(plan_seconds, 2),
        "finish_seconds": round(finish_seconds, 2),
        "activation": {k: v for k, v in summary["activated"].items() if k != "version"},
        "end_to_end_with_plan_and_activation_products_per_second":
            round(tagged / (plan_seconds + e2e_seconds + finish_seconds), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "similar_products_real_embeddings_ms": similar_ms,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"tagging_throughput_{len(ids)}.json"
    out.write_text(json.dumps(result, indent=1))
    print("| figure | value |\n| --- | --- |")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
