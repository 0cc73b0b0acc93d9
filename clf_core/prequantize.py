"""Quantize a backbone to nf4 once and save the 4-bit weights, so scoring actors skip the work.

    from clf_core.prequantize import prequantize
    prequantize(cfg, "/models/mistral-7b", "/models/mistral-7b-nf4")      # once, on any machine
    Predictor.load("s3://models/ledger-clf/v3", backbone="/models/mistral-7b-nf4")

Every actor that loads a 16-bit base reads 14.5 GB of Mistral-7B weights and quantizes them on
start; a pre-quantized copy is ~4 GB of safetensors that `from_pretrained` loads as they are (the
`quantization_config` saved in its config.json says so). Only the base transformer is saved (no
LM head: the classifier adds its own), next to the tokenizer files.

The artifact's backbone check stays meaningful: `prequantized.json` records the fingerprint of the
weights the copy was made from and of the copy as written; `clf_core.model.backbone_fingerprint`
answers the source's fingerprint only while the copy is unchanged.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from clf_core.config import ClassifierConfig
from clf_core.errors import ConfigError
from clf_core.model import (PREQUANTIZED_META, backbone_fingerprint, directory_fingerprint, quantization_config,
                            resolve_backbone, resolve_hardware)

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def prequantize(cfg: ClassifierConfig, source: str, directory: str | Path, device: str | None = None) -> dict:
    """Quantize `source` (a backbone directory or hub id) as `cfg.model` says and save it into
    `directory` (new or empty); return the metadata written beside it.

    Quantize on the kind of device that will load it: bitsandbytes packs 4-bit weights the same
    way on CPU and GPU, but the compute dtype saved is the quantizing device's (the loader
    replaces it with the loading hardware's, see clf_core.model.load_base)."""
    from transformers import AutoModel

    if cfg.model.quantization == "none":
        raise ConfigError("model.quantization = 'none': there is nothing to pre-quantize. Use 'nf4'.")
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty; pre-quantized weights are written into a new directory")
    local = resolve_backbone(source)
    if (Path(local) / PREQUANTIZED_META).is_file():
        raise ConfigError(f"{source} is already pre-quantized; give the original weights")
    hw = resolve_hardware(cfg.model, device)
    base = AutoModel.from_pretrained(local, quantization_config=quantization_config(cfg.model, hw),
                                     dtype=hw.compute_dtype, device_map={"": hw.device})
    root.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(root, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(local) / name).is_file():
            shutil.copy2(Path(local) / name, root / name)
    meta = {
        "source": {"id": source, **backbone_fingerprint(local)},
        "quantization": {"method": cfg.model.quantization, "double_quant": cfg.model.double_quant,
                         "quantized_on": hw.device.type},
        "fingerprint": directory_fingerprint(str(root)),
    }
    (root / PREQUANTIZED_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    log.info("saved nf4 weights of %s to %s", source, root)
    return meta
