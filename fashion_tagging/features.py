"""Frozen-backbone image embeddings, computed once per (backbone, image size) and cached.

The backbone is the expensive part of the model on a CPU; with it frozen, its 1280-d output
for a product never changes, so every retrain reuses the cache and only embeds new products.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fashion_tagging.catalog import RowError
from fashion_tagging.images import file_image_dataset
from fashion_tagging.settings import IMAGE_EMBEDDING_DIM

log = logging.getLogger(__name__)
CACHE_SUBDIR = "embeddings"


@dataclasses.dataclass
class ImageEmbeddings:
    """Embeddings aligned with the requested product ids; ``has_image`` False -> a zero row."""

    product_ids: np.ndarray
    vectors: np.ndarray
    has_image: np.ndarray
    errors: list[RowError]

    def rows(self, selection: slice) -> "ImageEmbeddings":
        """The embeddings of a contiguous range of the requested products (errors follow their product)."""
        ids = self.product_ids[selection]
        wanted = set(ids.tolist())
        return ImageEmbeddings(ids, self.vectors[selection], self.has_image[selection],
                               [e for e in self.errors if e.product_id in wanted])


def cache_path(cache_dir: Path, backbone: str, image_size: int) -> Path:
    return Path(cache_dir) / CACHE_SUBDIR / f"{backbone}-{image_size}.npz"


def embed_image_files(paths: list[str], backbone, image_size: int, batch_size: int, *, progress: bool = True):
    """Run the backbone over image files; returns (vectors, ok) with unreadable files not ok."""
    vectors = np.zeros((len(paths), IMAGE_EMBEDDING_DIM), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    if not paths:
        return vectors, ok
    dataset = file_image_dataset(paths, image_size, batch_size)
    with tqdm(total=len(paths), unit="img", desc="image embeddings", disable=not progress) as bar:
        for indices, images in dataset:
            batch = backbone.predict_on_batch(images)
            idx = indices.numpy()
            vectors[idx] = np.asarray(batch, dtype=np.float32)
            ok[idx] = True
            bar.update(len(idx))
    return vectors, ok


def catalog_image_embeddings(
    product_ids, image_paths, *, backbone_name: str, image_size: int, cache_dir: Path,
    batch_size: int = 64, progress: bool = True, backbone=None,
) -> ImageEmbeddings:
    """Embeddings for these products, from the cache where present, computing (and caching) the rest."""
    product_ids = np.asarray(product_ids, dtype=np.int64)
    path = cache_path(cache_dir, backbone_name, image_size)
    cached: dict[int, np.ndarray] = {}
    cached_ids = np.zeros(0, dtype=np.int64)
    cached_vectors = np.zeros((0, IMAGE_EMBEDDING_DIM), dtype=np.float16)
    if path.is_file():
        with np.load(path) as data:
            cached_ids, cached_vectors = data["ids"], data["vectors"]
        cached = {int(i): row for i, row in zip(cached_ids, range(len(cached_ids)), strict=True)}

    vectors = np.zeros((len(product_ids), IMAGE_EMBEDDING_DIM), dtype=np.float32)
    has_image = np.zeros(len(product_ids), dtype=bool)
    errors: list[RowError] = []
    todo = []
    for position, (pid, image_path) in enumerate(zip(product_ids, image_paths, strict=True)):
        if not isinstance(image_path, str) or not image_path:
            errors.append(RowError("product has no image", int(pid), "", stage="image"))
        elif int(pid) in cached:
            vectors[position] = cached_vectors[cached[int(pid)]]
            has_image[position] = True
        else:
            todo.append(position)

    if todo:
        if backbone is None:
            from fashion_tagging.backbones import build_backbone

            backbone = build_backbone(backbone_name, image_size)
        log.info("embedding %d images with %s at %dpx (%d cached)", len(todo), backbone_name, image_size, len(cached))
        new_vectors, ok = embed_image_files([image_paths[p] for p in todo], backbone, image_size, batch_size,
                                            progress=progress)
        for position, vector, good in zip(todo, new_vectors, ok, strict=True):
            if good:
                vectors[position] = vector
                has_image[position] = True
            else:
                errors.append(RowError("image file cannot be decoded", int(product_ids[position]),
                                       str(image_paths[position]), stage="image"))
        new_ids = product_ids[todo][ok]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=np.concatenate([cached_ids, new_ids]),
                 vectors=np.concatenate([cached_vectors, new_vectors[ok].astype(np.float16)]))
        tmp.replace(path)
    return ImageEmbeddings(product_ids, vectors, has_image, errors)
