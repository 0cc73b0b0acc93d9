"""Label Hive-partitioned Parquet ledgers with Ray Data: plan -> score distinct texts -> label
rows -> commit each partition. Shared by jobs.label (nightly, incremental) and jobs.backfill.

Two streaming passes, because "each distinct text is scored once per run" cannot hold when
several actors see the same text in different batches:

  pass 1  read text column -> valid texts, distinct per batch -> groupby(text) (a shuffle: each
          distinct text once, run-wide) -> TextScorer actors: score only cache misses, append
          them to the label cache -> the driver adds up (scored, cache hits)
  pass 2  read rows (partition from the path) -> ApplyLabels actors: look labels up in the
          cache -> StageWriter: files under the run's attempt prefix -> the driver counts rows
          per partition and commits each one as soon as it adds up (clf_core.partitions)

The driver only ever receives per-batch counts and per-file records, never rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

from clf_core import partitions as parts
from clf_core import storage
from clf_core.errors import ConfigError
from clf_core.scoring import OUTPUT_COLUMNS, TEXT, ApplyLabels, TextScorer, distinct_valid_texts

log = logging.getLogger(__name__)

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class LabelSettings:
    model: str = _help("Model artifact published by jobs.train: a local folder or s3:// URI.", default="")
    input: str = _help("Prefix holding dt=YYYY-MM-DD/*.parquet ledger partitions (local or s3://).", default="")
    output: str = _help("Prefix for labeled partitions, mirroring the input layout (local or s3://).", default="")
    cache: str = _help("Label cache prefix, keyed by model version and text. Default: <output>/_label_cache.",
                       default="")
    text_column: str = _help("Column holding the line-item text.", default="texts")
    partition_key: str = _help("Hive partition key of the input folders (key=value).", default="dt")
    actors: int = _help("Scoring actors (production: one per GPU).", default=1)
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
    actor_start_timeout_s: float = _help("Seconds to wait for the first actors to load the model "
                                         "(-1 = no limit: 7B weights can take minutes).", default=-1)
    review_threshold: float = _help("Rows scored below this confidence, and rows that could not be scored, "
                                    "get needs_review=true and are listed in <partition>/_review.csv.",
                                    default=0.9)
    force: bool = _help("Relabel partitions that already have committed output.", default=False)
    dry_run: bool = _help("List what would be labeled and exit without running anything.", default=False)

    def cache_uri(self) -> str:
        return self.cache or storage.join(self.output, "_label_cache")

    def validate(self) -> "LabelSettings":
        problems = []
        for name in ("model", "input", "output"):
            if not getattr(self, name).strip():
                problems.append(f"--{name} is required (a local path or s3:// URI)")
        if self.input and self.output and self.input.rstrip("/") == self.output.rstrip("/"):
            problems.append(f"--output {self.output!r} is the same as --input; write labels to a separate prefix")
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
        if not 0.0 <= self.review_threshold <= 1.0:
            problems.append(f"--review-threshold {self.review_threshold}: must be within [0, 1] (0 flags only unscored rows)")
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


# ---- plan ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    todo: list[parts.Partition]
    skipped: list[str]                 # committed already (and not forced)
    failed: dict[str, str]             # partition -> why (names the file)


def plan(settings: LabelSettings, model_version: str, start: date | None = None, end: date | None = None,
         relabel_other_versions: bool = False) -> Plan:
    """Which partitions to label: those without committed output (or all, with --force); with a
    date range, only those inside it; for backfills, also those labeled by another model version
    (which makes an interrupted backfill resumable: what it finished is skipped on the re-run)."""
    found = parts.discover(settings.input, settings.partition_key)
    todo, skipped, failed = [], [], {}
    run_schema = None  # all planned files are read as one dataset: their column types must agree
    for p in found:
        if start or end:
            if not DATE.match(p.value):
                log.warning("ignoring %s: not a date, outside any --start/--end range", p.name)
                continue
            if (start and p.value < start.isoformat()) or (end and p.value > end.isoformat()):
                continue
        manifest = parts.read_manifest(settings.output, p.name)
        if manifest and not settings.force:
            if not (relabel_other_versions and manifest.get("model_version") != model_version):
                skipped.append(p.name)
                continue
        parts.inspect(p, settings.text_column, OUTPUT_COLUMNS + (settings.partition_key,))
        if not p.problem:
            for uri, schema in p.schemas.items():
                conflict = parts.schema_conflict(run_schema, schema)
                if conflict:
                    p.problem = (f"{uri} does not match the partitions planned before it in this run "
                                 f"(first: {todo[0].files[0]}): {conflict}. A run reads all its partitions "
                                 f"as one dataset; once they are committed, a re-run labels {p.name} on its own.")
                    break
        if p.problem:
            failed[p.name] = p.problem
        else:
            for schema in p.schemas.values():
                run_schema = parts.merge_schemas(run_schema, schema)
            todo.append(p)
    return Plan(todo, skipped, failed)


def describe_plan(pl: Plan) -> str:
    lines = [f"would label {len(pl.todo)} partition(s) ({sum(p.rows for p in pl.todo)} rows), "
             f"skip {len(pl.skipped)} already committed, {len(pl.failed)} cannot be read"]
    lines += [f"  label  {p.name}  {p.rows} rows in {len(p.files)} file(s)" for p in pl.todo]
    lines += [f"  skip   {name}  (committed; --force relabels)" for name in pl.skipped]
    lines += [f"  FAIL   {name}  {why}" for name, why in pl.failed.items()]
    return "\n".join(lines)


# ---- run ----------------------------------------------------------------------------------------

@dataclass
class Summary:
    partitions_committed: list[str] = field(default_factory=list)
    partitions_skipped: list[str] = field(default_factory=list)
    partitions_failed: dict[str, str] = field(default_factory=dict)
    rows_in: int = 0
    rows_out: int = 0
    error_rows: int = 0
    review_rows: int = 0
    distinct_texts: int = 0
    scored: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    run_record_error: str = ""  # the audit record under <output>/_runs could not be written

    @property
    def ok(self) -> bool:
        return not self.partitions_failed and not self.run_record_error

    def report(self) -> str:
        lines = [f"labeled {len(self.partitions_committed)} partition(s), skipped {len(self.partitions_skipped)}, "
                 f"failed {len(self.partitions_failed)} | rows in {self.rows_in}, out {self.rows_out}, "
                 f"with error {self.error_rows}, to review {self.review_rows} | distinct texts {self.distinct_texts}: scored {self.scored}, "
                 f"cache hits {self.cache_hits} | {self.seconds:.1f}s "
                 f"({self.rows_out / max(self.seconds, 1e-9):.0f} rows/s)"]
        lines += [f"  FAILED {name}: {why}" for name, why in self.partitions_failed.items()]
        if self.run_record_error:
            lines.append(f"  FAILED {self.run_record_error}")
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


def score_distinct_texts(settings: LabelSettings, todo: list[parts.Partition], run_id: str, summary: Summary) -> None:
    """Pass 1: every distinct valid text of the run ends up in the label cache, scored once."""
    import ray

    files = [f for p in todo for f in p.files]
    with footer_readers_for(len(files)):
        texts = ray.data.read_parquet(files, columns=[settings.text_column], partitioning=None)
    texts = (texts.map_batches(distinct_valid_texts, batch_format="pandas", num_cpus=0.25,
                               fn_kwargs={"text_column": settings.text_column, "max_chars": settings.max_text_chars})
             .groupby(TEXT, num_partitions=settings.shuffle_partitions).count()
             .select_columns([TEXT]))
    device = "cuda" if settings.gpus_per_actor > 0 else "cpu"
    counts = texts.map_batches(TextScorer, batch_format="pandas", **_actor_args(settings),
                               fn_constructor_kwargs={"model": settings.model, "cache": settings.cache_uri(),
                                                      "run_id": run_id, "batch_size": settings.batch_size,
                                                      "device": device})
    for batch in counts.iter_batches(batch_format="pandas", batch_size=None):
        summary.scored += int(batch["scored"].sum())
        summary.cache_hits += int(batch["cache_hits"].sum())
    summary.distinct_texts = summary.scored + summary.cache_hits
    log.info("pass 1: %d distinct texts, %d scored, %d from the label cache",
             summary.distinct_texts, summary.scored, summary.cache_hits)


def label_and_commit(settings: LabelSettings, todo: list[parts.Partition], model_version: str, run_id: str,
                     summary: Summary, started: float) -> None:
    """Pass 2: label every row, stage the files, commit each partition when its rows add up."""
    import ray
    from ray.data.datasource import Partitioning

    fs, input_root = storage.filesystem(settings.input)
    files = [f for p in todo for f in p.files]
    labeled_at = datetime.now(timezone.utc).isoformat()
    with footer_readers_for(len(files)):
        rows = ray.data.read_parquet(files, partitioning=Partitioning("hive", base_dir=input_root,
                                                                     field_names=[settings.partition_key]))
    records = (rows.map_batches(ApplyLabels, batch_format="pyarrow", num_cpus=0.25,
                                compute=ray.data.ActorPoolStrategy(size=settings.actors),
                                batch_size=None,  # a block as read: one labeled file per read block
                                fn_constructor_kwargs={"cache": settings.cache_uri(), "model_version": model_version,
                                                       "text_column": settings.text_column,
                                                       "max_chars": settings.max_text_chars, "labeled_at": labeled_at,
                                                       "review_threshold": settings.review_threshold})
               .map_batches(parts.StageWriter(settings.output, run_id, settings.partition_key),
                            batch_format="pyarrow", batch_size=None, num_cpus=0.25))
    by_name = {p.name: p for p in todo}
    written: dict[str, list[dict]] = {name: [] for name in by_name}
    info = {"run_id": run_id, "model_version": model_version, "model": settings.model,
            "text_column": settings.text_column}
    for batch in records.iter_batches(batch_format="pandas", batch_size=None):
        for record in batch.to_dict("records"):
            name = record["partition"]
            written[name].append(record)
            got = sum(r["rows"] for r in written[name])
            if got == by_name[name].rows:
                _commit(settings, by_name[name], written[name], info, summary)
                elapsed = time.monotonic() - started
                log.info("committed %s: %d rows | %d/%d partitions done, %.0f rows/s", name, got,
                         len(summary.partitions_committed), len(todo), summary.rows_out / max(elapsed, 1e-9))
            elif got > by_name[name].rows:  # never expected: Ray delivers each output block once
                log.error("%s: %d rows written for %d input rows", name, got, by_name[name].rows)
                summary.partitions_failed.setdefault(name, f"wrote {got} rows for {by_name[name].rows} input rows")
    for name, p in by_name.items():
        if name not in summary.partitions_committed and name not in summary.partitions_failed:
            got = sum(r["rows"] for r in written[name])
            summary.partitions_failed[name] = f"wrote {got} of {p.rows} rows; not committed"


def _commit(settings, partition, written, info, summary) -> None:
    try:
        # The review list is written before the commit point (_SUCCESS), so a committed
        # partition always has one; a crash in between leaves only a `_` file a re-run replaces.
        summary.review_rows += parts.write_review_file(settings.output, partition.name, written)
        manifest = parts.commit(settings.output, partition, written, info)
    except parts.CommitError as exc:
        summary.partitions_failed[partition.name] = str(exc)
        return
    summary.partitions_committed.append(partition.name)
    summary.rows_out += manifest["rows"]
    summary.error_rows += manifest["error_rows"]


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


def run(settings: LabelSettings, pl: Plan, model_version: str) -> Summary:
    """Both passes over the planned partitions. Failures are reported in the summary; a failure
    of the whole pipeline (e.g. a file corrupt past its footer) fails every uncommitted partition."""
    import ray

    started = time.monotonic()
    summary = Summary(partitions_skipped=list(pl.skipped), partitions_failed=dict(pl.failed),
                      rows_in=sum(p.rows for p in pl.todo))
    if pl.todo:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False      # our own progress lines instead
        ctx.wait_for_min_actors_s = settings.actor_start_timeout_s  # 7B actors may take minutes to load
        run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
        log.info("run %s: %d partition(s), %d rows, model %s", run_id, len(pl.todo), summary.rows_in, model_version)
        try:
            score_distinct_texts(settings, pl.todo, run_id, summary)
            label_and_commit(settings, pl.todo, model_version, run_id, summary, started)
        except Exception as exc:  # the pipeline died: every partition not yet committed failed
            why = f"the labeling pipeline failed: {failure_reason(exc)}"
            log.error(why)
            for p in pl.todo:
                if p.name not in summary.partitions_committed:
                    summary.partitions_failed.setdefault(p.name, why)
    summary.seconds = time.monotonic() - started
    if pl.todo:  # an audit trail of what each run did, next to the output it describes
        record = storage.join(settings.output, "_runs", f"{run_id}.json")
        try:
            storage.write_bytes(record, json.dumps({"run_id": run_id, "model_version": model_version,
                                                    **dataclasses.asdict(summary)}, indent=2).encode())
        except Exception as exc:  # e.g. S3 refusing writes past the retries: still report what happened
            summary.run_record_error = f"could not write the run record {record}: {type(exc).__name__}: {exc}"
            log.error(summary.run_record_error)
    return summary


def execute(settings: LabelSettings, pl: Plan, model_version: str) -> tuple[int, Summary | None]:
    """What jobs.label and jobs.backfill do once planned: show the plan, run it unless dry-run,
    print the summary. Returns (exit status, summary): 0 all committed, 1 any partition failed."""
    from clf_core.runtime import ensure_ray

    print(describe_plan(pl), flush=True)
    if settings.dry_run:
        return 0, None
    ensure_ray()
    summary = run(settings, pl, model_version)
    print(summary.report(), flush=True)
    return (0 if summary.ok else 1), summary
