"""The review export: a partition's rows that need a person, as a CSV for a spreadsheet.

The review queue itself is a query on the table (`needs_review = true`); this file is the
accountants' copy of one partition's part of it. It is streamed from the partition's new data
files with a filter, a record batch at a time, so the driver never holds the partition's rows.

Cells that a spreadsheet would run as a formula (starting with = + - @, a tab or a carriage
return) get a leading apostrophe, the usual guard against CSV injection: a ledger line such as
`=HYPERLINK("http://...")` is shown, never executed.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from clf_core import storage

FORMULA_START = r"^[=+\-@\t\r]"
DROPPED = ("model_version", "labeled_at", "needs_review")  # the same for every row of a run


def spreadsheet_safe(batch: pa.RecordBatch) -> pa.RecordBatch:
    columns = []
    for column in batch.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            risky = pc.fill_null(pc.match_substring_regex(column, FORMULA_START), False)
            quote, empty = pa.scalar("'", column.type), pa.scalar("", column.type)
            column = pc.if_else(risky, pc.binary_join_element_wise(quote, column, empty), column)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def export_review(io, file_paths: list[str], target: str) -> int:
    """Write the needs_review rows of `file_paths` (read through the table's FileIO) to the CSV at
    `target` (local or s3://); return how many rows it holds. The header is written even when no
    row needs review, so an empty file means "nothing to check", not "not exported"."""
    fs, path = storage.filesystem(target)
    if not storage.is_remote(target):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    rows, writer = 0, None
    with fs.open(path, "wb") as out:
        for file_path in file_paths:
            with io.new_input(file_path).open() as stream:
                parquet = pq.ParquetFile(stream)
                columns = [n for n in parquet.schema_arrow.names if n not in DROPPED]
                for batch in parquet.iter_batches(batch_size=8192):
                    flagged = batch.filter(pc.fill_null(batch.column("needs_review"), False)).select(columns)
                    if writer is None:
                        writer = pacsv.CSVWriter(out, flagged.schema)
                    if flagged.num_rows:
                        writer.write_batch(spreadsheet_safe(flagged))
                        rows += flagged.num_rows
        if writer is not None:
            writer.close()
    return rows
