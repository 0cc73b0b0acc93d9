"""Label Hive-partitioned Parquet ledgers into an Iceberg table with Ray Data: plan -> score
distinct texts -> label rows -> commit each partition. Shared by jobs.label (nightly,
incremental) and jobs.backfill.

Two streaming passes, because "each distinct text is scored once per run" cannot hold when
several actors see the same text in different batches:

  pass 1  read text column -> valid texts, distinct per batch -> groupby(text) (a shuffle: each
          distinct text once, run-wide) -> left join with the label cache (a hash join: no
          process holds the whole cache) -> TextScorer actors: score the misses, append them to
          the label cache -> the driver adds up how many were scored
  pass 2  read rows (partition from the path) -> ApplyLabels actors: look labels up among the
          run's own distinct texts (pass 1's output, left in Ray's object store)
          -> WriteDataFiles tasks: Parquet data files in the table's location -> the driver
          counts rows per partition and commits each one, in its own Iceberg transaction, as
          soon as its files add up to its input rows (clf_core.table)
  then    compact the label cache when this model version has more than --cache-max-files

The driver only ever receives per-batch counts and per-file records, never rows: its memory does
not grow with rows (docs/performance.md has the measured figures).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from clf_core import partitions as parts
from clf_core import storage
from clf_core.errors import ConfigError
from clf_core.label_cache import LabelCache, lookup
from clf_core.logs import quiet_libraries
from clf_core.progress import Progress
from clf_core.scoring import OUTPUT_COLUMNS, TEXT, ApplyLabels, TextScorer, distinct_valid_texts
from clf_core.table import DATE, CommitError, LabeledTable, PartitionCommit, WriteDataFiles, input_changes

log = logging.getLogger(__name__)


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class LabelSettings:
    model: str = _help("Model artifact published by jobs.train: a local folder or s3:// URI.", default="")
    input: str = _help("Prefix holding dt=YYYY-MM-DD/*.parquet ledger partitions (local or s3://).", default="")
    catalog: str = _help("The pyiceberg catalog holding the output table, configured the pyiceberg way "
                         "(.pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__* variables).", default="")
    output_table: str = _help("The labeled table, NAMESPACE.TABLE; created on first use, partitioned like the "
                              "input.", default="")
    cache: str = _help("Label cache prefix (local or s3://), keyed by model version and text: the next run "
                       "scores only texts it has never seen. Keep it apart from the input.", default="")
    text_column: str = _help("Column holding the line-item text.", default="texts")
    partition_key: str = _help("Hive partition key of the input folders (key=value); also the table's partition "
                               "column (an Iceberg date when every value is a date).", default="dt")
    actors: int = _help("Scoring actors (production: one per GPU).", default=1)
    backbone: str = _help("Where the scoring actors read the base weights: empty = the backbone the model was "
                          "trained on. A pre-quantized copy the model approves (python -m jobs.prequantize) "
                          "loads without quantizing on start (0.11x the cold start in jobs.bench). Checked "
                          "by content, like the original.", default="")
    cpus_per_actor: float = _help("CPUs reserved per actor. Keep the total below the cluster's CPUs so "
                                  "Ray Data's read tasks are never starved.", default=0.5)
    gpus_per_actor: float = _help("GPUs per scoring actor: 1 on a T4 node, 0 on CPU.", default=0.0)
    batch_size: int = _help("Texts per model forward pass (bounds the activations' GPU memory).", default=64)
    rows_per_call: int = _help("Distinct texts handed to a scoring actor per call. The actor sorts them by "
                               "token length before cutting forward batches, so a larger call pads less "
                               "(64 per call ran at half the speed of 1024 on CPU); each call is also one "
                               "durable write to the label cache, the most a killed actor can lose.",
                               default=1024)
    shuffle_partitions: int = _help("Partitions of the run-wide distinct-text shuffle: a few per node; more for "
                                    "tens of millions of distinct texts.", default=16)
    max_text_chars: int = _help("Texts longer than this are not scored; the row's error says why.", default=2000)
    cache_max_files: int = _help("After the run, rewrite the model version's label cache into few large files "
                                 "when it has more files than this (each run adds about one per "
                                 "--rows-per-call new texts). 0: never (python -m jobs.table compact-cache).",
                                 default=64)
    cache_file_mb: int = _help("Target size of a compacted label cache file, in MB of memory (about 4 M "
                               "entries per 256 MB).", default=256)
    actor_start_timeout_s: float = _help("Seconds to wait for the first actors to load the model "
                                         "(-1 = no limit: 7B weights can take minutes).", default=-1)
    review_threshold: float = _help("Rows scored below this confidence, and rows that could not be scored, "
                                    "get needs_review=true (the review queue: a query on the table). -1: the "
                                    "threshold the model was published with (chosen on validation for a stated "
                                    "goal; 0.9 for models made before that).", default=-1.0)
    review_export: str = _help("Also write each labeled partition's needs_review rows to "
                               "<this prefix>/<key>=<value>.csv (local or s3://), for people to check in a "
                               "spreadsheet. Empty: no files.", default="")
    progress_every_s: float = _help("Seconds between progress lines (rows done, rate, ETA) in a log; on a "
                                    "terminal a progress bar instead.", default=30.0)
    force: bool = _help("Relabel partitions that already have committed labels.", default=False)
    dry_run: bool = _help("List what would be labeled and exit without running anything.", default=False)

    def validate(self) -> "LabelSettings":
        problems = []
        for name in ("model", "input", "cache"):
            if not getattr(self, name).strip():
                problems.append(f"--{name} is required (a local path or s3:// URI)")
        if not self.catalog.strip():
            problems.append("--catalog is required: the name of a pyiceberg catalog (e.g. --catalog ledgers, "
                            "configured in .pyiceberg.yaml or PYICEBERG_CATALOG__LEDGERS__* variables)")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*", self.output_table or ""):
            problems.append(f"--output-table {self.output_table!r}: expected NAMESPACE.TABLE, e.g. ledgers.labeled_lines")
        if self.input and self.cache and self.input.rstrip("/") == self.cache.rstrip("/"):
            problems.append(f"--cache {self.cache!r} is the same as --input; keep the label cache apart")
        if not self.text_column:
            problems.append("--text-column must name a column")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.partition_key or ""):
            problems.append(f"--partition-key {self.partition_key!r}: use a column-like name such as dt")
        if self.text_column in OUTPUT_COLUMNS:
            problems.append(f"--text-column {self.text_column!r} is a column labeling adds; name the input column")
        if self.actors < 1:
            problems.append(f"--actors {self.actors}: must be at least 1")
        if self.cpus_per_actor <= 0:
            problems.append(f"--cpus-per-actor {self.cpus_per_actor}: must be > 0 (e.g. 0.5 on a laptop, 4 on a GPU node)")
        if self.gpus_per_actor < 0:
            problems.append(f"--gpus-per-actor {self.gpus_per_actor}: must be >= 0 (1 = one T4 per actor)")
        if self.batch_size < 1:
            problems.append(f"--batch-size {self.batch_size}: must be at least 1")
        if self.rows_per_call < 1:
            problems.append(f"--rows-per-call {self.rows_per_call}: must be at least 1 (e.g. 1024)")
        if self.shuffle_partitions < 1:
            problems.append(f"--shuffle-partitions {self.shuffle_partitions}: must be at least 1")
        if not (0.0 <= self.review_threshold <= 1.0 or self.review_threshold == -1.0):
            problems.append(f"--review-threshold {self.review_threshold}: must be within [0, 1] (0 flags only unscored "
                            f"rows), or -1 for the model's own")
        if self.cache_max_files < 0:
            problems.append(f"--cache-max-files {self.cache_max_files}: must be >= 0 (0 = never compact in the job)")
        if self.cache_file_mb < 1:
            problems.append(f"--cache-file-mb {self.cache_file_mb}: must be at least 1")
        if self.progress_every_s < 0:
            problems.append(f"--progress-every-s {self.progress_every_s}: must be >= 0 (0 = a line per update)")
        if self.max_text_chars < 1:
            problems.append(f"--max-text-chars {self.max_text_chars}: must be at least 1")
        if problems:
            raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))
        return self


def add_arguments(parser, skip: tuple[str, ...] = ()) -> None:
    """One --flag per LabelSettings field, its help from the field's docstring-like help."""
    for f in dataclasses.fields(LabelSettings):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"] + f" (default: {f.default!r})")


def settings_from_args(args) -> LabelSettings:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(LabelSettings) if hasattr(args, f.name)}
    return LabelSettings(**values).validate()


def parse_date(flag: str, value: str) -> date:
    if not DATE.match(value or ""):
        raise ConfigError(f"{flag} {value!r}: expected a date as YYYY-MM-DD, e.g. 2024-01-31")
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"{flag} {value!r}: not a calendar date ({exc}); use YYYY-MM-DD") from exc


def is_date(value: str) -> bool:
    try:
        return bool(DATE.match(value)) and date.fromisoformat(value) is not None
    except ValueError:
        return False


# ---- plan ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    todo: list[parts.Partition]
    skipped: list[str]                 # labeled already, from the same input files (and not forced)
    failed: dict[str, str]             # partition -> why (names the file)
    why: dict[str, str] = field(default_factory=dict)                  # partition to label -> why
    planned_on: dict[str, PartitionCommit] = field(default_factory=dict)  # its record when planned
    schema: pa.Schema | None = None    # the planned files read as one dataset
    key_is_date: bool = True           # the table's partition column is an Iceberg date
    mode: str = "label"                # "label" (nightly) or "backfill" (also relabels other model versions)


def reason_to_label(record: PartitionCommit | None, partition: parts.Partition, model_version: str, mode: str,
                    force: bool) -> str | None:
    """Why a partition needs (re)labeling given its committed record, or None to leave it."""
    if record is None:
        return "not labeled yet"
    current = parts.input_files(partition)
    if tuple(map(tuple, record.input_files)) != current:
        return f"input changed since run {record.run_id}: {input_changes(record.input_files, current)}"
    if mode == "backfill" and record.model_version != model_version:
        return f"labeled by model {record.model_version}"
    if force:
        return "--force"
    return None


def plan(settings: LabelSettings, model_version: str, table: LabeledTable, start: date | None = None,
         end: date | None = None, mode: str = "label") -> Plan:
    """Which partitions to label: those the table holds no labels for, those whose input files
    changed since they were labeled (a late or rewritten file), all with --force; with a date
    range, only those inside it; for backfills, also those labeled by another model version
    (which makes an interrupted backfill resumable: what it finished is skipped on the re-run)."""
    if settings.backbone and not storage.is_remote(settings.backbone):
        # the check every scoring actor makes on start, made once here (remote copies are
        # checked by the actors, which download them anyway)
        from clf_core.artifact import open_artifact
        from clf_core.predict import backbone_for

        backbone_for(open_artifact(settings.model), settings.backbone)
    found = parts.discover(settings.input, settings.partition_key)
    if start or end:
        inside = []
        for p in found:
            if not is_date(p.value):
                log.warning("ignoring %s: not a date, outside any --start/--end range", p.name)
            elif not ((start and p.value < start.isoformat()) or (end and p.value > end.isoformat())):
                inside.append(p)
        found = inside
    key_is_date = (table.key_is_date if table.key_is_date is not None
                   else all(is_date(p.value) for p in found if not p.problem))
    records = table.commits()
    pl = Plan(todo=[], skipped=[], failed={}, key_is_date=key_is_date, mode=mode)
    candidates = []
    for p in found:
        if p.problem:  # found unreadable at discovery (an odd folder name or layout)
            pl.failed[p.name] = p.problem
            continue
        why = reason_to_label(records.get(p.name), p, model_version, mode, settings.force)
        if why is None:
            pl.skipped.append(p.name)
            continue
        if key_is_date and not is_date(p.value):
            pl.failed[p.name] = (f"{p.value!r} is not a date (YYYY-MM-DD), and table {table.identifier} stores "
                                 f"{settings.partition_key} as a date; rename the folder, or label it into another table")
            continue
        pl.why[p.name] = why
        candidates.append(p)
    footers = parts.read_footers(candidates)  # all at once; the checks below go in partition order
    misfits: dict[str, str | None] = {}        # most files of a ledger share one schema: check each once
    for p in candidates:
        parts.inspect(p, settings.text_column, OUTPUT_COLUMNS + (settings.partition_key,), footers)
        if not p.problem:
            for uri, schema in p.schemas.items():
                conflict = parts.schema_conflict(pl.schema, schema)
                if conflict:
                    p.problem = (f"{uri} does not match the partitions planned before it in this run "
                                 f"(first: {pl.todo[0].files[0]}): {conflict}. A run reads all its partitions "
                                 f"as one dataset; once they are committed, a re-run labels {p.name} on its own.")
                    break
                key = schema.to_string()
                misfit = misfits[key] if key in misfits else misfits.setdefault(key, table.check_input_schema(schema))
                if misfit:
                    p.problem = f"{uri} {misfit}. Rewrite the file with the table's column types."
                    break
        if p.problem:
            pl.failed[p.name] = p.problem
            pl.why.pop(p.name, None)
            continue
        for schema in p.schemas.values():
            pl.schema = parts.merge_schemas(pl.schema, schema)
        pl.todo.append(p)
        if p.name in records:
            pl.planned_on[p.name] = records[p.name]
    return pl


def describe_plan(pl: Plan) -> str:
    lines = [f"would label {len(pl.todo)} partition(s) ({sum(p.rows for p in pl.todo)} rows), "
             f"skip {len(pl.skipped)} already labeled, {len(pl.failed)} cannot be read"]
    lines += [f"  label  {p.name}  {p.rows} rows in {len(p.files)} file(s): {pl.why.get(p.name, '')}" for p in pl.todo]
    lines += [f"  skip   {name}  (labeled from these input files; --force relabels)" for name in pl.skipped]
    lines += [f"  FAIL   {name}  {why}" for name, why in pl.failed.items()]
    return "\n".join(lines)


# ---- run ----------------------------------------------------------------------------------------

@dataclass
class Summary:
    partitions_committed: list[str] = field(default_factory=list)
    partitions_skipped: list[str] = field(default_factory=list)
    partitions_failed: dict[str, str] = field(default_factory=dict)
    partitions_left: dict[str, str] = field(default_factory=dict)  # committed by a concurrent run instead
    rows_in: int = 0
    rows_out: int = 0
    error_rows: int = 0
    review_rows: int = 0
    expected_errors: float = 0.0       # sum of 1 - calibrated confidence over labeled rows not flagged
    review_threshold: float = -1.0
    distinct_texts: int = 0
    scored: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    commit_seconds: float = 0.0        # driver time in partition commits (footers + Iceberg transaction)
    run_id: str = ""

    @property
    def ok(self) -> bool:
        return not self.partitions_failed

    @property
    def exit_status(self) -> int:
        return 0 if self.ok else 1

    def report(self) -> str:
        lines = [f"labeled {len(self.partitions_committed)} partition(s), skipped {len(self.partitions_skipped)}, "
                 f"left to another run {len(self.partitions_left)}, failed {len(self.partitions_failed)} | "
                 f"rows in {self.rows_in}, out {self.rows_out}, with error {self.error_rows}, to review "
                 f"{self.review_rows} (threshold {self.review_threshold:.3f}; about {self.expected_errors:,.1f} "
                 f"errors expected among the rest) | distinct texts {self.distinct_texts}: scored {self.scored}, cache hits "
                 f"{self.cache_hits} | {self.seconds:.1f}s ({self.rows_out / max(self.seconds, 1e-9):.0f} rows/s)"]
        lines += [f"  LEFT   {name}: {why}" for name, why in self.partitions_left.items()]
        lines += [f"  FAILED {name}: {why}" for name, why in self.partitions_failed.items()]
        return "\n".join(lines)


def _actor_args(settings: LabelSettings) -> dict:
    import ray

    # One call at a time per actor (one model, one cache writer), run on the actor's main thread:
    # by default Ray Data runs a class UDF on a helper thread, where the 4-bit forward used 1.2
    # of the 2 cores it used on the main thread (CPU time / wall time, measured in the actor).
    return dict(compute=ray.data.ActorPoolStrategy(size=settings.actors, max_concurrent_calls_per_actor=1,
                                                   enable_true_multi_threading=True),
                num_cpus=settings.cpus_per_actor,
                num_gpus=settings.gpus_per_actor or None, batch_size=settings.rows_per_call)


# Ray Data's Parquet reader reads file footers on a pool of FooterReader actors, 32 per
# read_parquet call whatever the number of files: on a 2-core node starting them cost ~4 s of each
# pass. More actors than footer batches (10 files each) sit idle. read_parquet builds its file
# indexer, which reads the pool size from this variable, in the calling process.
FOOTER_ACTORS_ENV, FILES_PER_FOOTER_BATCH, MAX_FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", 10, 32


@contextlib.contextmanager
def footer_readers_for(files: int):
    """Size Ray Data's footer-reader pool to `files` for the read_parquet calls inside (unless the
    operator set RAY_DATA_PARQUET_FOOTER_NUM_ACTORS themselves)."""
    if FOOTER_ACTORS_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_ACTORS_ENV] = str(min(MAX_FOOTER_ACTORS, max(1, math.ceil(files / FILES_PER_FOOTER_BATCH))))
    try:
        yield
    finally:
        del os.environ[FOOTER_ACTORS_ENV]


def score_distinct_texts(settings: LabelSettings, todo: list[parts.Partition], model_version: str, labels: list[str],
                         run_id: str, summary: Summary) -> list:
    """Pass 1: every distinct valid text of the run is looked up in the label cache (a hash join,
    so nothing holds the whole cache) and the misses are scored once and added to it. Returns the
    run's labels for pass 2: Ray object refs of blocks (text, label, confidence) that stay in the
    object store; the driver only counts their rows."""
    import ray

    files = [f for p in todo for f in p.files]
    with footer_readers_for(len(files)):
        texts = ray.data.read_parquet(files, columns=[settings.text_column], partitioning=None)
    # The shuffle is a barrier anyway (a text's count needs every row); holding its output in the
    # object store gives the number of distinct texts, so scoring can show an ETA.
    texts = (texts.map_batches(distinct_valid_texts, batch_format="pyarrow", num_cpus=0.25,
                               fn_kwargs={"text_column": settings.text_column, "max_chars": settings.max_text_chars})
             .groupby(TEXT, num_partitions=settings.shuffle_partitions).count()
             .select_columns([TEXT])).materialize()
    summary.distinct_texts = texts.count()
    looked_up = lookup(texts, settings.cache, model_version, labels, settings.shuffle_partitions)
    if looked_up is None:  # nothing cached for this model version yet: every text is a miss
        misses, run_labels = texts, []
    else:
        looked_up = looked_up.materialize()
        misses = looked_up.map_batches(unlabeled_texts, batch_format="pyarrow", num_cpus=0.25).materialize()
        run_labels = looked_up.to_arrow_refs()
    missing = misses.count()
    summary.cache_hits = summary.distinct_texts - missing   # a text cached twice is still one hit
    progress = Progress("pass 1, scoring", summary.distinct_texts, "distinct texts", settings.progress_every_s)
    progress.update(summary.cache_hits, f"{summary.cache_hits:,} from the label cache")
    if missing:
        device = "cuda" if settings.gpus_per_actor > 0 else "cpu"
        scored = misses.map_batches(TextScorer, batch_format="pandas", **_actor_args(settings),
                                    fn_constructor_kwargs={"model": settings.model, "cache": settings.cache,
                                                           "run_id": run_id, "batch_size": settings.batch_size,
                                                           "device": device, "backbone": settings.backbone or None})
        # Block references and row counts only: the entries stay in the object store for pass 2.
        for bundle in scored.iter_internal_ref_bundles():
            run_labels += bundle.block_refs
            summary.scored += bundle.num_rows()
            progress.update(bundle.num_rows(), f"{summary.scored:,} scored, {summary.cache_hits:,} from the label cache")
    progress.close(f"{summary.scored:,} scored, {summary.cache_hits:,} from the label cache")
    return run_labels


def compact_cache(settings: LabelSettings, model_version: str, labels: list[str]) -> None:
    """Keep the number of label cache files per model version bounded (a failure only warns: the
    labels are committed, and the next run tries again)."""
    cache = LabelCache(settings.cache, model_version)
    try:
        if settings.cache_max_files and len(cache.files()) > settings.cache_max_files:
            cache.compact(settings.cache_file_mb * 1024 ** 2, labels)   # logs what it did
    except Exception as exc:
        log.warning("label cache compaction failed (%s); the run's labels are committed, the next run tries again",
                    failure_reason(exc))


def unlabeled_texts(batch: pa.Table) -> pa.Table:
    """The texts the cache had no label for."""
    return batch.filter(pc.is_null(batch["label"])).select([TEXT])


def label_and_commit(settings: LabelSettings, pl: Plan, table: LabeledTable, model_version: str, labels: list[str],
                     run_id: str, run_labels: list, summary: Summary) -> None:
    """Pass 2: label every row, write data files, commit each partition when its rows add up."""
    import ray
    from ray.data.datasource import Partitioning

    fs, input_root = storage.filesystem(settings.input)
    files = [f for p in pl.todo for f in p.files]
    labeled_at = datetime.now(timezone.utc).isoformat()
    with footer_readers_for(len(files)):
        rows = ray.data.read_parquet(files, partitioning=Partitioning("hive", base_dir=input_root,
                                                                     field_names=[settings.partition_key]))
    records = (rows.map_batches(ApplyLabels, batch_format="pyarrow", num_cpus=0.25,
                                compute=ray.data.ActorPoolStrategy(size=settings.actors),
                                batch_size=None,  # a block as read: one data file per read block
                                fn_constructor_kwargs={"cache": settings.cache, "model_version": model_version,
                                                       "text_column": settings.text_column,
                                                       "max_chars": settings.max_text_chars, "labeled_at": labeled_at,
                                                       "review_threshold": summary.review_threshold,
                                                       # cache entries naming another class are not used
                                                       "labels": labels,
                                                       # this run's labels only, never the whole cache
                                                       "run_labels": run_labels})
               .map_batches(WriteDataFiles(**table.writer_spec()), batch_format="pyarrow", batch_size=None,
                            num_cpus=0.25))
    by_name = {p.name: p for p in pl.todo}
    written: dict[str, list[dict]] = {name: [] for name in by_name}
    progress = Progress("pass 2, labeling", sum(p.rows for p in pl.todo), "rows", settings.progress_every_s)

    def partitions_done() -> str:
        return (f"{len(summary.partitions_committed) + len(summary.partitions_left)}/{len(pl.todo)} partitions "
                f"committed")

    for batch in records.iter_batches(batch_format="pyarrow", batch_size=None):
        for record in batch.to_pylist():
            name = record["partition"]
            written[name].append(record)
            progress.update(record["rows"], partitions_done())
            got = sum(r["rows"] for r in written[name])
            if got == by_name[name].rows:
                commit(settings, pl, table, by_name[name], written[name], model_version, run_id, summary)
                log.info("committed %s: %d rows | %s", name, got, partitions_done())
            elif got > by_name[name].rows:  # never expected: Ray delivers each output block once
                log.error("%s: %d rows written for %d input rows", name, got, by_name[name].rows)
                summary.partitions_failed.setdefault(name, f"wrote {got} rows for {by_name[name].rows} input rows")
    progress.close(partitions_done())
    for name, p in by_name.items():
        if p.rows == 0 and name not in summary.partitions_failed:  # nothing to read: commit it as labeled, empty
            commit(settings, pl, table, p, [], model_version, run_id, summary)
        done = summary.partitions_committed + list(summary.partitions_left) + list(summary.partitions_failed)
        if name not in done:
            got = sum(r["rows"] for r in written[name])
            summary.partitions_failed[name] = f"wrote {got} of {p.rows} rows; not committed"


def commit(settings: LabelSettings, pl: Plan, table: LabeledTable, partition: parts.Partition, written: list[dict],
           model_version: str, run_id: str, summary: Summary) -> None:
    """Commit one partition (clf_core.table.commit_partition), then export its review rows."""
    started = time.monotonic()
    record = PartitionCommit(partition=partition.name, run_id=run_id, model_version=model_version,
                             input_files=parts.input_files(partition), input_rows=partition.rows,
                             snapshot_id=0, committed_at_ms=0)
    inputs = parts.input_files(partition)

    def still_mine(theirs: PartitionCommit) -> bool:
        # Another run committed this partition while this one labeled it. Replace its labels only
        # when both read the same input files and this is a backfill to another model version;
        # otherwise keep theirs (if the inputs differ, the next run sees it and relabels).
        return tuple(map(tuple, theirs.input_files)) == inputs and pl.mode == "backfill" \
            and theirs.model_version != model_version

    try:
        outcome, landed = table.commit_partition(
            partition.name, partition.value, [r["path"] for r in written], partition.rows, record,
            pl.planned_on.get(partition.name), still_mine)
    except CommitError as exc:
        summary.partitions_failed[partition.name] = str(exc)
        return
    except Exception as exc:  # e.g. the catalog refused past its retries: this partition fails, others go on
        summary.partitions_failed[partition.name] = f"commit failed: {failure_reason(exc)}"
        return
    finally:
        summary.commit_seconds += time.monotonic() - started
    if outcome == "left":
        summary.partitions_left[partition.name] = (f"committed by run {landed.run_id} (model {landed.model_version}) "
                                                   f"while this run was labeling it; its labels were kept")
        return
    summary.partitions_committed.append(partition.name)
    summary.rows_out += partition.rows
    summary.error_rows += sum(r["errors"] for r in written)
    summary.review_rows += sum(r["review"] for r in written)
    summary.expected_errors += sum(r["expected_errors"] for r in written)
    if settings.review_export:
        from clf_core.review import export_review

        target = storage.join(settings.review_export, f"{partition.name}.csv")
        try:
            export_review(table.table.io, [r["path"] for r in written], target)
        except Exception as exc:  # the labels are committed; only the convenience copy is missing
            summary.partitions_failed[partition.name] = (
                f"labels committed, but the review export {target} failed: {type(exc).__name__}: {exc}. "
                f"The rows are in the table (needs_review = true); --force relabels and exports again")


_CHAINED = re.compile(r"\n\s*(?:The above exception was the direct cause of the following exception:|"
                      r"During handling of the above exception, another exception occurred:)\s*\n")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failure_reason(exc: BaseException) -> str:
    """One line saying why: for an error raised in a Ray task, the task's own exception (e.g.
    `OSError: ... Please reduce your request rate.`), not the wrapper Ray adds last, whose last
    line is only a hint about Ray Data's retry settings. Ray passes that chain on as text."""
    text = _ANSI.sub("", str(exc)).strip()
    parts = _CHAINED.split(text)
    if len(parts) > 1:  # "<task's exception>  The above exception was the direct cause ...  <Ray's wrapper>"
        lines = [line for line in parts[-2].splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()[:500]
    last = text.splitlines()[-1] if text else ""
    return f"{type(exc).__name__}: {last.strip()[:500]}"


def review_threshold(settings: LabelSettings, artifact=None) -> float:
    """--review-threshold, or the threshold the model (`artifact`, opened from --model if not
    given) was published with (0.9 for older models)."""
    if settings.review_threshold >= 0:
        return settings.review_threshold
    from clf_core.artifact import open_artifact

    artifact = artifact or open_artifact(settings.model)
    return float(artifact.manifest.get("review", {}).get("threshold", 0.9))


def run(settings: LabelSettings, pl: Plan, table: LabeledTable, model_version: str, tag: str | None = None) -> Summary:
    """Both passes over the planned partitions. Failures are reported in the summary; a failure
    of the whole pipeline (e.g. a file corrupt past its footer) fails every uncommitted partition."""
    import ray

    from clf_core.artifact import open_artifact

    started = time.monotonic()
    artifact = open_artifact(settings.model)   # verified once here; the actors verify their own copy
    summary = Summary(partitions_skipped=list(pl.skipped), partitions_failed=dict(pl.failed),
                      rows_in=sum(p.rows for p in pl.todo), review_threshold=review_threshold(settings, artifact))
    if pl.todo:
        ctx = ray.data.DataContext.get_current()
        quiet_libraries()  # again: importing ray.data set its logger back to INFO
        ctx.enable_progress_bars = False      # our own progress lines instead
        ctx.wait_for_min_actors_s = settings.actor_start_timeout_s  # 7B actors may take minutes to load
        summary.run_id = run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
        log.info("run %s: %d partition(s), %d rows, model %s -> table %s", run_id, len(pl.todo), summary.rows_in,
                 model_version, table.identifier)
        try:
            table.ensure(pl.schema, pl.key_is_date)   # created or widened before any worker writes
            if tag:
                table.tag_current(tag)
            run_labels = score_distinct_texts(settings, pl.todo, model_version, artifact.labels, run_id, summary)
            label_and_commit(settings, pl, table, model_version, artifact.labels, run_id, run_labels, summary)
            compact_cache(settings, model_version, artifact.labels)
        except Exception as exc:  # the pipeline died: every partition not yet committed failed
            why = f"the labeling pipeline failed: {failure_reason(exc)}"
            log.error(why)
            for p in pl.todo:
                if p.name not in summary.partitions_committed and p.name not in summary.partitions_left:
                    summary.partitions_failed.setdefault(p.name, why)
    summary.seconds = time.monotonic() - started
    return summary


def execute(settings: LabelSettings, pl: Plan, table: LabeledTable, model_version: str,
            tag: str | None = None) -> Summary | None:
    """What jobs.label and jobs.backfill do once planned: show the plan, run it unless dry-run,
    print the summary. Returns the summary (None for a dry run); its exit_status is 0 when every
    planned partition was committed (or left to a concurrent run), 1 when any failed."""
    from clf_core.runtime import ensure_ray

    print(describe_plan(pl), flush=True)
    if settings.dry_run:
        return None
    ensure_ray()
    summary = run(settings, pl, table, model_version, tag)
    print(summary.report(), flush=True)
    return summary
