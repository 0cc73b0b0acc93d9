"""The library's one code path on a CUDA GPU: nf4 + LoRA training, calibration and scoring, the
scoring forward compiled with its LoRA merged (issue 27).

Skipped without a GPU (CI has none). Run on a GPU machine with `python -m pytest -m gpu`;
docs/performance.md says how it was run on a lent H200 (bitsandbytes carried as a wheel), and
`bash jobs/bench/gpu_session.sh` runs it with the rest of the GPU checks.
"""

import numpy as np
import pytest
import torch

from clf_core.model.config import ClassifierConfig
from clf_core.training.data import stratified_split
from clf_core.model.predict import Predictor, length_buckets, row_buckets
from clf_core.training.recipe import train_classifier
from conftest import ledger_rows
from support.calibration import assert_carries_its_calibration, with_wrong_validation_labels
from jobs.support.tiny import tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def tiny_cuda_config(backbone: str, compute_dtype: str) -> ClassifierConfig:
    return tiny_config(backbone, {"model.device": "cuda", "model.compute_dtype": compute_dtype})


def test_fp16_as_on_a_t4_trains_calibrates_and_scores_on_the_gpu(tiny_backbone, tmp_path):
    cfg = tiny_cuda_config(tiny_backbone, "float16")   # a T4 has no bf16: production computes in fp16
    split = stratified_split(ledger_rows(480, seed=1), "label", cfg.train.split, seed=200)
    split = with_wrong_validation_labels(split)   # the temperature has a best value to find
    run = train_classifier(cfg, split)
    assert run.prepared.hw.device.type == "cuda" and run.prepared.hw.compute_dtype == torch.float16
    assert run.evaluate_table(split.test)["accuracy"] >= 0.9
    manifest = run.save(tmp_path / "model")
    loaded = Predictor.load(str(tmp_path / "model"), device="cuda")
    assert_carries_its_calibration(loaded, split.validation, manifest)   # fitted in fp16, applied
    texts = split.test["texts"].tolist()
    assert loaded.predict(texts).labels == run.predictor().predict(texts).labels
    # a row gets the same probabilities alone or in a batch, in fp16 too
    alone = np.stack([loaded.predict([t]).probabilities[0] for t in texts[:16]])
    np.testing.assert_allclose(loaded.predict(texts[:16]).probabilities, alone, atol=5e-3)


def test_a_model_trained_on_the_gpu_scores_the_same_on_a_cpu(tiny_backbone, tmp_path):
    cfg = tiny_cuda_config(tiny_backbone, "auto")   # bf16 on sm_80+, fp32 on a CPU
    split = stratified_split(ledger_rows(480, seed=2), "label", cfg.train.split, seed=200)
    train_classifier(cfg, split).save(tmp_path / "model")
    texts = split.test["texts"].tolist()
    on_gpu = Predictor.load(str(tmp_path / "model"), device="cuda").predict(texts)
    on_cpu = Predictor.load(str(tmp_path / "model"), device="cpu").predict(texts)
    assert np.mean(np.array(on_gpu.labels) == np.array(on_cpu.labels)) >= 0.97
    assert np.abs(on_gpu.probabilities - on_cpu.probabilities).max() <= 0.05


def test_compiled_forward_with_lora_merged_scores_as_the_unmerged_eager_model(tiny_artifact):
    """What a scoring actor runs on a GPU by default (model.compile auto): the LoRA folded into
    16-bit q/k/v, the forward compiled for bucketed shapes; scores within 1e-3 of the unmerged
    eager model, in the GPU's own compute dtype (bf16 on sm_80+, fp16 on a T4)."""
    texts = ledger_rows(300, seed=5)["texts"].tolist() + ["Operating Expenses " * 40]  # one past max_tokens
    eager = Predictor.load(tiny_artifact, device="cuda", compile="off", merge_lora=False)
    scorer = Predictor.load(tiny_artifact, device="cuda")
    fs = scorer.forward_stats
    assert fs.compiled and fs.merged_lora == 6 and not eager.forward_stats.compiled
    np.testing.assert_allclose(scorer.predict(texts).probabilities, eager.predict(texts).probabilities, atol=1e-3)
    assert set(fs.shapes) <= {(r, n) for r in row_buckets(64) for n in length_buckets(64)}
    assert 1 <= fs.recompiles <= scorer.max_shapes and fs.warmup_s > 0
    shapes = dict(fs.shapes)
    scorer.predict(texts[::-1])   # the same shapes again: no compile
    assert fs.shapes == shapes
    # a row alone is padded to the smallest row bucket and still scores as in a batch
    alone = scorer.predict(texts[:1]).probabilities[0]
    np.testing.assert_allclose(alone, scorer.predict(texts).probabilities[0], atol=5e-3)
