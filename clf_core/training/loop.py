"""The training loop: usable alone (tests, notebooks) and inside a Ray Train worker.

The LR schedule steps on *validation* loss (the training loss keeps falling while the model
overfits), the best weights are kept across all epochs (not the last epoch's), losses are
averaged over the batches they came from and held as floats (no graph kept alive), and
evaluation covers the whole split (not a sample of it).

Under DDP every worker evaluates the *whole* validation split: the LR schedule and early
stopping then see the same number on every rank and cannot diverge. Validation is small
(12.5% of the rows, forward only), so this costs a few percent.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, DistributedSampler

from clf_core.model.config import TrainConfig
from clf_core.model.batching import Collator
from clf_core.training.data import LabeledTexts
from clf_core.model.artifact import sha256_file
from clf_core.errors import CheckpointError
from clf_core.model.metrics import classification_metrics
from clf_core.model.build import load_trainable_state, trainable_state

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(data: LabeledTexts, collator: Collator, batch_size: int, shuffle: bool, seed: int,
                rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader whose shuffle order depends only on (seed, epoch) and whose rows are sharded
    across ranks: a resumed run sees the same batches as an uninterrupted one."""
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=False)
    return DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collator, num_workers=0)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    lr: float
    steps: int
    seconds: float


@dataclass
class TrainState:
    """Everything needed to resume: saved with every checkpoint."""

    next_epoch: int = 0
    global_step: int = 0
    best_val_loss: float = math.inf
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False


@dataclass
class Evaluation:
    loss: float
    metrics: dict
    probabilities: np.ndarray
    logits: np.ndarray | None = None     # (rows, classes): what calibration is fitted on
    labels: np.ndarray | None = None     # true class index per row


def class_weights(label_ids: list[int], num_classes: int, mode: str) -> torch.Tensor | None:
    """'balanced': weight each class by n_rows / (n_classes * n_rows_of_class), so a minority
    class (Income is ~1 in 5 real accounts) counts as much as the majority in the loss."""
    if mode == "none":
        return None
    counts = np.bincount(np.asarray(label_ids, dtype=int), minlength=num_classes).astype(np.float64)
    weights = len(label_ids) / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


def batch_loss(model, batch: dict, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): cross-entropy computed here, in fp32, with optional class weights."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    w = weights.to(logits.device) if weights is not None else None
    return torch.nn.functional.cross_entropy(logits, batch["labels"], weight=w), logits


@torch.inference_mode()
def evaluate(model, loader: DataLoader, labels: list[str], device: torch.device,
             weights: torch.Tensor | None = None) -> Evaluation:
    was_training = model.training
    model.eval()
    total_loss, total_rows, probs, y_true, raw = 0.0, 0, [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, logits = batch_loss(model, batch, weights)
        rows = len(batch["labels"])
        total_loss += float(loss) * rows
        total_rows += rows
        probs.append(torch.softmax(logits, dim=-1).cpu().numpy())
        raw.append(logits.cpu().numpy())
        y_true.append(batch["labels"].cpu().numpy())
    if was_training:
        model.train()
    probabilities = np.concatenate(probs) if probs else np.zeros((0, len(labels)))
    truth = np.concatenate(y_true) if y_true else np.zeros(0, dtype=int)
    metrics = classification_metrics(truth, probabilities.argmax(-1), labels)
    return Evaluation(total_loss / max(total_rows, 1), metrics, probabilities,
                      np.concatenate(raw) if raw else np.zeros((0, len(labels))), truth)


class Trainer:
    """AdamW + gradient clipping + ReduceLROnPlateau(val loss) + early stopping + best weights.

    `model` is the PEFT model whose trainable weights are saved; `forward_model` is what runs
    forward and backward (the same model, or its DistributedDataParallel wrapper).
    """

    def __init__(self, model, cfg: TrainConfig, labels: list[str], device: torch.device,
                 train_loader: DataLoader, val_loader: DataLoader, forward_model=None,
                 weights: torch.Tensor | None = None):
        self.model = model
        self.weights = weights
        self.forward_model = forward_model or model
        self.cfg = cfg
        self.labels = labels
        self.device = device
        self.train_loader = train_loader
        self.val_loader = val_loader
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience
        )
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] = trainable_state(model)

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, on_epoch_end: Callable[["Trainer", EpochMetrics], None] | None = None) -> TrainState:
        cfg, st = self.cfg, self.state
        while st.next_epoch < cfg.epochs and not st.stopped_early and not self._out_of_steps():
            epoch = st.next_epoch
            started = time.perf_counter()
            train_loss, steps = self._train_one_epoch(epoch)
            evaluation = evaluate(self.forward_model, self.val_loader, self.labels, self.device, self.weights)
            self.scheduler.step(evaluation.loss)  # on validation loss, once per epoch
            score = self._selection_score(evaluation)
            # The same relative threshold ReduceLROnPlateau uses: noise-sized gains do not count.
            improved = score > st.best_score + 1e-4 * abs(st.best_score) if math.isfinite(st.best_score) else True
            if improved:
                st.best_score, st.best_val_loss, st.best_epoch = score, evaluation.loss, epoch
                st.epochs_without_improvement = 0
                self.best_weights = trainable_state(self.model)
            else:
                st.epochs_without_improvement += 1
            patience = cfg.early_stopping_patience
            st.stopped_early = bool(patience) and st.epochs_without_improvement >= patience
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=train_loss,
                val_loss=evaluation.loss,
                val_accuracy=evaluation.metrics["accuracy"],
                val_macro_f1=evaluation.metrics["macro_f1"],
                lr=self.optimizer.param_groups[0]["lr"],
                steps=steps,
                seconds=time.perf_counter() - started,
            )
            st.history.append(asdict(metrics))
            st.next_epoch = epoch + 1
            if on_epoch_end:
                on_epoch_end(self, metrics)
        return st

    def _selection_score(self, evaluation: Evaluation) -> float:
        """Higher is better. macro-F1 (ties broken by lower loss) is what the report judges;
        validation loss keeps rising on an over-confident but still improving classifier."""
        if self.cfg.select_metric == "val_macro_f1":
            return evaluation.metrics["macro_f1"] - 1e-6 * evaluation.loss
        return -evaluation.loss

    def _out_of_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.state.global_step >= self.cfg.max_steps

    def _train_one_epoch(self, epoch: int) -> tuple[float, int]:
        self.forward_model.train()
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        params = [p for p in self.model.parameters() if p.requires_grad]
        total_loss, total_rows, steps = 0.0, 0, 0
        for batch in self.train_loader:
            if self._out_of_steps():
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss, _ = batch_loss(self.forward_model, batch, self.weights)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            self.optimizer.step()
            rows = len(batch["labels"])
            total_loss += float(loss.detach()) * rows
            total_rows += rows
            steps += 1
            self.state.global_step += 1
        return total_loss / max(total_rows, 1), steps

    def restore_best(self) -> None:
        load_trainable_state(self.model, self.best_weights)

    # ---- checkpoints (safetensors + JSON: nothing here is unpickled) --------------------------
    def save_checkpoint(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state(self.model), directory / "weights.safetensors")
        save_file(self.best_weights, directory / "best_weights.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
        save_file(opt_tensors, directory / "optimizer.safetensors")
        meta = {
            "train_state": asdict(self.state),
            "optimizer": opt_meta,
            "scheduler": self.scheduler.state_dict(),
            "files": {name: sha256_file(directory / name) for name in CHECKPOINT_TENSOR_FILES},
        }
        # Written last, and it names every other file's hash: a checkpoint without state.json, or
        # with a file cut short or changed after it was written, is never restored.
        (directory / "state.json").write_text(json.dumps(meta))
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        directory = Path(directory)
        meta = read_checkpoint_state(directory)
        load_trainable_state(self.model, load_file(directory / "weights.safetensors"))
        self.best_weights = load_file(directory / "best_weights.safetensors")
        self.optimizer.load_state_dict(
            _unflatten_optimizer(load_file(directory / "optimizer.safetensors"), meta["optimizer"])
        )
        self.scheduler.load_state_dict(meta["scheduler"])
        self.state = TrainState(**meta["train_state"])


CHECKPOINT_TENSOR_FILES = ("weights.safetensors", "best_weights.safetensors", "optimizer.safetensors")


def read_checkpoint_state(directory: Path) -> dict:
    """state.json of a complete checkpoint whose files are exactly those it recorded."""
    state_path = directory / "state.json"
    if not state_path.exists():
        raise CheckpointError(f"{directory} holds no state.json: an incomplete checkpoint, not restored")
    try:
        meta = json.loads(state_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_path} is not valid JSON ({exc}): a half-written checkpoint, not restored") from exc
    for name, expected in meta.get("files", {}).items():
        path = directory / name
        actual = sha256_file(path) if path.exists() else "missing"
        if actual != expected:
            raise CheckpointError(
                f"checkpoint file {path} is {'missing' if actual == 'missing' else 'not the file written'} "
                f"(sha256 {actual[:12]}, recorded {expected[:12]}): a half-written or altered checkpoint, "
                f"not restored. Resume from an earlier checkpoint or start the run again."
            )
    return meta


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for param_id, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    # Optimizer.load_state_dict moves each state tensor to its parameter's device itself.
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, key = flat.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
