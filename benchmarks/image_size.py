"""Issue 16's image-size trade-off: val accuracy against CPU tagging speed at 160, 192 and 224 px.

Each size needs its own model (`fashion-tagging train --image-size S`, same recipe and seed):
this scores each artifact on the whole ``val`` split as a CPU worker tags it (its serving LiteRT
export, photos decoded at its size, hybrid blend included) and times ``Tagger.predict`` on the
same decoded photos, sizes alternating batch by batch. ``test`` is not read: the default is
chosen on val.

    .venv/bin/python benchmarks/image_size.py --artifacts MODEL_160 MODEL_192 MODEL_224

Prints a table and writes benchmarks/results/image_size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "image_size.json"
BATCH = 128


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", nargs="+", required=True, help="one model artifact per image size")
    args = parser.parse_args()

    from fashion_tagging import engines
    from fashion_tagging.artifacts import Tagger
    from fashion_tagging.catalog import load_kaggle_catalog, with_clean_labels
    from fashion_tagging.images import load_photo_file
    from fashion_tagging.settings import get_settings

    settings = get_settings()
    taggers = {}
    for path in args.artifacts:
        tagger = Tagger.load(Path(path), engine="litert")
        taggers[tagger.image_size] = tagger
    products = load_kaggle_catalog(settings.data_dir).products
    rows = with_clean_labels(products[products["split"] == "val"].reset_index(drop=True))
    truth = rows["articleType"].to_numpy()
    labels = {size: [] for size in taggers}
    image_only = {size: [] for size in taggers}  # text removed: products whose photo is all there is
    seconds = dict.fromkeys(taggers, 0.0)
    for start in range(0, len(rows), BATCH):
        chunk = rows.iloc[start:start + BATCH]
        texts = chunk["text"].fillna("").tolist()
        for size, tagger in taggers.items():
            images = []
            for path in chunk["image_path"].fillna(""):
                pixels, why = load_photo_file(path, size) if path else (None, "none")
                images.append(None if why else pixels)
            tick = time.perf_counter()
            labels[size] += tagger.predict(images, texts, batch_size=BATCH).labels[tagger.primary_head]
            seconds[size] += time.perf_counter() - tick
            image_only[size] += tagger.predict(images, [""] * len(images), batch_size=BATCH).labels[tagger.primary_head]
    labelled = truth != ""
    result = {"val_products": int(labelled.sum()), "cpu_count": os.cpu_count(), "sizes": {}}
    for size, tagger in sorted(taggers.items()):
        predicted = np.asarray(labels[size], dtype=object)
        photo_only = np.asarray(image_only[size], dtype=object)
        with_photo = labelled & np.array([bool(p) for p in rows["image_path"].fillna("")])
        result["sizes"][size] = {
            "model_version": tagger.version, "quantization": engines.serving_quantization(tagger.artifact_dir),
            "val_article_type_accuracy": round(float(np.mean(predicted[labelled] == truth[labelled])), 5),
            "val_image_only_article_type_accuracy": round(float(np.mean(photo_only[with_photo] == truth[with_photo])), 5),
            "tagging_products_per_second": round(len(rows) / seconds[size], 1),
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print("| image size | val articleType accuracy (fused) | image only | tagging products/s (LiteRT, raw model) "
          "| quantization |")
    print("| --- | --- | --- | --- | --- |")
    for size, row in result["sizes"].items():
        print(f"| {size} | {row['val_article_type_accuracy']:.4f} | {row['val_image_only_article_type_accuracy']:.4f} "
              f"| {row['tagging_products_per_second']} | {row['quantization']} |")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
