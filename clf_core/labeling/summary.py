"""What a label run reports: the stages' results (Scores of pass 1, Outcomes of the commits), the
reviewers' answers it applied (Applied), and the Summary the job prints, one line a person reads
(and `figures()` in the tests parses) plus a line per partition that was left or failed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from clf_core.labeling.plan import Plan
from clf_core.labeling.records import PartitionCommit
from clf_core.labeling.scoring import REVIEW_REASONS
from clf_core.labeling.table import LabeledTable
from clf_core.runtime import failure_reason

log = logging.getLogger(__name__)


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
