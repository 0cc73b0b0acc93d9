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
is named in the summary, as is an object store that cannot be used), 2 for bad arguments.
Storage credentials and endpoints come from the standard AWS environment.

Review: rows below the model's review threshold, the least confident `--review-budget` share of
the run's rows, and a stable `--audit-fraction` sample get needs_review = true and a
review_reason; `--review-export` writes them per partition as a CSV with an empty
corrected_label column. `python -m jobs.review import` takes the filled-in file back into the
`--corrections` table, whose answers the next run applies (label_source = review), to new rows
and to partitions labeled earlier alike.
"""

from __future__ import annotations

import sys

from clf_core import cli


def build_parser():
    from clf_core.labeling.settings import LabelSettings

    return cli.build_parser("python -m jobs.label", __doc__, LabelSettings)


def label(args) -> int:
    from clf_core.labeling.settings import LabelSettings
    from clf_core.labeling.pipeline import label_job
    from clf_core.settings import from_args

    summary = label_job(from_args(LabelSettings, args))
    return summary.exit_status if summary else 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), argv, label)


if __name__ == "__main__":
    sys.exit(main())
