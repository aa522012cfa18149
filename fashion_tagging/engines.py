"""Where a Tagger's image backbone runs: Keras (TensorFlow) or its LiteRT export.

The backbone is nearly all of tagging's compute. GPU workers keep the Keras model (mixed
precision, see ``tagging.configure_accelerator``). CPU workers run the same backbone, fine-tuned
last block included, exported to a LiteRT flatbuffer and run by ``ai-edge-litert``'s interpreter
with XNNPACK. Side by side on 2 cores (benchmarks/tagging_engines.py) LiteRT and OpenVINO were
on par in float32, both ahead of Keras ``predict_on_batch`` and ONNX Runtime, and LiteRT's
full-integer (int8) export was the fastest of all, OpenVINO's bf16 included. The int8 export is
built at training with calibration photos from ``train`` and used only when it keeps val
articleType accuracy within ``INT8_MAX_VAL_DROP`` of float32.

Exports are files of the artifact (``exports/``): written by training, or on first use for an
artifact trained before (float32 only: int8 needs training photos). Written atomically, so
workers that export at once never read half a file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from fashion_tagging.artifacts import write_file_atomically
from fashion_tagging.settings import IMAGE_EMBEDDING_DIM

log = logging.getLogger(__name__)

ENGINES = ("keras", "litert")
ENGINE_CHOICES = ("auto", *ENGINES)
EXPORTS_DIR = "exports"
EXPORTS_REPORT = "exports.json"  # the int8 decision and its val figures
FLOAT32, INT8 = "float32", "int8"
INT8_MAX_VAL_DROP = 0.002  # articleType accuracy on val, float32 export minus int8 export
CALIBRATION_PHOTOS = 300  # train photos the int8 converter sees to fix its activation ranges


def gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU: what decides the engine and the embedding pass's batch."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_engine(choice: str) -> str:
    """``auto``: Keras where TensorFlow sees a GPU, LiteRT on CPU-only workers."""
    if choice not in ENGINE_CHOICES:
        raise ValueError(f"unknown inference engine {choice!r}: choose one of {ENGINE_CHOICES}")
    if choice != "auto":
        return choice
    return "keras" if gpu_visible() else "litert"


def export_path(artifact_dir: Path, quantization: str) -> Path:
    return Path(artifact_dir) / EXPORTS_DIR / f"backbone-{quantization}.tflite"


def read_exports_report(artifact_dir: Path) -> dict:
    path = Path(artifact_dir) / EXPORTS_DIR / EXPORTS_REPORT
    return json.loads(path.read_text()) if path.is_file() else {}


def write_exports_report(artifact_dir: Path, report: dict) -> None:
    write_file_atomically(Path(artifact_dir) / EXPORTS_DIR / EXPORTS_REPORT, json.dumps(report, indent=1).encode())


def serving_quantization(artifact_dir: Path) -> str:
    """int8 when training shipped it (and the file is there), else float32."""
    report = read_exports_report(artifact_dir)
    if report.get(INT8, {}).get("shipped") and export_path(artifact_dir, INT8).is_file():
        return INT8
    return FLOAT32


def export_backbone(backbone, target: Path, *, calibration: Iterable[np.ndarray] | None = None) -> Path:
    """Convert a Keras backbone (pixels 0..255 -> pooled embedding) to a LiteRT flatbuffer at ``target``.

    ``calibration`` (batches of images, N x S x S x 3) makes it a full-integer (int8) model with
    float input and output; without it the export is float32 and matches Keras to ~1e-5.
    """
    import tensorflow as tf

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ft-export-") as tmp:
        saved = Path(tmp) / "saved_model"
        backbone.export(str(saved), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        if calibration is not None:
            batches = [np.asarray(batch, dtype=np.float32) for batch in calibration]
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([image[None]] for batch in batches for image in batch)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.float32
            converter.inference_output_type = tf.float32
        flatbuffer = converter.convert()
    write_file_atomically(target, flatbuffer)
    log.info("exported the backbone to %s (%.1f MB) in %.0fs", target, len(flatbuffer) / 1e6,
             time.perf_counter() - started)
    return target


def worker_threads() -> int:
    """The CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LiteRTBackbone:
    """A LiteRT backbone export, called like ``predict_on_batch``: (N, S, S, 3) pixels -> (N, 1280).

    An export of a model with several outputs returns them as a tuple, in the model's order.
    One interpreter per batch size seen (a partial last batch keeps its own, so the full-size one
    is never re-planned); calls are serialised, as an interpreter is not thread-safe.
    """

    MAX_SHAPES = 4

    def __init__(self, path: Path, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.threads = threads or worker_threads()
        self._new_interpreter = lambda: Interpreter(model_path=str(self.path), num_threads=self.threads)
        self._by_batch: dict[int, object] = {}
        self._lock = threading.Lock()
        self._outputs: list[int] | None = None  # output tensors in the model's order

    @staticmethod
    def _output_order(interpreter) -> list[int]:
        """Tensor indices of the outputs in the exported model's order (its signature's output_0, output_1...)."""
        signatures = interpreter.get_signature_list()
        if not signatures:
            return [detail["index"] for detail in interpreter.get_output_details()]
        details = interpreter.get_signature_runner(next(iter(signatures))).get_output_details()
        return [details[name]["index"] for name in sorted(details, key=lambda name: (len(name), name))]

    def _interpreter(self, batch: int):
        interpreter = self._by_batch.pop(batch, None)
        if interpreter is None:
            interpreter = self._new_interpreter()
            interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [batch, *self._shape(interpreter)])
            interpreter.allocate_tensors()
            if len(self._by_batch) >= self.MAX_SHAPES:
                self._by_batch.pop(next(iter(self._by_batch)))
        self._by_batch[batch] = interpreter  # most recently used last
        return interpreter

    @staticmethod
    def _shape(interpreter) -> list[int]:
        return [int(d) for d in interpreter.get_input_details()[0]["shape"][1:]]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        with self._lock:
            interpreter = self._interpreter(len(pixels))
            if self._outputs is None:
                self._outputs = self._output_order(interpreter)
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
            interpreter.invoke()
            outputs = tuple(interpreter.get_tensor(index).copy() for index in self._outputs)
        return outputs[0] if len(outputs) == 1 else outputs


def backbone_runner(engine: str, artifact_dir: Path, keras_backbone: Callable[[], object], *,
                    quantization: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The function that embeds pixel batches for ``engine``; ``keras_backbone()`` builds the Keras model.

    For LiteRT the artifact's serving export (or the ``quantization`` asked for) is used; a
    missing float32 export is made now: into the artifact, or into a temporary directory when the
    artifact cannot be written. A missing int8 export is an error (it needs training photos).
    """
    if engine == "keras":
        return keras_backbone().predict_on_batch
    if engine != "litert":
        raise ValueError(f"unknown inference engine {engine!r}: choose one of {ENGINES}")
    path = export_path(artifact_dir, quantization or serving_quantization(artifact_dir))
    if quantization == INT8 and not path.is_file():
        raise FileNotFoundError(f"{artifact_dir} has no int8 export: run `fashion-tagging export`")
    if not path.is_file():
        log.info("model %s has no LiteRT export: exporting it now (once per artifact)", Path(artifact_dir).name)
        try:
            export_backbone(keras_backbone(), path)
        except OSError as error:  # a read-only artifact: keep the export for this process only
            fallback = Path(tempfile.mkdtemp(prefix="ft-export-")) / path.name
            log.warning("cannot write %s (%s): exporting to %s for this process", path, error, fallback)
            path = export_backbone(keras_backbone(), fallback)
    return LiteRTBackbone(path)


def litert_embedding_runner(export_dir: Path, name: str, keras_backbone: Callable[[], object]) -> LiteRTBackbone:
    """The feature store's embedding pass on a CPU worker: pixels -> (pooled embedding, last block's inputs).

    The pretrained backbone's float32 LiteRT export with both outputs (never int8: stored features
    must equal Keras' to ~1e-5 whatever engine later tags), made once into ``export_dir``/``name``
    and kept there.
    """
    from fashion_tagging.backbones import with_top_inputs_output

    path = Path(export_dir) / f"{name}.tflite"
    if not path.is_file():
        log.info("exporting the embedding pass's backbone to %s (once per backbone and image size)", path)
        export_backbone(with_top_inputs_output(keras_backbone()), path)
    return LiteRTBackbone(path)


def remove_exports(artifact_dir: Path) -> None:
    shutil.rmtree(Path(artifact_dir) / EXPORTS_DIR, ignore_errors=True)


# --- building the exports at training (or for an existing artifact: `fashion-tagging export`) -----


def _decoded_photos(paths: list, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S, 3) uint8 pixels and a usable-photo mask; unusable photos are white, masked out."""
    from fashion_tagging.images import load_photo_file

    loaded = [load_photo_file(path if isinstance(path, str) else "", size) for path in paths]
    return np.stack([pixels for pixels, _ in loaded]), np.array([not why for _, why in loaded], dtype=bool)


def build_cpu_exports(artifact_dir: Path, train_rows, val_rows, *, seed: int = 0, batch_size: int = 64,
                      int8: bool = True, tagger=None) -> dict:
    """Write the artifact's LiteRT exports (float32, and int8 calibrated on train photos) and decide int8.

    ``train_rows`` / ``val_rows``: catalog frames (``image_path``, ``text`` and the primary head's
    label). int8 ships only when its val articleType accuracy is within ``INT8_MAX_VAL_DROP`` of
    the float32 export's, measured by tagging val as a CPU worker would (hybrid blend included).
    Returns (and writes as ``exports/exports.json``) the figures of that decision. ``tagger``: the
    artifact already loaded with the Keras engine (else it is loaded here).
    """
    from fashion_tagging.artifacts import Tagger

    started = time.perf_counter()
    artifact_dir = Path(artifact_dir)
    tagger = tagger or Tagger.load(artifact_dir, engine="keras")
    size, primary = tagger.image_size, tagger.primary_head
    report: dict = {FLOAT32: {"file": export_path(artifact_dir, FLOAT32).name}}
    export_backbone(tagger.backbone, export_path(artifact_dir, FLOAT32))
    report[FLOAT32]["megabytes"] = round(export_path(artifact_dir, FLOAT32).stat().st_size / 1e6, 1)
    with_photo = train_rows[train_rows["image_path"].fillna("").astype(bool)]
    if int8 and len(with_photo) and val_rows["image_path"].fillna("").astype(bool).any():
        tick = time.perf_counter()
        sample = with_photo.sample(min(CALIBRATION_PHOTOS, len(with_photo)), random_state=seed)
        pixels, usable = _decoded_photos(sample["image_path"].tolist(), size)
        calibration = [pixels[usable][i:i + batch_size] for i in range(0, int(usable.sum()), batch_size)]
        export_backbone(tagger.backbone, export_path(artifact_dir, INT8), calibration=calibration)
        export_seconds = time.perf_counter() - tick
        accuracy = _val_accuracy_per_export(tagger, artifact_dir, val_rows, batch_size)
        drop = accuracy[FLOAT32] - accuracy[INT8]
        report[INT8] = {
            "file": export_path(artifact_dir, INT8).name,
            "megabytes": round(export_path(artifact_dir, INT8).stat().st_size / 1e6, 1),
            "calibration_photos": int(usable.sum()), "export_seconds": round(export_seconds, 1),
            "val_products": int((val_rows[primary] != "").sum()),
            "val_accuracy_float32": round(accuracy[FLOAT32], 5), "val_accuracy_int8": round(accuracy[INT8], 5),
            "val_drop": round(drop, 5), "max_val_drop": INT8_MAX_VAL_DROP, "shipped": bool(drop <= INT8_MAX_VAL_DROP),
        }
        log.info("int8 backbone export: val %s accuracy %.4f vs float32 %.4f (drop %.4f, limit %.4f): %s",
                 primary, accuracy[INT8], accuracy[FLOAT32], drop, INT8_MAX_VAL_DROP,
                 "shipped" if report[INT8]["shipped"] else "not shipped (float32 serves)")
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_exports_report(artifact_dir, report)
    return report


def _val_accuracy_per_export(tagger, artifact_dir: Path, rows, batch_size: int) -> dict[str, float]:
    """Primary-head accuracy on ``rows`` with the backbone run by each LiteRT export.

    One export at a time, the photos decoded again for the second: two interpreters' buffers at
    batch 64 held about 0.5 GiB at once.
    """
    has_image = np.zeros(len(rows), dtype=bool)
    paths = rows["image_path"].tolist()
    truth = rows[tagger.primary_head].to_numpy()
    labelled = truth != ""
    texts = rows["text"].fillna("").tolist()
    accuracy = {}
    for quantization in (FLOAT32, INT8):
        run = LiteRTBackbone(export_path(artifact_dir, quantization))
        embeddings = np.zeros((len(rows), IMAGE_EMBEDDING_DIM), np.float32)
        for start in range(0, len(rows), batch_size):
            pixels, usable = _decoded_photos(paths[start:start + batch_size], tagger.image_size)
            has_image[start:start + len(usable)] = usable
            embeddings[start:start + len(usable)] = run(pixels.astype(np.float32))
        del run
        predicted = np.asarray(tagger.predict_embeddings(embeddings, has_image, texts, batch_size=batch_size * 2)
                               .labels[tagger.primary_head], dtype=object)
        accuracy[quantization] = float(np.mean(predicted[labelled] == truth[labelled])) if labelled.any() else 0.0
    return accuracy
