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

Nothing holds the whole cache. A run looks its distinct texts up with a distributed hash join
(`lookup`: Ray Data's `Dataset.join`, each partition holding 1/N of the cache) or, while the
cache is smaller than BROADCAST_CACHE_BYTES, a broadcast join (the cache in Ray's object store
once, each block of texts joined in a plain task), scores the
misses, and hands the label actors only the run's own labels, through Ray's object store. The
cache grows by a few files per run; `compact` rewrites a model version's files into few large ones (the label job does it when a
version has more than `--cache-max-files`; `python -m jobs.table compact-cache` on demand). An
entry twice in the cache (two runs at once) is harmless: both copies say the same thing.
"""

from __future__ import annotations

import logging
import posixpath
import time
import uuid
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clf_core import storage

log = logging.getLogger(__name__)

ENTRY_SCHEMA = pa.schema([("text", pa.string()), ("label", pa.string()), ("confidence", pa.float64())])
COMPACTED_PREFIX = "compacted-"
# Below this many bytes of cache files a run joins by broadcast, as Spark does below
# spark.sql.autoBroadcastJoinThreshold (10 MB): the hash join starts num_partitions aggregator
# actors, seconds of a small night's run for a cache of a few MB (2 CPUs, 2 partitions, a cache of
# 100 texts: lookup 3.3-4.6 s by hash join, 0.2-0.6 s by broadcast). Each task holds the whole cache
# while it joins, so the limit stays small.
BROADCAST_CACHE_BYTES = 16 * 1024 ** 2


@dataclass
class Compaction:
    files_before: int
    files_after: int
    entries: int
    seconds: float


class LabelCache:
    def __init__(self, uri: str, model_version: str):
        self.uri = storage.join(uri, model_version)
        self.model_version = model_version

    def files(self) -> list[str]:
        return sorted(self.file_sizes())

    def file_sizes(self) -> dict[str, int]:
        """path -> bytes of this version's cache files."""
        fs, path = storage.filesystem(self.uri)
        # s3fs caches listings per process: a file another process wrote since would be missing
        # from it, and then even opening that file by name fails (FileNotFoundError)
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return {}
        return {p: int(info.get("size") or 0) for p, info in fs.find(path, detail=True).items() if p.endswith(".parquet")}

    def read_file(self, path: str, labels: list[str] | None = None) -> pa.Table:
        """The valid entries of one cache file (`labels`: the model's classes; an entry naming
        another is dropped). An unreadable file gives no entries and a warning: its texts are
        scored again rather than failing every run of this model version."""
        fs, _ = storage.filesystem(self.uri)
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=["text", "label", "confidence"])
            table = table.cast(ENTRY_SCHEMA)
            valid = pc.and_kleene(pc.is_valid(table["text"]), pc.is_valid(table["label"]))
            confidence = table["confidence"]
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
            return ENTRY_SCHEMA.empty_table()
        if dropped:
            log.warning("label cache file %s: %d entr(ies) with a missing text, a label the model does not "
                        "have or a confidence outside [0, 1] dropped; those texts will be scored again",
                        path, dropped)
        return table

    def load(self, labels: list[str] | None = None) -> dict[str, tuple[str, float]]:
        """text -> (label, confidence) for every valid entry of this model version, in one dict:
        for small caches and tools. The label job never calls this (see `lookup`)."""
        known: dict[str, tuple[str, float]] = {}
        for path in self.files():
            table = self.read_file(path, labels)
            known.update(zip(table["text"].to_pylist(), zip(table["label"].to_pylist(), table["confidence"].to_pylist())))
        return known

    def append(self, entries: pd.DataFrame, run_id: str) -> str:
        fs, path = storage.filesystem(self.uri)
        if not storage.is_remote(self.uri):
            fs.makedirs(path, exist_ok=True)
        target = posixpath.join(path, f"{run_id}-{uuid.uuid4().hex[:12]}.parquet")
        table = pa.Table.from_pandas(entries[["text", "label", "confidence"]], preserve_index=False)
        with fs.open(target, "wb") as f:
            pq.write_table(table.cast(ENTRY_SCHEMA), f)
        return target

    def compact(self, target_file_bytes: int = 256 * 1024 ** 2, labels: list[str] | None = None) -> Compaction:
        """Rewrite this version's files into files of about `target_file_bytes` (in memory) each,
        valid entries only, then delete the files it read. Memory: one output file. Files that
        appear meanwhile (a run writing) are left alone; a run that listed a deleted file just
        scores its texts again (read_file skips it; the label actors never read the cache), so
        compacting during a run is safe, if wasteful."""
        started = time.monotonic()
        before = self.files()
        if len(before) <= 1:
            return Compaction(len(before), len(before), 0, time.monotonic() - started)
        fs, path = storage.filesystem(self.uri)
        written: list[str] = []
        writer, sink, size, entries = None, None, 0, 0
        try:
            for source in before:
                table = self.read_file(source, labels)
                if not table.num_rows:
                    continue
                if writer is None:
                    target = posixpath.join(path, f"{COMPACTED_PREFIX}{uuid.uuid4().hex[:12]}.parquet")
                    sink = fs.open(target, "wb")
                    writer = pq.ParquetWriter(sink, ENTRY_SCHEMA)
                    written.append(target)
                writer.write_table(table)
                size += table.nbytes
                entries += table.num_rows
                if size >= target_file_bytes:
                    writer.close()
                    sink.close()
                    writer, sink, size = None, None, 0
            if writer is not None:
                writer.close()
                sink.close()
        except BaseException:
            for target in written:  # nothing half-done stays: the old files are still all there
                try:
                    fs.rm(target)
                except FileNotFoundError:
                    pass
            raise
        fs.rm([p for p in before if p not in written])
        done = Compaction(len(before), len(written), entries, time.monotonic() - started)
        log.info("label cache %s compacted: %d files -> %d (%d entries) in %.1fs", self.uri, done.files_before,
                 done.files_after, done.entries, done.seconds)
        return done


def read_entries(batch: pd.DataFrame, cache: str, model_version: str, labels: list[str] | None) -> pa.Table:
    """Ray Data: the valid entries of the cache files named in `batch["path"]`."""
    one = LabelCache(cache, model_version)
    return pa.concat_tables([one.read_file(p, labels) for p in batch["path"]] or [ENTRY_SCHEMA.empty_table()])


def lookup(texts, cache: str, model_version: str, labels: list[str] | None, num_partitions: int,
           broadcast_bytes: int = BROADCAST_CACHE_BYTES):
    """The run's distinct texts (a Ray Dataset with a `text` column) with `label` and `confidence`
    from the cache, null where the cache does not know the text: a left outer join, by hash (no
    process holds more than 1/num_partitions of the cache) or, for a cache of at most
    `broadcast_bytes`, by broadcast. A text cached twice comes back twice, either way.
    None when the cache holds nothing for this model version (every text is a miss)."""
    import ray

    sizes = LabelCache(cache, model_version).file_sizes()
    if not sizes:
        return None
    entries = ray.data.from_items([{"path": p} for p in sorted(sizes)]).map_batches(
        read_entries, batch_format="pandas", batch_size=8, num_cpus=0.25,
        fn_kwargs={"cache": cache, "model_version": model_version, "labels": labels})
    if sum(sizes.values()) > broadcast_bytes:
        return texts.join(entries, join_type="left_outer", num_partitions=num_partitions, on=("text",))
    return texts.map_batches(join_entries, batch_format="pyarrow", num_cpus=0.25,
                             fn_kwargs={"entries": entries.materialize().to_arrow_refs()})


def join_entries(batch: pa.Table, entries: list) -> pa.Table:
    """Ray Data (the broadcast join): a block of texts left-joined with the whole small cache
    (object refs of its entry tables), each text's matches in the cache, or nulls."""
    import ray

    cache = pa.concat_tables([ENTRY_SCHEMA.empty_table(), *ray.get(list(entries))])
    key_type = batch.schema.field("text").type    # string or large_string, as the read gave it
    if cache.schema.field("text").type != key_type:
        cache = cache.set_column(0, "text", pc.cast(cache["text"], key_type))
    joined = batch.join(cache, keys="text", join_type="left outer", use_threads=False)
    return joined.select([*batch.column_names, "label", "confidence"])
