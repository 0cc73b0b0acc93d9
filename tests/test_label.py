"""jobs.label / jobs.backfill: Ray Data labels Hive-partitioned ledgers in S3 into an Iceberg table.

Unit tests of the pieces (no Ray) come first; the integration tests then run the real jobs on the
session's local Ray cluster against the local S3 endpoint (moto_server) and a real catalog
(pyiceberg's SQL catalog on SQLite, warehouse on that endpoint), with the tiny nf4 model.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clf_core import storage
from clf_core.model.artifact import open_artifact
from clf_core.errors import ConfigError
from clf_core.labeling.cache import LabelCache
from clf_core.model.predict import Predictor
from clf_core.labeling.settings import LabelSettings, review_threshold
from clf_core.labeling.scoring import OUTPUT_COLUMNS, ApplyLabels, TextScorer, check_text
from clf_core.labeling.records import PartitionCommit
from clf_core.labeling.table import CommitError, LabeledTable
from clf_core.labeling.write import WriteDataFiles
from conftest import ledger_rows, train_tiny_artifact
from jobs import backfill, label
from jobs import table as table_job

DAYS = ["2024-03-01", "2024-03-02", "2024-03-03"]
FAST = ["--batch-size", "16", "--shuffle-partitions", "2", "--cpus-per-actor", "0.5"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- helpers --------------------------------------------------------------------------------------

def write_partition(root: str, day: str, table: pd.DataFrame | pa.Table, files: int = 2, name: str = "part") -> None:
    """One dt=<day>/ folder of `files` Parquet files holding `table`'s rows."""
    table = table if isinstance(table, pa.Table) else pa.Table.from_pandas(table, preserve_index=False)
    fs, base = storage.filesystem(root)
    step = -(-table.num_rows // files)
    for i in range(files):
        path = f"{base}/dt={day}/{name}-{i}.parquet"
        if not storage.is_remote(root):
            fs.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(table.slice(i * step, step), f)


def ledger_day(n: int, day_index: int, pool: list[str] | None = None) -> pd.DataFrame:
    """n ledger lines with a globally unique row_id and an extra typed column that must survive."""
    df = ledger_rows(n, seed=day_index).drop(columns=["label"])
    if pool is not None:
        df["texts"] = [pool[(i * 7 + day_index) % len(pool)] for i in range(n)]
    df["row_id"] = df["row_id"] + 10_000 * day_index
    df["amount"] = pd.array([None if i % 9 == 0 else i * 3 for i in range(n)], dtype="Int64")  # nullable int
    return df


def open_table(catalog: str, identifier: str) -> LabeledTable:
    return LabeledTable(catalog, identifier)


def read_labeled(catalog: str, identifier: str, **scan) -> pd.DataFrame:
    """The table as a pandas user reads it (pyiceberg scan), dt as the input's YYYY-MM-DD text."""
    table = open_table(catalog, identifier).table
    if table is None:
        return pd.DataFrame()
    out = table.scan(**scan).to_pandas()
    return out.assign(dt=out["dt"].astype(str)) if "dt" in out else out


def commits(catalog: str, identifier: str) -> dict[str, PartitionCommit]:
    return open_table(catalog, identifier).commits()


def snapshot_count(catalog: str, identifier: str) -> int:
    return len(open_table(catalog, identifier).table.snapshots())


def assert_exactly_once(catalog: str, identifier: str, inputs: pd.DataFrame) -> pd.DataFrame:
    """Every input row appears once in the table, with its input columns unchanged, and the table
    holds the input's columns (as Iceberg types) + the labeling columns + dt (an Iceberg date)."""
    from pyiceberg.catalog import Catalog
    from pyiceberg.types import DateType

    out = read_labeled(catalog, identifier)
    assert out["row_id"].is_unique, "a row was written twice"
    assert sorted(out["row_id"]) == sorted(inputs["row_id"])
    merged = inputs.merge(out, on="row_id", suffixes=("", "_out"))
    for column in inputs.columns.drop("row_id"):
        pd.testing.assert_series_equal(merged[column], merged[f"{column}_out"], check_names=False, check_dtype=False)
    schema = open_table(catalog, identifier).table.schema()
    wanted = Catalog._convert_schema_if_needed(pa.Table.from_pandas(inputs.drop(columns="dt"), preserve_index=False).schema)
    assert [f.name for f in schema.fields][:len(wanted.fields)] == [f.name for f in wanted.fields]
    assert [schema.find_field(f.name).field_type for f in wanted.fields] == [f.field_type for f in wanted.fields]
    assert set(OUTPUT_COLUMNS) | {"dt"} <= {f.name for f in schema.fields}
    assert isinstance(schema.find_field("dt").field_type, DateType)
    return out


def job_args(model, input_, catalog, table, cache, *extra):
    return ["--model", model, "--input", input_, "--catalog", catalog, "--output-table", table, "--cache", cache,
            *FAST, *extra]


def figures(report: str) -> dict[str, int]:
    """The numbers of a run's summary line (what `ray job logs` shows)."""
    line = next(l for l in report.splitlines() if l.startswith("labeled "))
    names = {"labeled": r"labeled (\d+) partition", "skipped": r"skipped (\d+)", "left": r"left to another run (\d+)",
             "failed": r"failed (\d+)", "rows_in": r"rows in (\d+)", "rows_out": r"out (\d+)",
             "errors": r"with error (\d+)", "review": r"to review (\d+)", "distinct": r"distinct texts (\d+)",
             "scored": r"scored (\d+)", "cache_hits": r"cache hits (\d+)"}
    return {k: int(re.search(p, line).group(1)) for k, p in names.items()}


def commit_rows(catalog: str, identifier: str, day: str, rows: pa.Table, run_id: str = "r1",
                model_version: str = "v1", expected_rows: int | None = None, planned_on=None,
                still_mine=lambda theirs: False):
    """What the job does for one partition, without Ray: make the table, write the labeled rows'
    data files (WriteDataFiles), commit them. Returns (outcome, record)."""
    labeled = open_table(catalog, identifier)
    input_rows = rows.drop_columns([c for c in OUTPUT_COLUMNS if c in rows.column_names])
    labeled.ensure(input_rows.schema, key_is_date=True)
    batch = rows.append_column("dt", pa.array([day] * rows.num_rows))
    written = WriteDataFiles(**labeled.writer_spec())(batch).to_pylist() if rows.num_rows else []
    record = PartitionCommit(f"dt={day}", run_id, model_version, ((f"in/{day}.parquet", 1, "e1"),), rows.num_rows, 0, 0)
    return labeled.commit_partition(f"dt={day}", day, [w["path"] for w in written],
                                    rows.num_rows if expected_rows is None else expected_rows, record,
                                    planned_on, still_mine)


def labeled_rows(texts: list, ids: list[int]) -> pa.Table:
    """Rows as ApplyLabels leaves them (input columns + the labeling columns)."""
    n = len(texts)
    return pa.table({"row_id": pa.array(ids, pa.int64()), "texts": pa.array(texts, pa.string()),
                     "label": ["Income"] * n, "confidence": [0.75] * n, "model_version": ["v1"] * n,
                     "labeled_at": pa.array([pd.Timestamp("2024-03-02", tz="UTC")] * n, pa.timestamp("us", tz="UTC")),
                     "error": pa.nulls(n, pa.string()), "needs_review": [i % 2 == 0 for i in range(n)],
                     "review_reason": ["low_confidence" if i % 2 == 0 else None for i in range(n)],
                     "label_source": ["model"] * n})


# ---- units (no Ray) -------------------------------------------------------------------------------

@pytest.mark.parametrize("value, why", [
    (None, "null"), (float("nan"), "null"), ("", "empty"), ("  \t", "whitespace"), (42, "not a string (int)"),
    (b"\xff\xfeRent", "not valid UTF-8"), ("x" * 51, "over the limit of 50"),
    ("x" * 100_000, "100000 characters long"), ("Rent\x00", "control character U+0000"),
    ("Less:\x1b[31m Gas", "control character U+001B"), ([1, 2], "not a string (list)"),
])
def test_bad_texts_get_a_reason(value, why):
    text, error = check_text(value, max_chars=50)
    assert text is None and why in error


def test_good_texts_pass_unchanged():
    assert check_text("Less: Repairs", 50) == ("Less: Repairs", None)
    assert check_text("Rent".encode(), 50) == ("Rent", None)
    # other scripts, symbols and whitespace are ordinary text
    for text in ("Аренда / Rent 租金", "Loyer – Café Ω", "Rent\tUnit 4", "Plus: 13th Month Pay (€)"):
        assert check_text(text, 50) == (text, None)


def test_scorer_adds_what_it_scores_to_the_cache_and_the_labeler_holds_only_the_runs_labels(tiny_artifact, tmp_path):
    scorer = TextScorer(tiny_artifact, str(tmp_path / "cache"), run_id="r1", batch_size=8)
    first = scorer(pd.DataFrame({"text": ["Rent", "Gas", "Water"]}))
    expected = scorer.predictor.predict(["Rent", "Gas", "Water"])
    assert first["text"].tolist() == ["Rent", "Gas", "Water"] and first["label"].tolist() == expected.labels
    cache = LabelCache(str(tmp_path / "cache"), scorer.predictor.model_version)
    assert cache.load() == dict(zip(first["text"], zip(first["label"], first["confidence"])))
    # pass 2: "Rent" came from pass 1's lookup, "Late Fee" was just scored; the labeler knows
    # those two (not the rest of the cache) and skips the lookup's misses (null labels)
    late_fee = scorer(pd.DataFrame({"text": ["Late Fee"]}))
    looked_up = pa.table({"text": ["Rent", "Late Fee"], "label": [first["label"][0], None],
                          "confidence": [first["confidence"][0], None]})
    run_only = ApplyLabels(str(tmp_path / "cache"), scorer.predictor.model_version, "texts", 50,
                           "2024-03-02T00:00:00+00:00", run_labels=[looked_up, late_fee])
    assert set(run_only.labels) == {"Rent", "Late Fee"}
    assert run_only.labels["Late Fee"] == (late_fee["label"][0], late_fee["confidence"][0])

    apply = ApplyLabels(str(tmp_path / "cache"), scorer.predictor.model_version, "texts", 50, "2024-03-02T00:00:00+00:00")
    rows = pa.table({"texts": ["Rent", None, "Late Fee"], "id": pa.array([1, None, 3], pa.int16())})
    out = apply(rows)
    assert out.column_names == ["texts", "id", *OUTPUT_COLUMNS]
    assert out["id"].type == pa.int16() and out["id"].to_pylist() == [1, None, 3]
    expected = scorer.predictor.predict(["Rent", "Late Fee"])
    assert out["label"].to_pylist() == [expected.labels[0], None, expected.labels[1]]
    assert out["error"].to_pylist() == [None, "text is null", None]
    assert out["model_version"].to_pylist() == [scorer.predictor.model_version] * 3
    # no threshold: only the row that could not be scored needs review
    assert out["needs_review"].to_pylist() == [False, True, False]
    strict = ApplyLabels(str(tmp_path / "cache"), scorer.predictor.model_version, "texts", 50,
                         "2024-03-02T00:00:00+00:00", review_threshold=1.0)
    assert strict(rows)["needs_review"].to_pylist() == [True, True, True]


@pytest.mark.integration
def test_a_small_cache_is_joined_by_broadcast_with_the_hash_joins_answer(ray_cluster, tmp_path):
    """The two lookups give the same rows: every text once per cache entry of it (a text cached
    twice comes back twice), nulls for a miss, entries naming another class dropped."""
    import ray

    from clf_core.labeling import cache as label_cache

    uri = str(tmp_path / "cache")
    cache = LabelCache(uri, "v000000000001")
    cache.append(pd.DataFrame({"text": ["Rent", "Gas", "Water"], "label": ["Income", "Expense", "Expense"],
                               "confidence": [0.9, 0.8, 0.7]}), "r1")
    cache.append(pd.DataFrame({"text": ["Rent", "Parking"], "label": ["Income", "Asset"],
                               "confidence": [0.9, 0.6]}), "r2")     # Rent twice; Asset is not a class
    texts = ray.data.from_items([{"text": t, "rows": n} for t, n in
                                 [("Rent", 3), ("Gas", 1), ("Late Fee", 2), ("Parking", 1)]]).materialize()
    def rows(broadcast_bytes: int, how: str) -> list[tuple]:
        joined = label_cache.lookup(texts, uri, "v000000000001", ["Expense", "Income"], 2, broadcast_bytes)
        assert how in str(joined), str(joined)       # the join this cache size asks for
        return sorted(tuple(r.values()) for r in joined.to_pandas()[["text", "rows", "label", "confidence"]]
                      .astype(object).where(lambda df: df.notna(), None).to_dict("records"))

    by_hash, by_broadcast = rows(0, "Join"), rows(label_cache.BROADCAST_CACHE_BYTES, "join_entries")
    assert by_broadcast == by_hash == [("Gas", 1, "Expense", 0.8), ("Late Fee", 2, None, None),
                                       ("Parking", 1, None, None), ("Rent", 3, "Income", 0.9),
                                       ("Rent", 3, "Income", 0.9)]


def test_the_run_shuffles_by_sort_unless_told_hash():
    """Ray's default shuffle starts aggregator actors (~5 s per shuffle, two per run); the run's
    shuffles move distinct texts only, so the job asks for sort shuffle unless told otherwise."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    from clf_core.labeling.pipeline import configure_ray_data

    ctx = ray.data.DataContext.get_current()
    before = ctx.shuffle_strategy
    base = {"model": "m", "input": "in", "catalog": "c", "output_table": "ns.t", "cache": "c1"}
    try:
        configure_ray_data(LabelSettings(**base))
        assert ctx.shuffle_strategy == ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        configure_ray_data(LabelSettings(**base, shuffle="hash"))
        assert ctx.shuffle_strategy == ShuffleStrategy.SHUFFLE_V2
    finally:
        ctx.shuffle_strategy = before
    with pytest.raises(ConfigError, match="--shuffle 'push'"):
        LabelSettings(**base, shuffle="push").validate()


def test_the_review_threshold_is_the_models_unless_overridden(tiny_artifact, tmp_path):
    import json
    import shutil

    from clf_core.model.artifact import LEGACY_REVIEW_THRESHOLD, compute_model_version

    published = open_artifact(tiny_artifact).manifest["review"]["threshold"]
    base = {"model": tiny_artifact, "input": "in", "catalog": "c", "output_table": "ns.t", "cache": "c1"}
    assert review_threshold(LabelSettings(**base)) == published != LEGACY_REVIEW_THRESHOLD
    assert review_threshold(LabelSettings(**base, review_threshold=0.42)) == 0.42
    with pytest.raises(ConfigError, match="--review-threshold 1.5: must be within"):
        LabelSettings(**base, review_threshold=1.5).validate()
    # a model published before thresholds were chosen on validation: its manifest has no `review`
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_artifact, legacy)
    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["review"]
    manifest["model_version"] = compute_model_version(manifest)
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    assert open_artifact(str(legacy)).review_threshold == LEGACY_REVIEW_THRESHOLD == 0.9
    assert review_threshold(LabelSettings(**{**base, "model": str(legacy)})) == LEGACY_REVIEW_THRESHOLD


def test_arguments_are_checked_before_any_work(capsys, tmp_path):
    base = ["--model", "m", "--input", "in", "--catalog", "c", "--output-table", "ns.t", "--cache", "c1"]
    assert label.main([*base, "--cache", "in"]) == 2
    assert "same as --input" in capsys.readouterr().err
    assert label.main([*base, "--actors", "0"]) == 2
    assert "--actors 0: must be at least 1" in capsys.readouterr().err
    assert label.main([*base, "--rows-per-call", "0"]) == 2
    assert "--rows-per-call 0: must be at least 1" in capsys.readouterr().err
    assert label.main([*base, "--output-table", "no_namespace"]) == 2
    assert "--output-table 'no_namespace': expected NAMESPACE.TABLE" in capsys.readouterr().err
    assert label.main(["--model", "m", "--input", "in", "--output-table", "ns.t", "--cache", "c1"]) == 2
    assert "--catalog is required" in capsys.readouterr().err
    assert backfill.main([*base, "--start", "2024-03-09", "--end", "2024-03-01"]) == 2
    assert "is after --end" in capsys.readouterr().err
    assert label.main([*base[:1], str(tmp_path / "nope"), *base[2:]]) == 2
    assert "no artifact at" in capsys.readouterr().err


def test_an_unconfigured_catalog_is_named_with_the_fix(monkeypatch, tiny_artifact, capsys):
    monkeypatch.setenv("PYICEBERG_HOME", "/nonexistent")
    assert label.main(["--model", tiny_artifact, "--input", "in", "--catalog", "nightly", "--output-table", "ns.t",
                       "--cache", "c1"]) == 2
    err = capsys.readouterr().err
    assert "--catalog 'nightly' is not configured" in err and "PYICEBERG_CATALOG__NIGHTLY__TYPE" in err


def test_ray_datas_footer_reader_pool_is_sized_to_the_files(monkeypatch):
    """Ray Data reads Parquet footers on 32 actors per read whatever the file count; a run sizes the
    pool to its files. Ray's own indexer is asserted to pick the size up, so an upgrade that moves
    the knob fails here instead of silently costing seconds per pass."""
    from ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer import FooterFileIndexer

    from clf_core.runtime import FOOTER_ACTORS_ENV, footer_readers_for

    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    for files, actors in ((1, 1), (10, 1), (11, 2), (5000, 32)):
        with footer_readers_for(files):
            assert FooterFileIndexer(ignore_missing_paths=False)._num_actors == actors
    assert FOOTER_ACTORS_ENV not in os.environ
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "7")  # an operator's own setting wins
    with footer_readers_for(1):
        assert FooterFileIndexer(ignore_missing_paths=False)._num_actors == 7


# ---- the table's commit, against the real catalog and S3 (no Ray) --------------------------------

@pytest.mark.integration
def test_commit_refuses_files_that_do_not_add_up_then_replaces_the_partition(iceberg_catalog, table_name):
    rows = labeled_rows(["a", "b", "c"], [1, 2, 3])
    with pytest.raises(CommitError, match="hold 3 rows for 4 input rows"):
        commit_rows(iceberg_catalog, table_name, DAYS[0], rows, expected_rows=4)
    assert read_labeled(iceberg_catalog, table_name).empty  # written files alone are never output
    assert snapshot_count(iceberg_catalog, table_name) == 0
    outcome, first = commit_rows(iceberg_catalog, table_name, DAYS[0], rows)
    assert outcome == "committed" and first.run_id == "r1" and first.input_rows == 3
    # the same partition again: its rows are replaced, not added; another partition is untouched
    commit_rows(iceberg_catalog, table_name, DAYS[1], labeled_rows(["x"], [9]))
    outcome, second = commit_rows(iceberg_catalog, table_name, DAYS[0], labeled_rows(["d", "e"], [4, 5]), run_id="r2",
                                  planned_on=first)
    out = read_labeled(iceberg_catalog, table_name).sort_values("row_id")
    assert out["row_id"].tolist() == [4, 5, 9] and out["dt"].tolist() == [DAYS[0], DAYS[0], DAYS[1]]
    assert commits(iceberg_catalog, table_name)[f"dt={DAYS[0]}"].run_id == "r2"
    summary = open_table(iceberg_catalog, table_name).table.current_snapshot().summary
    assert summary.operation.value == "overwrite" and summary["deleted-records"] == "3" and summary["added-records"] == "2"
    # a partition with no rows commits too, as labeled and empty
    outcome, empty = commit_rows(iceberg_catalog, table_name, DAYS[2], labeled_rows([], []))
    assert outcome == "committed" and commits(iceberg_catalog, table_name)[f"dt={DAYS[2]}"].input_rows == 0


@pytest.mark.integration
def test_a_commit_that_loses_the_race_rechecks_and_leaves_or_replaces(iceberg_catalog, table_name, monkeypatch):
    """Run B planned dt=X when it had no labels; run A commits it while B labels. B's commit sees
    A's record: a nightly B leaves the partition to A; a backfill B that would still relabel
    replaces it. A commit of A landing between B's check and B's commit is refused by Iceberg's
    validation (pyiceberg ValidationException) and checked again."""
    day = DAYS[0]
    # Two runs that both found no table create it at once: the second uses the first's.
    first, second = open_table(iceberg_catalog, table_name), open_table(iceberg_catalog, table_name)
    schema = pa.schema([("row_id", pa.int64()), ("texts", pa.string())])
    first.ensure(schema, key_is_date=True)
    assert second.table is None
    second.ensure(schema, key_is_date=True)
    assert second.table.metadata.table_uuid == first.table.metadata.table_uuid
    commit_rows(iceberg_catalog, table_name, DAYS[1], labeled_rows(["other"], [100]))
    b = open_table(iceberg_catalog, table_name)
    a_rows, b_rows = labeled_rows(["a1", "a2"], [1, 2]), labeled_rows(["b1", "b2"], [1, 2])

    # A commits after B's check, before B's transaction is committed: B's first attempt conflicts.
    real_transaction, raced = b.table.transaction, []

    def transaction_after_a_commits():
        if not raced:
            raced.append(commit_rows(iceberg_catalog, table_name, day, a_rows, run_id="run-A"))
        return real_transaction()

    monkeypatch.setattr(b.table, "transaction", transaction_after_a_commits)
    batch = b_rows.append_column("dt", pa.array([day] * 2))
    written = WriteDataFiles(**b.writer_spec())(batch).to_pylist()
    record = PartitionCommit(f"dt={day}", "run-B", "v1", ((f"in/{day}.parquet", 1, "e1"),), 2, 0, 0)
    seen = []
    outcome, theirs = b.commit_partition(f"dt={day}", day, [w["path"] for w in written], 2, record, None,
                                         still_mine=lambda other: seen.append(other) or False)
    assert raced and outcome == "left" and theirs.run_id == "run-A" and [s.run_id for s in seen] == ["run-A"]
    out = read_labeled(iceberg_catalog, table_name, row_filter=f"dt = '{day}'")
    assert sorted(out["texts"]) == ["a1", "a2"], "the race's loser must not have replaced the winner's rows"

    fs, _ = storage.filesystem(written[0]["path"])
    assert not any(fs.exists(w["path"]) for w in written), "the loser's files were left behind as orphans"

    # A backfill to another model (still_mine -> True) replaces A's labels instead, each row once.
    written = WriteDataFiles(**b.writer_spec())(batch).to_pylist()
    outcome, mine = b.commit_partition(f"dt={day}", day, [w["path"] for w in written], 2, record, None,
                                       still_mine=lambda other: True)
    assert outcome == "committed" and mine.run_id == "run-B"
    out = read_labeled(iceberg_catalog, table_name, row_filter=f"dt = '{day}'")
    assert sorted(out["texts"]) == ["b1", "b2"] and out["row_id"].is_unique


@pytest.mark.integration
def test_the_review_export_holds_the_flagged_rows_and_no_formula(iceberg_catalog, table_name, tmp_path):
    """The accountants' CSV: only needs_review rows, every input column plus label, confidence and
    error; a cell a spreadsheet would run as a formula starts with an apostrophe instead."""
    from clf_core.review.file import export_review

    texts = ["=HYPERLINK(\"http://x\",\"Rent\")", "Less: Gas", "+1 Deposit", "-Repairs", "@SUM(A1)", "\tTab", "Plus: Fee"]
    rows = labeled_rows(texts, list(range(len(texts))))  # needs_review on even row ids
    outcome, _ = commit_rows(iceberg_catalog, table_name, DAYS[0], rows)
    labeled = open_table(iceberg_catalog, table_name)
    files = [t.file.file_path for t in labeled.table.scan().plan_files()]
    target = str(tmp_path / "review" / f"dt={DAYS[0]}.csv")
    assert export_review(labeled.table.io, files, target) == 4
    csv = pd.read_csv(target, keep_default_na=False)
    assert csv.columns.tolist() == ["row_id", "texts", "label", "corrected_label", "confidence", "model_version",
                                    "error", "review_reason", "dt"]
    assert csv["corrected_label"].eq("").all()  # for the reviewer to fill
    assert csv["row_id"].tolist() == [0, 2, 4, 6]
    assert csv["texts"].tolist() == ["'=HYPERLINK(\"http://x\",\"Rent\")", "'+1 Deposit", "'@SUM(A1)", "Plus: Fee"]
    assert not csv["texts"].str.match(r"^[=+\-@\t\r]").any()


# ---- integration: real Ray, real S3, real catalog -------------------------------------------------

@pytest.mark.integration
def test_label_incremental_rerun_late_files_force_and_backfill(ray_cluster, s3_bucket, iceberg_catalog, table_name,
                                                              tiny_artifact, second_artifact, capsys):
    """Three nights with 90% repeated texts; then a no-op re-run (no new snapshot), a late file in
    a labeled night and a rewritten file in another plus a new night (warm cache), --force, and a
    backfill with a new model that resumes where it stopped."""
    src, cache = f"{s3_bucket}/ledgers", f"{s3_bucket}/label-cache"

    def args(*extra, model=tiny_artifact):
        return job_args(model, src, iceberg_catalog, table_name, cache, *extra)

    pool = ledger_rows(30, seed=99)["texts"].unique().tolist()
    days = {day: ledger_day(100, i, pool) for i, day in enumerate(DAYS)}
    for day, df in days.items():
        write_partition(src, day, df)
    inputs = pd.concat([df.assign(dt=day) for day, df in days.items()], ignore_index=True)

    assert label.main(args()) == 0
    out = capsys.readouterr().out
    run = figures(out)
    labeled = assert_exactly_once(iceberg_catalog, table_name, inputs)
    assert run["scored"] == len(pool) and run["cache_hits"] == 0  # 300 rows, only the distinct texts scored
    assert run["rows_in"] == run["rows_out"] == 300 and run["errors"] == 0 and run["labeled"] == 3
    assert labeled["label"].isin(["Expense", "Income"]).all() and labeled["error"].isna().all()
    assert labeled["confidence"].between(0.5, 1.0).all() and labeled["model_version"].nunique() == 1
    first = commits(iceberg_catalog, table_name)
    assert set(first) == {f"dt={d}" for d in DAYS} and all(c.input_rows == 100 for c in first.values())
    assert len({c.run_id for c in first.values()}) == 1 and all(len(c.input_files) == 2 for c in first.values())
    # the review queue is a query: exactly the rows under the threshold the model was published
    # with (chosen on validation), which the summary names with the errors expected among the rest
    threshold = open_artifact(tiny_artifact).manifest["review"]["threshold"]
    queue = read_labeled(iceberg_catalog, table_name, row_filter="needs_review = true")
    assert sorted(queue["row_id"]) == sorted(labeled.loc[labeled["confidence"] < threshold, "row_id"])
    assert run["review"] == len(queue)
    summary = next(l for l in out.splitlines() if l.startswith("labeled "))
    expected_errors = (1 - labeled.loc[labeled["confidence"] >= threshold, "confidence"]).sum()
    assert f"(threshold {threshold:.3f}; about {expected_errors:,.1f} errors expected among the rest)" in summary

    # Nothing new: a re-run commits nothing, not even an empty snapshot.
    snapshots = snapshot_count(iceberg_catalog, table_name)
    assert label.main(args()) == 0
    assert "skip 3 already labeled" in capsys.readouterr().out
    assert snapshot_count(iceberg_catalog, table_name) == snapshots and commits(iceberg_catalog, table_name) == first

    # A late file arrives in night 2, night 3's first file is rewritten with other rows, and a
    # missed night with 5 new texts: exactly those three partitions are relabeled, the warm cache
    # means only the new texts reach the model.
    late = ledger_day(10, 5, pool)
    write_partition(src, DAYS[1], late, files=1, name="late")
    rewritten = ledger_day(50, 6, pool)
    write_partition(src, DAYS[2], pa.Table.from_pandas(rewritten, preserve_index=False), files=1)  # replaces part-0
    new_day = ledger_day(100, 3, pool)
    new_texts = [f"Plus: Brand New Account {i}" for i in range(5)]
    new_day.loc[:9, "texts"] = new_texts * 2
    write_partition(src, "2024-03-04", new_day)
    assert label.main(args("--dry-run")) == 0
    plan_text = capsys.readouterr().out
    assert "1 file(s) added (late-0.parquet)" in plan_text and "1 file(s) rewritten (part-0.parquet)" in plan_text
    # (--rows-per-call 2: the scorer writes a cache file per 2 new texts; past --cache-max-files 2
    # the job compacts the version's cache into one file at the end)
    version = open_artifact(tiny_artifact).model_version
    assert len(LabelCache(cache, version).files()) == 1
    assert label.main(args("--rows-per-call", "2", "--cache-max-files", "2")) == 0
    run = figures(capsys.readouterr().out)
    assert (run["scored"], run["labeled"], run["skipped"]) == (5, 3, 1)
    compacted = LabelCache(cache, version)
    assert [os.path.basename(f).startswith("compacted-") for f in compacted.files()] == [True]
    assert len(compacted.load()) == len(pool) + 5
    second = commits(iceberg_catalog, table_name)
    assert second[f"dt={DAYS[0]}"] == first[f"dt={DAYS[0]}"]
    assert {second[f"dt={d}"].run_id for d in DAYS[1:]} == {second["dt=2024-03-04"].run_id} != {first[f"dt={DAYS[0]}"].run_id}
    night3 = pd.concat([rewritten, days[DAYS[2]].iloc[50:]], ignore_index=True)  # part-1 kept its 50 rows
    inputs = pd.concat([days[DAYS[0]].assign(dt=DAYS[0]), days[DAYS[1]].assign(dt=DAYS[1]), late.assign(dt=DAYS[1]),
                        night3.assign(dt=DAYS[2]), new_day.assign(dt="2024-03-04")], ignore_index=True)
    assert_exactly_once(iceberg_catalog, table_name, inputs)

    # --force plans every partition; --dry-run touches nothing.
    assert label.main(args("--force", "--dry-run")) == 0
    assert "would label 4 partition(s)" in capsys.readouterr().out
    assert commits(iceberg_catalog, table_name) == second

    # A backfill with a new model over a range relabels what another model labeled, and a re-run
    # after it (as after an interruption) skips what it finished.
    assert backfill.main(args("--start", DAYS[0], "--end", DAYS[1], model=second_artifact)) == 0
    capsys.readouterr()
    after = commits(iceberg_catalog, table_name)
    new_version = after[f"dt={DAYS[0]}"].model_version
    assert new_version != second[f"dt={DAYS[0]}"].model_version == after[f"dt={DAYS[2]}"].model_version
    assert after[f"dt={DAYS[1]}"].model_version == new_version
    assert after[f"dt={DAYS[2]}"] == second[f"dt={DAYS[2]}"] and after["dt=2024-03-04"] == second["dt=2024-03-04"]
    assert backfill.main(args("--start", DAYS[0], "--end", DAYS[2], "--dry-run", model=second_artifact)) == 0
    assert "would label 1 partition(s)" in capsys.readouterr().out  # only night 3, still on the old model
    assert_exactly_once(iceberg_catalog, table_name, inputs)


@pytest.mark.integration
def test_backfill_time_travel_rollback_and_expiry(ray_cluster, s3_bucket, iceberg_catalog, table_name,
                                                  tiny_artifact, second_artifact, capsys, local_s3):
    """A backfill tags the snapshot it replaces: the old labels stay readable by time travel, one
    command rolls the table back to them, and expiry removes old snapshots and the files only
    they referenced while the nightly job still skips every labeled partition."""
    src, cache = f"{s3_bucket}/ledgers", f"{s3_bucket}/label-cache"
    for i, day in enumerate(DAYS[:2]):
        write_partition(src, day, ledger_day(40, i))
    assert label.main(job_args(tiny_artifact, src, iceberg_catalog, table_name, cache)) == 0
    before = read_labeled(iceberg_catalog, table_name).sort_values("row_id").reset_index(drop=True)
    old_version = before["model_version"].iloc[0]

    assert backfill.main(job_args(second_artifact, src, iceberg_catalog, table_name, cache,
                                  "--start", DAYS[0], "--end", DAYS[0])) == 0
    labeled = open_table(iceberg_catalog, table_name)
    tags = [name for name in labeled.table.refs() if name.startswith("backfill-")]
    assert len(tags) == 1 and tags[0].startswith(f"backfill-{DAYS[0]}-{DAYS[0]}-")
    now = read_labeled(iceberg_catalog, table_name).sort_values("row_id").reset_index(drop=True)
    assert set(now.loc[now.dt == DAYS[0], "model_version"]) == {tags[0].rsplit("-", 1)[1]} != {old_version}
    assert set(now.loc[now.dt == DAYS[1], "model_version"]) == {old_version}

    # Time travel: dt = day 1 as of before the backfill, read the way the README shows.
    tagged = labeled.table.snapshot_by_name(tags[0]).snapshot_id
    as_of = read_labeled(iceberg_catalog, table_name, row_filter=f"dt = '{DAYS[0]}'", snapshot_id=tagged)
    pd.testing.assert_frame_equal(as_of.sort_values("row_id").reset_index(drop=True),
                                  before[before.dt == DAYS[0]].reset_index(drop=True), check_dtype=False)

    # Rollback in one command; the table reads as before, and its records with it: the backfill
    # would run again.
    assert table_job.main(["rollback", "--catalog", iceberg_catalog, "--output-table", table_name, "--to", tags[0]]) == 0
    pd.testing.assert_frame_equal(read_labeled(iceberg_catalog, table_name).sort_values("row_id").reset_index(drop=True),
                                  before, check_dtype=False)
    capsys.readouterr()
    assert backfill.main(job_args(second_artifact, src, iceberg_catalog, table_name, cache,
                                  "--start", DAYS[0], "--end", DAYS[0], "--dry-run")) == 0
    assert "would label 1 partition(s)" in capsys.readouterr().out
    assert table_job.main(["history", "--catalog", iceberg_catalog, "--output-table", table_name]) == 0
    assert tags[0] in capsys.readouterr().out

    # Expiry: everything but the current snapshot (the tag goes too: its cutoff passed). The files
    # of the undone backfill and of nothing current are deleted; every current file stays; the
    # nightly job still finds every partition labeled.
    table = open_table(iceberg_catalog, table_name).table
    live = {task.file.file_path for task in table.scan().plan_files()}
    fs = local_s3.filesystem()
    data_dir = table.location().split("://", 1)[1] + "/data"
    on_disk = {"s3://" + p for p in fs.find(data_dir)}
    assert live < on_disk, "the backfill's files should still be stored before expiry"
    assert table_job.main(["expire", "--catalog", iceberg_catalog, "--output-table", table_name, "--older-than", "0s"]) == 0
    assert "removed tags ['backfill-" in capsys.readouterr().out
    table = open_table(iceberg_catalog, table_name).table
    assert len(table.snapshots()) == 1 and not [n for n in table.refs() if n != "main"]
    fs.invalidate_cache()
    assert {"s3://" + p for p in fs.find(data_dir)} == live
    pd.testing.assert_frame_equal(read_labeled(iceberg_catalog, table_name).sort_values("row_id").reset_index(drop=True),
                                  before, check_dtype=False)
    assert label.main(job_args(tiny_artifact, src, iceberg_catalog, table_name, cache, "--dry-run")) == 0
    assert "would label 0 partition(s)" in capsys.readouterr().out


@pytest.mark.integration
def test_bad_rows_are_kept_and_a_corrupt_file_fails_only_its_partition(ray_cluster, s3_bucket, iceberg_catalog,
                                                                       table_name, tiny_artifact, capsys):
    src, cache = f"{s3_bucket}/ledgers", f"{s3_bucket}/label-cache"
    good = ledger_day(40, 0)
    bad_texts = [None, "", "   ", "x" * 3000, "Rent"]
    good.loc[:4, "texts"] = bad_texts
    write_partition(src, DAYS[0], good)
    write_partition(src, DAYS[1], ledger_day(40, 1))
    fs, _ = storage.filesystem(src)
    with fs.open(f"{src}/dt={DAYS[1]}/part-1.parquet", "wb") as f:  # truncated upload: the footer is gone
        f.write(b"PAR1" + b"\x00" * 100)
    write_partition(src, DAYS[2], ledger_day(40, 2).rename(columns={"texts": "memo"}))
    with fs.open(f"{src}/dt=2024-03-04/part-0.parquet", "wb") as f:
        pq.write_table(pa.table({"texts": ["Rent"], "label": ["Income"]}), f)

    assert label.main(job_args(tiny_artifact, src, iceberg_catalog, table_name, cache)) == 1
    report = capsys.readouterr().out
    assert f"dt={DAYS[1]}/part-1.parquet" in report and "cannot read" in report
    assert f"dt={DAYS[2]}/part-0.parquet has no text column 'texts'" in report
    assert "already has column(s) ['label']" in report
    assert set(commits(iceberg_catalog, table_name)) == {f"dt={DAYS[0]}"}
    labeled = assert_exactly_once(iceberg_catalog, table_name, good.assign(dt=DAYS[0])).set_index("row_id")
    bad = labeled.loc[good["row_id"][:4]]
    assert bad["label"].isna().all() and bad["confidence"].isna().all() and bad["needs_review"].all()
    assert [e.split(" (")[0] for e in bad["error"]] == [
        "text is null", "text is empty", "text is only whitespace",
        "text is 3000 characters long, over the limit of 2000"]
    rest = labeled.drop(index=good["row_id"][:4])
    assert rest["error"].isna().all() and rest["label"].notna().all()
    assert figures(report)["errors"] == 4


def _processes(name: str):
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if name in " ".join(proc.info["cmdline"] or []):
            yield proc


@pytest.mark.integration
def test_an_actor_killed_mid_run_does_not_lose_or_repeat_rows(ray_cluster, s3_bucket, iceberg_catalog, table_name,
                                                              tiny_artifact):
    src, cache = f"{s3_bucket}/ledgers", f"{s3_bucket}/label-cache"
    days = {day: ledger_day(120, i) for i, day in enumerate(DAYS)}
    for day, df in days.items():
        write_partition(src, day, df, files=3)
    result = {}
    args = job_args(tiny_artifact, src, iceberg_catalog, table_name, cache,
                    "--batch-size", "4", "--rows-per-call", "4")  # many calls to interrupt
    job = threading.Thread(target=lambda: result.update(rc=label.main(args)))
    job.start()
    killed = []
    fs, _ = storage.filesystem(cache)
    deadline = time.monotonic() + 120
    while job.is_alive() and not killed and time.monotonic() < deadline:
        fs.invalidate_cache()
        scoring = fs.exists(cache) and fs.find(cache)  # the actor has scored at least one batch
        for proc in _processes("MapBatches(TextScorer)") if scoring else ():
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)
        time.sleep(0.05)
    job.join(timeout=300)
    assert killed, "the scoring actor finished before it could be killed; the test proved nothing"
    assert result["rc"] == 0
    inputs = pd.concat([df.assign(dt=d) for d, df in days.items()], ignore_index=True)
    out_rows = assert_exactly_once(iceberg_catalog, table_name, inputs)
    # the labels are a clean run's: the same model scoring the same texts with no fault

    clean = Predictor.load(tiny_artifact).predict(out_rows["texts"].tolist())
    assert out_rows["label"].tolist() == clean.labels
    assert out_rows["confidence"].to_numpy() == pytest.approx(clean.confidence, abs=1e-4)


def run_driver(ray_cluster, args: list[str], module: str = "jobs.label", **popen) -> subprocess.Popen:
    """`python -m jobs.label ...` as its own driver process joined to the session's Ray cluster."""
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=REPO, **popen)


@pytest.mark.integration
def test_a_crash_during_the_write_leaves_nothing_partial_and_a_rerun_completes(ray_cluster, s3_bucket, iceberg_catalog,
                                                                               table_name, tiny_artifact, local_s3):
    """The job's driver is SIGKILLed as soon as its first data file is stored."""
    src, cache = f"{s3_bucket}/ledgers", f"{s3_bucket}/label-cache"
    days = {day: ledger_day(120, i) for i, day in enumerate(DAYS)}
    for day, df in days.items():
        write_partition(src, day, df, files=4)
    namespace, name = table_name.split(".")
    data_dir = f"iceberg-warehouse/warehouse/{namespace}/{name}/data"  # the SQL catalog's default location
    driver = run_driver(ray_cluster, job_args(tiny_artifact, src, iceberg_catalog, table_name, cache, "--batch-size", "8"),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs = local_s3.filesystem()
    written = []
    deadline = time.monotonic() + 180
    while driver.poll() is None and not written and time.monotonic() < deadline:
        fs.invalidate_cache()
        written = fs.find(data_dir) if fs.exists(data_dir) else []
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    assert written, "the job ended before writing anything; the crash was not injected"
    visible = commits(iceberg_catalog, table_name)
    assert len(visible) < len(DAYS), "every partition committed before the crash; nothing was tested"
    partial = read_labeled(iceberg_catalog, table_name)
    for partition in visible:  # whatever is visible is whole
        assert (partial["dt"] == partition[3:]).sum() == 120
    assert len(partial) == 120 * len(visible)

    assert label.main(job_args(tiny_artifact, src, iceberg_catalog, table_name, cache)) == 0
    inputs = pd.concat([df.assign(dt=d) for d, df in days.items()], ignore_index=True)
    assert_exactly_once(iceberg_catalog, table_name, inputs)
    # The crashed run's files are orphans: listed by no snapshot, read by no one, removed by the
    # maintenance command once older than its cutoff.
    labeled = open_table(iceberg_catalog, table_name)
    live = {t.file.file_path for t in labeled.table.scan().plan_files()}
    fs.invalidate_cache()
    stored = {"s3://" + p for p in fs.find(data_dir)}
    assert stored - live, "the crashed run left no data file behind; the orphan check proved nothing"
    assert table_job.main(["remove-orphans", "--catalog", iceberg_catalog, "--output-table", table_name,
                           "--older-than", "0s"]) == 0
    fs.invalidate_cache()
    assert {"s3://" + p for p in fs.find(data_dir)} == live
    assert_exactly_once(iceberg_catalog, table_name, inputs)


def assert_every_reader_sees_each_row_once(catalog: str, identifier: str, rows_per_day: dict[str, int],
                                           model: str) -> None:
    """pyiceberg to Arrow and pandas, Ray Data's read_iceberg, DuckDB and polars over the Arrow
    scan: rows in == rows out, each once; a date filter reads only that partition's files."""
    import duckdb
    import polars as pl
    import ray

    from clf_core.catalog import catalog_config

    table = open_table(catalog, identifier).table
    arrow = table.scan().to_arrow()
    ids = sorted(arrow["row_id"].to_pylist())
    assert len(ids) == len(set(ids)) == sum(rows_per_day.values())
    assert sorted(table.scan().to_pandas()["row_id"]) == ids
    via_ray = ray.data.read_iceberg(table_identifier=identifier,
                                    catalog_kwargs={"name": catalog, **catalog_config(catalog)})
    assert sorted(via_ray.to_pandas()["row_id"]) == ids
    per_day = duckdb.sql("SELECT CAST(dt AS VARCHAR) AS dt, count(*) AS n, count(DISTINCT row_id) AS ids "
                         "FROM arrow GROUP BY dt ORDER BY dt").fetchall()
    assert per_day == [(day, n, n) for day, n in sorted(rows_per_day.items())]
    frame = pl.from_arrow(arrow)
    assert frame["row_id"].n_unique() == frame.height == len(ids)
    review = duckdb.sql("SELECT count(*) FROM arrow WHERE needs_review").fetchall()[0][0]
    threshold = open_artifact(model).manifest["review"]["threshold"]  # the model's own
    assert review == frame.filter(pl.col("confidence") < threshold).height
    # partition pruning: a filter on dt plans only that day's files
    day = sorted(rows_per_day)[1]
    one_day = list(table.scan(row_filter=f"dt = '{day}'").plan_files())
    assert one_day and all(f"dt={day}" in task.file.file_path for task in one_day)


@pytest.mark.integration
def test_two_label_jobs_at_once_write_every_row_once(ray_cluster, s3_bucket, iceberg_catalog, table_name,
                                                    tiny_artifact, second_artifact):
    """Two real job processes on the same partitions and the same catalog, two rounds of new
    nights. Round 1: two nightly runs (a retried cron): each partition is committed by one and
    left by the other. Round 2: a nightly run and a backfill to another model over every night:
    whichever commits first, the backfill's labels are the ones kept. After each round every row
    is in the table once, every file a snapshot lists exists, and no data file is unlisted; at the
    end every reader the users have sees each row once (`assert_every_reader_sees_each_row_once`)."""
    src, cache = f"{s3_bucket}/ledgers", f"{s3_bucket}/label-cache"
    pool = ledger_rows(40, seed=5)["texts"].unique().tolist()
    inputs = []
    rounds = {1: [("jobs.label", tiny_artifact, ()), ("jobs.label", tiny_artifact, ())],
              2: [("jobs.label", tiny_artifact, ()),
                  ("jobs.backfill", second_artifact, ("--start", "2024-04-01", "--end", "2024-04-04"))]}
    for round_, pair in rounds.items():
        for k in range(2):
            day = f"2024-04-{round_ * 2 + k - 1:02d}"
            df = ledger_day(60, 20 + round_ * 2 + k, pool)
            write_partition(src, day, df)
            inputs.append(df.assign(dt=day))
        jobs = [run_driver(ray_cluster, job_args(model, src, iceberg_catalog, table_name, cache, *extra), module=module,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for module, model, extra in pair]
        outputs = [job.communicate(timeout=400)[0] for job in jobs]
        for job, output in zip(jobs, outputs):
            assert job.returncode == 0, output[-3000:]
        runs = [figures(output) for output in outputs]
        print(f"round {round_}: " + " | ".join(f"{m}: labeled {r['labeled']}, left {r['left']}, skipped {r['skipped']}"
                                               for (m, _, _), r in zip(pair, runs)))
        assert all(r["failed"] == 0 for r in runs)
        labeled = assert_exactly_once(iceberg_catalog, table_name, pd.concat(inputs, ignore_index=True))
        if round_ == 1:
            # both planned the two new nights: one committed each, the other found it done and said so
            assert [r["labeled"] + r["left"] for r in runs] == [2, 2] and sum(r["left"] for r in runs) == 2
        else:
            versions = set(labeled["model_version"])
            backfill_version = commits(iceberg_catalog, table_name)["dt=2024-04-01"].model_version
            assert versions == {backfill_version} and len(versions) == 1, "a nightly commit outlived the backfill"
        table = open_table(iceberg_catalog, table_name).table
        fs, _ = storage.filesystem(table.location())
        fs.invalidate_cache()
        live = {task.file.file_path for task in table.scan().plan_files()}
        listed = {t.file.file_path for s in table.snapshots() for t in table.scan(snapshot_id=s.snapshot_id).plan_files()}
        for path in listed:
            assert fs.exists(path), f"a snapshot lists a missing file: {path}"
        # a run that left a partition deleted the files it wrote for it: no unlisted file either
        stored = {"s3://" + p for p in fs.find(table.location().split("://", 1)[1] + "/data")}
        assert live <= stored == listed, f"files no snapshot lists: {sorted(stored - listed)}"
    # the table the two rounds left, read by each of the users' tools (one model's labels: the backfill's)
    assert_every_reader_sees_each_row_once(iceberg_catalog, table_name, {df.dt.iloc[0]: len(df) for df in inputs},
                                           second_artifact)


# ---- bad input that must not stop a night (issue 16) ---------------------------------------------

def invalid_utf8(values: list[bytes | None]) -> pa.Array:
    """A string array holding these raw bytes as they are, valid UTF-8 or not (as a Parquet file
    written by another tool can: pyarrow does not check string columns on read)."""
    offsets, data = [0], b""
    for v in values:
        data += v or b""
        offsets.append(len(data))
    validity = pa.array([v is not None for v in values]).buffers()[1]
    return pa.Array.from_buffers(pa.string(), len(values), [validity, pa.array(offsets, pa.int32()).buffers()[1],
                                                            pa.py_buffer(data)])


def test_the_label_cache_drops_bad_entries_and_skips_unreadable_files(tiny_artifact, tmp_path, caplog):
    """A poisoned or broken cache never decides a label: entries naming a class the model does
    not have, confidences outside [0, 1] and missing texts are dropped, an unreadable file is
    skipped with a warning, and the scorer scores those texts again."""

    version = Predictor.load(tiny_artifact).model_version
    cache = LabelCache(str(tmp_path / "cache"), version)
    cache.append(pd.DataFrame({"text": ["Rent", "Gas", "Water", None, "Laundry"],
                               "label": ["Income", "Refund", "Expense", "Income", "Income"],
                               "confidence": [0.97, 0.99, 1.5, 0.9, float("nan")]}), "poisoned")
    (tmp_path / "cache" / version / "broken.parquet").write_bytes(b"PAR1 not really")
    with caplog.at_level("WARNING"):
        known = cache.load(["Expense", "Income"])
    assert known == {"Rent": ("Income", 0.97)}
    assert "broken.parquet cannot be read" in caplog.text and "4 entr(ies)" in caplog.text
    # compaction keeps the valid entries only, in one file, and drops the broken one
    done = cache.compact(labels=["Expense", "Income"])
    assert (done.files_before, done.files_after, done.entries) == (2, 1, 1)
    assert cache.load() == {"Rent": ("Income", 0.97)}


def test_compact_cache_command_bounds_the_files_and_keeps_every_entry(tmp_path, capsys):
    cache = LabelCache(str(tmp_path / "cache"), "v123")
    for run in range(5):
        cache.append(pd.DataFrame({"text": [f"Account {run}-{i}" for i in range(1000)], "label": "Expense",
                                   "confidence": 0.9}), f"run{run}")
    assert table_job.main(["compact-cache", "--cache", str(tmp_path / "cache"), "--model-version", "v123",
                           "--cache-file-mb", "1"]) == 0
    assert "5 file(s) -> 1, 5000 entries" in capsys.readouterr().out
    assert len(cache.files()) == 1 and len(cache.load()) == 5000
    assert table_job.main(["compact-cache", "--cache", str(tmp_path / "cache"), "--model-version", "v999"]) == 2
    assert "has no files for model version 'v999'" in capsys.readouterr().err
    # a file closes once it holds the target size (here 2,000 entries' worth; a source file is never
    # split): 5,000 + 4 x 1,000 entries -> [5,000], [1,000 + 1,000], [1,000 + 1,000]
    target = 2 * cache.read_file(cache.files()[0]).nbytes // 5
    done = cache.compact(target_file_bytes=target)
    assert (done.files_before, done.files_after) == (1, 1)  # a single file is left as it is
    for run in range(5, 9):
        cache.append(pd.DataFrame({"text": [f"Account {run}-{i}" for i in range(1000)], "label": "Income",
                                   "confidence": 0.8}), f"run{run}")
    done = cache.compact(target_file_bytes=target)
    assert done.files_before == 5 and done.files_after == 3 and len(cache.load()) == 9000


@pytest.mark.integration
def test_scoring_actors_use_an_approved_prequantized_backbone(ray_cluster, s3_bucket, iceberg_catalog, table_name,
                                                               tiny_artifact, tiny_backbone, tmp_path, capsys):
    import shutil

    from jobs import prequantize as prequantize_job

    # a model of its own, over a backbone folder of its own that this test can move away
    backbone = tmp_path / "mistral"
    shutil.copytree(tiny_backbone, backbone)
    model = tmp_path / "model"
    train_tiny_artifact(model, str(backbone), steps=2)
    assert prequantize_job.main(["--model", str(model), "--output", str(tmp_path / "nf4")]) == 0
    assert "score with: --backbone" in capsys.readouterr().out
    src = f"{s3_bucket}/ledgers"
    day = ledger_day(40, 0)
    write_partition(src, DAYS[0], day)
    expected = Predictor.load(str(model)).predict(day.sort_values("row_id")["texts"].tolist())
    # an unapproved copy (the other model does not list it) is refused before any worker starts
    assert label.main(job_args(tiny_artifact, src, iceberg_catalog, table_name, f"{s3_bucket}/c0",
                               "--backbone", str(tmp_path / "nf4"))) == 2
    assert "does not approve" in capsys.readouterr().err
    # with the original backbone gone, only actors that really load the approved copy can score
    backbone.rename(tmp_path / "moved-away")
    assert label.main(job_args(str(model), src, iceberg_catalog, table_name, f"{s3_bucket}/c1")) == 1
    assert f"model.backbone = '{backbone}': no such directory" in capsys.readouterr().err
    assert label.main(job_args(str(model), src, iceberg_catalog, table_name, f"{s3_bucket}/c1",
                               "--backbone", str(tmp_path / "nf4"))) == 0
    labeled = read_labeled(iceberg_catalog, table_name).sort_values("row_id")
    assert labeled["label"].tolist() == expected.labels   # the 4-bit copy scores like quantize-on-load


@pytest.mark.integration
def test_invalid_utf8_in_a_string_column_becomes_the_rows_error(ray_cluster, s3_bucket, iceberg_catalog, table_name,
                                                                tiny_artifact):
    src, cache = f"{s3_bucket}/ledgers", f"{s3_bucket}/label-cache"
    rows = pa.table({"row_id": pa.array([1, 2, 3, 4], pa.int64()),
                     "texts": invalid_utf8([b"Less: Gas", b"Plus: Re\xffnt", b"Less: Water", None]),
                     "memo": invalid_utf8([b"ok", b"ok", b"bad \xfe\xff byte", b"ok"])})
    write_partition(src, DAYS[0], rows, files=1)
    write_partition(src, DAYS[1], ledger_day(20, 1))
    assert label.main(job_args(tiny_artifact, src, iceberg_catalog, table_name, cache)) == 0
    out = read_labeled(iceberg_catalog, table_name).set_index("row_id")
    assert len(out) == 24 and out.index.is_unique
    assert out.loc[2, "error"] == "text is not valid UTF-8" and pd.isna(out.loc[2, "label"])
    assert out.loc[2, "texts"] == "Plus: Re\ufffdnt" and out.loc[2, "needs_review"]
    assert out.loc[3, "label"] in ("Expense", "Income") and "['memo'] not valid UTF-8" in out.loc[3, "error"]
    assert out.loc[3, "memo"] == "bad \ufffd\ufffd byte" and out.loc[3, "needs_review"]
    assert pd.isna(out.loc[1, "error"]) and out.loc[4, "error"] == "text is null"


@pytest.mark.integration
def test_odd_partition_folders_fail_by_name_and_an_empty_one_commits(ray_cluster, s3_bucket, iceberg_catalog,
                                                                     table_name, tiny_artifact, capsys):
    """Folders Hive partitioning would read back as another value (a second '=', a URL-encoded
    value) or that nest a second key=value level fail on their own, by name; a partition whose
    files hold no rows commits as labeled with 0 rows; the others go on, now and on the re-run."""
    src, cache = f"{s3_bucket}/ledgers", f"{s3_bucket}/label-cache"
    write_partition(src, DAYS[0], ledger_day(20, 0))
    write_partition(src, DAYS[1], ledger_day(20, 1).iloc[:0], files=1)  # a night with no lines
    for odd in ("2024%2D03%2D03", "a=b", "2024-03-05/region=us"):
        write_partition(src, odd, ledger_day(5, 7), files=1)
    assert label.main(job_args(tiny_artifact, src, iceberg_catalog, table_name, cache)) == 1
    report = capsys.readouterr().out
    assert "FAILED dt=2024%2D03%2D03: folder dt=2024%2D03%2D03: its value '2024%2D03%2D03' holds '%'" in report
    assert "FAILED dt=a=b: folder dt=a=b: its value 'a=b' holds a second '='" in report
    assert "FAILED dt=2024-03-05: folder dt=2024-03-05 holds nested partition folder(s) ['region=us']" in report
    done = commits(iceberg_catalog, table_name)
    assert set(done) == {f"dt={DAYS[0]}", f"dt={DAYS[1]}"} and done[f"dt={DAYS[1]}"].input_rows == 0
    assert sorted(read_labeled(iceberg_catalog, table_name)["dt"].unique()) == [DAYS[0]]
    assert label.main(job_args(tiny_artifact, src, iceberg_catalog, table_name, cache)) == 1
    again = figures(capsys.readouterr().out)
    assert (again["labeled"], again["skipped"], again["failed"]) == (0, 2, 3)


@pytest.mark.integration
def test_unreadable_table_metadata_is_named_and_exits_1(iceberg_catalog, table_name, tiny_artifact, local_s3, capsys):
    commit_rows(iceberg_catalog, table_name, DAYS[0], labeled_rows(["Rent"], [1]))
    metadata = open_table(iceberg_catalog, table_name).table.metadata_location
    local_s3.filesystem().pipe(metadata.split("://", 1)[1], b'{"format-version": 2, "truncated')
    args = ["--model", tiny_artifact, "--input", "unused", "--catalog", iceberg_catalog, "--output-table", table_name,
            "--cache", "unused-cache"]
    assert label.main(args) == 1
    err = capsys.readouterr().err
    assert f"cannot read table {table_name} of catalog '{iceberg_catalog}': its metadata file {metadata}" in err
    assert "Nothing was labeled" in err and "Traceback" not in err
    assert table_job.main(["history", "--catalog", iceberg_catalog, "--output-table", table_name]) == 1
    assert metadata in capsys.readouterr().err


def test_progress_lines_give_rate_and_eta_at_a_steady_cadence(caplog):
    """Off a terminal: one line per `every_s` seconds however often it is updated, with done /
    total, the rate and the time left; a last line when the pass ends."""
    from clf_core.progress import Progress

    now = [0.0]
    progress = Progress("pass 2, labeling", 1000, "rows", every_s=30, clock=lambda: now[0], terminal=False)
    with caplog.at_level("INFO", logger="clf_core.progress"):
        for _ in range(10):  # 100 rows every 10 s: 10 rows/s
            now[0] += 10
            progress.update(100, "3/9 partitions committed")
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "pass 2, labeling: 300 / 1,000 rows (30.0%), 10/s, ETA 70s, 30s so far | 3/9 partitions committed"
    assert len(lines) == 4  # at 30, 60 and 90 s, then the closing line
    assert lines[-1] == "pass 2, labeling: 1,000 / 1,000 rows (100.0%), 10/s, done, 100s so far"
