"""Drift of a tagging run: what it tagged against the model's training distribution.

After each nightly run, per model version that tagged products in it: the run's predicted
articleType shares and articleType confidence histogram (``run_tag_stats``, kept by the tag
writes) are compared with the reference in the artifact's ``calibration.json`` (articleType
shares of the ``train`` labels; calibrated confidences on ``val``). Categories are the
``DRIFT_CATEGORIES`` most frequent training categories plus one bucket for the rest, so a run of a
few hundred products is not read as drift just because it cannot hold every rare category.

Figures: Jensen-Shannon divergence (base 2, in [0, 1]; scipy) and the population stability index
(shares floored at ``PSI_FLOOR``) of both distributions. The run alerts when either divergence is
above ``FT_DRIFT_THRESHOLD`` and it tagged at least ``FT_DRIFT_MIN_PRODUCTS`` products: a warning
in the log, the settable callback ``FT_DRIFT_ALERT_CALLBACK`` (``module:function``, called with
the report), the ``tagging_drift`` row the page flags, and (in the DAG) an Asset event.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

DRIFT_CATEGORIES = 20  # most frequent training categories compared one by one; the rest as one bucket
REST = "(rest)"
PSI_FLOOR = 1e-4
TOP_SHIFTS = 5  # categories whose share moved most, kept in the report's details


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2) of two distributions (scipy returns its square root)."""
    from scipy.spatial.distance import jensenshannon

    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    return float(jensenshannon(p, q, base=2) ** 2)


def population_stability_index(p: np.ndarray, q: np.ndarray) -> float:
    """PSI = sum (p - q) ln(p / q) over shares floored at ``PSI_FLOOR`` (empty bins would make it infinite)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    p = np.maximum(p / max(p.sum(), 1e-12), PSI_FLOOR)
    q = np.maximum(q / max(q.sum(), 1e-12), PSI_FLOOR)
    return float(np.sum((p - q) * np.log(p / q)))


def category_shares(counts: dict[str, int], reference: dict[str, float]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(buckets, run shares, reference shares): the top training categories, then the rest as one bucket."""
    top = [label for label, _ in sorted(reference.items(), key=lambda kv: (-kv[1], kv[0]))[:DRIFT_CATEGORIES]]
    total = max(sum(counts.values()), 1)
    run = np.array([counts.get(label, 0) / total for label in top] + [0.0])
    run[-1] = max(0.0, 1.0 - run[:-1].sum())
    ref = np.array([reference[label] for label in top] + [0.0])
    ref[-1] = max(0.0, 1.0 - ref[:-1].sum())
    return [*top, REST], run, ref


def rebin(shares: list[float], bins: int) -> np.ndarray:
    """Histogram shares regrouped into ``bins`` equal bins (``bins`` divides their number)."""
    shares = np.asarray(shares, dtype=np.float64)
    return shares.reshape(bins, -1).sum(axis=1) if len(shares) % bins == 0 else shares


def measure(run_id: str, model_version: str, counts: list[tuple[str, int, int]], reference: dict, *,
            threshold: float, min_products: int) -> dict:
    """The drift report of one version's tags in one run.

    ``counts``: (articleType, confidence bin 1..N, products) as ``run_tag_stats`` holds them;
    ``reference``: calibration.json's ``training_distribution``.
    """
    by_label: dict[str, int] = {}
    bins = len(reference.get("confidence_bins") or []) or 20
    histogram = np.zeros(bins)
    for label, confidence_bin, products in counts:
        by_label[label] = by_label.get(label, 0) + products
        histogram[min(max(int(confidence_bin), 1), bins) - 1] += products
    products = int(sum(by_label.values()))
    buckets, run_shares, ref_shares = category_shares(by_label, reference.get("categories") or {})
    ref_confidence = np.asarray(reference.get("confidence_bins") or np.zeros(bins), dtype=np.float64)
    run_confidence = histogram / max(histogram.sum(), 1)
    figures = {
        "category_js": round(jensen_shannon(run_shares, ref_shares), 6),
        "category_psi": round(population_stability_index(run_shares, ref_shares), 6),
        "confidence_js": round(jensen_shannon(run_confidence, ref_confidence), 6) if ref_confidence.sum() else None,
        "confidence_psi": round(population_stability_index(run_confidence, ref_confidence), 6)
        if ref_confidence.sum() else None,
    }
    # A confidence reference from fewer val products than a judged run is noise, not a distribution:
    # measured, not judged (calibration files without the count are judged, as before).
    reference_products = reference.get("val_products")
    judged = [figures["category_js"]]
    if figures["confidence_js"] is not None and (reference_products is None or reference_products >= min_products):
        judged.append(figures["confidence_js"])
    worst = max(judged)
    enough = products >= min_products
    alert = bool(enough and worst > threshold)
    shifts = sorted(zip(buckets, run_shares.tolist(), ref_shares.tolist(), strict=True),
                    key=lambda item: -abs(item[1] - item[2]))[:TOP_SHIFTS]
    if not enough:
        verdict = f"{products} products: fewer than {min_products}, measured but not judged"
    elif alert:
        verdict = (f"drift: divergence {worst:.3f} above {threshold:.3f} (articleType JS {figures['category_js']:.3f}, "
                   f"confidence JS {figures['confidence_js'] if figures['confidence_js'] is not None else '–'})")
    else:
        verdict = f"no drift: divergence {worst:.3f} <= {threshold:.3f}"
    return {
        "run_id": run_id, "model_version": model_version, "products": products, **figures,
        "threshold": float(threshold), "alert": alert,
        "details": {
            "verdict": verdict, "min_products": int(min_products),
            "top_shifts": [{"label": label, "run_share": round(run, 4), "training_share": round(ref, 4)}
                           for label, run, ref in shifts],
            "run_confidence_bins": [round(float(v), 4) for v in run_confidence],
            "training_confidence_bins": [round(float(v), 4) for v in ref_confidence],
        },
    }


def alert_callback(path: str) -> Callable[[dict], object] | None:
    """The callable named ``module:function`` (or ``module.function``); None for an empty setting."""
    if not path:
        return None
    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module or not name:
        raise ValueError(f"drift alert callback {path!r}: expected module:function")
    return getattr(importlib.import_module(module), name)


def raise_alert(report: dict, callback_path: str) -> None:
    """A run drifted: log a warning and call the configured callback (its failure is logged, not raised)."""
    log.warning("DRIFT ALERT run %s, model %s: %s (%d products; top shifts %s)", report["run_id"],
                report["model_version"], report["details"]["verdict"], report["products"],
                json.dumps(report["details"]["top_shifts"]))
    try:
        callback = alert_callback(callback_path)
        if callback is not None:
            callback(report)
    except Exception as error:  # the alert was logged and stored; a broken hook must not fail the run
        log.error("drift alert callback %r failed: %s: %s", callback_path, type(error).__name__, error)
