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

Memory does not grow with the catalog: the texts are vectorized once, a chunk at a time, into
row-compressed arrays on disk (``TrainingRows``), and training reads each batch's rows from them
with ``os.pread`` (``DiskArray``). Held in memory whole, the sparse matrix, the n-gram ids and
their tf.data copies and shuffle buffer grew a 250,000-product retrain by about 5 GiB; memory-mapped,
the pages random batches touched stayed resident in the process: 3.6 GiB at a million products.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from fashion_tagging.augment import misspell
from fashion_tagging.model import capped, text_batches, text_chunks, texts_present
from fashion_tagging.progress import epoch_logger

VOCABULARY_SIZE = 50_000  # words and word pairs, fitted on train
NGRAMS = 2
EPOCHS = 3  # val: blended fused 0.9772 after 3 epochs as after 6, text-only 0.9751 vs 0.9737; half the time
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
VECTORIZE_CHUNK = 2048  # texts per adapt step
# Texts per vectorizing step: the TF-IDF layer's output is dense (256 x 50,000 float32 = 51 MB); 2,048 at
# a time left RSS 1.8 GB higher after vectorizing the real catalog's training texts.
TRAINING_ROWS_CHUNK = 256
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


class DiskArray:
    """A flat array in a raw file, read a range at a time with ``os.pread``: what a batch reads passes
    through the kernel's page cache (shared, reclaimable) but never stays in the process's memory."""

    def __init__(self, path: Path, dtype):
        self.dtype = np.dtype(dtype)
        self.size = path.stat().st_size // self.dtype.itemsize
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.size

    def ranges(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Items ``[start, start + length)`` of each range, concatenated in the ranges' order."""
        outside = (starts < 0) | (starts + lengths > self.size)
        if outside.any():
            start, end = int(starts[outside][0]), int((starts + lengths)[outside][0])
            raise IndexError(f"items {start}..{end} outside an array of {self.size}")
        out = np.empty(int(lengths.sum()), dtype=self.dtype)
        buffer, item, offset = memoryview(out).cast("B"), self.dtype.itemsize, 0
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            wanted = length * item
            if wanted and os.preadv(self._fd, [buffer[offset:offset + wanted]], start * item) != wanted:
                raise OSError("short read from a training-rows file: was it changed while training?")
            offset += wanted
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclasses.dataclass
class RaggedRows:
    """Rows of varying length on disk: row ``i`` is ``columns[row_ends[i]:row_ends[i + 1]]``."""

    row_ends: np.ndarray  # (rows + 1,) int64, starting at 0
    columns: DiskArray
    values: DiskArray | None = None

    def __len__(self) -> int:
        return len(self.row_ends) - 1

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(position within ``rows``, position within its row, column, value) of each entry of the given
        rows, in that order."""
        starts = self.row_ends[rows]
        lengths = self.row_ends[np.asarray(rows) + 1] - starts
        owner = np.repeat(np.arange(len(rows)), lengths)
        slot = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return owner, slot, self.columns.ranges(starts, lengths), (None if self.values is None
                                                                    else self.values.ranges(starts, lengths))

    def close(self) -> None:
        self.columns.close()
        if self.values is not None:
            self.values.close()


class _RaggedWriter:
    """Appends rows to raw files in the row-compressed (CSR) layout of ``RaggedRows``, a chunk at a time."""

    def __init__(self, directory: Path, name: str, value_dtype=None):
        self.columns_path, self.values_path = directory / f"{name}.columns", directory / f"{name}.values"
        self.value_dtype = value_dtype
        self.row_ends = [np.zeros(1, dtype=np.int64)]
        self.stored = 0
        self.columns = open(self.columns_path, "wb")
        self.values = open(self.values_path, "wb") if value_dtype is not None else None

    def append(self, columns: np.ndarray, values: np.ndarray | None, row_lengths: np.ndarray) -> None:
        columns.astype(np.int32).tofile(self.columns)
        if self.values is not None:
            values.astype(self.value_dtype).tofile(self.values)
        self.row_ends.append(self.stored + np.cumsum(row_lengths, dtype=np.int64))
        self.stored += int(row_lengths.sum())

    def close(self) -> RaggedRows:
        self.columns.close()
        if self.values is not None:
            self.values.close()
        return RaggedRows(np.concatenate(self.row_ends), DiskArray(self.columns_path, np.int32),
                          None if self.values is None else DiskArray(self.values_path, self.value_dtype))


@dataclasses.dataclass
class TrainingRows:
    """The expert's vectorized training texts on disk: TF-IDF rows (sparse) and character n-gram ids."""

    tfidf: RaggedRows
    char_ngrams: RaggedRows
    tfidf_width: int

    def __len__(self) -> int:
        return len(self.tfidf)

    def close(self) -> None:
        self.tfidf.close()
        self.char_ngrams.close()

    def batch(self, rows: np.ndarray) -> dict:
        """The model inputs of ``rows``: a sparse TF-IDF batch and zero-padded n-gram ids."""
        owner, _, columns, values = self.tfidf.gather(rows)
        tfidf = tf.SparseTensor(np.stack([owner, columns], axis=1).astype(np.int64), values.astype(np.float32),
                                (len(rows), self.tfidf_width))
        owner, slot, ids, _ = self.char_ngrams.gather(rows)
        padded = np.zeros((len(rows), int(slot.max(initial=0)) + 1), dtype=np.int32)
        padded[owner, slot] = ids
        return {"tfidf": tfidf, "char_ngrams": padded}


def vectorize_to_disk(vectorizer: keras.layers.TextVectorization, char_vectorizer: keras.layers.TextVectorization,
                      chunks, directory: Path) -> TrainingRows:
    """Vectorize chunks of texts (an iterable of lists) into ``TrainingRows`` under ``directory``."""
    tfidf = _RaggedWriter(directory, "tfidf", np.float32)
    char_ngrams = _RaggedWriter(directory, "char_ngrams")
    for chunk in chunks:
        batch = tf.constant(chunk)
        sparse = tf.sparse.from_dense(vectorizer(batch))  # row-major: rows in order, columns ascending
        indices = sparse.indices.numpy()
        tfidf.append(indices[:, 1], sparse.values.numpy(), np.bincount(indices[:, 0], minlength=len(chunk)))
        ids = char_vectorizer(batch).numpy()
        present = ids != 0  # padding only trails
        char_ngrams.append(ids[present], None, present.sum(axis=1))
    return TrainingRows(tfidf.close(), char_ngrams.close(), int(vectorizer.vocabulary_size()))


def training_batches(rows: TrainingRows, labels: np.ndarray, *, batch_size: int, seed: int) -> tf.data.Dataset:
    """Shuffled batches (a new order every epoch), each read from the rows on disk when needed."""
    epochs = itertools.count()

    def batches():
        order = np.random.default_rng([seed, next(epochs)]).permutation(len(rows))
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            yield rows.batch(chosen), labels[chosen]

    signature = ({"tfidf": tf.SparseTensorSpec((None, rows.tfidf_width), tf.float32),
                  "char_ngrams": tf.TensorSpec((None, None), tf.int32)},
                 tf.TensorSpec((None,), tf.as_dtype(labels.dtype)))
    return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(2)


def text_expert_words(expert: keras.Model | None) -> list[str]:
    """The single words of a text expert's TF-IDF vocabulary (its word pairs left out)."""
    if expert is None:
        return []
    return [w for w in expert.get_layer("text_expert_tfidf").get_vocabulary() if w and " " not in w]


def fit_text_expert(texts, labels: np.ndarray, num_classes: int, *, seed: int,
                    progress: bool = False, scratch_dir: Path | None = None,
                    max_batches: int | None = None) -> keras.Model | None:
    """Train on the products that have a text and a label; returns a model from raw texts to probabilities.

    ``texts``: a list or a pandas Series, read a chunk at a time (``model.text_batches``). None
    when no product qualifies. A product without text never trains it (and never gets its vote
    at inference: see ``model.blend_primary``). The vectorized training texts live in a
    temporary directory under ``scratch_dir`` (the system's temporary directory by default).
    ``max_batches``: train on at most that many batches (``settings.max_batches_per_epoch``).
    """
    kept = np.flatnonzero(texts_present(texts) & (np.asarray(labels) >= 0))
    if not len(kept):
        return None
    labels = np.asarray(labels)[kept]
    vectorizer = keras.layers.TextVectorization(max_tokens=VOCABULARY_SIZE, ngrams=NGRAMS, output_mode="tf_idf",
                                                name="text_expert_tfidf")
    vectorizer.adapt(text_chunks(texts, VECTORIZE_CHUNK, kept))
    char_vectorizer = keras.layers.TextVectorization(max_tokens=CHAR_VOCABULARY_SIZE, output_mode="int",
                                                     split=word_char_ngrams, name="text_expert_char_ngrams")
    char_vectorizer.adapt(text_chunks(texts, VECTORIZE_CHUNK, kept))

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
    # Vocabularies come from the real texts; the classifier also sees a misspelled copy of each
    # (rows len(kept) onwards), made a chunk at a time as the rows are written.
    rng = np.random.default_rng(seed)
    chunks = itertools.chain(text_batches(texts, TRAINING_ROWS_CHUNK, kept),
                             ([misspell(t, TYPO_FRACTION, rng) for t in chunk]
                              for chunk in text_batches(texts, TRAINING_ROWS_CHUNK, kept)))
    with tempfile.TemporaryDirectory(prefix="text-expert-", dir=scratch_dir) as directory:
        rows = vectorize_to_disk(vectorizer, char_vectorizer, chunks, Path(directory))
        try:
            data = capped(training_batches(rows, np.concatenate([labels, labels]), batch_size=BATCH_SIZE,
                                           seed=seed), max_batches)
            trainer.fit(data, epochs=EPOCHS, verbose=2 if progress else 0,
                        callbacks=[epoch_logger("text expert", EPOCHS)])
        finally:
            rows.close()

    raw = keras.Input((1,), dtype="string", name="text")
    return keras.Model(raw, classify(vectorizer(raw), char_vectorizer(raw)), name="text_expert")


def predict_text_expert(expert: keras.Model, texts, batch_size: int) -> np.ndarray:
    return np.asarray(expert.predict(texts_tensor(texts), batch_size=batch_size, verbose=0))
