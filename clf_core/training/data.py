"""Training data: labeled rows split three ways, the texts and label indices a training loop
iterates, and reviewers' answers merged in (jobs.train --corrections): an answer overrides the
file's label for its text, answered texts the file lacks are added to training, a text is in one
split only.
Reading labeled files and tokenizing are the model's (clf_core.model.labels, .batching).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pandas as pd
import torch

from clf_core.errors import DataError
from clf_core.model.batching import TokenStats
from clf_core.model.labels import LabelMap

log = logging.getLogger(__name__)

ANSWERED = "_answered"   # a split's column: the row's label is a reviewer's answer


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


def add_answers(table, text_column: str, label_column: str, labels: list[str], catalog: str, identifier: str):
    """`table` with the answers of a corrections table merged in (see the module docstring), one
    row per text; and what they contributed, for the log, the report and the manifest."""
    import pandas as pd

    from clf_core.review.corrections import CorrectionsTable, latest_per_key

    corrections = CorrectionsTable(catalog, identifier)
    latest = latest_per_key(corrections.rows()).to_pylist()
    unscoped = {r["text"]: r["corrected_label"] for r in latest if not r["scope_column"]}
    scoped: dict[str, set[str]] = {}
    for r in latest:
        if r["scope_column"]:
            scoped.setdefault(r["text"], set()).add(r["corrected_label"])
    answers = dict(unscoped)
    skipped = 0
    for text, found in scoped.items():
        if len(found | ({unscoped[text]} if text in unscoped else set())) == 1:
            answers[text] = next(iter(found))
        else:
            answers.pop(text, None)   # the label depends on the scope: no fact about the text alone
            skipped += 1
    unknown = sorted(set(answers.values()) - set(labels))
    if unknown:
        raise DataError(f"--corrections {identifier} answers with label(s) {unknown} that are not among --labels "
                        f"{labels}; train with the labels the answers use")
    table = table.drop_duplicates(subset=[text_column], keep="first").copy()   # a text in one split only
    given = dict(zip(table[text_column].astype(str), table[label_column].astype(str)))
    overrides = sum(1 for t, a in answers.items() if t in given and given[t] != a)
    confirmed = sum(1 for t, a in answers.items() if t in given and given[t] == a)
    added = [t for t in answers if t not in given]
    table[label_column] = [answers.get(t, label) for t, label in zip(table[text_column].astype(str), table[label_column])]
    table[ANSWERED] = table[text_column].astype(str).isin(answers)
    extra = pd.DataFrame({text_column: added, label_column: [answers[t] for t in added], ANSWERED: True})
    merged = pd.concat([table, extra], ignore_index=True)
    contribution = {"table": identifier, "snapshot_id": corrections.snapshot_id, "answers": len(answers),
                    "overrides": overrides, "confirmed": confirmed, "added": len(added), "skipped_scoped": skipped}
    log.info("reviewers' answers from %s (snapshot %s): %d used: %d override the file's label, %d confirm it, %d new "
             "texts; %d text(s) skipped (their scoped answers disagree)", identifier, corrections.snapshot_id,
             len(answers), overrides, confirmed, len(added), skipped)
    return merged, contribution


def answers_into_splits(parts: dict, d, catalog: str, corrections: str) -> tuple[dict, dict]:
    """Explicit train / validation / test files with the answers: overrides apply where the text
    is, new answered texts go to training, and a text in several splits stays in the first."""
    import pandas as pd

    names = list(parts)
    merged, contribution = add_answers(pd.concat([parts[n].assign(_split=n) for n in names], ignore_index=True),
                                       d.text_column, d.label_column, d.labels, catalog, corrections)
    merged["_split"] = merged["_split"].fillna("train")
    return {n: merged[merged["_split"] == n].drop(columns="_split").reset_index(drop=True) for n in names}, contribution
