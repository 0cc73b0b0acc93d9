"""Looking after the labeled table: its history, rolling back, expiring old snapshots, orphans.

Iceberg keeps every snapshot (so every earlier labeling of a partition stays readable by time
travel) until they are expired. `expire_snapshots` removes snapshots older than a cutoff and
deletes the files only they referenced (pyiceberg 0.12 removes the snapshots from the metadata,
not the files). Tagged snapshots are never expired: a backfill tags the state before it, and that
tag is dropped by an expiry whose cutoff has passed it.

The labeling records of partitions whose latest commit is expired are kept in a table property,
so an expiry never makes the nightly job relabel old partitions.

`remove_orphan_files` deletes files in the table's location that no snapshot lists and that are
older than a cutoff: data files of runs that crashed before their commit.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import re
from datetime import timedelta

from clf_core import storage
from clf_core.errors import ClfError, ConfigError
from clf_core.settings import check, setting
from clf_core.labeling.records import EXPIRED_COMMITS, PREFIX, commits_as_of
from clf_core.labeling.settings import TABLE_NAME
from clf_core.labeling.table import LabeledTable

log = logging.getLogger(__name__)

BACKFILL_TAG_PREFIX = "backfill-"


# ---- the settings of python -m jobs.table's subcommands ----------------------------------------

@dataclass
class TableSettings:
    catalog: str = setting("The pyiceberg catalog holding the table (as for jobs.label).", required=True,
                           hint="e.g. --catalog ledgers", default="")
    output_table: str = setting("The labeled table, NAMESPACE.TABLE (jobs.label's --output-table).", required=True,
                                pattern=TABLE_NAME, hint="expected NAMESPACE.TABLE, e.g. ledgers.labeled_lines",
                                default="")

    def validate(self):
        return check(self)


@dataclass
class HistorySettings(TableSettings):
    limit: int = setting("How many snapshots to show.", at_least=1, default=30)


@dataclass
class RollbackSettings(TableSettings):
    to: str = setting("A tag (e.g. the backfill-... tag a backfill made), the start of one tag's name, or a "
                      "snapshot id.", required=True, hint="python -m jobs.table history lists them", default="")


UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
AGE = r"\d+[smhd]"


def parse_age(flag: str, value: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([smhd])", value or "")
    if not match:
        raise ConfigError(f"{flag} {value!r}: expected a number and a unit (s, m, h, d), e.g. 30d or 12h")
    return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


@dataclass
class ExpireSettings(TableSettings):
    older_than: str = setting("Age cutoff, e.g. 30d, 12h.", required=True, pattern=AGE,
                              hint="expected a number and a unit (s, m, h, d), e.g. 30d or 12h", default="")
    retain_last: int = setting("Always keep this many newest snapshots.", at_least=1, default=1)


@dataclass
class OrphanSettings(TableSettings):
    older_than: str = setting("Only files older than this, e.g. 3d: more than your longest run.", required=True,
                              pattern=AGE, hint="expected a number and a unit (s, m, h, d), e.g. 3d", default="")
    dry_run: bool = setting("List them, delete nothing.", default=False)


@dataclass
class CompactCacheSettings:
    cache: str = setting("The label cache the jobs use (--cache of jobs.label).", required=True, default="")
    model_version: str = setting("The model version whose entries to compact (v...), or --model.", default="")
    model: str = setting("Or the model, as for jobs.label (REGISTRY/NAME@champion or an artifact): its version.",
                         default="")
    cache_file_mb: int = setting("Target size of a compacted file, in MB of memory (as jobs.label's --cache-file-mb).",
                                 at_least=1, default=256)

    def validate(self) -> "CompactCacheSettings":
        return check(self, [] if bool(self.model_version.strip()) != bool(self.model.strip())
                     else ["give --model-version or --model (one of them)"])


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def history(labeled: LabeledTable, limit: int = 50) -> list[dict]:
    """The newest `limit` snapshots of the current branch's ancestry, newest first, as a person
    reads them: when, what, which partition, run and model, and which tags point there."""
    table = labeled.table
    table.refresh()
    tags: dict[int, list[str]] = {}
    for name, ref in table.metadata.refs.items():
        if name != "main":
            tags.setdefault(ref.snapshot_id, []).append(name)
    rows = []
    snapshot = table.current_snapshot()
    while snapshot is not None and len(rows) < limit:
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        rows.append({
            "snapshot_id": snapshot.snapshot_id,
            "committed_at": datetime.fromtimestamp(snapshot.timestamp_ms / 1000, timezone.utc).isoformat(timespec="seconds"),
            "operation": str(snapshot.summary.operation.value) if snapshot.summary else "",
            "partition": summary.get(PREFIX + "partition", "") or (
                f"report {summary[PREFIX + 'backfill-tag']}" if PREFIX + "backfill-tag" in summary else ""),
            "run_id": summary.get(PREFIX + "run-id", ""),
            "model_version": summary.get(PREFIX + "model-version", ""),
            "added_records": int(summary.get("added-records", 0)), "deleted_records": int(summary.get("deleted-records", 0)),
            "tags": sorted(tags.get(snapshot.snapshot_id, [])),
        })
        parent = snapshot.parent_snapshot_id
        snapshot = table.metadata.snapshot_by_id(parent) if parent else None
    return rows


def resolve_snapshot(labeled: LabeledTable, ref: str) -> int:
    """A tag or branch name, the start of exactly one tag's name (e.g. a backfill's tag without
    its model version), or a snapshot id -> the snapshot id (a ClfError naming what exists)."""
    table = labeled.table
    table.refresh()
    if ref in table.metadata.refs:
        return table.metadata.refs[ref].snapshot_id
    if ref.lstrip("-").isdigit() and table.metadata.snapshot_by_id(int(ref)) is not None:
        return int(ref)
    tags = sorted(n for n in table.metadata.refs if n != "main")
    starting = [n for n in tags if n.startswith(ref)] if ref else []
    if len(starting) == 1:
        return table.metadata.refs[starting[0]].snapshot_id
    if len(starting) > 1:
        raise ClfError(f"--to {ref!r} starts the names of several tags of {labeled.identifier}: "
                       f"{', '.join(starting)}; give one in full")
    raise ClfError(f"--to {ref!r} is neither a tag nor a snapshot id of {labeled.identifier}. Tags: "
                   f"{', '.join(tags) or 'none'}; snapshot ids: `python -m jobs.table history`.")


def rollback(labeled: LabeledTable, ref: str) -> int:
    """Point the table's current state back at `ref` (e.g. the tag a backfill made before it):
    every commit after it is undone, nightly ones included (the next nightly run relabels what it
    no longer finds); the undone snapshots stay readable until expired. Returns the snapshot id."""
    snapshot_id = resolve_snapshot(labeled, ref)
    labeled.table.manage_snapshots().set_current_snapshot(snapshot_id=snapshot_id).commit()
    log.info("%s now reads as of snapshot %s (%s)", labeled.identifier, snapshot_id, ref)
    return snapshot_id


@dataclass
class ExpiryReport:
    snapshots_expired: int = 0
    tags_removed: list[str] = field(default_factory=list)
    files_deleted: int = 0
    records_kept: int = 0          # partitions whose record now lives in the table property


def _reachable(table, snapshots, live_only: bool) -> set[str]:
    """Every file the snapshots need: manifest lists, manifests, data files (live entries only,
    or every entry a manifest names)."""
    io = table.io
    files: set[str] = set()
    manifests = {}
    for snapshot in snapshots:
        files.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(io):
            manifests[manifest.manifest_path] = manifest
    files |= set(manifests)

    def entries(manifest):
        return [e.data_file.file_path for e in manifest.fetch_manifest_entry(io, discard_deleted=live_only)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        for paths in pool.map(entries, manifests.values()):
            files.update(paths)
    return files


def expire_snapshots(labeled: LabeledTable, older_than: datetime, retain_last: int = 1) -> ExpiryReport:
    """Expire snapshots older than `older_than` (keeping the newest `retain_last` of the current
    ancestry and every tagged one; backfill tags older than the cutoff are dropped first) and
    delete the files only they referenced."""
    from pyiceberg.table.update.snapshot import ExpireSnapshots, ManageSnapshots

    table = labeled.table
    table.refresh()
    meta = table.metadata
    cutoff = _ms(older_than)
    report = ExpiryReport()
    stale_tags = [name for name, ref in meta.refs.items() if name.startswith(BACKFILL_TAG_PREFIX)
                  and (meta.snapshot_by_id(ref.snapshot_id) is None or meta.snapshot_by_id(ref.snapshot_id).timestamp_ms < cutoff)]
    protected = {ref.snapshot_id for name, ref in meta.refs.items() if name not in stale_tags}
    ancestry, snapshot = [], table.current_snapshot()
    while snapshot is not None:
        ancestry.append(snapshot.snapshot_id)
        snapshot = meta.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id else None
    protected |= set(ancestry[:max(1, retain_last)])
    expired = [s for s in meta.snapshots if s.timestamp_ms < cutoff and s.snapshot_id not in protected]
    if not expired and not stale_tags:
        return report
    expired_ids = {s.snapshot_id for s in expired}
    retained = [s for s in meta.snapshots if s.snapshot_id not in expired_ids]

    # Records whose snapshot goes away (or that were kept already) move to the table property.
    records = commits_as_of(table, meta.current_snapshot_id)
    kept_ancestry = {sid for sid in ancestry if sid not in expired_ids}
    carried = {name: record.to_json() for name, record in records.items() if record.snapshot_id not in kept_ancestry}
    before = _reachable(table, expired, live_only=False)
    after = _reachable(table, retained, live_only=True)

    tx = table.transaction()
    if stale_tags:
        manage = ManageSnapshots(tx)
        for name in stale_tags:
            manage.remove_tag(name)
        manage.commit()
    if expired_ids:
        ExpireSnapshots(tx).by_ids(sorted(expired_ids)).commit()
    tx.set_properties({EXPIRED_COMMITS: json.dumps(carried, sort_keys=True)})
    tx.commit_transaction()

    doomed = sorted(before - after)
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(table.io.delete, doomed))
    report.snapshots_expired, report.tags_removed = len(expired_ids), stale_tags
    report.files_deleted, report.records_kept = len(doomed), len(carried)
    log.info("%s: expired %d snapshot(s), removed tag(s) %s, deleted %d file(s)", labeled.identifier,
             report.snapshots_expired, stale_tags or "none", report.files_deleted)
    return report


def remove_orphan_files(labeled: LabeledTable, older_than: datetime, dry_run: bool = False) -> list[str]:
    """Delete files under the table's data/ and metadata/ folders that no snapshot or metadata
    file lists and that were last written before `older_than` (the cutoff keeps files of runs
    still writing)."""
    table = labeled.table
    table.refresh()
    meta = table.metadata
    known = _reachable(table, meta.snapshots, live_only=False)
    known.add(table.metadata_location)
    known.update(entry.metadata_file for entry in meta.metadata_log)
    known.update(s.statistics_path for s in meta.statistics)

    fs, root = storage.filesystem(meta.location)
    fs.invalidate_cache()
    scheme = meta.location.split("://", 1)[0] + "://" if "://" in meta.location else ""
    cutoff = older_than.timestamp()
    orphans = []
    # Only the folders Iceberg writes: the backfill reports under reports/ are listed by no
    # snapshot and must stay.
    found = {}
    for folder in ("data", "metadata"):
        where = f"{root.rstrip('/')}/{folder}"
        if fs.exists(where):
            found.update(fs.find(where, detail=True))
    for path, info in found.items():
        uri = scheme + path if scheme and not path.startswith(scheme) else path
        if uri in known:
            continue
        modified = info.get("LastModified") or info.get("mtime") or info.get("created")
        stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)
        if stamp < cutoff:
            orphans.append(uri)
    if not dry_run:
        for uri in orphans:
            fs.rm(uri.split("://", 1)[-1] if scheme else uri)
    log.info("%s: %d orphan file(s) %s", labeled.identifier, len(orphans), "found" if dry_run else "removed")
    return orphans
