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

import argparse
import dataclasses
import sys

from clf_core.artifact import open_artifact
from clf_core.errors import ClfError, ConfigError
from clf_core.registry import resolve_model
from clf_core.table import TableError


def build_parser() -> argparse.ArgumentParser:
    from clf_core.label_settings import LabelSettings
    from clf_core.settings import add_arguments

    parser = argparse.ArgumentParser(prog="python -m jobs.backfill", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)  # an old --output must not pass for --output-table
    parser.add_argument("--start", required=True, help="First partition date to relabel, YYYY-MM-DD (inclusive).")
    parser.add_argument("--end", required=True, help="Last partition date to relabel, YYYY-MM-DD (inclusive).")
    add_arguments(parser, LabelSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    from clf_core.label_settings import LabelSettings, parse_date
    from clf_core.labeling import backfill_tag, label_job
    from clf_core.logs import setup_logging
    from clf_core.settings import from_args

    setup_logging()
    try:
        args = build_parser().parse_args(argv)
        start, end = parse_date("--start", args.start), parse_date("--end", args.end)
        if start > end:
            raise ConfigError(f"--start {args.start} is after --end {args.end}; swap them")
        settings = from_args(LabelSettings, args).validate()
        settings = dataclasses.replace(settings, model=resolve_model(settings.model).uri)   # @champion, read once
        artifact = open_artifact(settings.model)
        summary = label_job(settings, start, end, mode="backfill", tag=backfill_tag(start, end, artifact.model_version),
                            artifact=artifact)
    except TableError as exc:  # the table exists but cannot be read: a run-time failure
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ClfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return summary.exit_status if summary else 0


if __name__ == "__main__":
    sys.exit(main())
