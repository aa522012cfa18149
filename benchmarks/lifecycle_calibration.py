"""Issue 15's calibration figures: ECE before/after temperature scaling and coverage at a target precision.

Given a trained artifact (``--artifact``, e.g. ``/work/ft/h224/models/<version>``) and the real
catalog, on a copy of the artifact (the original is never written): fits the per-head
calibration on ``val`` exactly as training does (``calibration.calibrate_artifact``: temperature
per head, then the lowest calibrated confidence whose tags reach the target precision on val),
then scores the ``test`` split once: expected calibration error of each head before and after
calibration, and at the val thresholds the share of test tags auto-accepted (coverage) with
their measured accuracy. Everything is chosen on ``val``; ``test`` is only measured.

    .venv/bin/python benchmarks/lifecycle_calibration.py --artifact /work/ft/h224/models/<version>

Prints a table and writes ``benchmarks/results/lifecycle_calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "lifecycle_calibration.json"
SHOWN_HEADS = ("articleType", "subCategory", "baseColour", "season")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="a trained model artifact directory")
    parser.add_argument("--data-dir", type=Path, help="Kaggle-layout catalog (default: FT_DATA_DIR)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lifecycle-calibration"),
                        help="where the artifact is copied (and the feature store kept)")
    parser.add_argument("--target-precision", type=float, default=0.99, help="articleType's target precision")
    parser.add_argument("--target-precision-other-heads", type=float, default=0.99,
                        help="the other heads' target precision (the setting's default is 0.95)")
    args = parser.parse_args()

    from fashion_tagging.artifacts import Tagger, read_config
    from fashion_tagging.calibration import calibrate_artifact, calibration_report
    from fashion_tagging.catalog import load_kaggle_catalog, with_clean_labels
    from fashion_tagging.evaluate import split_embeddings
    from fashion_tagging.settings import get_settings

    config = read_config(args.artifact)
    copy = args.work / "models" / config["version"]
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(args.artifact, copy)
    for stale in ("calibration.json",):
        (copy / stale).unlink(missing_ok=True)
    overrides = {"home": args.work, "target_precision": args.target_precision,
                 "target_precision_other_heads": args.target_precision_other_heads,
                 "image_size": int(config["image_size"]), "backbone": config["backbone"]}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    settings = get_settings(**overrides)
    products = load_kaggle_catalog(settings.data_dir).products

    started = time.perf_counter()
    calibration = calibrate_artifact(copy, settings, products=products, progress=True)
    fit_seconds = time.perf_counter() - started

    tagger = Tagger.load(copy)
    rows = with_clean_labels(products[products["split"] == "test"].reset_index(drop=True), tagger.heads)
    tick = time.perf_counter()
    embeddings = split_embeddings(tagger, copy, rows, settings, progress=True)
    raw = tagger.predict_embeddings(embeddings.vectors, embeddings.has_image, rows["text"].fillna("").tolist(),
                                    batch_size=settings.inference_batch_size, calibrated=False,
                                    keep_probabilities=True)
    test = calibration_report(tagger, raw.log_probabilities, rows, calibration)
    test_seconds = time.perf_counter() - tick

    result = {
        "model": config["version"], "artifact": str(args.artifact), "backbone": config["backbone"],
        "image_size": int(config["image_size"]), "fine_tune_mode": config.get("fine_tune_mode"),
        "val_products": calibration["val_products"], "test_products": len(rows),
        "target_precision": {"articleType": args.target_precision, "other_heads": args.target_precision_other_heads},
        "method": calibration["method"], "fit_seconds": round(fit_seconds, 1), "test_seconds": round(test_seconds, 1),
        "cpu_count": os.cpu_count(),
        "heads": {head: {"temperature": fitted["temperature"], "threshold": fitted["threshold"],
                         "val": fitted["val"], "test": test.get(head)}
                  for head, fitted in calibration["heads"].items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))

    print(f"model {result['model']} ({result['backbone']} {result['image_size']}px), calibration fitted on "
          f"{result['val_products']} val products, measured on {result['test_products']} test products\n")
    print("| head | T | threshold | target precision | ECE test before | ECE test after | auto-accepted on test "
          "| their accuracy | the rest's accuracy | coverage on val |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for head in [h for h in SHOWN_HEADS if h in result["heads"]] + [h for h in result["heads"] if h not in SHOWN_HEADS]:
        entry, t = result["heads"][head], result["heads"][head]["test"] or {}
        print(f"| {head} | {entry['temperature']:.3f} | {_fmt(entry['threshold'])} | {t.get('target_precision')} | "
              f"{_fmt(t.get('ece_before'))} | {_fmt(t.get('ece_after'))} | "
              f"{_pct(t.get('coverage'))} ({t.get('auto_accepted')} of {t.get('products')}) | "
              f"{_pct(t.get('accepted_accuracy'))} | {_pct(t.get('review_accuracy'))} | {_pct(entry['val']['coverage'])} |")
    print(f"\nfit on val {fit_seconds:.0f} s, test {test_seconds:.0f} s; wrote {RESULTS}")
    return 0


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


if __name__ == "__main__":
    sys.exit(main())
