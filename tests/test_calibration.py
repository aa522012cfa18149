"""Calibration, review thresholds, drift figures and the significance gate: the pure functions.

Real data where it matters is in test_tagging.py (the tiny model's calibration.json, routed tags,
drift of real runs) and test_dags_e2e.py (the gate inside the retrain DAG); these check the
arithmetic on synthetic inputs whose answer is known.
"""

from __future__ import annotations

import numpy as np
import pytest

from fashion_tagging import calibration, drift
from fashion_tagging.evaluate import classification_scores, paired_scores
from fashion_tagging.pipeline import gate, mcnemar_exact_p_value


def overconfident_softmax(n: int, classes: int, true_temperature: float, seed: int = 0):
    """Labels drawn from softmax(logits), reported as softmax(logits / true_temperature) (over-confident for T < 1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, size=(n, classes))
    honest = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    truth = np.array([rng.choice(classes, p=row) for row in honest])
    reported = np.exp(logits / true_temperature)
    return reported / reported.sum(axis=1, keepdims=True), truth


def test_temperature_scaling_recovers_the_temperature_and_lowers_the_ece():
    probs, truth = overconfident_softmax(4000, 8, true_temperature=0.5)
    temperature = calibration.fit_temperature(calibration.log_probabilities(probs), truth)
    assert temperature == pytest.approx(2.0, rel=0.15)  # undoes the 1/0.5 sharpening
    calibrated = calibration.apply_temperature(calibration.log_probabilities(probs), temperature)
    assert (calibrated.argmax(axis=1) == probs.argmax(axis=1)).all()  # labels never change
    correct = probs.argmax(axis=1) == truth
    before = calibration.expected_calibration_error(probs.max(axis=1), correct)
    after = calibration.expected_calibration_error(calibrated.max(axis=1), correct)
    assert before > 0.1 and after < 0.03


def test_unlabelled_rows_are_left_out_of_the_fit():
    probs, truth = overconfident_softmax(2000, 5, true_temperature=0.5, seed=1)
    noisy = truth.copy()
    noisy[:1000] = -1
    log_probs = calibration.log_probabilities(probs)
    assert calibration.fit_temperature(log_probs, noisy) == pytest.approx(
        calibration.fit_temperature(log_probs[1000:], truth[1000:]))


def test_the_threshold_reaches_the_target_precision_with_the_most_coverage():
    confidences = np.array([0.99, 0.98, 0.97, 0.95, 0.90, 0.90, 0.80, 0.70])
    correct = np.array([True, True, True, True, True, False, True, False])
    assert calibration.choose_threshold(confidences, correct, 1.0) == 0.95  # the tie at 0.90 goes together
    assert calibration.choose_threshold(confidences, correct, 0.85) == 0.80  # 6 of 7 = 0.857
    assert calibration.choose_threshold(confidences, np.zeros(8, dtype=bool), 0.5) is None
    scores = calibration.routing_scores(confidences, correct, 0.95)
    assert scores["coverage"] == 0.5 and scores["accepted_accuracy"] == 1.0 and scores["review_accuracy"] == 0.5
    routed = calibration.auto_accepted(confidences, {"heads": {"h": {"temperature": 1.0, "threshold": 0.95}}}, "h")
    assert routed.tolist() == [True] * 4 + [False] * 4
    assert calibration.auto_accepted(confidences, {"heads": {"h": {"temperature": 1.0, "threshold": None}}},
                                     "h").sum() == 0
    assert calibration.auto_accepted(confidences, None, "h") is None


def test_ece_uses_sklearn_bins():
    confidences = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0])
    # bin 0.93-1.0: accuracy 1 vs 0.95 -> 0.05; bin 0.53-0.6: accuracy 0.5 vs 0.55 -> 0.05; each half the tags
    assert calibration.expected_calibration_error(confidences, correct) == pytest.approx(0.05)


def test_classification_scores_match_the_hand_computed_ones():
    scores = classification_scores(["a", "a", "b", "c"], ["a", "b", "b", "x"])
    assert scores["accuracy"] == 0.5 and scores["n"] == 4
    assert scores["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}
    assert scores["per_class"]["b"]["precision"] == 0.5 and scores["per_class"]["c"]["f1"] == 0.0
    assert scores["macro_f1"] == round((2 / 3 + 2 / 3 + 0) / 3, 4)  # over the classes present in the truth


def test_paired_scores_count_the_discordant_pairs():
    scores = paired_scores(["a", "b", "c", "d", ""], ["a", "b", "x", "x", "z"], ["a", "x", "c", "x", "z"])
    assert scores["products"] == 4  # the unlabelled product does not count
    assert (scores["candidate_only_right"], scores["production_only_right"]) == (1, 1)
    assert scores["both_right"] == 1 and scores["both_wrong"] == 1
    assert scores["candidate_accuracy"] == scores["production_accuracy"] == 0.5


def paired(b: int, c: int, n: int = 4000, production_accuracy: float = 0.95) -> dict:
    production_right = round(production_accuracy * n)
    return {"version": "cand", "article_type_accuracy": (production_right + b - c) / n,
            "paired": {"production_version": "prod", "products": n, "production_accuracy": production_accuracy,
                       "candidate_accuracy": (production_right + b - c) / n,
                       "candidate_only_right": b, "production_only_right": c}}


def test_mcnemar_exact_is_the_one_sided_binomial_test():
    assert mcnemar_exact_p_value(0, 0) == 1.0
    assert mcnemar_exact_p_value(3, 0) == pytest.approx(0.125)  # three fair coins all for the candidate
    assert mcnemar_exact_p_value(10, 10) == pytest.approx(0.588, abs=1e-3)
    assert mcnemar_exact_p_value(0, 5) == 1.0


def test_gate_rejects_below_baseline_even_without_production():
    decision = gate({"version": "c", "article_type_accuracy": 0.905}, 0.91, 0.05)
    assert decision["promote"] is False and "below the baseline" in decision["reason"]
    assert decision["candidate_accuracy"] == 0.905 and decision["production_accuracy"] is None


def test_gate_promotes_the_first_model_above_baseline():
    decision = gate({"version": "c", "article_type_accuracy": 0.93}, 0.91, 0.05)
    assert decision["promote"] is True and "no production model yet" in decision["reason"]


@pytest.mark.parametrize("b, c", [(0, 0), (14, 14), (20, 12), (5, 30)])
def test_gate_never_promotes_ties_noise_or_a_worse_candidate(b, c):
    decision = gate(paired(b, c), 0.91, 0.05)
    assert decision["promote"] is False and "not significantly better" in decision["reason"]
    assert decision["p_value"] >= 0.05 and decision["candidate_only_right"] == b
    assert decision["production_only_right"] == c and decision["production_version"] == "prod"


def test_gate_promotes_a_significantly_better_candidate_and_records_the_figures():
    decision = gate(paired(40, 15), 0.91, 0.05)
    assert decision["promote"] is True and decision["p_value"] < 0.001
    assert decision["paired_products"] == 4000 and "McNemar p = " in decision["reason"]
    assert gate(paired(40, 15), 0.91, 1e-6)["promote"] is False  # the significance level is the setting's


def reference(shares: dict[str, float]) -> dict:
    return {"categories": shares, "confidence_bins": [0.0] * 15 + [0.05, 0.05, 0.1, 0.2, 0.6]}


def run_counts(labels: list[str], seed: int = 0) -> list[tuple[str, int, int]]:
    """``run_tag_stats`` rows for products with those labels and a confidence histogram like the reference."""
    rng = np.random.default_rng(seed)
    bins = rng.choice(np.arange(16, 21), size=len(labels), p=[0.05, 0.05, 0.1, 0.2, 0.6])
    counts: dict[tuple[str, int], int] = {}
    for label, confidence_bin in zip(labels, bins, strict=True):
        counts[(label, int(confidence_bin))] = counts.get((label, int(confidence_bin)), 0) + 1
    return [(label, b, n) for (label, b), n in counts.items()]


SHARES = {f"type-{i}": share for i, share in enumerate([0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05])}


def test_a_run_of_one_type_alerts_and_an_in_distribution_run_does_not():
    rng = np.random.default_rng(3)
    in_distribution = list(rng.choice(list(SHARES), size=400, p=list(SHARES.values())))
    calm = drift.measure("calm", "v", run_counts(in_distribution), reference(SHARES), threshold=0.1, min_products=100)
    assert calm["alert"] is False and calm["category_js"] < 0.02 and calm["confidence_js"] < 0.02
    shifted = drift.measure("shift", "v", run_counts(["type-7"] * 400), reference(SHARES), threshold=0.1,
                            min_products=100)
    assert shifted["alert"] is True and shifted["category_js"] > 0.5 and shifted["category_psi"] > 1
    assert shifted["details"]["top_shifts"][0] == {"label": "type-7", "run_share": 1.0, "training_share": 0.05}
    few = drift.measure("few", "v", run_counts(["type-7"] * 40), reference(SHARES), threshold=0.1, min_products=100)
    assert few["alert"] is False and "not judged" in few["details"]["verdict"]


def test_a_confidence_collapse_alerts_on_its_own():
    rng = np.random.default_rng(4)
    labels = list(rng.choice(list(SHARES), size=400, p=list(SHARES.values())))
    counts: dict[tuple[str, int], int] = {}
    for label in labels:
        counts[(label, 9)] = counts.get((label, 9), 0) + 1  # every tag at 40-45 % confidence
    report = drift.measure("unsure", "v", [(label, b, n) for (label, b), n in counts.items()], reference(SHARES),
                           threshold=0.1, min_products=100)
    assert report["category_js"] < 0.02 and report["confidence_js"] > 0.5 and report["alert"] is True


def test_the_alert_calls_the_configured_callback(monkeypatch, caplog):
    received = []
    monkeypatch.setattr(drift, "_test_hook", received.append, raising=False)
    report = drift.measure("shift", "v", run_counts(["type-7"] * 200), reference(SHARES), threshold=0.1,
                           min_products=100)
    drift.raise_alert(report, "fashion_tagging.drift:_test_hook")
    assert received == [report] and "DRIFT ALERT run shift" in caplog.text
    drift.raise_alert(report, "no_such_module:hook")  # a broken hook is logged, never raised
    assert "callback 'no_such_module:hook' failed" in caplog.text


def test_a_confidence_reference_from_too_few_val_products_is_measured_not_judged():
    """A tiny val split's confidence histogram is noise: only the category shares can alert then."""
    counts = run_counts(["type-0"] * 60 + ["type-1"] * 40 + ["type-2"] * 30 + ["type-3"] * 20 + ["type-4"] * 20
                        + ["type-5"] * 10 + ["type-6"] * 10 + ["type-7"] * 10)
    odd_confidences = [(label, 1, n) for label, _, n in counts]  # every product in the lowest bin
    few = {**reference(SHARES), "val_products": 30}
    report = drift.measure("tiny-val", "v", odd_confidences, few, threshold=0.1, min_products=100)
    assert report["confidence_js"] > 0.5 and report["category_js"] < 0.02 and report["alert"] is False
    enough = {**reference(SHARES), "val_products": 4000}
    assert drift.measure("val", "v", odd_confidences, enough, threshold=0.1, min_products=100)["alert"] is True
