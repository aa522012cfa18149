"""Issue 3's numbers: end-to-end tagging throughput (object store -> Postgres) vs the raw model.

In one process: import N real products into a local object store + embedded PostgreSQL, register
the model, time the raw model forward pass (decoded images + texts -> predictions) on those
products, then time ``tag_batch`` over them (fetch, decode, infer, COPY + upsert) and report the
ratio and the peak memory.

    .venv/bin/python benchmarks/tagging_throughput.py --products 2000
    .venv/bin/python benchmarks/tagging_throughput.py --products 44441   # the whole catalog
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

    import pandas as pd

    from fashion_tagging.artifacts import Tagger, find_artifact
    from fashion_tagging.catalog import product_text
    from fashion_tagging.db import repository
    from fashion_tagging.images import decode_image
    from fashion_tagging.ingest import import_catalog
    from fashion_tagging.pipeline import catalog_engine, object_store, plan_batches
    from fashion_tagging.tagging import tag_batch

    artifact = Path(args.artifact) if args.artifact else find_artifact(get_settings())
    home = Path(args.home or tempfile.mkdtemp(prefix="ft-tagging-bench-"))
    settings = get_settings(home=home)
    tagger = Tagger.load(artifact)
    ids = pd.read_csv(settings.data_dir / "styles.csv", usecols=["id"])["id"].head(args.products).astype(int).tolist()

    engine = catalog_engine(settings)
    import_catalog(settings, ids=ids, batch_name="bench", load_into_db=True)
    with engine.begin() as conn:
        repository.register_model(conn, tagger.version, tagger.backbone_name, tagger.image_size, False,
                                  artifact.resolve().as_uri(), {}, None)
        repository.promote_model(conn, tagger.version)
        rows = repository.fetch_products(conn, ids)

    # Raw model: what the model alone sustains on these products (decoding done beforehand, untimed).
    store = object_store(settings)
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
    raw_per_second = raw_model_rate()

    tick = time.perf_counter()
    results = [tag_batch(batch, settings=settings, engine=engine, tagger=tagger, run_id="bench")
               for batch in plan_batches(ids, settings.tagging_batch_size)]
    e2e_seconds = time.perf_counter() - tick
    tagged = sum(r.tagged for r in results)
    similar_ms = similar_products_latency(engine, ids, repository.similar_products)
    stages = {stage: round(sum(getattr(r, f"{stage}_seconds") for r in results), 1)
              for stage in ("fetch", "decode", "infer", "write")}
    result = {
        "model_version": tagger.version, "image_size": tagger.image_size, "cpu_count": os.cpu_count(),
        "products": len(ids), "tagged": tagged, "errors": sum(r.errors for r in results),
        "text_only": sum(r.text_only for r in results),
        "raw_model_products_per_second": round(raw_per_second, 1),
        "end_to_end_products_per_second": round(tagged / e2e_seconds, 1),
        "ratio_end_to_end_to_raw": round(tagged / e2e_seconds / raw_per_second, 3),
        "end_to_end_seconds": round(e2e_seconds, 1), "stage_seconds": stages,
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
