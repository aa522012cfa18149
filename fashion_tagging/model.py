"""The fused image + text classifier (the "head model") and its text/label encoders.

The head model takes a 1280-d backbone image embedding, a has-image flag and padded text
tokens; the image branch (EfficientNet) stays outside so its embeddings can be computed once
and reused for every retrain. Early fusion by concatenation, then dense layers whose 256-d
output doubles as the product embedding for similar-product search, then one softmax per head.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import tensorflow as tf

from fashion_tagging.settings import HEADS, IMAGE_EMBEDDING_DIM, PRIMARY_HEAD, PRODUCT_EMBEDDING_DIM

OTHER_LABEL = "Other"
TEXT_EMBEDDING_DIM = 128
LSTM_UNITS = 128
IMAGE_HIDDEN_UNITS = 1024  # frozen features need a non-linear adapter: one layer left image-only at 0.84
IMAGE_PROJECTION_UNITS = 256
FUSION_UNITS = 512
DROPOUT = 0.3
AUXILIARY_HEADS = (f"image_{PRIMARY_HEAD}", f"text_{PRIMARY_HEAD}")
HEAD_LOSS_WEIGHTS = {PRIMARY_HEAD: 1.0, AUXILIARY_HEADS[0]: 0.5, AUXILIARY_HEADS[1]: 0.3, "subCategory": 0.4, "masterCategory": 0.2, "gender": 0.4,
                     "baseColour": 0.4, "season": 0.3, "usage": 0.3}
UNKNOWN_TOKEN = 1  # TextVectorization's index for a word outside the vocabulary
EMPTY_TEXT_TOKEN = UNKNOWN_TOKEN  # an empty text still has one token, so no sequence is fully masked


class LabelMap:
    """Label <-> index for one head, fitted on train only.

    Labels with fewer than ``min_count`` training products are folded into ``Other``: the model
    cannot learn them, and it must never emit a label that is not in this map.
    """

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def fit(cls, values, min_count: int) -> "LabelMap":
        values = [v for v in values if v]
        counts: dict[str, int] = {}
        for value in values:
            counts[value] = counts.get(value, 0) + 1
        kept = sorted(label for label, n in counts.items() if n >= min_count)
        if any(n < min_count for n in counts.values()):
            kept.append(OTHER_LABEL)
        return cls(kept)

    def encode(self, values) -> np.ndarray:
        """Index per value; -1 for a missing value (that head's loss ignores the product)."""
        other = self.index.get(OTHER_LABEL, -1)
        return np.array([self.index.get(v, other) if v else -1 for v in values], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)


ENCODE_CHUNK = 16_384  # texts per step: a whole catalog's texts as one string tensor would be a copy of them all


def text_batches(texts, size: int, positions: np.ndarray | None = None):
    """The texts of a list or a pandas Series, ``size`` at a time, as Python strings ("" where missing);
    ``positions``: only those rows, in that order.

    A catalog frame keeps its texts in an Arrow-backed column; the whole column as Python strings
    would be one more copy of every text (about 0.7 GB at a million products), so they are
    converted a batch at a time.
    """
    count = len(texts) if positions is None else len(positions)
    for start in range(0, count, size):
        rows = slice(start, start + size) if positions is None else positions[start:start + size]
        if hasattr(texts, "iloc"):
            chunk = texts.iloc[rows]
        else:
            chunk = texts[rows] if positions is None else [texts[row] for row in rows]
        yield [text if isinstance(text, str) else "" for text in chunk]


def texts_present(texts) -> np.ndarray:
    """Whether each text of a list or Series has anything but whitespace (read in batches, as above)."""
    return np.fromiter((bool(text.strip()) for chunk in text_batches(texts, 65_536) for text in chunk),
                       dtype=bool, count=len(texts))


def capped(dataset: tf.data.Dataset, batches: int | None) -> tf.data.Dataset:
    """The first ``batches`` batches of each pass (``settings.max_batches_per_epoch``), or all of them."""
    return dataset if batches is None else dataset.take(batches)


def text_chunks(texts, size: int = 2048, positions: np.ndarray | None = None) -> tf.data.Dataset:
    """:func:`text_batches` as a dataset (for ``adapt``): ``from_tensor_slices`` would first copy every
    text into one tensor."""
    return tf.data.Dataset.from_generator(lambda: text_batches(texts, size, positions),
                                          output_signature=tf.TensorSpec((None,), tf.string))


class TextEncoder:
    """Lower-cased word tokens -> fixed-length int ids; the vocabulary is fitted on train only."""

    def __init__(self, vocabulary: list[str] | None, sequence_length: int, max_tokens: int):
        self.sequence_length = sequence_length
        self.max_tokens = max_tokens
        self.layer = keras.layers.TextVectorization(
            max_tokens=max_tokens, output_sequence_length=sequence_length, output_mode="int",
            vocabulary=vocabulary or None,
        )

    @classmethod
    def fit(cls, texts, sequence_length: int, max_tokens: int) -> "TextEncoder":
        encoder = cls(None, sequence_length, max_tokens)
        encoder.layer.adapt(text_chunks(texts))
        return encoder

    @property
    def vocabulary(self) -> list[str]:
        return [str(t) for t in self.layer.get_vocabulary()]

    def encode(self, texts, dtype=np.int64) -> np.ndarray:
        """(N, sequence_length) token ids of a list or Series of texts, written chunk by chunk into one array of ``dtype``
        (training asks for int32: a million products' tokens are 0.4 GB rather than 0.8)."""
        tokens = np.empty((len(texts), self.sequence_length), dtype=dtype)
        for start, chunk in zip(itertools.count(0, ENCODE_CHUNK), text_batches(texts, ENCODE_CHUNK)):
            tokens[start:start + len(chunk)] = self.layer(tf.constant(chunk, dtype=tf.string)).numpy()
        tokens[tokens[:, 0] == 0, 0] = EMPTY_TEXT_TOKEN
        return tokens


def build_head_model(label_sizes: dict[str, int], *, vocabulary_size: int) -> keras.Model:
    """Image embedding + text tokens -> per-head softmax, plus the product embedding output.

    ``label_sizes`` holds the heads the training data supports (see ``train.fit_heads``): any
    subset of ``settings.HEADS`` that includes the primary head.

    Tokens may come in any length: the encoder pads to ``max_text_tokens``, and training trims a
    batch's trailing padding (masked, so the outputs are the same) to save LSTM steps.
    """
    if PRIMARY_HEAD not in label_sizes:
        raise ValueError(f"the head model needs the primary head {PRIMARY_HEAD!r}; got heads {sorted(label_sizes)}")
    empty = {head: size for head, size in label_sizes.items() if size < 1}
    if empty:
        raise ValueError(f"heads without classes cannot be built (leave them out): {empty}")
    image_embedding = keras.Input((IMAGE_EMBEDDING_DIM,), name="image_embedding")
    has_image = keras.Input((1,), name="has_image")
    tokens = keras.Input((None,), dtype="int64", name="tokens")
    has_text = keras.Input((1,), name="has_text")

    # Pooled ReLU6 features have very different scales per channel: normalise before projecting.
    image = keras.layers.BatchNormalization(name="image_norm")(image_embedding)
    image = keras.layers.Dropout(DROPOUT, name="image_dropout")(image)
    image = keras.layers.Dense(IMAGE_HIDDEN_UNITS, activation="relu", name="image_hidden")(image)
    image = keras.layers.Dropout(DROPOUT, name="image_hidden_dropout")(image)
    image = keras.layers.Dense(IMAGE_PROJECTION_UNITS, activation="relu", name="image_projection")(image)
    image = keras.layers.Multiply(name="image_gate")([image, has_image])

    words = keras.layers.Embedding(vocabulary_size, TEXT_EMBEDDING_DIM, mask_zero=True, name="text_embedding")(tokens)
    states = keras.layers.LSTM(LSTM_UNITS, return_sequences=True, name="text_lstm")(words)
    # Max over every step keeps what the LSTM saw in the title even after 90 description tokens.
    sequence = keras.layers.GlobalMaxPooling1D(name="text_lstm_max")(states)
    bag = keras.layers.GlobalAveragePooling1D(name="text_bag")(words)
    text = keras.layers.Concatenate(name="text_features")([sequence, bag])
    text = keras.layers.Multiply(name="text_gate")([text, has_text])

    fused = keras.layers.Concatenate(name="fusion")([image, text, has_image, has_text])
    fused = keras.layers.Dense(FUSION_UNITS, activation="relu", name="fusion_dense")(fused)
    fused = keras.layers.Dropout(DROPOUT, name="fusion_dropout")(fused)
    product = keras.layers.Dense(PRODUCT_EMBEDDING_DIM, activation="relu", name="product_embedding")(fused)
    product_dropped = keras.layers.Dropout(DROPOUT / 2, name="product_dropout")(product)
    outputs = {
        head: keras.layers.Dense(size, activation="softmax", name=head, dtype="float32")(product_dropped)
        for head, size in label_sizes.items()
    }
    # Hybrid fusion: auxiliary primary-head classifiers on each modality alone (training only) make
    # each branch discriminative by itself, so a product missing one modality is still tagged well.
    outputs[f"image_{PRIMARY_HEAD}"] = keras.layers.Dense(
        label_sizes[PRIMARY_HEAD], activation="softmax", name=f"image_{PRIMARY_HEAD}", dtype="float32")(image)
    outputs[f"text_{PRIMARY_HEAD}"] = keras.layers.Dense(
        label_sizes[PRIMARY_HEAD], activation="softmax", name=f"text_{PRIMARY_HEAD}", dtype="float32")(text)
    outputs["product_embedding"] = product
    return keras.Model(
        {"image_embedding": image_embedding, "has_image": has_image, "tokens": tokens, "has_text": has_text},
        outputs, name="fused_tagger",
    )


def model_inputs(embeddings: np.ndarray | None, has_image: np.ndarray, tokens: np.ndarray,
                 has_text: np.ndarray) -> dict:
    """The head model's input dict, built here only so training and tagging feed it alike.

    ``embeddings`` None leaves ``image_embedding`` out (end-to-end fine-tuning feeds pixels instead).
    """
    inputs = {} if embeddings is None else {"image_embedding": embeddings.astype(np.float32)}
    inputs.update({
        "has_image": has_image.astype(np.float32).reshape(-1, 1),
        # int32 tokens (training's) stay narrow: its dataset gathers them as int64
        "tokens": tokens if tokens.dtype == np.int32 else tokens.astype(np.int64, copy=False),
        "has_text": has_text.astype(np.float32).reshape(-1, 1),
    })
    return inputs


MODES = ("fused", "image_only", "text_only")


def modality_view(mode: str, embeddings: np.ndarray, has_image: np.ndarray, texts: list) -> tuple:
    """(embeddings, has_image, texts) as if the products had only the modalities ``mode`` names."""
    if mode == "image_only":
        return embeddings, has_image, [""] * len(texts)
    if mode == "text_only":
        return np.zeros_like(embeddings), np.zeros_like(has_image), texts
    return embeddings, has_image, texts


# Hybrid fusion at inference: the primary head's fused softmax is blended (log-linearly) with
# the text-only auxiliary head, the image expert (the "top" fine-tuning classifiers) and the
# text expert (TF-IDF linear, see text_expert.py), with weights picked on val per situation
# (both modalities, image only, text only) from this grid.
# Weights above 2 let a better specialist outvote the fused softmax: on val (cosine-12 fused model)
# the image expert at 8 took image-only from 0.8848 to 0.8860, and both modalities went 0.9747 -> 0.9754.
BLEND_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
BLEND_SITUATIONS = ("both", "image_only", "text_only")
_LOG_FLOOR = 1e-7


def situation_masks(has_image: np.ndarray, has_text: np.ndarray) -> dict[str, np.ndarray]:
    has_image, has_text = np.asarray(has_image, bool), np.asarray(has_text, bool)
    return {"both": has_image & has_text, "image_only": has_image & ~has_text, "text_only": ~has_image & has_text}


def situation_view(situation: str, has_image: np.ndarray, has_text: np.ndarray, truth: np.ndarray):
    """(has_image, has_text, rows) of products scored as ``situation`` when choosing a blend: the
    modalities the situation keeps, and the labelled products that have them."""
    image = has_image if situation != "text_only" else np.zeros_like(has_image)
    text = has_text if situation != "image_only" else np.zeros_like(has_text)
    present = image & text if situation == "both" else image if situation == "image_only" else text
    return image, text, present & (truth >= 0)


# Text conditions that get blend weights of their own, where training found weights that do better on
# val for texts in that condition (see choose_text_condition_blend), in precedence order: a text with
# many words unknown to the word vocabulary (typos, another shop's wording: the word LSTM reads an unknown
# word as nothing, the text expert's character n-grams still read it), else a short text (a title
# without its description), else a weak text: one the text head itself is unsure of (a description
# without its title, a vague title), where the photo should count for more. Each condition's threshold
# is chosen on val among these:
TEXT_CONDITION_THRESHOLDS = {
    "noisy_text": (0.1, 0.15, 0.2, 0.3),  # share of the text's words unknown to the vocabulary, at least
    "short_text": (6, 10, 15, 25),  # words, at most
    "weak_text": (0.5, 0.7, 0.8, 0.9),  # the text head's top probability, below
}
TEXT_CONDITIONS = tuple(TEXT_CONDITION_THRESHOLDS)
TEXT_SITUATIONS = ("both", "text_only")  # the situations a text condition applies in


def unknown_word_share(tokens: np.ndarray) -> np.ndarray:
    """Per text, the share of its words (the first ``sequence_length``) that the word vocabulary
    does not know; an empty text counts as all unknown (it takes no text weights anyway)."""
    tokens = np.asarray(tokens)
    return (tokens == UNKNOWN_TOKEN).sum(axis=1) / np.maximum((tokens > 0).sum(axis=1), 1)


def text_condition(name: str, tokens: np.ndarray, threshold, text_head: np.ndarray) -> np.ndarray:
    """Whether each text (as word ids; ``text_head``: the primary head's text-only probabilities for
    it) is in condition ``name`` at ``threshold``."""
    if name == "noisy_text":
        return unknown_word_share(tokens) >= threshold
    if name == "short_text":
        return (np.asarray(tokens) > 0).sum(axis=1) <= threshold
    if name == "weak_text":
        return np.asarray(text_head).max(axis=1) < threshold
    raise ValueError(f"not a text condition: {name!r}")


def text_conditions(tokens: np.ndarray, thresholds: dict | None, text_head: np.ndarray) -> dict[str, np.ndarray]:
    """{condition: mask} for the conditions ``thresholds`` (an artifact's choice) names, each mask
    without the texts an earlier condition took."""
    masks, taken = {}, np.zeros(len(tokens), dtype=bool)
    for name in TEXT_CONDITIONS:
        if (thresholds or {}).get(name) is not None:
            masks[name] = text_condition(name, tokens, thresholds[name], text_head) & ~taken
            taken |= masks[name]
    return masks


def blend_groups(blend: dict, has_image: np.ndarray, has_text: np.ndarray, conditions: dict | None = None):
    """(situation, rows, weights) for each group of products one set of blend weights applies to:
    a situation's texts in a condition (``text_conditions``) take its ``<situation>_<condition>``
    weights where the blend has them."""
    for situation, rows in situation_masks(has_image, has_text).items():
        for name, mask in (conditions or {}).items():
            weights = blend.get(f"{situation}_{name}")
            if weights is not None:
                yield situation, rows & mask, blend_weights(weights)
                rows = rows & ~mask
        yield situation, rows, blend_weights(blend.get(situation))


def blend_weights(entry) -> tuple[float, float, float]:
    """(text head, image expert, text expert) weights of one situation; blends saved before the
    text expert existed hold only the first two, the missing ones are 0."""
    return tuple((list(entry or ()) + [0.0, 0.0, 0.0])[:3])


def blend_primary(fused: np.ndarray, text_head: np.ndarray, expert: np.ndarray | None, has_image: np.ndarray,
                  has_text: np.ndarray, blend: dict, text_expert: np.ndarray | None = None, *,
                  log: bool = False, conditions: dict | None = None) -> np.ndarray:
    """Primary-head probabilities: fused · text_head^wt · expert^wi · text_expert^wx, renormalised.

    ``log``: the normalised log-probabilities instead. Weights up to 8 sharpen the product so far
    that most probabilities round to exactly 1.0; the log form keeps the margins (calibration.py
    rescales them).

    ``blend`` maps a situation to ``[wt, wi]`` or ``[wt, wi, wx]``; text weights only apply
    where there is text and the image weight only where there is an image, so a missing
    modality never votes. ``conditions``: the products' text conditions (``text_conditions``);
    None applies the situations' own weights to every product.
    """
    log_p = np.log(np.maximum(fused, _LOG_FLOOR))
    for situation, rows, (text_weight, image_weight, text_expert_weight) in blend_groups(blend, has_image, has_text,
                                                                                         conditions):
        if situation != "image_only":
            if text_weight:
                log_p[rows] += text_weight * np.log(np.maximum(text_head[rows], _LOG_FLOOR))
            if text_expert_weight and text_expert is not None:
                log_p[rows] += text_expert_weight * np.log(np.maximum(text_expert[rows], _LOG_FLOOR))
        if image_weight and expert is not None and situation != "text_only":
            log_p[rows] += image_weight * np.log(np.maximum(expert[rows], _LOG_FLOOR))
    log_p -= log_p.max(axis=1, keepdims=True)
    probs = np.exp(log_p)
    total = probs.sum(axis=1, keepdims=True)
    return log_p - np.log(total) if log else probs / total


def choose_blend(mode_outputs: dict, expert: np.ndarray | None, has_image: np.ndarray, has_text: np.ndarray,
                 truth: np.ndarray, text_expert: np.ndarray | None = None,
                 situations: tuple[str, ...] = BLEND_SITUATIONS) -> tuple[dict, dict]:
    """Blend weights per situation that maximise primary-head accuracy on (val) products.

    ``mode_outputs`` holds the head model's outputs on the same products with both modalities
    ("both"), the text removed ("image_only") and the image removed ("text_only"). Ties keep
    the smaller weights, so without a measurable gain the plain fused softmax is kept.
    Returns (blend: {situation: [wt, wi, wx]}, {situation: {"products", "fused", "blended"}}).
    A product whose ``truth`` is negative takes no part (``situations``: the ones to choose).
    """
    blend, report = {}, {}
    aux_text = f"text_{PRIMARY_HEAD}"
    for situation in situations:
        image, text, rows = situation_view(situation, has_image, has_text, truth)
        outputs = mode_outputs[situation]
        text_grid = BLEND_GRID if situation != "image_only" else (0.0,)
        text_expert_grid = BLEND_GRID if situation != "image_only" and text_expert is not None else (0.0,)
        image_grid = BLEND_GRID if situation != "text_only" and expert is not None else (0.0,)
        scored = []
        for weights in itertools.product(text_grid, image_grid, text_expert_grid):
            probs = blend_primary(outputs[PRIMARY_HEAD][rows], outputs[aux_text][rows],
                                  None if expert is None else expert[rows], image[rows], text[rows],
                                  {situation: weights}, None if text_expert is None else text_expert[rows])
            accuracy = float(np.mean(probs.argmax(axis=1) == truth[rows])) if rows.any() else 0.0
            scored.append((accuracy, -sum(weights), *weights))
        best = max(scored)
        blend[situation] = list(best[2:])
        report[situation] = {"products": int(rows.sum()), "fused": scored[0][0], "blended": best[0]}
    return blend, report


def choose_text_condition_blend(name: str, blend: dict, thresholds: dict, clean_outputs: dict, copy_outputs: dict,
                                expert: np.ndarray | None, has_image: np.ndarray, has_text: np.ndarray,
                                truth: np.ndarray, clean_tokens: np.ndarray, copy_tokens: np.ndarray,
                                clean_text_expert: np.ndarray | None = None,
                                copy_text_expert: np.ndarray | None = None) -> tuple[object, dict, dict]:
    """Blend weights for texts in condition ``name``, and the condition's threshold.

    Chosen on the (val) products twice over: as they are (``clean_*``) and with their texts changed
    the way the condition describes (``copy_*``: typos, the title alone, the description alone), from the head model's
    outputs per situation, the text expert's and each text's word ids. ``blend`` and ``thresholds``
    are the choices so far (earlier conditions take their texts first). For each of the condition's
    thresholds the texts of both copies in the condition get weights of their own, chosen on them;
    among the thresholds that leave the clean copy's accuracy no lower, the one with the best
    accuracy on the changed copy wins, and none unless it beats ``blend``.
    Returns (threshold or None, {"<situation>_<name>": weights}, report).
    """
    def pooled(clean, copy):
        return np.concatenate([np.asarray(clean), np.asarray(copy)])

    aux_text = f"text_{PRIMARY_HEAD}"
    outputs = {situation: {head: pooled(clean_outputs[situation][head], copy_outputs[situation][head])
                           for head in (PRIMARY_HEAD, aux_text)} for situation in TEXT_SITUATIONS}
    expert = None if expert is None else pooled(expert, expert)
    text_expert = None if clean_text_expert is None or copy_text_expert is None \
        else pooled(clean_text_expert, copy_text_expert)
    has_image, has_text, truth = pooled(has_image, has_image), pooled(has_text, has_text), pooled(truth, truth)
    tokens = pooled(clean_tokens, copy_tokens)
    text_head = outputs[TEXT_SITUATIONS[0]][aux_text]  # the text head reads the text alone: any situation's
    copies = np.repeat(["clean", "changed"], len(clean_tokens))
    earlier = text_conditions(tokens, thresholds, text_head)
    free = ~np.any(list(earlier.values()), axis=0) if earlier else np.ones(len(tokens), dtype=bool)

    def accuracies(candidate: dict, conditions: dict) -> dict:
        """Primary-head accuracy per copy over its labelled products with text (as the situations blend them)."""
        scored = {}
        for situation in TEXT_SITUATIONS:
            image, text, rows = situation_view(situation, has_image, has_text, truth)
            probs = blend_primary(outputs[situation][PRIMARY_HEAD][rows], outputs[situation][aux_text][rows],
                                  None if expert is None else expert[rows], image[rows], text[rows], candidate,
                                  None if text_expert is None else text_expert[rows],
                                  conditions={n: mask[rows] for n, mask in conditions.items()})
            right = probs.argmax(axis=1) == truth[rows]
            for copy in ("clean", "changed"):
                scored[f"{situation}_{copy}"] = float(right[copies[rows] == copy].mean()) if right.size else 0.0
        return scored

    def changed_score(scored: dict) -> float:
        return float(np.mean([scored[f"{situation}_changed"] for situation in TEXT_SITUATIONS]))

    baseline = accuracies(blend, earlier)
    best = (changed_score(baseline), None, {}, baseline, None)
    for threshold in TEXT_CONDITION_THRESHOLDS[name]:
        in_condition = text_condition(name, tokens, threshold, text_head) & free
        chosen, _ = choose_blend(outputs, expert, has_image, has_text, np.where(in_condition, truth, -1), text_expert,
                                 situations=TEXT_SITUATIONS)
        weights = {f"{situation}_{name}": chosen[situation] for situation in TEXT_SITUATIONS}
        scored = accuracies({**blend, **weights}, {**earlier, name: in_condition})
        clean_kept = all(scored[f"{s}_clean"] >= baseline[f"{s}_clean"] for s in TEXT_SITUATIONS)
        if clean_kept and changed_score(scored) > best[0]:
            best = (changed_score(scored), threshold, weights, scored, in_condition)
    _, threshold, weights, scored, in_condition = best
    report = {"threshold": threshold, "before": baseline, "after": scored}
    if threshold is not None:
        report.update(share_of_changed_copy=float(in_condition[copies == "changed"].mean()),
                      share_of_clean_copy=float(in_condition[copies == "clean"].mean()))
    return threshold, weights, report


def compile_head_model(model: keras.Model, heads, learning_rate) -> None:
    """Adam + (sparse) categorical cross-entropy per head; the embedding output carries no loss.

    ``learning_rate`` is a float or a ``keras.optimizers.schedules`` schedule.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss={head: keras.losses.SparseCategoricalCrossentropy() for head in heads},
        loss_weights={head: HEAD_LOSS_WEIGHTS.get(head, 0.3) for head in heads},
        metrics={head: [keras.metrics.SparseCategoricalAccuracy(name="acc")] for head in heads},
    )


__all__ = ["HEADS", "LabelMap", "TextEncoder", "build_head_model", "compile_head_model"]
