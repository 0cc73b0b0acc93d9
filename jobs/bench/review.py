"""The review loop, measured on charts the model never saw (--items review; opt-in, ~5 min a seed).

Per seed: whole charts of the packaged chart of accounts are held out (drawn at random until they
hold --review-holdout of the rows), the default model is trained on the other charts, and the
held-out charts become one night of ledger (one row per account, `full_path` as the text, the
chart as a scope column). Then, through the real jobs on a local Ray, catalog and disk:

  1. jobs.label with --review-budget and --audit-fraction (no threshold): which errors the budget
     flags, beside those the model's own threshold would have flagged on the same rows;
  2. reviewers, simulated from the true labels, answer the exported file (the budget's rows and
     the audit sample): corrected_label where the model was wrong, empty where it was right;
     jobs.review import;
  3. the next jobs.label run (no new input): the share of the rows with a corrected text that
     carry the reviewers' label, and whether the audit estimate's 95% interval holds the true
     accuracy of the rows nobody was asked about (those the budget did not flag).

`review_loop` is also the first half of the corrections item (jobs/bench/corrections.py).
"""

from __future__ import annotations

import csv
import io
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from jobs.bench.settings import BenchSettings

CATALOG = "benchreview"


def held_out_charts(table, seed: int, share: float) -> list[str]:
    """Charts drawn at random (the largest, Malta's, never: it would be most of the held-out rows)
    until they hold `share` of the rows."""
    sizes = table["chart"].value_counts()
    charts = sorted(sizes.index[1:])
    random.Random(seed).shuffle(charts)
    chosen, rows = [], 0
    for chart in charts:
        if rows >= share * len(table):
            break
        chosen.append(chart)
        rows += int(sizes[chart])
    return sorted(chosen)


@dataclass
class Loop:
    """One seed's state: the model, the held-out night and the tables, as the items leave them."""
    seed: int
    work: Path
    artifact: str
    train: object                 # the training rows (DataFrame: full_path, label, chart)
    night: object                 # the held-out night (DataFrame: line_id, texts, chart, true_label)
    charts: list[str]
    config: str = ""              # --review-config: the training config of both models ("" = the default)
    table: str = "bench.labeled"
    corrections: str = "bench.corrections"
    figures: dict = field(default_factory=dict)

    @property
    def ledger(self) -> str:
        return str(self.work / "ledgers")

    @property
    def cache(self) -> str:
        return str(self.work / "label-cache")

    @property
    def exports(self) -> str:
        return str(self.work / "review")


def catalog_for(work: Path) -> str:
    """A pyiceberg SQL catalog on a SQLite file with its warehouse on local disk (environment variables)."""
    import os

    (work / "warehouse").mkdir(parents=True, exist_ok=True)
    for key, value in {"TYPE": "sql", "URI": f"sqlite:///{work / 'catalog.db'}",
                       "WAREHOUSE": f"file://{work / 'warehouse'}"}.items():
        os.environ[f"PYICEBERG_CATALOG__{CATALOG.upper()}__{key}"] = value
    return CATALOG


def train_model(rows, seed: int, directory: Path, answers: tuple[str, str] | None = None, config: str = "") -> str:
    """The default model (MiniLM, `full_path`), or the one `config` (a YAML file) describes, trained
    in this process on `rows` (85/15 train / validation, stratified by the split seed); with
    `answers` (catalog, corrections table), the same split with the reviewers' answers merged in as
    jobs.train --corrections does. Returns the artifact's path."""
    from clf_core.model.config import ClassifierConfig
    from clf_core.training.data import Split, answers_into_splits, stratified_split
    from clf_core.training.recipe import train_classifier

    cfg = ClassifierConfig.load(config or None, {"data.text_column": "full_path", "train.split_seed": seed})
    split = stratified_split(rows[["full_path", "label"]], "label", [0.85, 0.15, 0.0], seed)
    if answers:
        parts, _ = answers_into_splits({"train": split.train, "validation": split.validation}, cfg.data, *answers)
        split = Split(parts["train"], parts["validation"], parts["validation"].iloc[0:0])
    train_classifier(cfg, split).save(directory)
    return str(directory)


def setup(settings: BenchSettings, seed: int, work: Path) -> Loop:
    import pandas as pd

    from clf_core.model.labels import sample_data_path

    table = pd.read_csv(sample_data_path("coa_income_expense"))
    charts = held_out_charts(table, seed, settings.review_holdout)
    held = table[table["chart"].isin(charts)].reset_index(drop=True)
    train = table[~table["chart"].isin(charts)].reset_index(drop=True)
    work.mkdir(parents=True, exist_ok=True)
    artifact = train_model(train, seed, work / "model-v1", config=settings.review_config)
    night = pd.DataFrame({"line_id": range(len(held)), "texts": held["full_path"], "chart": held["chart"],
                          "true_label": held["label"]})
    partition = work / "ledgers" / "dt=2024-06-01"
    partition.mkdir(parents=True, exist_ok=True)
    night.drop(columns="true_label").to_parquet(partition / "part-0.parquet", index=False)
    return Loop(seed, work, artifact, train, night, charts, settings.review_config)


def label(loop: Loop, model: str, **extra):
    """jobs.label as the nightly cron runs it, on the loop's ledger, table and corrections."""
    from clf_core.labeling.settings import LabelSettings
    from clf_core.labeling.pipeline import label_job

    summary = label_job(LabelSettings(model=model, input=loop.ledger, catalog=catalog_for(loop.work),
                                      output_table=loop.table, cache=loop.cache, review_export=loop.exports,
                                      corrections=loop.corrections, shuffle_partitions=2, **extra))
    if summary is None or not summary.ok:
        raise RuntimeError(f"jobs.label failed: {summary.report() if summary else 'no run'}")
    return summary


def labeled(loop: Loop):
    """The table's rows joined to the true labels."""
    from clf_core.labeling.table import LabeledTable

    rows = LabeledTable(catalog_for(loop.work), loop.table).table.scan().to_pandas()
    return rows.merge(loop.night[["line_id", "true_label"]], on="line_id")


def answer_like_reviewers(loop: Loop) -> tuple[Path, set[str]]:
    """The exported review file answered from the true labels: the right label where the model
    was wrong, empty where it was right. Returns the file and the corrected texts."""
    from clf_core.review.file import unguard

    export = Path(loop.exports) / "dt=2024-06-01.csv"
    rows = list(csv.DictReader(io.StringIO(export.read_text(), newline="")))
    truth = dict(zip(loop.night["line_id"].astype(str), loop.night["true_label"]))
    corrected = set()
    for row in rows:
        right = truth[row["line_id"]]
        row["corrected_label"] = right if right != row["label"] else ""
        if row["corrected_label"]:
            corrected.add(unguard(row["texts"]))
    target = loop.work / "answered.csv"
    with open(target, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target, corrected


def review_loop(settings: BenchSettings, seed: int, work: Path) -> Loop:
    """Steps 1 to 3 of the module docstring for one seed; the figures land in `loop.figures`."""
    from clf_core.model.artifact import open_artifact
    from clf_core.review.corrections import CorrectionsTable, audit_estimate
    from clf_core.labeling.review_commands import ImportSettings, import_review

    loop = setup(settings, seed, work)
    threshold = open_artifact(loop.artifact).manifest["review"]["threshold"]
    label(loop, loop.artifact, review_threshold=0.0, review_budget=settings.review_budget,
          audit_fraction=settings.review_audit_fraction)
    first = labeled(loop)
    wrong = first["label"] != first["true_label"]
    budget = first["review_reason"] == "budget"
    below = first["confidence"] < threshold
    unflagged = ~first["review_reason"].isin(["budget", "low_confidence", "error"])
    f = loop.figures
    f.update({"seed": seed, "held_out_charts": loop.charts, "rows": len(first), "errors": int(wrong.sum()),
              "budget_flagged": float(budget.mean()), "budget_caught": int((wrong & budget).sum()),
              "threshold": threshold, "threshold_flagged": float(below.mean()),
              "threshold_caught": int((wrong & below).sum()),
              "audited_rows": int((first["review_reason"] == "audit").sum()),
              "unflagged_true_accuracy": float((~wrong[unflagged]).mean())})

    answered, corrected = answer_like_reviewers(loop)
    import_review(ImportSettings(catalog=catalog_for(loop.work), corrections=loop.corrections,
                                 output_table=loop.table, file=str(answered), reviewer="bench"))
    second = label(loop, loop.artifact)
    after = labeled(loop)
    holding = after[after["texts"].isin(corrected)]
    estimate = audit_estimate(CorrectionsTable(catalog_for(loop.work), loop.corrections).rows(),
                              open_artifact(loop.artifact).model_version)
    low, high = estimate.interval
    f.update({"corrected_texts": len(corrected), "rows_with_corrected_texts": len(holding),
              "carry_reviewers_label": float(((holding["label"] == holding["true_label"]) &
                                              (holding["label_source"] == "review")).mean()) if len(holding) else 1.0,
              "rewritten_partitions": len(second.partitions_corrected),
              "audit_estimate": estimate.accuracy, "audit_interval": [low, high], "audited_texts": estimate.audited,
              "interval_holds": bool(low <= f["unflagged_true_accuracy"] <= high)})
    return loop


def bench_review(settings: BenchSettings, work: Path) -> dict:
    seeds = [int(s) for s in settings.review_seeds.split(",") if s.strip()]
    return summarize([review_loop(settings, seed, work / f"review-seed-{seed}").figures for seed in seeds], settings)


def bench_review_of(corrections: dict) -> dict:
    """The review figures of the loops the corrections item ran first."""
    return corrections["review"]


def summarize(runs: list[dict], settings: BenchSettings) -> dict:
    return {"runs": runs, "budget": settings.review_budget, "audit_fraction": settings.review_audit_fraction,
            "config": settings.review_config,
            "median": {k: statistics.median(r[k] for r in runs) for k in
                       ("errors", "budget_caught", "threshold_caught", "budget_flagged", "threshold_flagged",
                        "carry_reviewers_label", "audit_estimate", "unflagged_true_accuracy")},
            "interval_holds": sum(r["interval_holds"] for r in runs)}


def model_of(results: dict) -> str:
    """The report's name for the items' models: the default, or the config they were trained with."""
    return f"model of {results['config']}" if results.get("config") else "default model"


def report(results: dict) -> list[str]:
    """The item's lines of the bench's table."""
    r = results
    lines = [f"-- review loop: {model_of(r)}, charts it never saw, budget {r['budget']:.0%} (no threshold), audit "
             f"{r['audit_fraction']:.0%}; {len(r['runs'])} seed(s), medians"]
    for run in r["runs"]:
        low, high = run["audit_interval"]
        lines.append(f"   seed {run['seed']}: {run['rows']} rows of {len(run['held_out_charts'])} charts, {run['errors']} "
                     f"errors | budget flags {run['budget_flagged']:.1%}, catches {run['budget_caught']} | threshold "
                     f"{run['threshold']:.3f} flags {run['threshold_flagged']:.1%}, catches {run['threshold_caught']} | "
                     f"{run['corrected_texts']} texts corrected: {run['carry_reviewers_label']:.0%} of their "
                     f"{run['rows_with_corrected_texts']} rows carry the answer | audit {run['audit_estimate']:.3f} "
                     f"[{low:.3f}, {high:.3f}] on {run['audited_texts']} texts vs true {run['unflagged_true_accuracy']:.3f}")
    m = r["median"]
    lines.append(f"   median: errors caught by the budget {m['budget_caught']} vs by the threshold {m['threshold_caught']} "
                 f"of {m['errors']}; rows of corrected texts carrying the answer {m['carry_reviewers_label']:.0%}; "
                 f"audit interval holds the true accuracy in {r['interval_holds']} of {len(r['runs'])}")
    return lines
