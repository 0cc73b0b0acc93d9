"""Calibrated confidence and the review threshold (clf_core.model.calibration), on data whose true
probabilities are known, so every figure below has a right answer to be checked against."""

import json

import numpy as np
import pytest

from clf_core.model import calibration
from clf_core.model.calibration import (brier_score, choose_threshold, expected_calibration_error, fit_temperature,
                                  risk_coverage, softmax)
from clf_core.model.metrics import classification_metrics
from clf_core.training.report import build_report


def sampled(rows: int, classes: int, true_temperature: float, seed: int = 0):
    """Logits whose classes are drawn from softmax(logits / true_temperature): a model that is
    over-confident by exactly that factor."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4.0, size=(rows, classes))
    p = softmax(logits, true_temperature)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("classes,true_temperature", [(2, 2.5), (5, 1.8), (5, 0.7)])
def test_the_fitted_temperature_is_the_true_one(classes, true_temperature):
    logits, labels = sampled(20_000, classes, true_temperature)
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.08)


def test_calibration_removes_the_over_confidence_and_never_changes_the_class():
    val_logits, val_labels = sampled(4_000, 5, 2.5, seed=1)
    test_logits, test_labels = sampled(4_000, 5, 2.5, seed=2)
    fitted = calibration.fit(val_logits, val_labels, "fraction", 0.1)
    raw, calibrated = softmax(test_logits), softmax(test_logits, fitted.temperature)
    assert (raw.argmax(-1) == calibrated.argmax(-1)).all()
    assert expected_calibration_error(raw, test_labels) > 0.15
    assert expected_calibration_error(calibrated, test_labels) < 0.03
    assert brier_score(calibrated, test_labels) < brier_score(raw, test_labels)
    # the temperature can be switched off: 1.0, and the threshold then comes from raw confidences
    assert calibration.fit(val_logits, val_labels, "fraction", 0.1, calibrate=False).temperature == 1.0


def test_ece_and_brier_on_hand_computed_cases():
    # every row says 0.9 for class 0; half are class 0: confidence 0.9, accuracy 0.5
    p = np.tile([0.9, 0.1], (10, 1))
    y = np.array([0, 1] * 5)
    assert expected_calibration_error(p, y) == pytest.approx(0.4)
    assert brier_score(p, y) == pytest.approx((0.1 ** 2 * 2 + 0.9 ** 2 * 2) / 2)
    # perfectly calibrated bins: 0.6 confident and right 3 times in 5
    p = np.tile([0.6, 0.4], (5, 1))
    assert expected_calibration_error(p, np.array([0, 0, 0, 1, 1])) == pytest.approx(0.0)


def test_fraction_goal_flags_that_share_of_the_least_confident_rows():
    confidence = np.linspace(0.5, 0.999, 200)
    policy = choose_threshold(confidence, "fraction", 0.08)
    flagged = confidence < policy.threshold
    assert flagged.sum() == 16 and policy.expected_flagged == pytest.approx(0.08)
    assert confidence[flagged].max() < confidence[~flagged].min()   # the least confident ones
    assert choose_threshold(confidence, "fraction", 0.0).threshold == 0.0
    assert (confidence < choose_threshold(confidence, "fraction", 1.0).threshold).all()


def test_target_error_goal_flags_as_few_rows_as_meet_the_target():
    confidence = np.random.default_rng(3).uniform(0.5, 1.0, 1000)
    policy = choose_threshold(confidence, "target_error", 0.05)
    kept = np.sort(confidence[confidence >= policy.threshold])
    assert (1 - kept).mean() <= 0.05 == pytest.approx(policy.value)
    assert policy.expected_error_unflagged == pytest.approx((1 - kept).mean())
    # one row fewer flagged (the most confident flagged row kept) would miss the target
    one_more = np.concatenate([[np.sort(confidence[confidence < policy.threshold])[-1]], kept])
    assert (1 - one_more).mean() > 0.05
    # a target the model already meets flags nothing
    assert choose_threshold(confidence, "target_error", 0.5).expected_flagged == 0.0
    with pytest.raises(ValueError, match="unknown review goal 'typo'"):
        choose_threshold(confidence, "typo", 0.1)


def test_risk_coverage_counts_errors_caught_least_confident_first():
    confidence = np.array([0.55, 0.6, 0.9, 0.95, 0.99])
    correct = np.array([False, True, False, True, True])
    rc = risk_coverage(confidence, correct)
    assert rc["flagged"] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert rc["errors_caught"] == [0.0, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert rc["error_unflagged"][0] == pytest.approx(2 / 5)
    assert rc["error_unflagged"][3] == 0.0


def test_the_report_shows_calibration_and_review_with_both_plots():
    val_logits, val_labels = sampled(2_000, 2, 2.0, seed=4)
    test_logits, test_labels = sampled(1_000, 2, 2.0, seed=5)
    fitted = calibration.fit(val_logits, val_labels, "fraction", 0.1)
    figures = calibration.evaluate(test_logits, test_labels, fitted)
    assert figures["review"]["flagged"] == pytest.approx(0.1, abs=0.03)
    assert 0 < figures["review"]["errors_caught"] <= figures["review"]["errors"]
    test_metrics = classification_metrics(test_labels, softmax(test_logits).argmax(-1), ["Expense", "Income"])
    history = [{"epoch": 0, "train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.8, "val_macro_f1": 0.8}]
    files = build_report(test_metrics, history,
                         {"data": "synthetic"}, figures)
    for png in ("reliability.png", "risk_coverage.png"):
        assert files[png][:8] == b"\x89PNG\r\n\x1a\n" and len(files[png]) > 10_000
    report = files["report.md"].decode()
    assert f"| expected calibration error (15 bins) | {figures['ece']['before']:.4f} | {figures['ece']['after']:.4f} |" in report
    assert f"catches **{figures['review']['errors_caught']} of {figures['review']['errors']}** errors" in report
    metrics = json.loads(files["metrics.json"])
    assert metrics["calibration"]["ece"]["after"] < metrics["calibration"]["ece"]["before"]
