"""Robustness to inputs unlike the catalog's: perturbations, augmented training views, noisy texts."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fashion_tagging import augment
from fashion_tagging.augment import AugmentedView
from fashion_tagging.catalog import load_kaggle_catalog
from fashion_tagging.features import FeatureStore, catalog_image_embeddings, store_dir


def _photo() -> Image.Image:
    """A 60x80 catalog-like photo: a dark shape on white."""
    pixels = np.full((80, 60, 3), 255, np.uint8)
    pixels[15:65, 15:45] = (30, 60, 150)
    return Image.fromarray(pixels)


def test_photo_perturbations_keep_the_photo_usable_and_views_are_reproducible():
    photo = _photo()
    rotated = np.asarray(augment.rotate(photo, 10))
    assert rotated.shape == (80, 60, 3) and (rotated[0, 0] == 255).all()  # corners filled white, not black
    assert augment.crop(photo, 0.8).size == (48, 64)
    assert augment.jpeg(photo, 10).mode == "RGB"
    gray = np.asarray(augment.grayscale(photo))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert augment.low_resolution(photo, 3).size == photo.size

    first, again = AugmentedView(0, seed=1), AugmentedView(0, seed=1)
    assert np.array_equal(np.asarray(first(photo, "a.jpg")), np.asarray(again(photo, "a.jpg")))
    views = {AugmentedView(i, seed=1)(photo, "a.jpg").tobytes() for i in range(4)}
    assert len(views) > 1  # views differ from each other
    assert first.name != AugmentedView(1, seed=1).name != AugmentedView(0, seed=2).name


def test_misspell_puts_a_typo_in_about_the_asked_share_of_words():
    rng = np.random.default_rng(0)
    words = ["shirt", "cotton", "navy", "blue", "casual", "formal", "leather", "shoes"] * 50
    noisy = augment.misspell(" ".join(words), 0.33, rng).split()
    changed = np.mean([a != b for a, b in zip(words, noisy, strict=False)]) if len(noisy) == len(words) else None
    assert changed is not None and 0.2 < changed < 0.45  # a typo never merges or splits words
    assert augment.misspell("", 0.5, rng) == "" and augment.misspell(None, 0.5, rng) == ""
    assert sorted(augment.shuffle_words("a b c d", rng).split()) == ["a", "b", "c", "d"]


def test_text_augmentation_drops_the_title_only_when_a_description_follows(monkeypatch):
    import fashion_tagging.train as train_module

    monkeypatch.setattr(train_module, "DROP_TITLE_PROBABILITY", 1.0)
    monkeypatch.setattr(train_module, "UNKNOWN_WORD_PROBABILITY", 0.0)
    tokens = np.array([5, 6, 7, 8, 9, 0, 0, 0], np.int64)  # a 2-token title, then a description
    assert list(train_module._augmented_text(tokens, np.int64(2), seed=1).numpy()) == [7, 8, 9, 0, 0, 0, 0, 0]
    title_only = np.array([5, 6, 0, 0], np.int64)
    assert list(train_module._augmented_text(title_only, np.int64(2), seed=1).numpy()) == [5, 6, 0, 0]

    monkeypatch.setattr(train_module, "DROP_TITLE_PROBABILITY", 0.0)
    monkeypatch.setattr(train_module, "UNKNOWN_WORD_PROBABILITY", 1.0)
    # Every real word becomes the unknown token (1); padding stays padding.
    assert list(train_module._augmented_text(tokens, np.int64(2), seed=1).numpy()) == [1, 1, 1, 1, 1, 0, 0, 0]


def test_last_block_training_samples_augmented_views_and_validation_never_does():
    from fashion_tagging.train import _top_dataset

    photos = np.zeros((64, 2, 2, 3), np.float16)
    view = np.ones((64, 2, 2, 3), np.float16)
    labels = {"articleType": np.zeros(64, np.int64)}
    seen = np.concatenate([np.asarray(x)[:, 0, 0, 0] for x, _, _ in
                           _top_dataset(photos, labels, batch_size=16, training=True, seed=3, views=[view])])
    assert len(seen) == 64 and 10 < seen.sum() < 54  # about half the rows came from the view
    validation = np.concatenate([np.asarray(x) for x, _, _ in
                                 _top_dataset(photos, labels, batch_size=16, training=False, seed=3, views=[view])])
    assert len(validation) == 64 and not validation.any()


def test_training_caches_each_augmented_view_once_and_reuses_it(tiny_artifact, tiny_settings_factory, monkeypatch):
    import json

    import fashion_tagging.features as features
    from fashion_tagging.train import augmented_views

    settings = tiny_settings_factory()
    config = json.loads((tiny_artifact / "config.json").read_text())
    assert config["augmentation"]["augmented_views"] == settings.augmented_views == 1
    view = AugmentedView(0, settings.seed)
    assert FeatureStore(store_dir(settings.cache_dir, settings.backbone, settings.image_size, view)).shards()

    products = load_kaggle_catalog(settings.data_dir).products
    rows = products[products["split"] == "train"].reset_index(drop=True)
    photos = catalog_image_embeddings(rows["id"], rows["image_path"].tolist(), backbone_name=settings.backbone,
                                      image_size=settings.image_size, cache_dir=settings.cache_dir, progress=False,
                                      with_top_inputs=True)

    def embed_again(*args, **kwargs):
        raise AssertionError("a retrain re-embedded an augmented view the cache holds")

    monkeypatch.setattr(features, "embed_image_files", embed_again)
    (cached,) = augmented_views(settings, rows, photos, with_top_inputs=True, progress=False)
    assert np.array_equal(cached.has_image, photos.has_image)
    with_image = photos.has_image
    # The views are other pixels than the photos: their embeddings differ.
    assert not np.allclose(cached.vectors[with_image], photos.vectors[with_image])


def test_text_expert_keeps_the_evidence_of_a_misspelled_word():
    from fashion_tagging.text_expert import fit_text_expert, predict_text_expert, word_char_ngrams
    import tensorflow as tf

    grams = [g.decode() for g in word_char_ngrams(tf.constant(["blue shirt"])).numpy()[0]]
    assert "<bl" in grams and "irt>" in grams and "<shir" in grams

    rng = np.random.default_rng(0)
    colours = ["red", "blue", "black", "white", "green", "grey"]
    texts, labels = [], []
    for _ in range(300):
        texts.append(f"{rng.choice(colours)} cotton tshirt for men")
        labels.append(0)
        texts.append(f"{rng.choice(colours)} leather sandals for men")
        labels.append(1)
    expert = fit_text_expert(texts, np.array(labels), 2, seed=0)
    # Whole-word vocabularies see neither typo: only character n-grams tell the classes apart.
    probabilities = predict_text_expert(expert, ["tshrit", "sandlas"], batch_size=8)
    assert list(probabilities.argmax(axis=1)) == [0, 1]


@pytest.mark.parametrize("family", ["rotation", "jpeg"])
def test_robustness_benchmark_perturbs_photos_the_same_way_every_run(family):
    """The benchmark's perturbations depend on the product, never on the model or the run."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "robustness", Path(__file__).resolve().parent.parent / "benchmarks" / "robustness.py")
    robustness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(robustness)
    strength = 10
    one = np.asarray(robustness.perturbed_photo(family, strength, _photo(), 3))
    two = np.asarray(robustness.perturbed_photo(family, strength, _photo(), 3))
    assert np.array_equal(one, two) and not np.array_equal(one, np.asarray(_photo()))
    rows = pd.DataFrame({"id": [1, 2], "productDisplayName": ["Blue cotton shirt", "Black shoes"],
                         "description": ["soft", ""]})
    first = robustness.setting_texts(rows, "spelling", 0.5, 1, 1, seed=0)
    assert first == robustness.setting_texts(rows, "spelling", 0.5, 1, 1, seed=0)
