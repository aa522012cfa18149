"""Calibrated confidence and review routing: per-head temperature scaling and thresholds, fitted on ``val``.

A model's softmax is over-confident or under-confident depending on the head; temperature
scaling divides each head's log-probabilities by one number ``T`` (fitted by minimising the
negative log-likelihood on ``val``), which keeps every prediction's label and makes its
confidence mean what it says. On the calibrated confidences each head gets a threshold, chosen on
``val`` as the lowest confidence at which the tags at or above it are right at least the target
precision of the time (``FT_TARGET_PRECISION`` for articleType, ``FT_TARGET_PRECISION_OTHER_HEADS``
for the others): a tag at or above it is ``auto_accepted``, one below it ``needs_review``. A head
whose val tags never reach the target gets no threshold: all its tags need review.

The result is the artifact's ``calibration.json`` (written by :func:`artifacts.write_calibration`,
read by :class:`artifacts.Tagger`, which applies it in ``predict_embeddings``). It also holds the
model's *training distribution* (articleType shares of the ``train`` labels, calibrated articleType
confidence histogram on ``val``), the reference of the nightly drift check (``drift.py``).

Training fits it (:func:`calibrate_tagger`, after the model is chosen); :func:`calibrate_artifact`
fits it for an artifact that has none, or again with other targets. Metrics are scikit-learn's
(``calibration_curve`` bins the expected calibration error).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

AUTO_ACCEPTED = "auto_accepted"
NEEDS_REVIEW = "needs_review"
REVIEW_STATUSES = (AUTO_ACCEPTED, NEEDS_REVIEW)
ECE_BINS = 15
CONFIDENCE_BINS = 20  # the reference confidence histogram: the bins of tag_stats (repository.CONFIDENCE_BINS)
TEMPERATURE_BOUNDS = (0.05, 20.0)
_LOG_FLOOR = 1e-30


# --- applying it (the tagging hot path: numpy only) ---------------------------------------------


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """log(probs), floored (a softmax may hold exact zeros)."""
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), _LOG_FLOOR))


def apply_temperature(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log_probs / T): the same argmax, confidences sharpened (T < 1) or softened (T > 1)."""
    logits = np.asarray(log_probs, dtype=np.float64) / float(temperature)
    if not len(logits):
        return np.exp(logits)
    logits = logits - logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def calibrate(probs: np.ndarray, calibration: dict | None, head: str, log_probs: np.ndarray | None = None) -> np.ndarray:
    """A head's probabilities calibrated by the artifact's calibration (unchanged for a head it lacks).

    ``log_probs``: the head's exact log-probabilities when there are (the blended primary head's
    softmax rounds most top probabilities to 1.0; the log form keeps their order).
    """
    fitted = ((calibration or {}).get("heads") or {}).get(head)
    if not fitted:
        return probs
    return apply_temperature(log_probabilities(probs) if log_probs is None else log_probs,
                             float(fitted["temperature"]))


def auto_accepted(confidences: np.ndarray, calibration: dict | None, head: str) -> np.ndarray | None:
    """True where a calibrated confidence reaches the head's threshold; None when the head is not routed."""
    fitted = ((calibration or {}).get("heads") or {}).get(head)
    if not fitted:
        return None
    threshold = fitted.get("threshold")
    confidences = np.asarray(confidences, dtype=np.float64)
    if threshold is None:
        return np.zeros(len(confidences), dtype=bool)
    return confidences >= float(threshold)


def review_status(accepted: bool) -> str:
    return AUTO_ACCEPTED if accepted else NEEDS_REVIEW


# --- fitting ---------------------------------------------------------------------------------------


def fit_temperature(log_probs: np.ndarray, truth: np.ndarray) -> float:
    """The T minimising the negative log-likelihood of ``truth`` (class indexes; -1 = unlabelled: skipped)."""
    from scipy.optimize import minimize_scalar

    log_probs, truth = np.asarray(log_probs, dtype=np.float64), np.asarray(truth)
    keep = truth >= 0
    if keep.sum() < 2:
        return 1.0
    log_probs = log_probs[keep]
    rows, target = np.arange(int(keep.sum())), truth[keep]

    def nll(log_t: float) -> float:
        logits = log_probs / math.exp(log_t)
        logits = logits - logits.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[rows, target]))

    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return round(math.exp(float(result.x)), 4)


def choose_threshold(confidences: np.ndarray, correct: np.ndarray, target_precision: float) -> float | None:
    """The lowest confidence ``t`` such that the tags with confidence >= ``t`` reach ``target_precision``.

    Tags of equal confidence are accepted or not together. None when no cut reaches the target.
    """
    confidences, correct = np.asarray(confidences, dtype=np.float64), np.asarray(correct, dtype=bool)
    if not len(confidences):
        return None
    order = np.argsort(-confidences, kind="stable")
    sorted_conf, hits = confidences[order], np.cumsum(correct[order])
    # the last index of each run of equal confidences: the cuts that keep ties together
    last = np.flatnonzero(np.r_[sorted_conf[1:] != sorted_conf[:-1], True])
    precision = hits[last] / (last + 1)
    reaching = np.flatnonzero(precision >= target_precision)
    if not len(reaching):
        return None
    return float(sorted_conf[last[reaching[-1]]])


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float | None:
    """ECE of top-1 confidences: sum over equal-width bins of |accuracy - mean confidence| x share of tags.

    The bins' accuracy and mean confidence are scikit-learn's ``calibration_curve``; the shares
    come from the same bin edges (it drops empty bins, so do these).
    """
    from sklearn.calibration import calibration_curve

    confidences = np.clip(np.asarray(confidences, dtype=np.float64), 0.0, 1.0)
    correct = np.asarray(correct, dtype=int)
    if not len(confidences):
        return None
    accuracy, mean_confidence = calibration_curve(correct, confidences, n_bins=n_bins, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], confidences), minlength=n_bins)
    shares = counts[counts > 0] / len(confidences)
    return round(float(np.sum(shares * np.abs(accuracy - mean_confidence))), 4)


def routing_scores(confidences: np.ndarray, correct: np.ndarray, threshold: float | None) -> dict:
    """Coverage (share auto-accepted) and the accuracy of the accepted and of the rest."""
    confidences, correct = np.asarray(confidences, dtype=np.float64), np.asarray(correct, dtype=bool)
    accepted = np.zeros(len(confidences), dtype=bool) if threshold is None else confidences >= threshold
    n = len(confidences)
    return {
        "products": int(n), "auto_accepted": int(accepted.sum()),
        "coverage": round(float(accepted.mean()), 4) if n else None,
        "accepted_accuracy": round(float(correct[accepted].mean()), 4) if accepted.any() else None,
        "review_accuracy": round(float(correct[~accepted].mean()), 4) if (~accepted).any() else None,
    }


def target_precision(settings, head: str, primary_head: str) -> float:
    return float(settings.target_precision if head == primary_head else settings.target_precision_other_heads)


def head_truth(rows, head: str) -> np.ndarray:
    """The true labels of one head as strings ("" where the product has none)."""
    return np.asarray([v if isinstance(v, str) else "" for v in rows[head]], dtype=object)


def fit_heads(tagger, log_probs: dict[str, np.ndarray], rows, settings) -> dict:
    """Per-head temperature + threshold from raw val log-probabilities; with the val figures that chose them."""
    heads = {}
    for head in tagger.heads:
        if head not in log_probs or head not in rows.columns:
            continue
        names = np.asarray(tagger.label_maps[head].labels, dtype=object)
        truth = head_truth(rows, head)
        labelled = truth != ""
        if labelled.sum() < 2:
            continue
        raw = np.asarray(log_probs[head], dtype=np.float64)[labelled]
        temperature = fit_temperature(raw, tagger.label_maps[head].encode(truth[labelled].tolist()))
        calibrated = apply_temperature(raw, temperature)
        predicted = names[calibrated.argmax(axis=1)]
        correct = predicted == truth[labelled]
        confidence = calibrated.max(axis=1)
        target = target_precision(settings, head, tagger.primary_head)
        threshold = choose_threshold(confidence, correct, target)
        heads[head] = {
            "temperature": temperature, "target_precision": target,
            "threshold": None if threshold is None else math.floor(threshold * 1e6) / 1e6,  # never above a tag it accepts
            "val": {"ece_before": expected_calibration_error(apply_temperature(raw, 1.0).max(axis=1), correct),
                    "ece_after": expected_calibration_error(confidence, correct),
                    **routing_scores(confidence, correct, threshold)},
        }
    return heads


def confidence_histogram(confidences: np.ndarray, bins: int = CONFIDENCE_BINS) -> list[float]:
    """Shares of confidences in ``bins`` equal bins over [0, 1] (1.0 in the last), as tag_stats bins them."""
    confidences = np.asarray(confidences, dtype=np.float64)
    index = np.minimum(np.floor(confidences * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins).astype(float)
    return [round(float(c), 6) for c in counts / max(counts.sum(), 1.0)]


def training_distribution(tagger, train_labels: Sequence[str], val_primary_confidences: np.ndarray) -> dict:
    """The drift reference: articleType shares of the train labels (as the model names them, rare
    ones as "Other") and the histogram of calibrated articleType confidences on val."""
    label_map = tagger.label_maps[tagger.primary_head]
    encoded = label_map.encode([v if isinstance(v, str) else "" for v in train_labels])
    encoded = encoded[encoded >= 0]
    counts = np.bincount(encoded, minlength=len(label_map)) if len(encoded) else np.zeros(len(label_map))
    shares = {label: round(float(n) / max(len(encoded), 1), 6) for label, n in zip(label_map.labels, counts, strict=True)
              if n}
    return {"head": tagger.primary_head, "train_products": int(len(encoded)), "categories": shares,
            "val_products": int(len(val_primary_confidences)),
            "confidence_bins": confidence_histogram(val_primary_confidences)}


def calibrate_tagger(tagger, val_rows, val_embeddings, settings, *, train_labels: Sequence[str]) -> dict:
    """Fit the calibration of a loaded (uncalibrated) Tagger on ``val`` and return calibration.json's content.

    ``val_embeddings`` are the rows' image embeddings as this model computes them (``vectors`` and
    ``has_image``); ``train_labels`` the primary head's train labels (the drift reference).
    """
    texts = val_rows["text"].fillna("").tolist()
    raw = tagger.predict_embeddings(val_embeddings.vectors, val_embeddings.has_image, texts,
                                    batch_size=settings.inference_batch_size, calibrated=False,
                                    keep_probabilities=True)
    heads = fit_heads(tagger, raw.log_probabilities, val_rows, settings)
    primary = tagger.primary_head
    fitted = heads.get(primary)
    primary_confidence = apply_temperature(raw.log_probabilities[primary],
                                           float(fitted["temperature"]) if fitted else 1.0).max(axis=1)
    calibration = {"method": "temperature scaling per head", "fitted_on": "val", "val_products": len(val_rows),
                   "heads": heads, "training_distribution": training_distribution(tagger, train_labels,
                                                                                   primary_confidence)}
    for head, fitted in heads.items():
        log.info("calibration %s: T=%.3f, threshold %s for precision %.2f on val (coverage %s, accepted accuracy %s, "
                 "ECE %s -> %s)", head, fitted["temperature"], fitted["threshold"], fitted["target_precision"],
                 fitted["val"]["coverage"], fitted["val"]["accepted_accuracy"], fitted["val"]["ece_before"],
                 fitted["val"]["ece_after"])
    return calibration


def calibrate_artifact(artifact_dir: str | Path, settings, *, products=None, progress: bool = False) -> dict:
    """Fit (or fit again) the calibration of an existing artifact on the catalog's ``val`` split and write it.

    ``products``: the catalog frame (default: ``settings.data_dir``); its ``train`` labels give the
    drift reference. Uses the same embedding cache as evaluation.
    """
    from fashion_tagging.artifacts import Tagger, write_calibration
    from fashion_tagging.catalog import load_kaggle_catalog, with_clean_labels
    from fashion_tagging.evaluate import split_embeddings

    artifact_dir = Path(artifact_dir)
    tagger = Tagger.load(artifact_dir)
    tagger.calibration = None  # fit on the raw outputs, whatever was there before
    if products is None:
        products = load_kaggle_catalog(settings.data_dir).products
    val_rows = with_clean_labels(products[products["split"] == "val"].reset_index(drop=True), tagger.heads)
    if val_rows.empty:
        raise ValueError("calibration needs products in the 'val' split")
    embeddings = split_embeddings(tagger, artifact_dir, val_rows, settings, progress=progress)
    train_labels = products.loc[products["split"] == "train", tagger.primary_head].tolist()
    calibration = calibrate_tagger(tagger, val_rows, embeddings, settings, train_labels=train_labels)
    write_calibration(artifact_dir, calibration)
    return calibration


# --- reporting (evaluation, benchmarks) ------------------------------------------------------------


def calibration_report(tagger, raw_log_probs: dict[str, np.ndarray], rows, calibration: dict | None) -> dict:
    """Per head on a labelled split: ECE before/after calibration, coverage at the artifact's thresholds
    and the accuracy of what they auto-accept (the figures the thresholds promise on val)."""
    report = {}
    for head in tagger.heads:
        fitted = ((calibration or {}).get("heads") or {}).get(head)
        if head not in raw_log_probs or head not in rows.columns:
            continue
        truth = head_truth(rows, head)
        labelled = truth != ""
        if not labelled.any():
            continue
        names = np.asarray(tagger.label_maps[head].labels, dtype=object)
        raw = np.asarray(raw_log_probs[head], dtype=np.float64)[labelled]
        correct = names[raw.argmax(axis=1)] == truth[labelled]
        entry = {"products": int(labelled.sum()), "accuracy": round(float(correct.mean()), 4),
                 "ece_before": expected_calibration_error(apply_temperature(raw, 1.0).max(axis=1), correct)}
        if fitted:
            confidence = apply_temperature(raw, float(fitted["temperature"])).max(axis=1)
            entry.update({"temperature": fitted["temperature"], "target_precision": fitted["target_precision"],
                          "threshold": fitted["threshold"],
                          "ece_after": expected_calibration_error(confidence, correct),
                          **routing_scores(confidence, correct, fitted["threshold"])})
        report[head] = entry
    return report
