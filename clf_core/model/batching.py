"""Texts to model inputs, the way training and scoring both need them.

Tokenization pads per batch (never to a dataset-wide maximum, which wastes most of the compute
on pad tokens for ledger lines of ~15 tokens) and counts the texts that had to be truncated, so
the report can say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenStats:
    """What tokenization did to the texts: reported so that silent truncation cannot hide."""

    texts: int = 0
    truncated: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    longest: int = 0

    def add(self, other: "TokenStats") -> None:
        self.texts += other.texts
        self.truncated += other.truncated
        self.real_tokens += other.real_tokens
        self.padded_tokens += other.padded_tokens
        self.longest = max(self.longest, other.longest)

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Untruncated token counts (special tokens included), used for sorting and truncation stats."""
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def encode_batch(tokenizer, texts: list[str], max_tokens: int, lengths: list[int] | None = None) -> tuple[dict, TokenStats]:
    """Tokenize one batch, padded to its own longest row (capped at max_tokens)."""
    if lengths is None:
        lengths = token_lengths(tokenizer, texts)
    enc = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    enc.pop("token_type_ids", None)  # single-segment input: BERT's default is all zeros anyway
    stats = TokenStats(
        texts=len(texts),
        truncated=sum(1 for n in lengths if n > max_tokens),
        real_tokens=int(enc["attention_mask"].sum()),
        padded_tokens=int(enc["attention_mask"].numel()),
        longest=max(lengths, default=0),
    )
    return dict(enc), stats


class Collator:
    """DataLoader collate_fn: tokenizes a batch of (text, label) pairs with dynamic padding.

    Runs in the main process (num_workers=0): a fast tokenizer forked after use deadlocks or
    warns, and tokenizing a batch of short lines costs far less than the forward pass.
    """

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.stats = TokenStats()

    def __call__(self, rows: list[tuple[str, int]]) -> dict:
        texts = [t for t, _ in rows]
        batch, stats = encode_batch(self.tokenizer, texts, self.max_tokens)
        self.stats.add(stats)
        batch["labels"] = torch.tensor([y for _, y in rows], dtype=torch.long)
        return batch
