"""The input side: Hive-partitioned ledgers, found and checked before any worker starts.

    <input>/dt=YYYY-MM-DD/*.parquet       any schema holding the text column

`discover` lists the partition folders and their files with size and ETag (or mtime): what a
partition's record in the output table compares with, so a late or rewritten file is noticed.
`inspect` reads each file's footer (no rows) for row counts and the schema checks that would
otherwise fail the whole run mid-way. The output side is clf_core.labeling.table.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from clf_core import storage
from clf_core.errors import ClfError

log = logging.getLogger(__name__)

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass
class Partition:
    name: str                                   # "dt=2024-01-31": the folder, in and out
    value: str                                  # "2024-01-31"
    files: list[str] = field(default_factory=list)  # input files, full URIs
    versions: dict[str, tuple[int, str]] = field(default_factory=dict)  # uri -> (size, ETag or mtime)
    rows: int = 0                               # input rows, from the Parquet footers
    problem: str | None = None                  # why it cannot be labeled (names the file)
    schemas: dict[str, pa.Schema] = field(default_factory=dict, repr=False)  # input file -> its Arrow schema


def _uri(base: str, path: str) -> str:
    """Full URI of a path an fsspec filesystem returned (it drops the scheme)."""
    if storage.is_remote(base):
        return f"{base.split('://', 1)[0]}://{path}"
    return path


def discover(input_uri: str, key: str = "dt") -> list[Partition]:
    """The `<key>=<value>` folders directly under input_uri, sorted by value, with their files.

    One recursive listing of the whole prefix (S3: a paginated LIST, 1,000 keys a request),
    grouped by folder here: a listing per partition folder costs a round trip each, minutes
    for a multi-year backfill on S3."""
    fs, root = storage.filesystem(input_uri)
    fs.invalidate_cache()  # a long-lived process (a notebook, the tests) must see files that arrived since
    if not fs.isdir(root):
        raise ClfError(f"--input {input_uri} is not a folder or prefix (or does not exist). Point it at the "
                       f"parent of the {key}=YYYY-MM-DD/ folders, and check the bucket and AWS credentials.")
    root = root.rstrip("/")
    pattern = re.compile(rf"^{re.escape(key)}=(.+)$")
    folders: dict[str, dict[str, dict]] = {}
    for path, info in fs.find(root, detail=True, withdirs=True).items():
        rel = path[len(root):].strip("/")
        if not rel:
            continue
        name, _, below = rel.partition("/")
        if below or info.get("type") == "directory":
            folders.setdefault(name, {})
            if below and info.get("type") != "directory":
                folders[name][path] = info
        elif not name.startswith(("_", ".")):
            log.warning("ignoring %s: a file, not a %s=... partition folder", name, key)
    partitions = []
    for name, found in folders.items():
        match = pattern.match(name)
        if not match:
            if not name.startswith(("_", ".")):
                log.warning("ignoring %s: not a %s=... partition folder", name, key)
            continue
        folder = f"{root}/{name}"
        versions = {_uri(input_uri, path): (int(info.get("size") or 0), _version(info)) for path, info in found.items()
                    if path.endswith(".parquet")
                    and not any(s.startswith(("_", ".")) for s in path[len(folder):].split("/"))}
        partition = Partition(name, match.group(1), sorted(versions), versions)
        partition.problem = folder_problem(name, partition.value, key, found, folder)
        partitions.append(partition)
    return sorted(partitions, key=lambda p: p.value)


def folder_problem(name: str, value: str, key: str, found: dict, folder: str) -> str | None:
    """Why a partition folder cannot be read as one Hive partition (None: it can). Ray Data reads
    the value back from the path, so a value it would read differently, or a second key=value
    level, would put rows under another partition than the one planned."""
    for char, why in (("=", "a second '='"), ("%", "'%' (a URL-encoded value?)")):
        if char in value:
            return (f"folder {name}: its value {value!r} holds {why}, which Hive partitioning does not read back "
                    f"as written. Rename the folder to {key}=<plain value>, e.g. {key}=2024-01-31.")
    nested = sorted({seg for path in found for seg in path[len(folder):].strip("/").split("/")[:-1]
                     if "=" in seg and not seg.startswith(("_", "."))})
    if nested:
        return (f"folder {name} holds nested partition folder(s) {nested[:3]}: this job reads one level of "
                f"{key}=... folders. Move their files up into {name}/, or label them separately.")
    return None


def _version(info: dict) -> str:
    """What changes when a file is rewritten: the object's ETag on S3, the mtime on a local disk."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def input_files(partition: Partition) -> tuple[tuple[str, int, str], ...]:
    """(uri, size, version) of each input file, sorted: what a partition commit records."""
    return tuple((uri, *partition.versions.get(uri, (0, ""))) for uri in partition.files)


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


FOOTER_READERS = 32   # concurrent footer reads: each is one or two small ranged GETs, all I/O


def read_footer(uri: str):
    """(row count, Arrow schema) from a Parquet file's footer, or the exception that stopped it.
    Opened with small blocks: the footer is read with a ranged request, not the file."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb", block_size=1 << 16) if storage.is_remote(uri) else fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            return meta.num_rows, meta.schema.to_arrow_schema().remove_metadata()
    except Exception as exc:  # truncated, not Parquet, unreadable: the partition fails, others go on
        return exc


def read_footers(partitions: list[Partition]) -> dict[str, object]:
    """Every file's footer (see read_footer), read concurrently: planning a backfill over
    thousands of files waits for the slowest few requests, not for their sum."""
    from concurrent.futures import ThreadPoolExecutor

    uris = [uri for p in partitions for uri in p.files]
    with ThreadPoolExecutor(max_workers=max(1, min(FOOTER_READERS, len(uris)))) as pool:
        return dict(zip(uris, pool.map(read_footer, uris)))


def inspect(partition: Partition, text_column: str, reserved: tuple[str, ...], footers: dict | None = None) -> Partition:
    """Check each file's footer (metadata only; `footers` from read_footers, else read here): row
    counts, and the schema checks that would otherwise fail mid-run. A problem names the file
    and the fix.

    Files may differ in columns (a missing column reads as null) but not in a column's type:
    Ray Data merges the schemas of all the files it reads and fails the whole run, naming no
    file, on e.g. `texts` string in one file and int64 in another."""
    if not partition.files:
        partition.problem = f"{partition.name} holds no .parquet files"
        return partition
    rows = 0
    merged = None
    for uri in partition.files:
        footer = footers[uri] if footers is not None and uri in footers else read_footer(uri)
        if isinstance(footer, Exception):
            partition.problem = f"cannot read {uri}: {type(footer).__name__}: {footer}"
            return partition
        num_rows, schema = footer
        names = schema.names
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
        rows += num_rows
    partition.rows = rows
    return partition
