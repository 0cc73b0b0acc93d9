"""The published model: LoRA adapter + head in safetensors, the tokenizer, and a manifest.

    <artifact>/
      manifest.json            what it is, what made it, and the sha256 of every other file
      adapter.safetensors      LoRA weights and the classification head (the only weights saved)
      tokenizer/...            tokenizer files (JSON / text: nothing executable)
      <extra files>            e.g. the evaluation report the train job adds

The frozen backbone is not copied: the manifest names it (hub id or URI) with its fingerprint,
and loading refuses a backbone whose fingerprint differs. `model_version` is a hash of the
content (weights, tokenizer, backbone fingerprint, labels, settings), not of the time it was
made: the same model always gets the same version, a different one never does.

Nothing here unpickles anything: weights are read with safetensors only, every file is checked
against the manifest before use, and a directory holding any file the manifest does not list
(a `.bin`, `.pt` or `.pkl` dropped beside it, say) is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from safetensors.torch import load_file, save_file

from clf_core import storage
from clf_core.config import ClassifierConfig
from clf_core.errors import ArtifactError

log = logging.getLogger(__name__)

FORMAT = "clf-artifact/1"
MANIFEST = "manifest.json"
ADAPTER = "adapter.safetensors"
TOKENIZER_DIR = "tokenizer"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def compute_model_version(manifest: dict) -> str:
    """Content hash of what decides predictions; the evaluation files and timestamps are left out."""
    model_files = {k: v for k, v in manifest["files"].items() if k == ADAPTER or k.startswith(TOKENIZER_DIR + "/")}
    identity = {
        "files": model_files,
        "backbone": manifest["backbone"],
        "labels": manifest["labels"],
        "max_tokens": manifest["max_tokens"],
        "quantization": manifest["quantization"],
        "lora": manifest["lora"],
    }
    if "pooling" in manifest:  # absent from artifacts written before the setting existed
        identity["pooling"] = manifest["pooling"]
    blob = json.dumps(identity, sort_keys=True).encode()
    return "v" + hashlib.sha256(blob).hexdigest()[:12]


def save_artifact(directory: str | Path, *, adapter_state: dict, tokenizer, cfg: ClassifierConfig,
                  backbone: dict, metrics: dict | None = None, extra_files: dict[str, bytes] | None = None,
                  notes: dict | None = None) -> dict:
    """Write an artifact into a local directory (which must be new or empty); return its manifest."""
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise ArtifactError(f"{root} is not empty; artifacts are written into a new directory")
    root.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state, root / ADAPTER, metadata={"format": "pt"})
    tokenizer.save_pretrained(root / TOKENIZER_DIR)
    for name, data in (extra_files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = {
        "format": FORMAT,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": backbone,
        "labels": list(cfg.data.labels),
        "text_column": cfg.data.text_column,
        "max_tokens": cfg.model.max_tokens,
        "quantization": {"method": cfg.model.quantization, "double_quant": cfg.model.double_quant},
        "pooling": cfg.model.pooling,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": list(cfg.lora.target_modules)},
        "config": cfg.to_dict(),
        "metrics": metrics or {},
        "notes": notes or {},
        "files": files,
    }
    manifest["model_version"] = compute_model_version(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def publish(local_dir: str | Path, uri: str, overwrite: bool = False) -> None:
    """Copy a finished artifact to its destination; the manifest goes last, so a reader never
    sees a manifest whose files are not all there yet. An existing artifact is never replaced
    silently."""
    local_dir = Path(local_dir)
    ours = json.loads((local_dir / MANIFEST).read_text())
    existing = storage.join(uri, MANIFEST)
    if storage.exists(existing) and not overwrite:
        if json.loads(storage.read_text(existing)).get("model_version") == ours["model_version"]:
            log.info("model %s is already published at %s", ours["model_version"], uri)
            return  # a retried run that made the same model: nothing to do
        raise ArtifactError(
            f"an artifact is already published at {uri}. Publish to a new path (artifacts are "
            f"versioned by path), or pass --overwrite to replace it."
        )
    if overwrite and storage.exists(existing):
        # Manifest first, so no reader trusts the old files while they are replaced.
        fs, path = storage.filesystem(uri)
        fs.rm(storage.filesystem(existing)[1])
        fs.rm(path, recursive=True)
    with tempfile.TemporaryDirectory() as staging:
        shutil.copytree(local_dir, staging, dirs_exist_ok=True)
        (Path(staging) / MANIFEST).unlink()
        storage.upload_dir(staging, uri)
    storage.write_bytes(storage.join(uri, MANIFEST), (local_dir / MANIFEST).read_bytes())


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    @property
    def labels(self) -> list[str]:
        return self.manifest["labels"]

    def config(self) -> ClassifierConfig:
        values = json.loads(json.dumps(self.manifest["config"]))
        # Artifacts written before model.pooling existed used the architecture's own pooling.
        values.setdefault("model", {}).setdefault("pooling", "native")
        return ClassifierConfig.from_dict(values)

    def adapter_state(self) -> dict:
        return load_file(self.path / ADAPTER)


def open_artifact(uri: str) -> Artifact:
    """Fetch (if remote) and verify an artifact; raise ArtifactError on any mismatch."""
    manifest_uri = storage.join(uri, MANIFEST)
    try:
        manifest_text = storage.read_text(manifest_uri)
    except Exception as exc:
        raise ArtifactError(
            f"no artifact at {uri}: cannot read {MANIFEST} ({exc}). Point --model at a directory "
            f"published by jobs.train."
        ) from exc
    version_key = hashlib.sha256(manifest_text.encode()).hexdigest()
    local = storage.local_copy(str(uri), kind="artifacts", version=version_key)
    return verify_artifact(local)


def verify_artifact(root: str | Path) -> Artifact:
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{root / MANIFEST} is missing or not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{root}: unknown artifact format {manifest.get('format')!r}; expected {FORMAT}")
    listed = manifest.get("files", {})
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise ArtifactError(
            f"{root} holds file(s) its manifest does not list: {unlisted[:5]}. An artifact is "
            f"immutable and weights load from safetensors only; remove them or re-publish."
        )
    for rel, expected in listed.items():
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{root}: file {rel} listed in the manifest is missing (incomplete copy?)")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{root}: {rel} does not match its manifest (sha256 {actual[:12]}... != "
                f"{expected[:12]}...): the file was changed or corrupted. Re-publish or re-download it."
            )
    if compute_model_version(manifest) != manifest.get("model_version"):
        raise ArtifactError(f"{root}: model_version {manifest.get('model_version')!r} does not match the manifest's content")
    return Artifact(root, manifest)
