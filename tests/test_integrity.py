"""Model and artifact integrity: every fault is injected into a real artifact, backbone or bucket.

1. Downloads: an object key that would land outside the download folder refuses the download
   before a byte is written, and a failed download leaves no temporary folder.
2. model_version covers every setting the model is built from; a missing adapter key is refused.
3. The backbone is named by content: a changed weight byte, a changed remote, a pre-quantized
   copy nobody approved are refused (see also tests/test_prequantize.py).
4. Manifest entries that leave the artifact, symlinks and missing keys are refused by name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clf_core import storage
from clf_core.model.artifact import compute_model_version, open_artifact, sha256_file
from clf_core.errors import ArtifactError, ClfError
from clf_core.model.predict import Predictor
from conftest import ledger_rows

TEXTS = ledger_rows(24, seed=31)["texts"].tolist()


def copy_of(artifact: str, directory: Path) -> Path:
    shutil.copytree(artifact, directory)
    return directory


def edit_manifest(directory: Path, edit, *, rehash: bool = True, reversion: bool = False) -> dict:
    """Apply edit(manifest) as someone with write access would: the file hashes recomputed (they
    are easy to recompute), the model_version only when asked (a publisher's bug would)."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if rehash:
        manifest["files"] = {rel: sha256_file(directory / rel) for rel in manifest["files"]}
    if reversion:
        manifest["model_version"] = compute_model_version(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    return manifest


def flip_weight_byte(path: Path) -> None:
    """Flip one byte of tensor data (past the safetensors header), keeping size and header."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ---- 1. downloads ---------------------------------------------------------------------------------

@pytest.mark.integration  # starts the local S3 endpoint
def test_download_refuses_a_key_that_escapes_the_folder(tiny_artifact, s3_bucket, local_s3, tmp_path, monkeypatch):
    import boto3

    cache = tmp_path / "node" / "cache"
    cache.mkdir(parents=True)
    monkeypatch.setenv("CLF_CACHE_DIR", str(cache))
    uri = f"{s3_bucket}/m/v1"
    storage.upload_dir(tiny_artifact, uri)
    bucket = s3_bucket.removeprefix("s3://")
    # put_object stores the key literally (a client that normalised paths could not make it).
    boto3.client("s3", endpoint_url=local_s3.endpoint).put_object(Bucket=bucket, Key="m/v1/../../../escaped.txt",
                                                                 Body=b"written outside the cache")
    fs, path = storage.filesystem(uri)
    assert f"{bucket}/m/v1/../../../escaped.txt" in fs.find(path)

    with pytest.raises(ArtifactError, match=r"'.*m/v1/\.\./\.\./\.\./escaped\.txt'.*not a plain relative path"):
        open_artifact(uri)
    # cache/artifacts/<key>.tmp-<pid>/../../../escaped.txt is tmp_path/node/escaped.txt.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node"]
    assert sorted(p.name for p in (tmp_path / "node").iterdir()) == ["cache"]
    assert not [p for p in cache.rglob("*") if not p.is_dir()], "not a byte is written"
    assert not list(cache.rglob("*.tmp-*")), "the refused download's temp folder is removed"


@pytest.mark.parametrize("key", ["../up.txt", "a/../../up.txt", "/abs.txt", "a//b.txt", "./dot.txt"])
def test_keys_that_are_not_plain_relative_paths_are_refused(key):
    with pytest.raises(ClfError, match="not a plain relative path"):
        storage.safe_relative_path(f"bucket/m/v1/{key}", "bucket/m/v1")
    assert storage.safe_relative_path("bucket/m/v1/tokenizer/tokenizer.json", "bucket/m/v1") == "tokenizer/tokenizer.json"


@pytest.mark.integration  # starts the local S3 endpoint
def test_a_download_that_fails_midway_leaves_no_temp_folder(tiny_artifact, s3_bucket, local_s3, tmp_path, monkeypatch):
    """Every GET of one file answered 503 past the retries, after the others were copied."""
    import fsspec

    from support.fault_proxy import FaultProxy

    monkeypatch.setenv("CLF_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/m/v1"
    storage.upload_dir(tiny_artifact, uri)
    with FaultProxy(local_s3.endpoint, seed=3) as proxy:
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": proxy.url,
                                                       "config_kwargs": {"retries": {"max_attempts": 1}}})
        proxy.set_faults(read_error=1.0, path=r".*/tokenizer/tokenizer\.json$")
        with pytest.raises(OSError, match="reduce your request rate"):
            storage.local_copy(uri, kind="artifacts", version="v")
        assert proxy.injected_total("503", "read") > 0
    assert not list((tmp_path / "cache").rglob("*.tmp-*")) and not list((tmp_path / "cache").rglob("*.safetensors"))


# ---- 2. the version covers what builds the model; the adapter must be whole -----------------------

@pytest.mark.parametrize("section, name, value", [("model", "max_tokens", 8), ("model", "pooling", "mean"),
                                                  ("model", "compute_dtype", "bfloat16"), ("lora", "alpha", 64),
                                                  ("data", "labels", ["Income", "Expense"])])
def test_editing_the_config_the_loader_builds_from_is_refused(tiny_artifact, tmp_path, section, name, value):
    directory = copy_of(tiny_artifact, tmp_path / "model")
    edit_manifest(directory, lambda m: m["config"][section].__setitem__(name, value))
    with pytest.raises(ArtifactError, match="model_version .* does not match"):
        Predictor.load(str(directory))


def test_adapter_missing_a_lora_key_is_refused(tiny_artifact, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = copy_of(tiny_artifact, tmp_path / "model")
    state = load_file(directory / "adapter.safetensors")
    dropped = sorted(k for k in state if "lora_B" in k)[-1]
    del state[dropped]
    save_file(state, directory / "adapter.safetensors", metadata={"format": "pt"})
    edit_manifest(directory, lambda m: None, reversion=True)  # a publisher's bug: all consistent
    with pytest.raises(ArtifactError, match=f"missing.*{dropped}"):
        Predictor.load(str(directory))


def make_format_1(directory: Path, tiny_backbone: str, edit=lambda m: None) -> dict:
    """Rewrite a copied artifact as clf_core wrote it before clf-artifact/2: the backbone named by
    its header fingerprint, the version over the top-level copies only."""
    from clf_core.model.backbone import header_fingerprint

    def downgrade(m):
        m["format"] = "clf-artifact/1"
        m["backbone"] = {"id": m["backbone"]["id"], **header_fingerprint(tiny_backbone)}
        edit(m)

    return edit_manifest(directory, downgrade, reversion=True)


def test_a_clf_artifact_1_loads_with_its_version_and_is_cross_checked(tiny_artifact, tiny_backbone, tmp_path, caplog):
    expected = Predictor.load(tiny_artifact).predict(TEXTS).probabilities
    old = copy_of(tiny_artifact, tmp_path / "old")
    manifest = make_format_1(old, tiny_backbone)
    loaded = Predictor.load(str(old))
    assert loaded.model_version == manifest["model_version"] != open_artifact(tiny_artifact).model_version
    np.testing.assert_allclose(loaded.predict(TEXTS).probabilities, expected, atol=1e-6)
    assert "checked by file headers and sizes only" in caplog.text

    # Its version never covered `config`, which the loader builds from: a copy that disagrees is refused.
    edited = copy_of(tiny_artifact, tmp_path / "edited")
    make_format_1(edited, tiny_backbone, lambda m: m["config"]["model"].__setitem__("max_tokens", 8))
    with pytest.raises(ArtifactError, match="max_tokens = 64 but its config .* says 8"):
        open_artifact(str(edited))

    # One that recorded no backbone fingerprint (trained on a hub id) has nothing to check: refused.
    unnamed = copy_of(tiny_artifact, tmp_path / "unnamed")
    make_format_1(unnamed, tiny_backbone, lambda m: m["backbone"].__setitem__("sha256", None))
    with pytest.raises(ArtifactError, match="recorded no backbone fingerprint.*Re-train"):
        Predictor.load(str(unnamed))


# ---- 3. the backbone by content -------------------------------------------------------------------

def test_backbone_with_a_flipped_weight_byte_is_refused(tiny_artifact, tiny_backbone, tmp_path):
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbone, backbone)
    Predictor.load(tiny_artifact, backbone=str(backbone))  # an exact copy elsewhere is the same backbone
    flip_weight_byte(backbone / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"is not the one model.*differ: \['model.safetensors'\]"):
        Predictor.load(tiny_artifact, backbone=str(backbone))


def test_the_hash_cache_sees_a_file_changed_in_place_with_its_mtime_restored(tiny_artifact, tiny_backbone, tmp_path,
                                                                              monkeypatch):
    from clf_core.model.backbone import backbone_fingerprint

    monkeypatch.setenv("CLF_CACHE_DIR", str(tmp_path / "cache"))
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbone, backbone)
    weights = backbone / "model.safetensors"
    first = backbone_fingerprint(str(backbone))
    assert backbone_fingerprint(str(backbone)) == first
    assert list((tmp_path / "cache" / "sha256").iterdir()), "the weight file's digest is remembered"
    before = weights.stat()
    flip_weight_byte(weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime, same inode
    assert weights.stat().st_mtime_ns == before.st_mtime_ns and weights.stat().st_ino == before.st_ino
    assert backbone_fingerprint(str(backbone))["sha256"] != first["sha256"]
    with pytest.raises(ArtifactError, match="is not the one model"):
        Predictor.load(tiny_artifact, backbone=str(backbone))


@pytest.mark.integration  # starts the local S3 endpoint
def test_remote_backbone_is_fetched_by_content(tiny_artifact, tiny_backbone, s3_bucket, tmp_path, monkeypatch):
    """A damaged cached copy is fetched again; a backbone replaced at the same URI is refused on a
    node that has no verified copy, while a model trained on the new one gets its own copy."""
    from clf_core.model.backbone import backbone_fingerprint

    remote = f"{s3_bucket}/backbones/tiny"
    storage.upload_dir(tiny_backbone, remote)

    def pointing_at(uri: str, name: str, sha256: str | None = None) -> Path:
        directory = copy_of(tiny_artifact, tmp_path / name)

        def edit(m):
            m["backbone"]["id"] = m["config"]["model"]["backbone"] = uri
            if sha256:
                m["backbone"]["sha256"] = sha256
        edit_manifest(directory, edit, reversion=True)
        return directory

    artifact = pointing_at(remote, "model")
    # The version names the backbone by content, not location: moving it keeps the version.
    assert open_artifact(str(artifact)).model_version == open_artifact(tiny_artifact).model_version
    expected = Predictor.load(tiny_artifact).predict(TEXTS).probabilities

    monkeypatch.setenv("CLF_CACHE_DIR", str(tmp_path / "node-1"))
    np.testing.assert_allclose(Predictor.load(str(artifact)).predict(TEXTS).probabilities, expected, atol=1e-6)
    (cached,) = (tmp_path / "node-1" / "backbones").glob("*/model.safetensors")
    flip_weight_byte(cached)  # the node's copy damaged (or fetched before a change)
    np.testing.assert_allclose(Predictor.load(str(artifact)).predict(TEXTS).probabilities, expected, atol=1e-6)
    (cached,) = (tmp_path / "node-1" / "backbones").glob("*/model.safetensors")
    assert cached.read_bytes() == (Path(tiny_backbone) / "model.safetensors").read_bytes(), "fetched again"

    changed = tmp_path / "changed"
    shutil.copytree(tiny_backbone, changed)
    flip_weight_byte(changed / "model.safetensors")
    storage.upload_dir(changed, remote)  # same URI, same file names and sizes, other weights
    monkeypatch.setenv("CLF_CACHE_DIR", str(tmp_path / "node-2"))
    with pytest.raises(ArtifactError, match="replaced at that URI"):
        Predictor.load(str(artifact))
    assert not [p for p in (tmp_path / "node-2" / "backbones").rglob("*") if p.is_file()], "the refused copy is removed"

    retrained = pointing_at(remote, "retrained", backbone_fingerprint(str(changed))["sha256"])
    monkeypatch.setenv("CLF_CACHE_DIR", str(tmp_path / "node-1"))  # holds the original's verified copy
    Predictor.load(str(retrained))
    copies = sorted((tmp_path / "node-1" / "backbones").glob("*/model.safetensors"))
    assert len(copies) == 2 and {p.read_bytes() == (changed / "model.safetensors").read_bytes() for p in copies} == {
        True, False}


def test_weights_load_from_safetensors_only(tiny_artifact, tiny_backbone, tmp_path):
    """A backbone with only a pickled .bin is refused before torch.load could run it."""
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbone, backbone)
    (backbone / "model.safetensors").unlink()
    (backbone / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ClfError, match="holds no .safetensors weights"):
        Predictor.load(tiny_artifact, backbone=str(backbone))


# ---- 4. manifest entries, symlinks, missing keys --------------------------------------------------

@pytest.mark.parametrize("entry", ["../outside.txt", "ABSOLUTE", "tokenizer/../../outside.txt"])
def test_manifest_entry_outside_the_artifact_is_refused(tiny_artifact, tmp_path, entry):
    directory = copy_of(tiny_artifact, tmp_path / "model")
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the artifact")
    entry = str(outside) if entry == "ABSOLUTE" else entry
    edit_manifest(directory, lambda m: m["files"].__setitem__(entry, sha256_file(outside)), reversion=True)
    with pytest.raises(ArtifactError, match=f"lists file '{entry}', which is not a plain relative path"):
        open_artifact(str(directory))


@pytest.mark.parametrize("what", ["file", "folder"])
def test_symlink_in_the_artifact_is_refused(tiny_artifact, tmp_path, what):
    directory = copy_of(tiny_artifact, tmp_path / "model")
    elsewhere = tmp_path / "elsewhere"
    if what == "file":  # the same bytes, so every hash still matches
        target, link = directory / "tokenizer" / "tokenizer.json", "tokenizer/tokenizer.json"
    else:
        target, link = directory / "tokenizer", "tokenizer"
    shutil.move(target, elsewhere)
    (directory / link).symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match=f"holds a symlink, {link} ->"):
        open_artifact(str(directory))


@pytest.mark.parametrize("key", ["files", "backbone", "config", "labels", "model_version", "lora"])
def test_manifest_missing_a_key_is_refused_by_name(tiny_artifact, tmp_path, key):
    directory = copy_of(tiny_artifact, tmp_path / "model")
    edit_manifest(directory, lambda m: m.pop(key), rehash=key != "files")
    with pytest.raises(ArtifactError, match=f"has no '{key}' key"):
        open_artifact(str(directory))
