"""The labeled output: an Apache Iceberg table that pandas, Spark, Trino, Athena and DuckDB read.

(Why one module of ~470 lines: LabeledTable is the one object that knows the table's layout and
keeps its invariants, from the schema and properties to the commit protocol; its reads of the
manifests, which planning trusts, sit beside the writes that make them true.)

    <input columns...>  label  confidence  model_version  labeled_at  error  needs_review  dt
                                                                      partitioned by identity(dt)

The table lives in a pyiceberg catalog configured the pyiceberg way (`.pyiceberg.yaml` or
`PYICEBERG_CATALOG__<NAME>__*` variables): a SQL catalog on SQLite in the demo and the tests, AWS
Glue (then Athena reads it) or a REST catalog in production. `dt` is an Iceberg `date` when the
partition values are dates, so engines prune by date; input columns keep their types as far as
Iceberg has them (int8/int16 become int, large_string string, ns timestamps us).

How a partition is labeled exactly once (jobs.label / jobs.backfill, clf_core.labeling.pipeline):

1. Ray Data tasks write Parquet data files into the table's location (clf_core.labeling.write). They
   are not part of the table until a snapshot lists them; a crashed run leaves only unlisted
   files, which no reader sees (and `remove_orphan_files` deletes).
2. The driver reads each new file's footer (no rows) and commits the partition only when those
   footers add up to the partition's input rows: one Iceberg transaction replaces every data file
   of the partition with the new ones (`commit_partition`). Readers see the old rows or the new
   ones, never both or half.
3. Each such snapshot's summary is the partition's record (clf_core.labeling.records): run id,
   model version, the input files (path, size, ETag or mtime), rows and the reviewers' answers it
   holds. Planning reads the records of the current snapshot's ancestry, so a rollback also rolls
   the records back.
4. Two runs on one partition: the commit re-reads the partition's record first; if another run
   committed it since this run planned, the partition is left to that run unless this run would
   still relabel it (e.g. a backfill with another model). Iceberg's own validation catches a
   commit that lands in between (`ValidationException`), and the check runs again.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date

import pyarrow as pa

from clf_core.catalog import metadata_locations, open_catalog, parse_identifier, public_io_properties
from clf_core.errors import ClfError, TableError
from clf_core.labeling.records import PREFIX, PartitionCommit, commits_as_of
from clf_core.labeling.scoring import FIRST_OUTPUT_COLUMNS, OUTPUT_SCHEMA
from clf_core.labeling.write import to_iceberg_arrow

log = logging.getLogger(__name__)

# Table settings made at creation. Old metadata files go with the commits that replaced them
# (every partition commit writes one), Parquet is zstd like pyiceberg's default.
TABLE_PROPERTIES = {
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "50",
    # Concurrent commits to *other* partitions are rebased and retried by pyiceberg itself.
    "commit.retry.num-retries": "8",
}

MODEL_LABELS = PREFIX + "model-labels"         # {model version: its labels}, for checking reviewers' answers
CORRECTIONS_TABLE = PREFIX + "corrections-table"     # the corrections table its runs apply
CORRECTIONS_APPLIED = PREFIX + "corrections-applied"  # see LabeledTable.corrections_watermark


class CommitError(ClfError):
    """A partition's new files do not add up to its input; nothing was committed."""


# ---- the catalog -------------------------------------------------------------------------------


# ---- records: what each partition commit recorded ---------------------------------------------


# ---- the table ---------------------------------------------------------------------------------

class LabeledTable:
    """The output table of jobs.label / jobs.backfill (it may not exist yet)."""

    def __init__(self, catalog_name: str, identifier: str, partition_key: str = "dt"):
        from pyiceberg.exceptions import NoSuchTableError

        self.catalog_name = catalog_name
        self.identifier = identifier
        self.namespace, self.name = parse_identifier(identifier)
        self.partition_key = partition_key
        self.catalog = open_catalog(catalog_name)
        try:
            self.table = self.catalog.load_table(identifier)
        except NoSuchTableError:
            self.table = None
        except Exception as exc:  # unreadable metadata, an unreachable catalog or store: named, no traceback
            from clf_core.storage import StorageAccessError, access_problem

            if access_problem(exc):
                raise StorageAccessError(f"loading table {identifier} of catalog {catalog_name!r}: "
                                         f"{access_problem(exc)}") from exc
            current, previous = metadata_locations(self.catalog, identifier)
            where = f"its metadata file {current}" if current else "its metadata"
            fix = (f"Restore that file (object versioning, a backup), or point the catalog back at the previous "
                   f"one, {previous}." if previous else "Check the catalog and the object store it points at.")
            raise TableError(f"cannot read table {identifier} of catalog {catalog_name!r}: {where} could not be "
                             f"loaded ({type(exc).__name__}: {str(exc).strip()[:300]}). Nothing was labeled. "
                             f"{fix}") from exc
        if self.table is not None:
            self._check_layout()

    # -- shape --

    def _check_layout(self) -> None:
        schema, spec = self.table.schema(), self.table.spec()
        names = {f.name for f in schema.fields}
        missing = [c for c in FIRST_OUTPUT_COLUMNS + (self.partition_key,) if c not in names]
        sources = [schema.find_column_name(f.source_id) for f in spec.fields]
        if missing or sources != [self.partition_key]:
            raise ClfError(f"table {self.identifier} was not made by this labeling job: it lacks {missing} or is "
                           f"not partitioned by {self.partition_key} alone (partitioned by {sources}). Pick another "
                           f"--output-table, or --partition-key to match it.")

    @property
    def key_is_date(self) -> bool | None:
        """Whether the table stores the partition key as an Iceberg date (None: no table yet)."""
        if self.table is None:
            return None
        from pyiceberg.types import DateType

        return isinstance(self.table.schema().find_field(self.partition_key).field_type, DateType)

    def check_input_schema(self, schema: pa.Schema) -> str | None:
        """Why input of this Arrow schema cannot go into the table (None: it can, maybe by adding
        columns or widening a type, e.g. int -> long)."""
        from pyiceberg.table import Transaction
        from pyiceberg.table.update.schema import UpdateSchema

        known = frozenset(f.name for f in self.table.schema().fields) if self.table is not None else frozenset()
        try:
            arrow = to_iceberg_arrow(schema, known)
        except (TypeError, ValueError, pa.ArrowException) as exc:
            return f"has a column type Iceberg cannot store: {exc}"
        if self.table is None:
            return None
        try:
            update = UpdateSchema(transaction=Transaction(self.table))
            update.union_by_name(arrow)
            update._apply()
        except Exception as exc:  # pyiceberg's ValidationError names the column and both types
            return f"does not fit table {self.identifier}: {exc}"
        return None

    def ensure(self, input_schema: pa.Schema, key_is_date: bool) -> None:
        """Create the table on first use; later, add new input columns / widen types."""
        from pyiceberg.exceptions import CommitFailedException

        if self.table is None:
            arrow = to_iceberg_arrow(input_schema)
            full = pa.schema(list(arrow) + list(OUTPUT_SCHEMA) +
                             [pa.field(self.partition_key, pa.date32() if key_is_date else pa.string())])
            # Two runs may both find no table and create it at once. The loser's error depends on
            # the catalog (pyiceberg's TableAlreadyExistsError, or the SQL catalog's IntegrityError
            # from the namespace or table row): whatever it is, use the table if it now exists.
            try:
                self.catalog.create_namespace_if_not_exists(self.namespace)
                tx = self.catalog.create_table_transaction(self.identifier, schema=full, properties=TABLE_PROPERTIES)
                with tx.update_spec() as spec:
                    spec.add_identity(self.partition_key)
                tx.commit_transaction()
                log.info("created table %s (partitioned by %s, %s)", self.identifier, self.partition_key,
                         "date" if key_is_date else "string")
            except Exception as exc:
                if not self.catalog.table_exists(self.identifier):
                    raise
                log.info("table %s was created by a concurrent run (%s): using it", self.identifier, type(exc).__name__)
            self.table = self.catalog.load_table(self.identifier)
            self._check_layout()
        for attempt in range(4):  # another run may widen the schema at the same moment: apply ours on top
            self.table.refresh()
            known = frozenset(f.name for f in self.table.schema().fields)
            # the input's new columns, and labeling columns added since an older table was made
            arrow = pa.schema(list(to_iceberg_arrow(input_schema, known)) +
                              [f for f in OUTPUT_SCHEMA if f.name not in known])
            before = self.table.schema()
            try:
                with self.table.update_schema() as update:
                    update.union_by_name(arrow)
                break
            except CommitFailedException:
                if attempt == 3:
                    raise
        if self.table.schema() != before:
            log.info("table %s: schema evolved to hold the input's columns", self.identifier)

    def tag_current(self, tag: str) -> None:
        """Name the current snapshot `tag` (kept until removed: expiry never takes a tagged
        snapshot), unless the tag exists: a resumed backfill keeps the state before its first try."""
        self.table.refresh()
        head = self.table.metadata.current_snapshot_id
        if head is None or tag in self.table.metadata.refs:
            return
        self.table.manage_snapshots().create_tag(head, tag).commit()
        log.info("tagged snapshot %s of %s as %s (the labels before this run)", head, self.identifier, tag)

    # -- what the table remembers about its runs (table properties: they never expire) --

    def _json_property(self, key: str, default):
        try:
            return json.loads(self.table.metadata.properties.get(key, "")) if self.table is not None else default
        except ValueError:
            return default

    def model_labels(self) -> dict[str, list[str]]:
        """{model version: its labels} of every model that labeled this table (since this was kept)."""
        return self._json_property(MODEL_LABELS, {})

    @property
    def corrections_identifier(self) -> str:
        """The corrections table this table's runs apply (empty: none yet)."""
        return self.table.metadata.properties.get(CORRECTIONS_TABLE, "") if self.table is not None else ""

    def remember(self, model_version: str, labels: list[str], corrections: str = "") -> None:
        """Record the model's labels (an import of reviewers' answers checks them) and the
        corrections table this run applies (a later run without --corrections applies it too, so
        a reviewed label is never lost to a run that forgot the flag). One commit, if anything is new."""
        from pyiceberg.exceptions import CommitFailedException

        for attempt in range(4):
            self.table.refresh()
            known = self.model_labels()
            updates = {}
            if known.get(model_version) != list(labels):
                updates[MODEL_LABELS] = json.dumps({**known, model_version: list(labels)}, sort_keys=True)
            if corrections and self.corrections_identifier != corrections:
                updates[CORRECTIONS_TABLE] = corrections
            if not updates:
                return
            try:
                self.table.transaction().set_properties(updates).commit_transaction()
                return
            except CommitFailedException:
                if attempt == 3:
                    raise

    def corrections_watermark(self) -> dict:
        """{"table", "snapshot", "checked", "as-of"}: a run searched every partition whose record
        is in the ancestry of table snapshot "checked" and brought each up to the answers of
        corrections "table" as of its snapshot "snapshot"; its own commits end at table snapshot
        "as-of". While "as-of" is in the table's ancestry (no rollback undid those commits), later
        runs need not search those partitions again: a quiet night reads nothing. Empty: none."""
        return self._json_property(CORRECTIONS_APPLIED, {})

    def covered_by_watermark(self, corrections: str) -> tuple[set[int], int | None]:
        """(snapshot ids whose records the watermark covers, the corrections snapshot it vouches for)."""
        mark = self.corrections_watermark()
        ancestry = self.ancestry()
        if mark.get("table") != corrections or mark.get("as-of") not in ancestry or mark.get("checked") not in ancestry:
            return set(), None
        return set(self.ancestry(mark["checked"])), mark.get("snapshot")

    def set_corrections_watermark(self, corrections: str, corrections_snapshot: int | None, checked: int | None) -> None:
        self.table.refresh()
        as_of = self.table.metadata.current_snapshot_id
        if checked is None or as_of is None:
            return
        mark = self.corrections_watermark()
        if (mark.get("table"), mark.get("snapshot")) == (corrections, corrections_snapshot) and mark.get("as-of") == as_of:
            return   # nothing was committed since it was set: it says all there is to say
        value = {"table": corrections, "snapshot": corrections_snapshot, "checked": checked, "as-of": as_of}
        if self.corrections_watermark() != value:
            self.table.transaction().set_properties({CORRECTIONS_APPLIED: json.dumps(value)}).commit_transaction()

    def ancestry(self, snapshot_id: int | None = None) -> list[int]:
        """Snapshot ids from `snapshot_id` (default: the current one) back to the first."""
        meta = self.table.metadata
        snapshot = meta.snapshot_by_id(snapshot_id if snapshot_id is not None else meta.current_snapshot_id or -1)
        found = []
        while snapshot is not None:
            found.append(snapshot.snapshot_id)
            snapshot = meta.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id else None
        return found

    def partition_files(self, snapshot_id: int | None = None) -> dict[str, "PartitionFiles"]:
        """Per partition: the rows and data files the table holds as of a snapshot (default: the
        current one), from its manifests alone (no data file is read)."""
        if self.table is None or (snapshot_id or self.table.metadata.current_snapshot_id) is None:
            return {}
        found: dict[str, PartitionFiles] = {}
        for task in self.table.scan(snapshot_id=snapshot_id).plan_files():
            value = task.file.partition[0]
            if self.key_is_date and isinstance(value, int):
                value = date.fromordinal(date(1970, 1, 1).toordinal() + value).isoformat()
            entry = found.setdefault(f"{self.partition_key}={value}", PartitionFiles())
            entry.rows += task.file.record_count
            entry.files.append(task.file.file_path)
            entry.delete_files += len(task.delete_files)
        return found

    def rows_answered(self, answers, partitions: list[str], text_column: str) -> dict[str, int]:
        """Per partition of `partitions`: how many of its rows hold a text (and scope) that
        `answers` (clf_core.review.corrections.Answers) answer. Reads only the partition, text and scope
        columns of those partitions' files."""
        from pyiceberg.expressions import And, In

        names = {f.name for f in self.table.schema().fields}
        if not partitions or not len(answers) or text_column not in names:
            return {}
        scope_columns = [c for c in answers.scoped if c in names]
        values = {n.split("=", 1)[1] for n in partitions}
        literals = {date.fromisoformat(v) for v in values} if self.key_is_date else values
        scan = self.table.scan(row_filter=And(In(self.partition_key, literals), In(text_column, answers.texts())),
                               selected_fields=(self.partition_key, text_column, *scope_columns))
        found: dict[str, int] = {}
        for batch in scan.to_arrow_batch_reader():
            keys, texts = batch.column(self.partition_key).to_pylist(), batch.column(text_column).to_pylist()
            scopes = {c: batch.column(c).to_pylist() for c in scope_columns}
            for i, (key, text) in enumerate(zip(keys, texts)):
                if answers.label_for(text, {c: v[i] for c, v in scopes.items()}) is not None:
                    name = f"{self.partition_key}={key.isoformat() if hasattr(key, 'isoformat') else key}"
                    found[name] = found.get(name, 0) + 1
        return found

    def review_counts(self) -> dict[str, dict[str, int]]:
        """Per model version: rows, flagged rows, flagged rows per review_reason, rows labeled by
        reviewers (`reviewed`). Reads four small columns, a batch at a time."""
        names = {f.name for f in self.table.schema().fields}
        wanted = [c for c in ("model_version", "needs_review", "review_reason", "label_source") if c in names]
        counts: dict[str, dict[str, int]] = {}
        for batch in self.table.scan(selected_fields=tuple(wanted)).to_arrow_batch_reader():
            table = pa.Table.from_batches([batch])
            for column in ("review_reason", "label_source"):
                if column not in table.column_names:
                    table = table.append_column(column, pa.nulls(table.num_rows, pa.string()))
            grouped = table.group_by(["model_version", "needs_review", "review_reason", "label_source"],
                                     use_threads=False).aggregate([([], "count_all")])
            for row in grouped.to_pylist():
                c = counts.setdefault(row["model_version"] or "", {})
                n = row["count_all"]
                c["rows"] = c.get("rows", 0) + n
                if row["needs_review"]:
                    c["flagged"] = c.get("flagged", 0) + n
                    if row["review_reason"]:
                        c[row["review_reason"]] = c.get(row["review_reason"], 0) + n
                if row["label_source"] == "review":
                    c["reviewed"] = c.get("reviewed", 0) + n
        return counts

    # -- records --

    def commits(self) -> dict[str, PartitionCommit]:
        """partition -> its latest commit, as of the current snapshot."""
        if self.table is None:
            return {}
        self.table.refresh()
        return commits_as_of(self.table, self.table.metadata.current_snapshot_id)

    # -- for the workers --

    def writer_spec(self) -> dict:
        """What a `WriteDataFiles` task needs: the table's schema, spec and location (metadata
        without history, as JSON) and the catalog's I/O settings minus anything secret (workers
        take credentials from their own environment, like every other storage call)."""
        self.table.refresh()
        meta = self.table.metadata.model_copy(update={
            "snapshots": [], "snapshot_log": [], "metadata_log": [], "refs": {}, "current_snapshot_id": None,
            "properties": {k: v for k, v in self.table.metadata.properties.items() if not k.startswith(PREFIX)}})
        return {"metadata_json": meta.model_dump_json(), "io_properties": public_io_properties(self.table.io.properties),
                "partition_key": self.partition_key}

    # -- the commit --

    def commit_partition(self, partition: str, value: str, file_paths: list[str], expected_rows: int,
                         record: PartitionCommit, planned_on: PartitionCommit | None, still_mine,
                         attempts: int = 6) -> tuple[str, PartitionCommit | None]:
        """Replace `partition`'s rows with the files at `file_paths` in one snapshot.

        Returns ("committed", the new record) or ("left", the other run's record) when another
        run committed the partition after this run planned it and `still_mine(their record)` is
        False. Raises CommitError when the files do not add up to `expected_rows`."""
        from pyiceberg.exceptions import CommitFailedException, ValidationException
        from pyiceberg.expressions import EqualTo

        data_files = self.data_files(file_paths, partition, value)
        rows = sum(f.record_count for f in data_files)
        if rows != expected_rows:
            self._discard(file_paths)
            raise CommitError(f"{partition}: the written files hold {rows} rows for {expected_rows} input rows; "
                              f"not committed")
        literal = date.fromisoformat(value) if self.key_is_date else value
        commit_id = uuid.uuid4().hex
        props = {**record.summary(), PREFIX + "commit-id": commit_id}
        last_error = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(0.2 * 2 ** attempt, 5.0))
            self.table.refresh()
            if self._landed(commit_id) is not None:  # an earlier attempt's answer was lost, not the commit
                break
            current = commits_as_of(self.table, self.table.metadata.current_snapshot_id).get(partition)
            moved = (current.snapshot_id if current else None) != (planned_on.snapshot_id if planned_on else None)
            if moved and current is not None and not still_mine(current):
                self._discard(file_paths)  # never to be listed by a snapshot: no orphans left behind
                return "left", current
            tx = self.table.transaction()
            existing = [task.file for task in self.table.scan(row_filter=EqualTo(self.partition_key, literal)).plan_files()]
            try:
                with tx.update_snapshot(snapshot_properties=props).overwrite() as overwrite:
                    overwrite.delete_by_predicate(EqualTo(self.partition_key, literal))  # conflicts: this partition only
                    for old in existing:
                        overwrite.delete_data_file(old)
                    for new in data_files:
                        overwrite.append_data_file(new)
                tx.commit_transaction()
                break
            except (ValidationException, CommitFailedException) as exc:  # another run committed this partition
                last_error = exc
                log.info("%s: a concurrent commit changed it (%s); checking again", partition, exc)
            except OSError as exc:  # storage or catalog unreachable past their retries: try again, then fail
                last_error = exc
                log.warning("%s: commit attempt %d failed: %s: %s", partition, attempt + 1, type(exc).__name__, exc)
        else:
            raise CommitError(f"{partition}: not committed after {attempts} attempts: "
                              f"{type(last_error).__name__}: {last_error}")
        snapshot = self._landed(commit_id)
        return "committed", PartitionCommit.from_summary(snapshot.summary.additional_properties,
                                                         snapshot.snapshot_id, snapshot.timestamp_ms)

    def _discard(self, file_paths: list[str]) -> None:
        for path in file_paths:
            try:
                self.table.io.delete(path)
            except Exception as exc:  # an orphan is harmless (no snapshot lists it); remove-orphans gets it
                log.warning("could not delete unused data file %s: %s", path, exc)

    def _landed(self, commit_id: str):
        for snapshot in reversed(self.table.metadata.snapshots):
            if snapshot.summary and snapshot.summary.additional_properties.get(PREFIX + "commit-id") == commit_id:
                return snapshot
        return None

    def data_files(self, file_paths: list[str], partition: str, value: str) -> list:
        """The DataFile entries of new files, from their footers (row counts and column stats):
        the driver checks what is really stored, not what a worker reported."""
        from pyiceberg.io.pyarrow import parquet_file_to_data_file

        meta, io = self.table.metadata, self.table.io

        def one(path: str):
            return parquet_file_to_data_file(io, meta, path)

        with ThreadPoolExecutor(max_workers=min(16, max(1, len(file_paths)))) as pool:
            files = list(pool.map(one, file_paths))
        expected = date.fromisoformat(value) if self.key_is_date else value
        for f, path in zip(files, file_paths):
            got = f.partition[0]
            got = date.fromordinal(date(1970, 1, 1).toordinal() + got) if self.key_is_date and isinstance(got, int) else got
            if got != expected:
                raise CommitError(f"{partition}: {path} holds rows of {self.partition_key}={got}; not committed")
        return files


@dataclass
class PartitionFiles:
    rows: int = 0
    files: list[str] = field(default_factory=list)
    delete_files: int = 0          # row-level deletes another engine wrote (merge-on-read)


# ---- the write stage (Ray Data task; plain Python in tests) ------------------------------------
