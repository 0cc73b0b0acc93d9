"""Label planned ledger partitions into the Iceberg table with Ray Data (jobs.label, jobs.backfill).

`label_job` runs a job from its settings: open the model (verified once, passed down), the table
and the reviewers' answers, plan (clf_core.labeling.plan), then `run`, the whole flow, one stage per
line:

  read      the planned Parquet files (clf_core.labeling.plan chose them)
  distinct  each valid text once, run-wide, with its count of rows (a shuffle: several actors
            would otherwise score the same text in different batches); texts reviewers answered
            are left out, they are never scored
  look up   the distinct texts in the label cache (a hash join: no process holds the whole cache)
  score     the misses on TextScorer actors, which append them to the label cache
  label     every row from the run's own labels (left in Ray's object store by the steps above)
            or the reviewers' answer, with its review flag and reason
  correct   labeled partitions holding texts answered since: their rows from the table, answers
            applied (no scoring)
  write     Parquet data files into the table's location
  commit    each partition in its own Iceberg transaction, as soon as its files add up to its
            rows (clf_core.labeling.table)
  compact   the label cache, when this model version has more than --cache-max-files files

Each stage returns what it did; `run` adds it up into the Summary the job prints. The driver
only ever receives counts, block references and per-file records, never rows: its memory does
not grow with rows (docs/performance.md has the measured figures).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from clf_core import storage
from clf_core.labeling import partitions as parts
from clf_core.labeling.cache import LabelCache, lookup
from clf_core.labeling.commit import commit_as_filled
from clf_core.labeling.plan import Plan, describe_plan
from clf_core.labeling.scoring import ROWS, TEXT, ApplyCorrections, ApplyLabels, TextScorer, distinct_valid_texts
from clf_core.labeling.settings import LabelSettings, review_threshold
from clf_core.labeling.summary import Applied, Outcomes, Scores, Summary
from clf_core.labeling.table import LabeledTable
from clf_core.labeling.write import WriteDataFiles
from clf_core.logs import quiet_libraries
from clf_core.progress import Progress
from clf_core.runtime import failure_reason, footer_readers_for

log = logging.getLogger(__name__)


# ---- the flow -----------------------------------------------------------------------------------

def backfill_tag(start, end, model_version: str) -> str:
    """The tag a backfill puts on the table's snapshot before its first commit (its labels before)."""
    return f"backfill-{start.isoformat()}-{end.isoformat()}-{model_version}"


def label_job(settings: LabelSettings, start=None, end=None, mode: str = "label", tag: str | None = None,
              artifact=None) -> "Summary | None":
    """A label job from its settings (jobs.label; jobs.backfill with a date range and mode
    "backfill", tagged `backfill_tag` unless `tag` says otherwise; the demo): validate, open the
    model once, the output table and the reviewers' answers, plan, then show the plan and run it
    (see `execute`). Raises ClfError (bad input, exit 2) or TableError (an unreadable table,
    exit 1) before any worker starts."""
    from clf_core.model.artifact import open_artifact
    from clf_core.review.corrections import CorrectionsTable
    from clf_core.labeling.plan import plan

    from clf_core.model.registry import resolve_model

    settings.validate()
    if artifact is None:
        # REGISTRY/NAME@champion is read once, here: a promotion during the run changes nothing for it
        settings = dataclasses.replace(settings, model=resolve_model(settings.model).uri)
        artifact = open_artifact(settings.model)   # a bad --model fails here, not in an actor
    table = LabeledTable(settings.catalog, settings.output_table, settings.partition_key)
    corrections_id = settings.corrections or table.corrections_identifier
    if corrections_id and not settings.corrections:
        log.info("applying reviewers' answers from %s (the corrections table of %s's earlier runs)", corrections_id,
                 settings.output_table)
    corrections = CorrectionsTable(settings.catalog, corrections_id) if corrections_id else None
    if mode == "backfill" and tag is None:
        tag = backfill_tag(start, end, artifact.model_version)
    pl = plan(settings, artifact.model_version, table, start, end, mode, corrections=corrections, artifact=artifact)
    return execute(settings, pl, table, artifact.model_version, tag, artifact=artifact, corrections=corrections)


def run(settings: LabelSettings, pl: Plan, table: LabeledTable, model_version: str, tag: str | None = None,
        artifact=None, corrections=None) -> Summary:
    """Label the planned partitions. A failure is reported in the summary, never raised: a failed
    partition names its reason, and the others still commit."""
    from clf_core.model.artifact import open_artifact

    started = time.monotonic()
    artifact = artifact or open_artifact(settings.model)   # verified once; the actors verify their own copy
    threshold = review_threshold(settings, artifact)
    applied = Applied.of(corrections, pl)
    if not pl.has_work:
        applied.remember_search(table, pl, Outcomes())
        return Summary.of(pl, threshold, seconds=time.monotonic() - started, audit=applied.estimate(model_version))
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    log.info("run %s: %d partition(s) to label (%d rows), %d to bring up to date with reviewers' answers, model %s -> "
             "table %s", run_id, len(pl.todo), sum(p.rows for p in pl.todo), len(pl.to_correct), model_version,
             table.identifier)
    configure_ray_data(settings)
    try:
        table.ensure(pl.schema or pa.schema([]), pl.key_is_date)   # created or widened before any worker writes
        table.remember(model_version, artifact.labels, applied.identifier)
        if tag:
            table.tag_current(tag)
        answers = applied.shared()
        scores, labeled = Scores(), []
        if pl.todo:
            texts = distinct_texts(settings, pl.todo, answers)
            looked_up = look_up(texts, settings, model_version, artifact.labels)
            scores = score_misses(looked_up, settings, run_id)
            labeled.append(label_rows(settings, pl, model_version, artifact.labels, scores.run_labels, threshold,
                                      answers))
        if pl.to_correct:
            labeled.append(correct_rows(settings, pl, table, answers))
        rows = write_files(labeled, table)
    except Exception as exc:  # nothing was committed yet: every planned partition failed
        outcomes = Outcomes.all_failed(pl, f"the labeling pipeline failed: {failure_reason(exc)}")
        return Summary.of(pl, threshold, run_id=run_id, outcomes=outcomes, seconds=time.monotonic() - started)
    outcomes = commit_as_filled(rows, settings, pl, table, model_version, run_id, applied)  # never raises
    applied.remember_search(table, pl, outcomes)
    report = report_backfill(settings, pl, table, model_version, tag, outcomes)
    compact_cache(settings, model_version, artifact.labels)
    return Summary.of(pl, threshold, run_id=run_id, scores=scores, outcomes=outcomes,
                      seconds=time.monotonic() - started, audit=applied.estimate(model_version), report=report)


def report_backfill(settings: LabelSettings, pl: Plan, table: LabeledTable, model_version: str, tag: str | None,
                    outcomes: "Outcomes") -> list[str]:
    """A backfill that replaced another model's labels: what changed (clf_core.labeling.backfill_report),
    published beside the table; a failure here only warns (the labels are committed)."""
    replaced = [name for name in outcomes.committed
                if name in pl.planned_on and pl.planned_on[name].model_version != model_version]
    if pl.mode != "backfill" or not tag or not replaced:
        return []
    from clf_core.labeling.backfill_report import backfill_diff, publish_report

    try:
        diff = backfill_diff(table, tag, replaced, settings.text_column)
        if diff is None:
            return []
        return [*diff.summary_lines(), f"  report: {publish_report(table, diff)}"]
    except Exception as exc:
        log.warning("the backfill's labels are committed, but its diff report failed: %s", failure_reason(exc))
        return [f"backfill report: not written ({failure_reason(exc)})"]


def execute(settings: LabelSettings, pl: Plan, table: LabeledTable, model_version: str,
            tag: str | None = None, artifact=None, corrections=None) -> Summary | None:
    """What jobs.label and jobs.backfill do once planned: show the plan, run it unless dry-run,
    print the summary. Returns the summary (None for a dry run); its exit_status is 0 when every
    planned partition was committed (or left to a concurrent run), 1 when any failed."""
    from clf_core.runtime import ensure_ray

    print(describe_plan(pl), flush=True)
    if settings.dry_run:
        return None
    if pl.has_work:
        ensure_ray()
    summary = run(settings, pl, table, model_version, tag, artifact=artifact, corrections=corrections)
    print(summary.report(), flush=True)
    return summary


# ---- what the stages return ---------------------------------------------------------------------


# ---- pass 1: read -> distinct -> look up -> score -----------------------------------------------

def configure_ray_data(settings: LabelSettings) -> None:
    import ray
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    # The shuffles move distinct texts, not rows: megabytes. Under sort the dedupe runs as plain
    # tasks and the cache join as Ray's hash-join operator (still num_partitions aggregators, so no
    # process holds the whole cache); Ray's default (shuffle v2) spent ~5 s starting actors for each
    # (measured on 2 CPUs: groupby of 30 texts 4.8 s -> 0.2 s, cache join 5.5 -> 1.4 s).
    ctx.shuffle_strategy = (ShuffleStrategy.SORT_SHUFFLE_PULL_BASED if settings.shuffle == "sort"
                            else ShuffleStrategy.SHUFFLE_V2)
    quiet_libraries()  # again: importing ray.data set its logger back to INFO
    ctx.enable_progress_bars = False      # our own progress lines instead
    ctx.wait_for_min_actors_s = settings.actor_start_timeout_s  # 7B actors may take minutes to load


def distinct_texts(settings: LabelSettings, todo: list[parts.Partition], answers=None):
    """Every valid text of the planned files once, with how many rows hold it (a Ray Dataset of
    `text` and `rows`, held in the object store: the shuffle is a barrier anyway, and holding it
    gives the count for an ETA). Texts with an answer for every row (unscoped) are left out."""
    import ray

    answered = None
    if answers is not None:
        unscoped = set(ray.get(answers).unscoped)
        answered = ray.put(unscoped) if unscoped else None
    files = [f for p in todo for f in p.files]
    with footer_readers_for(len(files)):
        texts = ray.data.read_parquet(files, columns=[settings.text_column], partitioning=None)
    return (texts.map_batches(distinct_valid_texts, batch_format="pyarrow", num_cpus=0.25,
                              fn_kwargs={"text_column": settings.text_column, "max_chars": settings.max_text_chars,
                                         "answered": answered})
            .groupby(TEXT, num_partitions=settings.shuffle_partitions).sum(ROWS)
            .rename_columns({f"sum({ROWS})": ROWS})).materialize()


@dataclass
class LookedUp:
    distinct_texts: int
    misses: object                # Ray Dataset of the texts the cache had no label for
    cached_labels: list           # object refs of (text, label, confidence) blocks from the cache


def look_up(texts, settings: LabelSettings, model_version: str, labels: list[str]) -> LookedUp:
    """Left-join the distinct texts with this model version's label cache."""
    total = texts.count()
    joined = lookup(texts, settings.cache, model_version, labels, settings.shuffle_partitions)
    if joined is None:  # nothing cached for this model version yet: every text is a miss
        return LookedUp(total, texts, [])
    joined = joined.materialize()
    misses = joined.map_batches(unlabeled_texts, batch_format="pyarrow", num_cpus=0.25).materialize()
    return LookedUp(total, misses, joined.to_arrow_refs())


def unlabeled_texts(batch: pa.Table) -> pa.Table:
    """The texts the cache had no label for (with their row counts)."""
    return batch.filter(pc.is_null(batch["label"])).select([TEXT, ROWS])


def score_misses(looked_up: LookedUp, settings: LabelSettings, run_id: str) -> Scores:
    """Score the cache misses on TextScorer actors (each appends its results to the label cache).
    The scored blocks stay in the object store for pass 2; the driver counts their rows."""
    missing = looked_up.misses.count()
    scores = Scores(distinct_texts=looked_up.distinct_texts, cache_hits=looked_up.distinct_texts - missing,
                    run_labels=list(looked_up.cached_labels))   # a text cached twice is still one hit
    progress = Progress("pass 1, scoring", scores.distinct_texts, "distinct texts", settings.progress_every_s)
    progress.update(scores.cache_hits, f"{scores.cache_hits:,} from the label cache")
    if missing:
        scored = looked_up.misses.map_batches(
            TextScorer, batch_format="pandas", **_actor_args(settings),
            fn_constructor_kwargs={"model": settings.model, "cache": settings.cache, "run_id": run_id,
                                   "batch_size": settings.batch_size,
                                   "device": "cuda" if settings.gpus_per_actor > 0 else "cpu",
                                   "backbone": settings.backbone or None,
                                   "compile": None if settings.compile == "auto" else settings.compile})
        for bundle in scored.iter_internal_ref_bundles():
            scores.run_labels += bundle.block_refs
            scores.scored += bundle.num_rows()
            progress.update(bundle.num_rows(), f"{scores.scored:,} scored, {scores.cache_hits:,} from the label cache")
    progress.close(f"{scores.scored:,} scored, {scores.cache_hits:,} from the label cache")
    return scores


def _actor_args(settings: LabelSettings) -> dict:
    import ray

    # One call at a time per actor (one model, one cache writer), run on the actor's main thread:
    # by default Ray Data runs a class UDF on a helper thread, where the 4-bit forward used 1.2
    # of the 2 cores it used on the main thread (CPU time / wall time, measured in the actor).
    return dict(compute=ray.data.ActorPoolStrategy(size=settings.actors, max_concurrent_calls_per_actor=1,
                                                   enable_true_multi_threading=True),
                num_cpus=settings.cpus_per_actor,
                num_gpus=settings.gpus_per_actor or None, batch_size=settings.rows_per_call)


# ---- pass 2: label -> commit --------------------------------------------------------------------

def label_rows(settings: LabelSettings, pl: Plan, model_version: str, labels: list[str], run_labels: list,
               threshold: float, answers=None):
    """Every row of the planned files labeled from the run's labels or the reviewers' answers,
    flagged for review and why: a lazy Ray Dataset of the rows with the labeling columns."""
    import ray
    from ray.data.datasource import Partitioning

    fs, input_root = storage.filesystem(settings.input)
    files = [f for p in pl.todo for f in p.files]
    with footer_readers_for(len(files)):
        rows = ray.data.read_parquet(files, partitioning=Partitioning("hive", base_dir=input_root,
                                                                     field_names=[settings.partition_key]))
    return rows.map_batches(ApplyLabels, batch_format="pyarrow", num_cpus=0.25,
                            compute=ray.data.ActorPoolStrategy(size=settings.actors),
                            batch_size=None,  # a block as read: one data file per read block
                            fn_constructor_kwargs={"cache": settings.cache, "model_version": model_version,
                                                   "text_column": settings.text_column,
                                                   "max_chars": settings.max_text_chars,
                                                   "labeled_at": datetime.now(timezone.utc).isoformat(),
                                                   "review_threshold": threshold,
                                                   "review_budget": settings.review_budget,
                                                   "audit_fraction": settings.audit_fraction,
                                                   # cache entries naming another class are not used
                                                   "labels": labels,
                                                   # this run's labels only, never the whole cache
                                                   "run_labels": run_labels,
                                                   "answers": answers})


def correct_rows(settings: LabelSettings, pl: Plan, table: LabeledTable, answers):
    """The rows of the labeled partitions to bring up to date, read from the table's own data files
    as of the planned snapshot, with the reviewers' answers applied (nothing is scored)."""
    import ray
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    target = schema_to_pyarrow(table.table.schema(), include_field_ids=False)
    files = [f for r in pl.to_correct for f in r.files]
    with footer_readers_for(len(files)):
        # the table's schema: a file written before a column was added reads it as null
        rows = ray.data.read_parquet(files, partitioning=None, schema=target)
    return rows.map_batches(ApplyCorrections(answers, settings.text_column, target,
                                             datetime.now(timezone.utc).isoformat()),
                            batch_format="pyarrow", batch_size=None, num_cpus=0.25)


def write_files(labeled: list, table: LabeledTable):
    """Pass 2's last stage: the labeled rows as Parquet data files in the table's location (a lazy
    Ray Dataset of one record per written file)."""
    rows = labeled[0].union(*labeled[1:]) if len(labeled) > 1 else labeled[0]
    return rows.map_batches(WriteDataFiles(**table.writer_spec()), batch_format="pyarrow", batch_size=None,
                            num_cpus=0.25)


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
