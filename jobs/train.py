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
import sys

from clf_core import cli
from clf_core.model.config import ClassifierConfig, add_config_arguments, config_flag_values
from clf_core.settings import from_args
from clf_core.training.job import TrainJobSettings, run


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser("python -m jobs.train", __doc__, TrainJobSettings,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser.add_argument_group("the model and its recipe (fields of "
                                                   "clf_core.model.config.ClassifierConfig)"))
    return parser


def config_from_args(args: argparse.Namespace) -> ClassifierConfig:
    """--config, then the config flags, then --set: the later wins."""
    return from_args(TrainJobSettings, args).classifier_config(config_flag_values(args))


def train(args: argparse.Namespace) -> int:
    settings = from_args(TrainJobSettings, args)   # checked by run(), with the data, before Ray starts
    return run(settings, settings.classifier_config(config_flag_values(args)))


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), argv, train)


if __name__ == "__main__":
    sys.exit(main())
