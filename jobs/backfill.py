"""Relabel a date range of ledger partitions, e.g. after publishing a new model.

Run as:
    python -m jobs.backfill --model s3://models/ledger-clf/v4 --input s3://ledgers/raw \
        --catalog ledgers --output-table ledgers.labeled_lines --cache s3://ledgers/label-cache \
        --start 2024-01-01 --end 2024-12-31 --dry-run
    ray job submit --working-dir . -- python -m jobs.backfill --model s3://models/ledger-clf/v4 \
        --input s3://ledgers/raw --catalog ledgers --output-table ledgers.labeled_lines \
        --cache s3://ledgers/label-cache --start 2024-01-01 --end 2024-12-31

Every partition in [--start, --end] (inclusive) is labeled unless its labels already come from
this model version and the same input files: an interrupted backfill is resumed by running the
same command again (finished partitions are skipped). `--force` relabels even those. `--dry-run`
lists what it would do. Each partition is replaced atomically: readers see the old labels until
its commit. Before its first commit the backfill tags the table's current snapshot
`backfill-<start>-<end>-<model version>`: the labels as they were, for time travel and for
`python -m jobs.table rollback --to <tag>`. Exit status as for jobs.label.
"""

from __future__ import annotations

import sys

from clf_core import cli


def build_parser():
    from clf_core.labeling.settings import BackfillSettings

    return cli.build_parser("python -m jobs.backfill", __doc__, BackfillSettings)


def backfill(args) -> int:
    from clf_core.labeling.pipeline import label_job
    from clf_core.labeling.settings import BackfillSettings
    from clf_core.settings import from_args

    settings = from_args(BackfillSettings, args)
    start, end = settings.dates()
    summary = label_job(settings, start, end, mode="backfill")
    return summary.exit_status if summary else 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), argv, backfill)


if __name__ == "__main__":
    sys.exit(main())
