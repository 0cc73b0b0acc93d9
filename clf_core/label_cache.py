"""A persistent label cache in object storage, keyed by (model_version, text).

    <cache>/<model_version>/<run_id>-<uuid>.parquet     columns: text, label, confidence

Append-only and idempotent: a label depends only on the model version and the text, so a
duplicate entry (a retried task, two runs at once) is harmless and an orphan file from a crashed
writer is still a correct entry. That is why the cache needs no commit protocol of its own.
A new model version starts an empty directory; old versions can be deleted whole.

Entries are checked before use: a label the model does not have, a confidence outside [0, 1], a
missing text are dropped (and so rescored), and a file that cannot be read is skipped with a
warning (its texts are rescored and written to a new file) instead of failing every run of that
model version. Only the scoring workers write here; keep it where writers of the output table
cannot (`--cache`), so they cannot change labels through it.
"""

from __future__ import annotations

import logging
import posixpath
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clf_core import storage

log = logging.getLogger(__name__)


class LabelCache:
    def __init__(self, uri: str, model_version: str):
        self.uri = storage.join(uri, model_version)
        self.model_version = model_version

    def files(self) -> list[str]:
        fs, path = storage.filesystem(self.uri)
        if not fs.exists(path):
            return []
        return sorted(p for p in fs.find(path) if p.endswith(".parquet"))

    def load(self, labels: list[str] | None = None) -> dict[str, tuple[str, float]]:
        """text -> (label, confidence) for every valid entry of this model version (`labels`: the
        model's classes; an entry naming another is dropped)."""
        fs, _ = storage.filesystem(self.uri)
        known: dict[str, tuple[str, float]] = {}
        for path in self.files():
            try:
                with fs.open(path, "rb") as f:
                    table = pq.read_table(f, columns=["text", "label", "confidence"])
                valid = pc.and_kleene(pc.is_valid(table["text"]), pc.is_valid(table["label"]))
                confidence = pc.cast(table["confidence"], pa.float64())
                valid = pc.and_kleene(valid, pc.and_kleene(pc.greater_equal(confidence, 0.0),
                                                           pc.less_equal(confidence, 1.0)))
                if labels is not None:
                    valid = pc.and_kleene(valid, pc.is_in(table["label"], value_set=pa.array(labels, pa.string())))
                valid = pc.fill_null(valid, False)
                dropped = table.num_rows - pc.sum(valid).as_py() if table.num_rows else 0
                table = table.filter(valid)
            except Exception as exc:  # unreadable, not Parquet, wrong columns: rescore rather than fail
                log.warning("label cache file %s cannot be read (%s: %s); its texts will be scored again",
                            path, type(exc).__name__, exc)
                continue
            if dropped:
                log.warning("label cache file %s: %d entr(ies) with a missing text, a label the model does not "
                            "have or a confidence outside [0, 1] dropped; those texts will be scored again",
                            path, dropped)
            known.update(zip(table["text"].to_pylist(),
                             zip(table["label"].to_pylist(), pc.cast(table["confidence"], pa.float64()).to_pylist())))
        return known

    def append(self, entries: pd.DataFrame, run_id: str) -> str:
        fs, path = storage.filesystem(self.uri)
        if not storage.is_remote(self.uri):
            fs.makedirs(path, exist_ok=True)
        target = posixpath.join(path, f"{run_id}-{uuid.uuid4().hex[:12]}.parquet")
        table = pa.Table.from_pandas(entries[["text", "label", "confidence"]], preserve_index=False)
        with fs.open(target, "wb") as f:
            pq.write_table(table, f)
        return target
