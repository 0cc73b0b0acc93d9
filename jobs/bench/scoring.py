"""Scoring items 1-7: the seed's way, the HF pipeline, our predictor, jobs.label end to end, padding,
dedup and the label cache, actor cold start."""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jobs.bench.measure import interleaved, ratio_of, ray_cores, summarize
from jobs.bench.settings import BenchSettings
from jobs.bench.training import train_tiny_artifact

# ---- scoring variants (all on the same loaded PEFT model) -----------------------------------------

@dataclass
class SeedWay:
    """The seed notebook's scoring: each row encoded with BOS, right-padded with EOS to the longest
    row of the whole set, batches of 25, no attention mask, the head read at the last position
    (a pad position for every row but the longest)."""

    model: object
    tokenizer: object
    batch_size: int = 25

    def encode(self, texts: list[str]):
        import torch

        ids = [self.tokenizer.encode(t) for t in texts]
        longest = max(len(x) for x in ids)
        eos = self.tokenizer.eos_token_id
        return torch.tensor([x + [eos] * (longest - len(x)) for x in ids])

    def padding_efficiency(self, texts: list[str]) -> float:
        ids = self.encode(texts)
        real = sum(len(self.tokenizer.encode(t)) for t in texts)
        return real / ids.numel()

    def predict(self, texts: list[str]):
        import torch

        inner = self.model.get_base_model()  # MistralForSequenceClassification with LoRA layers
        out = []
        with torch.no_grad():
            for batch in self.encode(texts).split(self.batch_size):
                hidden = inner.model(input_ids=batch).last_hidden_state[:, -1]
                out.append(torch.softmax(inner.score(hidden).float(), -1))
        return torch.cat(out).numpy()


def hf_pipeline(predictor):
    """transformers' text-classification pipeline on the same model object (LoRA unmerged: merging
    into a 4-bit base would re-quantize and change the model)."""
    from transformers import pipeline

    return pipeline("text-classification", model=predictor.model.get_base_model(), tokenizer=predictor.tokenizer,
                    device=predictor.device)


def score_rows(settings: BenchSettings) -> list[str]:
    import pandas as pd

    from clf_core.model.labels import sample_data_path

    texts = pd.read_csv(sample_data_path("coa_income_expense"))[settings.text_column].astype(str).tolist()
    return texts[: settings.rows] if settings.rows else texts


def bench_scoring(settings: BenchSettings, artifact: str, texts: list[str], items: list[str], work: Path) -> dict:
    """Items 1-5: rows/s of each variant over the same rows in interleaved rounds."""
    from clf_core.model.predict import Predictor

    predictor = Predictor.load(artifact, batch_size=settings.batch_size)
    variants: dict[str, Callable[[], int]] = {}
    extra: dict = {"rows": len(texts)}
    seed = SeedWay(predictor.model, predictor.tokenizer)
    if "seed" in items or "padding" in items:
        variants["seed"] = lambda: len(seed.predict(texts))
    if "pipeline" in items:
        pipe = hf_pipeline(predictor)
        trial = {}
        for bs in [int(x) for x in settings.pipeline_batch_sizes.split(",")]:
            started = time.perf_counter()
            pipe(texts, batch_size=bs)
            trial[bs] = len(texts) / (time.perf_counter() - started)
        best = max(trial, key=trial.get)
        extra["pipeline_batch_sizes_rows_per_s"] = trial
        extra["pipeline_best_batch_size"] = best
        variants["pipeline"] = lambda: len(pipe(texts, batch_size=best))
    variants["predictor"] = lambda: len(predictor.predict(texts))
    commit_seconds: list[float] = []
    if "label" in items:
        variants["label"] = label_job_runner(settings, artifact, texts, work / "ledger", commit_seconds)
        if settings.label_scale > 1:
            # A night's ledger is many times the 1,129 account names: the same names, one line
            # per property, all distinct so the job's dedup cannot shortcut them.
            large = nightly_ledger(texts, settings.label_scale)
            extra["large_rows"] = len(large)
            variants["label_large"] = label_job_runner(settings, artifact, large, work / "ledger-large", commit_seconds)
            variants["predictor_large"] = lambda: len(predictor.predict(large))
    rates = interleaved(variants, settings.rounds)
    result = {"rates": {k: summarize(v) for k, v in rates.items()}, **extra}
    base = "seed" if "seed" in rates else "predictor"
    result["ratios"] = {k: ratio_of(rates, k, base) for k in rates}
    result["baseline"] = base
    if "pipeline" in rates:
        result["predictor_vs_pipeline"] = ratio_of(rates, "predictor", "pipeline")
    if "label" in rates:
        result["label_vs_predictor"] = ratio_of(rates, "label", "predictor")
        result["label_commit_seconds_per_partition"] = summarize(commit_seconds)
    if "label_large" in rates:
        result["label_large_vs_predictor_large"] = ratio_of(rates, "label_large", "predictor_large")
        result["label_per_row"] = per_run_and_per_row(len(texts), rates["label"], extra["large_rows"],
                                                      rates["label_large"], rates["predictor_large"])
    if "padding" in items:
        predictor.stats = type(predictor.stats)()
        ours = predictor.predict(texts)
        seed_probs = seed.predict(texts)
        result["padding_efficiency"] = {"predictor": predictor.stats.padding_efficiency,
                                        "seed": seed.padding_efficiency(texts),
                                        "predictor_batch_size": settings.batch_size}
        # What reading a pad position costs: how often the seed's way labels a row like we do.
        result["seed_agreement_with_predictor"] = float((seed_probs.argmax(-1) == ours.label_ids).mean())
    return result

def nightly_ledger(texts: list[str], properties: int) -> list[str]:
    """Every text once per property (`Operating Expenses Utilities Gas - Property 007`): distinct lines."""
    return [f"{t} - Property {k:03d}" for k in range(properties) for t in texts]


def per_run_and_per_row(small_rows: int, small_rates: list[float], large_rows: int, large_rates: list[float],
                        predictor_rates: list[float]) -> dict | None:
    """Split jobs.label's time into a fixed per-run cost and a per-row rate, from the two ledger
    sizes measured in the same round: per-row rate = extra rows / extra seconds. A round where
    noise made the large ledger no slower than the small one separates nothing and is left out;
    None if every round was."""
    fixed, marginal = [], []
    for small, large in zip(small_rates, large_rates):
        t_small, t_large = small_rows / small, large_rows / large
        if t_large <= t_small:
            continue
        rate = (large_rows - small_rows) / (t_large - t_small)
        marginal.append(rate)
        fixed.append(max(t_small - small_rows / rate, 0.0))
    if not marginal:
        return None
    return {"per_run_seconds": summarize(fixed), "per_row_rows_per_s": summarize(marginal),
            "per_row_vs_predictor": statistics.median(marginal) / statistics.median(predictor_rates)}


BENCH_CATALOG = "bench"


def bench_catalog(work: Path) -> str:
    """A pyiceberg SQL catalog on a SQLite file with its warehouse on local disk, configured the
    pyiceberg way (environment variables), for the jobs.label runs of the bench."""
    import os

    (work / "warehouse").mkdir(parents=True, exist_ok=True)
    for key, value in {"TYPE": "sql", "URI": f"sqlite:///{work / 'catalog.db'}",
                       "WAREHOUSE": f"file://{work / 'warehouse'}"}.items():
        os.environ[f"PYICEBERG_CATALOG__{BENCH_CATALOG.upper()}__{key}"] = value
    return BENCH_CATALOG


def label_job_runner(settings: BenchSettings, artifact: str, texts: list[str], ledger: Path,
                     commit_seconds: list[float]) -> Callable[[], int]:
    """jobs.label end to end (plan, both Ray Data passes, the Iceberg commit) on one local partition
    of the rows, as `python -m jobs.label` runs it; a fresh table and label cache per run, so
    every text is scored. Each run's time in its partition commit is appended to `commit_seconds`.
    The local Ray cluster is started once beforehand: its start is not part of a run."""
    import pandas as pd

    from clf_core.model.artifact import open_artifact
    from clf_core.labeling.plan import plan
    from clf_core.labeling.settings import LabelSettings
    from clf_core.labeling.pipeline import execute
    from clf_core.labeling.table import LabeledTable

    cores = ray_cores()
    catalog = bench_catalog(ledger.parent)
    source = ledger / "dt=2024-01-31"
    source.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"line_id": range(len(texts)), "texts": texts}).to_parquet(source / "part-0.parquet", index=False)
    version = open_artifact(artifact).model_version
    runs = iter(range(1_000_000))

    def run() -> int:
        n = next(runs)
        job = LabelSettings(model=artifact, input=str(ledger), catalog=catalog, output_table=f"bench.{ledger.name.replace('-', '_')}_{n}",
                            cache=str(ledger.with_name(f"{ledger.name}-cache-{n}")), batch_size=settings.batch_size,
                            cpus_per_actor=cores, shuffle_partitions=2).validate()
        table = LabeledTable(catalog, job.output_table)
        summary = execute(job, plan(job, version, table), table, version)
        if summary is None or not summary.ok:
            raise RuntimeError(f"jobs.label failed: {summary.report() if summary else 'no run'}")
        commit_seconds.append(summary.commit_seconds / max(1, len(summary.partitions_committed)))
        return len(texts)

    return run


# ---- item 6: dedup and the label cache ------------------------------------------------------------

def bench_dedup(settings: BenchSettings, artifact: str, work: Path) -> dict:
    """A ledger of several nights (the same properties report the same accounts nightly) scored row
    by row, vs distinct texts scored then joined back (cold cache), vs labels from a warm cache."""
    from datetime import date, timedelta

    import pandas as pd
    import pyarrow as pa

    from clf_core.labeling.cache import LabelCache
    from clf_core.model.predict import Predictor
    from jobs.support.sample_ledgers import ledger_partition
    from clf_core.labeling.scoring import ApplyLabels, check_text, distinct_valid_texts

    nights = [ledger_partition(date(2024, 1, 1) + timedelta(days=n)) for n in range(settings.ledger_nights)]
    ledger = pd.concat(nights, ignore_index=True)
    ledger["texts"] = ledger["texts"].astype(object)
    table = pa.Table.from_pandas(ledger, preserve_index=False)
    predictor = Predictor.load(artifact, batch_size=settings.batch_size)
    version = predictor.model_version
    valid = [t for t in (check_text(v, 2000)[0] for v in ledger["texts"]) if t is not None]
    caches = iter(range(1_000_000))
    warm_cache = str(work / "cache-warm")

    def no_dedup() -> int:
        predictor.predict(valid)
        return len(ledger)

    def dedup(cache_uri: str) -> int:
        distinct = distinct_valid_texts(table, "texts", 2000)["text"].to_pylist()
        known = LabelCache(cache_uri, version).load()
        todo = [t for t in distinct if t not in known]
        if todo:
            out = predictor.predict(todo)
            LabelCache(cache_uri, version).append(
                pd.DataFrame({"text": todo, "label": out.labels, "confidence": out.confidence.astype("float64")}), "bench")
        labeled = ApplyLabels(cache_uri, version, "texts", 2000, "2024-01-31T00:00:00Z")(table)
        return labeled.num_rows

    dedup(warm_cache)  # fill the warm cache once
    rates = interleaved({"no_dedup": no_dedup,
                         "dedup_cold": lambda: dedup(str(work / f"cache-cold-{next(caches)}")),
                         "dedup_warm": lambda: dedup(warm_cache)}, settings.rounds)
    distinct = ledger["texts"].dropna().nunique()
    return {"rows": len(ledger), "distinct_texts": int(distinct), "repeated_fraction": 1 - distinct / len(ledger),
            "rates": {k: summarize(v) for k, v in rates.items()},
            "ratios": {k: ratio_of(rates, k, "no_dedup") for k in rates}, "baseline": "no_dedup"}


# ---- item 7: actor cold start --------------------------------------------------------------------

def bench_coldstart(settings: BenchSettings, artifact: str, work: Path) -> dict:
    """Predictor.load quantizing the base on start vs loading a pre-quantized copy of it."""
    from clf_core.model.artifact import open_artifact
    from clf_core.model.backbone import resolve_backbone
    from clf_core.model.predict import Predictor
    from clf_core.model.prequantize import approve, prequantize

    if settings.coldstart_hidden:
        artifact = str(train_tiny_artifact(work / "coldstart", hidden=settings.coldstart_hidden, rows=64, max_steps=1))
    art = open_artifact(artifact)
    source = resolve_backbone(art.manifest["backbone"]["id"])
    prequantized = work / "coldstart-nf4"
    started = time.perf_counter()
    prequantize(art.config(), source, prequantized)
    once = time.perf_counter() - started
    # An artifact loads with a pre-quantized copy only once its publisher approved the copy's
    # content hash; approve it in a copy of the artifact, never in the one the bench was given.
    approved = work / "coldstart-artifact"
    shutil.copytree(art.path, approved)
    approve(str(approved), prequantized)
    loads = {"quantize_on_load": lambda: bool(Predictor.load(artifact)) and 1,
             "prequantized": lambda: bool(Predictor.load(str(approved), backbone=str(prequantized))) and 1}
    rates = interleaved(loads, settings.rounds)
    seconds = {k: summarize([1 / r for r in v]) for k, v in rates.items()}
    size = lambda d: sum(p.stat().st_size for p in Path(d).rglob("*.safetensors"))  # noqa: E731
    return {"seconds": seconds, "ratio": seconds["prequantized"]["median"] / seconds["quantize_on_load"]["median"],
            "prequantize_once_s": once, "backbone_bytes": size(source), "prequantized_bytes": size(prequantized),
            "hidden_size": settings.coldstart_hidden or "scoring backbone"}
