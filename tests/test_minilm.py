"""The offline default backbone (all-MiniLM-L6-v2 from a PyPI package) on real charts of accounts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clf_core.model.artifact import Artifact, open_artifact
from clf_core.model.config import DEFAULT_BACKBONE, ClassifierConfig
from clf_core.model.labels import read_table, sample_data_path
from clf_core.training.data import stratified_split
from clf_core.errors import ConfigError
from clf_core.model.backbone import resolve_backbone
from clf_core.model.build import MaskedMeanPooler, build_classifier, load_tokenizer, resolve_hardware
from clf_core.model.predict import Predictor
from clf_core.training.recipe import train_classifier


def test_default_backbone_resolves_offline_to_the_packaged_copy():
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    path = resolve_backbone(DEFAULT_BACKBONE)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


def _untrained_minilm(pooling: str = "auto") -> Predictor:
    cfg = ClassifierConfig.load(overrides={"model.pooling": pooling})
    source = resolve_backbone(cfg.model.backbone)
    tokenizer = load_tokenizer(source, cfg.model.max_tokens)
    model = build_classifier(cfg, source, tokenizer, resolve_hardware(cfg.model), for_training=False)
    return Predictor(model, tokenizer, cfg.data.labels, cfg.model.max_tokens, "cpu", batch_size=4)


def test_minilm_pools_the_mean_of_real_tokens_and_padding_never_changes_it():
    predictor = _untrained_minilm()
    assert isinstance(predictor.model.base_model.model.bert.pooler, MaskedMeanPooler)
    texts = ["Gas", "Less: Gas Gas - Vacancy", "Plus: Misc. Other Income Deposit Fee",
             "Gross Potential Rent Potential Rent", "Rent", "Operating Expenses Occupancy Expenses Property Taxes"]
    batched = predictor.predict(texts)
    alone = np.concatenate([predictor.predict([t]).probabilities for t in texts])
    np.testing.assert_allclose(batched.probabilities, alone, atol=1e-4)
    # the [CLS] pooler gives other numbers from the same backbone weights: the setting really
    # switches the pooling
    native = _untrained_minilm("native")
    batch = predictor.tokenizer(texts, padding=True, return_tensors="pt")
    mean_pooled = predictor.model.base_model.model.bert(**batch).pooler_output
    cls_pooled = native.model.base_model.model.bert(**batch).pooler_output
    assert mean_pooled.shape == cls_pooled.shape and not np.allclose(mean_pooled.detach(), cls_pooled.detach(), atol=1e-3)


def test_mean_pooling_is_refused_for_a_decoder(tiny_backbone):
    cfg = ClassifierConfig.load(overrides={"model.backbone": tiny_backbone, "model.pooling": "mean"})
    tokenizer = load_tokenizer(tiny_backbone, 16)
    with pytest.raises(ConfigError, match="model.pooling = 'mean'.*'mistral'.*Use 'native' or 'auto'"):
        build_classifier(cfg, tiny_backbone, tokenizer, resolve_hardware(cfg.model))


def test_an_artifact_from_before_the_pooling_setting_loads_with_native_pooling(tiny_artifact):
    manifest = json.loads(json.dumps(open_artifact(tiny_artifact).manifest))
    manifest.pop("pooling", None)
    manifest["config"]["model"].pop("pooling")
    assert Artifact(open_artifact(tiny_artifact).path, manifest).config().model.pooling == "native"


@pytest.mark.slow
def test_minilm_fine_tunes_on_real_income_expense_accounts(tmp_path):
    """nf4 MiniLM + LoRA with the defaults (mean pooling, q/k/v + dense, lr 3e-4, up to 15 epochs)
    on the 1,129 real account names, each as a ledger prints it under its section (`full_path`),
    25% stratified held out (the seed's split seed 200), 65% train, 10% validation.

    One setting is not the default: early stopping after 2 epochs without improvement, not 5. On
    this split the best validation epoch is the 2nd; the default's 3 more epochs (40 s of the
    suite's time) only confirm it, and the best epoch's weights are the model either way.

    The issue's target is >= 0.90, above both baselines on these splits: TF-IDF character n-grams
    + logistic regression about 0.87-0.89, frozen MiniLM embeddings + logistic regression about
    0.83. Measured with these settings on split seeds 200 / 1 / 2: 0.910 / 0.914 / 0.901.
    """
    table = read_table(sample_data_path("coa_income_expense"))
    cfg = ClassifierConfig.load(overrides={"data.text_column": "full_path", "train.split": [0.65, 0.10, 0.25],
                                                "train.early_stopping_patience": 2})
    split = stratified_split(table, "label", cfg.train.split, cfg.train.split_seed)
    run = train_classifier(cfg, split)
    metrics = run.evaluate_table(split.test)
    print(f"MiniLM nf4 held-out macro-F1 {metrics['macro_f1']:.4f} accuracy {metrics['accuracy']:.4f}")
    assert metrics["rows"] == 283
    assert metrics["macro_f1"] >= 0.90
    assert metrics["per_class"]["Income"]["recall"] >= 0.7
    manifest = run.save(tmp_path / "model")
    assert manifest["pooling"] == "mean" and manifest["config"]["model"]["pooling"] == "mean"
