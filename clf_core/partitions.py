"""Hive-partitioned ledgers in, labeled partitions out, each committed exactly once.

Input:   <input>/dt=YYYY-MM-DD/*.parquet            any schema holding the text column
Output:  <output>/dt=YYYY-MM-DD/_SUCCESS            the commit: JSON manifest (files, row counts)
         <output>/dt=YYYY-MM-DD/_attempts/<run_id>/part-<uuid>.parquet    data files

The commit protocol, for object stores with no atomic rename:
1. Data files are written under a per-run attempt prefix, each with a fresh name, so a retried
   or crashed writer can only add files, never change one a manifest lists.
2. The writer reports (partition, file, rows) for every file it finished; the driver counts.
3. When the rows reported for a partition equal its input rows (from the input Parquet
   footers), the driver re-reads the footers of exactly those files and, if they still add up,
   PUTs `_SUCCESS`. A single-object PUT is atomic on S3: readers see the old manifest or the
   new one, never half of one.
4. Readers trust only files a committed manifest lists (`committed_files`, `read_committed`).
   Attempt files live under `_`-prefixed folders, which pyarrow, Spark and Ray skip when
   reading a directory, so even a naive reader never sees uncommitted or orphan rows.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from clf_core import storage
from clf_core.errors import ClfError

log = logging.getLogger(__name__)

MANIFEST = "_SUCCESS"
ATTEMPTS = "_attempts"
FORMAT = "clf-labeled-partition/1"


class CommitError(ClfError):
    """A partition's output does not add up to its input; nothing was committed."""


@dataclass
class Partition:
    name: str                                   # "dt=2024-01-31": the folder, in and out
    value: str                                  # "2024-01-31"
    files: list[str] = field(default_factory=list)  # input files, full URIs
    rows: int = 0                               # input rows, from the Parquet footers
    problem: str | None = None                  # why it cannot be labeled (names the file)
    schemas: dict[str, pa.Schema] = field(default_factory=dict, repr=False)  # input file -> its Arrow schema


def _uri(base: str, path: str) -> str:
    """Full URI of a path an fsspec filesystem returned (it drops the scheme)."""
    if storage.is_remote(base):
        return f"{base.split('://', 1)[0]}://{path}"
    return path


def discover(input_uri: str, key: str = "dt") -> list[Partition]:
    """The `<key>=<value>` folders directly under input_uri, sorted by value, with their files."""
    fs, root = storage.filesystem(input_uri)
    if not fs.isdir(root):
        raise ClfError(f"--input {input_uri} is not a folder or prefix (or does not exist). Point it at the "
                       f"parent of the {key}=YYYY-MM-DD/ folders, and check the bucket and AWS credentials.")
    pattern = re.compile(rf"^{re.escape(key)}=(.+)$")
    partitions = []
    for entry in fs.ls(root, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        match = pattern.match(name)
        if entry["type"] != "directory" or not match:
            if not name.startswith(("_", ".")):
                log.warning("ignoring %s: not a %s=... partition folder", name, key)
            continue
        files = sorted(_uri(input_uri, p) for p in fs.find(entry["name"])
                       if p.endswith(".parquet") and not any(s.startswith(("_", ".")) for s in p[len(entry["name"]):].split("/")))
        partitions.append(Partition(name, match.group(1), files))
    return sorted(partitions, key=lambda p: p.value)


def merge_schemas(merged: pa.Schema | None, schema: pa.Schema) -> pa.Schema:
    """The schema Ray Data reads files of these two schemas as (one dataset: a column missing
    from a file is null there; types are promoted permissively, e.g. int32 -> int64). Raises
    pyarrow.ArrowTypeError / ArrowInvalid where no type fits both, e.g. string vs int64."""
    if merged is None:
        return schema
    return pa.unify_schemas([merged, schema], promote_options="permissive")


def schema_conflict(merged: pa.Schema | None, schema: pa.Schema) -> str | None:
    """Why files of `schema` cannot be read in one dataset with files of `merged` (None: they can)."""
    try:
        merge_schemas(merged, schema)
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        return str(exc).strip().splitlines()[-1]
    return None


def inspect(partition: Partition, text_column: str, reserved: tuple[str, ...]) -> Partition:
    """Read each file's footer (metadata only): row counts, and the schema checks that would
    otherwise fail mid-run. A problem names the file and the fix.

    Files may differ in columns (a missing column reads as null) but not in a column's type:
    Ray Data merges the schemas of all the files it reads and fails the whole run, naming no
    file, on e.g. `texts` string in one file and int64 in another."""
    if not partition.files:
        partition.problem = f"{partition.name} holds no .parquet files"
        return partition
    rows = 0
    merged = None
    for uri in partition.files:
        fs, path = storage.filesystem(uri)
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema().remove_metadata()
                names = schema.names
        except Exception as exc:  # truncated, not Parquet, unreadable: the partition fails, others go on
            partition.problem = f"cannot read {uri}: {type(exc).__name__}: {exc}"
            return partition
        if text_column not in names:
            partition.problem = (f"{uri} has no text column {text_column!r}; its columns are {names}. "
                                 f"Pass the right name with --text-column.")
            return partition
        clash = [c for c in reserved if c in names]
        if clash:
            partition.problem = (f"{uri} already has column(s) {clash}, which labeling adds; refusing to "
                                 f"overwrite them. Rename or drop them in the input.")
            return partition
        conflict = schema_conflict(merged, schema)
        if conflict:
            partition.problem = (f"{uri} does not match the other files of {partition.name} "
                                 f"(first: {partition.files[0]}): {conflict}. Every file of a partition "
                                 f"must give each column the same type; rewrite this file with them.")
            return partition
        merged = merge_schemas(merged, schema)
        partition.schemas[uri] = schema
        rows += meta.num_rows
    partition.rows = rows
    return partition


# ---- output side ------------------------------------------------------------------------------

def read_manifest(output_uri: str, partition_name: str) -> dict | None:
    uri = storage.join(output_uri, partition_name, MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_text(uri))


class StageWriter:
    """Ray Data write stage: each batch's rows go to fresh files under this run's attempt prefix.

    Returns one record per file written (partition, path relative to the output, rows, error
    rows): the only thing the driver receives. Rows carry their partition value in the `key`
    column (Ray's hive partitioning adds it); it goes back into the folder name, as in the input.
    """

    def __init__(self, output_uri: str, run_id: str, key: str = "dt"):
        self.output_uri = output_uri
        self.run_id = run_id
        self.key = key

    def __call__(self, batch: pa.Table) -> pa.Table:
        fs, root = storage.filesystem(self.output_uri)
        records = []
        keys = batch.column(self.key)
        for value in pa.compute.unique(keys).to_pylist():
            name = f"{self.key}={value}"
            part = batch.filter(pa.compute.equal(keys, value)).drop_columns([self.key])
            rel = posixpath.join(name, ATTEMPTS, self.run_id, f"part-{uuid.uuid4().hex}.parquet")
            target = posixpath.join(root, rel)
            if not storage.is_remote(self.output_uri):
                fs.makedirs(posixpath.dirname(target), exist_ok=True)
            with fs.open(target, "wb") as f:
                pq.write_table(part, f)
            errors = part.num_rows - part.column("error").null_count
            records.append({"partition": name, "path": rel, "rows": part.num_rows, "errors": errors})
        return pa.Table.from_pylist(records, schema=pa.schema([("partition", pa.string()), ("path", pa.string()),
                                                                ("rows", pa.int64()), ("errors", pa.int64())]))


def commit(output_uri: str, partition: Partition, written: list[dict], info: dict) -> dict:
    """Check the written files against the input, then PUT the manifest. Returns the manifest."""
    fs, root = storage.filesystem(output_uri)
    files, total = [], 0
    for record in written:
        with fs.open(posixpath.join(root, record["path"]), "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        files.append({"path": record["path"], "rows": rows})
        total += rows
    if total != partition.rows:
        raise CommitError(f"{partition.name}: wrote {total} rows for {partition.rows} input rows; not committed")
    previous = read_manifest(output_uri, partition.name)
    manifest = {
        "format": FORMAT,
        "partition": partition.name,
        "input_files": partition.files,
        "input_rows": partition.rows,
        "rows": total,
        "error_rows": int(sum(r.get("errors", 0) for r in written)),
        "files": sorted(files, key=lambda f: f["path"]),
        "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **info,
    }
    storage.write_bytes(storage.join(output_uri, partition.name, MANIFEST),
                        json.dumps(manifest, indent=2, sort_keys=True).encode())
    _remove_stale_attempts(output_uri, partition.name, keep={info.get("run_id"), (previous or {}).get("run_id")})
    return manifest


REVIEW = "_review.csv"
REVIEW_COLUMNS = ("label", "confidence", "error")


def write_review_file(output_uri: str, partition_name: str, written: list[dict]) -> int:
    """<partition>/_review.csv: the rows flagged needs_review (every input column plus label,
    confidence and error), for the accountants who check doubtful lines instead of all of them."""
    fs, root = storage.filesystem(output_uri)
    frames = []
    for record in written:
        with fs.open(posixpath.join(root, record["path"]), "rb") as f:
            table = pq.read_table(f, filters=[("needs_review", "=", True)])
        frames.append(table.to_pandas())
    flagged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(flagged):
        flagged = flagged.drop(columns=[c for c in ("model_version", "labeled_at", "needs_review") if c in flagged])
    storage.write_bytes(storage.join(output_uri, partition_name, REVIEW), flagged.to_csv(index=False).encode())
    return len(flagged)


def _remove_stale_attempts(output_uri: str, partition_name: str, keep: set) -> None:
    """Delete attempt folders that no manifest lists (crashed or superseded runs). The previous
    manifest's files are kept one generation, so a reader that just read it can still finish."""
    fs, root = storage.filesystem(output_uri)
    attempts = posixpath.join(root, partition_name, ATTEMPTS)
    try:
        entries = fs.ls(attempts, detail=False)
    except FileNotFoundError:
        return
    for entry in entries:
        if posixpath.basename(entry.rstrip("/")) not in keep:
            fs.rm(entry, recursive=True)


def committed_files(output_uri: str) -> dict[str, list[str]]:
    """partition name -> full URIs of its committed data files (what readers should read)."""
    fs, root = storage.filesystem(output_uri)
    out = {}
    if not fs.isdir(root):
        return out
    for entry in sorted(fs.ls(root, detail=False)):
        name = posixpath.basename(entry.rstrip("/"))
        manifest = read_manifest(output_uri, name) if "=" in name else None
        if manifest:
            out[name] = [storage.join(output_uri, f["path"]) for f in manifest["files"]]
    return out


def read_committed(output_uri: str) -> pd.DataFrame:
    """Every committed row, with its partition value as a column (for checks and small outputs;
    big readers pass `committed_files` to ray.data.read_parquet)."""
    frames = []
    for name, uris in committed_files(output_uri).items():
        key, _, value = name.partition("=")
        for uri in uris:
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as f:
                frames.append(pq.read_table(f).to_pandas().assign(**{key: value}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
