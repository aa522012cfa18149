"""The feature store's embedding pass per engine: what a cold retrain spends before it trains anything.

A retrain from an empty store embeds every photo once (pooled vector + the activations entering
the last block) and one augmented view of every training photo. This runs that pass,
``features.catalog_image_embeddings`` as training calls it, over the same N real photos with
the Keras backbone and with its float32 LiteRT export (``engines.litert_embedding_runner``), each
round into an empty store of its own, rounds alternating engines, and compares what they
stored.

    .venv/bin/python benchmarks/embedding_pass.py [--photos 1500] [--rounds 2]

Prints a table and writes benchmarks/results/embedding_pass.json.
"""

from __future__ import annotations

import argparse
import json
import os
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

RESULTS = ROOT / "benchmarks" / "results" / "embedding_pass.json"
ENGINES = ("keras", "litert")


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1500, help="real photos, evenly spread over the catalog")
    parser.add_argument("--rounds", type=int, default=2, help="passes per engine, alternating engines")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from fashion_tagging.augment import AugmentedView
    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.features import catalog_image_embeddings, photo_file_digests

    settings = get_settings()
    products = load_kaggle_catalog(settings.data_dir).products.dropna(subset=["image_path"]).reset_index(drop=True)
    picks = np.unique(np.linspace(0, len(products) - 1, min(args.photos, len(products))).round().astype(int))
    products = products.iloc[picks].reset_index(drop=True)
    ids, paths = products["id"].to_numpy(), products["image_path"].tolist()
    digests = photo_file_digests(paths)
    print(f"{len(paths)} real photos at {settings.image_size}px through {settings.backbone}, "
          f"{args.rounds} rounds per engine", flush=True)

    work = Path(tempfile.mkdtemp(prefix="ft-embedding-pass-"))
    exports = {engine: work / f"exports-{engine}" for engine in ENGINES}  # one export per engine, reused by rounds
    rates: dict[str, dict[str, list[float]]] = {engine: {"photos": [], "view": []} for engine in ENGINES}
    stored: dict[str, dict] = {}
    setup_seconds: dict[str, float] = {}
    for round_ in range(args.rounds):
        for engine in ENGINES:
            cache = work / f"{engine}-{round_}"
            cache.mkdir()
            if (exports[engine]).is_dir():  # the export is made once per machine, not per pass
                (cache / "exports").symlink_to(exports[engine])
            embed = dict(backbone_name=settings.backbone, image_size=settings.image_size, cache_dir=cache,
                         batch_size=settings.inference_batch_size, progress=False, engine=engine, digests=digests)
            if round_ == 0:  # build (and for LiteRT export) the backbone on one photo, timed on its own
                started = time.perf_counter()
                catalog_image_embeddings(ids[:1], paths[:1], **dict(embed, cache_dir=work / f"setup-{engine}",
                                                                     digests=digests[:1]), with_top_inputs=True)
                setup_seconds[engine] = round(time.perf_counter() - started, 1)
                if (work / f"setup-{engine}" / "exports").is_dir():
                    (work / f"setup-{engine}" / "exports").rename(exports[engine])
                    (cache / "exports").symlink_to(exports[engine])
            started = time.perf_counter()
            photos = catalog_image_embeddings(ids, paths, **embed, with_top_inputs=True)
            rates[engine]["photos"].append(len(paths) / (time.perf_counter() - started))
            started = time.perf_counter()
            catalog_image_embeddings(ids, paths, **embed, with_top_inputs=True,
                                     view=AugmentedView(0, settings.seed))
            rates[engine]["view"].append(len(paths) / (time.perf_counter() - started))
            print(f"round {round_ + 1} {engine:7s} photos {rates[engine]['photos'][-1]:6.1f}/s, augmented view "
                  f"{rates[engine]['view'][-1]:6.1f}/s", flush=True)
            if round_ == 0:
                stored[engine] = dict(vectors=photos.vectors.copy(), has_image=photos.has_image.copy(),
                                      top=photos.top_inputs[np.flatnonzero(photos.has_image)[:200]].astype(np.float32))

    keras, litert = stored["keras"], stored["litert"]
    both = keras["has_image"] & litert["has_image"]
    vector_diff = float(np.abs(keras["vectors"][both] - litert["vectors"][both]).max())
    top_diff = float(np.abs(keras["top"] - litert["top"]).max())
    best = {engine: {kind: round(max(values), 1) for kind, values in rates[engine].items()} for engine in ENGINES}
    result = {
        "commit": commit(), "photos": len(paths), "image_size": settings.image_size, "backbone": settings.backbone,
        "rounds": args.rounds, "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "photos_per_second": {engine: {kind: [round(v, 1) for v in values] for kind, values in rates[engine].items()}
                              for engine in ENGINES},
        "best_photos_per_second": best,
        "speedup_litert_over_keras": {kind: round(best["litert"][kind] / best["keras"][kind], 2)
                                      for kind in ("photos", "view")},
        "setup_seconds_first_photo": setup_seconds,
        "same_photos_usable": bool((keras["has_image"] == litert["has_image"]).all()),
        "max_abs_diff_vectors": vector_diff, "vector_scale": float(np.abs(keras["vectors"][both]).max()),
        "max_abs_diff_top_inputs_200_photos": top_diff,
    }
    print("\n| engine | photos/s (pooled + last-block inputs) | augmented view/s | first photo incl. setup |")
    print("| --- | --- | --- | --- |")
    for engine in ENGINES:
        print(f"| {engine} | {best[engine]['photos']} | {best[engine]['view']} | {setup_seconds[engine]} s |")
    print(f"LiteRT / Keras: {result['speedup_litert_over_keras']}; stored vectors differ by at most {vector_diff:.2g} "
          f"(values up to {result['vector_scale']:.3g}), last-block inputs by {top_diff:.2g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
