"""The whole system on one laptop: train -> promote -> nightly labeling into an Iceberg table -> a night from the cache -> reviewers' answers applied -> a model retrained with the answers, gated and rolled out.

Run as (after `make setup`; `make demo` does both):

    python -m jobs.demo                 # about 5 minutes on 2 CPU cores
    python -m jobs.demo --smoke         # tiny backbone and data, about a minute (the tests run this)
    python -m jobs.demo --stop          # stop the local S3 endpoint a demo left running

The embedded default: a local Ray cluster, a real S3 endpoint on loopback (moto_server, started
here unless AWS_ENDPOINT_URL already points somewhere), a real Iceberg catalog (pyiceberg's SQL
catalog on a SQLite file under --workdir, its warehouse on that endpoint) and the small offline
MiniLM backbone. The same jobs run unchanged on a real cluster against S3, the Glue catalog and
Mistral-7B (README, "On a real cluster"). A reviewer (simulated from the sample ledgers' own
labels) answers the first night's review file; the answers are imported (python -m jobs.review
import) and the next night applies them, to its rows and to the nights labeled before. Models go
into a registry (runs on `--model .../income-expense@champion`): the first is promoted on an
evaluation file held out of the sample; at the end a second one, trained with the reviewers'
answers, goes through the promotion gate and a backfill with it prints its diff report. The demo
ends by printing three lines that read the labeled table with pyiceberg; the local S3 endpoint stays up for them until `--stop` (or the next
demo, which replaces this one's state). The model's report and plots and the review CSVs are
copied under --workdir (default runs/demo) so they can be opened.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from clf_core import cli
from clf_core.errors import ClfError
from clf_core.labeling.settings import LabelSettings
from clf_core.settings import check, from_args, setting

log = logging.getLogger("jobs.demo")

# the label jobs' --review-threshold, declared once there
_LABEL_THRESHOLD = next(f for f in dataclasses.fields(LabelSettings) if f.name == "review_threshold")

BUCKET = "ledger-demo"
FIRST_NIGHT = date(2026, 11, 1)
# The names the README's examples and the cluster use: after `source runs/demo/env.sh` they run as written.
CATALOG, TABLE, CORRECTIONS = "ledgers", "ledgers.labeled_lines", "ledgers.corrections"
NAME = "income-expense"
EVAL_SHARE = 0.15       # of the labeled sample, held out as the team's evaluation file for promotions
# The gate's tolerance: on ~170 evaluation rows one row moves macro-F1 by about 0.01.
DEMO_MAX_DROP = 0.02
AUDIT_FRACTION = 0.05   # a larger sample than the default 1%: a demo's nights are small
REVIEW_BUDGET = 0.10    # the least confident 10% of each run's rows go to review, whatever the threshold
PID_FILE = "local-s3.pid"


@dataclass
class DemoSettings:
    workdir: str = setting("Local folder for this demo's state and outputs (replaced on each run).", default="runs/demo")
    nights: int = setting("Nightly partitions in the first labeling run.", at_least=1, default=3)
    review_threshold: float = setting(_LABEL_THRESHOLD.metadata["help"], default=_LABEL_THRESHOLD.default)
    smoke: bool = setting("Tiny Mistral backbone and few rows: a test-sized run.", default=False)
    stop: bool = setting("Stop the local S3 endpoint a previous demo left running, and exit.", default=False)

    def validate(self) -> "DemoSettings":
        wrong = [] if 0.0 <= self.review_threshold <= 1.0 or self.review_threshold == -1.0 else [
            f"--review-threshold {self.review_threshold}: must be within [0, 1], or -1 for the model's own"]
        return check(self, wrong)


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser("python -m jobs.demo", __doc__, DemoSettings)


def stop_local_s3(workdir: Path) -> bool:
    """Stop the moto_server a previous demo in `workdir` left running (its pid file says which)."""
    pid_file = workdir / PID_FILE
    if not pid_file.exists():
        return False
    try:
        os.killpg(int(pid_file.read_text().strip()), signal.SIGTERM)  # it runs in a session of its own
        stopped = True
    except (ProcessLookupError, ValueError, PermissionError):
        stopped = False
    pid_file.unlink(missing_ok=True)
    return stopped


def write_catalog_config(workdir: Path, s3) -> dict[str, str]:
    """The demo's catalog, configured the pyiceberg way: environment variables for this process
    and its Ray workers, and .pyiceberg.yaml in the workdir for the reading snippet."""
    settings = {"type": "sql", "uri": f"sqlite:///{workdir / 'catalog.db'}", "warehouse": f"s3://{BUCKET}/warehouse",
                "py-io-impl": "pyiceberg.io.fsspec.FsspecFileIO"}
    for key, value in settings.items():
        os.environ[f"PYICEBERG_CATALOG__{CATALOG.upper()}__{key.upper().replace('-', '_')}"] = value
    yaml_settings = dict(settings)
    if s3:  # the local endpoint and its dummy keys (moto accepts any): a reader outside this process needs them
        yaml_settings.update({"s3.endpoint": s3.endpoint, "s3.access-key-id": s3.access_key_id,
                              "s3.secret-access-key": s3.secret_access_key, "s3.region": "us-east-1"})
    lines = ["catalog:", f"  {CATALOG}:"] + [f"    {k}: {v}" for k, v in yaml_settings.items()]
    (workdir / ".pyiceberg.yaml").write_text("\n".join(lines) + "\n")
    write_env(workdir, s3)
    return settings


def write_env(workdir: Path, s3) -> Path:
    """env.sh: `source` it and a new shell talks to this demo as the README's commands expect: the
    venv, the catalog (PYICEBERG_HOME: its .pyiceberg.yaml), the S3 endpoint. Only the local
    endpoint's dummy keys are written down; with an endpoint of your own, keys stay where they are."""
    venv = Path(sys.executable).parent
    lines = ["# source this file: the demo's venv, catalog `ledgers` and S3 endpoint, for the README's commands",
             f"source {venv / 'activate'}" if (venv / "activate").exists() else f"export PATH={venv}:$PATH",
             f"export PYICEBERG_HOME={workdir}", "export HF_HUB_OFFLINE=1",
             "export POLARS_ICEBERG_PLANNER=pyiceberg   # polars plans Iceberg scans with pyiceberg (no plugin)"]
    if s3:
        lines += [f"export {key}={value}" for key, value in s3.env.items()]
    elif os.environ.get("AWS_ENDPOINT_URL"):
        lines.append(f"export AWS_ENDPOINT_URL={os.environ['AWS_ENDPOINT_URL']}")
    target = workdir / "env.sh"
    target.write_text("\n".join(lines) + "\n")
    return target


def shown(path: Path) -> str:
    """A path as a person types it: relative to the current folder when inside it."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


def main(argv: list[str] | None = None) -> int:
    from clf_core import storage
    from jobs.support.local_s3 import LocalS3, apply_env
    from clf_core.logs import setup_logging
    from jobs.support.sample_ledgers import write_nights

    args = build_parser().parse_args(argv)
    setup_logging(verbose=cli.verbose(args))
    try:
        demo = from_args(DemoSettings, args).validate()
    except ClfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    workdir = Path(demo.workdir).resolve()
    if demo.stop:
        print("stopped the local S3 endpoint" if stop_local_s3(workdir) else f"no local S3 endpoint of a demo in {workdir}")
        return 0
    started = time.monotonic()
    if workdir.exists():
        print(f"replacing the previous demo state in {workdir}")
        stop_local_s3(workdir)
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    # every log record from INFO, the libraries' included, in a file (the console shows our own)
    setup_logging(verbose=cli.verbose(args), log_file=workdir / "demo.log")
    print(f"log: {shown(workdir / 'demo.log')}")

    s3 = None
    if os.environ.get("AWS_ENDPOINT_URL"):
        print(f"using the configured S3 endpoint {os.environ['AWS_ENDPOINT_URL']}")
    else:
        s3 = LocalS3(log_path=workdir / "moto_server.log").start()
        (workdir / PID_FILE).write_text(str(s3.process.pid))
        apply_env(s3.env)  # before Ray starts, so every worker inherits the endpoint
        print(f"started a local S3 endpoint (moto_server) at {s3.endpoint}")
    ok = False
    try:
        bucket = s3.make_bucket(BUCKET) if s3 else f"s3://{BUCKET}"
        write_catalog_config(workdir, s3)
        labeled, evaluation = write_labeled_sample(bucket)
        ledgers, registry = f"{bucket}/ledgers", f"{bucket}/models"
        champion = f"{registry}/{NAME}@champion"
        cache, review = f"{bucket}/label-cache", f"{bucket}/review"
        size = {"properties": 2, "accounts_per_property": 10} if demo.smoke else {}
        write_nights(ledgers, FIRST_NIGHT, demo.nights, **size)
        print(f"loaded the labeled sample and {demo.nights} nightly ledgers into {bucket}")

        from clf_core.runtime import ensure_ray

        ensure_ray()
        step("1/5 train the classifier into the registry (jobs.train), promote it to champion (jobs.promote)")
        v1 = train(labeled, registry, workdir, demo.smoke)
        if v1 is None or promote(registry, v1, evaluation, cache) is None:
            return 1

        step(f"2/5 label {demo.nights} nightly partitions into table {TABLE} with {NAME}@champion (jobs.label)")
        first = label(champion, ledgers, cache, review, demo.review_threshold)

        step("3/5 the next night: one new partition, scored from the label cache where possible")
        write_nights(ledgers, FIRST_NIGHT + timedelta(days=demo.nights), 1, new_accounts=8, **size)
        second = label(champion, ledgers, cache, review, demo.review_threshold)
        if not (first and second and first.ok and second.ok):
            return 1

        step("4/5 a reviewer answers night 1's review file (jobs.review import); the next night applies the answers")
        answered = answer_like_a_reviewer(f"{review}/dt={FIRST_NIGHT.isoformat()}.csv", workdir / "reviewed.csv")
        print(import_answers(workdir / "reviewed.csv"))
        last = FIRST_NIGHT + timedelta(days=demo.nights + 1)
        write_nights(ledgers, last, 1, **size)
        third = label(champion, ledgers, cache, review, demo.review_threshold)
        if not (third and third.ok):
            return 1

        step("5/5 a model trained with the answers: the promotion gate (jobs.promote), then a backfill (jobs.backfill)")
        v2 = train(labeled, registry, workdir, demo.smoke, corrections=True)
        if v2 is None or promote(registry, v2, evaluation, cache, shadow_nights=2) is None:
            return 1
        relabeled = backfill(champion, ledgers, cache, review, FIRST_NIGHT, last)
        if not (relabeled and relabeled.ok):
            return 1

        local = workdir / "outputs"
        storage.download_dir(registry_version(registry, v2), local / "model")   # the champion now
        storage.download_dir(review, local / "review")
        summarize(local, workdir, first, second, third, answered, relabeled, time.monotonic() - started)
        ok = True
        return 0
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if s3 and not ok:  # on success it stays up for the snippet that reads the table
            s3.stop()
            (workdir / PID_FILE).unlink(missing_ok=True)


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def write_labeled_sample(bucket: str) -> tuple[str, str]:
    """The packaged chart of accounts, split into the training file and the evaluation file a team
    keeps for promotions (EVAL_SHARE, stratified by label)."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    from clf_core import storage
    from clf_core.model.labels import sample_data_path

    rows = pd.read_csv(sample_data_path())
    train_rows, eval_rows = train_test_split(rows, test_size=EVAL_SHARE, stratify=rows["label"], random_state=0)
    labeled, evaluation = f"{bucket}/labeled/coa_income_expense.csv", f"{bucket}/labeled/eval.csv"
    storage.write_bytes(labeled, train_rows.to_csv(index=False).encode())
    storage.write_bytes(evaluation, eval_rows.to_csv(index=False).encode())
    return labeled, evaluation


def registry_version(registry: str, version: str) -> str:
    from clf_core.model.registry import version_uri

    return version_uri(registry, NAME, version)


def train(labeled: str, registry: str, workdir: Path, smoke: bool, corrections: bool = False) -> str | None:
    """`python -m jobs.train --data ... --registry ... --name income-expense --text-column full_path
    --cpus-per-worker 1` (with `--catalog demo --corrections ledgers.corrections`: learning from the
    reviewers' answers): the default backbone and recipe; with --smoke, the tiny model of
    configs/tiny.yaml on 300 rows. Returns the version it published (None: it failed)."""
    from clf_core.model.config import ClassifierConfig
    from clf_core.model.registry import versions
    from clf_core.training.job import TrainJobSettings, run

    before = set(versions(registry, NAME))
    settings = TrainJobSettings(data=labeled, registry=registry, name=NAME, cpus_per_worker=1.0)
    if corrections:
        settings.catalog, settings.corrections = CATALOG, CORRECTIONS
    overrides = {"data.text_column": "full_path", "data.label_column": "label"}
    if not smoke:
        status = run(settings, ClassifierConfig.load(overrides=overrides))
    else:
        from jobs.support.tiny import build_tiny_mistral, tiny_config

        settings.limit_rows = 300
        status = run(settings, tiny_config(build_tiny_mistral(workdir / "tiny-backbone"), {**overrides, "train.epochs": 1}))
    new = set(versions(registry, NAME)) - before
    return next(iter(new)) if status == 0 and new else None


def promote(registry: str, version: str, evaluation: str, cache: str, shadow_nights: int = 0) -> str | None:
    """`python -m jobs.promote --registry ... --name income-expense --candidate <version> --eval-data
    ... --text-column full_path --max-drop 0.02` (and the reviewed rows and shadow comparison on the
    demo's table): the gate's report. When it refuses, the demo shows the override, recorded with
    its reason, so the rest of the rollout still runs. Returns the new champion (None: failed)."""
    from clf_core.labeling.promotion import PromoteSettings, promote as run_promotion

    settings = PromoteSettings(registry=registry, name=NAME, candidate=version, eval_data=evaluation,
                               text_column="full_path", max_drop=DEMO_MAX_DROP, cache=cache, shadow_nights=shadow_nights,
                               **({"catalog": CATALOG, "corrections": CORRECTIONS, "output_table": TABLE}
                                  if shadow_nights else {}))
    status, report = run_promotion(settings)
    print(report)
    if status != 0:
        print("(the demo goes on with the override a person would record: --accept-worse --reason ...)")
        settings.accept_worse, settings.reason = True, "demo: show the whole rollout on a small evaluation file"
        status, report = run_promotion(settings)
        print(report.splitlines()[-1])
    return version if status == 0 else None


def backfill(model: str, ledgers: str, cache: str, review: str, start: date, end: date):
    """`python -m jobs.backfill --start ... --end ... --model .../income-expense@champion ...`: every
    night relabeled by the new champion, reviewers' answers applied again, and its diff report."""
    from clf_core.labeling.pipeline import label_job
    from clf_core.labeling.settings import LabelSettings

    settings = LabelSettings(model=model, input=ledgers, catalog=CATALOG, output_table=TABLE,
                             cache=cache, review_export=review, shuffle_partitions=4, audit_fraction=AUDIT_FRACTION,
                             review_budget=REVIEW_BUDGET, corrections=CORRECTIONS)
    return label_job(settings, start, end, mode="backfill")


def label(model: str, ledgers: str, cache: str, review: str, review_threshold: float):
    """`python -m jobs.label --model ... --input ... --catalog demo --output-table ledgers.labeled_lines
    --cache ... --review-export ... --shuffle-partitions 4` (4 shuffle partitions suit 2 cores)."""
    from clf_core.labeling.settings import LabelSettings
    from clf_core.labeling.pipeline import label_job

    return label_job(LabelSettings(model=model, input=ledgers, catalog=CATALOG, output_table=TABLE, cache=cache,
                                   review_export=review, review_threshold=review_threshold, shuffle_partitions=4,
                                   audit_fraction=AUDIT_FRACTION, review_budget=REVIEW_BUDGET,
                                   corrections=CORRECTIONS))


def answer_like_a_reviewer(export: str, target: Path) -> set[str]:
    """A reviewer's pass over an exported review file, done with the sample ledgers' own labels
    (source_label, known for their account lines): where it differs from the model's label they
    write it in corrected_label, where it agrees they leave the cell empty (the model was right);
    the Header/Total lines and bad rows they filter out of the sheet. Returns the corrected texts."""
    import csv
    import io

    from clf_core import storage
    from clf_core.review.file import unguard

    rows = list(csv.DictReader(io.StringIO(storage.read_text(export), newline="")))
    checked = [row for row in rows if row.get("source_label")]
    for row in checked:
        row["corrected_label"] = row["source_label"] if row["source_label"] != row["label"] else ""
    with open(target, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["texts", "label", "corrected_label"])
        writer.writeheader()
        writer.writerows(checked)
    return {unguard(row["texts"]) for row in checked if row["corrected_label"]}


def import_answers(path: Path) -> str:
    """`python -m jobs.review import --catalog demo --corrections ledgers.corrections
    --output-table ledgers.labeled_lines --file <path> --reviewer demo-reviewer`."""
    from clf_core.labeling.review_commands import ImportSettings, import_review

    return import_review(ImportSettings(catalog=CATALOG, corrections=CORRECTIONS, output_table=TABLE, file=str(path),
                                        reviewer="demo-reviewer"))


def rows_with_answers(corrected: set[str]) -> int:
    """Rows of the table that now carry a reviewer's correction (a label the model had not given)."""
    from pyiceberg.expressions import EqualTo

    from clf_core.labeling.table import LabeledTable

    rows = LabeledTable(CATALOG, TABLE).table.scan(row_filter=EqualTo("label_source", "review"),
                                                   selected_fields=("texts",)).to_arrow()
    return sum(1 for text in rows["texts"].to_pylist() if text in corrected)


def snippet(workdir: Path) -> list[str]:
    """Two lines that read the labeled table with plain pyiceberg from a new shell, as a user would."""
    code = (f"from pyiceberg.catalog import load_catalog; df = load_catalog('{CATALOG}').load_table('{TABLE}')"
            f".scan().to_pandas(); print(len(df), 'rows'); print(df[['dt', 'texts', 'label', 'label_source', "
            f"'needs_review']].head(8).to_string())")
    return [f"source {shown(workdir / 'env.sh')}   # the venv, catalog `ledgers`, the local S3 endpoint",
            f'python -c "{code}"']


def summarize(local: Path, workdir: Path, first, second, third, corrected: set[str], relabeled, seconds: float) -> None:
    import json

    metrics = json.loads((local / "model" / "metrics.json").read_text())
    manifest = json.loads((local / "model" / "manifest.json").read_text())
    test = metrics["test"]
    reviews = sorted(local.glob("review/*.csv"))
    plots = sorted(p.name for p in (local / "model").glob("*.png"))
    from clf_core.labeling.table import LabeledTable

    table = LabeledTable(CATALOG, TABLE)
    rows = sum(p.rows for p in table.partition_files().values())   # from the manifests
    flagged = table.table.scan(row_filter="needs_review = true", selected_fields=("needs_review",)).to_arrow().num_rows
    label_seconds = first.seconds + second.seconds + third.seconds
    print("\n=== summary")
    print(f"model {manifest['model_version']} ({manifest['backbone']['id']}), the champion after the rollout")
    print(f"  held-out macro-F1 {test['macro_f1']:.3f}, accuracy {test['accuracy']:.3f} ({test['rows']} rows)")
    print(f"  report: {local / 'model' / 'report.md'}")
    print(f"  plots:  {local / 'model'}/{{{', '.join(plots)}}}")
    print(f"labeled table {TABLE} in catalog '{CATALOG}' ({workdir / 'catalog.db'}, warehouse s3://{BUCKET}/warehouse)")
    print(f"  {rows} rows labeled in {label_seconds:.1f}s ({rows / max(label_seconds, 1e-9):.0f} rows/s), "
          f"{flagged} need review")
    print(f"  night 2 scored {second.scored} new texts, {second.cache_hits} from the label cache")
    print(f"  reviewers corrected {len(corrected)} text(s) of night 1; the next run rewrote "
          f"{len(third.partitions_corrected)} earlier night(s) without scoring, and {rows_with_answers(corrected)} "
          f"rows now carry the reviewers' labels")
    if third.audit is not None:
        print(f"  {third.audit.line()}")
    for line in relabeled.backfill_report:
        print(f"  {line}")
    print(f"  review files ({len(reviews)}): {reviews[0].parent if reviews else '-'}/<partition>.csv")
    print(f"total {seconds:.0f}s")
    print(f"\n=== from a new shell, `source {shown(workdir / 'env.sh')}` and every command in the README runs against "
          f"this demo (its local S3 endpoint stays up until `python -m jobs.demo --stop`); e.g. the table with pyiceberg:")
    for line in snippet(workdir):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
