"""Item 8 (a Ray Train epoch vs the plain loop), the tiny model the items score with, and the
calibration item (the default model on three splits of the packaged chart)."""

from __future__ import annotations

import statistics
from pathlib import Path

from jobs.bench.measure import ray_cores, summarize
from jobs.bench.settings import BenchSettings

# ---- item 8: Ray Train epoch vs the plain loop -----------------------------------------------------

def bench_train(settings: BenchSettings, backbone: str, work: Path) -> dict:
    """One epoch (train + validation pass, as EpochMetrics.seconds reports it) of the same model on
    the same rows: clf_core.training.loop.Trainer in this process vs jobs.train's worker under a
    1-worker TorchTrainer. The cluster and worker start are not part of the epoch. Each run trains
    two epochs and the second is timed: a Ray Train worker is a fresh process, and its first epoch
    pays one-time costs (allocator growth, first calls into the 4-bit kernels) that this
    long-lived process paid long before; a nightly run of many epochs pays them once."""
    from clf_core.training.data import stratified_split
    from clf_core.training.recipe import train_classifier
    from clf_core.training.job import WorkerJob, torch_trainer
    from jobs.support.tiny import tiny_config

    cores = ray_cores()
    cfg = tiny_config(backbone, {"data.text_column": "full_path", "train.epochs": 2})
    split = stratified_split(labeled_rows(settings.train_rows), "label", cfg.train.split, seed=200)
    runs = iter(range(1_000_000))
    epochs: dict[str, list[float]] = {"plain_torch": [], "ray_train": []}

    def plain() -> None:
        epochs["plain_torch"].append(train_classifier(cfg, split).trainer.state.history[-1]["seconds"])

    def ray_train() -> None:
        n = next(runs)
        job = WorkerJob(cfg=cfg, split=split, output=str(work / f"ray-model-{n}"), overwrite=True,
                        cpus_per_worker=cores, world_size=1, data_description="bench")
        trainer = torch_trainer(job, name=f"bench-{n}", checkpoints=str(work / "ray-checkpoints"))
        metrics = trainer.fit().metrics  # the last report: the second epoch's
        epochs["ray_train"].append(float(metrics["seconds"]))

    for r in range(settings.train_rounds):
        for fn in ((plain, ray_train) if r % 2 == 0 else (ray_train, plain)):
            fn()
    seconds = {k: summarize(v) for k, v in epochs.items()}
    return {"epoch_seconds": seconds, "train_rows": len(split.train), "validation_rows": len(split.validation),
            "ratio": seconds["ray_train"]["median"] / seconds["plain_torch"]["median"]}


# ---- the tiny model and data ----------------------------------------------------------------------

def labeled_rows(n: int):
    import pandas as pd

    from clf_core.model.labels import sample_data_path

    table = pd.read_csv(sample_data_path("coa_income_expense"))
    if n and n < len(table):
        table = table.groupby("label", group_keys=False).sample(frac=n / len(table), random_state=0)
    return table


def train_tiny_artifact(directory: Path, hidden: int = 128, rows: int = 400, max_steps: int = 0) -> Path:
    """A tiny nf4 Mistral classifier trained on real account names (seconds), saved as an artifact."""
    from clf_core.training.data import stratified_split
    from clf_core.training.recipe import train_classifier
    from jobs.support.tiny import build_tiny_mistral, tiny_config

    if (directory / "model" / "manifest.json").exists():
        return directory / "model"
    layers = 2 if hidden <= 128 else 8
    backbone = build_tiny_mistral(directory / "backbone", hidden_size=hidden, layers=layers,
                                  heads=max(4, hidden // 64), kv_heads=max(2, hidden // 256),
                                  intermediate_size=2 * hidden)
    cfg = tiny_config(backbone, {"data.text_column": "full_path", "train.epochs": 1 if max_steps else 2,
                                 "train.max_steps": max_steps})
    split = stratified_split(labeled_rows(rows), "label", cfg.train.split, seed=200)
    train_classifier(cfg, split).save(directory / "model")
    return directory / "model"

# ---- calibration: is the confidence trustworthy, does the review queue catch the errors -------------

def bench_calibration(settings: BenchSettings, work: Path) -> dict:
    """The default model (backbone and settings of `jobs.train`) trained on 65% of the packaged
    chart, calibrated on 10%, measured on the held-out 25%, once per split seed."""
    from clf_core.model.config import ClassifierConfig
    from clf_core.training.data import stratified_split
    from clf_core.training.recipe import train_classifier

    seeds = [int(x) for x in settings.calibration_seeds.split(",")]
    overrides = {"data.text_column": settings.text_column, "train.split": [0.65, 0.10, 0.25]}
    if settings.smoke:  # the code path in seconds: a tiny backbone, one seed, one epoch
        from jobs.support.tiny import TINY_CONFIG, build_tiny_mistral

        seeds = seeds[:1]
        backbone = build_tiny_mistral(work / "calibration-backbone", hidden_size=128)
        recipe = str(TINY_CONFIG)
        overrides.update({"model.backbone": str(backbone), "train.epochs": 1})
    else:
        recipe = None  # the default backbone and recipe, as `jobs.train` uses them
    runs = []
    for seed in seeds:
        cfg = ClassifierConfig.load(recipe, {**overrides, "train.split_seed": seed})
        split = stratified_split(labeled_rows(settings.rows), "label", cfg.train.split, seed)
        run = train_classifier(cfg, split)
        test_metrics, figures = run.held_out(split.test)
        review = figures["review"]
        runs.append({"seed": seed, "macro_f1": test_metrics["macro_f1"],
                     "temperature": figures["temperature"], "ece_before": figures["ece"]["before"],
                     "ece_after": figures["ece"]["after"], "brier_before": figures["brier"]["before"],
                     "brier_after": figures["brier"]["after"], "threshold": review["threshold"],
                     "flagged": review["flagged"], "errors": review["errors"], "errors_caught": review["errors_caught"],
                     "caught_share": review["errors_caught"] / max(review["errors"], 1),
                     "test_rows": figures["rows"], "backbone": cfg.model.backbone,
                     "review_goal": f"{cfg.review.goal} {cfg.review.value}"})
    medians = {k: statistics.median(r[k] for r in runs)
               for k in ("macro_f1", "temperature", "ece_before", "ece_after", "brier_before", "brier_after",
                         "flagged", "caught_share")}
    return {"runs": runs, "median": medians}
