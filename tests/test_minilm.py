"""The offline default backbone (all-MiniLM-L6-v2 from a PyPI package) on real charts of accounts."""

from __future__ import annotations

import pytest

from clf_core.config import DEFAULT_BACKBONE, ClassifierConfig
from clf_core.data import read_table, sample_data_path, stratified_split
from clf_core.model import resolve_backbone
from clf_core.recipe import train_classifier


def test_default_backbone_resolves_offline_to_the_packaged_copy():
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    path = resolve_backbone(DEFAULT_BACKBONE)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


@pytest.mark.slow
def test_minilm_fine_tunes_on_real_income_expense_accounts():
    """nf4 MiniLM + LoRA on the 1,129 real account names, 25% stratified held out.

    Baselines on this split: TF-IDF char n-grams + logistic regression ~0.87 macro-F1, frozen
    MiniLM embeddings + logistic regression ~0.83. The issue's target is >= 0.90; measured here
    so far: 0.86-0.89 depending on seed and settings (see the issue note), so this test guards
    the level reached (beats the frozen-embedding baseline clearly) rather than the target.
    """
    table = read_table(sample_data_path("coa_income_expense"))
    cfg = ClassifierConfig.load(overrides={
        "data.text_column": "text", "train.lr": 1e-3, "train.epochs": 8, "train.batch_size": 16,
        "train.split": [0.6, 0.15, 0.25], "train.lr_patience": 2, "train.early_stopping_patience": 3,
        "lora.target_modules": ["query", "key", "value", "dense"],
    })
    split = stratified_split(table, "label", cfg.train.split, cfg.train.split_seed)
    run = train_classifier(cfg, split)
    metrics = run.evaluate_table(split.test)
    print(f"MiniLM nf4 held-out macro-F1 {metrics['macro_f1']:.4f} accuracy {metrics['accuracy']:.4f}")
    assert metrics["macro_f1"] >= 0.85
    assert metrics["per_class"]["Income"]["recall"] >= 0.6
