"""Issue 2's numbers: full train + evaluate on the real catalog, wall time and peak memory.

Runs ``fashion-tagging train`` in a child process (so its peak RSS is measured alone) with a
state directory of its own: ``--cold`` starts with an empty feature store (the backbone embeds every
photo), the default reuses the store in that directory. Prints a table and writes JSON.

    .venv/bin/python benchmarks/train_evaluate.py --home /tmp/ft-bench --cold
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fashion_tagging.artifacts import artifact_footprint
from fashion_tagging.features import STORE_SUBDIR

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "train_evaluate.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=str(ROOT / ".fashion-tagging"), help="FT_HOME for the run")
    parser.add_argument("--cold", action="store_true", help="delete the feature store first")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--fine-tune", choices=["none", "top", "full"], help="backbone fine-tuning mode")
    args = parser.parse_args()

    home = Path(args.home)
    if args.cold:
        shutil.rmtree(home / "cache" / STORE_SUBDIR, ignore_errors=True)
    env = dict(os.environ, FT_HOME=str(home))
    command = [str(ROOT / ".venv/bin/fashion-tagging"), "train"]
    if args.epochs:
        command += ["--epochs", str(args.epochs)]
    if args.fine_tune:
        command += ["--fine-tune", args.fine_tune]
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        print(completed.stderr[-4000:], file=sys.stderr)
        return completed.returncode
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    metrics = json.loads((home / "models" / summary["version"] / "metrics.json").read_text())["test"]
    config = json.loads((home / "models" / summary["version"] / "config.json").read_text())
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    modes = metrics["modes"]
    artifact_bytes, artifact_caches = artifact_footprint(home / "models" / summary["version"])
    embedded = [int(n) for n in re.findall(r"embedding (\d+) photos of \d+ products", completed.stderr)]
    result = {
        "version": summary["version"], "cold_cache": args.cold, "cpu_count": os.cpu_count(),
        "wall_seconds": round(wall, 1), "timings": config["timings"], "epochs_run": config["epochs_run"],
        "fine_tune_mode": config.get("fine_tune_mode", "none"),
        "backbone_top_epochs_run": config.get("backbone_top_epochs_run"),
        "best_val_article_type_accuracy": config.get("best_val_article_type_accuracy"),
        "best_val_image_only_article_type_accuracy": config.get("best_val_image_only_article_type_accuracy"),
        "primary_blend": config.get("primary_blend"), "primary_blend_val": config.get("primary_blend_val"),
        "text_condition_thresholds": config.get("text_condition_thresholds"),
        "evaluate_seconds": summary["evaluate_seconds"], "peak_rss_mib": round(peak_mib, 1),
        # the training's peak RSS after each of its stages (the stage that raised it is where memory goes)
        "train_peak_rss_mib_after": summary.get("train_peak_rss_mib_after"),
        # sampled peaks of anonymous and file-backed (memory-mapped feature store) resident memory
        "train_resident_peaks_mib_after": summary.get("train_resident_peaks_mib_after"),
        "test_products": metrics["products"], "baseline": metrics["baseline"],
        "article_type": {mode: {k: modes[mode]["articleType"][k] for k in ("accuracy", "macro_f1")} for mode in modes},
        "other_heads_fused": {h: modes["fused"][h]["accuracy"] for h in modes["fused"] if h != "articleType"},
        "accuracy_without_image": metrics["accuracy_without_image"],
        # what the backbone embedded (train, its augmented views, evaluate): a warm store embeds none
        "photos_embedded_per_pass": embedded,
        "artifact_bytes": artifact_bytes, "artifact_cache_files": artifact_caches,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print("| figure | value |\n| --- | --- |")
    print(f"| wall time train+evaluate ({'cold' if args.cold else 'warm'} embedding cache) | {wall / 60:.1f} min |")
    print(f"| of which image embedding / fit (backbone top) / evaluate | {config['timings']['embedding_seconds']:.0f} s / "
          f"{config['timings']['fit_seconds']:.0f} s ({config['timings'].get('backbone_top_seconds', 0):.0f} s) / "
          f"{summary['evaluate_seconds']:.0f} s |")
    print(f"| peak RSS | {peak_mib / 1024:.2f} GiB |")
    print(f"| training's peak RSS after each stage (MiB) | {result['train_peak_rss_mib_after']} |")
    print(f"| of which anonymous / file-backed, sampled (MiB) | {result['train_resident_peaks_mib_after']} |")
    print(f"| photos embedded per pass | {embedded} |")
    print(f"| artifact size (caches in it) | {result['artifact_bytes'] / 2**20:.0f} MiB "
          f"({result['artifact_cache_files'] or 'none'}) |")
    for mode, scores in result["article_type"].items():
        print(f"| articleType {mode}: accuracy / macro-F1 | {scores['accuracy']:.4f} / {scores['macro_f1']:.4f} |")
    for head, accuracy in result["other_heads_fused"].items():
        print(f"| {head} accuracy (fused) | {accuracy:.4f} |")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
