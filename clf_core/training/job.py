"""The training job as a library: read and split the data on the driver, fine-tune under Ray
Train, publish the artifact. `python -m jobs.train` is its command line; the demo and the bench
call `run` and `train_worker` with the same typed objects.

    read (+ reviewers' answers) + split (driver: bad input fails here)
    -> TorchTrainer(train_worker) on N workers
      each worker: load the 4-bit base, DDP over LoRA + head, checkpoint every epoch
      (a lost worker resumes from the last one)
    -> rank 0: best weights -> calibrate on validation -> evaluate held-out -> publish artifact
       (to --output, or into --registry under --name/<model_version>/)

With --corrections, the answers of a corrections table (clf_core.review.corrections) join the
data after the file's texts are split: an answer overrides the file's label for the same text (in
whichever split the text is), an answered text the file lacks is added to training, and a text is
in one split only. The snapshot used, the counts and the answered texts held out for the test
split go into the manifest (`training.corrections`): the promotion gate compares models on the
answers neither was trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from clf_core import storage
from clf_core.model.config import ClassifierConfig
from clf_core.model.labels import LabelMap, read_table
from clf_core.training.data import ANSWERED, Split, answers_into_splits, stratified_split
from clf_core.errors import ClfError, ConfigError, DataError
from clf_core.logs import setup_logging
from clf_core.model.registry import version_uri
from clf_core.settings import check, setting

log = logging.getLogger("jobs.train")


@dataclass
class TrainJobSettings:
    """Where the data comes from and goes, and how many Ray Train workers run it (the model and
    its training recipe are the ClassifierConfig)."""
    output: str = setting("Where to publish the artifact (local dir or s3:// prefix). Never overwritten silently. "
                          "Or --registry and --name.", default="")
    registry: str = setting("Publish into this model registry (local folder or s3://) as --name/<model_version>/; "
                            "python -m jobs.promote then moves the alias the scoring jobs use.", default="")
    name: str = setting("The model's name in --registry, e.g. income-expense.", pattern=r"[A-Za-z0-9][A-Za-z0-9._-]*",
                        hint="use letters, digits, '.', '_' or '-', e.g. income-expense", default="")
    catalog: str = setting("The pyiceberg catalog of --corrections.", default="")
    corrections: str = setting("Also learn from reviewers' answers in this corrections table (python -m jobs.review "
                               "import): the file's texts are split first, then an answer overrides the file's label for "
                               "the same text, and answered texts the file lacks are added to training. Scoped answers "
                               "join only where every scope agrees.",
                               default="")
    data: str = setting("Labeled CSV/Parquet (local or s3://), split stratified into train/validation/test.",
                        default="")
    train_data: str = setting("Explicit training file (with --validation-data, optional --test-data) instead of "
                              "--data.", default="")
    validation_data: str = setting("Explicit validation file.", default="")
    test_data: str = setting("Explicit held-out test file (default: none, the report then uses validation).",
                             default="")
    overwrite: bool = setting("Replace an artifact already published at --output.", default=False)
    checkpoints: str = setting("Checkpoint storage (local or s3://). Default: <output>-checkpoints beside --output.",
                               default="")
    num_workers: int = setting("Ray Train workers (one per GPU with --use-gpu).", at_least=1, default=1)
    use_gpu: bool = setting("Give each worker one GPU.", default=False)
    cpus_per_worker: float = setting("CPUs reserved per worker.", above=0, default=1.0)
    max_failures: int = setting("Worker-group restarts allowed; each resumes from the last checkpoint.",
                                at_least=0, default=3)
    limit_rows: int = setting("Smoke size: use only this many rows (stratified sample) of --data.",
                              at_least=0, hint="0 = every row", default=0)
    # How the model and its recipe (ClassifierConfig) are given: a YAML file, then the config's own
    # flags (--lr, --base-model, ...), then --set; the later wins (jobs/train.py, config_from_args).
    config: str = setting("YAML config (sections model/lora/data/train/review); the flags below override it.",
                          default="")
    overrides: list[str] = setting("Override any config field, e.g. --set lora.r=16 (repeatable).", flag="--set",
                                   default_factory=list)
    review_fraction: float | None = setting(
        "Choose the default review threshold on validation to flag this share of rows, the least confident "
        "(e.g. 0.08). [review.goal=fraction, review.value]", default=None)
    review_target_error: float | None = setting(
        "Choose it to flag as few rows as keep the expected error rate among the rows not flagged at most RATE "
        "(e.g. 0.01). [review.goal=target_error, review.value]", default=None)

    def validate(self) -> "TrainJobSettings":
        extra = []
        if self.output.strip() and (self.registry or self.name):
            extra.append("give either --output or --registry with --name, not both")
        elif not self.output.strip() and not (self.registry and self.name):
            extra.append("--output is required (a local folder or s3:// URI), or --registry and --name to publish "
                         "into a model registry")
        if self.corrections and not self.catalog:
            extra.append("--corrections needs --catalog (the pyiceberg catalog it lives in)")
        if self.data and (self.train_data or self.validation_data):
            extra.append("give either --data (one file, split for you) or --train-data + --validation-data, not both")
        elif not self.data and not (self.train_data and self.validation_data):
            extra.append("no training data: pass --data FILE, or --train-data and --validation-data")
        if self.review_fraction is not None and self.review_target_error is not None:
            extra.append("give either --review-fraction or --review-target-error, not both")
        return check(self, extra)

    def classifier_config(self, flag_values: dict[str, Any] | None = None) -> ClassifierConfig:
        """The model and its recipe: --config, then the config's own flags (`flag_values`,
        {dotted field: value}), then --set; the later wins. Checked (ConfigError)."""
        overrides = dict(flag_values or {})
        if self.review_fraction is not None:
            overrides.update({"review.goal": "fraction", "review.value": self.review_fraction})
        if self.review_target_error is not None:
            overrides.update({"review.goal": "target_error", "review.value": self.review_target_error})
        for item in self.overrides:
            field_name, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set lora.r=16")
            overrides[field_name.strip()] = value
        return ClassifierConfig.load(self.config or None, overrides)

    @property
    def checkpoint_uri(self) -> str:
        if self.checkpoints:
            return self.checkpoints
        if self.registry:
            return storage.join(self.registry, self.name, "checkpoints")
        return self.output.rstrip("/") + "-checkpoints"

    def run_name(self, cfg: ClassifierConfig) -> str:
        """Ray Train's run name under checkpoint_uri: a re-submitted job resumes from that run's last
        checkpoint. With --output, the artifact's folder name; in a registry, the name and a hash
        of what is trained (data, answers, recipe), so the same job resumes and a new one starts afresh."""
        if not self.registry:
            return os.path.basename(self.output.rstrip("/")) or "train"
        what = json.dumps([self.data, self.train_data, self.validation_data, self.test_data, self.limit_rows,
                           self.corrections, cfg.to_dict()], sort_keys=True, default=str)
        return f"{self.name}-{hashlib.sha256(what.encode()).hexdigest()[:10]}"

@dataclass
class WorkerJob:
    """What crosses into every Ray Train worker: typed, built and validated on the driver."""
    cfg: ClassifierConfig
    split: Split
    output: str                   # the artifact's URI, or "" to publish into registry/name/<version>
    overwrite: bool = False
    cpus_per_worker: float = 1.0
    world_size: int = 1
    data_description: str = ""
    registry: str = ""
    name: str = ""
    corrections: dict | None = None   # what the answers contributed (manifest `training.corrections`)
    published_marker: str = ""        # where rank 0 writes the URI it published to, for the driver


def load_split(settings: TrainJobSettings, cfg: ClassifierConfig) -> tuple[Split, dict | None]:
    """Read (with the reviewers' answers, if asked) and split the labeled data on the driver;
    every input problem is raised here. Returns the split and what the answers contributed."""
    d = cfg.data
    columns = [d.text_column, d.label_column]
    labels = LabelMap(d.labels)
    contribution = None
    if settings.data:
        table = read_table(settings.data, columns)
        labels.encode(table[d.label_column].tolist(), where=settings.data)
        if settings.limit_rows and settings.limit_rows < len(table):
            table = table.groupby(d.label_column, group_keys=False).sample(
                frac=settings.limit_rows / len(table), random_state=0)
        if not settings.corrections:
            split = stratified_split(table, d.label_column, cfg.train.split, cfg.train.split_seed)
        else:
            # The file's texts are split as they would be without answers (one split per text),
            # then the answers land where their text is: the model trained without them and the
            # one trained with them differ by the answers alone, not by another draw of the split.
            table = table.drop_duplicates(subset=[d.text_column], keep="first")
            split = stratified_split(table, d.label_column, cfg.train.split, cfg.train.split_seed)
            parts, contribution = answers_into_splits(vars(split), d, settings.catalog, settings.corrections)
            split = Split(**parts)
    else:
        parts = {}
        for name, uri in (("train", settings.train_data), ("validation", settings.validation_data),
                          ("test", settings.test_data)):
            if uri:
                parts[name] = read_table(uri, columns)
                labels.encode(parts[name][d.label_column].tolist(), where=uri)
        if settings.corrections:
            parts, contribution = answers_into_splits(parts, d, settings.catalog, settings.corrections)
        split = Split(parts["train"], parts["validation"], parts.get("test", parts["validation"]))
    for name, part in (("train", split.train), ("validation", split.validation)):
        missing = sorted(set(d.labels) - set(part[d.label_column].astype(str)))
        if missing:
            raise DataError(f"the {name} split has no rows of class(es) {missing}; add rows or drop them from --labels")
    if contribution is not None:
        held_out = split.test[split.test[ANSWERED]] if ANSWERED in split.test else split.test.iloc[0:0]
        contribution["held_out"] = sorted(held_out[d.text_column].astype(str))
    return split, contribution


# ---- what every Ray Train worker runs ----------------------------------------------------------
def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker; `config["job"]` is the driver's WorkerJob."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    from clf_core.model.batching import Collator
    from clf_core.training.data import LabeledTexts
    from clf_core.training.recipe import prepare, truncation_report
    from clf_core.training.loop import Trainer, class_weights, make_loader

    setup_logging()
    job: WorkerJob = config["job"]
    cfg, split = job.cfg, job.split
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(job.cpus_per_worker)))  # no oversubscription of shared cores
    prepared = prepare(cfg, ray.train.torch.get_device())
    model = prepared.model
    # DDP over the trainable (LoRA + head) weights only; the 4-bit base is frozen on every rank.
    forward_model = model
    if world > 1:
        forward_model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp")
    d, t = cfg.data, cfg.train
    train_data = LabeledTexts.from_table(split.train, d.text_column, d.label_column, prepared.labels, "train")
    val_data = LabeledTexts.from_table(split.validation, d.text_column, d.label_column, prepared.labels, "validation")
    collator = Collator(prepared.tokenizer, cfg.model.max_tokens)
    trainer = Trainer(
        model, t, d.labels, prepared.hw.device,
        # Each rank trains on its own 1/world of every epoch's shuffled rows.
        train_loader=make_loader(train_data, collator, t.batch_size, True, t.seed, rank, world),
        # Every rank validates on all of it, so LR schedule and early stopping agree across ranks.
        val_loader=make_loader(val_data, collator, t.eval_batch_size, False, t.seed),
        forward_model=forward_model,
        weights=class_weights(train_data.label_ids, len(d.labels), t.class_weights),
    )
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            trainer.load_checkpoint(directory)
        resumed_from = trainer.state.next_epoch
        if rank == 0:
            log.info("resumed from checkpoint after epoch %d", resumed_from)

    def on_epoch_end(tr: Trainer, m) -> None:
        if rank == 0:
            log.info("epoch %d/%d: train loss %.4f  val loss %.4f  val acc %.4f  val macro-F1 %.4f  lr %.2g  %.1fs",
                     m.epoch + 1, t.epochs, m.train_loss, m.val_loss, m.val_accuracy, m.val_macro_f1, m.lr, m.seconds)
        metrics = {**asdict(m), "resumed_from_epoch": resumed_from, "world_size": world}
        with tempfile.TemporaryDirectory() as tmp:
            # Only rank 0 writes: the trainable weights are identical on every rank under DDP.
            ckpt = Checkpoint.from_directory(tr.save_checkpoint(tmp)) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)

    trainer.fit(on_epoch_end)
    if rank == 0:
        trainer.restore_best()
        evaluate_and_publish(job, prepared, trainer, resumed_from,
                             truncation_report(prepared.tokenizer, train_data.texts + val_data.texts,
                                               cfg.model.max_tokens))


def evaluate_and_publish(job: WorkerJob, prepared, trainer, resumed_from, token_report) -> None:
    """Rank 0, best weights: calibrate on validation, evaluate the held-out split, publish."""
    from clf_core.model.artifact import publish
    from clf_core.training.recipe import TrainRun
    from clf_core.training.report import build_report

    cfg, split = job.cfg, job.split
    run = TrainRun(prepared, trainer, token_report)
    run.calibrate()  # the temperature and the review threshold, on the validation split
    test_metrics, calibration = run.held_out(split.test)
    answered = split.test[split.test[ANSWERED]] if ANSWERED in split.test else split.test.iloc[0:0]
    if job.corrections is not None:
        on_answers = run.evaluate_table(answered)["accuracy"] if len(answered) else None
        job.corrections["held_out_accuracy"] = on_answers
        log.info("held-out reviewed rows: %s", f"accuracy {on_answers:.4f} ({len(answered)} rows)" if len(answered)
                 else "none (no answered text fell in the test split)")
    log.info("held-out test: accuracy %.4f  macro-F1 %.4f (%d rows); ECE %.4f -> %.4f calibrated; review threshold "
             "%.3f flags %.1f%% and catches %d of %d errors", test_metrics["accuracy"], test_metrics["macro_f1"],
             test_metrics["rows"], calibration["ece"]["before"], calibration["ece"]["after"],
             calibration["review"]["threshold"], 100 * calibration["review"]["flagged"],
             calibration["review"]["errors_caught"], calibration["review"]["errors"])
    summary = {
        "data": job.data_description,
        "backbone": cfg.model.backbone,
        "rows": {"train": len(split.train), "validation": len(split.validation), "test": len(split.test)},
        "best_epoch": trainer.state.best_epoch,
        "stopped_early": trainer.state.stopped_early,
        "resumed_from_epoch": resumed_from,
        "tokens": token_report,
        "world_size": job.world_size,
    }
    if job.corrections is not None:
        summary["corrections"] = {k: v for k, v in job.corrections.items() if k != "held_out"}
    files = build_report(test_metrics, trainer.state.history, summary, calibration)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = run.save(os.path.join(tmp, "artifact"), extra_files=files,
                            metrics={"test": test_metrics, "resumed_from_epoch": resumed_from,
                                     "calibration": {k: calibration[k] for k in ("temperature", "ece", "brier", "review")}},
                            extra_manifest={"training": {"data": job.data_description,
                                                         "corrections": job.corrections}})
        target = job.output or version_uri(job.registry, job.name, manifest["model_version"])
        publish(os.path.join(tmp, "artifact"), target, overwrite=job.overwrite)
    if job.published_marker:
        storage.write_bytes(job.published_marker, json.dumps({"uri": target}).encode())
    log.info("published model %s to %s", manifest["model_version"], target)


# ---- the driver ----------------------------------------------------------------------------------
def torch_trainer(job: WorkerJob, *, name: str, checkpoints: str, use_gpu: bool = False, max_failures: int = 0,
                  keep_checkpoints: int = 2):
    """The TorchTrainer that runs `train_worker` on `job.world_size` workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from clf_core.runtime import train_logging_config

    # Checkpoints go through the same fsspec filesystem as everything else we store (s3fs for
    # s3://): one storage layer, one set of credentials and endpoint rules. Arrow's own S3 client
    # uploads even tiny marker files as multipart, which some S3-compatible stores reject.
    storage_fs, storage_path = None, checkpoints
    if storage.is_remote(checkpoints):
        import pyarrow.fs as pafs

        fs, storage_path = storage.filesystem(checkpoints)
        storage_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=job.world_size, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": job.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             logging_config=train_logging_config()),  # its worker-group lines only with --verbose
    )


def check_output(settings: TrainJobSettings) -> None:
    if settings.registry:   # a version's folder is named by its content: two models never share one
        return
    if storage.exists(storage.join(settings.output, "manifest.json")) and not settings.overwrite:
        raise ConfigError(f"an artifact is already published at {settings.output}; choose a new --output "
                          f"(e.g. a new version suffix) or pass --overwrite")


def run(settings: TrainJobSettings, cfg: ClassifierConfig) -> int:
    """The whole job on the driver: checks, split, Ray Train, then a summary of what was
    published. Returns the exit status: 0 published, 1 training failed, 2 bad input."""
    started = time.monotonic()
    try:
        settings.validate()
        check_output(settings)
        split, contribution = load_split(settings, cfg)
    except ClfError as exc:
        problem = storage.access_problem(exc)   # the object store, not the input: a run-time failure
        log.error("%s", problem or exc)
        return 1 if problem else 2
    log.info("data: %d train / %d validation / %d test rows, labels %s",
             len(split.train), len(split.validation), len(split.test), cfg.data.labels)
    from clf_core.runtime import ensure_ray

    ensure_ray()
    run_name = settings.run_name(cfg)
    marker = storage.join(settings.checkpoint_uri, run_name, "published.json")
    job = WorkerJob(cfg=cfg, split=split, output=settings.output, overwrite=settings.overwrite,
                    cpus_per_worker=settings.cpus_per_worker, world_size=settings.num_workers,
                    data_description=settings.data or settings.train_data, registry=settings.registry,
                    name=settings.name, corrections=contribution, published_marker=marker)
    trainer = torch_trainer(job, name=run_name, checkpoints=settings.checkpoint_uri, use_gpu=settings.use_gpu,
                            max_failures=settings.max_failures)
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; show the cause, not a wall of frames
        log.error("training failed: %s", exc)
        return 1
    published = json.loads(storage.read_text(marker))["uri"]
    print(published_summary(published, storage.join(settings.checkpoint_uri, run_name), time.monotonic() - started))
    return 0


def published_summary(output: str, checkpoints: str, seconds: float) -> str:
    from clf_core.model.artifact import open_artifact

    artifact = open_artifact(output)
    manifest = artifact.manifest
    test, review = manifest["metrics"]["test"], manifest.get("review", {})
    answers = (manifest.get("training") or {}).get("corrections")
    used = ([f"  reviewers' answers from {answers['table']} (snapshot {answers['snapshot_id']}): {answers['answers']} "
             f"used ({answers['overrides']} overrides, {answers['confirmed']} confirmations, {answers['added']} new "
             f"texts); held-out reviewed rows: "
             + (f"accuracy {answers['held_out_accuracy']:.4f} on {len(answers['held_out'])}"
                if answers.get("held_out_accuracy") is not None else "none")] if answers else [])
    return "\n".join([
        f"\nmodel {artifact.model_version} published to {output}",
        *used,
        f"  held-out test: macro-F1 {test['macro_f1']:.4f}  accuracy {test['accuracy']:.4f}  ({test['rows']} rows)",
        f"  confidence calibrated (temperature {manifest.get('calibration', {}).get('temperature', 1.0):.3f}); "
        f"review threshold {artifact.review_threshold:.3f} ({review.get('goal')} {review.get('value')})",
        f"  report: {storage.join(output, 'report.md')} (confusion_matrix.png, curves.png, reliability.png, "
        f"risk_coverage.png)",
        f"  checkpoints: {checkpoints}",
        f"  {seconds:.0f}s"])
