"""jobs.label / jobs.backfill: Ray Data labels Hive-partitioned ledgers in S3, exactly once.

Unit tests of the pieces (no Ray) come first; the integration tests then run the real jobs on the
session's local Ray cluster against the local S3 endpoint (moto_server), with the tiny nf4 model.
"""

from __future__ import annotations

import json
import os
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
from clf_core.labeling import LabelSettings, plan
from clf_core.partitions import (ATTEMPTS, MANIFEST, CommitError, Partition, StageWriter, commit, committed_files,
                                 read_committed)
from clf_core.scoring import OUTPUT_COLUMNS, ApplyLabels, TextScorer, check_text
from conftest import ledger_rows
from jobs import backfill, label

DAYS = ["2024-03-01", "2024-03-02", "2024-03-03"]
FAST = ["--batch-size", "16", "--shuffle-partitions", "2", "--cpus-per-actor", "0.5"]


# ---- helpers --------------------------------------------------------------------------------------

def write_partition(root: str, day: str, table: pd.DataFrame | pa.Table, files: int = 2) -> None:
    """One dt=<day>/ folder of `files` Parquet files holding `table`'s rows."""
    table = table if isinstance(table, pa.Table) else pa.Table.from_pandas(table, preserve_index=False)
    fs, base = storage.filesystem(root)
    step = -(-table.num_rows // files)
    for i in range(files):
        path = f"{base}/dt={day}/part-{i}.parquet"
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


def last_run(output: str) -> dict:
    fs, path = storage.filesystem(storage.join(output, "_runs"))
    fs.invalidate_cache()
    newest = sorted(fs.ls(path))[-1]
    with fs.open(newest) as f:
        return json.load(f)


def manifests(output: str) -> dict[str, dict]:
    fs, root = storage.filesystem(output)
    fs.invalidate_cache()
    out = {}
    for entry in fs.ls(root):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("dt=") and fs.exists(f"{entry}/{MANIFEST}"):
            with fs.open(f"{entry}/{MANIFEST}") as f:
                out[name] = json.load(f)
    return out


def assert_exactly_once(output: str, inputs: pd.DataFrame) -> pd.DataFrame:
    """Every input row appears once in the committed output, with its input columns unchanged."""
    out = read_committed(output)
    assert out["row_id"].is_unique, "a row was written twice"
    assert sorted(out["row_id"]) == sorted(inputs["row_id"])
    merged = inputs.merge(out, on="row_id", suffixes=("", "_out"))
    for column in inputs.columns.drop("row_id"):
        pd.testing.assert_series_equal(merged[column], merged[f"{column}_out"], check_names=False, check_dtype=False)
    # Types are checked on the Arrow schema: pandas metadata is not carried, the Parquet types are.
    written = pa.Table.from_pandas(inputs.drop(columns="dt"), preserve_index=False).schema.remove_metadata()
    for uris in committed_files(output).values():
        fs, path = storage.filesystem(uris[0])
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
        assert schema.names == written.names + list(OUTPUT_COLUMNS)
        assert [schema.field(n).type for n in written.names] == written.types
    return out


def job_args(model, input_, output, *extra):
    return ["--model", model, "--input", input_, "--output", output, *FAST, *extra]


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


def test_scorer_scores_each_text_once_then_serves_it_from_the_cache(tiny_artifact, tmp_path):
    scorer = TextScorer(tiny_artifact, str(tmp_path / "cache"), run_id="r1", batch_size=8)
    first = scorer(pd.DataFrame({"text": ["Rent", "Gas", "Water"]}))
    assert (first["scored"].item(), first["cache_hits"].item()) == (3, 0)
    again = TextScorer(tiny_artifact, str(tmp_path / "cache"), run_id="r2", batch_size=8)  # a new night
    second = again(pd.DataFrame({"text": ["Rent", "Gas", "Late Fee"]}))
    assert (second["scored"].item(), second["cache_hits"].item()) == (1, 2)

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


def test_commit_refuses_a_partition_whose_rows_do_not_add_up(tmp_path):
    out = str(tmp_path / "out")
    batch = pa.table({"texts": ["a", "b", "c"], "error": [None, "x", None], "dt": ["2024-03-01"] * 3})
    records = StageWriter(out, "run1")(batch).to_pylist()
    assert records[0]["rows"] == 3 and records[0]["errors"] == 1
    partition = Partition("dt=2024-03-01", "2024-03-01", ["in/a.parquet"], rows=4)
    with pytest.raises(CommitError, match="wrote 3 rows for 4 input rows"):
        commit(out, partition, records, {"run_id": "run1"})
    assert not (tmp_path / "out" / "dt=2024-03-01" / MANIFEST).exists()
    assert read_committed(out).empty  # staged files alone are never output
    partition.rows = 3
    commit(out, partition, records, {"run_id": "run1"})
    assert read_committed(out)["texts"].tolist() == ["a", "b", "c"]


def test_arguments_are_checked_before_any_work(capsys, tmp_path):
    assert label.main(["--model", "m", "--input", "in", "--output", "in"]) == 2
    assert "same as --input" in capsys.readouterr().err
    assert label.main(["--model", "m", "--input", "in", "--output", "o", "--actors", "0"]) == 2
    assert "--actors 0: must be at least 1" in capsys.readouterr().err
    assert label.main(["--model", "m", "--input", "in", "--output", "o", "--rows-per-call", "0"]) == 2
    assert "--rows-per-call 0: must be at least 1" in capsys.readouterr().err
    assert backfill.main(["--model", "m", "--input", "i", "--output", "o", "--start", "2024-03-09", "--end", "2024-03-01"]) == 2
    assert "is after --end" in capsys.readouterr().err
    assert label.main(["--model", str(tmp_path / "nope"), "--input", "i", "--output", "o"]) == 2
    assert "no artifact at" in capsys.readouterr().err


def test_ray_datas_footer_reader_pool_is_sized_to_the_files(monkeypatch):
    """Ray Data reads Parquet footers on 32 actors per read whatever the file count; a run sizes the
    pool to its files. Ray's own indexer is asserted to pick the size up, so an upgrade that moves
    the knob fails here instead of silently costing seconds per pass."""
    from ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer import FooterFileIndexer

    from clf_core.labeling import FOOTER_ACTORS_ENV, footer_readers_for

    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    for files, actors in ((1, 1), (10, 1), (11, 2), (5000, 32)):
        with footer_readers_for(files):
            assert FooterFileIndexer(ignore_missing_paths=False)._num_actors == actors
    assert FOOTER_ACTORS_ENV not in os.environ
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "7")  # an operator's own setting wins
    with footer_readers_for(1):
        assert FooterFileIndexer(ignore_missing_paths=False)._num_actors == 7


# ---- integration: real Ray, real S3 ---------------------------------------------------------------

@pytest.mark.integration
def test_label_incremental_rerun_redo_force_and_backfill(ray_cluster, s3_bucket, tiny_artifact, capsys):
    """Three nights with 90% repeated texts; then a no-op re-run, a lost partition plus a new
    night (warm cache), --force, and a backfill that resumes over partitions of an older model."""
    src, out = f"{s3_bucket}/ledgers", f"{s3_bucket}/labeled"
    pool = ledger_rows(30, seed=99)["texts"].unique().tolist()
    days = {day: ledger_day(100, i, pool) for i, day in enumerate(DAYS)}
    for day, df in days.items():
        write_partition(src, day, df)
    inputs = pd.concat([df.assign(dt=day) for day, df in days.items()], ignore_index=True)

    assert label.main(job_args(tiny_artifact, src, out)) == 0
    labeled = assert_exactly_once(out, inputs)
    run = last_run(out)
    assert run["scored"] == len(pool) and run["cache_hits"] == 0  # 300 rows, only the distinct texts scored
    assert run["rows_in"] == run["rows_out"] == 300 and run["error_rows"] == 0
    assert labeled["label"].isin(["Expense", "Income"]).all() and labeled["error"].isna().all()
    assert labeled["confidence"].between(0.5, 1.0).all() and labeled["model_version"].nunique() == 1
    first = manifests(out)
    assert set(first) == {f"dt={d}" for d in DAYS} and all(m["rows"] == 100 for m in first.values())
    # each partition lists exactly its needs_review rows (default threshold 0.9) for people to check
    for day in DAYS:
        review = pd.read_csv(storage.join(out, f"dt={day}", "_review.csv"))
        flagged = labeled[(labeled.dt == day) & labeled["needs_review"]]
        assert sorted(review["row_id"].tolist()) == sorted(flagged["row_id"].tolist())
        assert (flagged["confidence"] < 0.9).all()

    # Nothing new: a re-run commits nothing and rewrites nothing.
    assert label.main(job_args(tiny_artifact, src, out)) == 0
    assert manifests(out) == first
    assert "skip 3 already committed" in capsys.readouterr().out

    # One partition's output lost, one missed night with 5 new texts: only those two run, and
    # the warm cache means only the new texts reach the model.
    fs, _ = storage.filesystem(out)
    fs.rm(f"{out}/dt={DAYS[1]}", recursive=True)
    new_day = ledger_day(100, 3, pool)
    new_texts = [f"Plus: Brand New Account {i}" for i in range(5)]
    new_day.loc[:9, "texts"] = new_texts * 2
    write_partition(src, "2024-03-04", new_day)
    inputs = pd.concat([inputs, new_day.assign(dt="2024-03-04")], ignore_index=True)
    assert label.main(job_args(tiny_artifact, src, out)) == 0
    second = manifests(out)
    assert second[f"dt={DAYS[0]}"] == first[f"dt={DAYS[0]}"] and second[f"dt={DAYS[2]}"] == first[f"dt={DAYS[2]}"]
    assert second[f"dt={DAYS[1]}"]["run_id"] != first[f"dt={DAYS[1]}"]["run_id"]
    run = last_run(out)
    assert (run["scored"], run["cache_hits"]) == (5, len(pool))
    assert sorted(run["partitions_committed"]) == [f"dt={DAYS[1]}", "dt=2024-03-04"]
    assert_exactly_once(out, inputs)

    # --force plans every partition; --dry-run touches nothing.
    capsys.readouterr()
    assert label.main(job_args(tiny_artifact, src, out, "--force", "--dry-run")) == 0
    assert "would label 4 partition(s) (400 rows)" in capsys.readouterr().out
    assert manifests(out) == second

    # A backfill over a range relabels partitions of another model version and skips those
    # already done by this one, so re-running an interrupted backfill resumes it.
    stale = dict(second[f"dt={DAYS[0]}"], model_version="v-older-model")
    storage.write_bytes(f"{out}/dt={DAYS[0]}/{MANIFEST}", json.dumps(stale).encode())
    assert backfill.main(job_args(tiny_artifact, src, out, "--start", DAYS[0], "--end", DAYS[1])) == 0
    after = manifests(out)
    assert after[f"dt={DAYS[0]}"]["model_version"] == second[f"dt={DAYS[1]}"]["model_version"]
    assert after[f"dt={DAYS[0]}"]["run_id"] != second[f"dt={DAYS[0]}"]["run_id"]
    for name in (f"dt={DAYS[1]}", f"dt={DAYS[2]}", "dt=2024-03-04"):
        assert after[name] == second[name]
    capsys.readouterr()
    assert backfill.main(job_args(tiny_artifact, src, out, "--start", DAYS[0], "--end", DAYS[2], "--force", "--dry-run")) == 0
    assert "would label 3 partition(s) (300 rows)" in capsys.readouterr().out
    assert_exactly_once(out, inputs)


@pytest.mark.integration
def test_bad_rows_are_kept_and_a_corrupt_file_fails_only_its_partition(ray_cluster, s3_bucket, tiny_artifact, capsys):
    src, out = f"{s3_bucket}/ledgers", f"{s3_bucket}/labeled"
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

    assert label.main(job_args(tiny_artifact, src, out)) == 1
    report = capsys.readouterr().out
    assert f"dt={DAYS[1]}/part-1.parquet" in report and "cannot read" in report
    assert f"dt={DAYS[2]}/part-0.parquet has no text column 'texts'" in report
    assert "already has column(s) ['label']" in report
    assert set(manifests(out)) == {f"dt={DAYS[0]}"}
    labeled = assert_exactly_once(out, good.assign(dt=DAYS[0])).set_index("row_id")
    bad = labeled.loc[good["row_id"][:4]]
    assert bad["label"].isna().all() and bad["confidence"].isna().all()
    assert [e.split(" (")[0] for e in bad["error"]] == [
        "text is null", "text is empty", "text is only whitespace",
        "text is 3000 characters long, over the limit of 2000"]
    rest = labeled.drop(index=good["row_id"][:4])
    assert rest["error"].isna().all() and rest["label"].notna().all()
    assert last_run(out)["error_rows"] == 4


def _processes(name: str):
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if name in " ".join(proc.info["cmdline"] or []):
            yield proc


@pytest.mark.integration
def test_an_actor_killed_mid_run_does_not_lose_or_repeat_rows(ray_cluster, s3_bucket, tiny_artifact):
    src, out = f"{s3_bucket}/ledgers", f"{s3_bucket}/labeled"
    days = {day: ledger_day(120, i) for i, day in enumerate(DAYS)}
    for day, df in days.items():
        write_partition(src, day, df, files=3)
    result = {}
    args = job_args(tiny_artifact, src, out, "--batch-size", "4", "--rows-per-call", "4")  # many calls to interrupt
    job = threading.Thread(target=lambda: result.update(rc=label.main(args)))
    job.start()
    killed, cache = [], f"{out}/_label_cache"
    fs, _ = storage.filesystem(out)
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
    out_rows = assert_exactly_once(out, pd.concat([df.assign(dt=d) for d, df in days.items()], ignore_index=True))
    # the labels are a clean run's: the same model scoring the same texts with no fault
    from clf_core.predict import Predictor

    clean = Predictor.load(tiny_artifact).predict(out_rows["texts"].tolist())
    assert out_rows["label"].tolist() == clean.labels
    assert out_rows["confidence"].to_numpy() == pytest.approx(clean.confidence, abs=1e-4)


@pytest.mark.integration
def test_a_crash_during_the_write_leaves_nothing_partial_and_a_rerun_completes(ray_cluster, s3_bucket, tiny_artifact):
    """The job's driver is SIGKILLed as soon as the first labeled file is staged."""
    src, out = f"{s3_bucket}/ledgers", f"{s3_bucket}/labeled"
    days = {day: ledger_day(120, i) for i, day in enumerate(DAYS)}
    for day, df in days.items():
        write_partition(src, day, df, files=4)
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    driver = subprocess.Popen([sys.executable, "-m", "jobs.label", *job_args(tiny_artifact, src, out, "--batch-size", "8")],
                              env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs, _ = storage.filesystem(out)
    staged = []
    deadline = time.monotonic() + 180
    while driver.poll() is None and not staged and time.monotonic() < deadline:
        fs.invalidate_cache()
        staged = [p for p in (fs.find(out) if fs.exists(out) else []) if f"/{ATTEMPTS}/" in p]
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    assert staged, "the job ended before writing anything; the crash was not injected"
    visible = manifests(out)
    assert len(visible) < len(DAYS), "every partition committed before the crash; nothing was tested"
    partial = read_committed(out)
    for name, m in visible.items():  # whatever is visible is whole
        assert (partial["dt"] == name[3:]).sum() == m["rows"] == 120

    assert label.main(job_args(tiny_artifact, src, out)) == 0
    assert_exactly_once(out, pd.concat([df.assign(dt=d) for d, df in days.items()], ignore_index=True))
    fs.invalidate_cache()
    leftovers = {p.split(f"/{ATTEMPTS}/")[1].split("/")[0] for p in fs.find(out) if f"/{ATTEMPTS}/" in p}
    listed = {m["run_id"] for m in manifests(out).values()}
    assert leftovers <= listed, "orphan files of the crashed run were not cleaned up at commit"
