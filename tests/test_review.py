"""The review loop: who is asked to look at which rows (threshold, budget, audit), the review file
as spreadsheets save it, reviewers' answers imported into the corrections table, and the next runs
applying them to new rows and to partitions labeled earlier.

The unit tests need no Ray; the import tests use the real catalog and S3 endpoint; the loop test
runs the real jobs on the session's Ray cluster, as test_label does.
"""

from __future__ import annotations

import csv
import io

import pandas as pd
import pyarrow as pa
import pytest

from clf_core.review.corrections import Answers, CorrectionsTable, wilson_interval
from clf_core.review.file import read_review_file, spreadsheet_safe, unguard
from clf_core.labeling.scoring import OUTPUT_COLUMNS, ApplyLabels, budget, in_audit_sample
from clf_core.labeling.table import LabeledTable
from jobs import review as review_job

LABELS = ["Expense", "Income"]


# ---- who is flagged, and why (no Ray) -------------------------------------------------------------

def test_the_budget_takes_the_least_confident_rows_and_never_exceeds_the_share():
    labels = {"a": ("Income", 0.60), "b": ("Expense", 0.70), "c": ("Income", 0.90), "d": ("Expense", 0.95)}
    rows = {"a": 1, "b": 3, "c": 1, "d": 5}                        # 10 rows in the run
    assert budget(labels, rows, 0.4) == {"a", "b"}                # 4 rows of 10
    assert budget(labels, rows, 0.3) == {"a"}                     # b's 3 rows would make 4 > 3
    assert budget(labels, rows, 0.0) == set() and budget({}, {}, 0.5) == set()
    tied = {"z": ("Income", 0.5), "y": ("Income", 0.5), "x": ("Income", 0.9)}
    assert budget(tied, {}, 0.34) == {"y"}                        # ties broken by the text: every labeler agrees


def test_the_audit_sample_is_stable_per_model_version_and_near_its_fraction():
    texts = [f"Less: Account {i}" for i in range(4000)]
    first = {t for t in texts if in_audit_sample(t, "v1", 0.05)}
    assert first == {t for t in texts if in_audit_sample(t, "v1", 0.05)}          # a re-run flags the same
    assert 0.04 < len(first) / len(texts) < 0.06
    assert first != {t for t in texts if in_audit_sample(t, "v2", 0.05)}          # another model, another sample
    assert first < {t for t in texts if in_audit_sample(t, "v1", 0.2)}            # a larger fraction keeps it
    assert not any(in_audit_sample(t, "v1", 0.0) for t in texts[:100])


def labeler(run_labels: pa.Table, **kwargs) -> ApplyLabels:
    return ApplyLabels("unused-cache", "vtest", "texts", 50, "2024-03-02T00:00:00+00:00", run_labels=[run_labels],
                       **kwargs)


def test_review_reasons_in_order_of_precedence_and_answers_replace_the_model():
    def pick(prefix: str, audited: bool) -> str:
        return next(f"{prefix} {i}" for i in range(1000) if in_audit_sample(f"{prefix} {i}", "vtest", 0.3) == audited)

    texts = [pick("Less: Gas", False), pick("Less: Water", False), pick("Plus: Rent", False), pick("Plus: Fee", True),
             pick("Less: Repairs", True)]   # Repairs is in the sample, but answered: never flagged
    run = pa.table({"text": texts, "label": ["Expense", "Expense", "Income", "Income", "Expense"],
                    "confidence": [0.55, 0.70, 0.80, 0.99, 0.97], "rows": [1, 1, 1, 1, 1]})
    answers = Answers("ns.corrections", 7, unscoped={texts[4]: ("Income", 0)},
                      scoped={"property_id": {("P2", texts[2]): ("Expense", 1)}})
    apply = labeler(run, review_threshold=0.6, review_budget=0.4, audit_fraction=0.3, answers=answers)
    batch = pa.table({"texts": [None, *texts, texts[2]], "property_id": ["P1", "P1", "P1", "P1", "P1", "P1", "P2"]})
    out = apply(batch).to_pydict()
    assert [n for n in out if n in OUTPUT_COLUMNS] == list(OUTPUT_COLUMNS)
    # null text: error; 0.55 < 0.6: low_confidence; budget 40% of 5 model-labeled rows = the two least
    # confident (Gas, Water); the audited text; Rent at P1 and Repairs have no reason to be flagged
    # but Repairs has a reviewer's answer, as has Rent at P2 (scoped)
    assert out["review_reason"] == ["error", "low_confidence", "budget", None, "audit", None, None]
    assert out["needs_review"] == [True, True, True, False, True, False, False]
    assert out["label"] == [None, "Expense", "Expense", "Income", "Income", "Income", "Expense"]
    assert out["label_source"] == [None, "model", "model", "model", "model", "review", "review"]
    assert out["confidence"][5:] == [1.0, 1.0]
    # without an answer an unseen text is an error of the run (pass 1 scores every valid text)
    with pytest.raises(RuntimeError, match="missing from the label cache"):
        labeler(run)(pa.table({"texts": ["Never scored"]}))
    # the budget is a share of the run's rows: a text held by many rows counts as many
    heavy = run.set_column(3, "rows", pa.array([1, 4, 1, 1, 1]))
    assert labeler(heavy, review_budget=0.4).budget_texts == {texts[0]}   # Water's 4 rows would pass 3 of 8


def test_the_latest_answer_that_applies_to_a_row_wins():
    older = Answers.from_rows(pa.Table.from_pylist([
        answer_row("Rent", "Income", 1), answer_row("Gas", "Income", 2, scope=("property_id", "P1"))],
        schema=CORRECTIONS_SCHEMA), "ns.c", 1)
    newer = Answers.from_rows(pa.Table.from_pylist([
        answer_row("Rent", "Income", 1), answer_row("Gas", "Income", 2, scope=("property_id", "P1")),
        answer_row("Gas", "Expense", 3), answer_row("Rent", "Expense", 4, scope=("property_id", "P1"))],
        schema=CORRECTIONS_SCHEMA), "ns.c", 2)
    assert newer.label_for("Gas", {"property_id": "P1"}) == "Expense"   # a later unscoped answer wins
    assert newer.label_for("Rent", {"property_id": "P1"}) == "Expense"  # a later scoped one, for its scope
    assert newer.label_for("Rent", {"property_id": "P2"}) == "Income"
    assert newer.label_for("Water", {}) is None and newer.label_for(None, {}) is None
    changed = newer.changed_since(older)
    assert changed.keys() == {("", "", "Gas"): "Expense", ("property_id", "P1", "Rent"): "Expense"}
    assert newer.changed_since(None).keys() == newer.keys()


def test_wilson_interval():
    low, high = wilson_interval(45, 50)
    assert (round(low, 3), round(high, 3)) == (0.786, 0.957)     # the textbook values for 45/50
    assert wilson_interval(0, 0) == (0.0, 1.0) and wilson_interval(10, 10)[1] == 1.0


# ---- the review file as spreadsheets save it (no Ray) ---------------------------------------------

FORMULA_TEXTS = ['=HYPERLINK("http://x","Rent")', "+1 Deposit", "-Repairs", "@SUM(A1)", "'Quoted account"]


def test_the_formula_guard_round_trips_exactly():
    batch = pa.record_batch({"texts": FORMULA_TEXTS + ["Less: Gas"]})
    guarded = spreadsheet_safe(batch).column(0).to_pylist()
    assert all(g.startswith("'") for g in guarded[:5]) and guarded[5] == "Less: Gas"
    assert [unguard(g) for g in guarded] == FORMULA_TEXTS + ["Less: Gas"]


def review_csv(rows: list[dict], delimiter: str = ",", newline: str = "\n") -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=delimiter, lineterminator=newline)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


REVIEWED = [{"row_id": "1", "texts": "'=SUM(A1)", "label": "Income", "corrected_label": "Expense", "model_version": "v1"},
            {"row_id": "2", "texts": "Café du coin, Loyer", "label": "Income", "corrected_label": "", "model_version": "v1"},
            {"row_id": "3", "texts": "Less: Gas\nline two", "label": "Expense", "corrected_label": " income ",
             "model_version": "v1"}]


@pytest.mark.parametrize("save", ["utf-8", "utf-8 with BOM and CRLF", "semicolons, Windows-1252", "tabs, UTF-16"])
def test_a_review_file_reads_the_same_however_a_spreadsheet_saved_it(tmp_path, save):
    text = {"utf-8": lambda: review_csv(REVIEWED).encode(),
            "utf-8 with BOM and CRLF": lambda: b"\xef\xbb\xbf" + review_csv(REVIEWED, newline="\r\n").encode(),
            "semicolons, Windows-1252": lambda: review_csv(REVIEWED, ";", "\r\n").encode("cp1252"),
            "tabs, UTF-16": lambda: review_csv(REVIEWED, "\t", "\r\n").encode("utf-16")}[save]()
    path = tmp_path / "dt=2024-03-01.csv"
    path.write_bytes(text)
    read = read_review_file(str(path))
    assert read.columns == list(REVIEWED[0])
    assert [r["texts"] for r in read.rows] == ["=SUM(A1)", "Café du coin, Loyer", "Less: Gas\nline two"]
    assert [r["corrected_label"] for r in read.rows] == ["Expense", "", " income "]
    assert read.lines == [2, 3, 4]


def test_a_file_in_no_known_encoding_is_refused_by_name(tmp_path):
    path = tmp_path / "shift-jis.csv"
    path.write_bytes(review_csv(REVIEWED[:1]).encode() + "家賃".encode("shift_jis") + b"\x81\x8d\n")
    with pytest.raises(Exception, match=r"shift-jis.csv is not text in UTF-8, UTF-16 or Windows-1252 .*CSV UTF-8"):
        read_review_file(str(path))


# ---- import into the corrections table (real catalog and S3, no Ray) ------------------------------

CORRECTIONS_SCHEMA = __import__("clf_core.review.corrections", fromlist=["SCHEMA"]).SCHEMA


def answer_row(text: str, label: str, second: int, scope: tuple[str, str] | None = None, given: str = "Income",
               reason: str = "budget", version: str = "v1") -> dict:
    return {"text": text, "label": given, "corrected_label": label, "review_reason": reason, "reviewer": "r",
            "reviewed_at": pd.Timestamp(f"2024-03-01 00:00:{second:02d}", tz="UTC"), "source_file": "f",
            "source_sha256": "s", "source_line": second, "model_version": version,
            "scope_column": scope[0] if scope else None, "scope_value": scope[1] if scope else None}


@pytest.fixture
def labeled_table(iceberg_catalog, table_name) -> str:
    """A labeled table (no rows needed) that knows model v1's labels, as a label run leaves it."""
    table = LabeledTable(iceberg_catalog, table_name)
    table.ensure(pa.schema([("row_id", pa.int64()), ("texts", pa.string()), ("property_id", pa.string())]), True)
    table.remember("v1", LABELS)
    return table_name


def import_args(catalog: str, table: str, corrections: str, path, *extra) -> list[str]:
    return ["import", "--catalog", catalog, "--corrections", corrections, "--output-table", table,
            "--file", str(path), "--reviewer", "alice", *extra]


def snapshots(catalog: str, corrections: str) -> int:
    table = CorrectionsTable(catalog, corrections).table
    return len(table.snapshots()) if table is not None else 0


@pytest.mark.integration
def test_an_import_is_one_commit_once_and_the_latest_answer_wins(iceberg_catalog, labeled_table, tmp_path, capsys):
    corrections = labeled_table + "_corrections"
    first = tmp_path / "dt=2024-03-01.csv"
    first.write_text(review_csv([
        {**REVIEWED[0], "review_reason": "budget"}, {**REVIEWED[1], "review_reason": "audit"},
        {**REVIEWED[2], "review_reason": "low_confidence"},
        {"row_id": "4", "texts": "", "label": "", "corrected_label": "", "model_version": "v1", "review_reason": "error"},
        {**REVIEWED[1], "row_id": "5", "review_reason": "audit"}]))   # the same text again, the same answer
    assert review_job.main(import_args(iceberg_catalog, labeled_table, corrections, first)) == 0
    out = capsys.readouterr().out
    assert "3 answers (2 corrections, 1 confirmations); 1 row(s) without a label or an answer skipped" in out
    table = CorrectionsTable(iceberg_catalog, corrections)
    assert len(table.table.snapshots()) == 1
    rows = table.rows().to_pylist()
    assert {(r["text"], r["label"], r["corrected_label"], r["review_reason"]) for r in rows} == {
        ("=SUM(A1)", "Income", "Expense", "budget"), ("Café du coin, Loyer", "Income", "Income", "audit"),
        ("Less: Gas\nline two", "Expense", "Income", "low_confidence")}
    assert {r["reviewer"] for r in rows} == {"alice"} and {r["model_version"] for r in rows} == {"v1"}
    assert {r["source_sha256"] for r in rows} == {read_review_file(str(first)).sha256}

    # the same bytes again (even under another name): nothing added, no new snapshot
    again = tmp_path / "copy.csv"
    again.write_bytes(first.read_bytes())
    assert review_job.main(import_args(iceberg_catalog, labeled_table, corrections, again)) == 0
    assert "was imported already (3 answers by alice" in capsys.readouterr().out
    assert snapshots(iceberg_catalog, corrections) == 1

    # a later file changes one answer and scopes another: the latest that applies wins
    later = tmp_path / "later.csv"
    later.write_text(review_csv([
        {"row_id": "9", "texts": "=SUM(A1)", "label": "Income", "corrected_label": "Income", "model_version": "v1",
         "property_id": "P1"},
        {"row_id": "10", "texts": "Less: Gas\nline two", "label": "Expense", "corrected_label": "", "model_version": "v1",
         "property_id": "P2"}]))
    assert review_job.main(import_args(iceberg_catalog, labeled_table, corrections, later,
                                       "--scope-column", "property_id")) == 0
    assert "each for its property_id only" in capsys.readouterr().out
    answers = CorrectionsTable(iceberg_catalog, corrections).answers()
    assert answers.label_for("=SUM(A1)", {"property_id": "P1"}) == "Income"
    assert answers.label_for("=SUM(A1)", {"property_id": "P7"}) == "Expense"
    assert answers.label_for("Less: Gas\nline two", {"property_id": "P2"}) == "Expense"
    assert answers.label_for("Less: Gas\nline two", {}) == "Income"


BAD_FILES = {
    "unknown label": ([{**REVIEWED[0], "corrected_label": "Revenue"}],
                      r"line 2: corrected_label 'Revenue' is not a label of model v1 \(its labels: Expense, Income\)"),
    "two answers for one text": ([REVIEWED[1], REVIEWED[0], {**REVIEWED[1], "corrected_label": "Expense"}],
                                 r"lines 2 and 4 give the text 'Café du coin, Loyer' two answers, 'Income' and 'Expense'"),
    "no corrected_label column": ([{k: v for k, v in REVIEWED[0].items() if k != "corrected_label"}],
                                  r"has no 'corrected_label' column; its columns are \['row_id', 'texts', 'label', "),
    "no text column": ([{("memo" if k == "texts" else k): v for k, v in REVIEWED[0].items()}],
                       r"has no 'texts' column \(pass --text-column"),
    "no usable row": ([{**REVIEWED[0], "label": "", "corrected_label": ""}], r"holds no usable row"),
    "a model that did not label the table": ([{**REVIEWED[0], "model_version": "v9"}],
                                            r"line 2: model version 'v9' did not label this table"),
    "a row with more cells than columns": (None, r"line 3 has 6 cells for 5 columns"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_review_file_imports_nothing_and_says_why(iceberg_catalog, labeled_table, tmp_path, capsys, case):
    rows, message = BAD_FILES[case]
    path = tmp_path / "bad.csv"
    if rows is None:
        path.write_text(review_csv(REVIEWED[:1]) + "2,Less: Gas,Expense,,v1,extra\n")
    else:
        path.write_text(review_csv(rows))
    corrections = labeled_table + "_corrections"
    assert review_job.main(import_args(iceberg_catalog, labeled_table, corrections, path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert CorrectionsTable(iceberg_catalog, corrections).table is None   # not even created


# ---- the loop, end to end: real Ray, real S3, real catalog ----------------------------------------

def nights(texts: list[str], properties: list[str], start_id: int) -> pd.DataFrame:
    """Every text once per property, with a unique row id and an amount column that must survive."""
    rows = [{"row_id": start_id + i, "texts": t, "property_id": p, "amount": float(i)}
            for i, (p, t) in enumerate((p, t) for p in properties for t in texts)]
    return pd.DataFrame(rows)


def edit_like_a_spreadsheet(source: str, target, answer, delimiter: str = ",", keep=lambda row: True) -> int:
    """Open the exported review CSV, fill corrected_label with `answer(row)` ("" = the model was
    right), keep the rows `keep` says (a filtered sheet), save: cells as they are, apostrophes too."""
    from clf_core import storage

    text = storage.read_text(source)
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    kept = [dict(r, corrected_label=answer(r)) for r in rows if keep(r)]
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=delimiter, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(kept)
    with open(target, "w", encoding="utf-8-sig", newline="") as f:   # Excel's "CSV UTF-8": a BOM, CRLF
        f.write(out.getvalue())
    return len(kept)


def flip(label: str) -> str:
    return "Income" if label == "Expense" else "Expense"


@pytest.mark.integration
def test_reviewers_answers_reach_new_rows_earlier_partitions_and_survive_rollback_and_deletes(
        ray_cluster, s3_bucket, iceberg_catalog, table_name, tiny_artifact, tmp_path, capsys):
    from test_label import DAYS, assert_exactly_once, commits, figures, job_args, read_labeled, snapshot_count
    from test_label import write_partition

    from clf_core.model.artifact import open_artifact
    from clf_core.labeling.settings import LabelSettings
    from clf_core.labeling.pipeline import execute
    from clf_core.labeling.plan import plan
    from jobs import label
    from jobs import table as table_job

    src, cache, exports = f"{s3_bucket}/ledgers", f"{s3_bucket}/label-cache", f"{s3_bucket}/review"
    corrections = table_name + "_corrections"
    version = open_artifact(tiny_artifact).model_version
    texts = [f"Less: Operating Expenses Account {i}" if i % 3 else f"Plus: Other Income Fee {i}" for i in range(24)]
    inputs = {DAYS[0]: nights(texts, ["P0", "P1"], 0), DAYS[1]: nights(texts, ["P1", "P2"], 1000)}
    for day, df in inputs.items():
        write_partition(src, day, df)

    def run(*extra) -> dict:
        assert label.main(job_args(tiny_artifact, src, iceberg_catalog, table_name, cache, "--corrections",
                                   corrections, "--review-export", exports, *extra)) in (0,), capsys.readouterr()
        out = capsys.readouterr().out
        return {"out": out} if "--dry-run" in extra else {**figures(out), "out": out}

    def imported(path, *extra) -> None:
        assert review_job.main(import_args(iceberg_catalog, table_name, corrections, path, *extra)) == 0, \
            capsys.readouterr()
        capsys.readouterr()

    def everything() -> pd.DataFrame:
        return assert_exactly_once(iceberg_catalog, table_name,
                                   pd.concat([df.assign(dt=day) for day, df in inputs.items()], ignore_index=True))

    # -- night 1 and 2: no threshold, a 25% budget and a 20% audit sample ---------------------------
    first = run("--review-threshold", "0", "--review-budget", "0.25", "--audit-fraction", "0.2")
    table = everything()
    by_text = table.groupby("texts").agg(confidence=("confidence", "first"), reason=("review_reason", "first"),
                                         rows=("row_id", "size"))
    budget_texts = set(by_text.index[by_text.reason == "budget"])
    audit_texts = set(by_text.index[by_text.reason == "audit"])
    assert budget_texts == budget({t: ("x", c) for t, c in by_text.confidence.items()}, by_text.rows.to_dict(), 0.25)
    flagged_rows = by_text.rows[list(budget_texts)].sum()
    assert 0 < flagged_rows <= 0.25 * len(table)                         # the team's capacity, run-wide
    assert by_text.confidence[list(budget_texts)].max() <= by_text.confidence.drop(list(budget_texts)).min()
    assert audit_texts == {t for t in texts if in_audit_sample(t, version, 0.2)} - budget_texts and audit_texts
    assert set(table.review_reason.dropna()) == {"budget", "audit"} and (table.needs_review == table.review_reason.notna()).all()
    assert f"to review {first['review']} (budget {flagged_rows}, audit " in first["out"]
    assert (table.label_source == "model").all()

    # -- a reviewer answers night 1's file; another answers one account of night 2, per property ----
    night1 = f"{exports}/dt={DAYS[0]}.csv"
    flagged = sorted(budget_texts | audit_texts)
    flipped = flagged[:2]
    model_label = dict(zip(table.texts, table.label))
    edit_like_a_spreadsheet(night1, tmp_path / "night1.csv",
                            lambda r: flip(r["label"]) if r["texts"] in flipped else "")
    imported(tmp_path / "night1.csv")
    scoped_text = flagged[2]
    edit_like_a_spreadsheet(f"{exports}/dt={DAYS[1]}.csv", tmp_path / "night2.csv",
                            lambda r: flip(r["label"]) if r["property_id"] == "P2" else "",
                            keep=lambda r: r["texts"] == scoped_text)
    imported(tmp_path / "night2.csv", "--scope-column", "property_id")

    # -- night 3 (every row to review, formula-like lines among them): answers everywhere -----------
    inputs[DAYS[2]] = nights(texts + FORMULA_TEXTS, ["P3"], 2000)
    write_partition(src, DAYS[2], inputs[DAYS[2]])
    second = run("--review-threshold", "1.0")
    assert (second["labeled"], second["scored"]) == (1, len(FORMULA_TEXTS))   # answered texts are never scored
    assert "answered 2, skipped 0" in second["out"]                          # nights 1 and 2 rewritten
    table = everything()

    def expected(row) -> tuple[str, str]:
        if row.texts == scoped_text and row.property_id == "P2":
            return flip(model_label[row.texts]), "review"
        if row.texts in flipped:
            return flip(model_label[row.texts]), "review"
        if row.texts in flagged:
            return model_label[row.texts], "review"                              # confirmed
        return model_label.get(row.texts, row.label), "model"

    got = [(r.label, r.label_source) for r in table.itertuples()]
    assert got == [expected(r) for r in table.itertuples()]
    reviewed = table[table.label_source == "review"]
    assert (reviewed.confidence == 1.0).all() and not reviewed.needs_review.any() and reviewed.review_reason.isna().all()
    answered_snapshot = CorrectionsTable(iceberg_catalog, corrections).snapshot_id
    assert {c.corrections_snapshot for c in commits(iceberg_catalog, table_name).values()} == {answered_snapshot}
    reviewed_rows = int((table.label_source == "review").sum())
    assert f"reviewers' answers {reviewed_rows} |" in second["out"]
    # the audit sample reviewers answered estimates the accuracy of the rows nobody else was shown
    audited = sorted(audit_texts)
    right = sum(t not in flipped for t in audited)
    assert f", {right} of {len(audited)} audited texts)" in second["out"]

    # -- the formula-like lines: export, answer in a semicolon sheet, import, next run --------------
    night3 = f"{exports}/dt={DAYS[2]}.csv"
    answers3 = {t: flip(model_label.get(t) or "Expense") for t in FORMULA_TEXTS[:2]}
    assert edit_like_a_spreadsheet(night3, tmp_path / "night3.csv",
                                   lambda r: answers3.get(unguard(r["texts"]), ""), delimiter=";",
                                   keep=lambda r: unguard(r["texts"]) in FORMULA_TEXTS) == len(FORMULA_TEXTS)
    assert "'=HYPERLINK" in (tmp_path / "night3.csv").read_text(encoding="utf-8-sig")   # the guard, as exported
    imported(tmp_path / "night3.csv")
    third = run()
    assert "answered 1, skipped 2" in third["out"] and third["scored"] == 0
    table = everything()
    formula = table[table.texts.isin(FORMULA_TEXTS)].set_index("texts")
    assert (formula.label_source == "review").all()
    assert {t: formula.label[t] for t in answers3} == answers3

    # -- nothing new: nothing committed, not even table properties ----------------------------------
    labeled = LabeledTable(iceberg_catalog, table_name).table
    before = (snapshot_count(iceberg_catalog, table_name), labeled.metadata_location)
    quiet = run()
    assert (quiet["labeled"], quiet["skipped"]) == (0, 3) and "answered" not in quiet["out"].splitlines()[0]
    assert (snapshot_count(iceberg_catalog, table_name), LabeledTable(iceberg_catalog, table_name).table.metadata_location) == before

    # -- an import lands while a run is under way: that run keeps the answers it planned with -------
    changed_mind = flipped[0]   # a reviewer changes their mind about it: the model was right after all
    inputs["2024-03-04"] = nights([changed_mind, *texts[:5]], ["P4"], 3000)
    write_partition(src, "2024-03-04", inputs["2024-03-04"])
    (tmp_path / "changed.csv").write_text(review_csv([{"texts": changed_mind, "label": flip(model_label[changed_mind]),
                                                       "corrected_label": model_label[changed_mind],
                                                       "model_version": version}]))
    settings = LabelSettings(model=tiny_artifact, input=src, catalog=iceberg_catalog, output_table=table_name,
                             cache=cache, corrections=corrections, batch_size=16, shuffle_partitions=2)
    labeled = LabeledTable(iceberg_catalog, table_name)
    planned = plan(settings, version, labeled, corrections=CorrectionsTable(iceberg_catalog, corrections))
    imported(tmp_path / "changed.csv")
    assert execute(settings, planned, labeled, version,
                   corrections=CorrectionsTable(iceberg_catalog, corrections)).exit_status == 0
    capsys.readouterr()
    table = everything()
    assert set(table.label[table.texts == changed_mind]) == {flip(model_label[changed_mind])}   # as planned
    latest = run()
    assert "answered 4" in latest["out"]                # every partition holding that text, night 4 included
    table = everything()
    assert set(table.label[table.texts == changed_mind]) == {model_label[changed_mind]}

    # -- rollback to before that run, and someone deletes night 2 by hand: the next run mends both --
    head = LabeledTable(iceberg_catalog, table_name).table
    before_latest = commits(iceberg_catalog, table_name)[f"dt={DAYS[0]}"].snapshot_id
    parent = head.metadata.snapshot_by_id(before_latest).parent_snapshot_id
    assert table_job.main(["rollback", "--catalog", iceberg_catalog, "--output-table", table_name, "--to", str(parent)]) == 0
    capsys.readouterr()
    head = LabeledTable(iceberg_catalog, table_name).table
    head.delete(f"dt = '{DAYS[1]}'")
    assert len(read_labeled(iceberg_catalog, table_name, row_filter=f"dt = '{DAYS[1]}'")) == 0
    mended = run("--dry-run")
    assert f"label  dt={DAYS[1]}" in mended["out"] and "changed outside this job" in mended["out"]
    mended = run()
    assert mended["labeled"] == 1 and mended["failed"] == 0
    table = everything()
    assert set(table.label[table.texts == changed_mind]) == {model_label[changed_mind]}
    assert got_labels_match(table, scoped_text, model_label)


def got_labels_match(table: pd.DataFrame, scoped_text: str, model_label: dict) -> bool:
    """The scoped answer still holds for P2 only, after every rewrite."""
    rows = table[table.texts == scoped_text]
    return all((r.label != model_label[scoped_text]) == (r.property_id == "P2") for r in rows.itertuples())


@pytest.mark.integration
def test_stats_give_counts_the_audit_estimate_and_the_fixes_per_model_version(iceberg_catalog, labeled_table,
                                                                              tmp_path, capsys):
    """jobs.review stats, from the labeled table's columns and the corrections table alone."""
    from test_label import commit_rows, labeled_rows

    rows = labeled_rows([f"Line {i}" for i in range(8)], list(range(8)))   # low_confidence on even ids
    reasons = ["low_confidence", "audit", "low_confidence", "audit", "low_confidence", "audit", "low_confidence", None]
    rows = rows.set_column(rows.schema.get_field_index("review_reason"), "review_reason", pa.array(reasons))
    rows = rows.set_column(rows.schema.get_field_index("needs_review"), "needs_review", pa.array([r is not None for r in reasons]))
    rows = rows.set_column(rows.schema.get_field_index("model_version"), "model_version", pa.array(["v1"] * 8))
    commit_rows(iceberg_catalog, labeled_table, "2024-03-01", rows)
    path = tmp_path / "answers.csv"
    answers = ["Expense", "", "Expense", "", "", "Expense", "", ""]   # 3 audit texts: 2 right, 1 wrong
    path.write_text(review_csv([{"texts": f"Line {i}", "label": "Income", "corrected_label": a, "model_version": "v1",
                                 "review_reason": reasons[i] or ""} for i, a in enumerate(answers)]))
    corrections = labeled_table + "_corrections"
    assert review_job.main(import_args(iceberg_catalog, labeled_table, corrections, path)) == 0
    capsys.readouterr()
    assert review_job.main(["stats", "--catalog", iceberg_catalog, "--corrections", corrections,
                            "--output-table", labeled_table]) == 0
    out = capsys.readouterr().out
    low, high = wilson_interval(2, 3)
    assert ("model v1: 8 rows labeled, 7 flagged (low_confidence 4, audit 3), 0 labeled by reviewers' answers; "
            "8 answers recorded") in out
    assert f"66.7% of the rows nobody checked are right (95% interval {100 * low:.1f}-{100 * high:.1f}%, 2 of 3" in out
    assert "fixed Income -> Expense: 3 text(s), e.g. 'Line 0', 'Line 2'" in out


@pytest.mark.integration
def test_a_table_made_before_the_review_columns_gains_them_and_its_old_files_take_answers(
        ray_cluster, iceberg_catalog, table_name):
    """A table (and data files) from before review_reason and label_source existed: the next run
    adds the columns, and the rewrite reads the old files with them null, answers applied."""
    from test_label import commit_rows, labeled_rows, read_labeled

    from clf_core.labeling.plan import Plan, Rewrite
    from clf_core.labeling.settings import LabelSettings
    from clf_core.labeling.pipeline import correct_rows

    old_rows = labeled_rows(["Rent", "Gas", "Water"], [1, 2, 3]).drop_columns(["review_reason", "label_source"])
    import clf_core.labeling.table as table_module

    first_columns = pa.schema([f for f in table_module.OUTPUT_SCHEMA if f.name in old_rows.column_names])
    original = table_module.OUTPUT_SCHEMA
    table_module.OUTPUT_SCHEMA = first_columns        # the job as it was: six labeling columns
    try:
        commit_rows(iceberg_catalog, table_name, "2024-03-01", old_rows)
    finally:
        table_module.OUTPUT_SCHEMA = original
    labeled = LabeledTable(iceberg_catalog, table_name)
    assert "label_source" not in {f.name for f in labeled.table.schema().fields}
    labeled.ensure(pa.schema([("row_id", pa.int64()), ("texts", pa.string())]), key_is_date=True)
    assert {"review_reason", "label_source"} <= {f.name for f in labeled.table.schema().fields}
    before = read_labeled(iceberg_catalog, table_name)
    assert before.label_source.isna().all() and len(before) == 3

    files = labeled.partition_files()["dt=2024-03-01"]
    record = labeled.commits()["dt=2024-03-01"]
    answers = Answers("ns.c", 1, unscoped={"Gas": ("Income", 0)})
    pl = Plan(todo=[], skipped=[], failed={}, to_correct=[Rewrite("dt=2024-03-01", "2024-03-01", files.files, 3, record, 1)])
    settings = LabelSettings(text_column="texts")
    rewritten = correct_rows(settings, pl, labeled, answers).to_pandas().sort_values("row_id")
    assert rewritten.label.tolist() == ["Income", "Income", "Income"]
    assert rewritten.label_source.tolist() == ["model", "review", "model"]       # old rows: the model's
    assert rewritten.confidence.tolist() == [0.75, 1.0, 0.75] and not rewritten.needs_review.iloc[1]
    assert list(rewritten.columns) == [f.name for f in labeled.table.schema().fields]
