"""Object storage through fsspec URIs: local paths, file://, s3:// (s3fs).

Credentials and endpoints come from the standard AWS environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, instance profiles), so the same command runs against
AWS S3, MinIO or a local endpoint; nothing here takes an endpoint flag.

Retries are the libraries' defaults, on purpose (tests/test_faults.py measures them against a
proxy failing 20% of requests): botocore (legacy mode, 5 attempts, exponential backoff) retries
503/5xx and connection errors and timeouts; around each call s3fs tries 5 times more on
"SlowDown" and connection errors. Ray Data's Parquet reads (pyarrow's S3) are retried by Ray on
503/SlowDown. The standard AWS_MAX_ATTEMPTS / AWS_RETRY_MODE variables change botocore's budget.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

from clf_core.errors import ClfError


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or URI."""
    try:
        return url_to_fs(str(uri))
    except (ImportError, ValueError) as exc:
        raise ClfError(f"cannot open storage URI {uri!r}: {exc}. Use a local path or s3://bucket/prefix.") from exc


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base, *parts))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ClfError(f"{uri} does not exist") from exc


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy every file under local_dir to uri (a directory or prefix)."""
    fs, dest = filesystem(uri)
    local_dir = Path(local_dir)
    for src in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = src.relative_to(local_dir).as_posix()
        target = posixpath.join(dest, rel)
        if not is_remote(uri):
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.put_file(str(src), target)


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy every object under uri into local_dir; return local_dir."""
    fs, src = filesystem(uri)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    src = src.rstrip("/")
    found = fs.find(src)
    if not found:
        raise ClfError(f"nothing found under {uri}: check the URI and your AWS credentials/endpoint")
    for obj in found:
        rel = posixpath.relpath(obj, src)
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(obj, str(target))
    return local_dir


def cache_dir() -> Path:
    """Where remote backbones and artifacts are copied before loading (CLF_CACHE_DIR overrides)."""
    return Path(os.environ.get("CLF_CACHE_DIR", Path.home() / ".cache" / "clf_core"))


def local_copy(uri: str, kind: str, version: str = "") -> Path:
    """A local directory holding uri: the path itself when local, else a cached download.

    The cache key is the hash of the URI and `version` (e.g. the manifest's hash, so that a
    re-published artifact is fetched again); a download lands in a temporary folder and is renamed into
    place only when complete, so a crash never leaves a half-copied directory that looks whole.
    """
    if not is_remote(uri):
        return Path(uri.removeprefix("file://"))
    key = hashlib.sha256(f"{uri}\n{version}".encode()).hexdigest()[:16]
    target = cache_dir() / kind / key
    if target.is_dir():
        return target
    tmp = target.with_name(f"{key}.tmp-{os.getpid()}")
    download_dir(uri, tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process on this node finished first: use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
