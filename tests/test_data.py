"""Reading labeled tables, mapping labels, splitting, and per-batch tokenization."""

import pandas as pd
import pytest

from clf_core.model.batching import Collator, encode_batch
from clf_core.model.labels import LabelMap, read_table, sample_data_path
from clf_core.training.data import stratified_split
from clf_core.errors import DataError
from clf_core.model.build import load_tokenizer


def test_unknown_label_lists_values_and_fix():
    with pytest.raises(DataError) as err:
        LabelMap(["Expense", "Income"]).encode(["Income", "Revenue", "Expense"], where="train.csv")
    assert "'Revenue'" in str(err.value) and "--labels" in str(err.value)


def test_missing_label_is_refused():
    with pytest.raises(DataError, match="1 row"):
        LabelMap(["Expense", "Income"]).encode(["Income", None])


def test_missing_column_names_the_columns_and_the_flag(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"text": ["a"], "label": ["Income"]}).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        read_table(str(path), columns=["texts", "label"])
    assert "'texts'" in str(err.value) and "['text', 'label']" in str(err.value) and "--text-column" in str(err.value)


@pytest.mark.parametrize("content,expected", [("", "is empty"), ("texts,label\n", "no rows")])
def test_empty_files_are_refused(tmp_path, content, expected):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        read_table(str(path))


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_table(str(tmp_path / "nope.csv"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="bad.parquet cannot be read"):
        read_table(str(bad))


def test_stratified_split_is_seeded_and_keeps_class_shares():
    table = read_table(sample_data_path())
    a = stratified_split(table, "label", [0.75, 0.125, 0.125], seed=200)
    b = stratified_split(table, "label", [0.75, 0.125, 0.125], seed=200)
    assert a.train["text"].tolist() == b.train["text"].tolist()
    assert len(a.train) + len(a.validation) + len(a.test) == len(table)
    assert not set(a.train["text"]) & set(a.test["text"])
    share = table["label"].value_counts(normalize=True)["Income"]
    for part in (a.train, a.validation, a.test):
        assert abs(part["label"].value_counts(normalize=True)["Income"] - share) < 0.03


def test_class_too_small_to_split_names_it():
    table = pd.DataFrame({"texts": ["a", "b", "c", "d", "e"], "label": ["X", "X", "X", "X", "Y"]})
    with pytest.raises(DataError, match="class 'Y' has 1 row"):
        stratified_split(table, "label", [0.75, 0.125, 0.125], seed=0)


def test_batches_pad_to_their_own_longest_row_and_count_truncation(tiny_backbone):
    tokenizer = load_tokenizer(tiny_backbone, max_tokens=8)
    short = ["Gas", "Rent Income"]
    batch, stats = encode_batch(tokenizer, short, max_tokens=8)
    longest = max(len(tokenizer(t)["input_ids"]) for t in short)
    assert batch["input_ids"].shape[1] == longest < 8
    assert stats.truncated == 0
    long_text = "Less: Unit Turnover RR - Appliance - Dishwasher Replacement Parts and Labour"
    batch, stats = encode_batch(tokenizer, short + [long_text], max_tokens=8)
    assert batch["input_ids"].shape[1] == 8 and stats.truncated == 1
    assert 0 < stats.padding_efficiency < 1


def test_collator_attaches_labels(tiny_backbone):
    collate = Collator(load_tokenizer(tiny_backbone, 32), 32)
    batch = collate([("Gas", 0), ("Rent", 1)])
    assert batch["labels"].tolist() == [0, 1] and batch["input_ids"].shape[0] == 2
