"""Train -> evaluate -> save, in one process. The Ray Train job runs the same pieces per worker.

    cfg = ClassifierConfig.load(overrides={"data.text_column": "text"})
    split = stratified_split(read_table(path), "label", cfg.train.split, cfg.train.split_seed)
    run = train_classifier(cfg, split)
    manifest = run.save("out/model", test=split.test)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from clf_core.model.config import SCORING_BATCH_SIZE
from clf_core.model import calibration
from clf_core.model.artifact import save_artifact
from clf_core.model.calibration import Calibration
from clf_core.model.config import ClassifierConfig
from clf_core.model.batching import Collator, token_lengths
from clf_core.model.labels import LabelMap
from clf_core.training.data import LabeledTexts, Split
from clf_core.model.backbone import backbone_fingerprint, resolve_backbone
from clf_core.model.build import (Hardware,
    build_classifier,
    describe_parameters,
    load_tokenizer,
    resolve_pooling,
    resolve_hardware,
    trainable_state)
from clf_core.model.predict import Predictor
from clf_core.training.loop import EpochMetrics, Trainer, class_weights, evaluate, make_loader, seed_everything

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What every training process builds before its loop."""

    cfg: ClassifierConfig
    hw: Hardware
    source: str
    tokenizer: object
    model: object
    labels: LabelMap
    backbone: dict


def prepare(cfg: ClassifierConfig, device: str | torch.device | None = None) -> Prepared:
    seed_everything(cfg.train.seed)
    hw = resolve_hardware(cfg.model, device)
    source = resolve_backbone(cfg.model.backbone)
    # The artifact names the backbone by content (and a backbone without safetensors is refused
    # here, with the fix, before from_pretrained says less).
    backbone = {"id": cfg.model.backbone, **backbone_fingerprint(source)}
    tokenizer = load_tokenizer(source, cfg.model.max_tokens)
    model = build_classifier(cfg, source, tokenizer, hw, for_training=True)
    return Prepared(cfg, hw, source, tokenizer, model, LabelMap(cfg.data.labels), backbone)


def truncation_report(tokenizer, texts: list[str], max_tokens: int) -> dict:
    lengths = token_lengths(tokenizer, texts)
    truncated = sum(1 for n in lengths if n > max_tokens)
    return {"rows": len(texts), "truncated": truncated, "max_tokens": max_tokens,
            "longest": max(lengths, default=0), "mean_tokens": sum(lengths) / max(len(lengths), 1)}


@dataclass
class TrainRun:
    prepared: Prepared
    trainer: Trainer
    token_report: dict = field(default_factory=dict)
    calibration: Calibration | None = None

    def predictor(self, batch_size: int = SCORING_BATCH_SIZE) -> Predictor:
        p = self.prepared
        return Predictor(p.model, p.tokenizer, p.cfg.data.labels, p.cfg.model.max_tokens, p.hw.device, batch_size,
                         temperature=self.calibration.temperature if self.calibration else 1.0)

    def calibrate(self) -> Calibration:
        """Fit the temperature and the review threshold on the validation split (the model holds
        its best weights by now). Held-out figures come from `held_out`."""
        p = self.prepared
        result = evaluate(p.model, self.trainer.val_loader, p.cfg.data.labels, p.hw.device, self.trainer.weights)
        r = p.cfg.review
        self.calibration = calibration.fit(result.logits, result.labels, r.goal, r.value, r.calibrate)
        log.info("calibration on %d validation rows: temperature %.3f; review threshold %.3f (%s %.3g: %.1f%% of "
                 "validation flagged)", self.calibration.validation_rows, self.calibration.temperature,
                 self.calibration.policy.threshold, r.goal, r.value, 100 * self.calibration.policy.expected_flagged)
        return self.calibration

    def evaluation(self, table: pd.DataFrame, name: str = "test split"):
        p = self.prepared
        data = LabeledTexts.from_table(table, p.cfg.data.text_column, p.cfg.data.label_column, p.labels, name)
        loader = make_loader(data, Collator(p.tokenizer, p.cfg.model.max_tokens), p.cfg.train.eval_batch_size,
                             shuffle=False, seed=0)
        return evaluate(p.model, loader, p.cfg.data.labels, p.hw.device, self.trainer.weights)

    def evaluate_table(self, table: pd.DataFrame) -> dict:
        result = self.evaluation(table)
        return {**result.metrics, "loss": result.loss}

    def held_out(self, table: pd.DataFrame) -> tuple[dict, dict]:
        """From one pass over `table` (held out): the classification metrics, and ECE, Brier,
        reliability and risk-coverage before and after calibration."""
        result = self.evaluation(table)
        return ({**result.metrics, "loss": result.loss},
                calibration.evaluate(result.logits, result.labels, self.calibration or self.calibrate()))

    def save(self, directory: str | Path, metrics: dict | None = None, extra_files: dict[str, bytes] | None = None,
             extra_manifest: dict | None = None) -> dict:
        p = self.prepared
        notes = {"parameters": describe_parameters(p.model), "tokens": self.token_report,
                 "history": self.trainer.state.history, "best_epoch": self.trainer.state.best_epoch}
        # The manifest records the pooling actually used, not 'auto'.
        cfg = ClassifierConfig.from_dict(p.cfg.to_dict())
        cfg.model.pooling = resolve_pooling(cfg.model.pooling, p.model.config.model_type)
        return save_artifact(directory, adapter_state=trainable_state(p.model), tokenizer=p.tokenizer, cfg=cfg,
                             backbone=p.backbone, metrics=metrics, extra_files=extra_files, notes=notes,
                             extra_manifest={**(self.calibration or self.calibrate()).manifest_entries(),
                                             **(extra_manifest or {})})


def train_classifier(cfg: ClassifierConfig, split: Split, device: str | None = None,
                     on_epoch_end: Callable[[Trainer, EpochMetrics], None] | None = None) -> TrainRun:
    """Train on split.train, select on split.validation; the returned model holds the best weights."""
    prepared = prepare(cfg, device)
    d, t = cfg.data, cfg.train
    train_data = LabeledTexts.from_table(split.train, d.text_column, d.label_column, prepared.labels, "training split")
    val_data = LabeledTexts.from_table(split.validation, d.text_column, d.label_column, prepared.labels, "validation split")
    collator = Collator(prepared.tokenizer, cfg.model.max_tokens)
    trainer = Trainer(
        prepared.model, t, d.labels, prepared.hw.device,
        train_loader=make_loader(train_data, collator, t.batch_size, shuffle=True, seed=t.seed),
        val_loader=make_loader(val_data, collator, t.eval_batch_size, shuffle=False, seed=t.seed),
        weights=class_weights(train_data.label_ids, len(d.labels), t.class_weights),
    )
    trainer.fit(on_epoch_end=on_epoch_end or log_epoch)
    trainer.restore_best()
    report = truncation_report(prepared.tokenizer, train_data.texts + val_data.texts, cfg.model.max_tokens)
    run = TrainRun(prepared, trainer, report)
    run.calibrate()
    return run


def log_epoch(trainer: Trainer, m: EpochMetrics) -> None:
    log.info("epoch %d: train loss %.4f  val loss %.4f  val acc %.4f  val macro-F1 %.4f  lr %.2g  (%d steps, %.1fs)",
             m.epoch + 1, m.train_loss, m.val_loss, m.val_accuracy, m.val_macro_f1, m.lr, m.steps, m.seconds)
