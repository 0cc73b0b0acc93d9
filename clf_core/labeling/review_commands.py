"""The review loop's commands (python -m jobs.review): import a reviewed file into the
corrections table, and measure what reviewers found.

    import  review CSV (as a spreadsheet saved it) -> checked -> one append commit of answers
    stats   per model version: rows labeled, flagged and why, reviewed; accuracy on the audit
            sample with a 95% interval; the errors reviewers fixed most
"""

from __future__ import annotations

import getpass
import logging
from collections import defaultdict
from dataclasses import dataclass

from clf_core.review.corrections import CorrectionsTable, audit_estimate, corrections_from_file, fixes
from clf_core.errors import ClfError, DataError
from clf_core.review.file import CORRECTED, read_review_file
from clf_core.labeling.scoring import REVIEW_REASONS
from clf_core.settings import check, setting
from clf_core.labeling.settings import TABLE_NAME
from clf_core.labeling.table import LabeledTable

log = logging.getLogger(__name__)


def _default_reviewer() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (a container without one)
        return "unknown"


@dataclass
class ReviewTables:
    catalog: str = setting("The pyiceberg catalog of both tables (as for jobs.label).", default="",
                           required=True, hint="e.g. --catalog ledgers")
    corrections: str = setting("The corrections table, NAMESPACE.TABLE (created by the first import).", default="",
                               required=True, pattern=TABLE_NAME,
                               hint="expected NAMESPACE.TABLE, e.g. ledgers.corrections")
    output_table: str = setting("The labeled table the review file was exported from (jobs.label --output-table): "
                                "it knows the labels of every model that labeled it.", default="",
                                required=True, pattern=TABLE_NAME,
                                hint="expected NAMESPACE.TABLE, e.g. ledgers.labeled_lines")

    def problems(self) -> list[str]:
        """What the declarations cannot say (each subclass adds its own)."""
        if self.corrections and self.corrections == self.output_table:
            return ["--corrections and --output-table name the same table; the answers go to a table of "
                    "their own, e.g. ledgers.corrections"]
        return []

    def validate(self):
        return check(self, self.problems())

    def open(self) -> tuple[LabeledTable, CorrectionsTable]:
        labeled = LabeledTable(self.catalog, self.output_table)
        if labeled.table is None:
            raise ClfError(f"--output-table {self.output_table}: no such table in catalog {self.catalog!r}; name the "
                           f"table jobs.label writes (its --output-table)")
        return labeled, CorrectionsTable(self.catalog, self.corrections)


@dataclass
class ImportSettings(ReviewTables):
    file: str = setting("The review CSV with the reviewer's answers in corrected_label (empty: the model was "
                        "right), as jobs.label --review-export wrote it and a spreadsheet saved it (local or s3://).",
                        default="", required=True, hint="the review CSV with the answers in corrected_label")
    reviewer: str = setting("Who answered (recorded with every answer; default: this user's name).", default="")
    text_column: str = setting("The file's column holding the ledger line's text (jobs.label --text-column).",
                               default="texts")
    scope_column: str = setting("Make each answer apply only to rows with the same value in this column (e.g. an "
                                "entity or chart id in the ledgers); empty: to every row with that text.", default="")
    labels: str = setting("Check the answers against these labels (comma-separated) instead of those the labeled "
                          "table recorded for the file's model versions.", default="")

    def problems(self) -> list[str]:
        found = ReviewTables.problems(self)
        if self.scope_column and self.scope_column in (self.text_column, "label", CORRECTED):
            found.append(f"--scope-column {self.scope_column!r} is not a scope: name a column such as an entity id")
        return found

def import_review(settings: ImportSettings) -> str:
    """Append the answers of a reviewed file to the corrections table in one commit (once per
    file: a second import of the same bytes adds nothing). Returns what was done, for a person."""
    settings.validate()
    review = read_review_file(settings.file)
    labeled, corrections = settings.open()
    if settings.scope_column and settings.scope_column not in {f.name for f in labeled.table.schema().fields}:
        raise DataError(f"--scope-column {settings.scope_column!r} is not a column of {settings.output_table}, so no "
                        f"row could ever match a scoped answer; name one of its input columns")
    earlier = corrections.imported(review.sha256)
    if earlier:
        return (f"{review.uri} was imported already ({earlier['rows']} answers by {earlier['reviewer']} on "
                f"{earlier['reviewed_at']:%Y-%m-%d %H:%M} UTC, as {earlier['source_file']}); nothing added")
    labels_by_version = labeled.model_labels()
    if settings.labels:
        listed = [label.strip() for label in settings.labels.split(",") if label.strip()]
        labels_by_version = defaultdict(lambda: listed)
    imported = corrections_from_file(review, settings.text_column, labels_by_version,
                                     settings.reviewer or _default_reviewer(), settings.scope_column)
    snapshot = corrections.append(imported.rows)
    scope = f", each for its {settings.scope_column} only" if settings.scope_column else ""
    return (f"imported {review.describe()}: {imported.rows.num_rows} answers ({imported.corrected} corrections, "
            f"{imported.confirmed} confirmations{scope}); {imported.skipped} row(s) without a label or an answer "
            f"skipped\n  into {settings.corrections} (snapshot {snapshot}): the next jobs.label or jobs.backfill "
            f"with --corrections {settings.corrections} applies them, to earlier partitions too")


@dataclass
class StatsSettings(ReviewTables):
    top: int = setting("How many kinds of fixes to list per model version.", at_least=1, default=5)

    pass

def review_stats(settings: StatsSettings) -> str:
    """Per model version: rows labeled, flagged (by reason), answered by reviewers; the audit
    estimate; the errors reviewers fixed most. Reads four small columns of the labeled table."""
    settings.validate()
    labeled, corrections = settings.open()
    counts = labeled.review_counts()
    answers = corrections.rows()
    versions = sorted(set(counts) | set(v for v in answers["model_version"].to_pylist() if v))
    if not versions:
        return f"{settings.output_table} holds no labeled rows yet"
    lines = []
    for version in versions:
        c = counts.get(version, {})
        why = ", ".join(f"{r} {c.get(r, 0):,}" for r in REVIEW_REASONS if c.get(r))
        answered = sum(1 for v in answers["model_version"].to_pylist() if v == version)
        lines.append(f"model {version}: {c.get('rows', 0):,} rows labeled, {c.get('flagged', 0):,} flagged"
                     f"{f' ({why})' if why else ''}, {c.get('reviewed', 0):,} labeled by reviewers' answers; "
                     f"{answered:,} answers recorded")
        lines.append("  " + audit_estimate(answers, version).line())
        for given, right, n, examples in fixes(answers, version, settings.top):
            lines.append(f"  fixed {given} -> {right}: {n} text(s), e.g. " + ", ".join(repr(t) for t in examples))
    return "\n".join(lines)
