"""Scoring: load an artifact once, then label batches of texts.

Within each call the texts are sorted by token length and cut into batches, so a batch pads to
rows of nearly equal length (few wasted tokens), then results are put back in input order.
Right padding plus the attention mask means a row gets the same probabilities alone or in any
batch (tested to 1e-4). The probabilities are calibrated: the logits are divided by the
temperature the artifact was calibrated with (clf_core.calibration), so every scorer (this one,
the label job's actors, the bench) gives a row the same calibrated confidence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clf_core.artifact import Artifact, open_artifact
from clf_core.data import TokenStats, encode_batch, token_lengths
from clf_core.errors import ArtifactError, ConfigError
from clf_core.model import (PREQUANTIZED_META, backbone_fingerprint, build_classifier, header_fingerprint, load_tokenizer,
                            load_trainable_state, resolve_backbone, resolve_hardware)

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    labels: list[str]            # predicted class name per text
    label_ids: np.ndarray        # its index in the artifact's label order
    confidence: np.ndarray       # probability of the predicted class
    probabilities: np.ndarray    # (rows, classes), rows sum to 1

    def __len__(self) -> int:
        return len(self.labels)


class Predictor:
    def __init__(self, model, tokenizer, labels: list[str], max_tokens: int, device: torch.device,
                 batch_size: int = 64, model_version: str = "unsaved", temperature: float = 1.0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label_names = list(labels)
        self.max_tokens = max_tokens
        self.device = device
        self.batch_size = batch_size
        self.model_version = model_version
        self.temperature = float(temperature)
        self.stats = TokenStats()

    @classmethod
    def load(cls, artifact: str | Artifact, device: str | None = None, batch_size: int = 64,
             backbone: str | None = None) -> "Predictor":
        """Load a verified artifact. `backbone` overrides where the base weights are read from
        (a node-local copy, or a pre-quantized copy the artifact approves); its content must still
        be what the manifest names (backbone_for)."""
        art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
        cfg = art.config()
        hw = resolve_hardware(cfg.model, device)
        source = backbone_for(art, backbone)
        tokenizer = load_tokenizer(str(art.path / "tokenizer"), cfg.model.max_tokens)
        model = build_classifier(cfg, source, tokenizer, hw, for_training=False)
        try:
            load_trainable_state(model, art.adapter_state())
        except ConfigError as exc:
            raise ArtifactError(f"{art.path / 'adapter.safetensors'} (model {art.model_version}): {exc}") from exc
        log.info("loaded model %s on %s", art.model_version, hw.describe())
        temperature = float(art.manifest.get("calibration", {}).get("temperature", 1.0))  # 1.0: made before calibration
        return cls(model, tokenizer, art.labels, cfg.model.max_tokens, hw.device, batch_size, art.model_version,
                   temperature)

    @torch.inference_mode()
    def predict(self, texts: list[str]) -> Predictions:
        texts = list(texts)
        probabilities = np.zeros((len(texts), len(self.label_names)), dtype=np.float32)
        if texts:
            lengths = token_lengths(self.tokenizer, texts)
            order = np.argsort(lengths, kind="stable")
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch, stats = encode_batch(self.tokenizer, [texts[i] for i in idx], self.max_tokens,
                                            [lengths[i] for i in idx])
                self.stats.add(stats)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logits = self.model(**batch).logits.float()
                probabilities[idx] = torch.softmax(logits / self.temperature, dim=-1).cpu().numpy()
        label_ids = probabilities.argmax(-1)
        return Predictions(
            labels=[self.label_names[i] for i in label_ids],
            label_ids=label_ids,
            confidence=probabilities[np.arange(len(texts)), label_ids] if texts else np.zeros(0, np.float32),
            probabilities=probabilities,
        )


def backbone_for(art: Artifact, override: str | None = None) -> str:
    """The local directory of the backbone `art` was trained on (or `override`), checked by content.

    The check is never skipped. A clf-artifact/2 manifest names the backbone by the sha256 of its
    files and lists the pre-quantized copies its publisher approved; anything else is refused,
    whatever a `prequantized.json` inside the directory claims (it sits beside the weights it would
    vouch for, so it proves nothing). A clf-artifact/1 artifact recorded a fingerprint of headers
    and sizes only: that is checked (a warning says the weights themselves are not), and one that
    recorded none (trained on a hub id not yet downloaded) is refused, as nothing could prove its
    backbone.
    """
    entry = art.manifest["backbone"]
    where = override or entry["id"]
    # The recorded revision pins the hub snapshot of the id the model was trained on.
    revision = None if override else entry.get("revision")
    if art.format_version == 1:
        expected = entry.get("sha256")
        if not expected:
            raise ArtifactError(
                f"model {art.model_version} ({art.path}) is a clf-artifact/1 artifact that recorded no backbone "
                f"fingerprint (trained on {entry['id']!r}), so nothing can show that {where!r} is its backbone. "
                f"Re-train it with this clf_core: clf-artifact/2 names the backbone by the sha256 of its files."
            )
        source = resolve_backbone(where, revision=revision)
        actual = header_fingerprint(source)["sha256"]
        if actual != expected:
            raise ArtifactError(
                f"backbone at {source} (fingerprint {str(actual)[:12]}) is not the one model {art.model_version} "
                f"was trained on (fingerprint {expected[:12]}, {entry['id']}). Point --backbone at the original "
                f"weights (a clf-artifact/1 artifact cannot use a pre-quantized copy)."
            )
        log.warning("model %s is a clf-artifact/1 artifact: its backbone is checked by file headers and sizes only, "
                    "not weight by weight. Re-train to get a clf-artifact/2 artifact, which names it by content.",
                    art.model_version)
        return source
    approved = tuple(entry.get("prequantized", []))
    source = resolve_backbone(where, accepted=(entry["sha256"], *approved), revision=revision)
    actual = backbone_fingerprint(source)
    if actual["sha256"] == entry["sha256"] or actual["sha256"] in approved:
        return source
    if (Path(source) / PREQUANTIZED_META).is_file():
        detail = (f"It is a pre-quantized copy this artifact does not approve; its publisher can approve it "
                  f"with clf_core.prequantize.approve(<artifact URI>, {source!r}).")
    else:
        recorded = entry.get("files", {})
        differ = sorted(n for n in set(recorded) | set(actual["files"]) if recorded.get(n) != actual["files"].get(n))
        detail = f"Files that differ: {differ[:5]}. Point --backbone at the original weights."
    raise ArtifactError(
        f"backbone at {source} (content sha256 {actual['sha256'][:12]}) is not the one model {art.model_version} "
        f"was trained on (sha256 {entry['sha256'][:12]}, {entry['id']}). {detail}"
    )
