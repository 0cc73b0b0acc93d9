"""The input side: Hive-partitioned ledgers, found and checked before any worker starts.

    <input>/dt=YYYY-MM-DD/*.parquet       any schema holding the text column

`discover` lists the partition folders and their files with size and ETag (or mtime): what a
partition's record in the output table compares with, so a late or rewritten file is noticed.
`inspect` reads each file's footer (no rows) for row counts and the schema checks that would
otherwise fail the whole run mid-way. The output side is clf_core.table.
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from clf_core import storage
from clf_core.errors import ClfError

log = logging.getLogger(__name__)


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
    """The `<key>=<value>` folders directly under input_uri, sorted by value, with their files."""
    fs, root = storage.filesystem(input_uri)
    fs.invalidate_cache()  # a long-lived process (a notebook, the tests) must see files that arrived since
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
        found = fs.find(entry["name"], detail=True)
        versions = {_uri(input_uri, path): (int(info.get("size") or 0), _version(info)) for path, info in found.items()
                    if path.endswith(".parquet")
                    and not any(s.startswith(("_", ".")) for s in path[len(entry["name"]):].split("/"))}
        partition = Partition(name, match.group(1), sorted(versions), versions)
        partition.problem = folder_problem(name, partition.value, key, found, entry["name"])
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
