"""Label the ledger partitions the output table has no labels for yet (the nightly job).

Run as:
    python -m jobs.label --model s3://models/ledger-clf/v3 --input s3://ledgers/raw \
        --catalog ledgers --output-table ledgers.labeled_lines --cache s3://ledgers/label-cache
    ray job submit --working-dir . -- python -m jobs.label --model s3://models/ledger-clf/v3 \
        --input s3://ledgers/raw --catalog ledgers --output-table ledgers.labeled_lines \
        --cache s3://ledgers/label-cache --actors 4 --gpus-per-actor 1 --cpus-per-actor 4

Smoke size (CPU, seconds): add `--batch-size 16 --dry-run` to see the plan, drop `--dry-run` to run it.

The output is an Apache Iceberg table in a pyiceberg catalog (`--catalog`, configured the pyiceberg
way: .pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__* variables). Every input partition
(dt=YYYY-MM-DD/) the table holds no labels for is labeled, so a missed night is caught up, and so
is one whose input files changed since it was labeled (a late or rewritten file); `--force`
relabels the rest too. Each partition is replaced in one Iceberg commit. Exit status 0 when every
planned partition committed (or a concurrent run committed it), 1 when any failed (each failure
is named in the summary), 2 for bad arguments. Storage credentials and endpoints come from the
standard AWS environment.
"""

from __future__ import annotations

import argparse
import logging
import sys

from clf_core.errors import ClfError
from clf_core.table import LabeledTable, TableError

log = logging.getLogger("jobs.label")


def build_parser() -> argparse.ArgumentParser:
    from clf_core.label_settings import LabelSettings
    from clf_core.settings import add_arguments

    parser = argparse.ArgumentParser(prog="python -m jobs.label", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)  # an old --output must not pass for --output-table
    add_arguments(parser, LabelSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    from clf_core.artifact import open_artifact
    from clf_core.label_plan import plan
    from clf_core.label_settings import LabelSettings
    from clf_core.labeling import execute
    from clf_core.settings import from_args
    from clf_core.logs import setup_logging

    setup_logging()
    try:
        settings = from_args(LabelSettings, build_parser().parse_args(argv)).validate()
        model_version = open_artifact(settings.model).model_version   # a bad --model fails here, not in an actor
        table = LabeledTable(settings.catalog, settings.output_table, settings.partition_key)
        todo = plan(settings, model_version, table)
    except TableError as exc:  # the table exists but cannot be read: a run-time failure
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ClfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = execute(settings, todo, table, model_version)
    return summary.exit_status if summary else 0


if __name__ == "__main__":
    sys.exit(main())
