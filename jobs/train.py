"""Fine-tune the QLoRA ledger classifier with Ray Train and publish a versioned model artifact.

Run as (local Ray is started for you; small offline backbone, a few minutes on a laptop):

    python -m jobs.train --data clf_core/sample_data/coa_income_expense.csv --text-column full_path \\
        --output runs/models/income-expense-v1

On a cluster (Mistral-7B on GPU workers, data and artifact in S3):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.train --config configs/mistral_7b_qlora.yaml \\
        --data s3://ledgers/labeled/train.parquet --output s3://models/income-expense/v7 \\
        --num-workers 2 --use-gpu

Flow: config -> validate -> read + split the data on the driver (bad input fails here, before
any worker starts) -> Ray Train workers fine-tune (each loads the 4-bit base on its own device,
DDP over the LoRA + head weights, checkpoints every epoch, a lost worker resumes from the last
checkpoint) -> rank 0 evaluates the best weights on the held-out split and publishes the
artifact with its report.
"""

from __future__ import annotations

import argparse
import logging
import sys

from clf_core import cli
from clf_core.model.config import ClassifierConfig, add_config_arguments
from clf_core.errors import ClfError
from clf_core.logs import setup_logging
from clf_core.settings import from_args
from clf_core.training.job import TrainJobSettings, run

log = logging.getLogger("jobs.train")


def build_parser() -> argparse.ArgumentParser:
    p = cli.build_parser("python -m jobs.train", __doc__, TrainJobSettings,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("the model and its recipe (fields of clf_core.model.config.ClassifierConfig)")
    model.add_argument("--config", help="YAML config (sections model/lora/data/train/review); the flags below "
                                        "override it.")
    model.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="Override any config field, e.g. --set lora.r=16 (repeatable).")
    add_config_arguments(model)
    review = model.add_mutually_exclusive_group()
    review.add_argument("--review-fraction", type=float, metavar="SHARE",
                        help="Choose the default review threshold on validation to flag this share of rows, the least "
                             "confident (e.g. 0.08). [review.goal=fraction, review.value]")
    review.add_argument("--review-target-error", type=float, metavar="RATE",
                        help="Choose it to flag as few rows as keep the expected error rate among the rows not flagged "
                             "at most RATE (e.g. 0.01). [review.goal=target_error, review.value]")
    return p


def config_from_args(args: argparse.Namespace) -> ClassifierConfig:
    """--config, then the config flags, then --set: the later wins."""
    overrides = {dotted: value for dotted, value in vars(args).items() if "." in dotted}
    if args.review_fraction is not None:
        overrides.update({"review.goal": "fraction", "review.value": args.review_fraction})
    if args.review_target_error is not None:
        overrides.update({"review.goal": "target_error", "review.value": args.review_target_error})
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise ClfError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set lora.r=16")
        overrides[field.strip()] = value
    return ClassifierConfig.load(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=cli.verbose(args))
    try:
        settings = from_args(TrainJobSettings, args)   # checked by run(), with the data, before Ray starts
        cfg = config_from_args(args)
    except ClfError as exc:
        log.error("%s", exc)
        return 2
    return cli.run(lambda: run(settings, cfg))


if __name__ == "__main__":
    sys.exit(main())
