"""Look after the labeled table (history, rollback, snapshot expiry, orphan files) and the label cache.

Run as:
    python -m jobs.table history  --catalog ledgers --output-table ledgers.labeled_lines
    python -m jobs.table rollback --catalog ledgers --output-table ledgers.labeled_lines --to backfill-2024-01-01-2024-03-31-v1a2b3c
    python -m jobs.table expire   --catalog ledgers --output-table ledgers.labeled_lines --older-than 30d
    python -m jobs.table remove-orphans --catalog ledgers --output-table ledgers.labeled_lines --older-than 3d --dry-run
    python -m jobs.table compact-cache --cache s3://ledgers/label-cache --model-version v1a2b3c4d5e6f

`rollback` points the table back at a tag (a backfill tags the state before it) or snapshot id:
every commit after it is undone, and the next nightly run relabels partitions it no longer finds.
`expire` drops snapshots older than the cutoff (never the newest, never a tagged one; backfill
tags older than the cutoff go first) and deletes the files only they referenced; time travel
then reaches back to the cutoff. `remove-orphans` deletes data files no snapshot lists (left by a
run that crashed before its commit) under the table's data/ and metadata/ folders, if older than
the cutoff: keep it above your longest run.
`compact-cache` rewrites a model version's label cache files into few large ones (the label job
does it by itself past --cache-max-files); a run reading the cache meanwhile only rescores texts.
Exit status 0 done, 1 the table or the object store cannot be used (named), 2 bad arguments.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone

from clf_core import cli
from clf_core.errors import ClfError
from clf_core.labeling.maintenance import (CompactCacheSettings, ExpireSettings, HistorySettings, OrphanSettings,
                                        RollbackSettings, parse_age)

COMMANDS = {
    "history": ("The table's snapshots, newest first: partition, run, model, rows, tags.", (HistorySettings,)),
    "rollback": ("Point the table back at a tag or snapshot id.", (RollbackSettings,)),
    "expire": ("Expire snapshots older than a cutoff and delete the files only they used.", (ExpireSettings,)),
    "remove-orphans": ("Delete files in the table's data/ and metadata/ folders that no snapshot lists.",
                       (OrphanSettings,)),
    "compact-cache": ("Rewrite a model version's label cache into few large files.", (CompactCacheSettings,)),
}


def build_parser():
    return cli.build_parser("python -m jobs.table", __doc__, subcommands=COMMANDS)


def main(argv: list[str] | None = None) -> int:
    from clf_core.settings import from_args

    return cli.main(build_parser(), argv,
                    lambda args: COMMAND_RUNS[args.command](from_args(COMMANDS[args.command][1][0], args)))


def compact_cache(settings: CompactCacheSettings) -> int:
    from clf_core.labeling.cache import LabelCache

    settings.validate()
    version = settings.model_version
    if settings.model:
        from clf_core.model.artifact import open_artifact
        from clf_core.model.registry import resolve_model

        version = open_artifact(resolve_model(settings.model).uri).model_version
    cache = LabelCache(settings.cache, version)
    if not cache.files():
        raise ClfError(f"--cache {settings.cache} has no files for model version {version!r}")
    done = cache.compact(settings.cache_file_mb * 1024 ** 2)
    print(f"label cache {cache.uri}: {done.files_before} file(s) -> {done.files_after}, {done.entries} entries, "
          f"{done.seconds:.1f}s")
    return 0


def opened(settings):
    from clf_core.labeling.table import LabeledTable

    settings.validate()
    labeled = LabeledTable(settings.catalog, settings.output_table)
    if labeled.table is None:
        raise ClfError(f"--output-table {settings.output_table}: no such table in catalog {settings.catalog!r}")
    return labeled


def history(settings: HistorySettings) -> int:
    from clf_core.labeling import maintenance as maintenance
    for row in maintenance.history(opened(settings), settings.limit):
        tags = f"  tags: {', '.join(row['tags'])}" if row["tags"] else ""
        print(f"{row['committed_at']}  {row['snapshot_id']:>20}  {row['operation']:<9} "
              f"{row['partition'] or '-':<14} +{row['added_records']}/-{row['deleted_records']} rows  "
              f"run {row['run_id'] or '-'}  model {row['model_version'] or '-'}{tags}", flush=True)
    return 0


def rollback(settings: RollbackSettings) -> int:
    from clf_core.labeling import maintenance as maintenance
    snapshot_id = maintenance.rollback(opened(settings), settings.to)
    print(f"{settings.output_table} now reads as of snapshot {snapshot_id} ({settings.to})")
    return 0


def expire(settings: ExpireSettings) -> int:
    from clf_core.labeling import maintenance as maintenance
    labeled = opened(settings)
    cutoff = datetime.now(timezone.utc) - parse_age("--older-than", settings.older_than)
    report = maintenance.expire_snapshots(labeled, cutoff, settings.retain_last)
    print(f"expired {report.snapshots_expired} snapshot(s), removed tags {report.tags_removed or 'none'}, "
          f"deleted {report.files_deleted} file(s)")
    return 0


def remove_orphans(settings: OrphanSettings) -> int:
    from clf_core.labeling import maintenance as maintenance
    labeled = opened(settings)
    cutoff = datetime.now(timezone.utc) - parse_age("--older-than", settings.older_than)
    orphans = maintenance.remove_orphan_files(labeled, cutoff, dry_run=settings.dry_run)
    print(f"{'would remove' if settings.dry_run else 'removed'} {len(orphans)} orphan file(s)")
    for uri in orphans:
        print(f"  {uri}")
    return 0


COMMAND_RUNS = {"history": history, "rollback": rollback, "expire": expire, "remove-orphans": remove_orphans,
                "compact-cache": compact_cache}


if __name__ == "__main__":
    sys.exit(main())
