"""A persistent label cache in object storage, keyed by (model_version, text).

    <cache>/<model_version>/<run_id>-<uuid>.parquet     columns: text, label, confidence

Append-only and idempotent: a label depends only on the model version and the text, so a
duplicate entry (a retried task, two runs at once) is harmless and an orphan file from a crashed
writer is still a correct entry. That is why the cache needs no commit protocol of its own.
A new model version starts an empty directory; old versions can be deleted whole.
"""

from __future__ import annotations

import posixpath
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clf_core import storage


class LabelCache:
    def __init__(self, uri: str, model_version: str):
        self.uri = storage.join(uri, model_version)
        self.model_version = model_version

    def files(self) -> list[str]:
        fs, path = storage.filesystem(self.uri)
        if not fs.exists(path):
            return []
        return sorted(p for p in fs.find(path) if p.endswith(".parquet"))

    def load(self) -> dict[str, tuple[str, float]]:
        """text -> (label, confidence) for every entry of this model version."""
        fs, _ = storage.filesystem(self.uri)
        known: dict[str, tuple[str, float]] = {}
        for path in self.files():
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=["text", "label", "confidence"])
            known.update(zip(table["text"].to_pylist(), zip(table["label"].to_pylist(), table["confidence"].to_pylist())))
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
