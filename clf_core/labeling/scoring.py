"""The callables Ray Data wraps to label ledger rows; each also runs as plain Python in tests.

Labeling runs in two streaming passes (see clf_core.labeling.pipeline for why):

    TextScorer       (pass 1, actor, holds the model)           cache misses -> new cache entries
    ApplyLabels      (pass 2, actor, holds the run's labels)    ledger rows  -> rows + label columns
    ApplyCorrections (pass 2, task)                             labeled rows -> the same, reviewers' answers applied

`TextScorer` loads the model once in `__init__` (minutes for 7B weights) and `__call__(batch)`
scores the texts the label cache did not hold (pass 1 looked them up with a hash join), appends
them to the cache and returns them. `ApplyLabels` never touches the model or the cache: it is
handed the labels of the run's distinct texts (pass 1's output, in Ray's object store), so pass 2
is a lookup whose memory follows the run, not the cache. `ApplyCorrections` rewrites rows already
in the table, for partitions that hold texts reviewers answered since they were labeled.

Bad rows never stop a job: `check_text` says why a value cannot be scored, and that reason
becomes the row's `error` (its `label` stays null). Text that is not valid UTF-8 (pyarrow does not
check string columns on read) is one such reason; any other string column holding invalid UTF-8
is stored with U+FFFD in place of the bad bytes, and the row's `error` says which column.

Who should look at a row (`needs_review`, and why in `review_reason`), in this order:
`error` (it could not be scored), `low_confidence` (below the review threshold), `budget` (among
the least confident share of the run's rows, --review-budget), `audit` (a stable random sample,
--audit-fraction, chosen by a hash of the text and the model version, so that a re-run flags the
same rows and the sample measures the errors nobody else is shown). A row whose text a reviewer
answered (clf_core.review.corrections) gets the answer, `label_source = review`, confidence 1.0, and is
never flagged.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import unicodedata

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from clf_core.model.config import SCORING_BATCH_SIZE
from clf_core.review.corrections import MODEL_SOURCE, REVIEW_SOURCE
from clf_core.labeling.cache import LabelCache

log = logging.getLogger(__name__)

# The columns labeling appends, with their types; an input that already holds one is refused,
# never overwritten.
OUTPUT_SCHEMA = pa.schema([
    ("label", pa.string()), ("confidence", pa.float64()), ("model_version", pa.string()),
    ("labeled_at", pa.timestamp("us", tz="UTC")), ("error", pa.string()), ("needs_review", pa.bool_()),
    ("review_reason", pa.string()), ("label_source", pa.string()),
])
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)
# Every table this job ever made has these; later columns are added to older tables on their next run.
FIRST_OUTPUT_COLUMNS = OUTPUT_COLUMNS[:6]
TEXT = "text"      # column name of the distinct-texts dataset of pass 1
ROWS = "rows"      # ... and of how many of the run's rows hold each text (for --review-budget)
REVIEW_REASONS = ("error", "low_confidence", "budget", "audit")   # in order of precedence


def check_text(value, max_chars: int) -> tuple[str | None, str | None]:
    """(text to score, None) or (None, why it cannot be scored)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "text is null"
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, INVALID_UTF8
    if not isinstance(value, str):
        return None, f"text is not a string ({type(value).__name__})"
    if not value:
        return None, "text is empty"
    if not value.strip():
        return None, "text is only whitespace"
    if len(value) > max_chars:
        return None, f"text is {len(value)} characters long, over the limit of {max_chars} (--max-text-chars)"
    # Control characters (NUL, BEL, ESC, ...) do not occur in a ledger line typed by a person:
    # they mean a broken export, so the row goes to review instead of getting a confident label.
    # Tabs and line breaks are whitespace; other scripts and symbols are ordinary text.
    control = next((c for c in value if c not in "\t\n\r" and unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return None, f"text contains the control character U+{ord(control):04X} (a broken export?)"
    return value, None


def repair_utf8(batch: pa.Table) -> tuple[pa.Table, dict[str, set[int]]]:
    """String columns as valid UTF-8: a value with invalid bytes is decoded with U+FFFD in their
    place. Returns the batch and, per repaired column, the rows that were repaired. Costs one
    validation pass per string column when the data is clean (the usual case)."""
    repaired: dict[str, set[int]] = {}
    for i, f in enumerate(batch.schema):
        if not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)):
            continue
        column = batch.column(i)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        raw = pa.compute.cast(column, pa.large_binary()).to_pylist()
        values, rows = [], set()
        for row, value in enumerate(raw):
            if value is None:
                values.append(None)
                continue
            try:
                values.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                values.append(value.decode("utf-8", errors="replace"))
                rows.add(row)
        batch = batch.set_column(i, f, pa.array(values, f.type))
        repaired[f.name] = rows
    return batch, repaired


INVALID_UTF8 = "text is not valid UTF-8"


def _resolve(block) -> pa.Table:
    """An Arrow table, or a Ray object ref of a block (what pass 1 hands pass 2)."""
    if not isinstance(block, (pa.Table, pd.DataFrame)):
        import ray

        block = ray.get(block)
    return pa.Table.from_pandas(block, preserve_index=False) if isinstance(block, pd.DataFrame) else block


def texts_of(batch: pa.Table, text_column: str) -> list:
    """The text column's values as Python objects; a value holding invalid UTF-8 comes back as
    its raw bytes, which check_text refuses by name (to_pylist would fail the whole batch)."""
    column = batch.column(text_column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            return pa.compute.cast(column, pa.large_binary()).to_pylist()
    return column.to_pylist()


def distinct_valid_texts(batch: pa.Table, text_column: str, max_chars: int, answered=None) -> pa.Table:
    """Pass 1 preprocessing: the scoreable texts of a batch, each once with its count of rows
    (shrinks the shuffle). Texts reviewers answered for every row (`answered`: a set, or an
    object ref of one) are left out: they are never scored."""
    counts: dict[str, int] = {}
    for value in texts_of(batch, text_column):
        text = check_text(value, max_chars)[0]
        if text is not None:
            counts[text] = counts.get(text, 0) + 1
    for text in _resolve_object(answered) or ():
        counts.pop(text, None)
    texts = sorted(counts)
    return pa.table({TEXT: pa.array(texts, pa.string()), ROWS: pa.array([counts[t] for t in texts], pa.int64())})


def _resolve_object(value):
    """A value handed to a Ray task either as itself or as an object ref (large sets go by ref)."""
    if value is not None and type(value).__name__ == "ObjectRef":
        import ray

        return ray.get(value)
    return value


def in_audit_sample(text: str, model_version: str, fraction: float) -> bool:
    """Whether a text is in the model version's audit sample: a hash of both, as a number in
    [0, 1), below `fraction`. Stable across runs and machines; independent of the confidence."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{model_version}\0{text}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


class TextScorer:
    """Pass 1 actor: score the distinct texts the label cache does not know, and add them to it.

    Returns the entries it scored (text, label, confidence): they stay in Ray's object store for
    the label actors, and the driver only counts them. It never reads the cache: the run's texts
    come here already looked up (clf_core.labeling.cache.lookup), so its memory and start time do not
    grow with the cache.
    """

    def __init__(self, model: str, cache: str, run_id: str, batch_size: int = SCORING_BATCH_SIZE,
                 device: str | None = None, backbone: str | None = None, compile: str | None = None):
        import torch  # in the actor, not the driver

        from clf_core.logs import setup_logging
        from clf_core.model.predict import Predictor

        setup_logging()  # this process is a Ray worker: its INFO lines reach the job's log
        started = time.monotonic()
        self.predictor = Predictor.load(model, device=device, batch_size=batch_size, backbone=backbone, compile=compile)
        self.cache = LabelCache(cache, self.predictor.model_version)
        self.run_id = run_id
        log.info("scorer ready in %.1fs: model %s on %s, %d torch threads", time.monotonic() - started,
                 self.predictor.model_version, self.predictor.device, torch.get_num_threads())

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = batch[TEXT].tolist()
        rows = batch[ROWS].astype("int64").tolist() if ROWS in batch else [1] * len(texts)
        if not texts:
            return pd.DataFrame({TEXT: pd.Series([], dtype=object), "label": pd.Series([], dtype=object),
                                 "confidence": pd.Series([], dtype="float64"), ROWS: pd.Series([], dtype="int64")})
        out = self.predictor.predict(texts)
        entries = pd.DataFrame({TEXT: texts, "label": out.labels, "confidence": out.confidence.astype("float64")})
        self.cache.append(entries, self.run_id)  # durable before we report it scored
        return entries.assign(**{ROWS: rows})


class ApplyLabels:
    """Pass 2 actor: append label, confidence, model_version, labeled_at, error, needs_review,
    review_reason and label_source to each row.

    Works on Arrow batches so every input column passes through with its exact type (a pandas
    round trip would turn nullable integers into floats). It holds the labels of this run's
    distinct texts only, which pass 1 left in Ray's object store (`run_labels`: Arrow tables or
    object refs of them; text, label, confidence, null labels skipped): it never reads the cache,
    so neither the cache's size nor a compaction running meanwhile can change what it sees.
    Without `run_labels` (tools, tests) it loads the whole cache. `answers` are the reviewers'
    (clf_core.review.corrections.Answers, or an object ref of them).

    `review_budget` flags the least confident share of the run's rows: every labeler computes the
    same set of texts from the same run labels and their row counts (`budget`), so the rule
    needs no extra pass and no driver work, and holds across all the run's partitions.
    """

    def __init__(self, cache: str, model_version: str, text_column: str, max_chars: int, labeled_at: str,
                 review_threshold: float = 0.0, labels: list[str] | None = None, run_labels: list | None = None,
                 answers=None, review_budget: float = 0.0, audit_fraction: float = 0.0):
        from clf_core.logs import setup_logging

        setup_logging()
        started = time.monotonic()
        rows_of: dict[str, int] = {}
        if run_labels is None:
            self.labels = LabelCache(cache, model_version).load(labels)
        else:
            self.labels = {}
            for table in map(_resolve, run_labels):
                known = table.filter(pc.is_valid(table["label"]))
                texts = known["text"].to_pylist()
                self.labels.update(zip(texts, zip(known["label"].to_pylist(),
                                                  pc.cast(known["confidence"], pa.float64()).to_pylist())))
                if ROWS in known.column_names:
                    rows_of.update(zip(texts, known[ROWS].to_pylist()))
        self.answers = _resolve_object(answers)
        self.budget_texts = budget(self.labels, rows_of, review_budget)
        self.audit_fraction = audit_fraction
        self._audited: dict[str, bool] = {}
        self.review_threshold = review_threshold
        self.model_version = model_version
        self.text_column = text_column
        self.max_chars = max_chars
        self.labeled_at = pd.Timestamp(labeled_at)
        log.info("labeler ready in %.2fs: %d labels of this run, %d reviewers' answers", time.monotonic() - started,
                 len(self.labels), len(self.answers) if self.answers else 0)

    def review_reason(self, text: str | None, confidence: float | None, error: str | None) -> str | None:
        if error is not None or confidence is None:
            return "error"
        if confidence < self.review_threshold:
            return "low_confidence"
        if text in self.budget_texts:
            return "budget"
        if text not in self._audited:
            self._audited[text] = in_audit_sample(text, self.model_version, self.audit_fraction)
        return "audit" if self._audited[text] else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = texts_of(batch, self.text_column)
        batch, repaired = repair_utf8(batch)
        other_columns = {c: rows for c, rows in repaired.items() if c != self.text_column}
        scopes = {c: batch.column(c).to_pylist() for c in (self.answers.scoped if self.answers else ())
                  if c in batch.column_names}
        labels, confidence, errors, reasons, sources = [], [], [], [], []
        for row, value in enumerate(texts):
            bad = [c for c, rows in other_columns.items() if row in rows]
            repair_error = f"column(s) {bad} not valid UTF-8: stored with U+FFFD for the bad bytes" if bad else None
            answer = (self.answers.label_for(value, {c: values[row] for c, values in scopes.items()})
                      if self.answers else None)
            if answer is not None:  # a reviewer answered this text: never scored, never flagged again
                labels.append(answer)
                confidence.append(1.0)
                errors.append(repair_error)
                reasons.append(None)
                sources.append(REVIEW_SOURCE)
                continue
            text, error = check_text(value, self.max_chars)
            hit = None
            if text is not None:
                hit = self.labels.get(text)
                if hit is None:
                    # Pass 1 put every valid text of this run into the cache: a miss means the
                    # cache was changed underneath us. Fail loudly rather than commit unlabeled rows.
                    raise RuntimeError(f"text {text[:60]!r} is missing from the label cache after scoring; "
                                       f"was the cache deleted during the run? Re-run the job.")
            labels.append(hit[0] if hit else None)
            confidence.append(hit[1] if hit else None)
            if error is None:  # the label stands; a person should still see the repaired value
                error = repair_error
            errors.append(error)
            reasons.append(self.review_reason(text, confidence[-1], error))
            sources.append(MODEL_SOURCE if hit else None)
        n = batch.num_rows
        return (batch.append_column("label", pa.array(labels, pa.string()))
                .append_column("confidence", pa.array(confidence, pa.float64()))
                .append_column("model_version", pa.array([self.model_version] * n, pa.string()))
                .append_column("labeled_at", pa.array([self.labeled_at] * n, pa.timestamp("us", tz="UTC")))
                .append_column("error", pa.array(errors, pa.string()))
                # A person should look at every doubtful label and every line that got none.
                .append_column("needs_review", pa.array([r is not None for r in reasons], pa.bool_()))
                .append_column("review_reason", pa.array(reasons, pa.string()))
                .append_column("label_source", pa.array(sources, pa.string())))


def budget(labels: dict[str, tuple[str, float]], rows_of: dict[str, int], share: float) -> set[str]:
    """The texts holding the least confident `share` of the rows (each text's rows from
    `rows_of`, 1 if unknown): taken in order of confidence (then text, so every labeler agrees)
    while the rows they hold fit in the share. A review team's capacity is rows, so it is never
    exceeded; a text holding more rows than is left stops the list there."""
    if share <= 0 or not labels:
        return set()
    limit = int(share * sum(rows_of.get(t, 1) for t in labels))
    flagged, taken = set(), 0
    for confidence, text in sorted((c, t) for t, (_, c) in labels.items()):
        rows = rows_of.get(text, 1)
        if taken + rows > limit:
            break
        flagged.add(text)
        taken += rows
    return flagged


class ApplyCorrections:
    """Pass 2 task for partitions already labeled: their rows as the table holds them (read from
    their data files), with the reviewers' latest answers applied, conformed to the table's
    current schema (files written before a column was added lack it). Rows no answer matches
    pass through unchanged."""

    def __init__(self, answers, text_column: str, target_schema: pa.Schema, labeled_at: str):
        self.answers = answers
        self.text_column = text_column
        self.target_schema = target_schema
        self.labeled_at = pd.Timestamp(labeled_at)

    def __call__(self, batch: pa.Table) -> pa.Table:
        answers = self.answers = _resolve_object(self.answers)
        batch = conform(batch, self.target_schema)
        texts = batch.column(self.text_column).to_pylist()
        scopes = {c: batch.column(c).to_pylist() for c in answers.scoped if c in batch.column_names}
        found = [answers.label_for(text, {c: values[row] for c, values in scopes.items()})
                 for row, text in enumerate(texts)]
        hit = pa.array([a is not None for a in found], pa.bool_())
        had_label = pc.is_valid(batch.column("label"))

        def where_hit(column: str, value) -> pa.Array:
            return pc.if_else(hit, value, batch.column(column))

        answered = pa.array(found, pa.string())
        source = pc.if_else(pc.and_(pc.is_null(batch.column("label_source")), had_label),
                            pa.scalar(MODEL_SOURCE), batch.column("label_source"))
        replaced = {
            "label": pc.if_else(hit, answered, batch.column("label")),
            "confidence": where_hit("confidence", pa.scalar(1.0)),
            "labeled_at": where_hit("labeled_at", pa.scalar(self.labeled_at, pa.timestamp("us", tz="UTC"))),
            # a reviewer's label stands where the model had none (e.g. a text too long to score)
            "error": pc.if_else(pc.and_(hit, pc.invert(had_label)), pa.scalar(None, pa.string()), batch.column("error")),
            "needs_review": where_hit("needs_review", pa.scalar(False)),
            "review_reason": pc.if_else(hit, pa.scalar(None, pa.string()), batch.column("review_reason")),
            "label_source": pc.if_else(hit, pa.scalar(REVIEW_SOURCE), source),
        }
        for name, column in replaced.items():
            index = batch.schema.get_field_index(name)
            batch = batch.set_column(index, batch.schema.field(index), pc.cast(column, batch.schema.field(index).type))
        return batch


def conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """`batch` with exactly `schema`'s columns, in its order and types: a column the batch lacks
    (a data file written before the column was added) is null."""
    columns = []
    for f in schema:
        if f.name in batch.column_names:
            columns.append(pc.cast(batch.column(f.name), f.type))
        else:
            columns.append(pa.nulls(batch.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)
