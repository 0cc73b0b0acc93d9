"""Quantize a backbone to nf4 once and save the 4-bit weights, so scoring actors skip the work.

    from clf_core.model.prequantize import prequantize, approve
    prequantize(cfg, "/models/mistral-7b", "/models/mistral-7b-nf4")      # once, on any machine
    approve("s3://models/ledger-clf/v3", "/models/mistral-7b-nf4")         # the publisher, once
    Predictor.load("s3://models/ledger-clf/v3", backbone="/models/mistral-7b-nf4")

Every actor that loads a 16-bit base reads 14.5 GB of Mistral-7B weights and quantizes them on
start; a pre-quantized copy is ~4 GB of safetensors that `from_pretrained` loads as they are (the
`quantization_config` saved in its config.json says so). Only the base transformer is saved (no
LM head: the classifier adds its own), next to the tokenizer files.

The artifact's backbone check stays meaningful: an artifact accepts a pre-quantized copy only when
its manifest lists the copy's content hash (`approve` adds it, clf_core.model.artifact.approve_backbone_copy).
`prequantized.json` beside the weights records where they came from, for people and for
`approve`'s checks; nothing trusts it when loading, since anyone who can change the weights can
change it too.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from clf_core.model.artifact import approve_backbone_copy, open_artifact
from clf_core.model.config import ClassifierConfig
from clf_core.errors import ArtifactError, ConfigError
from clf_core.model.backbone import PREQUANTIZED_META, backbone_fingerprint, resolve_backbone
from clf_core.model.build import quantization_config, resolve_hardware
from clf_core.settings import check, setting

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


@dataclass
class PrequantizeSettings:
    model: str = setting("The published model (artifact) whose backbone to quantize.", default="", required=True)
    output: str = setting("A new local directory for the 4-bit copy.", default="", required=True)
    device: str = setting("Quantize on this device (cuda, cpu; default: the model's setting). Use the kind that will "
                          "score.", default="", choices=("", "cpu", "cuda"))

    def validate(self) -> "PrequantizeSettings":
        return check(self)

def prequantize(cfg: ClassifierConfig, source: str, directory: str | Path, device: str | None = None) -> dict:
    """Quantize `source` (a backbone directory or hub id) as `cfg.model` says and save it into
    `directory` (new or empty); return the metadata written beside it, plus `sha256`: the copy's
    content hash, which an artifact must list before it loads with the copy (see `approve`).

    Quantize on the kind of device that will load it: bitsandbytes packs 4-bit weights the same
    way on CPU and GPU, but the compute dtype saved is the quantizing device's (the loader
    replaces it with the loading hardware's, see clf_core.model.build.load_base)."""
    from transformers import AutoModel

    if cfg.model.quantization == "none":
        raise ConfigError("model.quantization = 'none': there is nothing to pre-quantize. Use 'nf4'.")
    root = Path(directory)
    local = resolve_backbone(source)
    if (Path(local) / PREQUANTIZED_META).is_file():
        raise ConfigError(f"{source} is already pre-quantized; give the original weights")
    hw = resolve_hardware(cfg.model, device)
    if root.exists() and any(root.iterdir()):
        # a re-run (the README's command pasted twice) finds its own copy: kept, not redone
        made = earlier_copy(root, cfg, local, hw.device.type)
        if made is None:
            raise ConfigError(f"{root} is not empty and holds no {cfg.model.quantization} copy of {source} made "
                              f"with these settings; give a new directory for the pre-quantized weights")
        log.info("%s already holds the %s weights of %s (content sha256 %s); kept", root, cfg.model.quantization,
                 source, made["sha256"][:12])
        return made
    base = AutoModel.from_pretrained(local, quantization_config=quantization_config(cfg.model, hw),
                                     dtype=hw.compute_dtype, device_map={"": hw.device}, use_safetensors=True)
    root.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(root, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(local) / name).is_file():
            shutil.copy2(Path(local) / name, root / name)
    meta = {
        "source": {"id": source, "sha256": backbone_fingerprint(local)["sha256"]},
        "quantization": {"method": cfg.model.quantization, "double_quant": cfg.model.double_quant,
                         "quantized_on": hw.device.type},
    }
    (root / PREQUANTIZED_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    own = backbone_fingerprint(str(root))["sha256"]  # after prequantized.json: it is part of the copy
    log.info("saved nf4 weights of %s to %s (content sha256 %s)", source, root, own[:12])
    return {**meta, "sha256": own}


def earlier_copy(root: Path, cfg: ClassifierConfig, local: str, device_type: str) -> dict | None:
    """What `prequantize` returned when it made `root` from the backbone at `local` with these
    settings, or None when `root` holds anything else (the hashes are checked again on approval
    and on every load; this only decides whether to quantize)."""
    try:
        meta = json.loads((root / PREQUANTIZED_META).read_text())
    except (OSError, ValueError):
        return None
    wanted = {"method": cfg.model.quantization, "double_quant": cfg.model.double_quant, "quantized_on": device_type}
    if meta.get("quantization") != wanted or meta.get("source", {}).get("sha256") != backbone_fingerprint(local)["sha256"]:
        return None
    return {**meta, "sha256": backbone_fingerprint(str(root))["sha256"]}


def approve(artifact: str, copy: str | Path) -> str:
    """The publisher's step: let `artifact` (a local directory or URI) load with the pre-quantized
    `copy` as its backbone; return the copy's content hash, now listed in the manifest.

    Checks first that the copy was quantized from this artifact's backbone with its quantization
    settings, so a mix-up (another backbone's copy, double_quant off) is caught here rather than
    scoring with other weights. Those checks read the copy's own files, which is sound only
    because the publisher runs this on a copy it just made; loaders never trust them.
    """
    art = open_artifact(artifact)
    root = Path(copy)
    try:
        meta = json.loads((root / PREQUANTIZED_META).read_text())
        quant = json.loads((root / "config.json").read_text()).get("quantization_config", {})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{root} is not a pre-quantized copy made by clf_core.model.prequantize ({exc}); make one "
                          f"with prequantize(cfg, <backbone>, {str(root)!r}).") from exc
    expected = art.manifest["backbone"].get("sha256")
    if meta.get("source", {}).get("sha256") != expected:
        raise ArtifactError(
            f"{root} was quantized from a backbone with content sha256 "
            f"{str(meta.get('source', {}).get('sha256'))[:12]}, not from model {art.model_version}'s "
            f"({str(expected)[:12]}, {art.manifest['backbone']['id']}). Pre-quantize that backbone instead."
        )
    cfg = art.config()
    made = (quant.get("bnb_4bit_quant_type"), quant.get("bnb_4bit_use_double_quant"))
    if made != (cfg.model.quantization, cfg.model.double_quant):
        raise ArtifactError(
            f"{root} was quantized as {made[0]!r} with double_quant={made[1]}, but model {art.model_version} "
            f"uses {cfg.model.quantization!r} with double_quant={cfg.model.double_quant}. Pre-quantize with "
            f"the artifact's config: prequantize(open_artifact(...).config(), ...)."
        )
    sha256 = backbone_fingerprint(str(root))["sha256"]
    approve_backbone_copy(str(artifact), sha256)
    return sha256
