"""Promote a published model to the alias the scoring jobs use (`champion`), after a gate; or roll it back.

Run as:
    python -m jobs.promote --registry s3://models --name income-expense --candidate v1a2b3c4d5e6f \
        --eval-data s3://ledgers/eval/holdout.csv --catalog ledgers --corrections ledgers.corrections \
        --output-table ledgers.labeled_lines --cache s3://ledgers/label-cache
    python -m jobs.promote --registry s3://models --name income-expense --rollback --reason "wrong labels on rent"

The gate scores the candidate and the champion on the same rows (the evaluation file, and the
reviewed rows neither model was trained on), prints per-class precision / recall / F1 side by
side and the rows where they disagree, and refuses when the candidate's macro-F1 is more than
--max-drop below the champion's on either set (--accept-worse --reason TEXT overrides; the
reason is recorded). The shadow comparison then says how many rows of the last --shadow-nights
labeled partitions would change label, by class pair. The alias is one JSON object written only
if nobody moved it meanwhile, with its history (who, when, from, to, why). The scoring jobs then
take --model s3://models/income-expense@champion. Exit status 0 promoted (or rolled back), 1
refused by the gate or by a concurrent promotion (the alias unchanged), 2 bad arguments or input.
"""

from __future__ import annotations

import sys

from clf_core import cli


def build_parser():
    from clf_core.labeling.promotion import PromoteSettings

    return cli.build_parser("python -m jobs.promote", __doc__, PromoteSettings)


def promote(args) -> int:
    from clf_core.labeling.promotion import PromoteSettings, promote as promote_model
    from clf_core.settings import from_args

    status, report = promote_model(from_args(PromoteSettings, args))
    print(report, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), argv, promote)


if __name__ == "__main__":
    sys.exit(main())
