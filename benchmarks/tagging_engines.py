"""Issue 16's numbers: the Keras path and the LiteRT engine side by side on this machine's CPUs.

One process, one model (the artifact given), the same products for both engines, alternating:

1. raw backbone images/s per runtime on real photos (batch 64, all threads): Keras
   ``predict_on_batch``; LiteRT (ai-edge-litert, XNNPACK) float32 and int8; ONNX Runtime and
   OpenVINO (float32, and OpenVINO's bf16 inference precision) on the same float32 LiteRT
   flatbuffer (tf2onnx / OpenVINO's TFLite frontend) — those three only with
   ``uv sync --extra test --extra engines``;
2. end-to-end tagging per engine (``tag_work_batch``: fetch -> decode -> infer -> COPY into
   PostgreSQL) over N real products, each round the backfill of a newly promoted version (same
   artifact) as after a retrain, rounds alternating engines, and the raw model
   (``Tagger.predict`` on decoded photos) per engine;
3. articleType agreement between engines on the whole test split and each one's test accuracy;
4. model load time (load + first batch) and peak RSS per engine, each in a fresh child process.

    .venv/bin/python benchmarks/tagging_engines.py --artifact /path/to/model --products 3000

Prints a table and writes benchmarks/results/tagging_engines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fashion_tagging.settings import get_settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tagging_engines.json"
ENGINES = ("keras", "litert")
BACKBONE_BATCH = 64
BACKBONE_ROUNDS = 6  # batches per runtime, alternating runtimes batch by batch


def backbone_runtimes(tagger, artifact: Path, work: Path) -> dict:
    """name -> callable(pixels) for every runtime available; the non-LiteRT ones read the float32 export."""
    from fashion_tagging import engines

    threads = engines.worker_threads()
    runtimes = {"keras": tagger.backbone.predict_on_batch}
    for quantization in (engines.FLOAT32, engines.INT8):
        path = engines.export_path(artifact, quantization)
        if path.is_file():
            runtimes[f"litert_{quantization}"] = engines.LiteRTBackbone(path)
    float32 = engines.export_path(artifact, engines.FLOAT32)
    try:
        import onnxruntime

        onnx_path = work / "backbone.onnx"
        subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--tflite", str(float32), "--output", str(onnx_path),
                        "--opset", "17"], check=True, capture_output=True)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        runtimes["onnxruntime_float32"] = lambda x: session.run(None, {name: x})[0]
    except (ImportError, subprocess.CalledProcessError) as error:
        print(f"ONNX Runtime skipped: {type(error).__name__}", file=sys.stderr)
    try:
        import openvino

        core = openvino.Core()
        model = core.read_model(str(float32))
        model.reshape({0: [-1, *model.input(0).get_partial_shape()[1:]]})
        for precision in ("f32", "bf16"):
            if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                continue
            compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                         "INFERENCE_PRECISION_HINT": precision})
            runtimes[f"openvino_{'float32' if precision == 'f32' else precision}"] = \
                (lambda c: (lambda x: c(x)[0]))(compiled)
    except ImportError:
        print("OpenVINO skipped: not installed", file=sys.stderr)
    return runtimes


def time_backbones(runtimes: dict, pixels: np.ndarray) -> dict:
    """images/s per runtime (warm-up batch first; then rounds alternating runtimes) and max |diff| to Keras."""
    batches = [pixels[i:i + BACKBONE_BATCH] for i in range(0, len(pixels) - BACKBONE_BATCH + 1, BACKBONE_BATCH)]
    reference = np.asarray(runtimes["keras"](batches[0]))
    seconds = dict.fromkeys(runtimes, 0.0)
    agreement = {}
    for name, run in runtimes.items():
        out = np.asarray(run(batches[0]))  # warm-up: tracing, planning, weight packing
        cosine = np.sum(out * reference, axis=1) / np.maximum(
            np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1), 1e-12)
        agreement[name] = {"max_abs_diff": float(np.abs(out - reference).max()), "min_cosine": float(cosine.min())}
    for round_ in range(BACKBONE_ROUNDS):
        batch = batches[round_ % len(batches)]
        for name, run in runtimes.items():
            tick = time.perf_counter()
            np.asarray(run(batch))
            seconds[name] += time.perf_counter() - tick
    return {name: {"images_per_second": round(BACKBONE_ROUNDS * BACKBONE_BATCH / seconds[name], 1),
                   **{k: round(v, 6) for k, v in agreement[name].items()}} for name in runtimes}


def decoded(rows, size: int, store=None) -> tuple[list, list]:
    from fashion_tagging.catalog import product_text
    from fashion_tagging.images import decode_image, load_photo_file

    if store is not None:  # catalog rows, photos from the object store (as tagging gets them)
        blobs = store.get_many([r.image_key for r in rows if r.image_key])
        images = [decode_image(blobs[r.image_key], size)
                  if r.image_key and not isinstance(blobs.get(r.image_key), (Exception, type(None))) else None
                  for r in rows]
        return images, [product_text(r.title, r.description) for r in rows]
    images = []
    for path in rows["image_path"].fillna(""):
        pixels, why = load_photo_file(path, size) if path else (None, "none")
        images.append(None if why else pixels)
    return images, rows["text"].fillna("").tolist()


def test_split_agreement(taggers: dict, settings, batch: int = 256) -> dict:
    """articleType accuracy per engine on the whole test split, and agreement with Keras."""
    from fashion_tagging.catalog import load_kaggle_catalog, with_clean_labels

    products = load_kaggle_catalog(settings.data_dir).products
    any_tagger = next(iter(taggers.values()))
    rows = with_clean_labels(products[products["split"] == "test"].reset_index(drop=True), any_tagger.heads)
    labels = {name: [] for name in taggers}
    seconds = dict.fromkeys(taggers, 0.0)
    for start in range(0, len(rows), batch):
        images, texts = decoded(rows.iloc[start:start + batch], any_tagger.image_size)
        for name, tagger in taggers.items():
            tick = time.perf_counter()
            labels[name] += tagger.predict(images, texts, batch_size=128).labels[tagger.primary_head]
            seconds[name] += time.perf_counter() - tick
    truth = rows[any_tagger.primary_head].to_numpy()
    labelled = truth != ""
    out = {"test_products": int(labelled.sum())}
    reference = np.asarray(labels["keras"], dtype=object)
    for name, predicted in labels.items():
        predicted = np.asarray(predicted, dtype=object)
        out[name] = {"accuracy": round(float(np.mean(predicted[labelled] == truth[labelled])), 5),
                     "agreement_with_keras": round(float(np.mean(predicted == reference)), 5),
                     "products_per_second": round(len(rows) / seconds[name], 1)}
    return out


LOAD_PROBE = """
import json, sys, time
started = time.perf_counter()
from fashion_tagging.artifacts import Tagger
from fashion_tagging.catalog import load_kaggle_catalog
from fashion_tagging.images import load_photo_file
import numpy as np
artifact, engine, data_dir, n, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
products = load_kaggle_catalog(data_dir).products
products = products[products["image_path"].fillna("").astype(bool)].head(n)
images = [load_photo_file(p, size)[0] for p in products["image_path"]]
texts = products["text"].fillna("").tolist()
ready = time.perf_counter()
tagger = Tagger.load(artifact, engine=engine)
tagger.predict(images[:128], texts[:128], batch_size=128)
loaded = time.perf_counter()
for i in range(0, n, 128):
    tagger.predict(images[i:i + 128], texts[i:i + 128], batch_size=128)
# VmHWM, not ru_maxrss: the latter keeps the forking parent's high-water mark across exec.
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"load_and_first_batch_seconds": round(loaded - ready, 2), "peak_rss_mib": round(peak_kib / 1024, 1)}))
"""


def load_and_memory(artifact: Path, settings, image_size: int, products: int = 1000) -> dict:
    out = {}
    for engine in ENGINES:
        done = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(artifact), engine, str(settings.data_dir),
                               str(products), str(image_size)], capture_output=True, text=True, check=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        out[engine] = json.loads(done.stdout.strip().splitlines()[-1])
    out["products_tagged_by_each_probe"] = products
    return out


def end_to_end(args, settings, artifact: Path, taggers: dict) -> dict:
    """Nightly tagging rounds (discover -> plan -> tag_work_batch -> finish) alternating engines."""
    import pandas as pd

    from fashion_tagging import pipeline
    from fashion_tagging.db import repository
    from fashion_tagging.ingest import import_catalog
    from fashion_tagging.objectstore import open_configured_store
    from fashion_tagging.pipeline import catalog_engine
    from fashion_tagging.tagging import tag_work_batch

    version = next(iter(taggers.values())).version
    ids = pd.read_csv(settings.data_dir / "styles.csv", usecols=["id"])["id"].head(args.products).astype(int).tolist()
    db = catalog_engine(settings)
    import_catalog(settings, ids=ids, batch_name="bench", load_into_db=True)
    with db.begin() as conn:
        rows = repository.fetch_products(conn, ids)

    store = open_configured_store(settings)
    sample = rows[: min(len(rows), 2000)]
    images, texts = decoded(sample, taggers["keras"].image_size, store)

    def raw_rate(tagger) -> float:
        tick = time.perf_counter()
        for start in range(0, len(sample), settings.tagging_batch_size):
            tagger.predict(images[start:start + settings.tagging_batch_size],
                           texts[start:start + settings.tagging_batch_size], batch_size=settings.inference_batch_size)
        return len(sample) / (time.perf_counter() - tick)

    def nightly(tagger, run_id: str) -> dict:
        """A backfill of every product by a new version (same artifact): COPY into fresh partitions."""
        with db.begin() as conn:
            repository.register_model(conn, f"{version}-{run_id}", tagger.backbone_name, tagger.image_size, True,
                                      artifact.resolve().as_uri(), {}, None)
            repository.promote_model(conn, f"{version}-{run_id}")
        tick = time.perf_counter()
        discovered = pipeline.discover_tagging_work(settings, run_id)
        planned = pipeline.plan_tagging_run(settings, discovered)
        results = [tag_work_batch(d["batch_id"], settings=settings, run_id=run_id, engine=db, tagger=tagger)
                   for d in planned]
        seconds = time.perf_counter() - tick
        summary = pipeline.finish_tagging_run(settings, discovered)  # activates the version (indexes, untimed)
        if not summary["activated"]:
            raise SystemExit(f"run {run_id} did not tag the whole catalog: {summary}")
        tagged = sum(r.tagged for r in results)
        return {"tagged": tagged, "errors": sum(r.errors for r in results), "seconds": seconds,
                "stages": {s: sum(getattr(r, f"{s}_seconds") for r in results) for s in ("fetch", "decode", "infer", "write")}}

    raw = {name: [] for name in taggers}
    e2e = {name: [] for name in taggers}
    for name, tagger in taggers.items():  # warm-up: tracing, interpreters for each batch shape
        raw_rate(tagger)
    nightly(taggers["keras"], "bench-warm-up")
    for round_ in range(args.rounds):
        for name, tagger in taggers.items():
            raw[name].append(raw_rate(tagger))
            e2e[name].append(nightly(tagger, f"bench-{round_}-{name}"))
    out = {"products": len(ids), "rounds": args.rounds}
    for name in taggers:
        tagged = sum(r["tagged"] for r in e2e[name])
        seconds = sum(r["seconds"] for r in e2e[name])
        rate = tagged / seconds
        raw_mean = float(np.mean(raw[name]))
        out[name] = {"end_to_end_products_per_second": round(rate, 1), "raw_model_products_per_second": round(raw_mean, 1),
                     "ratio_end_to_end_to_raw": round(rate / raw_mean, 3),
                     "errors": sum(r["errors"] for r in e2e[name]),
                     "stage_seconds": {s: round(sum(r["stages"][s] for r in e2e[name]), 1)
                                       for s in ("fetch", "decode", "infer", "write")},
                     "rounds_products_per_second": [round(r["tagged"] / r["seconds"], 1) for r in e2e[name]]}
    out["ratio_litert_to_keras_end_to_end"] = round(out["litert"]["end_to_end_products_per_second"]
                                                    / out["keras"]["end_to_end_products_per_second"], 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", required=True, help="model artifact directory (production quality)")
    parser.add_argument("--products", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2, help="end-to-end rounds per engine (alternating)")
    parser.add_argument("--skip-test-split", action="store_true")
    args = parser.parse_args()

    from fashion_tagging import engines
    from fashion_tagging.artifacts import Tagger
    from fashion_tagging.db.engine import stop_embedded_postgres

    artifact = Path(args.artifact)
    if not engines.export_path(artifact, engines.FLOAT32).is_file():
        raise SystemExit(f"{artifact} has no LiteRT exports: run `fashion-tagging export --artifact {artifact}` first")
    load_before = os.getloadavg()[0]
    home = Path(tempfile.mkdtemp(prefix="ft-engines-bench-"))
    settings = get_settings(home=home)
    taggers = {name: Tagger.load(artifact, engine=name) for name in ENGINES}
    result = {"model_version": taggers["keras"].version, "image_size": taggers["keras"].image_size,
              "cpu_count": os.cpu_count(), "threads": engines.worker_threads(),
              "serving_quantization": engines.serving_quantization(artifact),
              "exports": engines.read_exports_report(artifact)}
    try:
        from fashion_tagging.catalog import load_kaggle_catalog

        products = load_kaggle_catalog(settings.data_dir).products
        sample = products[products["image_path"].fillna("").astype(bool)].head(BACKBONE_BATCH * 4)
        pixels = np.stack([img for img in decoded(sample, taggers["keras"].image_size)[0] if img is not None])
        with tempfile.TemporaryDirectory() as work:
            result["backbone"] = time_backbones(backbone_runtimes(taggers["keras"], artifact, Path(work)),
                                                pixels.astype(np.float32))
        result["end_to_end"] = end_to_end(args, settings, artifact, taggers)
        if not args.skip_test_split:  # both LiteRT exports, whichever serves
            variants = {"keras": taggers["keras"],
                        **{f"litert_{q}": Tagger.load(artifact, engine="litert", quantization=q)
                           for q in (engines.FLOAT32, engines.INT8) if engines.export_path(artifact, q).is_file()}}
            result["test_split"] = test_split_agreement(variants, settings)
        result["load_and_memory"] = load_and_memory(artifact, settings, taggers["keras"].image_size)
    finally:
        if settings.database_url is None:
            stop_embedded_postgres(settings.pgdata_dir)
        shutil.rmtree(home, ignore_errors=True)
    result["peak_rss_mib_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["load_average_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))

    print("| runtime (backbone, batch 64) | images/s | max abs diff to Keras |\n| --- | --- | --- |")
    for name, row in result["backbone"].items():
        print(f"| {name} | {row['images_per_second']} | {row['max_abs_diff']:.2e} |")
    e2e = result["end_to_end"]
    print("\n| engine | end-to-end products/s | raw model products/s | e2e/raw |\n| --- | --- | --- | --- |")
    for name in ENGINES:
        print(f"| {name} | {e2e[name]['end_to_end_products_per_second']} | {e2e[name]['raw_model_products_per_second']} "
              f"| {e2e[name]['ratio_end_to_end_to_raw']} |")
    print(f"\nend-to-end litert / keras: {e2e['ratio_litert_to_keras_end_to_end']}")
    if "test_split" in result:
        split = result["test_split"]
        for name in (k for k in split if k != "test_products"):
            print(f"test split ({split['test_products']}): {name} accuracy {split[name]['accuracy']}, "
                  f"agreement with keras {split[name]['agreement_with_keras']}")
    for name in ENGINES:
        print(f"{name}: load + first batch {result['load_and_memory'][name]['load_and_first_batch_seconds']} s, "
              f"peak RSS {result['load_and_memory'][name]['peak_rss_mib']} MiB")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
