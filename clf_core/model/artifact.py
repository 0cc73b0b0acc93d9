"""The published model: LoRA adapter + head in safetensors, the tokenizer, and a manifest.

(Why one module of ~420 lines: every check `verify_artifact` makes mirrors something
`save_artifact` writes; kept together, a field added to one is seen in the other.)

    <artifact>/
      manifest.json            what it is, what made it, and the sha256 of every other file
      adapter.safetensors      LoRA weights and the classification head (the only weights saved)
      tokenizer/...            tokenizer files (JSON / text: nothing executable)
      <extra files>            e.g. the evaluation report the train job adds

The frozen backbone is not copied: the manifest names it (hub id or URI) and its content (the
sha256 of every file loading can read, clf_core.model.backbone.backbone_fingerprint), and loading refuses
any other backbone. `model_version` is a hash of everything loading builds the model from (weights,
tokenizer, the backbone's content, the model/lora/data settings), not of the time it was made: the
same model always gets the same version, a different one never does. The top-level copies of
settings (labels, max_tokens, quantization, pooling, lora, backbone id) are for readers; loading
refuses an artifact whose copies disagree with its `config`.

Formats: "clf-artifact/2" (written now) as above. "clf-artifact/1" artifacts still load, with the
version hash they were published with, so labels they made keep their cache keys; their settings
are cross-checked the same way, but their backbone is named only by file headers and sizes (see
clf_core.model.predict.backbone_for), and they cannot use a pre-quantized backbone.

Nothing here unpickles anything: weights are read with safetensors only, every file is checked
against the manifest before use, and a directory holding any file the manifest does not list
(a `.bin`, `.pt` or `.pkl` dropped beside it, say), a symlink, or a manifest entry that is not a
plain relative path is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from clf_core import storage
from clf_core.model.config import ClassifierConfig
from clf_core.errors import ArtifactError, ClfError

log = logging.getLogger(__name__)

# The review threshold of a model published before thresholds were chosen on validation (its
# manifest has no `review` section): rows it scores below this confidence go to review.
LEGACY_REVIEW_THRESHOLD = 0.9

FORMAT = "clf-artifact/2"
FORMATS = {"clf-artifact/1": 1, "clf-artifact/2": 2}
MANIFEST = "manifest.json"
ADAPTER = "adapter.safetensors"
TOKENIZER_DIR = "tokenizer"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


SHA256 = re.compile(r"[0-9a-f]{64}")


def prediction_settings(config: dict) -> dict:
    """The part of `config` that decides predictions, for the model_version (clf-artifact/2).

    Every section but `train`, in full: the loader builds the model from model.* (quantization,
    double quant, compute dtype, pooling, max tokens...), lora.* and data.* (labels and their
    order), and a section added later is covered without anyone remembering to. `train` is left
    out: it shapes predictions only through the weights, which are hashed themselves (the adapter
    file); loading reads only train.seed, to initialise tensors the saved adapter then replaces in
    full (a missing adapter key is refused). model.backbone is left out too: it says where the
    backbone is, and the backbone's content hash (in the version) says which one it is, so a
    backbone moved to another bucket keeps the version. Settings that cannot change an answer
    (model.device, model.gradient_checkpointing) stay in: a needless new version costs a cache
    miss, a missed setting would cost wrong labels under an old version.
    """
    settings = {section: values for section, values in config.items() if section != "train"}
    settings["model"] = {k: v for k, v in settings.get("model", {}).items() if k != "backbone"}
    return settings


def compute_model_version(manifest: dict) -> str:
    """Content hash of what decides predictions; the evaluation files and timestamps are left out."""
    model_files = {k: v for k, v in manifest["files"].items() if k == ADAPTER or k.startswith(TOKENIZER_DIR + "/")}
    if manifest.get("format") == "clf-artifact/1":
        # Kept byte for byte, so artifacts published before clf-artifact/2 keep their version.
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
    else:
        # The backbone by content only: its id is where it lives, and the list of approved
        # pre-quantized copies (approve_backbone_copy) holds the same weights, so neither changes
        # the version, and labels made through any approved copy share the label cache.
        identity = {
            "format": manifest["format"],
            "files": model_files,
            "backbone": manifest["backbone"]["sha256"],
            "config": prediction_settings(manifest["config"]),
        }
        # The temperature changes every confidence and the review threshold every needs_review:
        # both are part of what the model answers (absent from artifacts made before them).
        for key in ("calibration", "review"):
            if key in manifest:
                identity[key] = manifest[key]
    blob = json.dumps(identity, sort_keys=True).encode()
    return "v" + hashlib.sha256(blob).hexdigest()[:12]


def save_artifact(directory: str | Path, *, adapter_state: dict, tokenizer, cfg: ClassifierConfig,
                  backbone: dict, metrics: dict | None = None, extra_files: dict[str, bytes] | None = None,
                  notes: dict | None = None, extra_manifest: dict | None = None) -> dict:
    """Write an artifact into a local directory (which must be new or empty); return its manifest."""
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise ArtifactError(f"{root} is not empty; artifacts are written into a new directory")
    if not SHA256.fullmatch(str(backbone.get("sha256"))):
        raise ArtifactError(
            f"backbone {backbone.get('id')!r} has no content hash (sha256 = {backbone.get('sha256')!r}); an "
            f"artifact must name its backbone by content. Pass clf_core.model.backbone.backbone_fingerprint(<directory>)."
        )
    root.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file   # here, not at the top: the jobs' drivers open artifacts without torch

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
        **(extra_manifest or {}),   # calibration (the temperature) and review (the threshold)
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
    def review_threshold(self) -> float:
        """The threshold the model was published with (LEGACY_REVIEW_THRESHOLD without one)."""
        return float(self.manifest.get("review", {}).get("threshold", LEGACY_REVIEW_THRESHOLD))

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    @property
    def format_version(self) -> int:
        return FORMATS[self.manifest["format"]]

    @property
    def labels(self) -> list[str]:
        return self.manifest["labels"]

    def config(self) -> ClassifierConfig:
        values = json.loads(json.dumps(self.manifest["config"]))
        # Artifacts written before model.pooling existed used the architecture's own pooling.
        values.setdefault("model", {}).setdefault("pooling", "native")
        return ClassifierConfig.from_dict(values)

    def adapter_state(self) -> dict:
        from safetensors.torch import load_file

        return load_file(self.path / ADAPTER)


def open_artifact(uri: str) -> Artifact:
    """Fetch (if remote) and verify an artifact; raise ArtifactError on any mismatch."""
    manifest_uri = storage.join(uri, MANIFEST)
    try:
        manifest_text = storage.read_text(manifest_uri)
    except Exception as exc:
        problem = storage.access_problem(exc)
        if problem:
            raise storage.StorageAccessError(f"reading the model {uri}: {problem}") from exc
        raise ArtifactError(
            f"no artifact at {uri}: cannot read {MANIFEST} ({exc}). Point --model at a directory "
            f"published by jobs.train."
        ) from exc
    version_key = hashlib.sha256(manifest_text.encode()).hexdigest()
    try:
        local = storage.local_copy(str(uri), kind="artifacts", version=version_key)
    except ArtifactError:
        raise
    except ClfError as exc:  # e.g. a key that would write outside the download folder
        raise ArtifactError(f"artifact {uri} was not downloaded: {exc}") from exc
    return verify_artifact(local)


# Keys every manifest has, each with the type it must hold. A manifest missing one is refused by
# name (not with a KeyError from deep inside loading).
REQUIRED_KEYS = {"format": str, "model_version": str, "files": dict, "backbone": dict, "config": dict,
                 "labels": list, "max_tokens": int, "quantization": dict, "lora": dict}


def check_manifest_keys(root: Path, manifest: dict) -> None:
    for key, kind in REQUIRED_KEYS.items():
        if key not in manifest:
            raise ArtifactError(f"{root / MANIFEST} has no {key!r} key: not a complete artifact manifest. "
                                f"Re-publish the model with jobs.train.")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise ArtifactError(f"{root / MANIFEST}: {key!r} holds {type(manifest[key]).__name__} "
                                f"{manifest[key]!r:.80}, expected a {kind.__name__}. Re-publish the model.")
    bad_sections = [k for k, v in manifest["config"].items() if not isinstance(v, dict)]
    if bad_sections:
        raise ArtifactError(f"{root / MANIFEST}: config section(s) {bad_sections} do not hold settings "
                            f"(model, lora, data, train are mappings). Re-publish the model.")
    temperature = manifest.get("calibration", {}).get("temperature", 1.0)
    threshold = manifest.get("review", {}).get("threshold", LEGACY_REVIEW_THRESHOLD)
    if not (isinstance(temperature, (int, float)) and 0.0 < temperature < float("inf")):
        raise ArtifactError(f"{root / MANIFEST}: calibration.temperature = {temperature!r} is not a positive number. "
                            f"Re-publish the model.")
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ArtifactError(f"{root / MANIFEST}: review.threshold = {threshold!r} is not within [0, 1]. "
                            f"Re-publish the model.")
    if not isinstance(manifest["backbone"].get("id"), str):
        raise ArtifactError(f"{root / MANIFEST}: backbone has no 'id' (the hub id, directory or URI it "
                            f"was trained on). Re-publish the model.")
    if manifest["format"] != "clf-artifact/1":
        backbone = manifest["backbone"]
        if not SHA256.fullmatch(str(backbone.get("sha256"))):
            raise ArtifactError(
                f"{root / MANIFEST}: backbone.sha256 = {backbone.get('sha256')!r} is not a sha256 hex digest; a "
                f"{manifest['format']} artifact names its backbone by content. Re-publish the model."
            )
        approved = backbone.get("prequantized", [])
        if not isinstance(approved, list) or not all(SHA256.fullmatch(str(h)) for h in approved):
            raise ArtifactError(f"{root / MANIFEST}: backbone.prequantized = {approved!r:.120} must be a list "
                                f"of sha256 hex digests (see approve_backbone_copy).")


def check_file_entries(root: Path, listed: dict) -> None:
    """Every manifest entry must be a plain relative path to a regular file inside root."""
    for rel, digest in listed.items():
        segments = str(rel).split("/")
        if not rel or any(s in ("", ".", "..") for s in segments) or "\\" in rel:
            raise ArtifactError(
                f"{root / MANIFEST} lists file {rel!r}, which is not a plain relative path (an empty, '.' "
                f"or '..' segment, an absolute path or a backslash): it could name a file outside the "
                f"artifact. The manifest was altered or badly written; re-publish the model."
            )
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise ArtifactError(f"{root / MANIFEST}: the sha256 of {rel!r} is {digest!r:.80}, not a hex digest. "
                                f"Re-publish the model.")


def files_on_disk(root: Path) -> set[str]:
    """Every file under root (relative POSIX paths), refusing any symlink: a link could point at a
    file outside the artifact that its manifest never vouched for, or change after verification."""
    present = set()
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder, name)
            if path.is_symlink():
                raise ArtifactError(
                    f"{root} holds a symlink, {path.relative_to(root).as_posix()} -> {os.readlink(path)}: "
                    f"an artifact holds regular files only. Copy it with the files themselves (cp -L) or re-publish."
                )
        present.update(Path(folder, name).relative_to(root).as_posix() for name in files)
    return present


def check_settings(root: Path, manifest: dict) -> None:
    """Refuse an artifact whose top-level copies disagree with the config the loader builds from."""
    try:
        cfg = Artifact(root, manifest).config()
    except ClfError as exc:
        raise ArtifactError(f"{root / MANIFEST}: its config cannot build a model: {exc}") from exc
    expected = {
        "labels": list(cfg.data.labels),
        "max_tokens": cfg.model.max_tokens,
        "quantization": {"method": cfg.model.quantization, "double_quant": cfg.model.double_quant},
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": list(cfg.lora.target_modules)},
        "text_column": cfg.data.text_column,
        "pooling": cfg.model.pooling,
    }
    recorded = {k: manifest[k] for k in expected if k in manifest}
    recorded.setdefault("pooling", "native")  # artifacts from before the setting existed
    if manifest["backbone"]["id"] != cfg.model.backbone:
        raise ArtifactError(
            f"{root / MANIFEST}: backbone.id = {manifest['backbone']['id']!r} but config model.backbone = "
            f"{cfg.model.backbone!r}; the manifest was edited. Re-publish the model."
        )
    for key, value in recorded.items():
        if value != expected[key]:
            raise ArtifactError(
                f"{root / MANIFEST}: {key} = {value!r} but its config (which the model is built from) says "
                f"{expected[key]!r}; the manifest was edited, so which model it describes is unknown. "
                f"Re-publish the model."
            )


def verify_artifact(root: str | Path) -> Artifact:
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{root / MANIFEST} is missing or not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{root / MANIFEST} holds a {type(manifest).__name__}, not a manifest object")
    if manifest.get("format") not in FORMATS:
        raise ArtifactError(f"{root}: unknown artifact format {manifest.get('format')!r}; expected one of "
                            f"{sorted(FORMATS)}. A newer clf_core may read it.")
    check_manifest_keys(root, manifest)
    listed = manifest["files"]
    check_file_entries(root, listed)
    present = files_on_disk(root) - {MANIFEST}
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
    if compute_model_version(manifest) != manifest["model_version"]:
        raise ArtifactError(f"{root}: model_version {manifest['model_version']!r} does not match the manifest's content "
                            f"(its settings, backbone or files were edited after publishing). Re-publish the model.")
    check_settings(root, manifest)
    return Artifact(root, manifest)


def approve_backbone_copy(uri: str, sha256: str) -> dict:
    """Let Predictor.load(uri, backbone=<copy>) accept a copy of the backbone whose content hash
    is `sha256`: the publisher's step after making a pre-quantized copy (clf_core.model.prequantize.approve
    checks the copy and calls this). Return the new manifest.

    Only manifest.json is rewritten, in one write. The model_version stays (see
    compute_model_version): an approved copy holds the backbone's weights quantized ahead instead
    of at load, and scores the same.
    """
    art = open_artifact(uri)  # never vouch for anything inside an artifact that does not verify
    if art.format_version < 2:
        raise ArtifactError(f"{uri} is a {art.manifest['format']} artifact, which names its backbone by headers "
                            f"only; a backbone copy can be approved only for clf-artifact/2. Re-train to get one.")
    if not SHA256.fullmatch(sha256):
        raise ArtifactError(f"{sha256!r} is not a sha256 hex digest (clf_core.model.backbone.backbone_fingerprint(dir)['sha256'])")
    manifest = copy.deepcopy(art.manifest)
    approved = manifest["backbone"].setdefault("prequantized", [])
    if sha256 in approved or sha256 == manifest["backbone"]["sha256"]:
        return manifest
    approved.append(sha256)
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if storage.is_remote(uri):
        storage.write_bytes(storage.join(uri, MANIFEST), data)  # one PUT: readers see old or new
    else:
        path = Path(str(uri).removeprefix("file://"), MANIFEST)
        tmp = path.with_name(f"{MANIFEST}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    log.info("approved backbone copy %s for model %s at %s", sha256[:12], art.model_version, uri)
    return manifest
