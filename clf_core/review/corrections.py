"""Reviewers' corrections: an Iceberg table of people's answers, and what a label run takes from it.

    text  label  corrected_label  review_reason  reviewer  reviewed_at  source_file  source_sha256
    source_line  model_version  scope_column  scope_value

`python -m jobs.review import` appends one row per distinct (text, scope) of a filled-in review
file, in one commit, once: the file's sha256 is recorded, and importing the same bytes again adds
nothing. `corrected_label` is the reviewer's answer: the label they wrote, or the label the model
gave when they left the cell empty (the model was right). The table is append-only; the latest
answer wins. A key is (scope column, scope value, text): an unscoped answer applies to every row
with that text; a scoped one (`--scope-column`, e.g. an entity id) only to rows whose scope column
holds the same value. Of the answers that apply to a row, the latest is the one it gets.

A label run reads the answers as of one snapshot of the table (`Answers`): rows whose text (and
scope) has an answer get it, with `label_source = review`, instead of the model's label; the
snapshot id goes into each partition's commit record, so a later run knows which answers a
partition already holds (clf_core.labeling.plan). Answers are a person's work, thousands of rows
rather than millions: they are read whole, on the driver, and handed to the workers as one
object.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

import pyarrow as pa

from clf_core.errors import ClfError, DataError
from clf_core.review.file import CORRECTED, ReviewFile

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("text", pa.string()), ("label", pa.string()), ("corrected_label", pa.string()), ("review_reason", pa.string()),
    ("reviewer", pa.string()), ("reviewed_at", pa.timestamp("us", tz="UTC")), ("source_file", pa.string()),
    ("source_sha256", pa.string()), ("source_line", pa.int64()), ("model_version", pa.string()),
    ("scope_column", pa.string()), ("scope_value", pa.string()),
])
REVIEW_SOURCE, MODEL_SOURCE = "review", "model"   # the label_source column's values


def scope_text(value) -> str | None:
    """A row's scope value as the review CSV writes it (how a correction's scope_value is stored)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    return str(value)


Key = tuple[str, str, str]   # (scope column or "", scope value or "", text)


Answer = tuple[str, int]     # (label, order: later answers have a higher order)


@dataclass
class Answers:
    """The latest answer per key as of one snapshot of the corrections table: what a label run
    applies. Picklable: it crosses into the label actors as one object."""
    identifier: str = ""
    snapshot_id: int | None = None
    unscoped: dict[str, Answer] = field(default_factory=dict)                          # text -> answer
    scoped: dict[str, dict[tuple[str, str], Answer]] = field(default_factory=dict)    # column -> (value, text) -> answer

    def __len__(self) -> int:
        return len(self.unscoped) + sum(len(v) for v in self.scoped.values())

    def keys(self) -> dict[Key, str]:
        found = {("", "", text): label for text, (label, _) in self.unscoped.items()}
        for column, answers in self.scoped.items():
            found.update({(column, value, text): label for (value, text), (label, _) in answers.items()})
        return found

    def label_for(self, text, scope_values: dict[str, object]) -> str | None:
        """The answer for a row with this text and these scope-column values: of the answers that
        apply to it (the text's unscoped one, a scoped one whose value the row holds), the latest.
        None: no answer."""
        if not isinstance(text, str):
            return None
        best = self.unscoped.get(text)
        for column, answers in self.scoped.items():
            value = scope_text(scope_values.get(column))
            found = answers.get((value, text)) if value is not None else None
            if found is not None and (best is None or found[1] > best[1]):
                best = found
        return best[0] if best else None

    def changed_since(self, older: "Answers | None") -> "Answers":
        """The answers that are new or different since `older` (None: all of them). An answer
        that disappeared (a rolled-back corrections table) is not undone: import the right one."""
        before = older.keys() if older is not None else {}
        changed = Answers(self.identifier, self.snapshot_id)
        for column, answers in [("", {("", t): a for t, a in self.unscoped.items()}), *self.scoped.items()]:
            for (value, text), answer in answers.items():
                if before.get((column, value, text)) != answer[0]:
                    if column:
                        changed.scoped.setdefault(column, {})[(value, text)] = answer
                    else:
                        changed.unscoped[text] = answer
        return changed

    def texts(self) -> set[str]:
        return set(self.unscoped) | {text for answers in self.scoped.values() for _, text in answers}

    @classmethod
    def from_rows(cls, rows: pa.Table, identifier: str, snapshot_id: int | None) -> "Answers":
        answers = cls(identifier, snapshot_id)
        for order, row in enumerate(latest_per_key(rows).to_pylist()):
            answer = (row["corrected_label"], order)
            if row["scope_column"]:
                answers.scoped.setdefault(row["scope_column"], {})[(row["scope_value"], row["text"])] = answer
            else:
                answers.unscoped[row["text"]] = answer
        return answers


def latest_per_key(rows: pa.Table) -> pa.Table:
    """One row per (scope column, scope value, text): the latest reviewed (the table is
    append-only), in the order they were answered."""
    if not rows.num_rows:
        return rows
    ordered = rows.sort_by([("reviewed_at", "ascending"), ("source_line", "ascending")]).to_pylist()
    latest: dict[Key, dict] = {}
    for row in ordered:
        key = (row["scope_column"] or "", row["scope_value"] or "", row["text"])
        latest.pop(key, None)   # re-inserted last: the dict keeps answer order
        latest[key] = row
    return pa.Table.from_pylist(list(latest.values()), schema=rows.schema)


# ---- the table ----------------------------------------------------------------------------------

class CorrectionsTable:
    """The corrections table NAMESPACE.TABLE in a pyiceberg catalog (it may not exist yet: then
    there are no corrections; the first import creates it)."""

    def __init__(self, catalog_name: str, identifier: str):
        from pyiceberg.exceptions import NoSuchTableError

        from clf_core.catalog import open_catalog, parse_identifier

        self.catalog_name, self.identifier = catalog_name, identifier
        self.namespace, _ = parse_identifier(identifier, flag="--corrections")
        self.catalog = open_catalog(catalog_name)
        try:
            self.table = self.catalog.load_table(identifier)
        except NoSuchTableError:
            self.table = None
        except Exception as exc:
            raise ClfError(f"--corrections {identifier}: cannot load it from catalog {catalog_name!r} "
                           f"({type(exc).__name__}: {str(exc)[:300]})") from exc
        if self.table is not None:
            missing = [n for n in SCHEMA.names if n not in {f.name for f in self.table.schema().fields}]
            if missing:
                raise ClfError(f"--corrections {identifier} is not a corrections table (it lacks {missing}); "
                               f"name another table, e.g. ledgers.corrections")

    @property
    def snapshot_id(self) -> int | None:
        if self.table is None:
            return None
        snapshot = self.table.current_snapshot()
        return snapshot.snapshot_id if snapshot else None

    def rows(self, snapshot_id: int | None = None) -> pa.Table:
        """Every answer as of the snapshot (default: the current one), in the import order."""
        if self.table is None:
            return SCHEMA.empty_table()
        snapshot_id = self.snapshot_id if snapshot_id is None else snapshot_id
        if snapshot_id is None or self.table.metadata.snapshot_by_id(snapshot_id) is None:
            return SCHEMA.empty_table()
        return self.table.scan(snapshot_id=snapshot_id).to_arrow().select(SCHEMA.names).cast(SCHEMA)

    def answers(self, snapshot_id: int | None = None) -> Answers:
        snapshot_id = self.snapshot_id if snapshot_id is None else snapshot_id
        return Answers.from_rows(self.rows(snapshot_id), self.identifier, snapshot_id)

    def knows(self, snapshot_id: int | None) -> bool:
        return self.table is not None and snapshot_id is not None \
            and self.table.metadata.snapshot_by_id(snapshot_id) is not None

    def sequence_number(self, snapshot_id: int | None) -> int:
        """Order of snapshots (-1: none, or a snapshot this table does not hold)."""
        if not self.knows(snapshot_id):
            return -1
        return self.table.metadata.snapshot_by_id(snapshot_id).sequence_number or 0

    def imported(self, sha256: str) -> dict | None:
        """What an earlier import of the file with this sha256 recorded (None: never imported)."""
        if self.table is None or self.snapshot_id is None:
            return None
        from pyiceberg.expressions import EqualTo

        found = self.table.scan(row_filter=EqualTo("source_sha256", sha256),
                                selected_fields=("reviewer", "reviewed_at", "source_file")).to_arrow()
        if not found.num_rows:
            return None
        first = found.slice(0, 1).to_pylist()[0]
        return {**first, "rows": found.num_rows}

    def append(self, rows: pa.Table) -> int:
        """Append `rows` in one commit (creating the table on first use); returns the snapshot id."""
        if self.table is None:
            self.catalog.create_namespace_if_not_exists(self.namespace)
            try:
                self.table = self.catalog.create_table(self.identifier, schema=SCHEMA)
                log.info("created corrections table %s", self.identifier)
            except Exception:
                if not self.catalog.table_exists(self.identifier):
                    raise
                self.table = self.catalog.load_table(self.identifier)   # a concurrent import made it
        self.table.append(rows.cast(SCHEMA), snapshot_properties={"clf.source-sha256": rows["source_sha256"][0].as_py()})
        return self.table.current_snapshot().snapshot_id


# ---- from a review file to corrections ----------------------------------------------------------

@dataclass
class Imported:
    rows: pa.Table                 # one per distinct (scope, text), ready to append
    corrected: int                 # answers that differ from the model's label
    confirmed: int                 # answers that confirm it (corrected_label left empty)
    skipped: int                   # rows with neither a model label nor an answer (unscored rows left empty)


def corrections_from_file(review: ReviewFile, text_column: str, labels_by_version: dict[str, list[str]],
                          reviewer: str, scope_column: str = "", now: datetime | None = None) -> Imported:
    """The corrections a filled-in review file holds, or one DataError listing what is wrong with
    it (each problem names the file's line, as a spreadsheet numbers rows, and the fix)."""
    where = review.uri
    required = [text_column, "label", "model_version"] + ([scope_column] if scope_column else [])
    for column in required:
        if column not in review.columns:
            hint = {text_column: " (pass --text-column with the name of the text column)",
                    "model_version": " (export the file again: jobs.label --review-export writes it)"}.get(column, "")
            raise DataError(f"{where} has no {column!r} column{hint}; its columns are {review.columns}")
    problems: list[str] = []
    answers: dict[tuple[str, str], tuple[str, int, dict]] = {}   # (scope value, text) -> (answer, line, row)
    corrected = confirmed = skipped = 0
    for row, line in zip(review.rows, review.lines):
        text, given = row[text_column], row["label"].strip()
        answer, version = row[CORRECTED].strip(), row["model_version"].strip()
        if not answer and not given:
            skipped += 1
            continue
        if not text:
            problems.append(f"line {line}: the {text_column!r} cell is empty; a correction needs the line's text")
            continue
        known = labels_by_version.get(version)
        if known is None:
            problems.append(f"line {line}: model version {version!r} did not label this table (it knows "
                            f"{sorted(labels_by_version) or 'none'}); was the file exported from another table? "
                            f"Pass --labels A,B,... to check the answers against a label list instead")
            continue
        if answer:
            matches = [label for label in known if label.casefold() == answer.casefold()]
            if not matches:
                problems.append(f"line {line}: {CORRECTED} {answer!r} is not a label of model {version} "
                                f"(its labels: {', '.join(known)}); write one of them, or leave the cell empty "
                                f"when the model's {given!r} is right")
                continue
            answer = matches[0]
        else:
            answer = given   # left empty: the model was right
        scope = row[scope_column] if scope_column else ""
        key = (scope, text)
        if key in answers and answers[key][0] != answer:
            first_answer, first_line, _ = answers[key]
            scoped = f" for {scope_column} = {scope!r}" if scope_column else ""
            problems.append(f"lines {first_line} and {line} give the text {text!r}{scoped} two answers, "
                            f"{first_answer!r} and {answer!r}; keep one")
            continue
        if key not in answers:
            answers[key] = (answer, line, row)
            if answer == given:
                confirmed += 1
            else:
                corrected += 1
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise DataError(f"{where}: nothing was imported, {len(problems)} problem(s):\n  - " + "\n  - ".join(shown))
    if not answers:
        raise DataError(f"{where} holds no usable row: every row lacks both the model's label and a "
                        f"{CORRECTED!r}. Fill in {CORRECTED} for the rows you checked.")
    now = now or datetime.now(timezone.utc)
    records = [{"text": text, "label": row["label"].strip() or None, "corrected_label": answer,
                "review_reason": row.get("review_reason", "").strip() or None, "reviewer": reviewer, "reviewed_at": now,
                "source_file": review.uri, "source_sha256": review.sha256, "source_line": line,
                "model_version": row["model_version"].strip(), "scope_column": scope_column or None,
                "scope_value": scope if scope_column else None}
               for (scope, text), (answer, line, row) in answers.items()]
    return Imported(pa.Table.from_pylist(records, schema=SCHEMA), corrected, confirmed, skipped)


# ---- what the answers say about a model ---------------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion (95% for z = 1.96): sound at small n and near 0 or 1."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class AuditEstimate:
    """Accuracy on the audited texts of one model version (the stable random sample flagged
    `audit`): it estimates the accuracy of the rows nobody was asked to look at."""
    model_version: str
    correct: int
    audited: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.audited if self.audited else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.audited)

    def line(self) -> str:
        if not self.audited:
            return f"audit estimate for model {self.model_version}: no audited row reviewed yet"
        low, high = self.interval
        return (f"audit estimate for model {self.model_version}: {100 * self.accuracy:.1f}% of the rows nobody "
                f"checked are right (95% interval {100 * low:.1f}-{100 * high:.1f}%, {self.correct} of "
                f"{self.audited} audited texts)")


def audit_estimate(rows: pa.Table, model_version: str) -> AuditEstimate:
    """From the corrections table's rows (latest answer per key), for one model version."""
    latest = [r for r in latest_per_key(rows).to_pylist()
              if r["model_version"] == model_version and r["review_reason"] == "audit" and r["label"]]
    return AuditEstimate(model_version, sum(r["corrected_label"] == r["label"] for r in latest), len(latest))


def fixes(rows: pa.Table, model_version: str, top: int = 5) -> list[tuple[str, str, int, list[str]]]:
    """The errors reviewers fixed most for a model version: (label given, corrected, count, two texts)."""
    latest = [r for r in latest_per_key(rows).to_pylist()
              if r["model_version"] == model_version and r["label"] and r["corrected_label"] != r["label"]]
    pairs = Counter((r["label"], r["corrected_label"]) for r in latest)
    examples: dict[tuple[str, str], list[str]] = {}
    for r in latest:
        examples.setdefault((r["label"], r["corrected_label"]), []).append(r["text"])
    return [(given, right, n, examples[(given, right)][:2]) for (given, right), n in pairs.most_common(top)]
