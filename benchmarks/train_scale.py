"""Retraining at catalog scale: peak memory and wall time against catalog size, and what a retrain embeds.

Each run is a child process (its own peak RSS, from ``wait4``) that trains on the real catalog
grown to N products by replicating real products under new ids with their real photos (each
replica a file name of its own, a hard link to the real photo's bytes: content hashing must make
replicas cost no embedding), one epoch per stage. ``--max-batches B`` caps every stage's epoch
and validation pass at B batches (``FT_MAX_BATCHES_PER_EPOCH``): a memory figure for a catalog
whose full epochs take hours; its wall time is not a full retrain's. All runs share one state directory, so the first run fills the
feature store and the later ones show what a retrain re-embeds. ``--new-products K`` adds a run
on the real catalog plus K new products whose photos the store has never seen (mirrored copies
of real photos): it should embed exactly K photos (and one augmented view of each).

    .venv/bin/python benchmarks/train_scale.py --home /work/ft/scale --sizes 44441 250000 --new-products 1000

Writes ``benchmarks/results/train_scale.json`` (runs are merged into it by size) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "train_scale.json"
EMBEDDED = re.compile(r"embedding (\d+) photos of (\d+) products")


def scaled_catalog(products, size: int, photo_dir: Path, new_products: int = 0):
    """The catalog grown (or cut) to ``size`` products: replicas keep their product's split, labels and
    photo bytes under new ids; ``new_products`` more get photos never seen (mirrored real photos)."""
    import numpy as np
    import pandas as pd
    from PIL import Image, ImageOps

    base = products.reset_index(drop=True)
    if size <= len(base):
        frame = base.iloc[:size].copy()
    else:
        repeats = np.arange(size) % len(base)
        frame = base.iloc[repeats].reset_index(drop=True)
        frame["id"] = np.arange(size, dtype=np.int64) + 10_000_000
        photo_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for position, (pid, source) in enumerate(zip(frame["id"], frame["image_path"], strict=True)):
            if position < len(base) or not isinstance(source, str):
                paths.append(source)
                continue
            copy = photo_dir / f"{pid}.jpg"
            if not copy.exists():
                try:
                    os.link(source, copy)  # same bytes under another name, without a million copies on disk
                except OSError:
                    shutil.copyfile(source, copy)
            paths.append(str(copy))
        frame["image_path"] = paths
    if new_products:
        fresh = base[base["image_path"].map(lambda p: isinstance(p, str))].sample(new_products, random_state=0).copy()
        fresh["id"] = np.arange(new_products, dtype=np.int64) + 90_000_000
        fresh["split"] = "train"
        (photo_dir / "new").mkdir(parents=True, exist_ok=True)
        paths = []
        for pid, source in zip(fresh["id"], fresh["image_path"], strict=True):
            target = photo_dir / "new" / f"{pid}.jpg"
            if not target.exists():
                with Image.open(source) as image:
                    ImageOps.mirror(image.convert("RGB")).save(target, "JPEG", quality=90)
            paths.append(str(target))
        fresh["image_path"] = paths
        frame = pd.concat([frame, fresh], ignore_index=True)
    return frame


def child(args) -> int:
    """One retrain in this process; prints its figures as the last line of stdout."""
    import fashion_tagging.text_expert as text_expert
    from fashion_tagging.artifacts import artifact_footprint
    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.settings import get_settings
    from fashion_tagging.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings(home=args.home, epochs=args.epochs, top_tune_epochs=args.epochs,
                            max_batches_per_epoch=args.max_batches)
    text_expert.EPOCHS = args.epochs  # one epoch per stage, the text expert included
    catalog = {}

    def grown_catalog():
        """Loaded inside ``train``, as the retrain DAG's snapshot is: the frame is not held beside training."""
        started = time.perf_counter()
        products = load_kaggle_catalog(settings.data_dir).products
        if args.base:
            products = products.sample(args.base, random_state=0)
        frame = scaled_catalog(products, args.child, Path(args.home) / "replica-photos", args.new_products)
        catalog.update(products=len(frame), seconds=round(time.perf_counter() - started, 1))
        return frame

    result = train(settings, products=grown_catalog, epochs=args.epochs, progress=False)
    artifact_bytes, caches = artifact_footprint(result.artifact_dir)
    print(json.dumps({"products": catalog["products"], "version": result.version, "timings": result.timings,
                      "peak_rss_mib_after": result.peak_rss_mib_after,
                      "resident_peaks_mib_after": result.resident_peaks_mib_after,
                      "catalog_seconds": catalog["seconds"], "artifact_bytes": artifact_bytes,
                      "artifact_cache_files": caches}))
    return 0


def run_child(home: str, size: int, epochs: int, new_products: int = 0, base: int | None = None,
              max_batches: int | None = None) -> dict:
    command = [sys.executable, __file__, "--child", str(size), "--home", home, "--epochs", str(epochs),
               "--new-products", str(new_products), *(["--base", str(base)] if base else []),
               *(["--max-batches", str(max_batches)] if max_batches else [])]
    log_path = Path(home) / f"train_scale_{size}_{new_products}.log"
    Path(home).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True)
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"run of {size} products failed: see {log_path}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    embedded = [(int(photos), int(products)) for photos, products in EMBEDDED.findall(log_path.read_text())]
    return {**figures, "wall_seconds": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "photos_embedded_per_pass": embedded, "photos_embedded": sum(p for p, _ in embedded),
            "new_products": new_products, "epochs_per_stage": epochs, "max_batches_per_epoch": max_batches,
            "cpu_count": os.cpu_count(), "log": str(log_path)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="state directory shared by the runs (feature store)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[44441, 250_000, 1_000_000])
    parser.add_argument("--new-products", type=int, default=0,
                        help="then a run on the real catalog plus this many products with never-seen photos")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--base", type=int, help="replicate a random sample of this many real products (a smoke run)")
    parser.add_argument("--max-batches", type=int,
                        help="cap every stage's epoch and validation pass at this many batches (a memory-only run)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON the runs are merged into")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    runs = {}
    real = args.base or 44441
    plan = [(size, 0) for size in args.sizes] + ([(real, args.new_products)] if args.new_products else [])
    for size, new in plan:
        run = run_child(args.home, size, args.epochs, new, args.base, args.max_batches)
        name = (f"{size}+{new}" if new else str(size)) + (f" capped at {args.max_batches} batches" if args.max_batches else "")
        runs[name] = run
        # Re-read before writing: another invocation may have added runs meanwhile.
        results = json.loads(args.results.read_text()) if args.results.is_file() else {}
        results.setdefault("runs", {})[name] = run
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1))
        print(f"{run['products']} products: {run['wall_seconds'] / 60:.1f} min, peak RSS "
              f"{run['peak_rss_mib'] / 1024:.2f} GiB, photos embedded {run['photos_embedded']}; peak RSS after "
              f"each stage (MiB): {run.get('peak_rss_mib_after')}; sampled anonymous / file-backed peaks: "
              f"{run.get('resident_peaks_mib_after')}", flush=True)

    print("\n| products | new photos | wall | train (of which embedding) | peak RSS | photos embedded | artifact |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in runs.values():
        capped = f" (epochs capped at {run['max_batches_per_epoch']} batches)" if run.get("max_batches_per_epoch") else ""
        print(f"| {run['products']:,}{capped} | {run['new_products']} | {run['wall_seconds'] / 60:.1f} min | "
              f"{run['timings']['train_seconds']:.0f} s ({run['timings']['embedding_seconds']:.0f} s) | "
              f"{run['peak_rss_mib'] / 1024:.2f} GiB | {run['photos_embedded']} | "
              f"{run['artifact_bytes'] / 2**20:.0f} MiB, caches: {run['artifact_cache_files'] or 'none'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
