"""Real photo faults: every bad or odd kind of photo is decoded upright in RGB or rejected with
its reason, the same way by tagging (store bytes -> ``decode_image``) and by training (tf.data:
the embedding pass and end-to-end fine-tuning); and both paths agree on real catalog photos."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fashion_tagging.images import (MAX_PHOTO_BYTES, ImageDecodeError, decode_image, file_image_dataset,
                                    read_photo_file)
from fashion_tagging.objectstore import LocalStore
from fashion_tagging.settings import IMAGE_EMBEDDING_DIM, PRIMARY_HEAD
from tests.fixtures_data import CORRUPT_IMAGE_ID
from tests.photo_zoo import BLUE, EXIF_STORED, GREEN, RED, YELLOW, exif_jpeg, quadrant_colours, quadrants, \
    write_photo_zoo

SIZE = 64
HUGE = "huge object (21 MiB)"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_photo_zoo(tmp_path_factory.mktemp("photo-zoo"))


def tagging_decode(data: bytes) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_image(data, SIZE), None
    except ImageDecodeError as error:
        return None, str(error)


def training_outcomes(paths: list[str], size: int = SIZE) -> dict[int, tuple[np.ndarray, str]]:
    """Row -> (pixels, reason) as the training tf.data pipeline yields them."""
    seen = {}
    for indices, images, reasons in file_image_dataset(paths, size, batch_size=8):
        for index, image, reason in zip(indices.numpy(), images.numpy(), reasons.numpy(), strict=True):
            seen[int(index)] = (image, reason.decode())
    return seen


def assert_outcome(photo, pixels: np.ndarray | None, message: str | None) -> None:
    """Decoded like the upright picture, or rejected with the expected reason."""
    if photo.upright is None:
        assert pixels is None, f"{photo.kind}: decoded, but must be rejected ({photo.reason})"
        assert message.startswith(f"cannot decode image: {photo.reason}"), f"{photo.kind}: {message}"
        return
    assert message is None, f"{photo.kind}: rejected ({message}), but must be decoded"
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    error = np.abs(pixels.astype(int) - photo.expected(SIZE).astype(int)).mean()
    assert error < 10, f"{photo.kind}: mean error {error:.1f} against the upright picture"


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_tagging_decodes_or_rejects_every_kind_with_its_reason(zoo, store_kind, tmp_path, request):
    from fashion_tagging.tagging import BatchResult, _gather_inputs, fetch_photos

    store = LocalStore(tmp_path / "store") if store_kind == "local" else request.getfixturevalue("s3_store")
    keys = [f"photos/{photo.path.name}" for photo in zoo]
    store.put_files(zip(keys, [photo.path for photo in zoo]))
    fetched = fetch_photos(store, keys)
    assert len(fetched[keys[[p.kind for p in zoo].index(HUGE)]]) == MAX_PHOTO_BYTES + 1  # never read whole
    for photo, key in zip(zoo, keys, strict=True):
        assert_outcome(photo, *tagging_decode(fetched[key]))

    # What the nightly batch makes of them: decoded photos used, the others recorded, tagged from text.
    rows = [types.SimpleNamespace(product_id=i, image_key=key, title=f"product {i}", description="")
            for i, key in enumerate(keys)]
    inputs = _gather_inputs(rows, list(range(len(rows))), store, SIZE, BatchResult("run", "v1", len(rows)))
    assert inputs.product_ids == list(range(len(rows))) and not inputs.retry_ids
    errors = {error.product_id: error for error in inputs.errors}
    for i, photo in enumerate(zoo):
        if photo.upright is None:
            assert inputs.images[i] is None and errors[i].stage == "image" and errors[i].source == keys[i]
            assert errors[i].reason.startswith(f"cannot decode image: {photo.reason}"), errors[i].reason
            assert errors[i].reason.endswith(": tagged from text only")
        else:
            assert i not in errors and inputs.images[i] is not None, photo.kind


def test_training_pipeline_gives_the_tagging_pixels_or_the_tagging_reason(zoo):
    seen = training_outcomes([str(photo.path) for photo in zoo])
    assert sorted(seen) == list(range(len(zoo)))  # nothing silently dropped
    for i, photo in enumerate(zoo):
        pixels, reason = seen[i]
        expected, message = tagging_decode(read_photo_file(photo.path))
        if message is None:
            assert reason == "" and np.array_equal(pixels, expected.astype(np.float32)), photo.kind
        else:
            assert reason == message and (pixels == 255).all(), photo.kind
        assert_outcome(photo, None if reason else pixels.astype(np.uint8), reason or None)
    assert len(read_photo_file(zoo[[p.kind for p in zoo].index(HUGE)].path)) == MAX_PHOTO_BYTES + 1


def test_embedding_pass_records_each_rejected_photo_with_the_tagging_reason(zoo, tmp_path):
    import keras

    from fashion_tagging.features import catalog_image_embeddings

    pixels = keras.Input((SIZE, SIZE, 3))
    backbone = keras.Model(pixels, keras.layers.Dense(IMAGE_EMBEDDING_DIM)(keras.layers.GlobalAveragePooling2D()(pixels)))
    paths = [str(photo.path) for photo in zoo]
    embeddings = catalog_image_embeddings(np.arange(len(zoo)), paths, backbone_name="zoo", image_size=SIZE,
                                          cache_dir=tmp_path, batch_size=8, progress=False, backbone=backbone)
    reasons = {error.product_id: error for error in embeddings.errors}
    for i, photo in enumerate(zoo):
        image, message = tagging_decode(read_photo_file(photo.path))
        if photo.upright is None:
            assert not embeddings.has_image[i] and not embeddings.vectors[i].any()
            assert reasons[i].reason == message and reasons[i].stage == "image" and reasons[i].source == paths[i]
        else:
            assert embeddings.has_image[i] and i not in reasons, photo.kind
            direct = np.asarray(backbone.predict_on_batch(image[None].astype(np.float32)))[0]
            # the store keeps float16 features (as the tagger's inputs tolerate): float16's precision
            assert np.allclose(embeddings.vectors[i], direct, rtol=1e-3, atol=1e-3), photo.kind


def test_features_of_another_decode_rule_are_never_served(zoo, tmp_path, monkeypatch):
    """Features of another decoder's pixels would put train/serve skew back: each rule has a store of its own."""
    import keras

    import fashion_tagging.features as features
    from fashion_tagging.features import FeatureStore, catalog_image_embeddings, store_dir

    pixels = keras.Input((SIZE, SIZE, 3))
    backbone = keras.Model(pixels, keras.layers.Dense(IMAGE_EMBEDDING_DIM)(keras.layers.GlobalAveragePooling2D()(pixels)))
    paths = [str(zoo[0].path), str(zoo[1].path)]
    embed = dict(backbone_name="zoo", image_size=SIZE, cache_dir=tmp_path, progress=False, backbone=backbone)
    first = catalog_image_embeddings([1, 2], paths, **embed)
    old_store = store_dir(tmp_path, "zoo", SIZE)
    assert len(FeatureStore(old_store).index().keys) == 2

    monkeypatch.setattr(features, "DECODE_RULE", features.DECODE_RULE + " (changed)")
    assert store_dir(tmp_path, "zoo", SIZE) != old_store and not FeatureStore(store_dir(tmp_path, "zoo", SIZE)).shards()
    again = catalog_image_embeddings([1, 2], paths, **embed)  # embedded anew, into the new rule's store
    assert np.allclose(again.vectors, first.vectors, atol=1e-4) and again.vectors.any()
    assert len(FeatureStore(store_dir(tmp_path, "zoo", SIZE)).index().keys) == 2


def test_fine_tuning_pixels_leave_a_rejected_photo_image_less(zoo):
    from fashion_tagging.model import LabelMap, TextEncoder
    from fashion_tagging.train import _pixel_dataset

    by_kind = {photo.kind: photo for photo in zoo}
    chosen = [by_kind[kind] for kind in ("jpeg (baseline)", "truncated jpeg", "exif-rotated jpeg (orientation 6)")]
    rows = pd.DataFrame({"image_path": [str(p.path) for p in chosen] + [""], "text": ["a red shirt"] * 4,
                         PRIMARY_HEAD: ["Shirts", "Tshirts", "Shirts", "Tshirts"]})
    text = TextEncoder.fit(rows["text"], 8, 100)
    label_maps = {PRIMARY_HEAD: LabelMap.fit(rows[PRIMARY_HEAD], 1)}
    (inputs, _, _), = list(_pixel_dataset(rows, text, label_maps, size=SIZE, batch_size=8, training=False, seed=0))
    assert inputs["has_image"].numpy().ravel().tolist() == [1.0, 0.0, 1.0, 0.0]
    got = inputs["pixels"].numpy()
    assert np.array_equal(got[0], decode_image(chosen[0].path.read_bytes(), SIZE).astype(np.float32))
    assert np.array_equal(got[2], decode_image(chosen[2].path.read_bytes(), SIZE).astype(np.float32))
    assert (got[1] == 255).all() and (got[3] == 255).all()


def test_exif_orientation_is_applied_by_both_paths(tmp_path):
    upright = quadrants()
    paths = []
    for orientation in EXIF_STORED:
        path = tmp_path / f"orientation{orientation}.jpg"
        path.write_bytes(exif_jpeg(upright, orientation))
        paths.append(str(path))
    seen = training_outcomes(paths)
    for i, orientation in enumerate(EXIF_STORED):
        tagged = decode_image(Path(paths[i]).read_bytes(), SIZE)
        trained, reason = seen[i]
        assert reason == "" and np.array_equal(trained, tagged.astype(np.float32))
        # Landscape once upright: white bands above and below, none left and right.
        assert (tagged[0] == 255).all() and (tagged[-1] == 255).all() and (tagged[:, 0] < 245).any()
        for got, want in zip(quadrant_colours(tagged), (RED, BLUE, GREEN, YELLOW), strict=True):
            assert np.abs(np.subtract(got, want)).max() < 40, f"orientation {orientation}: {got} where {want}"


def test_training_and_tagging_paths_agree_on_real_photos(kaggle_slice_dir, tiny_artifact):
    """Same pixels, embeddings (cosine >= 0.999) and labels (>= 99.5 %) on ~300 real catalog photos."""
    from fashion_tagging.artifacts import Tagger
    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.features import embed_image_files
    from fashion_tagging.tagging import fetch_photos

    products = load_kaggle_catalog(kaggle_slice_dir).products.dropna(subset=["image_path"])
    paths = products["image_path"].tolist()
    assert len(paths) >= 200
    # Tagging as a CPU worker runs it, on the float32 export (int8 agrees on labels, not on values).
    tagger = Tagger.load(tiny_artifact, engine="litert", quantization="float32")
    size = tagger.image_size

    # Training: the tf.data pipeline and the embedding pass over the files.
    trained = {i: pixels for i, (pixels, reason) in training_outcomes(paths, size).items() if not reason}
    reasons: dict[int, str] = {}
    vectors, _, ok = embed_image_files(paths, tagger.backbone, size, 64, progress=False, reasons=reasons)

    # Tagging: the same files as objects, through the nightly fetch and decode.
    root = Path(paths[0]).parent
    assert all(Path(p).parent == root for p in paths)
    fetched = fetch_photos(LocalStore(root), [Path(p).name for p in paths])
    images, messages = [], {}
    for i, path in enumerate(paths):
        try:
            images.append(decode_image(fetched[Path(path).name], size))
        except ImageDecodeError as error:
            images.append(None)
            messages[i] = str(error)

    decoded = {i for i, image in enumerate(images) if image is not None}
    assert messages == reasons and set(trained) == set(np.flatnonzero(ok)) == decoded
    ids = products["id"].tolist()
    assert {ids[i] for i in messages} == {CORRUPT_IMAGE_ID}  # the fixture's corrupt photo, reported alike
    assert all(np.array_equal(trained[i], images[i].astype(np.float32)) for i in trained)

    served, has_image = tagger.image_embeddings(images)
    assert np.array_equal(has_image, ok)
    a, b = vectors[ok], served[ok]
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= 0.999, cosine.min()

    blank = [""] * len(paths)  # image only: the strictest comparison of the two image paths
    from_training = tagger.predict_embeddings(vectors, ok, blank)
    from_tagging = tagger.predict(images, blank)
    for head in tagger.heads:
        agree = np.mean(np.array(from_training.labels[head])[ok] == np.array(from_tagging.labels[head])[ok])
        assert agree >= 0.995, (head, agree)
