"""Relabel a date range of ledger partitions, e.g. after publishing a new model.

Run as:
    python -m jobs.backfill --model s3://models/ledger-clf/v4 --input s3://ledgers/raw \
        --output s3://ledgers/labeled --start 2024-01-01 --end 2024-12-31 --dry-run
    ray job submit --working-dir . -- python -m jobs.backfill --model s3://models/ledger-clf/v4 \
        --input s3://ledgers/raw --output s3://ledgers/labeled --start 2024-01-01 --end 2024-12-31

Every partition in [--start, --end] (inclusive) is labeled unless its committed output already
comes from this model version: an interrupted backfill is resumed by running the same command
again (finished partitions are skipped). `--force` relabels even those. `--dry-run` lists what it
would do. Each partition is replaced atomically: readers see the old labels until the new
manifest is committed. Exit status as for jobs.label.
"""

from __future__ import annotations

import argparse
import sys

from clf_core.errors import ClfError, ConfigError


def build_parser() -> argparse.ArgumentParser:
    from clf_core.labeling import add_arguments

    parser = argparse.ArgumentParser(prog="python -m jobs.backfill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", required=True, help="First partition date to relabel, YYYY-MM-DD (inclusive).")
    parser.add_argument("--end", required=True, help="Last partition date to relabel, YYYY-MM-DD (inclusive).")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from clf_core.artifact import open_artifact
    from clf_core.labeling import execute, parse_date, plan, settings_from_args
    from clf_core.logs import setup_logging

    setup_logging()
    try:
        args = build_parser().parse_args(argv)
        start, end = parse_date("--start", args.start), parse_date("--end", args.end)
        if start > end:
            raise ConfigError(f"--start {args.start} is after --end {args.end}; swap them")
        settings = settings_from_args(args)
        model_version = open_artifact(settings.model).model_version
        todo = plan(settings, model_version, start, end, relabel_other_versions=True)
    except ClfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return execute(settings, todo, model_version)[0]


if __name__ == "__main__":
    sys.exit(main())
