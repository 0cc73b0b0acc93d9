"""What a backfill changed, from the table itself: the snapshot it tagged before its first commit
against the table after its last one.

    rows relabeled (the backfilled partitions' rows now), rows whose label changed by (old -> new)
    pair, changes per partition, the 20 most frequent changed texts, and how many of the changed
    rows had carried a reviewer's answer (with --corrections none do: the answers are applied again)

The rows are never gathered on the driver. Ray Data reads the partitions' data files of both
snapshots (four columns), counts rows per (partition, text, label, source) in each block, and
groups by (partition, text) to find the rows whose label changed; only those groups' totals, and
then their sums by pair, partition and text, come back. Rows are matched by text within a
partition, not one by one: a model gives every row of a text the same label, so the counts say
exactly how many rows moved from which label to which (when the input did not change between).

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


def count_side(batch: pa.Table, key: str, text_column: str, side: str) -> pa.Table:
    """Rows per (partition, text, label, source) of a block, on one side of the backfill."""
    source = batch.column("label_source") if "label_source" in batch.column_names else pa.nulls(batch.num_rows, pa.string())
    partition = pc.binary_join_element_wise(pa.scalar(f"{key}="), pc.cast(batch.column(key), pa.string()), "")
    table = pa.table({"partition": partition, "text": pc.cast(batch.column(text_column), pa.string()),
                      "label": pc.cast(batch.column("label"), pa.string()),
                      "review": pc.fill_null(pc.equal(source, "review"), False)})
    counts = table.group_by(["partition", "text", "label", "review"], use_threads=False).aggregate([([], "count_all")])
    n = counts.column("count_all")
    return counts.drop_columns(["count_all"]).append_column(
        "before", n if side == "before" else pa.array([0] * len(counts), pa.int64())).append_column(
        "after", n if side == "after" else pa.array([0] * len(counts), pa.int64()))


def changed_rows(group: pa.Table) -> pa.Table:
    """For one (partition, text): the rows whose label changed, by (old, new) pair. Matched by
    label: each label's surplus after is paired with the labels that lost rows."""
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    reviewed: dict[str, int] = {}
    for label, review, b, a in zip(group["label"].to_pylist(), group["review"].to_pylist(),
                                   group["before"].to_pylist(), group["after"].to_pylist()):
        label = label if label is not None else "(none)"
        before[label] = before.get(label, 0) + b
        after[label] = after.get(label, 0) + a
        if review:
            reviewed[label] = reviewed.get(label, 0) + b
    lost = {label: n - after.get(label, 0) for label, n in before.items() if n > after.get(label, 0)}
    gained = {label: n - before.get(label, 0) for label, n in after.items() if n > before.get(label, 0)}
    rows = []
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
            rows.append({"old": old, "new": new, "rows": moved, "reviewed": from_reviewed})
            if not gained[new]:
                del gained[new]
    partition, text = group["partition"][0].as_py(), group["text"][0].as_py()
    return pa.Table.from_pylist([{"partition": partition, "text": text, **r} for r in rows],
                                schema=pa.schema([("partition", pa.string()), ("text", pa.string()), ("old", pa.string()),
                                                  ("new", pa.string()), ("rows", pa.int64()), ("reviewed", pa.int64())]))


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
    schema = pa.schema([(labeled.partition_key, pa.date32() if labeled.key_is_date else pa.string()),
                        (text_column, pa.string()), ("label", pa.string()), ("label_source", pa.string())])
    sides = []
    for side, files in (("before", before), ("after", after)):
        paths = [f for p in files.values() for f in p.files]
        if paths:
            sides.append(ray.data.read_parquet(paths, partitioning=None, schema=schema).map_batches(
                count_side, batch_format="pyarrow", num_cpus=0.25,
                fn_kwargs={"key": labeled.partition_key, "text_column": text_column, "side": side}))
    diff = Diff(tag, before_id, after_id, partitions=len(after), rows=sum(p.rows for p in after.values()))
    if not sides:
        return diff
    counts = sides[0].union(*sides[1:]) if len(sides) > 1 else sides[0]
    changes = counts.groupby(["partition", "text"]).map_groups(changed_rows, batch_format="pyarrow",
                                                               num_cpus=0.25).materialize()
    if not changes.count():
        return diff
    diff.changed = int(changes.sum("rows"))
    diff.reviewed_changed = int(changes.sum("reviewed"))
    for row in changes.groupby(["old", "new"]).sum("rows").take_all():
        diff.pairs[f"{row['old']} -> {row['new']}"] = int(row["sum(rows)"])
    for row in changes.groupby("partition").sum("rows").take_all():
        diff.per_partition[row["partition"]] = int(row["sum(rows)"])
    top = changes.groupby("text").sum("rows").sort("sum(rows)", descending=True).take(TOP_TEXTS)
    diff.top_texts = [(row["text"], int(row["sum(rows)"])) for row in top]
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
