"""The scoring forward of issue 27 at tiny size on CPU: LoRA merged for scoring, the compiled path
with its shape buckets, and Inductor's cache on the node. tests/test_gpu.py runs the compiled
path on a GPU."""

import functools

import numpy as np
import pytest
import torch

from clf_core.model.config import ClassifierConfig
from clf_core.errors import ConfigError
from clf_core.model.predict import Predictor, bucket, length_buckets, row_buckets, use_compile
from conftest import ledger_rows

# Lines of many lengths (2 to 29 tokens with the tiny tokenizer) and one past max_tokens (83 > 64).
TEXTS = ledger_rows(45, seed=3)["texts"].tolist() + ["Rent", "Operating Expenses " * 40]


def test_lora_merged_into_its_projections_scores_as_the_unmerged_model(tiny_artifact):
    unmerged = Predictor.load(tiny_artifact, compile="off", merge_lora=False)
    merged = Predictor.load(tiny_artifact, compile="off")
    from peft.tuners.lora import LoraLayer

    # q/k/v of both layers are plain Linear layers now: one matmul each, no adapter left.
    assert merged.forward_stats.merged_lora == 6
    assert not any(isinstance(m, LoraLayer) for m in merged.model.modules())
    assert type(merged.model.get_base_model().model.layers[0].self_attn.q_proj) is torch.nn.Linear
    np.testing.assert_allclose(merged.predict(TEXTS).probabilities, unmerged.predict(TEXTS).probabilities, atol=1e-5)


@pytest.mark.parametrize("backbone", ["tiny mistral", "minilm"])
def test_scoring_batches_hold_the_ids_training_encodes(backbone, tiny_backbone):
    """Predictor tokenizes each call once (lengths and ids from one call); its batches must be
    what clf_core.model.batching.encode_batch makes for training, truncation included (BERT keeps [SEP])."""
    from clf_core.model.batching import encode_batch
    from clf_core.model.backbone import packaged_minilm_dir
    from clf_core.model.build import load_tokenizer

    source = tiny_backbone if backbone == "tiny mistral" else packaged_minilm_dir()
    tokenizer = load_tokenizer(source, 12)
    predictor = Predictor(torch.nn.Module(), tokenizer, ["Expense", "Income"], 12, torch.device("cpu"), batch_size=4)
    texts = TEXTS[:9] + TEXTS[-2:]
    seen = []
    for idx, batch in predictor.batches(texts):
        expected, _ = encode_batch(tokenizer, [texts[i] for i in idx], 12)
        assert set(batch) == {"input_ids", "attention_mask"}
        for key in batch:
            assert torch.equal(batch[key], expected[key]), key
        seen += list(idx)
    assert sorted(seen) == list(range(len(texts)))
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert predictor.stats.truncated == sum(n > 12 for n in lengths) >= 2


def test_compile_setting_is_checked_and_auto_compiles_on_cuda_only():
    with pytest.raises(ConfigError, match=r"model.compile = 'sometimes': allowed: auto, on, off"):
        ClassifierConfig.from_dict({"model": {"compile": "sometimes"}}).validate()
    assert [use_compile(s, torch.device("cpu")) for s in ("auto", "on", "off")] == [False, True, False]
    assert [use_compile(s, torch.device("cuda", 0)) for s in ("auto", "on", "off")] == [True, True, False]


def test_buckets_round_lengths_and_row_counts_up_to_a_short_list():
    assert length_buckets(64) == [8, 16, 24, 32, 48, 64]
    assert length_buckets(20) == [8, 16, 20]          # never past max_tokens
    assert row_buckets(64) == [8, 16, 32, 64] and row_buckets(1024) == [128, 256, 512, 1024]
    assert row_buckets(2) == [1, 2]
    assert [bucket(n, [8, 16, 24]) for n in (1, 8, 9, 17, 24)] == [8, 8, 16, 24, 24]


def test_compiled_forward_meets_only_bucketed_shapes_compiles_each_once_and_scores_as_eager(tiny_artifact, monkeypatch):
    """The real dynamo (graphs, guards, recompiles) with its cheapest backend: Inductor's code
    generation takes seconds per shape on a CPU, and the next test covers it."""
    import accelerate.utils
    from torch._dynamo.utils import counters

    monkeypatch.setattr(accelerate.utils, "compile_regions",
                        functools.partial(accelerate.utils.compile_regions, backend="aot_eager"))
    torch._dynamo.reset()
    eager = Predictor.load(tiny_artifact, compile="off", batch_size=8)
    compiled = Predictor.load(tiny_artifact, compile="on", batch_size=8)
    expected = eager.predict(TEXTS).probabilities
    np.testing.assert_allclose(compiled.predict(TEXTS).probabilities, expected, atol=1e-5)

    fs = compiled.forward_stats
    allowed = {(rows, length) for rows in row_buckets(8) for length in length_buckets(64)}
    assert set(fs.shapes) <= allowed and len(allowed) == compiled.max_shapes == 4 * 6
    # 47 rows in batches of 8: five full batches and one of 7, which is padded to 8 rows
    assert all(rows == 8 for rows, _ in fs.shapes) and fs.recompiles == len(fs.shapes) >= 3
    # every compiled region (the decoder layer, shared by both layers, and the pieces around it)
    # was compiled once per shape: no graph break, no recompile but for a new shape
    graphs = counters["stats"]["unique_graphs"]
    assert graphs % fs.recompiles == 0
    compiled.predict(TEXTS[::-1])  # the same shapes in another order: nothing new to compile
    assert counters["stats"]["unique_graphs"] == graphs and fs.recompiles == len(fs.shapes)
    # padding to buckets is counted as computed tokens
    assert compiled.stats.padding_efficiency < eager.stats.padding_efficiency


def test_inductor_cache_on_the_node_spares_the_next_scorer_the_compile(tiny_artifact, tmp_path, monkeypatch):
    """A second scorer on the node (here: the same process after dynamo forgot everything, as a
    new actor would start) loads the compiled graph from <CLF_CACHE_DIR>/torchinductor."""
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from clf_core.model.predict import use_node_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator"))
    assert use_node_compile_cache() == str(tmp_path / "operator")   # an operator's choice wins
    # importing transformers writes torch's default (/tmp/torchinductor_<user>) into the variable
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("CLF_CACHE_DIR", str(tmp_path / "node"))
    texts = ["Gas", "Rent", "Water", "Parking Income"]   # one shape: 4 rows x 8 tokens
    counters.clear()
    torch._dynamo.reset()
    first = Predictor.load(tiny_artifact, compile="on", batch_size=8)
    expected = Predictor.load(tiny_artifact, compile="off").predict(texts).probabilities
    np.testing.assert_allclose(first.predict(texts).probabilities, expected, atol=1e-5)
    assert list(first.forward_stats.shapes) == [(4, 8)]
    assert counters["inductor"]["fxgraph_cache_miss"] >= 1 and counters["inductor"]["fxgraph_cache_hit"] == 0
    assert (tmp_path / "node" / "torchinductor" / "fxgraph").is_dir()

    counters.clear()
    torch._dynamo.reset()
    second = Predictor.load(tiny_artifact, compile="on", batch_size=8)
    np.testing.assert_allclose(second.predict(texts).probabilities, expected, atol=1e-5)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0
    assert second.forward_stats.warmup_s < first.forward_stats.warmup_s
