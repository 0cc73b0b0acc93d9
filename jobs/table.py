"""Look after the labeled table (history, rollback, snapshot expiry, orphan files) and the label cache.

Run as:
    python -m jobs.table history  --catalog ledgers --table ledgers.labeled_lines
    python -m jobs.table rollback --catalog ledgers --table ledgers.labeled_lines --to backfill-2024-01-01-2024-03-31-v1a2b3c
    python -m jobs.table expire   --catalog ledgers --table ledgers.labeled_lines --older-than 30d
    python -m jobs.table remove-orphans --catalog ledgers --table ledgers.labeled_lines --older-than 3d --dry-run
    python -m jobs.table compact-cache --cache s3://ledgers/label-cache --model-version v1a2b3c4d5e6f

`rollback` points the table back at a tag (a backfill tags the state before it) or snapshot id:
every commit after it is undone, and the next nightly run relabels partitions it no longer finds.
`expire` drops snapshots older than the cutoff (never the newest, never a tagged one; backfill
tags older than the cutoff go first) and deletes the files only they referenced; time travel
then reaches back to the cutoff. `remove-orphans` deletes data files no snapshot lists (left by a
run that crashed before its commit), if older than the cutoff: keep it above your longest run.
`compact-cache` rewrites a model version's label cache files into few large ones (the label job
does it by itself past --cache-max-files); a run reading the cache meanwhile only rescores texts.
Exit status 0 done, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime, timedelta, timezone

from clf_core.errors import ClfError, ConfigError

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_age(flag: str, value: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([smhd])", value or "")
    if not match:
        raise ConfigError(f"{flag} {value!r}: expected a number and a unit (s, m, h, d), e.g. 30d or 12h")
    return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.table", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)  # flags spelled in full, never guessed from a prefix
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--catalog", required=True, help="The pyiceberg catalog holding the table.")
        sub.add_argument("--table", required=True, help="The labeled table, NAMESPACE.TABLE.")
        return sub

    command("history", "The table's snapshots, newest first: partition, run, model, rows, tags.").add_argument(
        "--limit", type=int, default=30, help="How many snapshots to show (default: 30).")
    command("rollback", "Point the table back at a tag or snapshot id.").add_argument(
        "--to", required=True, help="A tag (e.g. the backfill-... tag a backfill made) or a snapshot id.")
    expire = command("expire", "Expire snapshots older than a cutoff and delete the files only they used.")
    expire.add_argument("--older-than", required=True, help="Age cutoff, e.g. 30d, 12h.")
    expire.add_argument("--retain-last", type=int, default=1, help="Always keep this many newest snapshots (default: 1).")
    orphans = command("remove-orphans", "Delete files in the table's location that no snapshot lists.")
    orphans.add_argument("--older-than", required=True, help="Only files older than this, e.g. 3d: more than your longest run.")
    orphans.add_argument("--dry-run", action="store_true", help="List them, delete nothing.")
    cache = commands.add_parser("compact-cache", help="Rewrite a model version's label cache into few large files.",
                                description="Rewrite a model version's label cache into few large files.")
    cache.add_argument("--cache", required=True, help="The label cache the jobs use (--cache of jobs.label).")
    cache.add_argument("--model-version", required=True, help="The model version whose entries to compact (v...).")
    cache.add_argument("--file-mb", type=int, default=256, help="Target size of a file, MB in memory (default: 256).")
    return parser


def main(argv: list[str] | None = None) -> int:
    from clf_core import table_maintenance as maintenance
    from clf_core.logs import setup_logging
    from clf_core.table import LabeledTable, TableError

    setup_logging()
    args = build_parser().parse_args(argv)
    if args.command == "compact-cache":
        from clf_core.label_cache import LabelCache

        if args.file_mb < 1:
            print(f"error: --file-mb {args.file_mb}: must be at least 1", file=sys.stderr)
            return 2
        cache = LabelCache(args.cache, args.model_version)
        if not cache.files():
            print(f"error: --cache {args.cache} has no files for model version {args.model_version!r}", file=sys.stderr)
            return 2
        done = cache.compact(args.file_mb * 1024 ** 2)
        print(f"label cache {cache.uri}: {done.files_before} file(s) -> {done.files_after}, {done.entries} entries, "
              f"{done.seconds:.1f}s")
        return 0
    try:
        labeled = LabeledTable(args.catalog, args.table)
        if labeled.table is None:
            raise ClfError(f"--table {args.table}: no such table in catalog {args.catalog!r}")
        now = datetime.now(timezone.utc)
        if args.command == "history":
            for row in maintenance.history(labeled, args.limit):
                tags = f"  tags: {', '.join(row['tags'])}" if row["tags"] else ""
                print(f"{row['committed_at']}  {row['snapshot_id']:>20}  {row['operation']:<9} "
                      f"{row['partition'] or '-':<14} +{row['added_records']}/-{row['deleted_records']} rows  "
                      f"run {row['run_id'] or '-'}  model {row['model_version'] or '-'}{tags}")
        elif args.command == "rollback":
            snapshot_id = maintenance.rollback(labeled, args.to)
            print(f"{args.table} now reads as of snapshot {snapshot_id} ({args.to})")
        elif args.command == "expire":
            if args.retain_last < 1:
                raise ConfigError(f"--retain-last {args.retain_last}: must be at least 1 (the current snapshot)")
            report = maintenance.expire_snapshots(labeled, now - parse_age("--older-than", args.older_than),
                                                  args.retain_last)
            print(f"expired {report.snapshots_expired} snapshot(s), removed tags {report.tags_removed or 'none'}, "
                  f"deleted {report.files_deleted} file(s)")
        else:
            orphans = maintenance.remove_orphan_files(labeled, now - parse_age("--older-than", args.older_than),
                                                      dry_run=args.dry_run)
            print(f"{'would remove' if args.dry_run else 'removed'} {len(orphans)} orphan file(s)")
            for uri in orphans:
                print(f"  {uri}")
    except TableError as exc:  # the table exists but cannot be read: a run-time failure
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ClfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
