"""Which ledger partitions a label run takes on, and why: planned on the driver from the input
folders' listings, their Parquet footers, the table's commit records and manifests, before any
worker starts. Nothing here runs Ray.

Two kinds of work come out of it:
- partitions to label from their input files (`Plan.todo`): never labeled, input changed, the
  table's rows of it changed by someone else (e.g. a DELETE), --force, or (backfill) labeled by
  another model version;
- partitions to bring up to date with reviewers' answers (`Plan.to_correct`): labeled already,
  but holding texts whose answer is new since their labels were committed. They are rewritten
  from the table's own rows, without scoring; finding them reads only the text (and scope)
  columns of the partitions whose answers are behind, and the table remembers when every
  partition was found up to date (LabeledTable.corrections_watermark), so a quiet night reads
  nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date

import pyarrow as pa

from clf_core.labeling import partitions as parts
from clf_core import storage
from clf_core.labeling.settings import LabelSettings
from clf_core.labeling.scoring import OUTPUT_COLUMNS
from clf_core.labeling.partitions import DATE
from clf_core.labeling.records import PartitionCommit, input_changes
from clf_core.labeling.table import LabeledTable, PartitionFiles

log = logging.getLogger(__name__)


def is_date(value: str) -> bool:
    try:
        return bool(DATE.match(value)) and date.fromisoformat(value) is not None
    except ValueError:
        return False


@dataclass
class Rewrite:
    """A labeled partition to bring up to date with reviewers' answers: its rows as the table
    holds them (`files`, as of the planned snapshot) go through ApplyCorrections."""
    name: str
    value: str
    files: list[str]
    rows: int
    record: PartitionCommit
    answered: int                      # rows holding a new answer (as planned)


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
    to_correct: list[Rewrite] = field(default_factory=list)
    answers: object = None             # the reviewers' answers this run applies (corrections.Answers)
    table_snapshot: int | None = None  # the table's snapshot when planned
    searched_all: bool = False         # every labeled partition was checked for new answers

    @property
    def has_work(self) -> bool:
        return bool(self.todo or self.to_correct)


def reason_to_label(record: PartitionCommit | None, partition: parts.Partition, model_version: str, mode: str,
                    force: bool, held: PartitionFiles | None = None) -> str | None:
    """Why a partition needs (re)labeling given its committed record and what the table holds of
    it now (`held`, from the manifests), or None to leave it."""
    if record is None:
        return "not labeled yet"
    current = parts.input_files(partition)
    if tuple(map(tuple, record.input_files)) != current:
        return f"input changed since run {record.run_id}: {input_changes(record.input_files, current)}"
    held = held or PartitionFiles()
    if held.rows != record.input_rows or held.delete_files:
        deletes = f" and {held.delete_files} row-level delete file(s)" if held.delete_files else ""
        return (f"the table holds {held.rows} of its rows{deletes}, its commit by run {record.run_id} recorded "
                f"{record.input_rows}: changed outside this job (a DELETE or an insert by another engine?)")
    if mode == "backfill" and record.model_version != model_version:
        return f"labeled by model {record.model_version}"
    if force:
        return "--force"
    return None


def plan(settings: LabelSettings, model_version: str, table: LabeledTable, start: date | None = None,
         end: date | None = None, mode: str = "label", corrections=None, artifact=None) -> Plan:
    """Which partitions to label: those the table holds no labels for, those whose input files
    changed since they were labeled (a late or rewritten file), those whose rows in the table no
    longer add up to their commit, all with --force; with a date range, only those inside it; for
    backfills, also those labeled by another model version (which makes an interrupted backfill
    resumable: what it finished is skipped on the re-run). With `corrections`
    (clf_core.review.corrections.CorrectionsTable), also the labeled partitions to rewrite with new answers."""
    if settings.backbone and not storage.is_remote(settings.backbone):
        # the check every scoring actor makes on start, made once here (remote copies are
        # checked by the actors, which download them anyway)
        from clf_core.model.artifact import open_artifact
        from clf_core.model.predict import backbone_for

        backbone_for(artifact or open_artifact(settings.model), settings.backbone)
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
    held = table.partition_files()
    pl = Plan(todo=[], skipped=[], failed={}, key_is_date=key_is_date, mode=mode,
              table_snapshot=table.table.metadata.current_snapshot_id if table.table is not None else None)
    candidates = []
    for p in found:
        if p.problem:  # found unreadable at discovery (an odd folder name or layout)
            pl.failed[p.name] = p.problem
            continue
        why = reason_to_label(records.get(p.name), p, model_version, mode, settings.force, held.get(p.name))
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
    if corrections is not None:
        plan_corrections(pl, settings, table, records, held, corrections, start, end)
    return pl


def plan_corrections(pl: Plan, settings: LabelSettings, table: LabeledTable, records: dict[str, PartitionCommit],
                     held: dict[str, PartitionFiles], corrections, start: date | None, end: date | None) -> None:
    """The labeled partitions (not already planned) that hold texts answered since their labels."""
    answers = pl.answers = corrections.answers()
    pl.searched_all = not (start or end)
    if not len(answers) or table.table is None:
        return
    current = corrections.snapshot_id
    covered, vouched = table.covered_by_watermark(corrections.identifier)
    behind: dict[int | None, list[str]] = {}     # the answers a partition holds -> partitions
    for name, record in records.items():
        value = name.split("=", 1)[1]
        if name in pl.why or name in pl.failed or (start and value < start.isoformat()) or (end and value > end.isoformat()):
            continue
        holds = record.corrections_snapshot if record.corrections == corrections.identifier else None
        if not corrections.knows(holds):
            holds = None
        if record.snapshot_id in covered and corrections.sequence_number(vouched) > corrections.sequence_number(holds):
            holds = vouched
        if holds != current:
            behind.setdefault(holds, []).append(name)
    for holds, names in behind.items():
        new = answers.changed_since(corrections.answers(holds) if holds is not None else None)
        if not len(new):
            continue
        rewritable = [n for n in names if n in held and not held[n].delete_files]
        if len(rewritable) < len(names):
            pl.searched_all = False   # a partition with delete files is relabeled from its input instead
        for name, rows in table.rows_answered(new, rewritable, settings.text_column).items():
            files = held[name]
            pl.to_correct.append(Rewrite(name, name.split("=", 1)[1], files.files, files.rows, records[name], rows))
            pl.planned_on[name] = records[name]
    pl.to_correct.sort(key=lambda r: r.value)
    rewritten = {r.name for r in pl.to_correct}
    pl.skipped = [name for name in pl.skipped if name not in rewritten]


def describe_plan(pl: Plan) -> str:
    lines = [f"would label {len(pl.todo)} partition(s) ({sum(p.rows for p in pl.todo)} rows), "
             f"skip {len(pl.skipped)} already labeled, {len(pl.failed)} cannot be read"
             + (f", apply new reviewers' answers to {len(pl.to_correct)} labeled partition(s)" if pl.to_correct else "")]
    lines += [f"  label  {p.name}  {p.rows} rows in {len(p.files)} file(s): {pl.why.get(p.name, '')}" for p in pl.todo]
    lines += [f"  answer {r.name}  {r.answered} of its {r.rows} rows hold texts reviewers answered since run "
              f"{r.record.run_id} labeled it" for r in pl.to_correct]
    lines += [f"  skip   {name}  (labeled from these input files; --force relabels)" for name in pl.skipped]
    lines += [f"  FAIL   {name}  {why}" for name, why in pl.failed.items()]
    return "\n".join(lines)
