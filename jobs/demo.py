"""The whole system on one laptop: train -> nightly labeling -> a second night from the cache.

Run as (after `make setup`; `make demo` does both):

    python -m jobs.demo                 # about 5 minutes on 2 CPU cores
    python -m jobs.demo --smoke         # tiny backbone and data, under a minute (the tests run this)

The embedded default: a local Ray cluster, a real S3 endpoint on loopback (moto_server, started
here unless AWS_ENDPOINT_URL already points somewhere) and the small offline MiniLM backbone.
The same jobs run unchanged on a real cluster against S3 with Mistral-7B (README, "On a real
cluster"). Everything it makes is copied under --workdir (default runs/demo) so it can be opened:
the model's report and plots, the labeled partitions and their review files.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from datetime import date, timedelta
from pathlib import Path

log = logging.getLogger("jobs.demo")

BUCKET = "ledger-demo"
FIRST_NIGHT = date(2026, 11, 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="Local folder for this demo's state and outputs (replaced on each run).")
    p.add_argument("--nights", type=int, default=3, help="Nightly partitions in the first labeling run.")
    p.add_argument("--review-threshold", type=float, default=0.9,
                   help="Rows whose confidence is below this are flagged needs_review and listed per partition.")
    p.add_argument("--smoke", action="store_true", help="Tiny Mistral backbone and few rows: a test-sized run.")
    return p


def main(argv: list[str] | None = None) -> int:
    from clf_core import storage
    from clf_core.data import sample_data_path
    from clf_core.local_s3 import LocalS3, apply_env
    from clf_core.logs import setup_logging
    from clf_core.sample_ledgers import write_nights

    setup_logging()
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.review_threshold <= 1.0:
        print(f"error: --review-threshold {args.review_threshold}: must be within [0, 1]", file=sys.stderr)
        return 2
    started = time.monotonic()
    workdir = Path(args.workdir).resolve()
    if workdir.exists():
        print(f"replacing the previous demo state in {workdir}")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    s3 = None
    if os.environ.get("AWS_ENDPOINT_URL"):
        print(f"using the configured S3 endpoint {os.environ['AWS_ENDPOINT_URL']}")
    else:
        s3 = LocalS3(log_path=workdir / "moto_server.log").start()
        apply_env(s3.env)  # before Ray starts, so every worker inherits the endpoint
        print(f"started a local S3 endpoint (moto_server) at {s3.endpoint}")
    try:
        bucket = s3.make_bucket(BUCKET) if s3 else f"s3://{BUCKET}"
        labeled = f"{bucket}/labeled/coa_income_expense.csv"
        storage.write_bytes(labeled, Path(sample_data_path()).read_bytes())
        ledgers, model, output = f"{bucket}/ledgers", f"{bucket}/models/income-expense-v1", f"{bucket}/labeled-ledgers"
        size = {"properties": 2, "accounts_per_property": 10} if args.smoke else {}
        write_nights(ledgers, FIRST_NIGHT, args.nights, **size)
        print(f"loaded the labeled sample and {args.nights} nightly ledgers into {bucket}")

        from clf_core.runtime import ensure_ray

        ensure_ray()
        step("1/3 train the classifier (jobs.train)")
        train_args = ["--data", labeled, "--output", model, "--text-column", "full_path", "--label-column", "label",
                      "--cpus-per-worker", "1"]
        if args.smoke:
            from clf_core.tiny import build_tiny_mistral

            train_args += ["--base-model", str(build_tiny_mistral(workdir / "tiny-backbone")), "--limit-rows", "300",
                           "--epochs", "1", "--set", "lora.r=8", "--set", "lora.alpha=16", "--lr", "2e-3"]
        from jobs import train as train_job

        if train_job.main(train_args) != 0:
            return 1

        step(f"2/3 label {args.nights} nightly partitions (jobs.label)")
        first = label(model, ledgers, output, args.review_threshold)

        step("3/3 the next night: one new partition, scored from the label cache where possible")
        write_nights(ledgers, FIRST_NIGHT + timedelta(days=args.nights), 1, new_accounts=8, **size)
        second = label(model, ledgers, output, args.review_threshold)
        if not (first.ok and second.ok):
            return 1

        local = workdir / "outputs"
        storage.download_dir(model, local / "model")
        storage.download_dir(output, local / "labeled-ledgers")
        summarize(local, first, second, time.monotonic() - started)
        return 0
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if s3:
            s3.stop()


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def label(model: str, ledgers: str, output: str, review_threshold: float):
    from clf_core.artifact import open_artifact
    from clf_core.labeling import LabelSettings, execute, plan

    # Exactly what `python -m jobs.label --model ... --input ... --output ...` runs.
    settings = LabelSettings(model=model, input=ledgers, output=output, review_threshold=review_threshold,
                             shuffle_partitions=4).validate()
    version = open_artifact(model).model_version
    return execute(settings, plan(settings, version), version)[1]


def summarize(local: Path, first, second, seconds: float) -> None:
    import json

    metrics = json.loads((local / "model" / "metrics.json").read_text())
    manifest = json.loads((local / "model" / "manifest.json").read_text())
    test = metrics["test"]
    reviews = sorted(local.glob("labeled-ledgers/**/_review.csv"))
    rows = first.rows_out + second.rows_out
    label_seconds = first.seconds + second.seconds
    print("\n=== summary")
    print(f"model {manifest['model_version']} ({manifest['backbone']['id']})")
    print(f"  held-out macro-F1 {test['macro_f1']:.3f}, accuracy {test['accuracy']:.3f} ({test['rows']} rows)")
    print(f"  report: {local / 'model' / 'report.md'}")
    print(f"  plots:  {local / 'model' / 'confusion_matrix.png'}, {local / 'model' / 'curves.png'}")
    print(f"labeled partitions: {local / 'labeled-ledgers'}")
    print(f"  {rows} rows labeled in {label_seconds:.1f}s ({rows / max(label_seconds, 1e-9):.0f} rows/s)")
    print(f"  night 2 scored {second.scored} new texts, {second.cache_hits} from the label cache")
    print(f"  review files ({len(reviews)}): {reviews[0].parent if reviews else '-'}/_review.csv ...")
    print(f"total {seconds:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
