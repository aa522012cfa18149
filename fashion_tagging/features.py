"""Image features of product photos, in an append-only sharded store keyed by the photo's content.

The frozen backbone's 1280-d output for a photo never changes, so every retrain reuses it and
embeds only photos it has never seen. The same pass keeps the activations entering the
backbone's last block (``backbones.TOP_CUT_LAYER``): fine-tuning that block then needs no image
decoding or backbone pass at all, which is what makes fine-tuning affordable on a CPU.

The store is keyed by a digest of the photo's bytes, not by product id: a replaced photo is a
new key (the old vector is never served for it) and a photo shared by many products is embedded
once. A pass appends shards, each written under a temporary name and committed by one atomic
rename, so concurrent writers never clobber each other; readers memory-map the shards and gather
rows on demand, so memory does not grow with the store. Train, evaluate and tag share it; it
lives under the settings' cache directory, never inside a model artifact. On a CPU worker the
pass runs the backbone's float32 LiteRT export (``engines.litert_embedding_runner``), several times
faster there than Keras and equal to it within the store's float16 rounding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fashion_tagging.augment import AugmentedView
from fashion_tagging.errors import RowError
from fashion_tagging.images import DECODE_RULE, ImageDecodeError, file_image_dataset, read_photo_file
from fashion_tagging.progress import ProgressLogger
from fashion_tagging.settings import IMAGE_EMBEDDING_DIM

log = logging.getLogger(__name__)
STORE_SUBDIR = "features"
EXPORTS_SUBDIR = "exports"  # the embedding pass's LiteRT export of each pretrained backbone
LEGACY_CACHE_SUBDIR = "embeddings"  # the per-product .npz caches of earlier versions: no longer read
SHARD_PREFIX = "shard-"
# Photos per shard a pass writes: a crash loses at most this much work, and a pass holds at most
# this many new last-block activations (~19 KB each) in memory.
SHARD_ROWS = 4096
DIGEST_DTYPE = np.dtype("S32")
NO_DIGEST = b""
VECTORS_FILE, TOP_INPUTS_FILE, KEYS_FILE = "vectors.npy", "top_inputs.npy", "keys.npy"
REJECTED_FILE = "rejected.npy"  # per row: why the photo is unusable ("" when it is usable)
# A photo the tf.data pass dropped without a reason (an exception outside decode_image's rule).
UNEXPECTED_FAILURE = "cannot decode image: unexpected decode failure"
# Rows gathered per step when materializing pooled vectors: bounds the float16 staging copy.
GATHER_CHUNK = 65536
# Photos per backbone call of the embedding pass on a CPU. Measured on 1,024 photos at 224 px with
# the last block's inputs kept (a one-off probe, on shared cores): batch 128 peaked at 2.7 GiB, 32 at
# 0.95 GiB and was no slower (33-34 img/s against 25-34). A GPU keeps the activations in its own
# memory and gets the requested batch.
CPU_EMBEDDING_BATCH = 32


def photo_digest(data: bytes) -> bytes:
    """The store key of a photo: a digest of its bytes (what the backbone's output depends on)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest().encode()


def photo_file_digests(paths) -> np.ndarray:
    """Each photo file's :func:`photo_digest`; ``NO_DIGEST`` where there is no readable file.

    Reads at most ``MAX_PHOTO_BYTES + 1`` bytes, as decoding does: an oversized file is keyed by
    its head, and rejected by the embedding pass like any other unusable photo.
    """
    digests = np.full(len(paths), NO_DIGEST, dtype=DIGEST_DTYPE)
    for position, path in enumerate(paths):
        if isinstance(path, str) and path:
            try:
                digests[position] = photo_digest(read_photo_file(path))
            except ImageDecodeError:
                pass  # unreadable: embedded on its own, which records tagging's reason
    return digests


@dataclasses.dataclass
class StoredRows:
    """Rows of memory-mapped shard arrays, gathered on demand: a store larger than memory is never read whole.

    Row ``i`` is ``arrays[shard[i]][row[i]]``, or zeros where ``shard[i]`` is -1 (no photo).
    Indexing with an index array, mask or slice returns those rows as a new in-memory array.
    """

    arrays: list
    shard: np.ndarray
    row: np.ndarray
    row_shape: tuple
    dtype: np.dtype = np.dtype(np.float16)

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def shape(self) -> tuple:
        return (len(self), *self.row_shape)

    def __getitem__(self, selection) -> np.ndarray:
        shard, row = np.atleast_1d(self.shard[selection]), np.atleast_1d(self.row[selection])
        out = np.zeros((len(shard), *self.row_shape), dtype=self.dtype)
        for s in np.unique(shard[shard >= 0]):
            at = np.flatnonzero(shard == s)
            at = at[np.argsort(row[at], kind="stable")]  # read each shard in file order
            out[at] = self.arrays[s][row[at]]
        return out

    def subset(self, selection) -> "StoredRows":
        """These rows' ``selection``, still on disk."""
        return dataclasses.replace(self, shard=self.shard[selection], row=self.row[selection])

    def appended(self, other: "StoredRows") -> "StoredRows":
        """These rows, then ``other``'s; nothing is copied."""
        shard = np.where(other.shard >= 0, other.shard + len(self.arrays), -1)
        return dataclasses.replace(self, arrays=[*self.arrays, *other.arrays], shard=np.concatenate([self.shard, shard]),
                                   row=np.concatenate([self.row, other.row]),
                                   row_shape=self.row_shape if self.arrays else other.row_shape)

    def filled_from(self, mask: np.ndarray, other: "StoredRows") -> "StoredRows":
        """These rows with ``other``'s (aligned with them) where ``mask``; nothing is copied."""
        shard, row = self.shard.copy(), self.row.copy()
        shard[mask] = np.where(other.shard[mask] >= 0, other.shard[mask] + len(self.arrays), -1)
        row[mask] = other.row[mask]
        return dataclasses.replace(self, arrays=[*self.arrays, *other.arrays], shard=shard, row=row,
                                   row_shape=self.row_shape if self.arrays else other.row_shape)


@dataclasses.dataclass
class ImageEmbeddings:
    """Embeddings aligned with the requested product ids; a product without image gets a zero row.

    Vectors are held once per distinct photo (``photo_vectors``; ``photo_rows`` gives each
    product's row, -1 without image): a photo shared by many products costs its memory once.
    """

    product_ids: np.ndarray
    photo_vectors: np.ndarray  # float32 (photos, 1280)
    photo_rows: np.ndarray  # int64 per product, -1: no image
    errors: list[RowError]
    top_inputs: StoredRows | None = None  # per product, entering the last block (zeros without image)
    photo_top_inputs: StoredRows | None = None  # per photo, aligned with ``photo_vectors``

    @property
    def has_image(self) -> np.ndarray:
        return self.photo_rows >= 0

    @property
    def vectors(self) -> np.ndarray:
        """A per-product copy of the vectors (zero rows without image): for evaluation-sized splits."""
        out = np.zeros((len(self.photo_rows), self.photo_vectors.shape[1]), dtype=np.float32)
        has_image = self.has_image
        out[has_image] = self.photo_vectors[self.photo_rows[has_image]]
        return out

    def gather_table(self) -> np.ndarray:
        """The photo vectors plus a final zero row, for per-batch gathers (each product's row: :meth:`table_rows`)."""
        return np.concatenate([self.photo_vectors, np.zeros((1, self.photo_vectors.shape[1]), np.float32)])

    def table_rows(self) -> np.ndarray:
        """Each product's row in :meth:`gather_table`'s table (the final zero row without a photo)."""
        return np.where(self.has_image, self.photo_rows, len(self.photo_vectors))

    def rows(self, selection) -> "ImageEmbeddings":
        """The embeddings of some of the requested products (errors follow their product).

        The photo vectors stay shared: an update to them (a tuned last block) reaches both.
        """
        ids = self.product_ids[selection]
        wanted = set(ids.tolist())
        return dataclasses.replace(self, product_ids=ids, photo_rows=self.photo_rows[selection],
                                   errors=[e for e in self.errors if e.product_id in wanted],
                                   top_inputs=None if self.top_inputs is None else self.top_inputs.subset(selection))

    def filled_from(self, mask: np.ndarray, other: "ImageEmbeddings") -> "ImageEmbeddings":
        """These embeddings with ``other``'s (aligned with them, with image there) where ``mask``."""
        needed, remap = np.unique(other.photo_rows[mask], return_inverse=True)
        photo_rows = self.photo_rows.copy()
        photo_rows[mask] = len(self.photo_vectors) + remap
        top_inputs, photo_top = self.top_inputs, self.photo_top_inputs
        if top_inputs is not None and other.top_inputs is not None:
            top_inputs = top_inputs.filled_from(mask, other.top_inputs)
            photo_top = photo_top.appended(other.photo_top_inputs.subset(needed))
        return dataclasses.replace(self, photo_vectors=np.concatenate([self.photo_vectors, other.photo_vectors[needed]]),
                                   photo_rows=photo_rows, top_inputs=top_inputs, photo_top_inputs=photo_top)


def store_dir(cache_dir: Path, backbone: str, image_size: int, view: AugmentedView | None = None) -> Path:
    """The store of a (backbone, image size, photo decode rule), or of one augmented view of the photos.

    The decode rule is part of the name: features of another rule's pixels would put train/serve
    skew back, so they are never served.
    """
    rule = hashlib.blake2b(DECODE_RULE.encode(), digest_size=4).hexdigest()
    suffix = f"-{view.name}" if view is not None else ""
    return Path(cache_dir) / STORE_SUBDIR / f"{backbone}-{image_size}-rule{rule}{suffix}"


@dataclasses.dataclass
class StoreIndex:
    """Where each photo digest lives in a store's committed shards (the keys alone are read)."""

    keys: np.ndarray  # sorted unique digests
    shard: np.ndarray  # int32, shard of each key
    row: np.ndarray  # int64, row of each key in its shard
    vectors: list  # memory-mapped float16 (n, 1280) per shard
    top_inputs: list | None  # memory-mapped float16 (n, h, w, c) per shard, when every shard has them
    rejected: list  # per shard, why each row's photo is unusable ("" when usable)

    def locate(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each digest; shard -1 where the store does not hold it."""
        shard = np.full(len(digests), -1, dtype=np.int32)
        row = np.zeros(len(digests), dtype=np.int64)
        if len(self.keys) and len(digests):
            at = np.minimum(np.searchsorted(self.keys, digests), len(self.keys) - 1)
            found = (self.keys[at] == digests) & (digests != NO_DIGEST)
            shard[found], row[found] = self.shard[at[found]], self.row[at[found]]
        return shard, row

    def rejections(self, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Why each located photo is unusable ("" when usable or not located)."""
        reasons = np.full(len(shard), "", dtype=object)
        for s in np.unique(shard[shard >= 0]):
            at = shard == s
            reasons[at] = self.rejected[s][row[at]]
        return reasons


class FeatureStore:
    """An append-only directory of shards: ``shard-<time>-<uuid>/{keys,vectors[,top_inputs]}.npy``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def shards(self) -> list[Path]:
        """Committed shards, oldest first (a writer's temporary directory is never listed)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.name.startswith(SHARD_PREFIX) and p.is_dir())

    def has_top_inputs(self) -> bool:
        return any((shard / TOP_INPUTS_FILE).is_file() for shard in self.shards())

    def index(self, *, with_top_inputs: bool = False) -> StoreIndex:
        """The store's index; ``with_top_inputs``: only shards that hold last-block inputs count."""
        keys, shard_of, rows, vectors, tops, rejected = [], [], [], [], [], []
        for shard in self.shards():
            if with_top_inputs and not (shard / TOP_INPUTS_FILE).is_file():
                continue
            shard_keys = np.load(shard / KEYS_FILE)
            keys.append(shard_keys)
            shard_of.append(np.full(len(shard_keys), len(vectors), dtype=np.int32))
            rows.append(np.arange(len(shard_keys), dtype=np.int64))
            vectors.append(np.load(shard / VECTORS_FILE, mmap_mode="r"))
            tops.append(np.load(shard / TOP_INPUTS_FILE, mmap_mode="r") if with_top_inputs else None)
            rejected.append(np.load(shard / REJECTED_FILE))
        if not keys:
            return StoreIndex(np.zeros(0, DIGEST_DTYPE), np.zeros(0, np.int32), np.zeros(0, np.int64), [],
                              [] if with_top_inputs else None, [])
        all_keys = np.concatenate(keys)
        # A photo two writers embedded at once is in two shards: either copy serves (the oldest is kept).
        unique, first = np.unique(all_keys, return_index=True)
        return StoreIndex(unique, np.concatenate(shard_of)[first], np.concatenate(rows)[first], vectors,
                          tops if with_top_inputs else None, rejected)

    def append(self, digests: np.ndarray, vectors: np.ndarray, top_inputs: np.ndarray | None = None,
               rejected: np.ndarray | None = None) -> Path:
        """Commit one shard: written under a temporary name, made visible by one atomic rename.

        ``rejected``: why each row's photo is unusable ("" for usable ones; zero features stand in).
        A photo's bytes decide its fate, so a rejected photo is not tried again either.
        """
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp = self.directory / f".tmp-{name}"
        tmp.mkdir(parents=True)
        try:
            np.save(tmp / VECTORS_FILE, np.asarray(vectors, dtype=np.float16))
            if top_inputs is not None:
                np.save(tmp / TOP_INPUTS_FILE, np.asarray(top_inputs, dtype=np.float16))
            np.save(tmp / REJECTED_FILE, np.asarray([""] * len(digests) if rejected is None else rejected, dtype=str))
            np.save(tmp / KEYS_FILE, np.asarray(digests, dtype=DIGEST_DTYPE))
            final = self.directory / f"{SHARD_PREFIX}{name}"
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


def embed_image_files(paths: list[str], backbone, image_size: int, batch_size: int, *, progress: bool = True,
                      with_top_inputs: bool = False, reasons: dict[int, str] | None = None,
                      view: AugmentedView | None = None, runner=None):
    """Run the backbone over image files; returns (vectors, top_inputs or None, ok), unusable photos not ok.

    Photos are decoded by ``images.decode_image``, the rule tagging uses. ``reasons``, when
    given, receives {position: why} for every photo that is not ok (tagging's wording).
    ``view``: embed that augmented view of each photo instead of the photo. ``runner``
    (``engines.litert_embedding_runner``: pixels -> (vectors, last block's inputs)) replaces the Keras
    ``backbone``.
    """
    from fashion_tagging.backbones import with_top_inputs_output

    vectors = np.zeros((len(paths), IMAGE_EMBEDDING_DIM), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    top_inputs = None
    if runner is None:
        model = with_top_inputs_output(backbone) if with_top_inputs else backbone
        if with_top_inputs:
            top_inputs = np.zeros((len(paths), *model.output_shape[1][1:]), dtype=np.float16)
        runner = model.predict_on_batch
    elif not with_top_inputs:
        embed_both = runner

        def runner(pixels):
            return embed_both(pixels)[0]
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
            batch = runner(images.numpy())
            idx, failures = indices.numpy(), failures.numpy()
            good = failures == b""
            if with_top_inputs:
                batch, cut = batch
                if top_inputs is None:  # a runner's activations: their shape is known from the first batch
                    top_inputs = np.zeros((len(paths), *np.shape(cut)[1:]), dtype=np.float16)
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


def embedding_batch_size(requested: int) -> int:
    """The embedding pass's batch: ``requested`` where TensorFlow sees a GPU, else at most ``CPU_EMBEDDING_BATCH``."""
    from fashion_tagging.engines import gpu_visible

    return requested if gpu_visible() else min(requested, CPU_EMBEDDING_BATCH)


def catalog_image_embeddings(
    product_ids, image_paths, *, backbone_name: str, image_size: int, cache_dir: Path,
    batch_size: int = 64, progress: bool = True, backbone=None, with_top_inputs: bool = False,
    view: AugmentedView | None = None, digests: np.ndarray | None = None, engine: str = "auto",
) -> ImageEmbeddings:
    """Embeddings for these products, from the feature store where present, embedding (and storing) the rest.

    Each distinct photo not in the store is embedded once, however many products share it.
    ``with_top_inputs`` also returns the last block's input activations (on disk, gathered on
    demand); a photo stored without them is embedded again once. A store that has them keeps
    them for every photo it adds. ``view``: that augmented view of the photos (training), in a
    store of its own. ``digests``: the photos' :func:`photo_file_digests`, when already read.
    ``engine`` (the settings' ``inference_engine``) runs the pretrained backbone when no
    ``backbone`` is given: on a CPU its float32 LiteRT export, kept under ``cache_dir``.
    """
    product_ids = np.asarray(product_ids, dtype=np.int64)
    image_paths = list(image_paths)
    if len(image_paths) != len(product_ids):
        raise ValueError(f"{len(product_ids)} product ids but {len(image_paths)} image paths")
    store = FeatureStore(store_dir(cache_dir, backbone_name, image_size, view))
    _note_legacy_cache(Path(cache_dir))
    has_path = np.array([isinstance(p, str) and bool(p) for p in image_paths], dtype=bool)
    digests = photo_file_digests(image_paths) if digests is None else np.asarray(digests, dtype=DIGEST_DTYPE)
    index = store.index(with_top_inputs=with_top_inputs)
    shard, _ = index.locate(digests)
    missing = np.flatnonzero(has_path & (shard < 0))
    # One embedding per distinct photo; an unreadable file (no digest) on its own, for its reason.
    readable = missing[digests[missing] != NO_DIGEST]
    _, first = np.unique(digests[readable], return_index=True)
    todo = np.sort(np.concatenate([readable[first], missing[digests[missing] == NO_DIGEST]]))
    reasons: dict[bytes | int, str] = {}  # digest (or position, if none) -> why the photo is unusable
    if len(todo):
        runner = None
        if backbone is None:
            from fashion_tagging.backbones import build_backbone
            from fashion_tagging.engines import litert_embedding_runner, resolve_engine

            if resolve_engine(engine) == "litert":
                runner = litert_embedding_runner(Path(cache_dir) / EXPORTS_SUBDIR,
                                                 f"{backbone_name}-{image_size}-with-top-inputs-float32",
                                                 lambda: build_backbone(backbone_name, image_size))
            else:
                backbone = build_backbone(backbone_name, image_size)
        keep_top = with_top_inputs or store.has_top_inputs()
        batch_size = embedding_batch_size(batch_size)
        log.info("embedding %d photos of %d products with %s at %dpx (%d products' photos in the store)",
                 len(todo), len(missing), backbone_name, image_size, int(has_path.sum()) - len(missing))
        for start in range(0, len(todo), SHARD_ROWS):
            chunk = todo[start:start + SHARD_ROWS]
            chunk_reasons: dict[int, str] = {}
            vectors, top, ok = embed_image_files([image_paths[p] for p in chunk], backbone, image_size, batch_size,
                                                 progress=progress, with_top_inputs=keep_top, reasons=chunk_reasons,
                                                 view=view, runner=runner)
            rejected = np.full(len(chunk), "", dtype=object)
            for i in np.flatnonzero(~ok):
                position = int(chunk[i])
                key = digests[position] if digests[position] != NO_DIGEST else position
                reasons[key] = rejected[i] = chunk_reasons.get(int(i), UNEXPECTED_FAILURE)
            # Stored: usable photos, and rejections decided by the bytes (not an unreadable file or an
            # unexplained failure, which a later pass may not repeat).
            keep = (digests[chunk] != NO_DIGEST) & (rejected != UNEXPECTED_FAILURE)
            if keep.any():
                store.append(digests[chunk[keep]], vectors[keep], None if top is None else top[keep],
                             rejected[keep].astype(str))
        if reasons:
            why = Counter(reasons.values())
            log.warning("%d of %d photos not usable (left image-less): %s", len(reasons), len(todo),
                        "; ".join(f"{count} x {reason}" for reason, count in why.most_common(5)))

    if len(todo):  # new shards: index the store again
        index = store.index(with_top_inputs=with_top_inputs)
    shard, row = index.locate(digests)
    stored_reasons = index.rejections(shard, row)
    shard[stored_reasons != ""] = -1  # a rejected photo: no features
    has_image = shard >= 0
    # One row per distinct stored photo, however many products show it.
    location = shard[has_image].astype(np.int64) << 40 | row[has_image]
    unique, inverse = np.unique(location, return_inverse=True)
    photo_shard, photo_row = (unique >> 40).astype(np.int32), unique & ((1 << 40) - 1)
    photo_rows = np.full(len(product_ids), -1, dtype=np.int64)
    photo_rows[has_image] = inverse
    stored = StoredRows(index.vectors, photo_shard, photo_row, (IMAGE_EMBEDDING_DIM,))
    photo_vectors = np.zeros((len(unique), IMAGE_EMBEDDING_DIM), dtype=np.float32)
    for start in range(0, len(unique), GATHER_CHUNK):
        photo_vectors[start:start + GATHER_CHUNK] = stored[start:start + GATHER_CHUNK]
    errors: list[RowError] = []
    for position in np.flatnonzero(~has_image):
        if not has_path[position]:
            errors.append(RowError("product has no image", int(product_ids[position]), "", stage="image"))
            continue
        key = digests[position] if digests[position] != NO_DIGEST else int(position)
        reason = stored_reasons[position] or reasons.get(key, UNEXPECTED_FAILURE)
        errors.append(RowError(reason, int(product_ids[position]), str(image_paths[position]), stage="image"))
    top_inputs = photo_top = None
    if with_top_inputs:
        row_shape = tuple(index.top_inputs[0].shape[1:]) if index.top_inputs else (0,)
        top_inputs = StoredRows(index.top_inputs, shard, row, row_shape)
        photo_top = StoredRows(index.top_inputs, photo_shard, photo_row, row_shape)
    return ImageEmbeddings(product_ids, photo_vectors, photo_rows, errors, top_inputs, photo_top)


def _note_legacy_cache(cache_dir: Path) -> None:
    """Say once that an earlier version's per-product cache is not read (its photos are embedded again)."""
    legacy = sorted((cache_dir / LEGACY_CACHE_SUBDIR).glob("*.npz"))
    if legacy and not getattr(_note_legacy_cache, "said", False):
        _note_legacy_cache.said = True
        log.info("the per-product embedding cache %s of an earlier version is not read (keyed by product id, "
                 "it cannot tell a replaced photo): photos are embedded once more into %s; it can be deleted",
                 legacy[0].parent, cache_dir / STORE_SUBDIR)


def tuned_embeddings(backbone, embeddings: ImageEmbeddings, batch_size: int) -> None:
    """Replace the frozen photo vectors with a tuned last block's, computed from the stored activations.

    Once per distinct photo; products (and every ``rows`` of these embeddings) share the result.
    ``batch_size`` photos at a time: the block's expanded activations are ~0.2 MB per photo.
    """
    from fashion_tagging.backbones import backbone_top

    if embeddings.photo_top_inputs is None or not len(embeddings.photo_vectors):
        return
    top = backbone_top(backbone)
    for start in range(0, len(embeddings.photo_vectors), batch_size):
        chunk = slice(start, start + batch_size)
        embeddings.photo_vectors[chunk] = np.asarray(
            top.predict_on_batch(embeddings.photo_top_inputs[chunk].astype(np.float32)), dtype=np.float32)
