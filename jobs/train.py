"""Fine-tune the QLoRA ledger classifier with Ray Train and publish a versioned model artifact.

Run as (local Ray is started for you; small offline backbone, a few minutes on a laptop):

    python -m jobs.train --data clf_core/sample_data/coa_income_expense.csv --text-column full_path \\
        --output runs/models/income-expense-v1

On a cluster (Mistral-7B on GPU workers, data and artifact in S3):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.train --config configs/mistral_7b_qlora.yaml \\
        --data s3://ledgers/labeled/train.parquet --output s3://models/income-expense/v7 \\
        --num-workers 2 --use-gpu

Flow: config -> validate -> read + split the data on the driver (bad input fails here, before
any worker starts) -> Ray Train workers fine-tune (each loads the 4-bit base on its own device,
DDP over the LoRA + head weights, checkpoints every epoch, a lost worker resumes from the last
checkpoint) -> rank 0 evaluates the best weights on the held-out split and publishes the
artifact with its report.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict

from clf_core import storage
from clf_core.config import ClassifierConfig, field_help
from clf_core.data import LabelMap, Split, read_table, stratified_split
from clf_core.errors import ClfError, DataError
from clf_core.logs import setup_logging

log = logging.getLogger("jobs.train")

# flag -> config field; each flag's help text is the field's own.
CONFIG_FLAGS = {
    "--base-model": "model.backbone",
    "--text-column": "data.text_column",
    "--label-column": "data.label_column",
    "--labels": "data.labels",
    "--epochs": "train.epochs",
    "--max-steps": "train.max_steps",
    "--batch-size": "train.batch_size",
    "--lr": "train.lr",
    "--quantization": "model.quantization",
    "--compute-dtype": "model.compute_dtype",
    "--max-tokens": "model.max_tokens",
    "--seed": "train.seed",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="Labeled CSV/Parquet (local or s3://), split stratified into train/validation/test.")
    p.add_argument("--train-data", help="Explicit training file (with --validation-data, optional --test-data) instead of --data.")
    p.add_argument("--validation-data", help="Explicit validation file.")
    p.add_argument("--test-data", help="Explicit held-out test file (default: none, the report then uses validation).")
    p.add_argument("--output", required=True, help="Where to publish the artifact (local dir or s3:// prefix). Never overwritten silently.")
    p.add_argument("--overwrite", action="store_true", help="Replace an artifact already published at --output.")
    p.add_argument("--checkpoints", help="Checkpoint storage (local or s3://). Default: <output>-checkpoints beside --output.")
    p.add_argument("--config", help="YAML config (sections model/lora/data/train); the flags below override it.")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="Override any config field, e.g. --set lora.r=16 (repeatable).")
    for flag, field in CONFIG_FLAGS.items():
        p.add_argument(flag, dest=field, help=f"{field_help(field)} [{field}]")
    review = p.add_mutually_exclusive_group()
    review.add_argument("--review-fraction", type=float, metavar="SHARE",
                        help="Choose the default review threshold on validation to flag this share of rows, the least "
                             "confident (e.g. 0.08). [review.goal=fraction, review.value]")
    review.add_argument("--review-target-error", type=float, metavar="RATE",
                        help="Choose it to flag as few rows as keep the expected error rate among the rows not flagged "
                             "at most RATE (e.g. 0.01). [review.goal=target_error, review.value]")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (one per GPU with --use-gpu).")
    p.add_argument("--use-gpu", action="store_true", help="Give each worker one GPU.")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker.")
    p.add_argument("--max-failures", type=int, default=3, help="Worker-group restarts allowed; each resumes from the last checkpoint.")
    p.add_argument("--limit-rows", type=int, default=0, help="Smoke size: use only this many rows (stratified sample) of --data.")
    return p


def config_from_args(args: argparse.Namespace) -> ClassifierConfig:
    overrides = {field: getattr(args, field) for field in CONFIG_FLAGS.values()}
    if getattr(args, "review_fraction", None) is not None:
        overrides.update({"review.goal": "fraction", "review.value": args.review_fraction})
    if getattr(args, "review_target_error", None) is not None:
        overrides.update({"review.goal": "target_error", "review.value": args.review_target_error})
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise ClfError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set lora.r=16")
        overrides[field.strip()] = value
    return ClassifierConfig.load(args.config, overrides)


def load_split(args: argparse.Namespace, cfg: ClassifierConfig) -> Split:
    """Read and split the labeled data on the driver; every input problem is raised here."""
    d = cfg.data
    columns = [d.text_column, d.label_column]
    labels = LabelMap(d.labels)
    if args.data and (args.train_data or args.validation_data):
        raise ClfError("give either --data (one file, split for you) or --train-data + --validation-data, not both")
    if args.data:
        table = read_table(args.data, columns)
        labels.encode(table[d.label_column].tolist(), where=args.data)
        if args.limit_rows:
            table = _stratified_head(table, d.label_column, args.limit_rows)
        split = stratified_split(table, d.label_column, cfg.train.split, cfg.train.split_seed)
    elif args.train_data and args.validation_data:
        parts = {}
        for name, uri in (("train", args.train_data), ("validation", args.validation_data), ("test", args.test_data)):
            if uri:
                parts[name] = read_table(uri, columns)
                labels.encode(parts[name][d.label_column].tolist(), where=uri)
        test = parts.get("test", parts["validation"])
        split = Split(parts["train"], parts["validation"], test)
    else:
        raise ClfError("no training data: pass --data FILE, or --train-data and --validation-data")
    for name, part in (("train", split.train), ("validation", split.validation)):
        missing = sorted(set(d.labels) - set(part[d.label_column].astype(str)))
        if missing:
            raise DataError(f"the {name} split has no rows of class(es) {missing}; add rows or drop them from --labels")
    return split


def _stratified_head(table, label_column: str, n: int):
    if n >= len(table):
        return table
    return table.groupby(label_column, group_keys=False).sample(frac=n / len(table), random_state=0)


def default_checkpoints(output: str) -> str:
    return output.rstrip("/") + "-checkpoints"


# ---- what every Ray Train worker runs ----------------------------------------------------------
def train_worker(config: dict) -> None:
    import ray.train
    import torch
    from ray.train import Checkpoint

    from clf_core.data import Collator, LabeledTexts
    from clf_core.recipe import prepare, truncation_report
    from clf_core.train import Trainer, class_weights, make_loader

    setup_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))  # no oversubscription of shared cores
    cfg = ClassifierConfig.from_dict(config["cfg"])
    split: Split = config["split"]
    device = ray.train.torch.get_device()
    prepared = prepare(cfg, device)
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
        _evaluate_and_publish(config, cfg, prepared, trainer, split, resumed_from,
                              truncation_report(prepared.tokenizer, train_data.texts + val_data.texts, cfg.model.max_tokens))


def _evaluate_and_publish(config, cfg, prepared, trainer, split: Split, resumed_from, token_report) -> None:
    from clf_core.artifact import publish
    from clf_core.recipe import TrainRun
    from clf_core.report import build_report

    run = TrainRun(prepared, trainer, token_report)
    run.calibrate()  # the temperature and the review threshold, on the validation split
    test_metrics, calibration = run.held_out(split.test)
    log.info("held-out test: accuracy %.4f  macro-F1 %.4f (%d rows); ECE %.4f -> %.4f calibrated; review threshold "
             "%.3f flags %.1f%% and catches %d of %d errors", test_metrics["accuracy"], test_metrics["macro_f1"],
             test_metrics["rows"], calibration["ece"]["before"], calibration["ece"]["after"],
             calibration["review"]["threshold"], 100 * calibration["review"]["flagged"],
             calibration["review"]["errors_caught"], calibration["review"]["errors"])
    summary = {
        "data": config["data_description"],
        "backbone": cfg.model.backbone,
        "rows": {"train": len(split.train), "validation": len(split.validation), "test": len(split.test)},
        "best_epoch": trainer.state.best_epoch,
        "stopped_early": trainer.state.stopped_early,
        "resumed_from_epoch": resumed_from,
        "tokens": token_report,
        "world_size": config["world_size"],
    }
    files = build_report(test_metrics, trainer.state.history, summary, calibration)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = run.save(os.path.join(tmp, "artifact"), extra_files=files,
                            metrics={"test": test_metrics, "resumed_from_epoch": resumed_from,
                                     "calibration": {k: calibration[k] for k in ("temperature", "ece", "brier", "review")}})
        publish(os.path.join(tmp, "artifact"), config["output"], overwrite=config["overwrite"])
    log.info("published model %s to %s", manifest["model_version"], config["output"])


# ---- the driver ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        cfg = config_from_args(args)
        if storage.exists(storage.join(args.output, "manifest.json")) and not args.overwrite:
            raise ClfError(f"an artifact is already published at {args.output}; choose a new --output "
                           f"(e.g. a new version suffix) or pass --overwrite")
        if args.num_workers < 1:
            raise ClfError(f"--num-workers {args.num_workers}: need at least 1")
        split = load_split(args, cfg)
    except ClfError as exc:
        log.error("%s", exc)
        return 2
    log.info("data: %d train / %d validation / %d test rows, labels %s",
             len(split.train), len(split.validation), len(split.test), cfg.data.labels)

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from clf_core.runtime import ensure_ray

    ensure_ray()
    checkpoints = args.checkpoints or default_checkpoints(args.output)
    run_name = os.path.basename(args.output.rstrip("/")) or "train"
    # Checkpoints go through the same fsspec filesystem as everything else we store (s3fs for
    # s3://): one storage layer, one set of credentials and endpoint rules. Arrow's own S3 client
    # uploads even tiny marker files as multipart, which some S3-compatible stores reject.
    storage_fs, storage_path = None, checkpoints
    if storage.is_remote(checkpoints):
        import pyarrow.fs as pafs

        fs, storage_path = storage.filesystem(checkpoints)
        storage_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": cfg.to_dict(), "split": split, "output": args.output, "overwrite": args.overwrite,
            "cpus_per_worker": args.cpus_per_worker, "world_size": args.num_workers,
            "data_description": args.data or args.train_data,
        },
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; show the cause, not a wall of frames
        log.error("training failed: %s", exc)
        return 1
    from clf_core.artifact import open_artifact

    artifact = open_artifact(args.output)
    test = artifact.manifest["metrics"]["test"]
    print(f"\nmodel {artifact.model_version} published to {args.output}")
    print(f"  held-out test: macro-F1 {test['macro_f1']:.4f}  accuracy {test['accuracy']:.4f}  ({test['rows']} rows)")
    review = artifact.manifest.get("review", {})
    print(f"  confidence calibrated (temperature {artifact.manifest.get('calibration', {}).get('temperature', 1.0):.3f}); "
          f"review threshold {review.get('threshold', 0.9):.3f} ({review.get('goal')} {review.get('value')})")
    print(f"  report: {storage.join(args.output, 'report.md')} (confusion_matrix.png, curves.png, reliability.png, "
          f"risk_coverage.png)")
    print(f"  checkpoints: {result.path}")
    print(f"  {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
