"""The write stage of a label run: labeled rows -> Parquet data files in the table's location,
written with pyiceberg's writer (field ids, column statistics) by Ray Data tasks. The files join
the table only when the driver commits their partition (clf_core.labeling.table).
"""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.compute as pc

from clf_core.catalog import IO_DEFAULTS
from clf_core.labeling.scoring import REVIEW_REASONS


def to_iceberg_arrow(schema: pa.Schema, known: frozenset | set = frozenset()) -> pa.Schema:
    """The Arrow schema as the table stores it: ns timestamps as us (Iceberg v2 has no ns; ledgers
    have no sub-microsecond times), dictionary columns as their values, no pandas metadata. A
    column of Arrow type null (null in every row of a file) fits any type: it is left out when
    the table knows the column already (`known`), else stored as string."""
    fields = []
    for f in schema.remove_metadata():
        t = f.type
        if pa.types.is_null(t):
            if f.name in known:
                continue
            t = pa.string()
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_timestamp(t) and t.unit == "ns":
            t = pa.timestamp("us", tz=t.tz)
        fields.append(pa.field(f.name, t, nullable=True))
    converted = pa.schema(fields)
    from pyiceberg.io.pyarrow import _ConvertToIcebergWithoutIDs, visit_pyarrow

    visit_pyarrow(converted, _ConvertToIcebergWithoutIDs())  # raises on a type Iceberg has no match for
    return converted


class WriteDataFiles:
    """Pass 2's last stage: a batch of labeled rows -> Parquet data files in the table's location,
    one or more per partition, written with pyiceberg's writer (field ids, column statistics).

    Returns one row per file (partition, path, rows, error rows, review rows and why, rows
    labeled by reviewers): all the driver receives. The files join the table only when the
    driver commits their partition."""

    COUNTS = ("errors", "review", *(f"review_{r}" for r in REVIEW_REASONS), "reviewed")
    RECORD = pa.schema([("partition", pa.string()), ("path", pa.string()), ("rows", pa.int64()),
                        *((c, pa.int64()) for c in COUNTS), ("expected_errors", pa.float64())])

    def __init__(self, metadata_json: str, io_properties: dict, partition_key: str):
        self.metadata_json = metadata_json
        self.io_properties = io_properties
        self.partition_key = partition_key
        self._meta = self._io = None

    def _open(self):
        if self._meta is None:
            from pyiceberg.io import load_file_io
            from pyiceberg.table.metadata import TableMetadataUtil

            self._meta = TableMetadataUtil.parse_raw(self.metadata_json)
            # This worker's own catalog settings may hold credentials the driver did not send.
            self._io = load_file_io({**IO_DEFAULTS, **self.io_properties}, self._meta.location)
        return self._meta, self._io

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pyiceberg.io.pyarrow import _dataframe_to_data_files, schema_to_pyarrow
        from pyiceberg.types import DateType

        meta, io = self._open()
        target = schema_to_pyarrow(meta.schema())
        for i, f in enumerate(batch.schema):  # a column null in every row read: the table's type
            if pa.types.is_null(f.type) and f.name in target.names:
                batch = batch.set_column(i, f.name, pa.nulls(batch.num_rows, target.field(f.name).type))
        key_is_date = isinstance(meta.schema().find_field(self.partition_key).field_type, DateType)
        keys = batch.column(self.partition_key)
        records = []
        for value in pc.unique(keys).to_pylist():
            rows = batch.filter(pc.equal(keys, value))
            column = pc.cast(rows.column(self.partition_key), pa.date32() if key_is_date else pa.string())
            rows = rows.set_column(rows.schema.get_field_index(self.partition_key), self.partition_key, column)
            rows = rows.cast(to_iceberg_arrow(rows.schema), safe=False)  # ns -> us drops only sub-us digits
            names = rows.column_names
            counts = {"errors": rows.num_rows - rows.column("error").null_count,
                      "review": pc.sum(rows.column("needs_review")).as_py() or 0,
                      "reviewed": (pc.sum(pc.equal(rows.column("label_source"), "review")).as_py() or 0)
                      if "label_source" in names else 0}
            reasons = ({d["values"]: d["counts"] for d in pc.value_counts(rows.column("review_reason")).to_pylist()}
                       if "review_reason" in names else {})
            counts.update({f"review_{r}": reasons.get(r, 0) for r in REVIEW_REASONS})
            # With calibrated confidences, 1 - confidence is a row's chance of being wrong: their
            # sum over the rows nobody will check is the number of errors expected among them.
            unchecked = pc.and_(pc.invert(pc.fill_null(rows.column("needs_review"), True)),
                                pc.is_valid(rows.column("confidence")))
            expected = pc.sum(pc.subtract(1.0, pc.filter(rows.column("confidence"), unchecked))).as_py() or 0.0
            files = list(_dataframe_to_data_files(table_metadata=meta, df=rows, io=io, write_uuid=uuid.uuid4()))
            for i, f in enumerate(files):  # counts go with the first file of a split partition
                records.append({"partition": f"{self.partition_key}={value}", "path": f.file_path,
                                "rows": f.record_count, **{c: n if i == 0 else 0 for c, n in counts.items()},
                                "expected_errors": expected if i == 0 else 0.0})
        return pa.Table.from_pylist(records, schema=self.RECORD)
