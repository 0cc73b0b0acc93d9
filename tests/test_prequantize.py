"""A pre-quantized nf4 base loads without re-quantizing and scores like the original, but only
when the artifact's publisher approved that exact copy (by content hash): `prequantized.json`
inside the copy vouches for nothing."""

import json
import shutil

import numpy as np
import pytest

from clf_core.model.artifact import open_artifact
from clf_core.errors import ArtifactError, ConfigError
from clf_core.model.backbone import PREQUANTIZED_META
from clf_core.model.predict import Predictor
from clf_core.model.prequantize import approve, prequantize
from conftest import ledger_rows


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory, tiny_artifact):
    """A pre-quantized copy of the tiny backbone, and a copy of tiny_artifact (the session's own is
    shared with other tests) whose publisher approved it: (copy, prequantize's answer, artifact)."""
    art = open_artifact(tiny_artifact)
    directory = tmp_path_factory.mktemp("nf4") / "base"
    meta = prequantize(art.config(), art.manifest["backbone"]["id"], directory)
    artifact = tmp_path_factory.mktemp("approved") / "model"
    shutil.copytree(tiny_artifact, artifact)
    assert approve(str(artifact), directory) == meta["sha256"]
    return directory, meta, str(artifact)


def test_prequantized_base_scores_like_quantize_on_load(tiny_artifact, prequantized):
    import bitsandbytes as bnb

    directory, meta, artifact = prequantized
    original_manifest = open_artifact(tiny_artifact).manifest
    assert meta["source"]["sha256"] == original_manifest["backbone"]["sha256"]
    approved = open_artifact(artifact).manifest
    assert approved["backbone"]["prequantized"] == [meta["sha256"]]
    # Approving a copy changes no prediction, so not the version (nor the label cache's keys).
    assert approved["model_version"] == original_manifest["model_version"]
    assert (directory / "model.safetensors").is_file() and not list(directory.glob("*.bin"))
    texts = ledger_rows(40, seed=21)["texts"].tolist()
    original = Predictor.load(tiny_artifact).predict(texts)
    loaded = Predictor.load(artifact, backbone=str(directory))
    # o_proj: q/k/v hold 16-bit copies with the LoRA merged in for scoring (clf_core.model.build.merge_lora_for_scoring)
    o_proj = loaded.model.base_model.model.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, bnb.nn.Linear4bit) and o_proj.weight.quant_state.quant_type == "nf4"
    after = loaded.predict(texts)
    assert after.labels == original.labels
    np.testing.assert_allclose(after.probabilities, original.probabilities, atol=1e-5)


def test_unapproved_prequantized_copy_is_refused(tiny_artifact, prequantized):
    with pytest.raises(ArtifactError, match="pre-quantized copy this artifact does not approve.*prequantize.approve"):
        Predictor.load(tiny_artifact, backbone=str(prequantized[0]))


def test_edited_prequantized_base_is_refused(prequantized, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(prequantized[0], copy)
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # a different model now, under the same metadata
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="is not the one model"):
        Predictor.load(prequantized[2], backbone=str(copy))


def test_copy_whose_prequantized_json_claims_the_original_is_refused(prequantized, tmp_path):
    """Other weights (another random tiny Mistral of the same shape, so the adapter fits),
    pre-quantized, whose prequantized.json is edited to claim it was made from the artifact's
    backbone: clf_core used to believe such a claim."""
    from jobs.support.tiny import build_tiny_mistral

    directory, _, artifact = prequantized
    cfg = open_artifact(artifact).config()
    forged = tmp_path / "forged"
    prequantize(cfg, str(build_tiny_mistral(tmp_path / "other", seed=1)), forged)
    with pytest.raises(ArtifactError, match="was quantized from a backbone with content sha256"):
        approve(artifact, forged)  # the publisher's check catches an honest mix-up...
    meta = json.loads((forged / PREQUANTIZED_META).read_text())
    meta["source"] = json.loads((directory / PREQUANTIZED_META).read_text())["source"]
    (forged / PREQUANTIZED_META).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="is not the one model"):  # ...and loading never trusts the claim
        Predictor.load(artifact, backbone=str(forged))


def test_prequantize_refuses_a_used_directory_and_a_prequantized_source(tiny_artifact, prequantized, tmp_path):
    cfg = open_artifact(tiny_artifact).config()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(ConfigError, match="used is not empty and holds no nf4 copy of"):
        prequantize(cfg, cfg.model.backbone, tmp_path / "used")
    # the same command again (the README pasted twice) keeps the copy it made: same answer, no rewrite
    directory, meta, _ = prequantized
    written = (directory / "model.safetensors").stat().st_mtime_ns
    assert prequantize(cfg, cfg.model.backbone, directory) == meta
    assert (directory / "model.safetensors").stat().st_mtime_ns == written
    assert (prequantized[0] / PREQUANTIZED_META).is_file()
    with pytest.raises(ConfigError, match="already pre-quantized"):
        prequantize(cfg, str(prequantized[0]), tmp_path / "again")
