"""Issue 14, photos: what tagging and training make of each bad or odd kind of photo.

Generates the photo zoo (``tests/photo_zoo.py``: zero bytes, truncated, not an image, pixel and
decompression bombs, a 21 MiB object, CMYK, 16-bit and palette-with-alpha PNGs, EXIF-rotated
JPEGs, an animated GIF, WebP...) in a temp dir and runs the real code over it:

* tagging: the files as objects of a local store, fetched by ``tagging.fetch_photos`` (byte cap)
  and decoded by ``images.decode_image``;
* training: the tf.data pipeline the embedding pass and fine-tuning read files with
  (``images.file_image_dataset``).

Each outcome is checked against what a correct decoder must give (the upright picture, or the
expected rejection reason). Prints a table and writes ``benchmarks/results/photo_zoo.json``.

    .venv/bin/python benchmarks/photo_zoo.py [--size 224]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fashion_tagging.images import (MAX_PHOTO_BYTES, MAX_PHOTO_PIXELS, ImageDecodeError,  # noqa: E402
                                    decode_image, file_image_dataset)
from fashion_tagging.objectstore import LocalStore  # noqa: E402
from fashion_tagging.tagging import fetch_photos  # noqa: E402
from tests.photo_zoo import write_photo_zoo  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "photo_zoo.json"
MAX_MEAN_ERROR = 10  # mean |pixel - upright picture| (0..255) below which "decoded" is right


def verdict(photo, pixels: np.ndarray | None, message: str | None, size: int) -> tuple[str, bool]:
    """(outcome text, whether it is what a correct decoder gives)."""
    if pixels is None:
        reason = message.removeprefix("cannot decode image: ")
        return f"rejected: {reason}", photo.upright is None and reason.startswith(photo.reason)
    error = float(np.abs(pixels.astype(int) - photo.expected(size).astype(int)).mean()) if photo.upright is not None \
        else float("nan")
    return f"decoded (mean error {error:.1f})", photo.upright is not None and error < MAX_MEAN_ERROR


def legacy_training(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    """The tf.data decode training used before this change (for the "before" column)."""
    import tensorflow as tf

    from benchmarks.decode_parity import legacy_decode, legacy_resize_and_pad

    try:
        pixels = legacy_resize_and_pad(legacy_decode(tf.io.read_file(str(path))), size)
        return np.asarray(pixels).astype(np.uint8), None
    except Exception as error:  # tf.data's ignore_errors dropped these rows without a reason
        message = re.sub(r"\{\{.*?\}\}|\[Op:\w+\]", "", getattr(error, "message", str(error))).strip()
        first_line = (message.splitlines() or [type(error).__name__])[0]
        return None, f"cannot decode image: dropped, no reason kept (TF: {first_line[:60]})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="model image size (pixels)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ft-photo-zoo-") as tmp:
        zoo = write_photo_zoo(Path(tmp) / "files")
        store = LocalStore(Path(tmp) / "files")

        tick = time.perf_counter()
        fetched = fetch_photos(store, [photo.path.name for photo in zoo])
        tagging = []
        for photo in zoo:
            data = fetched[photo.path.name]
            try:
                tagging.append((decode_image(data, args.size), None, len(data)))
            except ImageDecodeError as error:
                tagging.append((None, str(error), len(data)))
        tagging_seconds = time.perf_counter() - tick

        tick = time.perf_counter()
        training = {}
        for indices, images, reasons in file_image_dataset([str(p.path) for p in zoo], args.size, batch_size=8):
            for index, image, reason in zip(indices.numpy(), images.numpy(), reasons.numpy(), strict=True):
                reason = reason.decode()
                training[int(index)] = (None, reason) if reason else (image.astype(np.uint8), None)
        training_seconds = time.perf_counter() - tick

        legacy = [legacy_training(photo.path, args.size) for photo in zoo]

        rows = []
        for i, photo in enumerate(zoo):
            tag_pixels, tag_message, bytes_read = tagging[i]
            train_pixels, train_message = training.get(i, (None, "dropped by tf.data (no reason)"))
            tag_outcome, tag_right = verdict(photo, tag_pixels, tag_message, args.size)
            train_outcome, train_right = verdict(photo, train_pixels, train_message, args.size)
            same = tag_message == train_message and (
                tag_pixels is None or (train_pixels is not None and np.array_equal(tag_pixels, train_pixels)))
            rows.append({"kind": photo.kind, "file_bytes": photo.path.stat().st_size,
                         "tagging_bytes_read": bytes_read,
                         "expected": "decoded upright RGB" if photo.upright is not None else f"rejected: {photo.reason}",
                         "tagging": tag_outcome, "tagging_as_expected": tag_right,
                         "training": train_outcome, "training_as_expected": train_right,
                         "paths_identical": bool(same),
                         "training_before_this_change": verdict(photo, *legacy[i], args.size)[0],
                         # it had no reasons: any rejection of a photo that must be rejected counts
                         "training_before_as_expected": photo.upright is None if legacy[i][0] is None
                         else verdict(photo, *legacy[i], args.size)[1]})

    width = max(len(r["kind"]) for r in rows)
    print(f"photo zoo at {args.size}px: caps {MAX_PHOTO_BYTES:,} bytes, {MAX_PHOTO_PIXELS:,} pixels\n")
    print(f"{'kind':<{width}}  {'tagging (store -> decode_image)':<58}  {'training (tf.data)':<18}  ok   "
          f"training before this change")
    for r in rows:
        train = "same as tagging" if r["paths_identical"] else r["training"]
        ok = "yes" if r["tagging_as_expected"] and r["training_as_expected"] and r["paths_identical"] else "NO"
        before = ("right: " if r["training_before_as_expected"] else "WRONG: ") + r["training_before_this_change"]
        print(f"{r['kind']:<{width}}  {r['tagging']:<58}  {train:<18}  {ok:<4} {before}")
    all_right = all(r["tagging_as_expected"] and r["training_as_expected"] and r["paths_identical"] for r in rows)
    print(f"\nall {len(rows)} kinds as expected and identical in both paths: {all_right}")

    result = {"benchmark": "photo_zoo", "size": args.size, "max_photo_bytes": MAX_PHOTO_BYTES,
              "max_photo_pixels": MAX_PHOTO_PIXELS, "max_mean_error": MAX_MEAN_ERROR, "kinds": rows,
              "all_as_expected": all_right, "tagging_seconds": round(tagging_seconds, 3),
              "training_seconds": round(training_seconds, 3),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all_right else 1


if __name__ == "__main__":
    sys.exit(main())
