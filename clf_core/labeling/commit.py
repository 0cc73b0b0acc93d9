"""Pass 2's end: commit each partition in its own Iceberg transaction as soon as its data files
add up to its rows (clf_core.labeling.table), then export its review rows. A partition that
fails is named in the outcomes; the others go on.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from clf_core import storage
from clf_core.labeling import partitions as parts
from clf_core.labeling.plan import Plan, Rewrite
from clf_core.labeling.records import PartitionCommit
from clf_core.labeling.scoring import REVIEW_REASONS
from clf_core.labeling.settings import LabelSettings
from clf_core.labeling.summary import Applied, Outcomes
from clf_core.labeling.table import CommitError, LabeledTable
from clf_core.progress import Progress
from clf_core.runtime import failure_reason

log = logging.getLogger(__name__)


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
