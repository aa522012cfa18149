"""Issue 14, train/serve parity: training and tagging decode real photos alike.

Training reads photo files through tf.data (``images.file_image_dataset``: the embedding pass and
fine-tuning); tagging fetches objects from the store (``tagging.fetch_photos``) and decodes them
with ``images.decode_image``. Both now run the one Pillow rule; this measures, on N real catalog
photos through the real backbone, that they agree: identical pixels, embedding cosine (min/mean)
and, with ``--model``, label agreement per head (image only, and fused with the product text).

It also measures the decoder training used before (``tf.io.decode_image`` + ``tf.image.resize``,
kept here as ``legacy_tf_pixels``) against the rule: how far embeddings cached by it are from
what tagging computes.

    .venv/bin/python benchmarks/decode_parity.py [--photos 1000] [--size 224] [--model ARTIFACT_DIR]

Writes ``benchmarks/results/decode_parity.json`` (``decode_parity_<size>_model.json`` with --model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fashion_tagging.settings import get_settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def legacy_resize_and_pad(image, size: int):
    """The resize training used before this change, verbatim (tf.image.resize, antialiased bilinear)."""
    import tensorflow as tf

    image = tf.cast(image, tf.float32)
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    scale = tf.minimum(size / height, size / width)
    new_height = tf.maximum(1, tf.cast(tf.round(height * scale), tf.int32))
    new_width = tf.maximum(1, tf.cast(tf.round(width * scale), tf.int32))
    image = tf.image.resize(image, [new_height, new_width], method="bilinear", antialias=True)
    pad_top = (size - new_height) // 2
    pad_left = (size - new_width) // 2
    padded = tf.pad(image - 255.0, [[pad_top, size - new_height - pad_top],
                                    [pad_left, size - new_width - pad_left], [0, 0]]) + 255.0
    return tf.ensure_shape(tf.clip_by_value(padded, 0.0, 255.0), [size, size, 3])


def legacy_decode(data):
    """The decode training used before this change, verbatim: no caps, no EXIF, alpha dropped."""
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def legacy_tf_pixels(paths: list[str], size: int, batch_size: int):
    """The training pipeline before this change: (index, float32 pixels) batches, failures dropped."""
    import tensorflow as tf

    def load(index, path):
        return index, legacy_resize_and_pad(legacy_decode(tf.io.read_file(path)), size)

    indices = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
    return (indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def stats(values: np.ndarray) -> dict:
    return {"min": round(float(values.min()), 6), "mean": round(float(values.mean()), 6),
            "p01": round(float(np.percentile(values, 1)), 6)} if len(values) else {}


def agreement(tagger, a_vectors, a_ok, b_vectors, b_ok, texts) -> dict:
    """Per head: share of photos (usable on both sides) given the same label from both embeddings."""
    both = a_ok & b_ok
    out = {}
    for mode, mode_texts in (("image_only", [""] * len(texts)), ("fused", texts)):
        a = tagger.predict_embeddings(a_vectors, a_ok, mode_texts)
        b = tagger.predict_embeddings(b_vectors, b_ok, mode_texts)
        out[mode] = {head: round(float(np.mean(np.array(a.labels[head])[both] == np.array(b.labels[head])[both])), 5)
                     for head in tagger.heads}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1000, help="real photos, evenly spread over the catalog")
    parser.add_argument("--size", type=int, default=224, help="image size (ignored with --model: the model's)")
    parser.add_argument("--backbone", default=None, help="default: the settings' backbone (or the model's)")
    parser.add_argument("--model", type=Path, help="a model artifact dir: also compare labels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.features import embed_image_files
    from fashion_tagging.images import ImageDecodeError, decode_image, file_image_dataset
    from fashion_tagging.objectstore import LocalStore
    from fashion_tagging.tagging import fetch_photos

    settings = get_settings()
    tagger = None
    if args.model:
        from fashion_tagging.artifacts import Tagger

        tagger = Tagger.load(args.model)
        size, backbone_name, backbone = tagger.image_size, tagger.backbone_name, tagger.backbone
    else:
        from fashion_tagging.backbones import build_backbone

        size, backbone_name = args.size, args.backbone or settings.backbone
        backbone = build_backbone(backbone_name, size)

    products = load_kaggle_catalog(settings.data_dir).products.dropna(subset=["image_path"]).reset_index(drop=True)
    picks = np.unique(np.linspace(0, len(products) - 1, min(args.photos, len(products))).round().astype(int))
    products = products.iloc[picks].reset_index(drop=True)
    paths = products["image_path"].tolist()
    texts = products["text"].fillna("").tolist()
    root = Path(paths[0]).parent
    n = len(paths)
    print(f"{n} real photos at {size}px through {backbone_name}" + (f", model {tagger.version}" if tagger else ""))

    def embed(images: list) -> tuple[np.ndarray, np.ndarray]:
        """What Tagger.image_embeddings does (without a model: the bare backbone, same batching)."""
        if tagger is not None:
            return tagger.image_embeddings(images, batch_size=args.batch)
        vectors = np.zeros((len(images), int(backbone.output_shape[-1])), np.float32)
        present = np.array([image is not None for image in images])
        rows = np.flatnonzero(present)
        for start in range(0, len(rows), args.batch):
            chunk = rows[start:start + args.batch]
            vectors[chunk] = np.asarray(backbone.predict_on_batch(np.stack([images[i] for i in chunk]).astype(np.float32)))
        return vectors, present

    # Tagging: objects of a store -> capped fetch -> decode_image -> backbone.
    tick = time.perf_counter()
    fetched = fetch_photos(LocalStore(root), [str(Path(p).relative_to(root)) for p in paths])
    fetch_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    tag_images, tag_reasons = [], {}
    for path in paths:
        try:
            tag_images.append(decode_image(fetched[str(Path(path).relative_to(root))], size))
        except ImageDecodeError as error:
            tag_images.append(None)
            tag_reasons[len(tag_images) - 1] = str(error)
    tag_decode_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    tag_vectors, tag_ok = embed(tag_images)
    tag_embed_seconds = time.perf_counter() - tick

    # Training: the tf.data pipeline (pixels), then the embedding pass over the same files.
    tick = time.perf_counter()
    identical, max_diff, train_reasons = 0, 0.0, {}
    for indices, images, reasons in file_image_dataset(paths, size, args.batch):
        for i, image, reason in zip(indices.numpy(), images.numpy(), reasons.numpy(), strict=True):
            if reason:
                train_reasons[int(i)] = reason.decode()
            elif tag_images[i] is not None:
                diff = float(np.abs(image - tag_images[i].astype(np.float32)).max())
                identical += diff == 0.0
                max_diff = max(max_diff, diff)
    train_decode_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    embed_reasons: dict[int, str] = {}
    train_vectors, _, train_ok = embed_image_files(paths, backbone, size, args.batch, progress=False,
                                                   reasons=embed_reasons)
    train_embed_seconds = time.perf_counter() - tick

    # The decoder training used before: what embeddings cached by it differ by.
    tick = time.perf_counter()
    legacy_vectors = np.zeros_like(train_vectors)
    legacy_ok = np.zeros(n, dtype=bool)
    legacy_pixel_diff = []
    for indices, images in legacy_tf_pixels(paths, size, args.batch):
        idx, pixels = indices.numpy(), images.numpy()
        legacy_vectors[idx] = np.asarray(backbone.predict_on_batch(pixels), dtype=np.float32)
        legacy_ok[idx] = True
        legacy_pixel_diff += [float(np.abs(pixels[k] - tag_images[i]).mean())
                              for k, i in enumerate(idx) if tag_images[i] is not None]
    legacy_seconds = time.perf_counter() - tick

    both = train_ok & tag_ok
    result = {
        "benchmark": "decode_parity", "photos": n, "size": size, "backbone": backbone_name,
        "model": tagger.version if tagger else None,
        "rejected": {"tagging": len(tag_reasons), "training_pipeline": len(train_reasons),
                     "training_embedding_pass": int((~train_ok).sum()), "legacy_tf": int((~legacy_ok).sum()),
                     "reasons": dict(Counter(tag_reasons.values()))},
        "same_rejections_and_reasons": tag_reasons == train_reasons == embed_reasons,
        "pixels": {"compared": int(both.sum()), "identical": int(identical), "max_abs_diff": max_diff},
        "embedding_cosine_training_vs_tagging": stats(cosine(train_vectors[both], tag_vectors[both])),
        "legacy_tf_decode": {
            "mean_abs_pixel_diff_vs_rule": stats(np.array(legacy_pixel_diff)),
            "embedding_cosine_vs_tagging": stats(cosine(legacy_vectors[legacy_ok & tag_ok],
                                                        tag_vectors[legacy_ok & tag_ok])),
        },
        "seconds": {"tagging_fetch": round(fetch_seconds, 2), "tagging_decode": round(tag_decode_seconds, 2),
                    "tagging_embed": round(tag_embed_seconds, 2), "training_decode_tf_data": round(train_decode_seconds, 2),
                    "training_embed_pass": round(train_embed_seconds, 2), "legacy_tf_decode_and_embed": round(legacy_seconds, 2)},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if tagger is not None:
        result["label_agreement_training_vs_tagging"] = agreement(tagger, train_vectors, train_ok, tag_vectors,
                                                                  tag_ok, texts)
        result["legacy_tf_decode"]["label_agreement_vs_tagging"] = agreement(tagger, legacy_vectors, legacy_ok,
                                                                             tag_vectors, tag_ok, texts)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=2))
    out = args.out or RESULTS / ("decode_parity.json" if tagger is None else f"decode_parity_{size}_model.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
