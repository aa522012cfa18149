"""Spelling correction: unknown words read as the vocabulary word they were meant to be."""

from __future__ import annotations

import numpy as np

from fashion_tagging.spelling import SpellingCorrector, correction_config, corrector_for

VOCABULARY = ["", "[UNK]", "men", "blue", "shirts", "shirt", "jeans", "watch", "tshirts", "2024"]


def test_unknown_words_are_corrected_and_everything_else_left_alone():
    corrector = SpellingCorrector(VOCABULARY, max_distance=1)
    assert corrector.correct("Men Blue Shrits") == "Men Blue shirts"  # a swap of neighbours is one edit
    assert corrector.correct("Blue Jans") == "Blue jeans"  # a dropped letter
    assert corrector.correct("Men Blue Jeans, watch!") == "Men Blue Jeans, watch!"  # known (as the vectorizer reads)
    assert corrector.correct("T-Shrits") == "tshirts"  # punctuation stripped as the vectorizer strips it
    assert corrector.correct("Mne Bleu Tee") == "Mne blue Tee"  # words under four letters are left alone
    assert corrector.correct("Xyzzy Plugh 2025") == "Xyzzy Plugh 2025"  # no close match, numbers: unchanged
    assert corrector.correct_all(["Shirst", None, ""]) == ["shirts", "", ""]


def test_a_tie_goes_to_the_more_frequent_word():
    corrector = SpellingCorrector(["", "[UNK]", "shirts", "shorts"], max_distance=1)
    assert corrector.correct("shxrts") == "shirts"  # one substitution from either: the first (most frequent) wins
    assert SpellingCorrector(["", "[UNK]", "shorts", "shirts"]).correct("shxrts") == "shorts"


def test_the_artifact_config_turns_correction_on_and_off():
    assert correction_config(0) is None
    assert corrector_for({}, VOCABULARY) is None
    corrector = corrector_for({"spelling_correction": correction_config(2)}, VOCABULARY)
    assert corrector.max_distance == 2 and corrector.correct("Sihrst") == "shirts"


def test_the_tagger_reads_a_misspelled_text_as_the_corrected_one(tiny_artifact):
    from fashion_tagging.artifacts import Tagger

    tagger = Tagger.load(tiny_artifact, engine="keras")
    assert tagger.spelling is not None and tagger.config["spelling_correction"] == correction_config(1)
    word = typo = None
    for word in (w for w in tagger.text.vocabulary if w.isalpha() and len(w) >= 6):
        typo = word[:2] + word[3] + word[2] + word[4:]
        if typo not in tagger.spelling.known and tagger.spelling.correct(typo) == word:
            break
    else:
        raise AssertionError("no vocabulary word whose swapped-letter typo corrects back to it")
    texts = [f"Men {typo} Blue", f"Men {word} Blue"]
    embeddings = np.zeros((2, tagger.model.get_layer("image_norm").input.shape[-1]), dtype=np.float32)
    predictions = tagger.predict_embeddings(embeddings, np.zeros(2, dtype=bool), texts, keep_probabilities=True)
    primary = tagger.primary_head
    np.testing.assert_allclose(predictions.log_probabilities[primary][0], predictions.log_probabilities[primary][1])
