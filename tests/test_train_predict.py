"""The QLoRA classifier on a tiny nf4 Mistral: learns, saves, loads, scores the same way."""

import json

import numpy as np
import pytest
import torch

from clf_core.model.artifact import open_artifact
from clf_core.training.data import stratified_split
from clf_core.errors import ArtifactError
from clf_core.model.predict import Predictor
from clf_core.training.recipe import train_classifier
from conftest import ledger_rows
from support.calibration import (WRONG_VALIDATION_LABELS, assert_carries_its_calibration, raw_logits,
                                 with_wrong_validation_labels)
from jobs.support.tiny import tiny_config as tiny_model_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone):
    cfg = tiny_model_config(tiny_backbone)
    split = stratified_split(ledger_rows(480, seed=1), "label", cfg.train.split, seed=200)
    split = with_wrong_validation_labels(split)   # the temperature has a best value to find
    run = train_classifier(cfg, split)
    directory = tmp_path_factory.mktemp("artifact") / "model"
    manifest = run.save(directory, metrics=run.evaluate_table(split.test))
    return run, split, directory, manifest


def test_base_is_nf4_and_only_lora_and_head_train(trained):
    import bitsandbytes as bnb

    model = trained[0].prepared.model
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".score." in n for n in trainable)
    assert any(".score." in n for n in trainable)


def test_reaches_95_percent_accuracy(trained):
    run, split = trained[:2]
    history = run.trainer.state.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    best = history[run.trainer.state.best_epoch]
    assert best["val_accuracy"] >= 0.95 - WRONG_VALIDATION_LABELS / len(split.validation)
    assert trained[3]["metrics"]["accuracy"] >= 0.95  # held-out test split


def test_save_then_load_gives_identical_predictions(trained):
    run, split, directory, manifest = trained
    texts = split.test["texts"].tolist()
    before = run.predictor().predict(texts)
    loaded = Predictor.load(str(directory))
    after = loaded.predict(texts)
    assert loaded.model_version == manifest["model_version"]
    assert after.labels == before.labels
    np.testing.assert_allclose(after.probabilities, before.probabilities, atol=1e-5)
    # Neither model, having scored, may have repacked its 4-bit weights into bitsandbytes'
    # eval-only AVX512-BF16 CPU layout, which scores differently and which training cannot use
    # (clf_core.model.build.load_base turns it off; a CPU without AVX512_BF16 never takes it).
    import bitsandbytes as bnb

    for model in (run.prepared.model, loaded.model):
        quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert quantized and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                                     for m in quantized)


def test_manifest_describes_the_model(trained):
    manifest = trained[3]
    assert manifest["labels"] == ["Expense", "Income"]
    assert manifest["backbone"]["sha256"] and manifest["backbone"]["id"]
    assert manifest["quantization"] == {"method": "nf4", "double_quant": True}
    assert manifest["lora"]["r"] == 8
    assert manifest["model_version"].startswith("v") and manifest["created_at"]
    assert "adapter.safetensors" in manifest["files"]
    assert manifest["notes"]["history"]


def test_padding_never_changes_a_prediction(trained):
    run, split = trained[0], trained[1]
    texts = split.test["texts"].tolist()[:20] + ["Gas", "Less: Unit Turnover RR - Appliance - Dishwasher Bldg A Other"]
    predictor = run.predictor(batch_size=8)
    batched = predictor.predict(texts)
    alone = np.concatenate([predictor.predict([t]).probabilities for t in texts])
    np.testing.assert_allclose(batched.probabilities, alone, atol=1e-4)
    assert batched.labels == [predictor.label_names[i] for i in alone.argmax(-1)]


def test_order_is_restored_after_length_sorting(trained):
    predictor = trained[0].predictor(batch_size=3)
    texts = ["Less: Repairs - Appliance - Dishwasher", "Rent", "Plus: Late Fee Unit 4", "Gas"]
    forward = predictor.predict(texts)
    backward = predictor.predict(texts[::-1])
    np.testing.assert_allclose(forward.probabilities, backward.probabilities[::-1], atol=1e-5)
    # and each row is the row scored alone: nothing was swapped between rows of different lengths
    alone = np.stack([predictor.predict([t]).probabilities[0] for t in texts])
    np.testing.assert_allclose(forward.probabilities, alone, atol=1e-4)


def test_tampered_artifact_is_refused(trained, tmp_path):
    import shutil

    directory = tmp_path / "copy"
    shutil.copytree(trained[2], directory)
    weights = directory / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="adapter.safetensors does not match its manifest"):
        Predictor.load(str(directory))


def test_pickle_beside_the_weights_is_refused(trained, tmp_path):
    import shutil

    directory = tmp_path / "copy"
    shutil.copytree(trained[2], directory)
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ArtifactError, match="does not list.*adapter_model.bin"):
        open_artifact(str(directory))


def test_the_artifact_carries_its_calibration_and_every_scorer_applies_it(trained, tmp_path):
    import shutil

    from clf_core.model.artifact import compute_model_version
    from clf_core.model.calibration import softmax

    run, split, directory, manifest = trained
    temperature = manifest["calibration"]["temperature"]
    loaded = Predictor.load(str(directory))
    assert_carries_its_calibration(loaded, split.validation, manifest)
    # the loaded predictor's probabilities are softmax(logits / T) of the same model's raw logits
    texts = split.test["texts"].tolist()[:20]
    np.testing.assert_allclose(loaded.predict(texts).probabilities, softmax(raw_logits(loaded, texts), temperature),
                               atol=1e-4)
    # the temperature and the threshold are part of the model's identity: edit one, and the
    # artifact is refused instead of scoring with confidences nobody measured
    assert compute_model_version({**manifest, "calibration": {**manifest["calibration"], "temperature": 1.0}}) \
        != manifest["model_version"]
    assert compute_model_version({**manifest, "review": {**manifest["review"], "threshold": 0.5}}) \
        != manifest["model_version"]
    edited = tmp_path / "edited"
    shutil.copytree(directory, edited)
    (edited / "manifest.json").write_text(json.dumps({**manifest, "review": {**manifest["review"], "threshold": 0.99}}))
    with pytest.raises(ArtifactError, match="model_version"):
        open_artifact(str(edited))


def test_edited_manifest_is_refused(trained, tmp_path):
    import shutil

    directory = tmp_path / "copy"
    shutil.copytree(trained[2], directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["labels"] = ["Income", "Expense"]  # swapping labels would silently invert every answer
    (directory / "manifest.json").write_text(json.dumps(manifest))
    # The top-level copy disagrees with the config the model is built from (the version covers that).
    with pytest.raises(ArtifactError, match=r"labels = \['Income', 'Expense'\] but its config"):
        open_artifact(str(directory))


def test_training_is_deterministic_under_a_fixed_seed(tiny_config):
    split = stratified_split(ledger_rows(96, seed=3), "label", tiny_config.train.split, seed=200)
    tiny_config.train.epochs = 1
    first = train_classifier(tiny_config, split).trainer.state.history[0]
    second = train_classifier(tiny_config, split).trainer.state.history[0]
    assert first["train_loss"] == pytest.approx(second["train_loss"], abs=1e-6)
    assert first["val_loss"] == pytest.approx(second["val_loss"], abs=1e-6)


def test_lr_drops_on_validation_plateau_and_early_stopping_ends_the_run(tiny_config):
    """lr so small that validation loss cannot improve after the first epoch."""
    split = stratified_split(ledger_rows(64, seed=4), "label", tiny_config.train.split, seed=200)
    tiny_config.train.lr = 1e-7
    tiny_config.train.epochs = 10
    tiny_config.train.lr_patience = 0
    tiny_config.train.early_stopping_patience = 2
    state = train_classifier(tiny_config, split).trainer.state
    lrs = [h["lr"] for h in state.history]
    assert state.stopped_early and len(state.history) < 10
    assert lrs[-1] < lrs[0]


def test_checkpoint_resume_continues_where_it_stopped(tiny_config, tmp_path):
    from clf_core.model.batching import Collator
    from clf_core.training.data import LabeledTexts
    from clf_core.training.recipe import prepare
    from clf_core.training.loop import Trainer, make_loader

    split = stratified_split(ledger_rows(96, seed=5), "label", tiny_config.train.split, seed=200)
    tiny_config.train.early_stopping_patience = 0

    def new_trainer():
        p = prepare(tiny_config)
        coll = Collator(p.tokenizer, 32)
        train = LabeledTexts.from_table(split.train, "texts", "label", p.labels, "train")
        val = LabeledTexts.from_table(split.validation, "texts", "label", p.labels, "val")
        return Trainer(p.model, tiny_config.train, tiny_config.data.labels, p.hw.device,
                       make_loader(train, coll, 16, True, tiny_config.train.seed),
                       make_loader(val, coll, 64, False, 0))

    uninterrupted = new_trainer()
    uninterrupted.fit()

    interrupted = new_trainer()
    tiny_config.train.epochs = 1
    interrupted.fit()
    interrupted.save_checkpoint(tmp_path / "ckpt")
    tiny_config.train.epochs = 3
    resumed = new_trainer()
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.state.next_epoch == 1
    resumed.fit()
    assert [h["epoch"] for h in resumed.state.history] == [0, 1, 2]
    for a, b in zip(resumed.state.history, uninterrupted.state.history):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


@pytest.mark.parametrize("damage", ["truncate weights", "drop optimizer", "half-written state.json", "no state.json"])
def test_a_half_written_or_altered_checkpoint_is_never_restored(trained, tmp_path, damage):
    from clf_core.errors import CheckpointError

    trainer = trained[0].trainer
    ckpt = trainer.save_checkpoint(tmp_path / "ckpt")
    before = {k: v.clone() for k, v in trainer.best_weights.items()}
    if damage == "truncate weights":
        data = (ckpt / "weights.safetensors").read_bytes()
        (ckpt / "weights.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "drop optimizer":
        (ckpt / "optimizer.safetensors").unlink()
    elif damage == "half-written state.json":
        text = (ckpt / "state.json").read_text()
        (ckpt / "state.json").write_text(text[: len(text) // 2])
    else:
        (ckpt / "state.json").unlink()
    with pytest.raises(CheckpointError, match="not restored"):
        trainer.load_checkpoint(ckpt)
    # nothing of the damaged checkpoint reached the trainer
    assert all(torch.equal(before[k], trainer.best_weights[k]) for k in before)


def test_multiclass_five_account_types_train_and_score(tiny_backbone):
    from clf_core.model.labels import read_table, sample_data_path

    table = read_table(sample_data_path("coa_all_types")).sample(600, random_state=0)
    labels = ["Asset", "Liability", "Equity", "Income", "Expense"]
    cfg = tiny_model_config(tiny_backbone, {"data.text_column": "full_path", "data.label_column": "root_type",
                                      "data.labels": labels, "train.epochs": 2})
    split = stratified_split(table, "root_type", cfg.train.split, seed=200)
    run = train_classifier(cfg, split)
    metrics = run.evaluate_table(split.test)
    assert len(metrics["confusion_matrix"]) == 5
    assert metrics["accuracy"] > 0.40  # majority class (Expense) is ~37%
    out = run.predictor().predict(split.test["full_path"].tolist())
    assert out.probabilities.shape == (len(split.test), 5)
    assert set(out.labels) <= set(labels)


def test_model_libraries_are_imported_once_with_the_collector_paused_then_frozen():
    """A new process (as a scorer or training worker starts): the first load imports transformers,
    peft and bitsandbytes without one garbage collection, freezes what they left and turns the
    collector back on; a second load changes nothing. (With the collector running, those imports
    cost a fifth of a scorer's start: clf_core.model.build.import_model_libraries.)"""
    import subprocess
    import sys

    probe = """
import gc, sys
from clf_core.model.build import import_model_libraries
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
import_model_libraries()
frozen = gc.get_freeze_count()
import_model_libraries()
print(len(collections), gc.isenabled(), frozen > 100_000, gc.get_freeze_count() == frozen,
      all(m in sys.modules for m in ("transformers", "peft", "bitsandbytes")))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "True", "True", "True", "True"], out.stdout
