"""Labeled tables in, tokenized batches out.

Tokenization pads per batch (never to a dataset-wide maximum, which wastes most of the compute
on pad tokens for ledger lines of ~15 tokens) and counts
the texts that had to be truncated so the report can say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

import pandas as pd
import torch

from clf_core.errors import DataError
from clf_core.storage import filesystem

SAMPLE_DATASETS = {
    "coa_income_expense": "coa_income_expense.csv",
    "coa_all_types": "coa_all_types.csv",
}


def sample_data_path(name: str = "coa_income_expense") -> str:
    """Path of a real chart-of-accounts table shipped with the package (see sample_data/README.md)."""
    if name not in SAMPLE_DATASETS:
        raise DataError(f"unknown sample dataset {name!r}; available: {', '.join(SAMPLE_DATASETS)}")
    return str(resources.files("clf_core") / "sample_data" / SAMPLE_DATASETS[name])


class LabelMap:
    """Class names <-> output indices, in the configured order."""

    def __init__(self, labels: list[str]):
        self.names = [str(x) for x in labels]
        self.index = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def encode(self, values: list, where: str = "labels") -> list[int]:
        """Map label names to indices; unknown or missing values fail listing what was seen."""
        values = list(values)
        missing = sum(1 for v in values if v is None or (isinstance(v, float) and v != v))
        if missing:
            raise DataError(
                f"{missing} row(s) of {where} have no label; every training row needs one of "
                f"{self.names}. Drop or fill those rows."
            )
        unknown = sorted({str(v) for v in values} - set(self.index))
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise DataError(
                f"{where} hold label value(s) not in the configured labels {self.names}: {shown}. "
                f"Fix the data, or pass the full ordered list with --labels."
            )
        return [self.index[str(v)] for v in values]


def read_table(uri: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a CSV or Parquet file (local or s3://) into a DataFrame, with errors a user can act on."""
    fs, path = filesystem(uri)
    try:
        if not fs.exists(path):
            raise DataError(f"input {uri} does not exist. Check the path, bucket and AWS credentials.")
        lower = path.lower()
        with fs.open(path, "rb") as f:
            if lower.endswith((".parquet", ".pq")):
                table = pd.read_parquet(f)
            elif lower.endswith((".csv", ".csv.gz", ".txt")):
                table = pd.read_csv(f, compression="gzip" if lower.endswith(".gz") else None, keep_default_na=False, na_values=[""])
            else:
                raise DataError(f"input {uri}: unknown file type; use .csv or .parquet")
    except DataError:
        raise
    except PermissionError as exc:
        raise DataError(f"input {uri} cannot be read: permission denied ({exc}). Check credentials.") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"input {uri} is empty: it holds no header and no rows") from exc
    except Exception as exc:  # pyarrow / parser / network errors: name the file and the cause
        raise DataError(f"input {uri} cannot be read: {type(exc).__name__}: {exc}") from exc
    if columns:
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise DataError(
                f"input {uri} has no column {missing[0]!r}; its columns are {list(table.columns)}. "
                f"Pass the right name with --text-column / --label-column."
            )
    if len(table) == 0:
        raise DataError(f"input {uri} has a header but no rows")
    return table


@dataclass
class Split:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame


def stratified_split(table: pd.DataFrame, label_column: str, fractions: list[float], seed: int) -> Split:
    """Stratified train / validation / test split with a fixed seed (default 75/12.5/12.5)."""
    from sklearn.model_selection import train_test_split

    counts = table[label_column].value_counts()
    n_parts = sum(1 for f in fractions if f > 0)
    too_small = counts[counts < n_parts]
    if len(too_small):
        raise DataError(
            f"class {too_small.index[0]!r} has {int(too_small.iloc[0])} row(s); a stratified "
            f"{n_parts}-way split needs at least {n_parts} per class. Add rows for it or "
            f"remove it from --labels."
        )
    train_frac, val_frac, test_frac = fractions
    rest_frac = val_frac + test_frac
    try:
        train, rest = train_test_split(
            table, test_size=rest_frac, stratify=table[label_column], random_state=seed
        )
        if test_frac == 0:
            return Split(train, rest, rest.iloc[0:0])
        validation, test = train_test_split(
            rest, test_size=test_frac / rest_frac, stratify=rest[label_column], random_state=seed
        )
    except ValueError as exc:  # too few rows for the requested fractions
        raise DataError(
            f"cannot split {len(table)} rows {fractions} stratified by {label_column!r}: {exc}. "
            f"Use more rows or larger validation/test fractions."
        ) from exc
    return Split(train.reset_index(drop=True), validation.reset_index(drop=True), test.reset_index(drop=True))


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


@dataclass
class LabeledTexts(torch.utils.data.Dataset):
    """Texts and label indices, tokenized lazily per batch by `collate`."""

    texts: list[str]
    label_ids: list[int]
    stats: TokenStats = field(default_factory=TokenStats)

    @classmethod
    def from_table(cls, table: pd.DataFrame, text_column: str, label_column: str, labels: LabelMap, where: str) -> "LabeledTexts":
        texts = table[text_column].astype("string").fillna("").tolist()
        empty = sum(1 for t in texts if not t.strip())
        if empty:
            raise DataError(
                f"{where}: {empty} row(s) have an empty {text_column!r}; training rows need text. "
                f"Drop them first."
            )
        return cls(texts=texts, label_ids=labels.encode(table[label_column].tolist(), where=where))

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], self.label_ids[i]


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
