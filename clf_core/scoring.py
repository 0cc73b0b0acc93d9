"""The callables Ray Data wraps to label ledger rows; each also runs as plain Python in tests.

Labeling runs in two streaming passes (see clf_core.labeling for why):

    TextScorer     (pass 1, actor, holds the model)            cache misses -> new cache entries
    ApplyLabels    (pass 2, actor, holds the run's labels)     ledger rows  -> rows + label columns

`TextScorer` loads the model once in `__init__` (minutes for 7B weights) and `__call__(batch)`
scores the texts the label cache did not hold (pass 1 looked them up with a hash join), appends
them to the cache and returns them. `ApplyLabels` never touches the model or the cache: it is
handed the labels of the run's distinct texts (pass 1's output, in Ray's object store), so pass 2
is a lookup whose memory follows the run, not the cache.

Bad rows never stop a job: `check_text` says why a value cannot be scored, and that reason
becomes the row's `error` (its `label` stays null). Text that is not valid UTF-8 (pyarrow does not
check string columns on read) is one such reason; any other string column holding invalid UTF-8
is stored with U+FFFD in place of the bad bytes, and the row's `error` says which column.
"""

from __future__ import annotations

import logging
import math
import time
import unicodedata

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from clf_core.label_cache import LabelCache

log = logging.getLogger(__name__)

# The columns labeling appends, with their types; an input that already holds one is refused,
# never overwritten.
OUTPUT_SCHEMA = pa.schema([
    ("label", pa.string()), ("confidence", pa.float64()), ("model_version", pa.string()),
    ("labeled_at", pa.timestamp("us", tz="UTC")), ("error", pa.string()), ("needs_review", pa.bool_()),
])
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)
TEXT = "text"  # column name of the distinct-texts dataset of pass 1


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


def distinct_valid_texts(batch: pa.Table, text_column: str, max_chars: int) -> pa.Table:
    """Pass 1 preprocessing: the scoreable texts of a batch, each once (shrinks the shuffle)."""
    texts = {t for t in (check_text(v, max_chars)[0] for v in texts_of(batch, text_column)) if t is not None}
    return pa.table({TEXT: pa.array(sorted(texts), pa.string())})


class TextScorer:
    """Pass 1 actor: score the distinct texts the label cache does not know, and add them to it.

    Returns the entries it scored (text, label, confidence): they stay in Ray's object store for
    the label actors, and the driver only counts them. It never reads the cache: the run's texts
    come here already looked up (clf_core.label_cache.lookup), so its memory and start time do not
    grow with the cache.
    """

    def __init__(self, model: str, cache: str, run_id: str, batch_size: int = 64, device: str | None = None,
                 backbone: str | None = None):
        import torch  # in the actor, not the driver

        from clf_core.logs import setup_logging
        from clf_core.predict import Predictor

        setup_logging()  # this process is a Ray worker: its INFO lines reach the job's log
        started = time.monotonic()
        self.predictor = Predictor.load(model, device=device, batch_size=batch_size, backbone=backbone)
        self.cache = LabelCache(cache, self.predictor.model_version)
        self.run_id = run_id
        log.info("scorer ready in %.1fs: model %s on %s, %d torch threads", time.monotonic() - started,
                 self.predictor.model_version, self.predictor.device, torch.get_num_threads())

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = batch[TEXT].tolist()
        if not texts:
            return pd.DataFrame({TEXT: pd.Series([], dtype=object), "label": pd.Series([], dtype=object),
                                 "confidence": pd.Series([], dtype="float64")})
        out = self.predictor.predict(texts)
        entries = pd.DataFrame({TEXT: texts, "label": out.labels, "confidence": out.confidence.astype("float64")})
        self.cache.append(entries, self.run_id)  # durable before we report it scored
        return entries


class ApplyLabels:
    """Pass 2 actor: append label, confidence, model_version, labeled_at and error to each row.

    Works on Arrow batches so every input column passes through with its exact type (a pandas
    round trip would turn nullable integers into floats). It holds the labels of this run's
    distinct texts only, which pass 1 left in Ray's object store (`run_labels`: Arrow tables or
    object refs of them; text, label, confidence, null labels skipped): it never reads the cache,
    so neither the cache's size nor a compaction running meanwhile can change what it sees.
    Without `run_labels` (tools, tests) it loads the whole cache.
    """

    def __init__(self, cache: str, model_version: str, text_column: str, max_chars: int, labeled_at: str,
                 review_threshold: float = 0.0, labels: list[str] | None = None, run_labels: list | None = None):
        from clf_core.logs import setup_logging

        setup_logging()
        started = time.monotonic()
        if run_labels is None:
            self.labels = LabelCache(cache, model_version).load(labels)
        else:
            self.labels = {}
            for table in map(_resolve, run_labels):
                known = table.filter(pc.is_valid(table["label"]))
                self.labels.update(zip(known["text"].to_pylist(),
                                       zip(known["label"].to_pylist(), pc.cast(known["confidence"], pa.float64()).to_pylist())))
        self.review_threshold = review_threshold
        self.model_version = model_version
        self.text_column = text_column
        self.max_chars = max_chars
        self.labeled_at = pd.Timestamp(labeled_at)
        log.info("labeler ready in %.2fs: %d labels of this run", time.monotonic() - started, len(self.labels))

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = texts_of(batch, self.text_column)
        batch, repaired = repair_utf8(batch)
        other_columns = {c: rows for c, rows in repaired.items() if c != self.text_column}
        labels, confidence, errors = [], [], []
        for row, value in enumerate(texts):
            text, error = check_text(value, self.max_chars)
            if text is not None:
                hit = self.labels.get(text)
                if hit is None:
                    # Pass 1 put every valid text of this run into the cache: a miss means the
                    # cache was changed underneath us. Fail loudly rather than commit unlabeled rows.
                    raise RuntimeError(f"text {text[:60]!r} is missing from the label cache after scoring; "
                                       f"was the cache deleted during the run? Re-run the job.")
                labels.append(hit[0])
                confidence.append(hit[1])
            else:
                labels.append(None)
                confidence.append(None)
            if error is None:  # the label stands; a person should still see the repaired value
                bad = [c for c, rows in other_columns.items() if row in rows]
                if bad:
                    error = f"column(s) {bad} not valid UTF-8: stored with U+FFFD for the bad bytes"
            errors.append(error)
        n = batch.num_rows
        return (batch.append_column("label", pa.array(labels, pa.string()))
                .append_column("confidence", pa.array(confidence, pa.float64()))
                .append_column("model_version", pa.array([self.model_version] * n, pa.string()))
                .append_column("labeled_at", pa.array([self.labeled_at] * n, pa.timestamp("us", tz="UTC")))
                .append_column("error", pa.array(errors, pa.string()))
                # A person should look at every doubtful label and every line that got none.
                .append_column("needs_review", pa.array(
                    [e is not None or c is None or c < self.review_threshold for c, e in zip(confidence, errors)],
                    pa.bool_())))
