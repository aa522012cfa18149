"""Frozen-backbone image embeddings, computed once per (backbone, image size) and cached.

The backbone is the expensive part of the model on a CPU; with it frozen, its 1280-d output
for a product never changes, so every retrain reuses the cache and only embeds new products.
The same pass also caches the activations that enter the backbone's last block
(``backbones.TOP_CUT_LAYER``): fine-tuning that block then needs no image decoding or backbone
pass at all, which is what makes fine-tuning affordable on a CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fashion_tagging.augment import AugmentedView
from fashion_tagging.errors import RowError
from fashion_tagging.images import DECODE_RULE, file_image_dataset
from fashion_tagging.progress import ProgressLogger
from fashion_tagging.settings import IMAGE_EMBEDDING_DIM

log = logging.getLogger(__name__)
CACHE_SUBDIR = "embeddings"
# A photo the tf.data pass dropped without a reason (an exception outside decode_image's rule).
UNEXPECTED_FAILURE = "cannot decode image: unexpected decode failure"


@dataclasses.dataclass
class ImageEmbeddings:
    """Embeddings aligned with the requested product ids; ``has_image`` False -> a zero row."""

    product_ids: np.ndarray
    vectors: np.ndarray
    has_image: np.ndarray
    errors: list[RowError]
    top_inputs: np.ndarray | None = None  # float16 (N, h, w, c) entering the last block; zeros without image

    def rows(self, selection: slice) -> "ImageEmbeddings":
        """The embeddings of a contiguous range of the requested products (errors follow their product)."""
        ids = self.product_ids[selection]
        wanted = set(ids.tolist())
        return ImageEmbeddings(ids, self.vectors[selection], self.has_image[selection],
                               [e for e in self.errors if e.product_id in wanted],
                               None if self.top_inputs is None else self.top_inputs[selection])


def cache_path(cache_dir: Path, backbone: str, image_size: int, view: AugmentedView | None = None) -> Path:
    """The cache file of a (backbone, image size), or of one augmented view of the photos."""
    suffix = f"-{view.name}" if view is not None else ""
    return Path(cache_dir) / CACHE_SUBDIR / f"{backbone}-{image_size}{suffix}.npz"


def cache_serves(data, with_top_inputs: bool) -> bool:
    """Whether an opened cache file can answer: not one made from pixels of another decode rule
    (tagging would see other pixels), nor one without last-block inputs when they are needed."""
    same_rule = "decode_rule" in data.files and str(data["decode_rule"]) == DECODE_RULE
    return same_rule and ("top_inputs" in data.files or not with_top_inputs)


def cached_product_ids(cache_dir: Path, backbone: str, image_size: int, *, with_top_inputs: bool = False) -> set[int]:
    """Products whose embedding (and, if asked, last-block inputs) the cache already holds."""
    path = cache_path(cache_dir, backbone, image_size)
    if not path.is_file():
        return set()
    with np.load(path) as data:
        return {int(i) for i in data["ids"]} if cache_serves(data, with_top_inputs) else set()


def embed_image_files(paths: list[str], backbone, image_size: int, batch_size: int, *, progress: bool = True,
                      with_top_inputs: bool = False, reasons: dict[int, str] | None = None,
                      view: AugmentedView | None = None):
    """Run the backbone over image files; returns (vectors, top_inputs or None, ok), unusable photos not ok.

    Photos are decoded by ``images.decode_image``, the rule tagging uses. ``reasons``, when
    given, receives {position: why} for every photo that is not ok (tagging's wording).
    ``view``: embed that augmented view of each photo instead of the photo.
    """
    from fashion_tagging.backbones import with_top_inputs_output

    vectors = np.zeros((len(paths), IMAGE_EMBEDDING_DIM), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    top_inputs = None
    model = with_top_inputs_output(backbone) if with_top_inputs else backbone
    if with_top_inputs:
        top_inputs = np.zeros((len(paths), *model.output_shape[1][1:]), dtype=np.float16)
    if not paths:
        return vectors, top_inputs, ok
    dataset = file_image_dataset(paths, image_size, batch_size, augment=view)
    # A terminal gets tqdm's bar; a task log (no ``progress``) a line every 30 s with rate and ETA.
    task_log = None if progress else ProgressLogger(len(paths), "img", log, every_s=30, label="image embeddings")
    desc = "image embeddings" if view is None else f"augmented view {view.index}"
    with tqdm(total=len(paths), unit="img", desc=desc, disable=not progress) as bar:
        for indices, images, failures in dataset:
            # A rejected photo stays in its batch (white pixels) and its outputs are dropped:
            # batches keep one shape, and rejections are rare.
            batch = model.predict_on_batch(images)
            idx, failures = indices.numpy(), failures.numpy()
            good = failures == b""
            if with_top_inputs:
                batch, cut = batch
                top_inputs[idx[good]] = np.asarray(cut, dtype=np.float16)[good]
            vectors[idx[good]] = np.asarray(batch, dtype=np.float32)[good]
            ok[idx[good]] = True
            if reasons is not None:
                reasons.update((int(i), why.decode("utf-8", "replace")) for i, why in zip(idx[~good], failures[~good]))
            bar.update(len(idx))
            if task_log is not None:
                task_log.update(len(idx))
    if task_log is not None:
        task_log.finish()
    return vectors, top_inputs, ok


def catalog_image_embeddings(
    product_ids, image_paths, *, backbone_name: str, image_size: int, cache_dir: Path,
    batch_size: int = 64, progress: bool = True, backbone=None, with_top_inputs: bool = False,
    view: AugmentedView | None = None,
) -> ImageEmbeddings:
    """Embeddings for these products, from the cache where present, computing (and caching) the rest.

    ``with_top_inputs`` also returns the last block's input activations; a cache written without
    them is then rebuilt once. A cache that has them keeps them for every product it adds.
    ``view``: the embeddings of that augmented view of the photos (training), in a cache of its own.
    """
    product_ids = np.asarray(product_ids, dtype=np.int64)
    path = cache_path(cache_dir, backbone_name, image_size, view)
    cached: dict[int, int] = {}
    cached_ids = np.zeros(0, dtype=np.int64)
    cached_vectors = np.zeros((0, IMAGE_EMBEDDING_DIM), dtype=np.float16)
    cached_top = None
    if path.is_file():
        with np.load(path) as data:
            if cache_serves(data, with_top_inputs):
                cached_ids, cached_vectors = data["ids"], data["vectors"]
                cached_top = data["top_inputs"] if "top_inputs" in data.files else None
            else:
                log.info("embedding cache %s is from another photo decode rule or has no last-block inputs: "
                         "rebuilding it", path)
        cached = {int(i): row for row, i in enumerate(cached_ids)}
    keep_top = with_top_inputs or cached_top is not None

    vectors = np.zeros((len(product_ids), IMAGE_EMBEDDING_DIM), dtype=np.float32)
    top_inputs = None
    if with_top_inputs and cached_top is not None:
        top_inputs = np.zeros((len(product_ids), *cached_top.shape[1:]), dtype=np.float16)
    has_image = np.zeros(len(product_ids), dtype=bool)
    errors: list[RowError] = []
    todo = []
    for position, (pid, image_path) in enumerate(zip(product_ids, image_paths, strict=True)):
        if not isinstance(image_path, str) or not image_path:
            errors.append(RowError("product has no image", int(pid), "", stage="image"))
        elif int(pid) in cached:
            row = cached[int(pid)]
            vectors[position] = cached_vectors[row]
            if top_inputs is not None:
                top_inputs[position] = cached_top[row]
            has_image[position] = True
        else:
            todo.append(position)

    if todo:
        if backbone is None:
            from fashion_tagging.backbones import build_backbone

            backbone = build_backbone(backbone_name, image_size)
        log.info("embedding %d images with %s at %dpx (%d cached)", len(todo), backbone_name, image_size, len(cached))
        reasons: dict[int, str] = {}
        new_vectors, new_top, ok = embed_image_files([image_paths[p] for p in todo], backbone, image_size,
                                                     batch_size, progress=progress, with_top_inputs=keep_top,
                                                     reasons=reasons, view=view)
        if with_top_inputs and top_inputs is None:
            top_inputs = np.zeros((len(product_ids), *new_top.shape[1:]), dtype=np.float16)
        for i, (position, good) in enumerate(zip(todo, ok, strict=True)):
            if good:
                vectors[position] = new_vectors[i]
                if top_inputs is not None:
                    top_inputs[position] = new_top[i]
                has_image[position] = True
            else:
                errors.append(RowError(reasons.get(i, UNEXPECTED_FAILURE),
                                       int(product_ids[position]), str(image_paths[position]), stage="image"))
        if not ok.all():
            why = Counter(reasons.get(int(i), UNEXPECTED_FAILURE) for i in np.flatnonzero(~ok))
            log.warning("%d of %d photos not usable (left image-less): %s", int((~ok).sum()), len(todo),
                        "; ".join(f"{count} x {reason}" for reason, count in why.most_common(5)))
        new_ids = product_ids[todo][ok]
        arrays = {"decode_rule": np.array(DECODE_RULE), "ids": np.concatenate([cached_ids, new_ids]),
                  "vectors": np.concatenate([cached_vectors, new_vectors[ok].astype(np.float16)])}
        if keep_top:
            arrays["top_inputs"] = new_top[ok] if cached_top is None else np.concatenate([cached_top, new_top[ok]])
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own per writer: two trainings adding to one cache never write into one file.
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp.npz")
        try:
            np.savez(tmp, **arrays)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return ImageEmbeddings(product_ids, vectors, has_image, errors, top_inputs)
