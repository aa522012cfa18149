"""Evaluation on a fixed split: accuracy + macro-F1 per modality, every head, vs the 0.91 baseline,
and per head the calibration (ECE before/after) and review routing (share auto-accepted, its accuracy).

Scores are scikit-learn's (accuracy, macro-F1, per-class report, confusion matrix; calibration.py
bins the ECE with its ``calibration_curve``).

Writes ``metrics.json``, ``report.md`` and ``confusion_articleType.png`` into the artifact
directory (the registry and the UI read them from there). Every product of the split counts,
with or without an image, so figures stay comparable with published ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fashion_tagging.artifacts import FINE_TUNED_BACKBONE_FILE, Tagger
from fashion_tagging.calibration import calibration_report
from fashion_tagging.catalog import load_kaggle_catalog, with_clean_labels
from fashion_tagging.features import catalog_image_embeddings, tuned_embeddings
from fashion_tagging.model import MODES, modality_view
from fashion_tagging.progress import peak_rss_mib
from fashion_tagging.settings import PRIMARY_HEAD, Settings

WEAK_SPOTS = 10
CONFUSION_TOP_CLASSES = 30


def classification_scores(true: list[str], predicted: list[str]) -> dict:
    """Accuracy, macro-F1 over the classes present in ``true``, and per-class precision/recall/F1 (scikit-learn)."""
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    if not len(true):
        return {"accuracy": 0.0, "macro_f1": 0.0, "n": 0, "per_class": {}}
    classes = sorted(set(true))
    report = classification_report(true, predicted, labels=classes, output_dict=True, zero_division=0)
    per_class = {label: {"precision": round(report[label]["precision"], 4), "recall": round(report[label]["recall"], 4),
                         "f1": round(report[label]["f1-score"], 4), "support": int(report[label]["support"])}
                 for label in classes}
    return {"accuracy": round(float(accuracy_score(true, predicted)), 4),
            "macro_f1": round(float(f1_score(true, predicted, labels=classes, average="macro", zero_division=0)), 4),
            "n": len(true), "per_class": per_class}


def confusion_png(true: list[str], predicted: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix of the most frequent classes (143 classes would be unreadable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sklearn.metrics import confusion_matrix

    classes = pd.Series(true).value_counts().index[:CONFUSION_TOP_CLASSES].tolist()
    # Products whose true or predicted class is not among ``classes`` are left out, as sklearn does.
    matrix = confusion_matrix(true, predicted, labels=classes).astype(float)
    matrix = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(11, 10), dpi=90)
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown_report(report: dict) -> str:
    fused = report["modes"]["fused"]
    primary = report.get("primary_head", PRIMARY_HEAD)
    lines = [
        f"# Evaluation of {report['version']} on the `{report['split']}` split ({report['products']} products)",
        "",
        f"Backbone `{report['backbone']}` at {report['image_size']}px; baseline {report['baseline']:.2f}.",
        "",
        f"| {primary} | top-1 accuracy | macro-F1 | vs baseline |",
        "| --- | --- | --- | --- |",
    ]
    for mode in MODES:
        scores = report["modes"][mode][primary]
        lines.append(f"| {mode} | {scores['accuracy']:.4f} | {scores['macro_f1']:.4f} | "
                     f"{scores['accuracy'] - report['baseline']:+.4f} |")
    lines += ["", "| head (fused) | accuracy | macro-F1 |", "| --- | --- | --- |"]
    for head, scores in fused.items():
        lines.append(f"| {head} | {scores['accuracy']:.4f} | {scores['macro_f1']:.4f} |")
    for head, reason in (report.get("heads_left_out") or {}).items():
        lines.append(f"| {head} | not in the model: {reason} | |")
    lines += ["", f"Weakest {primary} classes (fused, by F1, support >= 5):", "",
              "| class | F1 | recall | support |", "| --- | --- | --- | --- |"]
    for spot in report["weak_spots"]:
        lines.append(f"| {spot['label']} | {spot['f1']:.3f} | {spot['recall']:.3f} | {spot['support']} |")
    calibration = report.get("calibration") or {}
    if calibration:
        lines += ["", "Calibration (temperature per head, fitted on val) and review routing at the val thresholds:", "",
                  "| head | ECE before | ECE after | target precision | auto-accepted | their accuracy |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for head, c in calibration.items():
            lines.append(f"| {head} | {_fmt(c.get('ece_before'))} | {_fmt(c.get('ece_after'))} | "
                         f"{_fmt(c.get('target_precision'), 2)} | {_fmt(c.get('coverage'))} | "
                         f"{_fmt(c.get('accepted_accuracy'))} |")
    res = report["resources"]
    lines += ["", f"Evaluate wall time {res['evaluate_seconds']:.1f} s; peak RSS {res['peak_rss_mib']:.0f} MiB."]
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def split_embeddings(tagger: Tagger, artifact_dir: Path, rows: pd.DataFrame, settings: Settings, *,
                     progress: bool = False):
    """The rows' image embeddings as this model computes them, from the shared feature store.

    A last block tuned on stored activations ("top") runs on the store's activations, so
    evaluating after training embeds no photo again. A backbone fine-tuned deeper ("full") has
    features of its own: stored under its version (outside the artifact, which stays cache-free).
    """
    fine_tuned = (Path(artifact_dir) / FINE_TUNED_BACKBONE_FILE).is_file()
    mode = tagger.config.get("fine_tune_mode", "full" if fine_tuned else "none")
    embed = dict(image_size=tagger.image_size, cache_dir=settings.cache_dir, batch_size=settings.inference_batch_size,
                 progress=progress, engine=settings.inference_engine)
    paths = rows["image_path"].tolist()
    if fine_tuned and mode == "full":
        return catalog_image_embeddings(rows["id"], paths, backbone_name=f"{tagger.backbone_name}-{tagger.version}",
                                        backbone=tagger.backbone, **embed)
    embeddings = catalog_image_embeddings(rows["id"], paths, backbone_name=tagger.backbone_name,
                                          with_top_inputs=fine_tuned, **embed)
    if fine_tuned:
        tuned_embeddings(tagger.backbone, embeddings, settings.inference_batch_size)
        embeddings.top_inputs = embeddings.photo_top_inputs = None
    return embeddings


def primary_predictions(artifact_dir: str | Path, settings: Settings, rows: pd.DataFrame, *,
                        progress: bool = False) -> list[str]:
    """A model's fused primary-head label for each of ``rows`` (the gate's paired predictions)."""
    artifact_dir = Path(artifact_dir)
    tagger = Tagger.load(artifact_dir)
    embeddings = split_embeddings(tagger, artifact_dir, rows, settings, progress=progress)
    predictions = tagger.predict_embeddings(embeddings.vectors, embeddings.has_image,
                                            rows["text"].fillna("").tolist(), batch_size=settings.inference_batch_size)
    return list(predictions.labels[tagger.primary_head])


def paired_scores(truth: list[str], candidate: list[str], production: list[str]) -> dict:
    """Both models' accuracy on the same products and their discordant pairs (McNemar's b and c)."""
    truth_arr = np.asarray(truth, dtype=object)
    labelled = truth_arr != ""
    candidate_right = (np.asarray(candidate, dtype=object) == truth_arr)[labelled]
    production_right = (np.asarray(production, dtype=object) == truth_arr)[labelled]
    n = int(labelled.sum())
    return {"products": n,
            "candidate_accuracy": round(float(candidate_right.mean()), 4) if n else 0.0,
            "production_accuracy": round(float(production_right.mean()), 4) if n else 0.0,
            "candidate_only_right": int(np.sum(candidate_right & ~production_right)),
            "production_only_right": int(np.sum(~candidate_right & production_right)),
            "both_right": int(np.sum(candidate_right & production_right)),
            "both_wrong": int(np.sum(~candidate_right & ~production_right))}


def evaluate(artifact_dir: str | Path, settings: Settings, *, split: str = "test",
             products: pd.DataFrame | None = None, progress: bool = True) -> dict:
    """Score a model on one split in the three modality settings; write the report files."""
    started = time.perf_counter()
    artifact_dir = Path(artifact_dir)
    tagger = Tagger.load(artifact_dir)
    if products is None:
        products = load_kaggle_catalog(settings.data_dir).products
    # Scored on the heads in the artifact, whatever settings.HEADS holds: a model trained without
    # a head (no usable labels in its catalog) is evaluated on the heads it has.
    primary = tagger.primary_head
    rows = with_clean_labels(products[products["split"] == split].reset_index(drop=True), tagger.heads)
    if rows.empty:
        raise ValueError(f"no products in split {split!r}")
    embeddings = split_embeddings(tagger, artifact_dir, rows, settings, progress=progress)
    texts = rows["text"].fillna("").tolist()
    modes, predictions = {}, {}
    for mode in MODES:
        vectors, has_image, mode_texts = modality_view(mode, embeddings.vectors, embeddings.has_image, texts)
        preds = tagger.predict_embeddings(vectors, has_image, mode_texts, keep_probabilities=mode == "fused")
        predictions[mode] = preds
        heads = tagger.heads if mode == "fused" else (primary,)
        modes[mode] = {}
        for head in heads:
            labelled = rows[head].ne("").to_numpy()
            if head != primary and not labelled.any():
                continue  # no product of the split has this label: no score rather than a misleading 0
            true = rows.loc[labelled, head].tolist()
            predicted = [p for p, keep in zip(preds.labels[head], labelled, strict=True) if keep]
            modes[mode][head] = classification_scores(true, predicted)

    fused_primary = modes["fused"][primary]
    weak = sorted(({"label": k, **v} for k, v in fused_primary["per_class"].items() if v["support"] >= 5),
                  key=lambda c: (c["f1"], -c["support"]))[:WEAK_SPOTS]
    fused_labels = np.asarray(predictions["fused"].labels[primary], dtype=object)
    truth = rows[primary].to_numpy(dtype=object)
    labelled = truth != ""
    no_image = ~embeddings.has_image
    scored_no_image = no_image & labelled
    report = {
        "version": tagger.version, "split": split, "products": len(rows), "backbone": tagger.backbone_name,
        "image_size": tagger.image_size, "baseline": settings.baseline_accuracy,
        "primary_head": primary, "heads": list(tagger.heads), "heads_left_out": tagger.heads_left_out,
        "article_type_accuracy": fused_primary["accuracy"],
        "beats_baseline": fused_primary["accuracy"] >= settings.baseline_accuracy,
        "products_without_image": int(no_image.sum()),
        "accuracy_without_image": round(float(np.mean(fused_labels[scored_no_image] == truth[scored_no_image])), 4)
        if scored_no_image.any() else None,
        "modes": modes,
        "weak_spots": weak,
        # ECE before/after calibration, share auto-accepted at the val thresholds and its accuracy
        "calibration": calibration_report(tagger, predictions["fused"].log_probabilities, rows, tagger.calibration),
        "resources": {"evaluate_seconds": round(time.perf_counter() - started, 1), "peak_rss_mib": round(peak_rss_mib(), 1)},
        "train_config": {k: tagger.config.get(k) for k in ("epochs_run", "timings", "best_val_article_type_accuracy")},
    }
    confusion_png(truth[labelled].tolist(), fused_labels[labelled].tolist(), artifact_dir / f"confusion_{primary}.png",
                  f"{tagger.version}: {primary} on {split} (fused, top {CONFUSION_TOP_CLASSES} classes)")
    metrics_path = artifact_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics[split] = report
    metrics_path.write_text(json.dumps(metrics, indent=1))
    (artifact_dir / "report.md").write_text(markdown_report(report))
    return report
