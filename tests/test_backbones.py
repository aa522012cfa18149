"""Backbones: the torch-free Lite0 conversion is numerically the torch model, and builders honour the contract."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
import skimage.transform

from fashion_tagging import backbones
from fashion_tagging.settings import IMAGE_EMBEDDING_DIM
from tests.data.make_lite0_torch_reference import OUT as TORCH_REFERENCE, reference_inputs

# Standard ImageNet-1k class indices.
IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


def center_square(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side]
    return skimage.transform.resize(crop, (size, size), preserve_range=True, anti_aliasing=True).astype(np.float32)


@pytest.fixture(scope="module")
def lite0_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("backbones")
    backbones.lite0_imagenet_weights_path(cache)
    return cache


@pytest.fixture(scope="module")
def classifier(lite0_cache):
    return backbones.build_lite0_imagenet_classifier(224, cache_dir=lite0_cache)


@pytest.fixture(scope="module")
def torch_state():
    return backbones.read_torch_legacy_checkpoint(backbones.lite0_checkpoint_path())


def test_reads_legacy_torch_checkpoint_without_torch(torch_state):
    assert torch_state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert torch_state["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert torch_state["_fc.weight"].shape == (1000, 1280)
    assert torch_state["_fc.weight"].dtype == np.float32
    assert not any("_se_" in key for key in torch_state)  # Lite has no squeeze-excitation


def test_checkpoint_reader_rejects_other_files_and_foreign_globals(tmp_path):
    not_torch = tmp_path / "not_torch.pth"
    not_torch.write_bytes(b"PK\x03\x04 zip-format or garbage")
    with pytest.raises(backbones.TorchCheckpointError):
        backbones.read_torch_legacy_checkpoint(not_torch)

    hostile = tmp_path / "hostile.pth"
    with open(hostile, "wb") as f:
        for header in (backbones.TORCH_LEGACY_MAGIC, backbones.TORCH_LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump(Path("not-allowed"), f, protocol=2)  # any global outside the allow-list
    with pytest.raises(backbones.TorchCheckpointError, match="refusing"):
        backbones.read_torch_legacy_checkpoint(hostile)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(backbones.lite0_checkpoint_path().read_bytes()[:1_000_000])
    with pytest.raises(backbones.TorchCheckpointError, match="truncated"):
        backbones.read_torch_legacy_checkpoint(truncated)


def test_conversion_is_cached_once_and_deterministic(lite0_cache, tmp_path):
    cached = backbones.lite0_imagenet_weights_path(lite0_cache)
    mtime = cached.stat().st_mtime_ns
    assert backbones.lite0_imagenet_weights_path(lite0_cache) == cached
    assert cached.stat().st_mtime_ns == mtime  # not converted again
    assert [p.name for p in lite0_cache.iterdir()] == [cached.name]  # no temp files left

    again = backbones.lite0_imagenet_weights_path(tmp_path)
    with h5py.File(cached, "r") as first, h5py.File(again, "r") as second:
        names = []
        first.visit(lambda name: names.append(name) if isinstance(first[name], h5py.Dataset) else None)
        assert len(names) >= 250  # 49 convs, 49 BNs x 4, dense x 2, normalisation x 3
        for name in names:
            np.testing.assert_array_equal(first[name][()], second[name][()], err_msg=name)


def test_classifier_matches_torch_reference_logits_and_embeddings(classifier):
    import keras

    reference = np.load(TORCH_REFERENCE)
    pooled = keras.Model(classifier.input, [classifier.output, classifier.get_layer("avg_pool").output])
    logits, embeddings = pooled.predict(reference_inputs(), verbose=0)
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-4)
    np.testing.assert_allclose(embeddings, reference["embeddings"], atol=1e-4)


def test_stem_conv_and_batchnorm_match_numpy_from_raw_tensors(classifier, torch_state):
    """Independent of torch: TF-'SAME' padding, OIHW->HWIO, (x-127)/128 and BN eps 1e-3 done by hand."""
    import keras

    pixels = reference_inputs()[:1]
    stem = keras.Model(classifier.input, classifier.get_layer("stem_bn").output)
    keras_out = stem.predict(pixels, verbose=0)[0]

    x = (pixels[0].astype(np.float64) - 127.0) / 128.0
    x = np.pad(x, ((0, 1), (0, 1), (0, 0)))  # TF 'SAME' for stride 2, kernel 3, even size
    patches = np.stack([x[dy : dy + 223 : 2, dx : dx + 223 : 2] for dy in range(3) for dx in range(3)], axis=2)
    kernel = torch_state["_conv_stem.weight"].astype(np.float64)  # (out, in, kh, kw)
    conv = np.einsum("hwkc,okc->hwo", patches, kernel.transpose(0, 2, 3, 1).reshape(32, 9, 3))
    gamma, beta, mean, var = (torch_state[f"_bn0.{n}"] for n in ("weight", "bias", "running_mean", "running_var"))
    expected = (conv - mean) / np.sqrt(var + 1e-3) * gamma + beta

    assert keras_out.shape == (112, 112, 32)
    np.testing.assert_allclose(keras_out, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("photo", "expected_classes"),
    [(skimage.data.chelsea, IMAGENET_CATS), (skimage.data.coffee, IMAGENET_COFFEE)],
)
def test_classifies_sample_photos_sensibly(classifier, photo, expected_classes):
    logits = classifier.predict(center_square(photo(), 224)[None], verbose=0)[0]
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert top5 & expected_classes, f"top-5 {sorted(top5)} has none of {sorted(expected_classes)}"


def test_private_keras_efficientnet_builder_still_builds_the_public_b0():
    """Lite0 is built by keras.src's generic builder (public Keras has only B0..B7): from B0's block
    table it must build exactly the public B0, so Lite0's own changes (relu6, no SE) are the only ones."""
    import copy
    import re

    import keras

    builder, blocks = backbones._keras_efficientnet_builder()
    assert [(b["repeats"], b["filters_out"], b["se_ratio"]) for b in blocks] == [
        (1, 16, 0.25), (2, 24, 0.25), (2, 40, 0.25), (3, 80, 0.25), (3, 112, 0.25), (4, 192, 0.25), (1, 320, 0.25)]
    common = dict(include_top=True, weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=None)
    private = builder(width_coefficient=1.0, depth_coefficient=1.0, default_size=224, dropout_rate=0.2,
                      activation="swish", blocks_args=copy.deepcopy(blocks), name="b0", **common)
    public = keras.applications.EfficientNetB0(name="b0", **common)

    def architecture(model):  # unnamed layers get a per-session suffix ("input_layer_1")
        return [(re.sub(r"_\d+$", "", layer.name), type(layer).__name__, [tuple(w.shape) for w in layer.weights])
                for layer in model.layers]

    assert architecture(private) == architecture(public)


def test_lite0_backbone_embeds_raw_pixels_at_any_size(lite0_cache):
    backbone = backbones.build_backbone("efficientnet-lite0", 128, cache_dir=lite0_cache)
    pixels = np.random.default_rng(0).uniform(0, 255, size=(3, 128, 128, 3)).astype(np.float32)
    embeddings = backbone.predict(pixels, verbose=0)
    assert embeddings.shape == (3, IMAGE_EMBEDDING_DIM)
    assert np.isfinite(embeddings).all() and (embeddings >= 0).all()  # relu6 before pooling


def test_fine_tuned_weights_load_into_a_fresh_backbone(lite0_cache, tmp_path):
    pretrained = backbones.build_backbone("efficientnet-lite0", 96, cache_dir=lite0_cache)
    pretrained.save_weights(tmp_path / "backbone.weights.h5")
    fresh = backbones.build_backbone("efficientnet-lite0", 96, weights=None)
    fresh.load_weights(tmp_path / "backbone.weights.h5")
    pixels = np.full((1, 96, 96, 3), 200.0, dtype=np.float32)
    np.testing.assert_allclose(fresh.predict(pixels, verbose=0), pretrained.predict(pixels, verbose=0), atol=1e-6)


def test_b0_builds_randomly_initialised():
    backbone = backbones.build_backbone("efficientnet-b0", 64, weights=None)
    assert backbone.predict(np.zeros((2, 64, 64, 3), np.float32), verbose=0).shape == (2, IMAGE_EMBEDDING_DIM)


@pytest.mark.parametrize(("name", "weights"), [("resnet50", "imagenet"), ("efficientnet-lite0", "noisy-student")])
def test_bad_arguments_raise_clear_errors(name, weights):
    with pytest.raises(ValueError, match="resnet50|noisy-student"):
        backbones.build_backbone(name, 224, weights=weights)
