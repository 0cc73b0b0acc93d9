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
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from clf_core.labeling import partitions as parts
from clf_core import storage
from clf_core.labeling.cache import LabelCache, lookup
from clf_core.labeling.plan import Plan, Rewrite, describe_plan
from clf_core.labeling.settings import LabelSettings, review_threshold
from clf_core.logs import quiet_libraries
from clf_core.progress import Progress
from clf_core.runtime import failure_reason, footer_readers_for
from clf_core.labeling.scoring import REVIEW_REASONS, ROWS, TEXT, ApplyCorrections, ApplyLabels, TextScorer, distinct_valid_texts
from clf_core.labeling.table import CommitError, LabeledTable, PartitionCommit, WriteDataFiles

log = logging.getLogger(__name__)


# ---- the flow -----------------------------------------------------------------------------------

def backfill_tag(start, end, model_version: str) -> str:
    """The tag a backfill puts on the table's snapshot before its first commit (its labels before)."""
    return f"backfill-{start.isoformat()}-{end.isoformat()}-{model_version}"


def label_job(settings: LabelSettings, start=None, end=None, mode: str = "label", tag: str | None = None,
              artifact=None) -> "Summary | None":
    """A label job from its settings (jobs.label; jobs.backfill with a date range, mode
    "backfill" and a tag; the demo): validate, open the model once, the output table and the
    reviewers' answers, plan, then show the plan and run it (see `execute`). Raises ClfError
    (bad input, exit 2) or TableError (an unreadable table, exit 1) before any worker starts."""
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


@dataclass
class Applied:
    """The reviewers' answers a run applies: which table, as of which snapshot."""
    corrections: object = None          # clf_core.review.corrections.CorrectionsTable, or None
    answers: object = None              # its Answers as of `snapshot_id`
    snapshot_id: int | None = None

    @classmethod
    def of(cls, corrections, pl: Plan) -> "Applied":
        if corrections is None:
            return cls()
        answers = pl.answers if pl.answers is not None else corrections.answers()
        return cls(corrections, answers, answers.snapshot_id)

    @property
    def identifier(self) -> str:
        return self.corrections.identifier if self.corrections is not None else ""

    def shared(self):
        """The answers as one object in Ray's object store (None: no answers)."""
        if self.answers is None or not len(self.answers):
            return None
        import ray

        return ray.put(self.answers)

    def record(self, commit: PartitionCommit) -> PartitionCommit:
        """A partition's commit record, saying which answers its rows hold."""
        if self.corrections is None:
            return commit
        return dataclasses.replace(commit, corrections=self.identifier, corrections_snapshot=self.snapshot_id)

    def remember_search(self, table: LabeledTable, pl: Plan, outcomes: "Outcomes") -> None:
        """Once every labeled partition was searched and every rewrite committed, say so on the
        table, so the next run searches only what is committed after this plan."""
        if self.corrections is None or not len(self.answers) or not pl.searched_all or table.table is None:
            return
        if outcomes.failed or any(r.name in outcomes.left for r in pl.to_correct):
            return
        try:
            table.set_corrections_watermark(self.identifier, self.snapshot_id, pl.table_snapshot)
        except Exception as exc:  # only an optimisation: the next run searches again
            log.warning("could not record that every partition holds the answers of %s (%s); the next run "
                        "searches again", self.identifier, failure_reason(exc))

    def estimate(self, model_version: str):
        if self.corrections is None or self.corrections.table is None:
            return None
        from clf_core.review.corrections import audit_estimate

        return audit_estimate(self.corrections.rows(self.snapshot_id), model_version)


# ---- what the stages return ---------------------------------------------------------------------

@dataclass
class Scores:
    """Pass 1: the run's distinct texts, how many came from the cache, how many were scored, and
    the run's labels as Ray object refs of (text, label, confidence) blocks."""
    distinct_texts: int = 0
    cache_hits: int = 0
    scored: int = 0
    run_labels: list = field(default_factory=list)


@dataclass
class Outcomes:
    """Pass 2: what became of each planned partition, and the labeled rows' counts."""
    committed: list[str] = field(default_factory=list)
    corrected: list[str] = field(default_factory=list)     # rewritten with reviewers' answers only
    left: dict[str, str] = field(default_factory=dict)    # committed by a concurrent run instead
    failed: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    error_rows: int = 0
    review_rows: int = 0
    reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REVIEW_REASONS, 0))
    reviewed_rows: int = 0             # rows labeled with a reviewer's answer
    expected_errors: float = 0.0
    commit_seconds: float = 0.0

    @classmethod
    def all_failed(cls, pl: Plan, why: str) -> "Outcomes":
        log.error(why)
        return cls(failed={name: why for name in [p.name for p in pl.todo] + [r.name for r in pl.to_correct]})

    def done(self, name: str) -> bool:
        return name in self.committed or name in self.corrected or name in self.left or name in self.failed


@dataclass
class Summary:
    partitions_committed: list[str] = field(default_factory=list)
    partitions_corrected: list[str] = field(default_factory=list)   # rewritten with reviewers' answers
    partitions_skipped: list[str] = field(default_factory=list)
    partitions_failed: dict[str, str] = field(default_factory=dict)
    partitions_left: dict[str, str] = field(default_factory=dict)  # committed by a concurrent run instead
    rows_in: int = 0
    rows_out: int = 0
    error_rows: int = 0
    review_rows: int = 0
    review_reasons: dict[str, int] = field(default_factory=dict)   # review_reason -> rows
    reviewed_rows: int = 0             # rows labeled with a reviewer's answer
    expected_errors: float = 0.0       # sum of 1 - calibrated confidence over labeled rows not flagged
    review_threshold: float = -1.0
    distinct_texts: int = 0
    scored: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    commit_seconds: float = 0.0        # driver time in partition commits (footers + Iceberg transaction)
    run_id: str = ""
    audit: object = None               # clf_core.review.corrections.AuditEstimate, with --corrections
    backfill_report: list[str] = field(default_factory=list)   # what a backfill changed, in a few lines

    @classmethod
    def of(cls, pl: Plan, threshold: float, run_id: str = "", scores: Scores | None = None,
           outcomes: Outcomes | None = None, seconds: float = 0.0, audit=None, report=None) -> "Summary":
        scores, outcomes = scores or Scores(), outcomes or Outcomes()
        return cls(partitions_committed=outcomes.committed, partitions_corrected=outcomes.corrected,
                   partitions_skipped=list(pl.skipped),
                   partitions_failed={**pl.failed, **outcomes.failed}, partitions_left=outcomes.left,
                   rows_in=sum(p.rows for p in pl.todo) + sum(r.rows for r in pl.to_correct), rows_out=outcomes.rows,
                   error_rows=outcomes.error_rows, review_rows=outcomes.review_rows,
                   review_reasons=dict(outcomes.reasons), reviewed_rows=outcomes.reviewed_rows,
                   expected_errors=outcomes.expected_errors,
                   review_threshold=threshold, distinct_texts=scores.distinct_texts, scored=scores.scored,
                   cache_hits=scores.cache_hits, seconds=seconds, commit_seconds=outcomes.commit_seconds,
                   run_id=run_id, audit=audit, backfill_report=list(report or []))

    @property
    def ok(self) -> bool:
        return not self.partitions_failed

    @property
    def exit_status(self) -> int:
        return 0 if self.ok else 1

    def report(self) -> str:
        why = ", ".join(f"{reason} {self.review_reasons[reason]}" for reason in REVIEW_REASONS
                        if self.review_reasons.get(reason))
        lines = [f"labeled {len(self.partitions_committed)} partition(s), "
                 f"{f'answered {len(self.partitions_corrected)}, ' if self.partitions_corrected else ''}"
                 f"skipped {len(self.partitions_skipped)}, "
                 f"left to another run {len(self.partitions_left)}, failed {len(self.partitions_failed)} | "
                 f"rows in {self.rows_in}, out {self.rows_out}, with error {self.error_rows}, to review "
                 f"{self.review_rows}{f' ({why})' if why else ''} (threshold {self.review_threshold:.3f}; about "
                 f"{self.expected_errors:,.1f} errors expected among the rest), reviewers' answers {self.reviewed_rows} "
                 f"| distinct texts {self.distinct_texts}: scored {self.scored}, cache hits "
                 f"{self.cache_hits} | {self.seconds:.1f}s ({self.rows_out / max(self.seconds, 1e-9):.0f} rows/s)"]
        if self.audit is not None:
            lines.append("  " + self.audit.line())
        lines += ["  " + line for line in self.backfill_report]
        lines += [f"  LEFT   {name}: {why}" for name, why in self.partitions_left.items()]
        lines += [f"  FAILED {name}: {why}" for name, why in self.partitions_failed.items()]
        return "\n".join(lines)


# ---- pass 1: read -> distinct -> look up -> score -----------------------------------------------

def configure_ray_data(settings: LabelSettings) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
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


def commit_as_filled(written_files, settings: LabelSettings, pl: Plan, table: LabeledTable, model_version: str,
                     run_id: str, applied: Applied | None = None) -> Outcomes:
    """Run pass 2, committing each partition as soon as its files add up to its rows. If the
    pipeline dies, the partitions committed so far stay committed and the rest fail."""
    outcomes = Outcomes()
    applied = applied or Applied()
    by_name: dict[str, parts.Partition | Rewrite] = {p.name: p for p in pl.todo}
    by_name.update({r.name: r for r in pl.to_correct})
    written: dict[str, list[dict]] = {name: [] for name in by_name}
    progress = Progress("pass 2, labeling", sum(p.rows for p in by_name.values()), "rows", settings.progress_every_s)

    def partitions_done() -> str:
        done = len(outcomes.committed) + len(outcomes.corrected) + len(outcomes.left)
        return f"{done}/{len(by_name)} partitions committed"

    try:
        for batch in written_files.iter_batches(batch_format="pyarrow", batch_size=None):
            for record in batch.to_pylist():
                name = record["partition"]
                written[name].append(record)
                progress.update(record["rows"], partitions_done())
                got = sum(r["rows"] for r in written[name])
                if got == by_name[name].rows:
                    commit(settings, pl, table, by_name[name], written[name], model_version, run_id, outcomes, applied)
                    log.info("committed %s: %d rows | %s", name, got, partitions_done())
                elif got > by_name[name].rows:  # never expected: Ray delivers each output block once
                    log.error("%s: %d rows written for %d input rows", name, got, by_name[name].rows)
                    outcomes.failed.setdefault(name, f"wrote {got} rows for {by_name[name].rows} input rows")
    except Exception as exc:
        why = f"the labeling pipeline failed: {failure_reason(exc)}"
        log.error(why)
        for name in by_name:
            if not outcomes.done(name):
                outcomes.failed[name] = why
    progress.close(partitions_done())
    for name, p in by_name.items():
        if p.rows == 0 and not outcomes.done(name):  # nothing to read: commit it as labeled, empty
            commit(settings, pl, table, p, [], model_version, run_id, outcomes, applied)
        if not outcomes.done(name):
            got = sum(r["rows"] for r in written[name])
            outcomes.failed[name] = f"wrote {got} of {p.rows} rows; not committed"
    return outcomes


def commit(settings: LabelSettings, pl: Plan, table: LabeledTable, partition: parts.Partition | Rewrite,
           written: list[dict], model_version: str, run_id: str, outcomes: Outcomes,
           applied: Applied | None = None) -> None:
    """Commit one partition (clf_core.labeling.table.commit_partition), then export its review rows; the
    partition's outcome is added to `outcomes`."""
    started = time.monotonic()
    applied = applied or Applied()
    rewrite = isinstance(partition, Rewrite)
    if rewrite:  # the same labels of the same input, now holding the reviewers' answers
        record = applied.record(dataclasses.replace(partition.record, run_id=run_id, snapshot_id=0, committed_at_ms=0))
        inputs = tuple(map(tuple, partition.record.input_files))
    else:
        inputs = parts.input_files(partition)
        record = applied.record(PartitionCommit(partition=partition.name, run_id=run_id, model_version=model_version,
                                                input_files=inputs, input_rows=partition.rows,
                                                snapshot_id=0, committed_at_ms=0))

    def still_mine(theirs: PartitionCommit) -> bool:
        # Another run committed this partition while this one labeled it. Replace its labels only
        # when both read the same input files and this is a backfill to another model version;
        # otherwise keep theirs (if the inputs differ, the next run sees it and relabels). A
        # rewrite read the rows the other run replaced: it always leaves them.
        return not rewrite and tuple(map(tuple, theirs.input_files)) == inputs and pl.mode == "backfill" \
            and theirs.model_version != model_version

    try:
        outcome, landed = table.commit_partition(
            partition.name, partition.value, [r["path"] for r in written], partition.rows, record,
            pl.planned_on.get(partition.name), still_mine)
    except CommitError as exc:
        outcomes.failed[partition.name] = str(exc)
        return
    except Exception as exc:  # e.g. the catalog refused past its retries: this partition fails, others go on
        outcomes.failed[partition.name] = f"commit failed: {failure_reason(exc)}"
        return
    finally:
        outcomes.commit_seconds += time.monotonic() - started
    if outcome == "left":
        outcomes.left[partition.name] = (f"committed by run {landed.run_id} (model {landed.model_version}) "
                                         f"while this run was labeling it; its labels were kept")
        return
    (outcomes.corrected if rewrite else outcomes.committed).append(partition.name)
    outcomes.rows += partition.rows
    outcomes.error_rows += sum(r["errors"] for r in written)
    outcomes.review_rows += sum(r["review"] for r in written)
    for reason in REVIEW_REASONS:
        outcomes.reasons[reason] += sum(r[f"review_{reason}"] for r in written)
    outcomes.reviewed_rows += sum(r["reviewed"] for r in written)
    outcomes.expected_errors += sum(r["expected_errors"] for r in written)
    if settings.review_export:
        from clf_core.review.file import export_review

        target = storage.join(settings.review_export, f"{partition.name}.csv")
        try:
            export_review(table.table.io, [r["path"] for r in written], target)
        except Exception as exc:  # the labels are committed; only the convenience copy is missing
            outcomes.failed[partition.name] = (
                f"labels committed, but the review export {target} failed: {type(exc).__name__}: {exc}. "
                f"The rows are in the table (needs_review = true); --force relabels and exports again")


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
