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
import shutil
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

from clf_core.errors import ClfError


class StorageAccessError(ClfError):
    """The object store could not be used: no credentials, refused credentials, or an endpoint
    that does not answer. A run-time failure of the surroundings (exit 1), not of the input."""


# How botocore, aiobotocore/aiohttp and s3fs name the three ways an object store cannot be used.
NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError")
REFUSED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException", "InvalidToken",
           "AccessDenied", "AllAccessDisabled", "InvalidClientTokenId", "UnrecognizedClientException")
UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError",
               "ServerDisconnectedError", "ConnectionRefusedError", "ClientConnectorDNSError")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def access_problem(exc: BaseException) -> str | None:
    """What is wrong with the way to the object store, for a person, if that is why `exc` happened
    (None: something else). Looks through the exception's causes, and through the text Ray passes
    a task's error on as."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3 (no AWS_ENDPOINT_URL set)"
    demo = " For the demo's local endpoint: source runs/demo/env.sh."
    for e in _chain(exc):
        if isinstance(e, StorageAccessError):
            return str(e)   # named already, with what was being read
        name = type(e).__name__
        code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
        text = str(e)
        if name in NO_CREDENTIALS or "Unable to locate credentials" in text:
            return ("no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                    "AWS_PROFILE), or run where an instance profile or IRSA role provides them." + demo)
        # a refused HEAD request has no body, hence no code: only its status, 403 Forbidden
        forbidden = code in ("403", "Forbidden") or (isinstance(e, PermissionError) and text.strip() == "Forbidden")
        if code in REFUSED or forbidden or any(c in text for c in REFUSED[:5]):
            key = os.environ.get("AWS_ACCESS_KEY_ID", "")
            shown = f" (key id ...{key[-4:]})" if len(key) > 8 else ""
            return (f"the object store at {endpoint} refused the credentials{shown}: {text.strip()[:200]} Check "
                    f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the role's permissions)." + demo)
        if name in UNREACHABLE or isinstance(e, ConnectionRefusedError) or "Could not connect to the endpoint URL" in text:
            return (f"cannot reach the object store at {endpoint}: {text.strip()[:200]} Is it up, and is "
                    f"AWS_ENDPOINT_URL right?" + demo)
    return None


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


def safe_relative_path(key: str, prefix: str) -> str:
    """The path of object `key` below `prefix`, or a ClfError saying why it cannot be a file there.

    An object store allows any key, "a/../../x" and "/etc/x" included; joined onto a local folder,
    such a key writes outside it (`Path` and `open` resolve "..", and "/x" replaces the folder).
    Only plain names are allowed, so the local tree is the remote one, never more.
    """
    if not key.startswith(prefix + "/"):
        raise ClfError(f"object {key!r} is not under {prefix!r}; refusing to copy it")
    rel = key[len(prefix) + 1:]
    segments = rel.split("/")
    if any(s in ("", ".", "..") for s in segments):  # "" also catches "/abs" and "a//b"
        raise ClfError(
            f"object key {key!r} under {prefix!r} is not a plain relative path (it has an empty, '.' or "
            f"'..' segment, or is absolute): written to disk it could land outside the download folder, "
            f"so nothing was downloaded. Delete that object from the bucket (or publish to a clean "
            f"prefix) and try again."
        )
    return rel


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy every object under uri into local_dir; return local_dir.

    Every key is checked before the first byte is written (see safe_relative_path): one bad key
    refuses the whole copy, so a download is either the remote tree or nothing new.
    """
    fs, src = filesystem(uri)
    local_dir = Path(local_dir)
    src = src.rstrip("/")
    found = fs.find(src)
    if not found:
        raise ClfError(f"nothing found under {uri}: check the URI and your AWS credentials/endpoint")
    if found == [src]:
        raise ClfError(f"{uri} is a single object, not a folder; point at the prefix that holds the files")
    # Keys ending in "/" are the folder markers some tools create: they hold no file.
    plan = [(obj, local_dir / safe_relative_path(obj, src)) for obj in found if not obj.endswith("/")]
    local_dir.mkdir(parents=True, exist_ok=True)
    root = local_dir.resolve()
    for obj, target in plan:  # a symlink already inside an existing local_dir could still lead out
        if not target.resolve().is_relative_to(root):
            raise ClfError(f"object {obj!r} would be written to {target.resolve()}, outside {root}; "
                           f"nothing was downloaded. Download into a new, empty folder.")
    for obj, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(obj, str(target))
    return local_dir


def cache_dir() -> Path:
    """Where remote backbones and artifacts are copied before loading (CLF_CACHE_DIR overrides)."""
    return Path(os.environ.get("CLF_CACHE_DIR", Path.home() / ".cache" / "clf_core"))


def cached_copy_path(uri: str, kind: str, version: str = "") -> Path:
    """Where local_copy keeps uri at this version (it may not be there yet)."""
    key = hashlib.sha256(f"{uri}\n{version}".encode()).hexdigest()[:16]
    return cache_dir() / kind / key


def local_copy(uri: str, kind: str, version: str = "", refresh: bool = False) -> Path:
    """A local directory holding uri: the path itself when local, else a cached download.

    The cache key is the hash of the URI and `version` (the manifest's hash for an artifact, so
    that a re-published one is fetched again; the expected content hash for a backbone); a
    download lands in a temporary folder and is renamed into place only when complete, so a crash
    never leaves a half-copied directory that looks whole, and a refused or failed download leaves
    nothing behind. `refresh` drops a cached copy (one the caller found stale) and downloads anew.
    """
    if not is_remote(uri):
        return Path(uri.removeprefix("file://"))
    target = cached_copy_path(uri, kind, version)
    if refresh:
        shutil.rmtree(target, ignore_errors=True)
    if target.is_dir():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        download_dir(uri, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process on this node finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target
