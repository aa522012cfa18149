"""A trained model as one self-contained directory, and :class:`Tagger`, the model at inference.

Directory: ``model.keras`` (head model), ``config.json``, ``vocabulary.json``, ``labels.json``,
``metrics.json`` + ``report.md`` + ``confusion_articleType.png`` once evaluated,
``text_expert.keras`` (and ``image_expert.keras`` after "top" fine-tuning) for hybrid fusion,
``backbone.weights.h5`` only when the backbone was fine-tuned (otherwise the backbone is
rebuilt from its pretrained weights by name), and ``calibration.json`` (per-head temperatures,
review thresholds and the training distribution, see calibration.py: training adds it with
:func:`write_calibration` once the model is chosen; an artifact without one tags with raw softmax
confidences and no review status). Training writes it with :func:`save_artifact`, the tagger
reads it with :meth:`Tagger.load`: the format has this one owner.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from fashion_tagging.calibration import auto_accepted, calibrate, log_probabilities
from fashion_tagging.images import to_model_size
from fashion_tagging.model import (LabelMap, TextEncoder, blend_primary, blend_weights, model_inputs,
                                   text_conditions)
from fashion_tagging.objectstore import local_path, open_uri
from fashion_tagging.settings import IMAGE_EMBEDDING_DIM, PRIMARY_HEAD, Settings
from fashion_tagging.spelling import corrector_for
from fashion_tagging.text_expert import text_expert_words, texts_tensor

log = logging.getLogger(__name__)
FINE_TUNED_BACKBONE_FILE = "backbone.weights.h5"
IMAGE_EXPERT_FILE = "image_expert.keras"  # image-only classifiers from "top" fine-tuning
TEXT_EXPERT_FILE = "text_expert.keras"  # TF-IDF linear articleType classifier (text_expert.py)
CALIBRATION_FILE = "calibration.json"  # per-head temperature + review threshold (calibration.py)
COMPLETE_MARKER = ".download-complete"  # in a downloaded copy: the download finished


@dataclasses.dataclass
class TagPredictions:
    """Per-head labels/confidences/top-k plus the embeddings stored for search."""

    labels: dict[str, list[str]]
    confidences: dict[str, np.ndarray]
    top_k: dict[str, list[list[tuple[str, float]]]]
    image_embeddings: np.ndarray
    product_embeddings: np.ndarray
    has_image: np.ndarray
    has_text: np.ndarray
    # Per head: True where the calibrated confidence reaches the head's review threshold
    # (auto-accepted), False where the tag needs review; None without a calibration.
    auto_accepted: dict[str, np.ndarray] | None = None
    log_probabilities: dict[str, np.ndarray] | None = None  # raw per-head log-probabilities, when asked for

    def __len__(self) -> int:
        return len(self.has_image)


def save_artifact(artifact_dir: Path, *, model: keras.Model, text: TextEncoder, label_maps: dict[str, LabelMap],
                  config: dict, history: dict, backbone: keras.Model | None = None,
                  image_expert: keras.Model | None = None, text_expert: keras.Model | None = None) -> None:
    """Write a trained model as a new artifact directory; ``config.json`` goes last, so a directory
    with one is complete. ``backbone`` only when it was fine-tuned."""
    artifact_dir.mkdir(parents=True, exist_ok=False)
    model.save(artifact_dir / "model.keras")
    if backbone is not None:
        backbone.save_weights(artifact_dir / FINE_TUNED_BACKBONE_FILE)
    if image_expert is not None:
        image_expert.save(artifact_dir / IMAGE_EXPERT_FILE)
    if text_expert is not None:
        text_expert.save(artifact_dir / TEXT_EXPERT_FILE)
    (artifact_dir / "vocabulary.json").write_text(json.dumps(text.vocabulary))
    (artifact_dir / "labels.json").write_text(json.dumps({head: m.labels for head, m in label_maps.items()}, indent=1))
    (artifact_dir / "history.json").write_text(json.dumps(history, indent=1))
    write_config(artifact_dir, config)


def write_config(artifact_dir: Path, config: dict) -> None:
    """Write (or replace, atomically: its presence marks a complete artifact) an artifact's
    ``config.json``; ``read_config`` reads it."""
    write_file_atomically(Path(artifact_dir) / "config.json", json.dumps(config, indent=1).encode())


def write_file_atomically(target: Path, data: bytes) -> None:
    """Add or replace one file of an artifact: readers (other workers) never see half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    staging.write_bytes(data)
    os.replace(staging, target)


def write_calibration(artifact_dir: Path, calibration: dict) -> None:
    """Write (or replace, atomically) an artifact's ``calibration.json``."""
    write_file_atomically(Path(artifact_dir) / CALIBRATION_FILE, json.dumps(calibration, indent=1).encode())


def read_calibration(artifact_dir: Path) -> dict | None:
    """An artifact's calibration, None when it has none (older artifacts)."""
    path = Path(artifact_dir) / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _load_encoders(directory: Path, sequence_length: int, max_tokens: int) -> tuple[TextEncoder, dict[str, LabelMap]]:
    vocabulary = json.loads((directory / "vocabulary.json").read_text())
    # TextVectorization adds "" and "[UNK]" itself when given a vocabulary.
    vocabulary = [t for t in vocabulary if t not in ("", "[UNK]")]
    labels = json.loads((directory / "labels.json").read_text())
    return TextEncoder(vocabulary, sequence_length, max_tokens), {h: LabelMap(v) for h, v in labels.items()}


def artifact_footprint(artifact_dir: Path) -> tuple[int, list[str]]:
    """(bytes on disk, cache files in it): every worker downloads an artifact, so it must hold no cache."""
    files = [p for p in Path(artifact_dir).rglob("*") if p.is_file()]
    caches = [str(p.relative_to(artifact_dir)) for p in files if p.suffix in (".npz", ".npy") or "cache" in p.parts]
    return sum(p.stat().st_size for p in files), caches


def read_config(artifact_dir: Path) -> dict:
    path = Path(artifact_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{artifact_dir} is not a model artifact (no config.json)")
    return json.loads(path.read_text())


def find_artifact(settings: Settings, version: str | None = None) -> Path:
    """The directory of ``version`` under the artifacts dir, or the newest one when no version is given."""
    root = settings.artifacts_dir
    if version:
        path = root / version
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no model version {version!r} under {root}")
        return path
    versions = sorted(p for p in root.glob("*") if (p / "config.json").is_file()) if root.is_dir() else []
    if not versions:
        raise FileNotFoundError(f"no trained model under {root}: run `fashion-tagging train` first")
    return versions[-1]


def local_artifact_dir(settings: Settings, version: str, artifact_uri: str) -> Path:
    """A local directory holding a registered artifact: itself when local, else a copy downloaded once
    into the cache (atomically: concurrent workers never load half a copy)."""
    path = local_path(artifact_uri)
    if path is not None:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {version!r}: no artifact at {artifact_uri}")
        return path
    target = settings.cache_dir / "models" / version
    if (target / COMPLETE_MARKER).is_file():
        return target
    store, key = open_uri(artifact_uri, endpoint_url=settings.s3_endpoint_url)
    staging = target.with_name(f".{version}-{uuid.uuid4().hex[:8]}")
    store.download_dir(key, staging)
    (staging / COMPLETE_MARKER).touch()
    try:
        os.replace(staging, target)  # another process may have won the race: theirs is as good
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class Tagger:
    """Loads an artifact once; tags batches of (decoded image or None, text) products."""

    def __init__(self, artifact_dir: Path, head_model: keras.Model, config: dict, text, label_maps, *,
                 engine: str = "auto", quantization: str | None = None):
        from fashion_tagging.engines import resolve_engine

        self.artifact_dir = Path(artifact_dir)
        self.engine = resolve_engine(engine)  # where the backbone runs: "keras" or "litert" (engines.py)
        self.quantization = quantization  # LiteRT export to run; None: the one training shipped
        self._embed_pixels = None
        self._compiled_models: dict[int, object] = {}
        self.model = head_model
        self.config = config
        self.text = text
        self.label_maps = label_maps
        # The heads are the artifact's, not settings.HEADS: training leaves out the heads a catalog
        # has no usable labels for (recorded in ``heads_left_out``), and such a model tags without them.
        self.primary_head = config.get("primary_head", PRIMARY_HEAD)
        self.heads = tuple(h for h in config.get("heads", label_maps) if h in label_maps)
        if self.primary_head not in self.heads:
            raise ValueError(f"{artifact_dir}: the artifact has no {self.primary_head!r} head (heads: {self.heads})")
        self.heads_left_out = dict(config.get("heads_left_out") or {})
        self.calibration = read_calibration(self.artifact_dir)
        self._backbone = None
        expert_path = self.artifact_dir / IMAGE_EXPERT_FILE
        self.image_expert = keras.saving.load_model(expert_path, compile=False) if expert_path.is_file() else None
        text_expert_path = self.artifact_dir / TEXT_EXPERT_FILE
        self.text_expert = keras.saving.load_model(text_expert_path, compile=False) \
            if text_expert_path.is_file() else None
        # Unknown words mapped to the vocabulary word they were meant to be, where training asked for it.
        self.spelling = corrector_for(config, text.vocabulary, text_expert_words(self.text_expert))

    @classmethod
    def load(cls, artifact_dir: str | Path, *, engine: str = "auto", quantization: str | None = None) -> "Tagger":
        """``engine``: see ``engines.ENGINE_CHOICES`` (auto: Keras on a GPU, LiteRT on CPU);
        ``quantization`` picks a LiteRT export (float32/int8) instead of the one training shipped."""
        artifact_dir = Path(artifact_dir)
        config = read_config(artifact_dir)
        text, label_maps = _load_encoders(artifact_dir, config["max_text_tokens"], config["vocabulary_size"])
        model = keras.saving.load_model(artifact_dir / "model.keras", compile=False)
        return cls(artifact_dir, model, config, text, label_maps, engine=engine, quantization=quantization)

    @property
    def version(self) -> str:
        return self.config["version"]

    @property
    def backbone_name(self) -> str:
        return self.config["backbone"]

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def backbone(self) -> keras.Model:
        """Built on first use: a text-only batch never pays for it."""
        if self._backbone is None:
            from fashion_tagging.backbones import build_backbone

            fine_tuned = self.artifact_dir / FINE_TUNED_BACKBONE_FILE
            self._backbone = build_backbone(self.backbone_name, self.image_size,
                                            weights=None if fine_tuned.is_file() else "imagenet")
            if fine_tuned.is_file():
                self._backbone.load_weights(fine_tuned)
        return self._backbone

    def image_embeddings(self, images: Sequence[np.ndarray | None], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1280) backbone embeddings and the has-image mask; missing images give zero rows."""
        vectors = np.zeros((len(images), IMAGE_EMBEDDING_DIM), dtype=np.float32)
        present = np.array([img is not None for img in images], dtype=bool)
        rows = np.flatnonzero(present)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            pixels = np.empty((len(chunk), self.image_size, self.image_size, 3), dtype=np.float32)
            for slot, i in enumerate(chunk):  # converted as copied: no uint8 batch in between
                pixels[slot] = to_model_size(images[i], self.image_size)
            vectors[chunk] = np.asarray(self.embed_pixels(pixels), dtype=np.float32)
        return vectors, present

    def _compiled(self, model: keras.Model):
        """``model`` as one traced function (no ``predict`` machinery per call; any batch/token length)."""
        compiled = self._compiled_models.get(id(model))
        if compiled is None:
            import tensorflow as tf

            # One trace for every batch size and token length: the signature is the model's inputs.
            signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), model.input)
            compiled = tf.function(lambda inputs: model(inputs, training=False), input_signature=[signature])
            self._compiled_models[id(model)] = compiled
        return compiled

    def _head_outputs(self, inputs: dict, batch_size: int) -> dict[str, np.ndarray]:
        """The head model's outputs, batched by text length as training batches it.

        Products are sorted by token count and each batch's trailing padding is cut: the LSTM runs
        as many steps as the batch's longest text, not ``max_text_tokens`` (padding is masked,
        so the outputs are the same).
        """
        tokens = inputs["tokens"]
        lengths = np.maximum((tokens != 0).sum(axis=1), 1)
        order = np.argsort(lengths, kind="stable")
        head = self._compiled(self.model)
        outputs: dict[str, np.ndarray] = {}
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = {name: value[rows] for name, value in inputs.items()}
            batch["tokens"] = batch["tokens"][:, :int(lengths[rows].max())]
            for name, value in head(batch).items():
                value = np.asarray(value)
                if name not in outputs:
                    outputs[name] = np.empty((len(order), *value.shape[1:]), dtype=value.dtype)
                outputs[name][rows] = value
        return outputs

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) pixels 0..255 -> (N, 1280) backbone embeddings, on this tagger's engine."""
        if self._embed_pixels is None:
            from fashion_tagging.engines import backbone_runner

            self._embed_pixels = backbone_runner(self.engine, self.artifact_dir, lambda: self.backbone,
                                                 quantization=self.quantization)
        return self._embed_pixels(pixels)

    def predict(self, images: Sequence[np.ndarray | None], texts: Sequence[str], *, batch_size: int = 128,
                top_k: int = 3) -> TagPredictions:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts: one of each per product")
        embeddings, has_image = self.image_embeddings(images, batch_size=min(batch_size, 64))
        return self.predict_embeddings(embeddings, has_image, texts, batch_size=batch_size, top_k=top_k)

    def _blended_primary(self, outputs: dict, embeddings: np.ndarray, has_image: np.ndarray, texts: list[str],
                         has_text: np.ndarray, tokens: np.ndarray, batch_size: int, log: bool = False) -> np.ndarray:
        """Hybrid fusion for the primary head with the blend chosen on val at training time
        (``log``: as log-probabilities, see ``model.blend_primary``); ``tokens``: the texts' word
        ids, which put it in a text condition (see ``model.blend_groups``)."""
        blend = self.config["primary_blend"]
        primary = self.primary_head
        fused, text_head = np.asarray(outputs[primary]), np.asarray(outputs[f"text_{primary}"])
        conditions = text_conditions(tokens, self.config.get("text_condition_thresholds"), text_head)
        # An expert whose weight is 0 in every situation is not run: tagging is the hot path.
        weights = [blend_weights(entry) for entry in blend.values()]
        image_weighted, text_weighted = (any(w[i] for w in weights) for i in (1, 2))
        expert = text_expert = None
        if self.image_expert is not None and image_weighted and has_image.any():
            expert = _in_batches(self._compiled(self.image_expert), embeddings, batch_size)[self.primary_head]
        if self.text_expert is not None and text_weighted and has_text.any():
            text_expert = np.concatenate([np.asarray(self._compiled(self.text_expert)(texts_tensor(texts[i:i + batch_size])))
                                          for i in range(0, len(texts), batch_size)])
        return blend_primary(fused, text_head, expert, has_image, has_text, blend, text_expert, log=log,
                             conditions=conditions)

    def predict_embeddings(self, embeddings: np.ndarray, has_image: np.ndarray, texts: Sequence[str], *,
                           batch_size: int = 256, top_k: int = 3, calibrated: bool = True,
                           keep_probabilities: bool = False) -> TagPredictions:
        """Tag from precomputed image embeddings (evaluation and retagging reuse the cache).

        With the artifact's calibration (unless ``calibrated`` is False) confidences and top-k
        scores are calibrated and each head's tags are routed (``auto_accepted``); labels are the
        same either way. ``keep_probabilities``: the raw per-head log-probabilities are returned too
        (``log_probabilities``: the blended primary head's exact ones, which its rounded softmax
        would lose, see ``model.blend_primary``).
        """
        texts = [t if isinstance(t, str) else "" for t in texts]
        if self.spelling is not None:
            texts = self.spelling.correct_all(texts)
        has_text = np.array([bool(t.strip()) for t in texts], dtype=bool)
        embeddings = embeddings * has_image[:, None]
        inputs = model_inputs(embeddings, has_image, self.text.encode(texts), has_text)
        outputs = self._head_outputs(inputs, batch_size) if len(texts) else None
        log_outputs = {}  # exact log-probabilities where a head has them (the blended primary)
        if outputs is not None and self.config.get("primary_blend"):
            outputs = dict(outputs)
            log_outputs[self.primary_head] = self._blended_primary(outputs, inputs["image_embedding"], has_image,
                                                                   texts, has_text, inputs["tokens"], batch_size,
                                                                   log=True)
            outputs[self.primary_head] = np.exp(log_outputs[self.primary_head])
        labels, confidences, tops = {}, {}, {}
        calibration = self.calibration if calibrated else None
        accepted, raw = ({} if calibration else None), ({} if keep_probabilities else None)
        for head in self.heads:  # only the artifact's heads: a head left out at training is absent here
            names = self.label_maps[head].labels
            probs = np.asarray(outputs[head]) if outputs is not None else np.zeros((0, len(names)))
            if raw is not None:
                raw[head] = log_outputs[head] if head in log_outputs else log_probabilities(probs)
            probs = calibrate(probs, calibration, head, log_outputs.get(head))
            best = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
            labels[head] = [names[i] for i in best]
            top1 = probs[np.arange(len(probs)), best] if len(probs) else np.zeros(0)
            confidences[head] = top1.astype(np.float32)
            routed = auto_accepted(top1, calibration, head)
            if routed is not None:
                accepted[head] = routed
            order = np.argsort(-probs, axis=1)[:, :top_k] if len(probs) else np.zeros((0, top_k), dtype=int)
            tops[head] = [[(names[j], round(float(row[j]), 4)) for j in idx] for row, idx in zip(probs, order, strict=True)]
        product = np.asarray(outputs["product_embedding"], dtype=np.float32) if outputs is not None \
            else np.zeros((0, self.model.get_layer("product_embedding").units), dtype=np.float32)
        norms = np.linalg.norm(product, axis=1, keepdims=True)
        product = product / np.maximum(norms, 1e-12)
        return TagPredictions(labels, confidences, tops, embeddings.astype(np.float32), product, has_image, has_text,
                              auto_accepted=accepted or None, log_probabilities=raw)


def _in_batches(function, inputs: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """``function`` (array -> dict of arrays) over ``inputs`` in batches, outputs concatenated."""
    parts = [function(inputs[start:start + batch_size]) for start in range(0, len(inputs), batch_size)]
    return {name: np.concatenate([np.asarray(part[name]) for part in parts]) for name in parts[0]}
