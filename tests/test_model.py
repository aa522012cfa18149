"""The fused model: encoders, building, a real tiny train, save/load round trip, missing modalities."""

import json
from pathlib import Path

import numpy as np

from fashion_tagging.artifacts import Tagger
from fashion_tagging.images import ImageDecodeError, decode_image
from fashion_tagging.model import OTHER_LABEL, LabelMap, TextEncoder, build_head_model
from fashion_tagging.settings import HEADS, PRIMARY_HEAD, PRODUCT_EMBEDDING_DIM
from tests.fixtures_data import DATA_DIR

import pytest


def test_label_map_folds_rare_classes_into_other_and_never_invents_labels():
    labels = LabelMap.fit(["Tshirts"] * 5 + ["Shirts"] * 3 + ["Ipad"], min_count=3)
    assert labels.labels == ["Shirts", "Tshirts", OTHER_LABEL]
    assert list(labels.encode(["Tshirts", "Ipad", "Never seen", ""])) == [1, 2, 2, -1]


def test_text_encoder_pads_to_fixed_length_and_marks_empty_text():
    encoder = TextEncoder.fit(["blue cotton tshirt", "black leather shoes"], sequence_length=100, max_tokens=50)
    tokens = encoder.encode(["blue shoes", ""])
    assert tokens.shape == (2, 100)
    assert tokens[0, 0] > 1 and tokens[0, 2] == 0
    assert tokens[1, 0] == 1 and not tokens[1, 1:].any()  # empty text: one OOV token, never fully masked


def test_texts_are_read_from_a_catalog_column_a_batch_at_a_time():
    """A Series (Arrow-backed, as the catalog loads it) and a list read alike, in batches, missing as ""."""
    import pandas as pd

    from fashion_tagging.model import text_batches, texts_present

    texts = ["blue cotton tshirt", None, "black leather shoes", "  ", "red dress"]
    series = pd.Series(texts, dtype="string")
    assert list(text_batches(series, 2)) == [["blue cotton tshirt", ""], ["black leather shoes", "  "], ["red dress"]]
    assert list(text_batches(texts, 2)) == list(text_batches(series, 2))
    positions = np.array([4, 0])
    assert list(text_batches(series, 1, positions)) == list(text_batches(texts, 1, positions)) == [["red dress"],
                                                                                                  ["blue cotton tshirt"]]
    assert texts_present(series).tolist() == [True, False, True, False, True]
    encoder = TextEncoder.fit(series, sequence_length=8, max_tokens=50)
    wide, narrow = encoder.encode(texts), encoder.encode(series, np.int32)
    assert wide.dtype == np.int64 and narrow.dtype == np.int32 and np.array_equal(wide, narrow)


def test_head_model_has_every_head_and_the_product_embedding():
    model = build_head_model({"articleType": 7, "gender": 3}, vocabulary_size=50)
    outputs = model({"image_embedding": np.zeros((2, 1280), "float32"), "has_image": np.ones((2, 1), "float32"),
                     "tokens": np.ones((2, 100), "int64"), "has_text": np.ones((2, 1), "float32")})
    assert outputs["articleType"].shape == (2, 7)
    assert np.allclose(np.asarray(outputs["gender"]).sum(axis=1), 1.0, atol=1e-5)
    assert outputs["product_embedding"].shape == (2, PRODUCT_EMBEDDING_DIM)


def test_training_batches_group_text_lengths_and_trimmed_padding_changes_no_output():
    from fashion_tagging.model import model_inputs
    from fashion_tagging.train import TEXT_BUCKET_WIDTH, make_dataset

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 101, size=300)
    tokens = np.zeros((300, 100), np.int64)
    for row, length in enumerate(lengths):
        tokens[row, :length] = rng.integers(2, 50, size=length)
    inputs = model_inputs(rng.normal(size=(300, 1280)), np.ones(300), tokens, np.ones(300))
    labels = {"articleType": rng.integers(0, 7, size=300), "image_articleType": np.zeros(300, np.int64),
              "text_articleType": np.zeros(300, np.int64)}
    seen = 0
    for x, _, _ in make_dataset(inputs, labels, batch_size=16, training=True, seed=1):
        kept = np.asarray(x["tokens"])
        batch_lengths = (kept > 0).sum(axis=1)
        assert kept.shape[1] % TEXT_BUCKET_WIDTH == 0 and batch_lengths.max() <= kept.shape[1]
        # One length bucket per batch (a dropped text is one token long: the shortest bucket).
        buckets = (batch_lengths - 1) // TEXT_BUCKET_WIDTH
        assert buckets.min() == buckets.max() and kept.shape[1] == (buckets[0] + 1) * TEXT_BUCKET_WIDTH
        seen += len(kept)
    assert seen == 300  # every product, once per epoch

    model = build_head_model({"articleType": 7}, vocabulary_size=50)
    short = {name: values[lengths <= 40] for name, values in inputs.items()}
    full = model.predict(short, verbose=0)
    trimmed = model.predict(short | {"tokens": short["tokens"][:, :40]}, verbose=0)
    assert np.allclose(full["articleType"], trimmed["articleType"], atol=1e-6)
    assert np.allclose(full["product_embedding"], trimmed["product_embedding"], atol=1e-5)


def test_tiny_train_artifact_round_trip_and_missing_modalities(tiny_artifact, kaggle_slice_dir):
    files = {p.name for p in tiny_artifact.iterdir()}
    assert {"model.keras", "config.json", "vocabulary.json", "labels.json", "metrics.json", "report.md",
            f"confusion_{PRIMARY_HEAD}.png", "text_expert.keras"} <= files
    metrics = json.loads((tiny_artifact / "metrics.json").read_text())["test"]
    assert set(metrics["modes"]) == {"fused", "image_only", "text_only"}
    assert set(metrics["modes"]["fused"]) == set(HEADS)
    # On 12 frequent classes even a 3-epoch model is far better than chance (1/12).
    assert metrics["modes"]["fused"][PRIMARY_HEAD]["accuracy"] > 0.5

    tagger = Tagger.load(tiny_artifact)
    image = decode_image((DATA_DIR / "images" / "15970.jpg").read_bytes(), tagger.image_size)
    title = "Turtle Check Men Navy Blue Shirt"
    preds = tagger.predict([image, image, None], [title, "", title])
    known = set(tagger.label_maps[PRIMARY_HEAD].labels)
    assert set(preds.labels[PRIMARY_HEAD]) <= known
    assert preds.has_image.tolist() == [True, True, False]
    assert preds.has_text.tolist() == [True, False, True]
    assert not preds.image_embeddings[2].any() and preds.image_embeddings[0].any()
    assert np.allclose(np.linalg.norm(preds.product_embeddings, axis=1), 1.0, atol=1e-4)
    assert len(preds.top_k[PRIMARY_HEAD][0]) == 3
    # Reloading gives identical predictions: the artifact is self-contained.
    again = Tagger.load(tiny_artifact).predict([image], [title])
    assert np.allclose(again.confidences[PRIMARY_HEAD], preds.confidences[PRIMARY_HEAD][:1], atol=1e-5)

    # A text in a text condition (here: at least half its words unknown) takes the condition's blend
    # weights; the other texts keep their situation's, whatever the condition's weights are.
    assert isinstance(json.loads((tiny_artifact / "config.json").read_text())["text_condition_thresholds"], dict)
    garbled = "Trtule Chekc Mne Nvay Bleu Shrit"
    base, conditioned = Tagger.load(tiny_artifact), Tagger.load(tiny_artifact)
    base.config["text_condition_thresholds"] = {}
    conditioned.config["text_condition_thresholds"] = {"noisy_text": 0.5}
    conditioned.config["primary_blend"] = {**conditioned.config["primary_blend"], "both_noisy_text": [8.0, 0.0, 8.0]}
    assert conditioned.config["primary_blend"]["both"] != [8.0, 0.0, 8.0]
    plain, blended = (t.predict([image, image], [title, garbled]).confidences[PRIMARY_HEAD] for t in (base, conditioned))
    assert np.isclose(plain[0], blended[0], atol=1e-6) and not np.isclose(plain[1], blended[1], atol=1e-3)


def test_decode_image_rejects_corrupt_bytes_clearly():
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(b"\xff\xd8\xff\xe0 not a jpeg", 64)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", 64)
    image = decode_image((DATA_DIR / "images" / "15970.jpg").read_bytes(), 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert (image[:, 0] == 255).all()  # portrait photo: white padding left and right


def test_fitted_photos_are_the_pillow_canvas_rule_pixel_for_pixel():
    """The feature store holds vectors of photos fitted by this rule: padding in numpy must give the
    very pixels a bilinear resize pasted on a white Pillow canvas gives, whatever the photo's shape."""
    from PIL import Image

    from fashion_tagging.images import PAD_VALUE, to_model_size

    rng = np.random.default_rng(0)
    for height, width, size in ((80, 60, 224), (60, 80, 224), (33, 101, 160), (224, 224, 192), (7, 5, 32)):
        photo = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        scale = min(size / height, size / width)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (size, size), (int(PAD_VALUE),) * 3)
        canvas.paste(Image.fromarray(photo).resize(new_size, Image.Resampling.BILINEAR),
                     ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
        assert np.array_equal(to_model_size(photo, size), np.asarray(canvas))


def test_fine_tuned_backbone_travels_with_the_artifact(tiny_settings_factory):
    from fashion_tagging.backbones import build_backbone
    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.train import train

    settings = tiny_settings_factory(epochs=1, fine_tune_epochs=1, image_size=32)
    products = load_kaggle_catalog(settings.data_dir).products.groupby("split").head(40).reset_index(drop=True)
    result = train(settings, products=products, progress=False, fine_tune=True)
    assert (result.artifact_dir / "backbone.weights.h5").is_file()
    tagger = Tagger.load(result.artifact_dir)
    assert tagger.config["fine_tuned"] is True
    image = np.full((80, 60, 3), 200, np.uint8)
    tuned, _ = tagger.image_embeddings([image])
    pretrained = np.asarray(build_backbone(settings.backbone, 32).predict_on_batch(np.full((1, 32, 32, 3), 200.0)))
    assert not np.allclose(tuned, pretrained, atol=1e-6)  # the fine-tuned weights, not the ImageNet ones


def test_top_fine_tuning_trains_only_the_last_block_and_tagging_reproduces_it(tiny_settings_factory):
    """"top" mode trains above the cut on cached activations; the artifact's backbone must match that."""
    from fashion_tagging.backbones import TOP_CUT_LAYER, backbone_top, build_backbone, with_top_inputs_output
    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.train import train

    settings = tiny_settings_factory(epochs=1, top_tune_epochs=1)
    products = load_kaggle_catalog(settings.data_dir).products.groupby("split").head(60).reset_index(drop=True)
    result = train(settings, products=products, progress=False, fine_tune="top")
    # The CPU engine's float32 export, built by training from the tuned backbone (int8 is compared
    # with Keras on accuracy, not on values: test_engines.py).
    tagger = Tagger.load(result.artifact_dir, engine="litert", quantization="float32")
    assert tagger.config["fine_tune_mode"] == "top" and tagger.config["backbone_top_epochs_run"] == 2
    assert "backbone_top" in json.loads((result.artifact_dir / "history.json").read_text())

    pretrained = build_backbone(settings.backbone, settings.image_size)
    names = [layer.name for layer in pretrained.layers]
    cut = names.index(TOP_CUT_LAYER)
    for index, (before, after) in enumerate(zip(pretrained.layers, tagger.backbone.layers, strict=True)):
        same = all(np.array_equal(a, b) for a, b in zip(before.get_weights(), after.get_weights(), strict=True))
        if index <= cut or isinstance(before, __import__("keras").layers.BatchNormalization):
            assert same, f"{before.name} is below the cut (or a BatchNorm) and must stay frozen"
    assert not np.allclose(pretrained.get_layer("top_conv").get_weights()[0],
                           tagger.backbone.get_layer("top_conv").get_weights()[0])

    # Tagging runs the whole tuned backbone on pixels; training ran its top on cached activations.
    pixels = decode_image((DATA_DIR / "images" / "15970.jpg").read_bytes(), settings.image_size)[None].astype("float32")
    _, activations = with_top_inputs_output(pretrained).predict_on_batch(pixels)
    from_cache = backbone_top(tagger.backbone).predict_on_batch(np.asarray(activations, np.float16).astype("float32"))
    end_to_end, _ = tagger.image_embeddings([pixels[0].astype(np.uint8)])
    assert np.allclose(end_to_end, from_cache, atol=2e-2 * np.abs(end_to_end).max())


def test_hybrid_fusion_blend_is_picked_on_val_and_never_lets_a_missing_modality_vote():
    from fashion_tagging.model import blend_primary, choose_blend

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 200)
    confident = np.eye(4)[truth] * 0.9 + 0.025  # always right
    noisy = 0.5 * rng.dirichlet(np.ones(4), 200) + 0.125  # right ~1/4 of the time, never very sure
    has_image = np.ones(200, bool)
    has_text = np.ones(200, bool)
    has_text[:50] = False
    outputs = {s: {PRIMARY_HEAD: noisy, f"text_{PRIMARY_HEAD}": confident} for s in ("both", "image_only", "text_only")}
    blend, report = choose_blend(outputs, noisy, has_image, has_text, truth)
    assert blend["both"][0] > 0 and report["both"]["blended"] == 1.0  # the good text head is blended in
    assert blend["image_only"] == [0.0, 0.0, 0.0]  # the noisy expert gains nothing there: plain fused softmax kept
    assert report["image_only"]["products"] == 200 and report["text_only"]["products"] == 150

    # A text expert that is always right is picked where there is text, never where there is none.
    quiet = {s: {PRIMARY_HEAD: noisy, f"text_{PRIMARY_HEAD}": noisy} for s in outputs}
    blend, report = choose_blend(quiet, None, has_image, has_text, truth, text_expert=confident)
    assert blend["both"][2] > 0 and report["both"]["blended"] == 1.0
    assert blend["image_only"] == [0.0, 0.0, 0.0]

    # With no text, neither the text head nor the text expert votes, whatever their weights.
    probs = blend_primary(noisy, confident, None, has_image, np.zeros(200, bool), {"image_only": [2.0, 0.0, 2.0]},
                          text_expert=confident)
    assert np.allclose(probs, noisy / noisy.sum(axis=1, keepdims=True))
    # Blends saved before the text expert existed ([wt, wi]) still apply.
    old = blend_primary(noisy, confident, None, has_image, has_text, {"both": [1.0, 0.0]}, text_expert=confident)
    assert np.allclose(old, blend_primary(noisy, confident, None, has_image, has_text, {"both": [1.0, 0.0, 0.0]}))


def test_texts_in_a_condition_get_weights_of_their_own_chosen_on_val_without_costing_clean_texts():
    from fashion_tagging.model import (blend_primary, choose_blend, choose_text_condition_blend, text_conditions,
                                       unknown_word_share)

    # 1 is the unknown-word id, 0 padding: two of three words unknown; an empty text is all unknown.
    tokens = np.array([[5, 1, 1, 0], [1, 0, 0, 0], [4, 6, 7, 0]])
    assert np.allclose(unknown_word_share(tokens), [2 / 3, 1.0, 0.0])
    # Conditions in precedence order: a noisy text is not also a short one, nor a weak one (a text its
    # text head is unsure of: top probability below the threshold).
    text_head = np.array([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45]])
    masks = text_conditions(tokens, {"noisy_text": 0.5, "short_text": 3}, text_head)
    assert masks["noisy_text"].tolist() == [True, True, False] and masks["short_text"].tolist() == [False, False, True]
    masks = text_conditions(tokens, {"noisy_text": 0.5, "weak_text": 0.7}, text_head)
    assert masks["weak_text"].tolist() == [False, False, True]
    assert text_conditions(tokens, {}, text_head) == {} and text_conditions(tokens, None, text_head) == {}

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, 200)
    right = np.eye(4)[truth] * 0.9 + 0.025
    unsure = 0.5 * rng.dirichlet(np.ones(4), 200) + 0.125
    has_image, has_text = np.ones(200, bool), np.ones(200, bool)
    # Clean texts: the head model is right and the text expert adds nothing. With typos (a third of the
    # words unknown) the head model is lost while the text expert (character n-grams) is still right.
    clean = {s: {PRIMARY_HEAD: right, f"text_{PRIMARY_HEAD}": right} for s in ("both", "image_only", "text_only")}
    noisy = {s: {PRIMARY_HEAD: unsure, f"text_{PRIMARY_HEAD}": unsure} for s in ("both", "text_only")}
    clean_tokens = np.tile([4, 5, 6, 7, 8, 9], (200, 1))
    noisy_tokens = np.tile([4, 1, 6, 1, 8, 9], (200, 1))
    blend, _ = choose_blend(clean, unsure, has_image, has_text, truth, unsure)
    assert blend["both"] == [0.0, 0.0, 0.0]
    threshold, weights, report = choose_text_condition_blend("noisy_text", blend, {}, clean, noisy, unsure, has_image,
                                                             has_text, truth, clean_tokens, noisy_tokens, unsure, right)
    assert threshold is not None and weights["both_noisy_text"][2] > 0 and weights["text_only_noisy_text"][2] > 0
    assert report["after"]["both_changed"] == 1.0 > report["before"]["both_changed"]
    assert report["after"]["both_clean"] == report["before"]["both_clean"] == 1.0
    assert report["share_of_changed_copy"] == 1.0 and report["share_of_clean_copy"] == 0.0

    # At inference only the texts in the condition take those weights; a blend without them ignores it.
    full = {**blend, **weights}
    conditions = {"noisy_text": np.arange(200) < 100}
    probs = blend_primary(unsure, unsure, unsure, has_image, has_text, full, right, conditions=conditions)
    assert (probs[:100].argmax(axis=1) == truth[:100]).all()
    assert np.allclose(probs[100:], unsure[100:] / unsure[100:].sum(axis=1, keepdims=True))
    assert np.allclose(blend_primary(unsure, unsure, unsure, has_image, has_text, blend, right, conditions=conditions),
                       blend_primary(unsure, unsure, unsure, has_image, has_text, blend, right))

    # A weak text (the copy's words all known, its text head unsure, as with a description alone) gets
    # weights of its own too; clean texts, whose text head is sure, keep theirs.
    weak_threshold, weak, report = choose_text_condition_blend("weak_text", blend, {}, clean, noisy, unsure, has_image,
                                                               has_text, truth, clean_tokens, clean_tokens, unsure, right)
    assert weak_threshold is not None and weak["both_weak_text"][2] > 0
    assert report["after"]["text_only_changed"] == 1.0 > report["before"]["text_only_changed"]
    assert report["share_of_changed_copy"] == 1.0 and report["share_of_clean_copy"] == 0.0

    # A later condition leaves the earlier one's texts alone: short texts that are also noisy keep
    # the noisy weights, and with every changed text taken nothing is left to gain.
    threshold, weights, _ = choose_text_condition_blend("short_text", full, {"noisy_text": threshold}, clean, noisy,
                                                        unsure, has_image, has_text, truth, clean_tokens, noisy_tokens,
                                                        unsure, right)
    assert threshold is None and weights == {}

    # Weights that would cost clean texts are not taken: here the clean texts have as many unknown
    # words as the noisy ones, the head model is only mildly sure of them (its text head not at all)
    # and the text expert, sure and wrong, would outvote it at any weight.
    mild, flat = np.eye(4)[truth] * 0.2 + 0.2, np.full((200, 4), 0.25)
    mild_clean = {s: {PRIMARY_HEAD: mild, f"text_{PRIMARY_HEAD}": flat} for s in ("both", "image_only", "text_only")}
    wrong = np.roll(np.eye(4)[truth] * 0.96 + 0.01, 1, axis=1)
    blend, _ = choose_blend(mild_clean, None, has_image, has_text, truth, wrong)
    threshold, weights, _ = choose_text_condition_blend("noisy_text", blend, {}, mild_clean, noisy, None, has_image,
                                                        has_text, truth, noisy_tokens, noisy_tokens, wrong, right)
    assert threshold is None and weights == {}


def test_text_expert_learns_from_text_alone_and_survives_a_round_trip(tmp_path):
    import keras

    from fashion_tagging.text_expert import fit_text_expert, predict_text_expert

    texts = ["nike men blue running shoes", "puma women red tshirt", "adidas men black sports shoes",
             "roadster women white tshirt", "", "reebok men grey running shoes", "mango women tshirt",
             "hrx women yellow tshirt"] * 200
    labels = np.array([0, 1, 0, 1, 1, 0, -1, 1] * 200)  # "" and the unlabelled product never train it
    expert = fit_text_expert(texts, labels, num_classes=2, seed=0)
    probs = predict_text_expert(expert, ["reebok men black running shoes", "mango women red tshirt", None], batch_size=2)
    assert probs.shape == (3, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert probs[0].argmax() == 0 and probs[1].argmax() == 1
    expert.save(tmp_path / "text_expert.keras")
    again = keras.saving.load_model(tmp_path / "text_expert.keras", compile=False)
    assert np.allclose(predict_text_expert(again, ["reebok men black running shoes"], batch_size=2), probs[:1], atol=1e-6)
    assert fit_text_expert(["", "  "], np.array([0, 1]), num_classes=2, seed=0) is None


def test_text_expert_training_rows_are_written_to_disk_and_read_back_a_batch_at_a_time(tmp_path):
    """The expert trains from rows on disk, never from the whole matrix, and reads them without mapping
    them into the process: each batch read is exactly what vectorizing those texts in memory gives."""
    import keras
    import tensorflow as tf

    from fashion_tagging.text_expert import training_batches, vectorize_to_disk, word_char_ngrams

    texts = ["nike men blue running shoes", "puma women red tshirt and a longer description of it",
             "x", "adidas men black sports shoes", "roadster women white tshirt"] * 3
    words = keras.layers.TextVectorization(max_tokens=50, ngrams=2, output_mode="tf_idf")
    words.adapt(texts)
    chars = keras.layers.TextVectorization(max_tokens=200, output_mode="int", split=word_char_ngrams)
    chars.adapt(texts)
    rows = vectorize_to_disk(words, chars, [texts[:4], texts[4:11], texts[11:]], tmp_path)
    assert len(rows) == len(texts)
    chosen = np.array([7, 2, 0, 13])
    batch = rows.batch(chosen)
    expected_tfidf = words(np.array(texts)[chosen]).numpy()
    assert np.allclose(tf.sparse.to_dense(batch["tfidf"]).numpy(), expected_tfidf)
    expected_ids = chars(np.array(texts)[chosen]).numpy()
    width = batch["char_ngrams"].shape[1]
    assert np.array_equal(batch["char_ngrams"], expected_ids[:, :width]) and not expected_ids[:, width:].any()

    labels = np.arange(len(texts))
    data = training_batches(rows, labels, batch_size=4, seed=0)
    epochs = [np.concatenate([y.numpy() for _, y in data]) for _ in range(2)]
    assert all(sorted(seen) == list(labels) for seen in epochs)  # every row once per epoch
    assert not np.array_equal(epochs[0], epochs[1])  # in a new order
    mapped = Path("/proc/self/maps").read_text()
    assert str(tmp_path) not in mapped  # read, never memory-mapped: no page of them stays in the process
    with pytest.raises(IndexError):
        rows.tfidf.columns.ranges(np.array([len(rows.tfidf.columns) - 1]), np.array([2]))
    rows.close()


def test_choices_after_fitting_use_a_bounded_sample_of_val():
    from fashion_tagging.train import VAL_DECISION_PRODUCTS, val_decision_sample

    assert np.array_equal(val_decision_sample(4378, seed=0), np.arange(4378))  # a catalog like this one: all of val
    sample = val_decision_sample(10 * VAL_DECISION_PRODUCTS, seed=0)
    assert len(sample) == VAL_DECISION_PRODUCTS and np.all(np.diff(sample) > 0)  # distinct rows, in val order
    assert np.array_equal(sample, val_decision_sample(10 * VAL_DECISION_PRODUCTS, seed=0))


def test_max_batches_per_epoch_caps_every_pass_and_unset_caps_none():
    import tensorflow as tf

    from fashion_tagging.model import capped

    batches = tf.data.Dataset.range(10).batch(2)
    assert [len(b) for b in capped(batches, 3)] == [2, 2, 2]
    assert len(list(capped(batches, None))) == len(list(capped(batches, 50))) == 5
