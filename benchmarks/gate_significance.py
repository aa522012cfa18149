"""Issue 15's gate figures: does the significance gate hold back noise and let a real improvement through?

Trains three models on slices of the real catalog (frozen backbone by default, so each takes
minutes on a CPU) and pairs their fused articleType predictions on the whole ``test`` split, as
the retrain DAG's evaluate task does (``evaluate.primary_predictions`` + ``paired_scores``), then
asks the gate (``pipeline.gate``, the real baseline and FT_GATE_SIGNIFICANCE):

1. *noise*: two retrains of the same data (``--train`` / ``--val`` products) with different seeds,
   the second as the candidate against the first in production: expected not promoted;
2. *a better candidate*: the same candidate against a production model trained on a small slice
   (``--small`` train products): expected promoted.

    .venv/bin/python benchmarks/gate_significance.py [--train 6000] [--val 1500] [--small 600] \\
        [--feature-store /path/to/cache/features]

Prints each decision with its p-value and writes ``benchmarks/results/gate_significance.json``.
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
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "gate_significance.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/gate-significance"), help="FT_HOME of the run")
    parser.add_argument("--train", type=int, default=6000, help="train products of the two same-data retrains")
    parser.add_argument("--val", type=int, default=1500, help="val products (every model)")
    parser.add_argument("--small", type=int, default=600, help="train products of the weaker production model")
    parser.add_argument("--seeds", type=int, nargs=2, default=(1, 2))
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--fine-tune", choices=["none", "top"], default="none")
    parser.add_argument("--feature-store", type=Path,
                        help="a feature store folder (<home>/cache/features) to start from (copied, never written)")
    args = parser.parse_args()

    from fashion_tagging.catalog import load_kaggle_catalog, with_clean_labels
    from fashion_tagging.evaluate import paired_scores, primary_predictions
    from fashion_tagging.features import STORE_SUBDIR
    from fashion_tagging.pipeline import gate
    from fashion_tagging.settings import PRIMARY_HEAD, get_settings
    from fashion_tagging.train import train

    settings = get_settings(home=args.home, image_size=args.image_size, fine_tune=args.fine_tune,
                            **({"epochs": args.epochs} if args.epochs else {}))
    if args.feature_store and not (settings.cache_dir / STORE_SUBDIR).exists():
        shutil.copytree(args.feature_store, settings.cache_dir / STORE_SUBDIR)
    catalog = load_kaggle_catalog(settings.data_dir).products
    train_rows = catalog[catalog["split"] == "train"]
    val_rows = catalog[catalog["split"] == "val"].sample(min(args.val, int((catalog["split"] == "val").sum())),
                                                         random_state=0)
    test_rows = with_clean_labels(catalog[catalog["split"] == "test"].reset_index(drop=True), (PRIMARY_HEAD,))
    import pandas as pd

    def fit(seed: int, train_products: int) -> dict:
        # A random slice (fixed): the catalog file's order is not random, its first rows are a skewed sample.
        slice_rows = train_rows.sample(min(train_products, len(train_rows)), random_state=0)
        products = pd.concat([slice_rows, val_rows, test_rows], ignore_index=True)
        started = time.perf_counter()
        result = train(settings.replace(seed=seed), products=products, fine_tune=args.fine_tune, progress=False)
        seconds = time.perf_counter() - started
        labels = primary_predictions(result.artifact_dir, settings, test_rows)
        print(f"trained {result.version} (seed {seed}, {train_products} train products) in {seconds:.0f} s",
              flush=True)
        return {"version": result.version, "seed": seed, "train_products": train_products,
                "train_seconds": round(seconds, 1), "labels": labels}

    truth = test_rows[PRIMARY_HEAD].tolist()
    first = fit(args.seeds[0], args.train)
    second = fit(args.seeds[1], args.train)
    small = fit(args.seeds[0], args.small)

    def decide(candidate: dict, production: dict) -> dict:
        scores = paired_scores(truth, candidate["labels"], production["labels"])
        evaluation = {"version": candidate["version"], "article_type_accuracy": scores["candidate_accuracy"],
                      "paired": {"production_version": production["version"], **scores}}
        decision = gate(evaluation, settings.baseline_accuracy, settings.gate_significance)
        return {"candidate": {k: candidate[k] for k in ("version", "seed", "train_products", "train_seconds")},
                "production": {k: production[k] for k in ("version", "seed", "train_products", "train_seconds")},
                "paired": scores, "decision": decision}

    scenarios = {"same_data_other_seed": decide(second, first), "better_than_small_slice": decide(second, small)}
    result = {"test_products": len(test_rows), "val_products": len(val_rows), "image_size": args.image_size,
              "fine_tune": args.fine_tune, "epochs": settings.epochs, "baseline": settings.baseline_accuracy,
              "significance": settings.gate_significance, "cpu_count": os.cpu_count(), "scenarios": scenarios}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1, default=str))

    print(f"\n{len(test_rows)} test products, baseline {settings.baseline_accuracy}, "
          f"significance {settings.gate_significance}\n")
    print("| scenario | candidate | production | accuracy candidate / production | only candidate right / "
          "only production right | p (one-sided exact McNemar) | decision |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, s in scenarios.items():
        d, p = s["decision"], s["paired"]
        print(f"| {name} | seed {s['candidate']['seed']}, {s['candidate']['train_products']} train | "
              f"seed {s['production']['seed']}, {s['production']['train_products']} train | "
              f"{p['candidate_accuracy']:.4f} / {p['production_accuracy']:.4f} | "
              f"{p['candidate_only_right']} / {p['production_only_right']} | {d['p_value']:.3g} | "
              f"{'PROMOTED' if d['promote'] else 'not promoted'} |")
    for name, s in scenarios.items():
        print(f"{name}: {s['decision']['reason']}")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
