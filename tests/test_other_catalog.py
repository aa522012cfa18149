"""Training makes no assumption about the catalog: other category names, no season/usage, other photos.

A tiny catalog unlike the Kaggle one (built here, so it needs nothing from ``../shared``):
its own articleType/subCategory/colour names, no ``season`` column, an all-empty ``usage``
column, one ``masterCategory`` for every product (a single class), and 300x200 photos, some
PNG, some JPEG. It trains for one epoch; the model has only the heads the labels support,
and tagging and evaluation run on those heads with no code change.
"""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fashion_tagging.settings import PRIMARY_HEAD, get_settings
from tests.fixtures_services import tag_and_embedding_rows

FIRST_ID = 7_310_000  # far from the real catalog's ids
KINDS = {  # articleType -> (subCategory, shape drawn on the photo)
    "Blouse": ("Tops", "rectangle"),
    "Sneaker": ("Footwear", "ellipse"),
    "Handbag": ("Bags", "triangle"),
}
COLOURS = {"Crimson": (200, 20, 40), "Teal": (0, 128, 128), "Ochre": (204, 119, 34)}
SPLITS = {"train": 24, "val": 9, "test": 9}
PHOTO_SIZE = (300, 200)  # width x height: landscape, unlike the Kaggle portraits
EXPECTED_HEADS = ["articleType", "subCategory", "gender", "baseColour"]
LEFT_OUT = {"masterCategory", "season", "usage"}


def _photo(kind: str, colour: str) -> Image.Image:
    image = Image.new("RGB", PHOTO_SIZE, (250, 250, 250))
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    shape = KINDS[kind][1]
    if shape == "rectangle":
        draw.rectangle((90, 30, 210, 170), fill=fill)
    elif shape == "ellipse":
        draw.ellipse((40, 60, 260, 150), fill=fill)
    else:
        draw.polygon([(150, 20), (60, 180), (240, 180)], fill=fill)
    return image


def write_other_catalog(root) -> list[dict]:
    """A Kaggle-layout folder (styles.csv, split.csv, images/) whose taxonomy is not the Kaggle one."""
    (root / "images").mkdir(parents=True)
    rows, split_rows = [], []
    kinds, colours = list(KINDS), list(COLOURS)
    index = 0
    for split, count in SPLITS.items():
        for _ in range(count):
            pid = FIRST_ID + index
            kind, colour = kinds[index % 3], colours[(index // 3) % 3]
            gender = ("Female", "Male")[index % 2]
            rows.append({"id": pid, "gender": gender, "masterCategory": "Fashion", "subCategory": KINDS[kind][0],
                         "articleType": kind, "baseColour": colour, "year": "2024", "usage": "",
                         "productDisplayName": f"{colour} {kind.lower()} for {gender.lower()}"})
            split_rows.append((pid, split))
            if index != 5:  # one product has no photo at all
                photo = _photo(kind, colour)
                if index % 2:
                    photo.save(root / "images" / f"{pid}.png")
                else:
                    photo.save(root / "images" / f"{pid}.jpg", quality=90)
            index += 1
    columns = ["id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "year", "usage",
               "productDisplayName"]  # no "season" column at all
    with (root / "styles.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    with (root / "split.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("id", "split"), *split_rows])
    return rows


@pytest.fixture(scope="module")
def other_catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("other-catalog")
    write_other_catalog(root)
    return root


def _settings(home, data_dir):
    # Own home: its models and embedding cache never mix with the Kaggle slice's (FT_HOME, from
    # ft_home, still holds the converted backbone weights every test shares).
    return get_settings(home=home, data_dir=data_dir, image_size=64, epochs=1, top_tune_epochs=1, batch_size=16,
                        inference_batch_size=32, vocabulary_size=500)


def test_catalog_without_some_heads_trains_tags_and_evaluates_on_the_heads_it_has(
        other_catalog, ft_home, tmp_path, caplog):
    from fashion_tagging.artifacts import Tagger
    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.evaluate import evaluate
    from fashion_tagging.images import decode_image, to_model_size
    from fashion_tagging.train import train

    load = load_kaggle_catalog(other_catalog)
    products = load.products
    assert not load.errors and len(products) == sum(SPLITS.values())
    assert products["image_path"].notna().sum() == len(products) - 1
    assert products["image_path"].dropna().str.endswith(".png").any()  # PNG photos are found too
    assert (products["season"] == "").all() and (products["usage"] == "").all()

    settings = _settings(tmp_path / "home", other_catalog)
    with caplog.at_level(logging.WARNING, logger="fashion_tagging.train"):
        result = train(settings, products=products, progress=False, fine_tune="top")
    for head in LEFT_OUT:
        assert any(f"head '{head}' left out of the model" in r.getMessage() for r in caplog.records), head

    config = json.loads((result.artifact_dir / "config.json").read_text())
    assert config["heads"] == EXPECTED_HEADS
    assert set(config["heads_left_out"]) == LEFT_OUT
    assert "fewer than 2 classes" in config["heads_left_out"]["masterCategory"]
    assert config["fine_tune_mode"] == "top"  # the image expert was built on the same heads
    labels = json.loads((result.artifact_dir / "labels.json").read_text())
    assert list(labels) == EXPECTED_HEADS and set(labels[PRIMARY_HEAD]) == set(KINDS)

    tagger = Tagger.load(result.artifact_dir)
    assert tagger.heads == tuple(EXPECTED_HEADS)
    photo = products.dropna(subset=["image_path"]).iloc[0]
    with open(photo["image_path"], "rb") as handle:
        decoded = decode_image(handle.read(), tagger.image_size)
    raw = np.asarray(Image.open(photo["image_path"]).convert("RGB"))  # 200x300, not the model's size
    assert raw.shape == (200, 300, 3)
    preds = tagger.predict([decoded, raw, None], [photo["text"], "", "teal sneaker for men"])
    assert set(preds.labels) == set(EXPECTED_HEADS)
    assert set(preds.labels[PRIMARY_HEAD]) <= set(KINDS)
    assert preds.has_image.tolist() == [True, True, False] and preds.image_embeddings[1].any()
    # The raw 300x200 photo is resized like the decoded one (aspect kept, white bands above and below).
    resized = to_model_size(raw, tagger.image_size)
    assert resized.shape == decoded.shape == (64, 64, 3)
    assert (resized[0] >= 250).all() and (decoded[0] >= 250).all() and (decoded[-1] >= 250).all()
    assert np.abs(resized.astype(int) - decoded.astype(int)).max() <= 2  # Pillow (stores) and TF (arrays) agree

    # What the nightly job would store: the heads JSON holds the model's heads, nothing else.
    tag_rows, _ = tag_and_embedding_rows(tagger.version, "run", [1, 2, 3], preds)
    assert all(set(row[4]) == set(EXPECTED_HEADS) for row in tag_rows)

    report = evaluate(result.artifact_dir, settings, products=products, progress=False)
    assert set(report["modes"]["fused"]) == set(EXPECTED_HEADS)
    assert set(report["heads_left_out"]) == LEFT_OUT
    assert "not in the model" in (result.artifact_dir / "report.md").read_text()


def test_no_primary_labels_fails_before_any_photo_is_embedded(other_catalog, tmp_path, monkeypatch):
    import fashion_tagging.train as train_module
    from fashion_tagging.catalog import load_kaggle_catalog

    def no_embedding(*args, **kwargs):
        raise AssertionError("photos were embedded before the heads were checked")

    monkeypatch.setattr(train_module, "catalog_image_embeddings", no_embedding)
    products = load_kaggle_catalog(other_catalog).products
    settings = _settings(tmp_path / "home", other_catalog)
    with pytest.raises(ValueError, match="primary head 'articleType' has no usable labels"):
        train_module.train(settings, products=products.assign(articleType=""), progress=False)
    one_class = products.assign(articleType="Blouse")
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        train_module.train(settings, products=one_class, progress=False)
    # A frame without the column at all (not read by the Kaggle loader) fails the same way.
    with pytest.raises(ValueError, match="primary head"):
        train_module.train(settings, products=products.drop(columns=["articleType"]), progress=False)


def test_a_catalog_train_loads_itself_is_released_once_split(other_catalog, tmp_path, monkeypatch):
    """Given a loader rather than a frame, training keeps only the columns it reads: the catalog frame
    is gone before the first photo is embedded (at a million products it is ~1.5 GB)."""
    import gc
    import weakref

    import fashion_tagging.train as train_module
    from fashion_tagging.catalog import load_kaggle_catalog

    loaded = []

    def catalog():
        frame = load_kaggle_catalog(other_catalog).products
        loaded.append(weakref.ref(frame))
        return frame

    class Embedding(Exception):
        pass

    def embedding(*args, **kwargs):
        gc.collect()
        assert len(loaded) == 1 and loaded[0]() is None, "the catalog frame outlived the split"
        raise Embedding

    monkeypatch.setattr(train_module, "catalog_image_embeddings", embedding)
    with pytest.raises(Embedding):
        train_module.train(_settings(tmp_path / "home", other_catalog), products=catalog, progress=False)


def test_heads_come_from_the_train_labels():
    import pandas as pd

    from fashion_tagging.train import fit_heads

    rows = pd.DataFrame({"articleType": ["A", "A", "B", "B", "C"], "gender": ["X"] * 5,
                         "baseColour": ["", "", "", "", ""], "usage": [None, np.nan, "Party", "", ""]})
    label_maps, left_out = fit_heads(rows, min_class_count=2)
    assert list(label_maps) == ["articleType"] and label_maps["articleType"].labels == ["A", "B", "Other"]
    assert set(left_out) == {"subCategory", "masterCategory", "gender", "baseColour", "season", "usage"}
    assert "no such column" in left_out["season"] and "fewer than 2 classes" in left_out["gender"]
