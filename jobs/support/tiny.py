"""Tiny Mistral-architecture backbones built in code, for tests and CPU benchmarks.

Nothing is downloaded: a byte-level BPE tokenizer is trained on the packaged account names in
well under a second, and a 2-layer Mistral with random weights is saved next to it in the
layout `from_pretrained` expects. Layer widths are multiples of 64 because bitsandbytes packs
4-bit weights in blocks of 64 on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

# The tiny model's recipe (LoRA rank, learning rate, ...), one file for tests, demo and bench.
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def tiny_config(backbone: str | Path, overrides: dict[str, Any] | None = None):
    """configs/tiny.yaml for `backbone`, with dotted overrides (e.g. {"train.epochs": 1})."""
    from clf_core.model.config import ClassifierConfig

    return ClassifierConfig.load(str(TINY_CONFIG), {"model.backbone": str(backbone), **(overrides or {})})


def build_byte_bpe_tokenizer(corpus: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Like Mistral's tokenizer: BOS first, no EOS appended.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_mistral(directory: str | Path, *, hidden_size: int = 128, layers: int = 2,
                       heads: int = 4, kv_heads: int = 2, intermediate_size: int = 256,
                       seed: int = 0, corpus: list[str] | None = None) -> Path:
    """Save a random-weight Mistral backbone and its tokenizer into `directory`; return it."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from clf_core.model.labels import sample_data_path

    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    if corpus is None:
        corpus = pd.read_csv(sample_data_path("coa_all_types"))["full_path"].tolist()
    tokenizer = build_byte_bpe_tokenizer(corpus)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
