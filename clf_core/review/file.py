"""The review file: a partition's rows that need a person, as a CSV for a spreadsheet, and the
same file read back once a reviewer has filled it in.

The review queue itself is a query on the table (`needs_review = true`); the file is the
accountants' copy of one partition's part of it. `export_review` streams it from the partition's
new data files with a filter, a record batch at a time, so the driver never holds the partition's
rows. Its columns: the input columns, `label` (the model's answer), an empty `corrected_label` for
the reviewer, `confidence`, `model_version`, `error`, `review_reason` and the partition key.

Cells that a spreadsheet would run as a formula (starting with = + - @, a tab or a carriage
return) get a leading apostrophe, the usual guard against CSV injection: a ledger line such as
`=HYPERLINK("http://...")` is shown, never executed. A cell that itself starts with an apostrophe
gets one too, so that `read_review_file` can strip exactly the guard and give every text back as
it is in the table (a correction must match the table's text to apply).

`read_review_file` takes the file as spreadsheets save it: UTF-8 with or without a byte-order
mark, UTF-16 ("Unicode text"), or Windows-1252 (Excel's "CSV" in western locales, a superset of
Latin-1); comma-, semicolon- (European locales) or tab-separated; CRLF or LF line ends. Anything
else is refused by name.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from clf_core import storage
from clf_core.errors import DataError

FORMULA_START = r"^[=+\-@\t\r']"
GUARDED = "=+-@\t\r'"
DROPPED = ("labeled_at", "needs_review", "label_source")  # the same for every row of the queue
CORRECTED = "corrected_label"   # the column a reviewer fills: empty = the model was right


def spreadsheet_safe(batch: pa.RecordBatch) -> pa.RecordBatch:
    columns = []
    for column in batch.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            risky = pc.fill_null(pc.match_substring_regex(column, FORMULA_START), False)
            quote, empty = pa.scalar("'", column.type), pa.scalar("", column.type)
            column = pc.if_else(risky, pc.binary_join_element_wise(quote, column, empty), column)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def unguard(cell: str) -> str:
    """A cell as it was before `spreadsheet_safe`: exactly one guard apostrophe stripped."""
    if len(cell) > 1 and cell[0] == "'" and cell[1] in GUARDED:
        return cell[1:]
    return cell


def _review_columns(names: list[str]) -> list[str]:
    """The export's column order: corrected_label right after label, where a reviewer looks."""
    kept = [n for n in names if n not in DROPPED]
    at = kept.index("label") + 1 if "label" in kept else len(kept)
    return kept[:at] + [CORRECTED] + kept[at:]


def export_review(io_, file_paths: list[str], target: str) -> int:
    """Write the needs_review rows of `file_paths` (read through the table's FileIO) to the CSV at
    `target` (local or s3://); return how many rows it holds. The header is written even when no
    row needs review, so an empty file means "nothing to check", not "not exported"."""
    fs, path = storage.filesystem(target)
    if not storage.is_remote(target):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    rows, writer = 0, None
    with fs.open(path, "wb") as out:
        for file_path in file_paths:
            with io_.new_input(file_path).open() as stream:
                parquet = pq.ParquetFile(stream)
                names = parquet.schema_arrow.names
                columns = _review_columns(names)
                for batch in parquet.iter_batches(batch_size=8192):
                    flagged = batch.filter(pc.fill_null(batch.column("needs_review"), False))
                    flagged = pa.RecordBatch.from_arrays(
                        [flagged.column(c) if c != CORRECTED else pa.nulls(flagged.num_rows, pa.string())
                         for c in columns], names=columns)
                    if writer is None:
                        writer = pacsv.CSVWriter(out, flagged.schema)
                    if flagged.num_rows:
                        writer.write_batch(spreadsheet_safe(flagged))
                        rows += flagged.num_rows
        if writer is not None:
            writer.close()
    return rows


# ---- reading a filled-in review file back --------------------------------------------------------

@dataclass
class ReviewFile:
    """A review file as read: its columns, its rows as {column: cell} (guards stripped, the cells
    otherwise as written: a text must match the table's exactly), the line each row starts on
    (1 = the header, as a spreadsheet numbers rows), and how it was decoded."""
    uri: str
    sha256: str
    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]
    encoding: str
    delimiter: str

    def describe(self) -> str:
        sep = {",": "comma", ";": "semicolon", "\t": "tab"}[self.delimiter]
        return f"{self.uri} ({len(self.rows)} rows, {self.encoding}, {sep}-separated)"


def decode(data: bytes, uri: str) -> tuple[str, str]:
    """(text, encoding name): UTF-8 (byte-order mark or not), UTF-16 with its mark, else
    Windows-1252; a file that is none of these is refused, naming the first bad byte."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8"), "UTF-8 with a byte-order mark"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16"), "UTF-16"
    try:
        return data.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError as utf8:
        try:
            return data.decode("cp1252"), "Windows-1252 (Latin-1), as a spreadsheet saves 'CSV'"
        except UnicodeDecodeError:
            raise DataError(f"{uri} is not text in UTF-8, UTF-16 or Windows-1252 (byte "
                            f"{data[utf8.start:utf8.start + 1]!r} at offset {utf8.start}). Save it from the spreadsheet "
                            f"as 'CSV UTF-8' and import that file.") from None


def read_review_file(uri: str, required: tuple[str, ...] = (CORRECTED,)) -> ReviewFile:
    """Read a review CSV as a spreadsheet saved it (see the module docstring). The delimiter is
    the one of , ; and tab that gives a header holding every `required` column."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"--file {uri} does not exist") from None
    except OSError as exc:
        raise DataError(f"--file {uri} cannot be read: {type(exc).__name__}: {exc}") from exc
    text, encoding = decode(data, uri)
    first = text.splitlines()[0] if text.strip() else ""
    if not first.strip():
        raise DataError(f"{uri} is empty: no header row. Export the review file again (jobs.label --review-export).")
    headers = {d: [h.strip() for h in next(csv.reader([first], delimiter=d))] for d in (",", ";", "\t")}
    delimiter = next((d for d, h in headers.items() if all(c in h for c in required)),
                     max(headers, key=lambda d: len(headers[d])))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = [unguard(h.strip()) for h in next(reader)]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{uri} has no {missing[0]!r} column; its columns are {columns}. A review file is the CSV "
                        f"jobs.label --review-export wrote, with the reviewer's answers in {CORRECTED!r} "
                        f"(empty where the model was right).")
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise DataError(f"{uri} has the column(s) {dupes} more than once; keep one of each")
    rows, lines = [], []
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{uri} line {line}: not valid CSV ({exc})") from exc
        if not any(c.strip() for c in cells):
            continue  # a blank line a spreadsheet left at the end
        if len(cells) > len(columns) and any(c.strip() for c in cells[len(columns):]):
            raise DataError(f"{uri} line {line} has {len(cells)} cells for {len(columns)} columns; a cell holding the "
                            f"separator {delimiter!r} must be quoted")
        rows.append({c: unguard(v) for c, v in zip(columns, cells + [""] * (len(columns) - len(cells)))})
        lines.append(line)
    return ReviewFile(uri, hashlib.sha256(data).hexdigest(), columns, rows, lines, encoding, delimiter)
