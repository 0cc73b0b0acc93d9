"""What a backfill changed, from the table itself: the snapshot it tagged before its first commit
against the table after its last one.

    rows relabeled (the backfilled partitions' rows now), rows whose label changed by (old -> new)
    pair, changes per partition, the 20 most frequent changed texts, and how many of the changed
    rows had carried a reviewer's answer (with --corrections none do: the answers are applied again)

The rows are never gathered on the driver. A Ray task per relabeled partition reads the
partition's data files of both snapshots (three columns), counts rows per (text, label, reviewer's
answer) on each side and matches them text by text; only the changed (text, old -> new) counts come
back, which the driver sums by pair, partition and text. There is no shuffle: a partition (a night)
fits in one worker. Rows are matched by text within a partition, not one by one: a model gives
every row of a text the same label, so the counts say exactly how many rows moved from which label
to which (when the input did not change between).

The figures become the `clf.backfill-report` property of a snapshot that closes the backfill (no
file changes; a rollback to the tag undoes it with the rest), and a Markdown report at
`<table location>/reports/<tag>.md` beside a JSON copy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from clf_core import storage

log = logging.getLogger(__name__)

REPORT = "clf.backfill-report"
TOP_TEXTS = 20
SIDES = ("before", "after")


@dataclass
class Diff:
    tag: str
    before_snapshot: int
    after_snapshot: int
    partitions: int = 0
    rows: int = 0                     # rows of the backfilled partitions after it
    changed: int = 0                  # rows whose label changed
    reviewed_changed: int = 0         # ... of them carrying a reviewer's answer before
    pairs: dict[str, int] = field(default_factory=dict)          # "old -> new" -> rows
    per_partition: dict[str, int] = field(default_factory=dict)  # partition -> changed rows
    top_texts: list[tuple[str, int]] = field(default_factory=list)

    def figures(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        lines = [f"# Backfill report: {self.tag}", "",
                 f"Table as of snapshot {self.before_snapshot} (the tag) against snapshot {self.after_snapshot}.", "",
                 f"- partitions relabeled: {self.partitions}",
                 f"- rows relabeled: {self.rows:,}",
                 f"- rows whose label changed: **{self.changed:,}** ({100 * self.changed / max(self.rows, 1):.2f}%)",
                 f"- of them, rows that had carried a reviewer's answer: {self.reviewed_changed:,}", "",
                 "## Changes by label", "", "| old -> new | rows |", "|---|---:|"]
        lines += [f"| {pair} | {n:,} |" for pair, n in sorted(self.pairs.items(), key=lambda kv: -kv[1])]
        lines += ["", "## Changes per partition", "", "| partition | changed rows |", "|---|---:|"]
        lines += [f"| {name} | {n:,} |" for name, n in sorted(self.per_partition.items())]
        lines += ["", f"## The {TOP_TEXTS} most frequent changed texts", "", "| text | changed rows |", "|---|---:|"]
        lines += [f"| {text.replace('|', '/')} | {n:,} |" for text, n in self.top_texts]
        return "\n".join(lines) + "\n"

    def summary_lines(self) -> list[str]:
        pairs = ", ".join(f"{pair} {n:,}" for pair, n in sorted(self.pairs.items(), key=lambda kv: -kv[1]))
        return [f"backfill report {self.tag}: {self.changed:,} of {self.rows:,} rows in {self.partitions} partition(s) "
                f"changed label ({pairs or 'none'}); {self.reviewed_changed:,} of them had a reviewer's answer"]


def count_rows(paths: list[str], text_column: str) -> dict[tuple[str | None, str, bool], int]:
    """Rows per (text, label, carries a reviewer's answer) in some of the table's data files (three
    columns read; a file written before label_source existed counts no answers)."""
    import pyarrow.parquet as pq

    counts: dict[tuple[str | None, str, bool], int] = {}
    for path in paths:
        fs, inner = storage.filesystem(path)
        with fs.open(inner, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            batch = parquet.read(columns=[c for c in (text_column, "label", "label_source") if c in names])
        source = batch.column("label_source") if "label_source" in names else pa.nulls(batch.num_rows, pa.string())
        table = pa.table({"text": pc.cast(batch.column(text_column), pa.string()),
                          "label": pc.fill_null(pc.cast(batch.column("label"), pa.string()), "(none)"),
                          "review": pc.fill_null(pc.equal(source, "review"), False)})
        grouped = table.group_by(["text", "label", "review"], use_threads=False).aggregate([([], "count_all")])
        for text, label, review, n in zip(*(grouped.column(c).to_pylist()
                                            for c in ("text", "label", "review", "count_all"))):
            counts[(text, label, review)] = counts.get((text, label, review), 0) + n
    return counts


def moves(before: dict[str, int], after: dict[str, int], reviewed: dict[str, int]) -> list[tuple[str, str, int, int]]:
    """For one text of one partition, rows per label before and after (and before, with a
    reviewer's answer): the rows whose label changed as (old, new, rows, of them reviewed). Each
    label's surplus after is paired with the labels that lost rows."""
    lost = {label: n - after.get(label, 0) for label, n in before.items() if n > after.get(label, 0)}
    gained = {label: n - before.get(label, 0) for label, n in after.items() if n > before.get(label, 0)}
    found = []
    for old, missing in lost.items():
        reviewed_left = min(reviewed.get(old, 0), missing)
        for new in list(gained):
            if not missing:
                break
            moved = min(missing, gained[new])
            gained[new] -= moved
            missing -= moved
            from_reviewed = min(reviewed_left, moved)
            reviewed_left -= from_reviewed
            found.append((old, new, moved, from_reviewed))
            if not gained[new]:
                del gained[new]
    return found


def diff_partition(before_files: list[str], after_files: list[str], text_column: str) -> list[tuple]:
    """One partition's changed rows, (text, old, new, rows, reviewed) per text and label pair: both
    sides' files counted by text and label, then matched text by text."""
    sides: dict[str, tuple[dict, dict, dict]] = {}
    for paths, side in ((before_files, 0), (after_files, 1)):
        for (text, label, review), n in count_rows(paths, text_column).items():
            per_label = sides.setdefault(text, ({}, {}, {}))
            per_label[side][label] = per_label[side].get(label, 0) + n
            if review and side == 0:
                per_label[2][label] = per_label[2].get(label, 0) + n
    return [(text, *move) for text, (before, after, reviewed) in sides.items() if before != after
            for move in moves(before, after, reviewed)]


def backfill_diff(labeled, tag: str, partitions: list[str], text_column: str) -> Diff | None:
    """The diff of `partitions` between the snapshot tagged `tag` and the current one (None when
    the tag is gone or nothing was relabeled)."""
    import ray

    table = labeled.table
    table.refresh()
    if tag not in table.metadata.refs or not partitions:
        return None
    before_id, after_id = table.metadata.refs[tag].snapshot_id, table.metadata.current_snapshot_id
    wanted = set(partitions)
    before = {k: v for k, v in labeled.partition_files(before_id).items() if k in wanted}
    after = {k: v for k, v in labeled.partition_files(after_id).items() if k in wanted}
    diff = Diff(tag, before_id, after_id, partitions=len(after), rows=sum(p.rows for p in after.values()))
    # A task per partition (a night's rows fit in a worker; no shuffle), a quarter CPU each so the
    # report never waits on a whole core; only the changed (text, old, new) counts come back.
    task = ray.remote(num_cpus=0.25, max_retries=3)(diff_partition)
    pending = {task.remote(before[name].files if name in before else [], after[name].files, text_column): name
               for name in sorted(after)}
    per_text: dict[str, int] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        for text, old, new, rows, reviewed in ray.get(done[0]):
            diff.changed += rows
            diff.reviewed_changed += reviewed
            diff.pairs[f"{old} -> {new}"] = diff.pairs.get(f"{old} -> {new}", 0) + rows
            diff.per_partition[name] = diff.per_partition.get(name, 0) + rows
            per_text[text] = per_text.get(text, 0) + rows
    diff.top_texts = sorted(per_text.items(), key=lambda kv: (-kv[1], kv[0] or ""))[:TOP_TEXTS]
    return diff


def publish_report(labeled, diff: Diff) -> str:
    """The figures as the property of a snapshot closing the backfill (no file changes), and the
    Markdown report (with a JSON copy) under the table's location. Returns the report's URI."""
    figures = json.dumps(diff.figures(), sort_keys=True)
    tx = labeled.table.transaction()
    with tx.update_snapshot(snapshot_properties={REPORT: figures, "clf.backfill-tag": diff.tag}).fast_append():
        pass   # no file added or removed: a snapshot that carries the report
    tx.commit_transaction()
    location = labeled.table.location()
    target = storage.join(location.removeprefix("file://"), "reports", f"{diff.tag}.md")
    storage.write_bytes(target, diff.markdown().encode())
    storage.write_bytes(target[:-3] + ".json", json.dumps(diff.figures(), indent=2, sort_keys=True).encode())
    return target
