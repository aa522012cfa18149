"""Inference engines: the LiteRT export tags like Keras, is built on first use, and GPUs keep Keras."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fashion_tagging import engines
from fashion_tagging.artifacts import Tagger
from fashion_tagging.catalog import load_kaggle_catalog
from fashion_tagging.images import load_photo_file


@pytest.fixture(scope="module")
def slice_products(kaggle_slice_dir):
    """Real products of the slice with a usable photo: decoded pixels and texts."""
    products = load_kaggle_catalog(kaggle_slice_dir).products
    products = products[products["image_path"].fillna("").astype(bool)].head(80)
    images, texts = [], []
    for path, text in zip(products["image_path"], products["text"].fillna(""), strict=True):
        pixels, why = load_photo_file(path, 64)
        if not why:
            images.append(pixels)
            texts.append(text)
    return images, texts


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path):
    """A private copy of the tiny model: tests here add and remove its exports."""
    return shutil.copytree(tiny_artifact, tmp_path / tiny_artifact.name)


def test_training_writes_the_exports_and_decides_int8_on_val(tiny_artifact):
    report = engines.read_exports_report(tiny_artifact)
    assert engines.export_path(tiny_artifact, engines.FLOAT32).is_file()
    assert engines.export_path(tiny_artifact, engines.INT8).is_file()
    int8 = report[engines.INT8]
    assert int8["calibration_photos"] > 0 and int8["val_products"] > 0
    assert int8["shipped"] == (int8["val_accuracy_float32"] - int8["val_accuracy_int8"] <= engines.INT8_MAX_VAL_DROP)
    expected = engines.INT8 if int8["shipped"] else engines.FLOAT32
    assert engines.serving_quantization(tiny_artifact) == expected


def test_litert_float32_export_tags_like_keras(artifact_copy, slice_products):
    images, texts = slice_products
    report = engines.read_exports_report(artifact_copy)
    report[engines.INT8]["shipped"] = False  # this test compares the float32 export with Keras
    engines.write_exports_report(artifact_copy, report)

    keras_tagger = Tagger.load(artifact_copy, engine="keras")
    litert_tagger = Tagger.load(artifact_copy, engine="litert")
    keras_out = keras_tagger.predict(images, texts, batch_size=32)
    litert_out = litert_tagger.predict(images, texts, batch_size=32)

    assert isinstance(litert_tagger._embed_pixels, engines.LiteRTBackbone)
    np.testing.assert_allclose(litert_out.image_embeddings, keras_out.image_embeddings, atol=1e-3, rtol=1e-3)
    for head in keras_tagger.heads:
        assert litert_out.labels[head] == keras_out.labels[head]
    np.testing.assert_allclose(litert_out.product_embeddings, keras_out.product_embeddings, atol=1e-4)


def test_artifact_without_exports_is_exported_on_first_use(artifact_copy, slice_products):
    images, texts = slice_products
    engines.remove_exports(artifact_copy)  # as an artifact trained before exports existed

    tagger = Tagger.load(artifact_copy, engine="litert")
    predictions = tagger.predict(images[:10], texts[:10], batch_size=8)

    assert len(predictions) == 10
    assert engines.export_path(artifact_copy, engines.FLOAT32).is_file()  # kept for the next process
    assert engines.serving_quantization(artifact_copy) == engines.FLOAT32  # int8 needs training photos
    again = Tagger.load(artifact_copy, engine="litert").predict(images[:10], texts[:10], batch_size=8)
    assert again.labels == predictions.labels


def test_text_only_batch_never_builds_the_backbone(artifact_copy):
    tagger = Tagger.load(artifact_copy, engine="litert")
    predictions = tagger.predict([None, None], ["nike men black running shoes", "women red kurta"])
    assert len(predictions) == 2 and tagger._embed_pixels is None


def test_text_batches_trimmed_by_length_match_the_padded_model(tiny_artifact, slice_products):
    _, texts = slice_products
    tagger = Tagger.load(tiny_artifact, engine="keras")
    texts = texts[:40] + ["", "tshirt"]  # an empty text and a one-word one among long ones
    has_text = np.array([bool(t) for t in texts])
    from fashion_tagging.model import model_inputs

    inputs = model_inputs(np.zeros((len(texts), 1280), np.float32), np.zeros(len(texts)), tagger.text.encode(texts),
                          has_text)
    padded = tagger.model.predict(inputs, batch_size=16, verbose=0)
    bucketed = tagger._head_outputs(inputs, batch_size=16)
    for name, value in padded.items():
        np.testing.assert_allclose(bucketed[name], np.asarray(value), atol=1e-5)


def test_gpu_worker_keeps_keras(monkeypatch):
    """No GPU here: TensorFlow's device list is patched to show one (the real GPU path is not run)."""
    import tensorflow as tf

    assert engines.resolve_engine("keras") == "keras"
    assert engines.resolve_engine("litert") == "litert"
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")]
                        if kind == "GPU" else [])
    assert engines.resolve_engine("auto") == "keras"
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert engines.resolve_engine("auto") == "litert"
    with pytest.raises(ValueError, match="unknown inference engine"):
        engines.resolve_engine("onnx")


def test_the_feature_stores_litert_pass_stores_what_keras_stores_and_exports_once(tmp_path, kaggle_slice_dir):
    """A CPU worker embeds photos for the store through the backbone's float32 LiteRT export."""
    from fashion_tagging.features import EXPORTS_SUBDIR, catalog_image_embeddings

    catalog = load_kaggle_catalog(kaggle_slice_dir).products
    products = catalog.head(40)
    ids, paths = products["id"], products["image_path"].tolist()
    embed = dict(backbone_name="efficientnet-lite0", image_size=64, progress=False, with_top_inputs=True)
    keras_pass = catalog_image_embeddings(ids, paths, cache_dir=tmp_path / "keras", engine="keras", **embed)
    litert_pass = catalog_image_embeddings(ids, paths, cache_dir=tmp_path / "litert", engine="litert", **embed)
    assert not list((tmp_path / "keras").glob(f"{EXPORTS_SUBDIR}/*"))
    exports = list((tmp_path / "litert" / EXPORTS_SUBDIR).glob("*.tflite"))
    assert len(exports) == 1
    assert keras_pass.has_image.tolist() == litert_pass.has_image.tolist() and keras_pass.has_image.sum() > 30
    rows = np.flatnonzero(keras_pass.has_image)
    # The store keeps float16: the engines agree to its rounding.
    np.testing.assert_allclose(litert_pass.vectors[rows], keras_pass.vectors[rows], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(litert_pass.top_inputs[rows].astype(np.float32),
                               keras_pass.top_inputs[rows].astype(np.float32), rtol=2e-3, atol=2e-2)
    made = exports[0].stat().st_mtime_ns
    more = catalog.iloc[40:50]
    catalog_image_embeddings(more["id"], more["image_path"].tolist(), cache_dir=tmp_path / "litert", engine="litert",
                             **embed)
    assert exports[0].stat().st_mtime_ns == made  # the second pass reused the export
