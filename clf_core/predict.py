"""Scoring: load an artifact once, then label batches of texts.

Within each call the texts are sorted by token length and cut into batches, so a batch pads to
rows of nearly equal length (few wasted tokens), then results are put back in input order.
Right padding plus the attention mask means a row gets the same probabilities alone or in any
batch (tested to 1e-4).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from clf_core.artifact import Artifact, open_artifact
from clf_core.data import TokenStats, encode_batch, token_lengths
from clf_core.errors import ArtifactError
from clf_core.model import backbone_fingerprint, build_classifier, load_tokenizer, load_trainable_state, resolve_backbone, resolve_hardware

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
                 batch_size: int = 64, model_version: str = "unsaved"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label_names = list(labels)
        self.max_tokens = max_tokens
        self.device = device
        self.batch_size = batch_size
        self.model_version = model_version
        self.stats = TokenStats()

    @classmethod
    def load(cls, artifact: str | Artifact, device: str | None = None, batch_size: int = 64,
             backbone: str | None = None) -> "Predictor":
        """Load a verified artifact. `backbone` overrides where the base weights are read from
        (e.g. a node-local copy); its fingerprint must still match the manifest."""
        art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
        cfg = art.config()
        hw = resolve_hardware(cfg.model, device)
        source = resolve_backbone(backbone or art.manifest["backbone"]["id"])
        expected = art.manifest["backbone"].get("sha256")
        actual = backbone_fingerprint(source).get("sha256")
        if expected and actual and expected != actual:
            raise ArtifactError(
                f"backbone at {source} (fingerprint {actual[:12]}) is not the one model "
                f"{art.model_version} was trained on (fingerprint {expected[:12]}, "
                f"{art.manifest['backbone']['id']}). Point --backbone at the original weights."
            )
        tokenizer = load_tokenizer(str(art.path / "tokenizer"), cfg.model.max_tokens)
        model = build_classifier(cfg, source, tokenizer, hw, for_training=False)
        load_trainable_state(model, art.adapter_state())
        log.info("loaded model %s on %s", art.model_version, hw.describe())
        return cls(model, tokenizer, art.labels, cfg.model.max_tokens, hw.device, batch_size, art.model_version)

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
                probabilities[idx] = torch.softmax(logits, dim=-1).cpu().numpy()
        label_ids = probabilities.argmax(-1)
        return Predictions(
            labels=[self.label_names[i] for i in label_ids],
            label_ids=label_ids,
            confidence=probabilities[np.arange(len(texts)), label_ids] if texts else np.zeros(0, np.float32),
            probabilities=probabilities,
        )
