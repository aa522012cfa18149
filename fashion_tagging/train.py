"""Training the fused tagger on cached image embeddings + text, with modality dropout.

Modality dropout: during training a product loses its image (or, if it has one, its text)
with a fixed probability, so the model learns to tag from either modality alone — catalogs do
ship products without photos or with empty descriptions.

Augmentation for inputs unlike this catalog's clean ones: each training photo also has
``settings.augmented_views`` augmented views (rotated, cropped, recoloured, recompressed: see
augment.py) whose backbone activations are cached like the photo's; the last block (stage 1)
trains on the photo or one of its views at random, the fused model (stage 2) on the photo or its
first view. Augmented training so costs one embedding pass per view, not one per epoch. Texts lose words to the unknown token (a typo makes a word unknown to a whole-word
vocabulary) and sometimes their whole title.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import itertools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from fashion_tagging.artifacts import Tagger, save_artifact
from fashion_tagging.augment import AugmentedView, misspell
from fashion_tagging.catalog import description_in_text, load_kaggle_catalog, product_text, with_clean_labels
from fashion_tagging.images import photo_tensors
from fashion_tagging.features import catalog_image_embeddings, photo_file_digests, tuned_embeddings
from fashion_tagging.progress import ResidentMemorySampler, epoch_logger, peak_rss_mib
from fashion_tagging.model import (AUXILIARY_HEADS, BLEND_SITUATIONS, MODES, OTHER_LABEL, TEXT_CONDITIONS,
                                   TEXT_SITUATIONS, LabelMap, TextEncoder, build_head_model, capped, choose_blend,
                                   choose_text_condition_blend, compile_head_model, modality_view, model_inputs,
                                   text_batches, texts_present)
from fashion_tagging.settings import HEADS, IMAGE_EMBEDDING_DIM, PRIMARY_HEAD, Settings
from fashion_tagging.spelling import SpellingCorrector, correction_config, corrector_for
from fashion_tagging.text_expert import fit_text_expert, predict_text_expert, text_expert_words

log = logging.getLogger(__name__)
DROP_IMAGE_PROBABILITY = 0.25
DROP_TEXT_PROBABILITY = 0.25
UNKNOWN_WORD_PROBABILITY = 0.1  # a word replaced by the unknown token: what a typo does to a word vocabulary
DROP_TITLE_PROBABILITY = 0.1  # the title removed (description only), when there is a description
AUGMENTED_VIEW_PROBABILITY = 0.5  # a training photo is seen as one of its augmented views, else as itself
# Training batches hold texts within this many tokens of each other (see make_dataset).
TEXT_BUCKET_WIDTH = 20
EARLY_STOPPING_PATIENCE = 5  # val accuracy still crept up after 3 flat epochs (0.9712 at 8 and 11)
FINE_TUNE_LEARNING_RATE = 1e-4
FINE_TUNE_TRAINABLE_FRACTION = 0.3  # unfreeze the top 30 % of backbone layers (BatchNorm stays frozen)
# "top": the backbone's last block + head conv, trained on cached activations (CPU-affordable);
# "full": the top 30 % of the backbone end to end on pixels (a GPU job); "none": frozen backbone.
FINE_TUNE_MODES = ("none", "top", "full")
TOP_TUNE_WARMUP_LEARNING_RATE = 1e-3  # one epoch for the new heads while the block stays frozen
# Cosine decay from this peak over the stage's epochs: val image-only 0.8832 after 10 epochs, against
# 0.8809 at a constant 3e-4 (0.8708 after 8; 0.8678 at 1e-4) and 0.8795 with weight averaging (EMA).
TOP_TUNE_LEARNING_RATE = 5e-4
TOP_TUNE_FINAL_LEARNING_RATE_FRACTION = 0.02
# The val texts' noisy copies (text_condition_copy): each with typos in this share of its words, drawn per
# product, from a generator of its own (the robustness benchmark perturbs test products with others).
NOISY_TEXT_VAL_TYPO_SHARES = (0.1, 0.2, 0.33, 0.5)
TEXT_CONDITION_VAL_SEED = 7919
VAL_DECISION_PRODUCTS = 10_000  # see val_decision_sample (the real catalog's val split: 4,378 products)


@dataclasses.dataclass
class TrainResult:
    artifact_dir: Path
    version: str
    history: dict
    timings: dict
    peak_rss_mib_after: dict = dataclasses.field(default_factory=dict)  # stage -> this process's peak so far
    # stage -> sampled peaks so far of anonymous and file-backed (memory-mapped store) resident memory
    resident_peaks_mib_after: dict = dataclasses.field(default_factory=dict)


def new_version(backbone: str) -> str:
    """Sortable, unique enough for a registry key: UTC time to the second + backbone."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{backbone}"


def fine_tune_mode(value: bool | str) -> str:
    """A ``FINE_TUNE_MODES`` entry from a mode name or the older boolean flag (True meant "full")."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in FINE_TUNE_MODES:
        raise ValueError(f"fine_tune must be one of {', '.join(FINE_TUNE_MODES)}, got {value!r}")
    return value


def _augmented_text(tokens, title_length, seed: int):
    """Some words replaced by the unknown token, and now and then the title removed.

    ``title_length``: the title's tokens at the start of ``tokens``; the title is only removed
    when a description follows it (the text never becomes empty this way).
    """
    real_word = tokens > 1  # neither padding (0) nor already unknown (1)
    unknown = tf.logical_and(real_word, tf.random.uniform(tf.shape(tokens), seed=seed + 1) < UNKNOWN_WORD_PROBABILITY)
    tokens = tf.where(unknown, tf.ones_like(tokens), tokens)
    title_length = tf.cast(title_length, tf.int32)
    drop_title = tf.logical_and(tf.random.uniform([], seed=seed + 2) < DROP_TITLE_PROBABILITY,
                                tf.logical_and(title_length > 0, token_lengths(tokens) > title_length))
    without_title = tf.concat([tokens[title_length:], tf.zeros_like(tokens[:title_length])], axis=0)
    return tf.where(drop_title, without_title, tokens)


def _modality_dropout(inputs, labels, weights, seed: int):
    """Drop the image or the text of a product at random, never both, never a missing one twice.

    Where the training inputs carry them, the image is also swapped for an augmented view
    (``augmented_image_embedding``) and the text augmented (``title_length``, see ``_augmented_text``).
    """
    inputs = dict(inputs)
    augmented = inputs.pop("augmented_image_embedding", None)
    title_length = inputs.pop("title_length", None)
    if augmented is not None:
        use_view = tf.random.uniform([], seed=seed + 3) < AUGMENTED_VIEW_PROBABILITY
        inputs["image_embedding"] = tf.where(use_view, augmented, inputs["image_embedding"])
    if title_length is not None:
        inputs["tokens"] = _augmented_text(inputs["tokens"], title_length, seed)
    draw = tf.random.uniform([], seed=seed)
    has_image = inputs["has_image"]
    has_text = inputs["has_text"]
    drop_image = tf.logical_and(draw < DROP_IMAGE_PROBABILITY, has_text[0] > 0)
    drop_text = tf.logical_and(
        tf.logical_and(draw >= DROP_IMAGE_PROBABILITY, draw < DROP_IMAGE_PROBABILITY + DROP_TEXT_PROBABILITY),
        has_image[0] > 0,
    )
    keep_image = 1.0 - tf.cast(drop_image, tf.float32)
    keep_text = 1.0 - tf.cast(drop_text, tf.float32)
    tokens = tf.where(drop_text, tf.one_hot(0, tf.shape(inputs["tokens"])[0], dtype=tf.int64), inputs["tokens"])
    return {
        "image_embedding": inputs["image_embedding"] * keep_image,
        "has_image": has_image * keep_image,
        "tokens": tokens,
        "has_text": has_text * keep_text,
    }, labels, weights


def with_auxiliary_labels(labels: dict) -> dict:
    """The per-modality auxiliary heads learn the primary head's labels."""
    return {**labels, **{aux: labels[PRIMARY_HEAD] for aux in AUXILIARY_HEADS}}


def targets_and_weights(labels: dict) -> tuple[dict, dict]:
    """A missing label (-1) becomes class 0 with sample weight 0: that head ignores the product."""
    targets = {head: np.maximum(values, 0) for head, values in labels.items()}
    weights = {head: (values >= 0).astype(np.float32) for head, values in labels.items()}
    return targets, weights


def labelled_slices(features, labels: dict, *, training: bool, seed: int) -> tf.data.Dataset:
    """Unbatched (features, targets, sample weights), reshuffled every epoch when training.

    The arrays are held once, as constants, and the dataset (its shuffle buffer too) holds row
    numbers: each element is gathered when it is drawn. Slicing the arrays themselves copied every
    row into the dataset and again into a shuffle buffer as long as the catalog. Integer columns
    are held as int32 where their values fit (token ids: half the memory) and gathered as int64.
    """
    targets, weights = targets_and_weights(labels)
    columns = tf.nest.map_structure(_HeldColumn.of, (features, targets, weights))
    count = len(next(iter(targets.values())))
    rows = tf.data.Dataset.range(count)
    if training:
        rows = rows.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    return rows.map(lambda row: tf.nest.map_structure(lambda column: column.row(row), columns),
                    num_parallel_calls=tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class _HeldColumn:
    """One input column held as a constant (a leaf to ``tf.nest``), narrowed to int32 where it fits."""

    held: tf.Tensor
    dtype: tf.DType

    @classmethod
    def of(cls, values) -> "_HeldColumn":
        values = np.asarray(values)
        if values.dtype == np.int32:  # already narrow (the token ids): gathered as int64 like the rest
            return cls(tf.constant(values), tf.int64)
        narrow = values.dtype == np.int64 and (values.size == 0 or (values.min() >= -2**31 and values.max() < 2**31))
        return cls(tf.constant(values.astype(np.int32) if narrow else values), tf.as_dtype(values.dtype))

    def row(self, row) -> tf.Tensor:
        return tf.cast(tf.gather(self.held, row), self.dtype)


def token_lengths(tokens: tf.Tensor) -> tf.Tensor:
    """Tokens before the padding (padding is id 0 and only ever trails)."""
    return tf.reduce_sum(tf.cast(tokens > 0, tf.int32), axis=-1)


def _trim_padding(inputs, labels, weights):
    """Cut a batch's tokens to its longest text, rounded up to a bucket boundary.

    The LSTM runs one step per token column whether or not it is padding; padding is masked,
    so trimming it changes no output (a test checks) and saves those steps.
    """
    tokens = inputs["tokens"]
    padded = tf.shape(tokens)[1]
    longest = tf.reduce_max(token_lengths(tokens))
    keep = tf.minimum(padded, (longest + TEXT_BUCKET_WIDTH - 1) // TEXT_BUCKET_WIDTH * TEXT_BUCKET_WIDTH)
    return {**inputs, "tokens": tokens[:, :tf.maximum(keep, 1)]}, labels, weights


def make_dataset(inputs: dict, labels: dict, *, batch_size: int, training: bool, seed: int,
                 tables: dict[str, np.ndarray] | None = None) -> tf.data.Dataset:
    """Batched (inputs, targets, sample weights), shuffled with modality dropout when training.

    ``tables``: input name -> a table (an array, or a tensor that datasets share) whose rows the
    products share; the inputs then hold each product's row (``<name>_row``), looked up per
    product as the data streams.

    Training batches group texts of similar length (buckets ``TEXT_BUCKET_WIDTH`` tokens wide)
    so trimming their padding shortens the LSTM: 45 % of catalog texts are under 100 tokens.
    """
    dataset = labelled_slices(inputs, labels, training=training, seed=seed)
    if tables:
        constants = {name: tf.convert_to_tensor(table) for name, table in tables.items()}  # a tensor: as is

        def look_up(x, y, w):
            x = dict(x)
            for name, table in constants.items():
                x[name] = tf.gather(table, x.pop(f"{name}_row"))
            return x, y, w

        dataset = dataset.map(look_up, num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        dataset = dataset.map(lambda x, y, w: _modality_dropout(x, y, w, seed), num_parallel_calls=tf.data.AUTOTUNE)
        boundaries = list(range(TEXT_BUCKET_WIDTH + 1, int(inputs["tokens"].shape[1]) + 1, TEXT_BUCKET_WIDTH))
        dataset = dataset.bucket_by_sequence_length(
            lambda x, y, w: token_lengths(x["tokens"]), boundaries, [batch_size] * (len(boundaries) + 1),
            no_padding=True)
    else:
        dataset = dataset.batch(batch_size)
    return dataset.map(_trim_padding, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


TRAINING_COLUMNS = ("id", "image_path", "text", "productDisplayName")  # with the heads': what training reads


def training_split(products: pd.DataFrame, split: str) -> pd.DataFrame:
    """One split's rows with only the columns training reads, labels cleaned (``with_clean_labels``).

    The rest of a catalog's frame (the description, already in ``text``, and other attributes)
    would be copied along for nothing: at a million products the frame is ~1.7 GB.
    """
    columns = [column for column in (*TRAINING_COLUMNS, *HEADS) if column in products.columns]
    return with_clean_labels(products.loc[products["split"] == split, columns].reset_index(drop=True))


def fit_heads(train_rows: pd.DataFrame, min_class_count: int) -> tuple[dict[str, LabelMap], dict[str, str]]:
    """The heads this catalog can train, from its ``train`` labels: (label maps, {left-out head: why}).

    A head is left out of the model, with a logged reason, when its column is absent, holds no
    label, or has fewer than 2 classes once classes rarer than ``min_class_count`` are folded
    into ``Other`` (a softmax over one class learns nothing; over none it cannot be built).
    Raises ``ValueError`` when the primary head is among them: there is no model to train.
    Cheap: call it before the photos are embedded.
    """
    label_maps, left_out = {}, {}
    for head in HEADS:
        if head not in train_rows.columns:
            left_out[head] = "the catalog has no such column"
            continue
        values = [v for v in train_rows[head] if isinstance(v, str) and v.strip()]
        if not values:
            left_out[head] = f"none of the {len(train_rows)} training products has a label (empty or absent column)"
            continue
        label_map = LabelMap.fit(values, min_class_count)
        if len(label_map) < 2:
            left_out[head] = (f"fewer than 2 classes in {len(values)} labelled training products "
                              f"(classes: {label_map.labels}; min_class_count={min_class_count})")
            continue
        label_maps[head] = label_map
    for head, reason in left_out.items():
        if head != PRIMARY_HEAD:
            log.warning("head %r left out of the model: %s", head, reason)
    if PRIMARY_HEAD in left_out:
        raise ValueError(f"cannot train: the primary head {PRIMARY_HEAD!r} has no usable labels in the 'train' split "
                         f"({left_out[PRIMARY_HEAD]}); it needs at least 2 classes with {min_class_count}+ "
                         f"products each, or 1 such class plus rarer ones folded into {OTHER_LABEL!r}")
    log.info("training heads: %s", ", ".join(f"{head} ({len(m)} classes)" for head, m in label_maps.items()))
    return label_maps, left_out


def gathered_inputs(products: pd.DataFrame, text: TextEncoder, embeddings) -> dict:
    """Model inputs for a frame of products (aligned with the embeddings' product ids).

    The image embedding is not copied per product: each product carries its photo's row
    (``image_embedding_row``) and ``make_dataset`` gathers the rows of each batch from the
    embeddings' :func:`photo_table`, so products sharing a photo share its vector.
    """
    inputs = model_inputs(None, embeddings.has_image, text.encode(products["text"], np.int32),
                          texts_present(products["text"]))
    inputs["image_embedding_row"] = embeddings.table_rows()
    return inputs


def photo_table(embeddings) -> tf.Tensor:
    """The embeddings' photo vectors plus a final zero row (products without a photo), as one constant.

    Built once and shared by every dataset that gathers from these photo vectors (train and val
    products index the same ones): with a table per dataset, and its numpy copy kept beside it, the
    real catalog's fused-model stage peaked at 3.4 GiB of heap instead of 2.6.
    """
    return tf.constant(embeddings.gather_table())


def title_lengths(products: pd.DataFrame, text: TextEncoder) -> np.ndarray:
    """Tokens of each product's title, which opens its text (``catalog.product_text``); 0 without one."""
    if "productDisplayName" not in products:
        return np.zeros(len(products), dtype=np.int64)
    lengths = np.zeros(len(products), dtype=np.int64)
    for start, titles in zip(itertools.count(0, 65_536), text_batches(products["productDisplayName"], 65_536)):
        lengths[start:start + len(titles)] = (text.encode(titles, np.int32) > 0).sum(axis=1)
    return lengths * texts_present(products["productDisplayName"])


def augmented_views(settings: Settings, rows: pd.DataFrame, embeddings, *, with_top_inputs: bool,
                    progress: bool, digests: np.ndarray | None = None) -> list:
    """``settings.augmented_views`` augmented views of the rows' photos, from the feature store where present.

    A view whose photo could not be decoded falls back to the photo's own embedding, so every
    view is aligned with (and as complete as) ``embeddings``.
    """
    views = []
    for index in range(settings.augmented_views):
        view = catalog_image_embeddings(rows["id"], rows["image_path"].tolist(), backbone_name=settings.backbone,
                                        image_size=settings.image_size, cache_dir=settings.cache_dir,
                                        batch_size=settings.inference_batch_size, progress=progress,
                                        with_top_inputs=with_top_inputs, view=AugmentedView(index, settings.seed),
                                        digests=digests, engine=settings.inference_engine)
        view = view.filled_from(embeddings.has_image & ~view.has_image, embeddings)
        view.photo_rows[~embeddings.has_image] = -1  # (a copy) exactly the photos' products have a view
        views.append(view)
    return views


def train(
    settings: Settings,
    *,
    products: pd.DataFrame | Callable[[], pd.DataFrame] | None = None,
    epochs: int | None = None,
    output_dir: Path | None = None,
    progress: bool = True,
    fine_tune: bool | str | None = None,
) -> TrainResult:
    """Fit encoders and the head model on the ``train`` split, early-stopped on ``val``; save an artifact.

    ``fine_tune`` is a mode of ``FINE_TUNE_MODES`` (None: ``settings.fine_tune``; True: "full").
    ``products``: the catalog frame, or a function that loads it (None: the Kaggle-layout catalog in
    ``settings.data_dir``). Loaded here, the frame goes once training has copied the columns it
    reads; a frame the caller holds stays for the whole retrain (~1.5 KB a product: 1.5 GB at a million).
    """
    with ResidentMemorySampler() as sampler:
        return _train(settings, sampler, products=products, epochs=epochs, output_dir=output_dir, progress=progress,
                      fine_tune=fine_tune)


def _train(settings: Settings, sampler: ResidentMemorySampler, *, products, epochs, output_dir, progress,
           fine_tune) -> TrainResult:
    # The process's peak RSS after each stage: the stage that raised it is where memory goes.
    memory, resident = {}, {}

    def note_memory(stage: str) -> None:
        memory[stage], resident[stage] = round(peak_rss_mib()), sampler.sample()

    fitted = _fit_and_save(settings, note_memory, products=products, epochs=epochs, output_dir=output_dir,
                           progress=progress, fine_tune=fine_tune)
    # The choices below need only the saved artifact and the val sample: the training state (models,
    # optimizer slots, datasets holding the token arrays) is gone by now, so the export, this stage's
    # biggest allocation, reuses its memory instead of adding to it.
    gc.collect()
    tagger = Tagger.load(fitted.artifact_dir, engine="keras")  # one copy for the calibration and the exports
    calibrate_chosen_model(fitted.artifact_dir, settings, fitted.decision_rows, fitted.decision_embeddings,
                           fitted.train_rows[PRIMARY_HEAD].tolist(), tagger=tagger)
    if fitted.mode != "full":  # CPU workers' engine; after "full" (a GPU job) exports are made on first use
        from fashion_tagging.engines import build_cpu_exports

        build_cpu_exports(fitted.artifact_dir, fitted.train_rows, fitted.decision_rows, seed=settings.seed,
                          batch_size=settings.inference_batch_size, tagger=tagger)
    note_memory("blend_calibration_export")
    log.info("trained %s in %.0fs -> %s; peak RSS after each stage (MiB): %s; of which anonymous / file-backed: %s",
             fitted.version, fitted.timings["train_seconds"], fitted.artifact_dir, memory, resident)
    return TrainResult(fitted.artifact_dir, fitted.version, fitted.history, fitted.timings, memory, resident)


@dataclasses.dataclass
class _Fitted:
    """What the steps after fitting need: the saved artifact and the val sample they decide on."""

    artifact_dir: Path
    version: str
    history: dict
    timings: dict
    mode: str
    train_rows: pd.DataFrame
    decision_rows: pd.DataFrame
    decision_embeddings: object  # this model's image embeddings of ``decision_rows``; None after "full"


def _fit_and_save(settings: Settings, note_memory, *, products, epochs, output_dir, progress, fine_tune) -> _Fitted:
    """Every training stage, then the artifact saved (without calibration and CPU exports)."""
    started = time.perf_counter()
    mode = fine_tune_mode(settings.fine_tune if fine_tune is None else fine_tune)
    keras.utils.set_random_seed(settings.seed)
    if products is None:
        products = lambda: load_kaggle_catalog(settings.data_dir).products  # noqa: E731
    catalog = products() if callable(products) else products
    train_rows, val_rows = training_split(catalog, "train"), training_split(catalog, "val")
    del catalog, products  # the frame goes here unless the caller holds it
    if train_rows.empty or val_rows.empty:
        raise ValueError("training needs products in both the 'train' and 'val' splits")

    # The heads come from the data, and are settled before the (expensive) photo embedding.
    label_maps, heads_left_out = fit_heads(train_rows, settings.min_class_count)
    heads = tuple(label_maps)
    text = TextEncoder.fit(train_rows["text"], settings.max_text_tokens, settings.vocabulary_size)
    note_memory("catalog_and_vocabulary")

    t0 = time.perf_counter()
    embed = dict(backbone_name=settings.backbone, image_size=settings.image_size, cache_dir=settings.cache_dir,
                 batch_size=settings.inference_batch_size, progress=progress, engine=settings.inference_engine)
    # One pass for both splits: the feature store is indexed and the backbone built once.
    both = pd.concat([train_rows[["id", "image_path"]], val_rows[["id", "image_path"]]], ignore_index=True)
    digests = photo_file_digests(both["image_path"].tolist())  # read once: the views are of the same files
    embeddings = catalog_image_embeddings(both["id"], both["image_path"].tolist(), **embed,
                                          with_top_inputs=mode == "top", digests=digests)
    train_embeddings = embeddings.rows(slice(0, len(train_rows)))
    val_embeddings = embeddings.rows(slice(len(train_rows), None))
    embedding_seconds = time.perf_counter() - t0
    note_memory("embedding")
    t0 = time.perf_counter()
    train_views = []  # augmented views of the training photos (none after "full": it augments pixels itself)
    if mode != "full" and train_embeddings.has_image.any():
        train_views = augmented_views(settings, train_rows, train_embeddings, with_top_inputs=mode == "top",
                                      progress=progress, digests=digests[:len(train_rows)])
    augmentation_seconds = time.perf_counter() - t0
    note_memory("augmented_views")

    head_labels = {head: label_maps[head].encode(train_rows[head]) for head in heads}
    val_head_labels = {head: label_maps[head].encode(val_rows[head]) for head in heads}
    backbone, expert, top_history, top_seconds = None, None, {}, 0.0
    if mode == "top" and train_embeddings.has_image.any() and val_embeddings.has_image.any():
        from fashion_tagging.backbones import build_backbone

        t0 = time.perf_counter()
        backbone = build_backbone(settings.backbone, settings.image_size)
        with_image, val_with_image = train_embeddings.has_image, val_embeddings.has_image
        expert, top_history = tune_backbone_top(
            settings, backbone, label_maps,
            train_embeddings.top_inputs.subset(with_image), {h: v[with_image] for h, v in head_labels.items()},
            val_embeddings.top_inputs.subset(val_with_image),
            {h: v[val_with_image] for h, v in val_head_labels.items()},
            train_pooled=train_embeddings.rows(with_image), val_pooled=val_embeddings.rows(val_with_image),
            train_views=[view.top_inputs.subset(with_image) for view in train_views], progress=progress)
        tuned_embeddings(backbone, embeddings, settings.inference_batch_size)  # train/val rows are views
        for view in train_views:
            tuned_embeddings(backbone, view, settings.inference_batch_size)
            view.top_inputs = view.photo_top_inputs = None
        top_seconds = time.perf_counter() - t0
        note_memory("backbone_top")
    elif mode == "top":
        mode = "none"  # nothing to tune on: no photos in one of the splits
    for split_embeddings in (embeddings, train_embeddings, val_embeddings):  # stage 2 needs the pooled vectors
        split_embeddings.top_inputs = split_embeddings.photo_top_inputs = None

    train_labels = with_auxiliary_labels(head_labels)
    val_labels = with_auxiliary_labels(val_head_labels)
    train_inputs = gathered_inputs(train_rows, text, train_embeddings)
    train_inputs["title_length"] = title_lengths(train_rows, text)
    photos = photo_table(embeddings)  # train and val products' rows index the same photo vectors
    train_tables = {"image_embedding": photos}
    if train_views:  # stage 2 sees the first view (one more table of the pooled vectors per view is not worth it)
        train_tables["augmented_image_embedding"] = photo_table(train_views[0])
        train_inputs["augmented_image_embedding_row"] = train_views[0].table_rows()
    train_data = make_dataset(train_inputs, train_labels, batch_size=settings.batch_size, training=True,
                              seed=settings.seed, tables=train_tables)
    # The datasets hold their columns as constants: the arrays they were made from would be a second
    # copy (token ids alone 400 bytes a product) through the fit.
    del train_inputs
    val_inputs = gathered_inputs(val_rows, text, val_embeddings)
    val_tables = {"image_embedding": photos}
    val_data = make_dataset(val_inputs, val_labels, batch_size=settings.inference_batch_size, training=False,
                            seed=settings.seed, tables=val_tables)
    del val_inputs

    model = build_head_model({h: len(m) for h, m in label_maps.items()}, vocabulary_size=len(text.vocabulary))
    # Keras wants a target for every output: train a view without the (loss-free) embedding output.
    trainable = keras.Model(model.input, {head: model.output[head] for head in heads + AUXILIARY_HEADS})
    compile_head_model(trainable, heads + AUXILIARY_HEADS, settings.learning_rate)
    monitor = f"val_{PRIMARY_HEAD}_acc"
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=EARLY_STOPPING_PATIENCE,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="max", factor=0.3, patience=1, min_lr=1e-5),
    ]
    t0 = time.perf_counter()
    fused_epochs = epochs or settings.epochs
    callbacks.append(epoch_logger("fused model", fused_epochs, f"{PRIMARY_HEAD}_acc"))
    cap = settings.max_batches_per_epoch
    history = trainable.fit(capped(train_data, cap), validation_data=capped(val_data, cap), epochs=fused_epochs,
                            callbacks=callbacks, verbose=2 if progress else 0)
    fit_seconds = time.perf_counter() - t0 + top_seconds
    # The stage-2 inputs (token ids and their constants: ~0.6 GB at a million products) go before the
    # text expert and the export, which need none of them.
    del train_data, val_data, train_tables, val_tables, photos
    gc.collect()
    if mode == "full":
        t0 = time.perf_counter()
        backbone = fine_tune_backbone(settings, model, text, label_maps, train_rows, val_rows, progress=progress)
        fit_seconds += time.perf_counter() - t0
    note_memory("fused_model")

    blend, blend_report, text_expert, text_expert_seconds = {}, {}, None, 0.0
    spelling_config = {"spelling_correction": correction_config(settings.spelling_correction_distance)}
    decided_on = val_decision_sample(len(val_rows), settings.seed)
    decision_rows = val_rows.iloc[decided_on].reset_index(drop=True)
    decision_embeddings = val_embeddings.rows(decided_on)
    if mode != "full":  # "full" changed the backbone under the val embeddings: they no longer apply
        t0 = time.perf_counter()
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        text_expert = fit_text_expert(train_rows["text"], head_labels[PRIMARY_HEAD],
                                      len(label_maps[PRIMARY_HEAD]), seed=settings.seed, progress=progress,
                                      scratch_dir=settings.cache_dir, max_batches=settings.max_batches_per_epoch)
        text_expert_seconds = time.perf_counter() - t0
        note_memory("text_expert")
        blend, blend_report = choose_primary_blend(model, expert, text_expert, decision_rows, text,
                                                   decision_embeddings, val_head_labels[PRIMARY_HEAD][decided_on],
                                                   settings.inference_batch_size, settings.seed,
                                                   spelling=corrector_for(spelling_config, text.vocabulary,
                                                                          text_expert_words(text_expert)))

    version = new_version(settings.backbone)
    artifact_dir = Path(output_dir or settings.artifacts_dir) / version
    history_dict = {k: [float(v) for v in values] for k, values in history.history.items()}
    if top_history:
        history_dict["backbone_top"] = top_history
    timings = {"embedding_seconds": round(embedding_seconds, 1),
               "augmented_views_seconds": round(augmentation_seconds, 1), "fit_seconds": round(fit_seconds, 1),
               "backbone_top_seconds": round(top_seconds, 1), "text_expert_seconds": round(text_expert_seconds, 1),
               "train_seconds": round(time.perf_counter() - started, 1)}
    config = {
        "version": version, "backbone": settings.backbone, "image_size": settings.image_size,
        "fine_tuned": mode != "none", "fine_tune_mode": mode, "max_text_tokens": settings.max_text_tokens,
        "vocabulary_size": settings.vocabulary_size, "heads": list(heads), "primary_head": PRIMARY_HEAD,
        "heads_left_out": heads_left_out,
        "epochs_run": len(history.history.get("loss", [])),
        "backbone_top_epochs_run": len(top_history.get("loss", [])),
        "best_val_image_only_article_type_accuracy": max(top_history.get(monitor, [0.0])) if top_history else None,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate, "seed": settings.seed, "min_class_count": settings.min_class_count,
        "modality_dropout": {"image": DROP_IMAGE_PROBABILITY, "text": DROP_TEXT_PROBABILITY},
        "augmentation": {"augmented_views": len(train_views), "view_probability": AUGMENTED_VIEW_PROBABILITY,
                         "unknown_word_probability": UNKNOWN_WORD_PROBABILITY,
                         "drop_title_probability": DROP_TITLE_PROBABILITY},
        "train_products": len(train_rows), "val_products": len(val_rows), "val_decision_products": len(decided_on),
        "best_val_article_type_accuracy": max(history_dict.get(monitor, [0.0])),
        **blend_config(blend, blend_report), **spelling_config,
        "timings": timings, "created_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    save_artifact(artifact_dir, model=model, text=text, label_maps=label_maps, config=config, history=history_dict,
                  backbone=backbone, image_expert=expert, text_expert=text_expert)
    return _Fitted(artifact_dir, version, history_dict, timings, mode, train_rows, decision_rows,
                   None if mode == "full" else decision_embeddings)


def val_decision_sample(val_products: int, seed: int) -> np.ndarray:
    """The val rows the choices made after fitting are made on: all of them up to ``VAL_DECISION_PRODUCTS``,
    else a seeded sample of that many (in val order).

    The blend weights, the calibration and the int8 export's check need thousands of products,
    not a val split that grows with the catalog: on all (about 25,000) val products of a 250,000-product
    catalog these steps took the retrain's peak RSS from 7.1 to 10.2 GiB.
    """
    if val_products <= VAL_DECISION_PRODUCTS:
        return np.arange(val_products)
    return np.sort(np.random.default_rng(seed).choice(val_products, VAL_DECISION_PRODUCTS, replace=False))


def calibrate_chosen_model(artifact_dir: Path, settings: Settings, val_rows: pd.DataFrame, val_embeddings,
                           train_labels: list[str], *, tagger: Tagger | None = None) -> dict:
    """Fit the chosen model's calibration and review thresholds on val; adds ``calibration.json``.

    The model is loaded (or ``tagger`` is that artifact loaded) as tagging loads it, hybrid blend
    included. ``val_embeddings``: this model's val image embeddings, or None to compute them
    (after "full" fine-tuning the cached ones belong to the frozen backbone).
    """
    from fashion_tagging.artifacts import write_calibration
    from fashion_tagging.calibration import calibrate_tagger
    from fashion_tagging.evaluate import split_embeddings

    started = time.perf_counter()
    tagger = tagger or Tagger.load(artifact_dir)
    if val_embeddings is None:
        val_embeddings = split_embeddings(tagger, artifact_dir, val_rows, settings)
    calibration = calibrate_tagger(tagger, val_rows, val_embeddings, settings, train_labels=train_labels)
    write_calibration(artifact_dir, calibration)
    log.info("calibration fitted on %d val products in %.1fs", len(val_rows), time.perf_counter() - started)
    return calibration


def choose_primary_blend(model: keras.Model, expert: keras.Model | None, text_expert: keras.Model | None,
                         rows: pd.DataFrame, text: TextEncoder, embeddings, truth: np.ndarray,
                         batch_size: int, seed: int = 0, spelling: SpellingCorrector | None = None,
                         ) -> tuple[dict, dict]:
    """Pick the hybrid-fusion blend on val: the head model in all three modality settings + both experts,
    then weights for texts in each text condition (``report["text_condition_thresholds"]``: each
    condition's threshold, for the conditions whose weights did better on val). ``spelling``: the
    artifact's corrector, applied to every text as the tagger applies it."""
    raw_texts = rows["text"].fillna("").tolist()
    correct = spelling.correct_all if spelling is not None else list
    texts = correct(raw_texts)
    tokens = text.encode(texts)  # encoded once: the situations that keep the text share it
    outputs = {}
    for situation, mode in zip(BLEND_SITUATIONS, MODES, strict=True):
        vectors, has_image, mode_texts = modality_view(mode, embeddings.vectors, embeddings.has_image, texts)
        has_text = np.array([bool(t.strip()) for t in mode_texts], dtype=bool)
        mode_tokens = tokens if mode_texts is texts else text.encode(mode_texts)
        outputs[situation] = model.predict(model_inputs(vectors, has_image, mode_tokens, has_text),
                                           batch_size=batch_size, verbose=0)
    expert_probs = None
    if expert is not None:
        expert_probs = np.asarray(expert.predict(embeddings.vectors, batch_size=batch_size, verbose=0)[PRIMARY_HEAD])
    text_expert_probs = None if text_expert is None else predict_text_expert(text_expert, texts, batch_size)
    has_text = np.array([bool(t.strip()) for t in texts], dtype=bool)
    blend, report = choose_blend(outputs, expert_probs, embeddings.has_image, has_text, truth, text_expert_probs)
    log.info("hybrid-fusion blend chosen on val: %s (%s)", blend, report)

    # Weights of their own for texts in a condition (model.TEXT_CONDITIONS), chosen on the same products
    # with their texts changed into that condition.
    thresholds, conditions_report = {}, {}
    for name in TEXT_CONDITIONS:
        changed = text_condition_copy(name, rows, raw_texts, np.random.default_rng([seed, TEXT_CONDITION_VAL_SEED]))
        if changed is None:
            continue
        changed = correct(changed)
        changed_tokens = text.encode(changed)
        changed_outputs = {}
        for situation, mode in zip(BLEND_SITUATIONS, MODES, strict=True):
            if situation in TEXT_SITUATIONS:
                vectors, has_image, _ = modality_view(mode, embeddings.vectors, embeddings.has_image, changed)
                changed_outputs[situation] = model.predict(model_inputs(vectors, has_image, changed_tokens, has_text),
                                                           batch_size=batch_size, verbose=0)
        changed_expert = None if text_expert is None else predict_text_expert(text_expert, changed, batch_size)
        threshold, weights, conditions_report[name] = choose_text_condition_blend(
            name, blend, thresholds, outputs, changed_outputs, expert_probs, embeddings.has_image, has_text, truth,
            tokens, changed_tokens, text_expert_probs, changed_expert)
        if threshold is not None:
            blend, thresholds[name] = {**blend, **weights}, threshold
        log.info("%s blend chosen on val: threshold %s, %s (%s)", name, threshold, weights, conditions_report[name])
    return blend, {**report, "text_conditions": conditions_report, "text_condition_thresholds": thresholds}


def blend_config(blend: dict, report: dict) -> dict:
    """An artifact config's entries for a blend and report of ``choose_primary_blend``."""
    return {"primary_blend": blend, "primary_blend_val": report,
            "text_condition_thresholds": report.get("text_condition_thresholds") or {}}


def text_condition_copy(name: str, rows: pd.DataFrame, texts: list[str], rng: np.random.Generator) -> list[str] | None:
    """The rows' texts changed into text condition ``name`` (None: the rows cannot show it)."""
    if name == "noisy_text":
        return [misspell(t, float(rng.choice(NOISY_TEXT_VAL_TYPO_SHARES)), rng) for t in texts]
    if name in ("short_text", "weak_text"):
        if "productDisplayName" not in rows.columns:
            return None
        titles = rows["productDisplayName"].fillna("").tolist()
        if name == "short_text":  # the title alone; a product without a title keeps its text
            return [product_text(title, None) or text for title, text in zip(titles, texts, strict=True)]
        # the description alone; a product without both keeps its text
        return [description_in_text(text, title) for title, text in zip(titles, texts, strict=True)]
    raise ValueError(f"not a text condition: {name!r}")


def _pixel_dataset(rows: pd.DataFrame, text: TextEncoder, label_maps: dict, *, size: int, batch_size: int,
                   training: bool, seed: int) -> tf.data.Dataset:
    """(pixels + text inputs, labels, weights) from image files, with flips/brightness when training."""
    paths = [p if isinstance(p, str) and p else "" for p in rows["image_path"]]
    has_text = rows["text"].fillna("").str.strip().ne("").to_numpy()
    inputs = {"path": np.array(paths), **model_inputs(None, np.array([bool(p) for p in paths]),
                                                      text.encode(rows["text"].tolist()), has_text)}
    labels = with_auxiliary_labels({head: label_maps[head].encode(rows[head]) for head in label_maps})

    def load(x, y, w):
        # decode_image's rule, as tagging: a photo it rejects leaves the product image-less (as in
        # the embedding pass), white pixels; a product without a path gets white pixels too.
        pixels, reason = photo_tensors(x.pop("path"), size)
        x["has_image"] = x["has_image"] * tf.cast(tf.equal(reason, ""), x["has_image"].dtype)
        if training:
            pixels = tf.image.random_flip_left_right(pixels, seed=seed)
            pixels = tf.clip_by_value(tf.image.random_brightness(pixels, 20.0, seed=seed), 0.0, 255.0)
        x["pixels"] = pixels
        return x, y, w

    dataset = labelled_slices(inputs, labels, training=training, seed=seed)
    return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().batch(batch_size).prefetch(2)


def fine_tune_backbone(settings: Settings, head_model: keras.Model, text: TextEncoder, label_maps: dict,
                       train_rows: pd.DataFrame, val_rows: pd.DataFrame, *, progress: bool) -> keras.Model:
    """End-to-end fine-tuning of the backbone's top layers with the trained head (a GPU job).

    Starts from the head trained on frozen embeddings, so the new backbone layers get useful
    gradients from the first step; the learning rate is 10x lower than the head's.
    """
    from fashion_tagging.backbones import build_backbone

    backbone = build_backbone(settings.backbone, settings.image_size)
    first_trainable = int(len(backbone.layers) * (1 - FINE_TUNE_TRAINABLE_FRACTION))
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= first_trainable and not isinstance(layer, keras.layers.BatchNormalization)
    pixels = keras.Input((settings.image_size, settings.image_size, 3), name="pixels")
    has_image = keras.Input((1,), name="has_image")
    tokens = keras.Input((settings.max_text_tokens,), dtype="int64", name="tokens")
    has_text = keras.Input((1,), name="has_text")
    outputs = head_model({"image_embedding": backbone(pixels, training=False), "has_image": has_image,
                          "tokens": tokens, "has_text": has_text})
    composite = keras.Model({"pixels": pixels, "has_image": has_image, "tokens": tokens, "has_text": has_text},
                            {head: outputs[head] for head in (*label_maps, *AUXILIARY_HEADS)})
    compile_head_model(composite, (*label_maps, *AUXILIARY_HEADS), FINE_TUNE_LEARNING_RATE)
    common = dict(text=text, label_maps=label_maps, size=settings.image_size, seed=settings.seed)
    cap = settings.max_batches_per_epoch
    composite.fit(capped(_pixel_dataset(train_rows, batch_size=settings.batch_size, training=True, **common), cap),
                  validation_data=capped(_pixel_dataset(val_rows, batch_size=settings.inference_batch_size,
                                                        training=False, **common), cap),
                  epochs=settings.fine_tune_epochs, verbose=2 if progress else 0,
                  callbacks=[epoch_logger("backbone fine-tuning", settings.fine_tune_epochs, f"{PRIMARY_HEAD}_acc")])
    return backbone


def _top_dataset(top_inputs: np.ndarray, labels: dict, *, batch_size: int, training: bool, seed: int,
                 views: list[np.ndarray] = ()):
    """(cached last-block inputs, labels, weights); mirrored feature maps stand in for flipped photos.

    Rows are gathered per batch from the arrays (no copy into the dataset: the activations are
    ~19 KB per photo and view). When training, a row comes from one of its augmented ``views``
    (aligned with ``top_inputs``) with probability ``AUGMENTED_VIEW_PROBABILITY``, else from the photo.
    """
    rng = np.random.default_rng(seed)

    def gather(rows: np.ndarray) -> np.ndarray:
        batch = top_inputs[rows]
        if training and views:
            pick = rng.integers(0, len(views), len(rows))
            swap = rng.random(len(rows)) < AUGMENTED_VIEW_PROBABILITY
            for index, view in enumerate(views):
                chosen = swap & (pick == index)
                batch[chosen] = view[rows[chosen]]
        return batch

    def prepare(rows, y, w):
        x = tf.numpy_function(gather, [rows], tf.float16, stateful=training, name="gather_top_inputs")
        x = tf.cast(tf.ensure_shape(x, [None, *top_inputs.shape[1:]]), tf.float32)
        if training:
            x = tf.image.random_flip_left_right(x, seed=seed)  # per photo of the batch
        return x, y, w

    dataset = labelled_slices(np.arange(len(top_inputs)), labels, training=training, seed=seed)
    return dataset.batch(batch_size).map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _vector_dataset(embeddings, labels: dict, *, batch_size: int, training: bool, seed: int, table: tf.Tensor):
    """(pooled embeddings, labels, weights) for the stage-1 warm-up, gathered per batch from the
    embeddings' :func:`photo_table` (``table``)."""
    dataset = labelled_slices(embeddings.table_rows(), labels, training=training, seed=seed).batch(batch_size)
    return dataset.map(lambda r, y, w: (tf.gather(table, r), y, w)).prefetch(tf.data.AUTOTUNE)


def tune_backbone_top(settings: Settings, backbone: keras.Model, label_maps: dict, train_top: np.ndarray,
                      train_labels: dict, val_top: np.ndarray, val_labels: dict, *, train_pooled,
                      val_pooled, progress: bool, train_views: list[np.ndarray] = ()) -> dict:
    """Stage 1 of "top" fine-tuning: adapt the backbone's last block to product photos, image alone.

    Frozen ImageNet features leave image-only articleType at ~0.83; training the last block on
    every head (BatchNorm frozen) adapts them to catalog photos. The new heads get one warm-up
    epoch with the block frozen so their random gradients never reach the pretrained weights.
    With the block frozen its pooled output is the stored photo vector (``*_pooled``), so the
    warm-up trains on those and never runs the block. The fused head is trained afterwards on
    the adapted embeddings (stage 2, as without tuning). ``train_views``: the last-block inputs
    of the training photos' augmented views, sampled among with the photo's (see ``_top_dataset``).
    """
    from fashion_tagging.backbones import backbone_top

    top = backbone_top(backbone)
    inputs = keras.Input(train_top.shape[1:], name="top_inputs")
    dropout = keras.layers.Dropout(0.3, name="top_dropout")
    pooled = dropout(top(inputs, training=False))
    classifiers = {head: keras.layers.Dense(len(m), activation="softmax", name=head, dtype="float32")
                   for head, m in label_maps.items()}
    model = keras.Model(inputs, {head: layer(pooled) for head, layer in classifiers.items()},
                        name="backbone_top_tuner")
    # The same classifiers on a pooled embedding: the image expert the tagger blends in (see model.py).
    embedding = keras.Input((IMAGE_EMBEDDING_DIM,), name="image_embedding")
    expert = keras.Model(embedding, {head: layer(embedding) for head, layer in classifiers.items()},
                         name="image_expert")
    warm = keras.Model(embedding, {head: layer(dropout(embedding)) for head, layer in classifiers.items()},
                       name="image_expert_warmup")
    common = dict(batch_size=settings.batch_size, seed=settings.seed)
    cap = settings.max_batches_per_epoch
    train_data = capped(_top_dataset(train_top, train_labels, training=True, views=train_views, **common), cap)
    val_data = capped(_top_dataset(val_top, val_labels, training=False, **common), cap)
    verbose = 2 if progress else 0

    compile_head_model(warm, tuple(label_maps), TOP_TUNE_WARMUP_LEARNING_RATE)
    if val_pooled.photo_vectors is not train_pooled.photo_vectors:
        raise ValueError("train and val pooled embeddings must share their photo vectors (one table)")
    pooled_table = photo_table(train_pooled)
    warmup = warm.fit(capped(_vector_dataset(train_pooled, train_labels, training=True, table=pooled_table, **common),
                             cap),
                      validation_data=capped(_vector_dataset(val_pooled, val_labels, training=False,
                                                             table=pooled_table, **common), cap),
                      epochs=1, verbose=verbose,
                      callbacks=[epoch_logger("backbone last block warm-up", 1, f"{PRIMARY_HEAD}_acc")])

    top.trainable = True
    for layer in top.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    steps = math.ceil(len(train_top) / settings.batch_size) * settings.top_tune_epochs
    compile_head_model(model, tuple(label_maps), keras.optimizers.schedules.CosineDecay(
        TOP_TUNE_LEARNING_RATE, steps, alpha=TOP_TUNE_FINAL_LEARNING_RATE_FRACTION))
    # The whole schedule runs (stopping early would skip the low-rate epochs that help most);
    # the best val epoch is kept.
    monitor = f"val_{PRIMARY_HEAD}_acc"
    keep_best = keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=settings.top_tune_epochs,
                                              restore_best_weights=True)
    tuned = model.fit(train_data, validation_data=val_data, epochs=settings.top_tune_epochs, verbose=verbose,
                      callbacks=[keep_best, epoch_logger("backbone last block", settings.top_tune_epochs,
                                                         f"{PRIMARY_HEAD}_acc")])
    return expert, {k: [float(v) for v in warmup.history[k] + tuned.history[k]] for k in tuned.history}
