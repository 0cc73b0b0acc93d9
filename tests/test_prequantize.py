"""A pre-quantized nf4 base loads without re-quantizing, scores like the original, and still
passes (or fails) the artifact's backbone check."""

import json
import shutil

import numpy as np
import pytest

from clf_core.artifact import open_artifact
from clf_core.errors import ArtifactError, ConfigError
from clf_core.model import PREQUANTIZED_META
from clf_core.predict import Predictor
from clf_core.prequantize import prequantize
from conftest import ledger_rows


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory, tiny_artifact):
    art = open_artifact(tiny_artifact)
    directory = tmp_path_factory.mktemp("nf4") / "base"
    meta = prequantize(art.config(), art.manifest["backbone"]["id"], directory)
    return directory, meta


def test_prequantized_base_scores_like_quantize_on_load(tiny_artifact, prequantized):
    import bitsandbytes as bnb

    directory, meta = prequantized
    assert meta["source"]["sha256"] == open_artifact(tiny_artifact).manifest["backbone"]["sha256"]
    assert (directory / "model.safetensors").is_file() and not list(directory.glob("*.bin"))
    texts = ledger_rows(40, seed=21)["texts"].tolist()
    original = Predictor.load(tiny_artifact).predict(texts)
    loaded = Predictor.load(tiny_artifact, backbone=str(directory))
    q_proj = loaded.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_state.quant_type == "nf4"
    after = loaded.predict(texts)
    assert after.labels == original.labels
    np.testing.assert_allclose(after.probabilities, original.probabilities, atol=1e-5)


def test_edited_prequantized_base_is_refused(tiny_artifact, prequantized, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(prequantized[0], copy)
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # a different model now, under the same metadata
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="is not the one model"):
        Predictor.load(tiny_artifact, backbone=str(copy))


def test_prequantize_refuses_a_used_directory_and_a_prequantized_source(tiny_artifact, prequantized, tmp_path):
    cfg = open_artifact(tiny_artifact).config()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        prequantize(cfg, cfg.model.backbone, tmp_path / "used")
    assert (prequantized[0] / PREQUANTIZED_META).is_file()
    with pytest.raises(ConfigError, match="already pre-quantized"):
        prequantize(cfg, str(prequantized[0]), tmp_path / "again")
