"""What each partition commit records, in its snapshot's summary: run id, model version, the
input files (path, size, ETag or mtime), rows, and which reviewers' answers its rows hold. Planning
reads the records of the current snapshot's ancestry (`commits_as_of`), so a rollback rolls the
records back too; expiry keeps the records of partitions whose commit it expires in a table
property.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


PREFIX = "clf."               # our keys in snapshot summaries and table properties


EXPIRED_COMMITS = PREFIX + "expired-commits"   # records whose snapshots were expired (see expire)


@dataclass(frozen=True)
class PartitionCommit:
    """A partition's labels as committed: who made them, from which input files."""
    partition: str                                  # "dt=2024-03-01"
    run_id: str
    model_version: str
    input_files: tuple[tuple[str, int, str], ...]   # (uri, size, ETag or mtime), sorted
    input_rows: int
    snapshot_id: int
    committed_at_ms: int
    corrections: str = ""                           # the corrections table its rows hold answers from
    corrections_snapshot: int | None = None         # ... as of this snapshot of it (None: no answers yet)

    def summary(self) -> dict[str, str]:
        props = {PREFIX + "partition": self.partition, PREFIX + "run-id": self.run_id,
                 PREFIX + "model-version": self.model_version, PREFIX + "input-rows": str(self.input_rows),
                 PREFIX + "input-files": json.dumps([list(f) for f in self.input_files])}
        if self.corrections:
            props[PREFIX + "corrections-table"] = self.corrections
            props[PREFIX + "corrections-snapshot"] = "" if self.corrections_snapshot is None else str(self.corrections_snapshot)
        return props

    @classmethod
    def from_summary(cls, props: dict, snapshot_id: int, timestamp_ms: int) -> "PartitionCommit | None":
        if PREFIX + "partition" not in props:
            return None
        try:
            return cls(partition=props[PREFIX + "partition"], run_id=props.get(PREFIX + "run-id", ""),
                       model_version=props.get(PREFIX + "model-version", ""),
                       input_files=tuple(tuple(f) for f in json.loads(props.get(PREFIX + "input-files", "[]"))),
                       input_rows=int(props.get(PREFIX + "input-rows", "0")), snapshot_id=snapshot_id,
                       committed_at_ms=timestamp_ms, corrections=props.get(PREFIX + "corrections-table", ""),
                       corrections_snapshot=int(props[PREFIX + "corrections-snapshot"])
                       if props.get(PREFIX + "corrections-snapshot") else None)
        except (ValueError, TypeError) as exc:
            log.warning("snapshot %s: unreadable labeling record (%s); its partition counts as unlabeled",
                        snapshot_id, exc)
            return None

    def to_json(self) -> dict:
        return {**self.summary(), "snapshot-id": self.snapshot_id, "committed-at-ms": self.committed_at_ms}

    @classmethod
    def from_json(cls, data: dict) -> "PartitionCommit | None":
        return cls.from_summary(data, int(data.get("snapshot-id", 0)), int(data.get("committed-at-ms", 0)))


def input_changes(recorded: tuple, current: tuple) -> str:
    """What differs between two input-file lists, for a person: '1 file added (part-2.parquet)'."""
    old, new = {f[0]: f[1:] for f in recorded}, {f[0]: f[1:] for f in current}
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    changed = sorted(u for u in set(old) & set(new) if old[u] != new[u])
    parts = []
    for what, uris in (("added", added), ("removed", removed), ("rewritten", changed)):
        if uris:
            names = ", ".join(u.rsplit("/", 1)[-1] for u in uris[:3]) + (", ..." if len(uris) > 3 else "")
            parts.append(f"{len(uris)} file(s) {what} ({names})")
    return "; ".join(parts) or "no change"


def commits_as_of(table, snapshot_id: int | None) -> dict[str, PartitionCommit]:
    """partition -> its latest commit in the ancestry of `snapshot_id`, then, for partitions with
    none there, the records kept when their snapshots were expired (`expire_snapshots`)."""
    found: dict[str, PartitionCommit] = {}
    meta = table.metadata
    snapshot = meta.snapshot_by_id(snapshot_id) if snapshot_id is not None else None
    while snapshot is not None:
        record = PartitionCommit.from_summary(snapshot.summary.additional_properties if snapshot.summary else {},
                                              snapshot.snapshot_id, snapshot.timestamp_ms)
        if record is not None:
            found.setdefault(record.partition, record)
        snapshot = meta.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id else None
    for name, data in json.loads(meta.properties.get(EXPIRED_COMMITS, "{}")).items():
        if name not in found:
            record = PartitionCommit.from_json(data)
            if record is not None:
                found[name] = record
    return found
