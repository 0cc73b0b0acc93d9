"""Label the ledger partitions that have no committed output yet (the nightly job).

Run as:
    python -m jobs.label --model s3://models/ledger-clf/v3 --input s3://ledgers/raw --output s3://ledgers/labeled
    ray job submit --working-dir . -- python -m jobs.label --model s3://models/ledger-clf/v3 \
        --input s3://ledgers/raw --output s3://ledgers/labeled --actors 4 --gpus-per-actor 1 --cpus-per-actor 4

Smoke size (CPU, seconds): add `--batch-size 16 --dry-run` to see the plan, drop `--dry-run` to run it.

Every input partition (dt=YYYY-MM-DD/) without a committed `_SUCCESS` is labeled, so a missed
night is caught up; `--force` relabels committed ones too. Exit status 0 when every planned
partition committed, 1 when any failed (each failure is named in the summary), 2 for bad
arguments. Storage credentials and endpoints come from the standard AWS environment.
"""

from __future__ import annotations

import argparse
import logging
import sys

from clf_core.errors import ClfError

log = logging.getLogger("jobs.label")


def build_parser() -> argparse.ArgumentParser:
    from clf_core.labeling import add_arguments

    parser = argparse.ArgumentParser(prog="python -m jobs.label", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from clf_core.artifact import open_artifact
    from clf_core.labeling import execute, plan, settings_from_args
    from clf_core.logs import setup_logging

    setup_logging()
    try:
        settings = settings_from_args(build_parser().parse_args(argv))
        model_version = open_artifact(settings.model).model_version   # a bad --model fails here, not in an actor
        todo = plan(settings, model_version)
    except ClfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return execute(settings, todo, model_version)[0]


if __name__ == "__main__":
    sys.exit(main())
