"""Checks that a trained artifact carries the calibration fitted on its own validation split.

Shared by tests/test_train_predict.py (CPU) and tests/test_gpu.py (the same checks in fp16 on a GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clf_core.model.calibration import MAX_T, MIN_T, nll, softmax

WRONG_VALIDATION_LABELS = 3


def with_wrong_validation_labels(split, count: int = WRONG_VALIDATION_LABELS):
    """`split` with `count` validation labels swapped, as real labels have some wrong: the
    temperature then has a best value to find (on rows a model gets all right with certainty, every
    small temperature fits as well, and no check of the fit can fail)."""
    wrong = split.validation.index[:count]
    labels = sorted(split.validation["label"].unique())
    split.validation.loc[wrong, "label"] = split.validation.loc[wrong, "label"].map(
        lambda label: labels[(labels.index(label) + 1) % len(labels)])
    return split


def raw_logits(predictor, texts: list[str]) -> np.ndarray:
    """The model's logits before the temperature, one forward over `texts`."""
    batch = predictor.tokenizer(texts, padding=True, return_tensors="pt").to(predictor.device)
    with torch.inference_mode():
        return predictor.model(**batch).logits.float().cpu().numpy()


def assert_carries_its_calibration(predictor, validation, manifest: dict) -> None:
    """The manifest's temperature fits the validation rows best (a nearby one, or none, fits worse),
    the loaded predictor applies it, and the review threshold flags the share of validation rows
    the review goal asked for."""
    temperature = manifest["calibration"]["temperature"]
    assert manifest["calibration"]["rows"] == len(validation) and predictor.temperature == temperature
    logits = raw_logits(predictor, validation["texts"].tolist())
    labels = np.array([predictor.label_names.index(label) for label in validation["label"]])
    fitted = nll(logits, labels, temperature)
    for other in (1.0, temperature * 1.25, temperature / 1.25):
        if MIN_T <= other <= MAX_T and abs(other - temperature) > 1e-3:
            assert fitted <= nll(logits, labels, other) + 1e-6, (temperature, other)
    review = manifest["review"]
    flagged = float((softmax(logits, temperature).max(-1) < review["threshold"]).mean())
    assert review["goal"] == "fraction" and review["value"] > 0
    assert flagged == pytest.approx(review["value"], abs=1.0 / len(labels))
    assert flagged == pytest.approx(review["expected_flagged"], abs=1.0 / len(labels))
