"""Bring reviewers' answers back: import a filled-in review file, and measure what reviewers found.

Run as:
    python -m jobs.review import --catalog ledgers --corrections ledgers.corrections \
        --output-table ledgers.labeled_lines --file review/dt=2024-03-01.csv --reviewer alice
    python -m jobs.review stats --catalog ledgers --corrections ledgers.corrections \
        --output-table ledgers.labeled_lines

`import` reads the CSV that `jobs.label --review-export` wrote, as a spreadsheet saved it (UTF-8
or Windows-1252, comma or semicolon, the formula guard's apostrophes stripped), checks every
answer against the labels of the model that gave the row its label, and appends the answers to
the corrections table in one commit; a file is imported once. Leave `corrected_label` empty where
the model was right. The next `jobs.label` / `jobs.backfill` with `--corrections` gives every row
with an answered text the answer (`label_source = review`), and rewrites the partitions labeled
earlier that hold such texts.

`stats` prints, per model version, the rows labeled and flagged (and why), the accuracy on the
audit sample with a 95% interval (the accuracy of the rows nobody looked at) and the errors
reviewers fixed most. Exit status 0 done, 1 a table cannot be read, 2 bad arguments or a bad file
(nothing imported).
"""

from __future__ import annotations

import sys

from clf_core import cli


def build_parser():
    from clf_core.labeling.review_commands import ImportSettings, StatsSettings

    return cli.build_parser("python -m jobs.review", __doc__, subcommands={
        "import": ("Import a reviewed file into the corrections table.", (ImportSettings,)),
        "stats": ("What reviewers found, per model version.", (StatsSettings,))})


def review(args) -> int:
    from clf_core.labeling.review_commands import ImportSettings, StatsSettings, import_review, review_stats
    from clf_core.settings import from_args

    if args.command == "import":
        print(import_review(from_args(ImportSettings, args)))
    else:
        print(review_stats(from_args(StatsSettings, args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), argv, review)


if __name__ == "__main__":
    sys.exit(main())
