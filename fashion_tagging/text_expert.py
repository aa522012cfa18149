"""The text expert: a linear softmax over TF-IDF-weighted words and word pairs plus character
n-grams of the words (hybrid fusion).

The fused model reads text through an LSTM over whole words. A bag-of-n-grams linear classifier
makes other mistakes (it weighs every word pair of a title and a long description alike), so the
tagger blends its articleType softmax into the fused one with a weight picked on val, like the image
expert's. On val the word part alone moved fused articleType from 0.9746 to 0.9774 and text-only
from 0.9746 to 0.9769. The TF-IDF matrix is built once, as a sparse tensor, instead of a dense
50,000-wide row per product and epoch (the word part alone trained in about a minute on 2 cores;
with the n-grams and the misspelled copies it took 330 s on the full catalog, with other work
sharing the cores).

Character n-grams (3 to 5 letters of each word, with its boundaries, fastText-style: the mean of
one learned vote vector per n-gram) keep the evidence of a misspelled word: a typo makes a whole
word unknown to a word vocabulary but changes only a few of its n-grams. The expert is also
trained on a misspelled copy of every text (``augment.misspell``).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from fashion_tagging.augment import misspell
from fashion_tagging.progress import epoch_logger

VOCABULARY_SIZE = 50_000  # words and word pairs, fitted on train
NGRAMS = 2
EPOCHS = 3  # val: blended fused 0.9772 after 3 epochs as after 6, text-only 0.9751 vs 0.9737; half the time
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
VECTORIZE_CHUNK = 2048
CHAR_VOCABULARY_SIZE = 100_000  # character n-grams, fitted on train
CHAR_NGRAM_WIDTHS = (3, 4, 5)
CHAR_NGRAM_WORDS = 60  # n-grams of the first words only: the title and the start of the description
MAX_CHAR_NGRAMS = 512  # per text (a 60-word text has about 900; the title's always come first)
# The char votes are a mean over hundreds of n-grams; scaled up so Adam moves them as fast as the words'.
CHAR_VOTE_SCALE = 10.0
TYPO_FRACTION = 0.2  # share of words with a typo in the misspelled training copy of each text


@keras.saving.register_keras_serializable(package="fashion_tagging")
def word_char_ngrams(texts: tf.Tensor) -> tf.RaggedTensor:
    """(N,) standardised texts -> (N, None) character n-grams of their first words, ``<word>``-marked."""
    words = tf.strings.split(texts)[:, :CHAR_NGRAM_WORDS]
    marked = tf.ragged.map_flat_values(lambda w: tf.strings.join(["<", w, ">"]), words)
    grams = tf.strings.ngrams(tf.strings.unicode_split(marked, "UTF-8"), ngram_width=CHAR_NGRAM_WIDTHS, separator="")
    return grams.merge_dims(1, 2)[:, :MAX_CHAR_NGRAMS]


def texts_tensor(texts) -> tf.Tensor:
    """The (N, 1) string tensor the expert model takes; a missing text is the empty string."""
    return tf.constant([t if isinstance(t, str) else "" for t in texts], dtype=tf.string)[:, None]


@keras.saving.register_keras_serializable(package="fashion_tagging")
class MaskedMean(keras.layers.Layer):
    """Mean over a sequence's unmasked steps, 0 when there is none (GlobalAveragePooling1D gives NaN
    for a text without a single n-gram)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        if mask is None:
            return keras.ops.mean(inputs, axis=1)
        weights = keras.ops.expand_dims(keras.ops.cast(mask, inputs.dtype), -1)
        return keras.ops.sum(inputs * weights, axis=1) / keras.ops.maximum(keras.ops.sum(weights, axis=1), 1.0)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def _tfidf_matrix(vectorizer: keras.layers.TextVectorization, texts: list[str]) -> tf.SparseTensor:
    chunks = [tf.sparse.from_dense(vectorizer(tf.constant(texts[i:i + VECTORIZE_CHUNK])))
              for i in range(0, len(texts), VECTORIZE_CHUNK)]
    return tf.sparse.concat(0, chunks)


def _id_matrix(vectorizer: keras.layers.TextVectorization, texts: list[str]) -> np.ndarray:
    """Token ids of every text, zero-padded to the longest (int32: a few hundred per text)."""
    chunks = [vectorizer(tf.constant(texts[i:i + VECTORIZE_CHUNK])).numpy().astype(np.int32)
              for i in range(0, len(texts), VECTORIZE_CHUNK)]
    longest = max(max(chunk.shape[1] for chunk in chunks), 1)
    return np.concatenate([np.pad(chunk, ((0, 0), (0, longest - chunk.shape[1]))) for chunk in chunks])


def fit_text_expert(texts: list[str], labels: np.ndarray, num_classes: int, *, seed: int,
                    progress: bool = False) -> keras.Model | None:
    """Train on the products that have a text and a label; returns a model from raw texts to probabilities.

    None when no product qualifies. A product without text never trains it (and never gets
    its vote at inference: see ``model.blend_primary``).
    """
    texts = [t if isinstance(t, str) else "" for t in texts]
    keep = np.array([bool(t.strip()) for t in texts]) & (np.asarray(labels) >= 0)
    if not keep.any():
        return None
    texts = [t for t, k in zip(texts, keep, strict=True) if k]
    labels = np.asarray(labels)[keep]
    vectorizer = keras.layers.TextVectorization(max_tokens=VOCABULARY_SIZE, ngrams=NGRAMS, output_mode="tf_idf",
                                                name="text_expert_tfidf")
    vectorizer.adapt(tf.data.Dataset.from_tensor_slices(texts).batch(VECTORIZE_CHUNK))
    char_vectorizer = keras.layers.TextVectorization(max_tokens=CHAR_VOCABULARY_SIZE, output_mode="int",
                                                     split=word_char_ngrams, name="text_expert_char_ngrams")
    char_vectorizer.adapt(tf.data.Dataset.from_tensor_slices(texts).batch(VECTORIZE_CHUNK))
    # Vocabularies come from the real texts; the classifier also sees a misspelled copy of each.
    rng = np.random.default_rng(seed)
    training_texts = texts + [misspell(t, TYPO_FRACTION, rng) for t in texts]
    training_labels = np.concatenate([labels, labels])

    # Zero start, as usual for a linear softmax: an n-gram the training texts never show keeps no vote.
    word_votes = keras.layers.Dense(num_classes, kernel_initializer="zeros", name="text_expert_word_votes")
    char_votes = keras.layers.Embedding(char_vectorizer.vocabulary_size(), num_classes, mask_zero=True,
                                        embeddings_initializer="zeros", name="text_expert_char_votes")
    char_mean = MaskedMean(name="text_expert_char_mean")
    char_scale = keras.layers.Rescaling(CHAR_VOTE_SCALE, name="text_expert_char_scale")
    softmax = keras.layers.Activation("softmax", dtype="float32", name="text_expert_softmax")

    def classify(tfidf, char_ids):
        return softmax(keras.layers.Add(name="text_expert_logits")([word_votes(tfidf), char_scale(char_mean(char_votes(char_ids)))]))

    sparse_rows = keras.Input((vectorizer.vocabulary_size(),), sparse=True, name="tfidf")
    char_rows = keras.Input((None,), dtype="int32", name="char_ngrams")
    trainer = keras.Model({"tfidf": sparse_rows, "char_ngrams": char_rows}, classify(sparse_rows, char_rows),
                          name="text_expert_trainer")
    trainer.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss=keras.losses.SparseCategoricalCrossentropy())
    inputs = {"tfidf": _tfidf_matrix(vectorizer, training_texts),
              "char_ngrams": _id_matrix(char_vectorizer, training_texts)}
    data = (tf.data.Dataset.from_tensor_slices((inputs, training_labels))
            .shuffle(len(training_texts), seed=seed).batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE))
    trainer.fit(data, epochs=EPOCHS, verbose=2 if progress else 0, callbacks=[epoch_logger("text expert", EPOCHS)])

    raw = keras.Input((1,), dtype="string", name="text")
    return keras.Model(raw, classify(vectorizer(raw), char_vectorizer(raw)), name="text_expert")


def predict_text_expert(expert: keras.Model, texts, batch_size: int) -> np.ndarray:
    return np.asarray(expert.predict(texts_tensor(texts), batch_size=batch_size, verbose=0))
