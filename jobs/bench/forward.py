"""The scoring forward (issue 27): compiled vs eager and merged vs unmerged LoRA on the CPU
(`compile`), the real scoring path through Predictor with its time split (`realpath`), and the
profiler's top ops that explain a forward's time (used by the GPU item)."""

from __future__ import annotations

import math
import random
import statistics
import time
from pathlib import Path

from jobs.bench.measure import interleaved, ratio_of, summarize
from jobs.bench.settings import BenchSettings

# ---- compile: the CPU measurement behind model.compile = auto ------------------------------------

def bench_compile(settings: BenchSettings, artifact: str, texts: list[str]) -> dict:
    """Predictor.load three ways on the same rows, in interleaved rounds: as before issue 27 (LoRA
    unmerged, KV cache on), eager with the LoRA merged (the CPU default now), and compiled (the
    GPU default, forced on here). Warm-up (the first call, compiles included) is timed apart."""
    from clf_core.model.predict import Predictor

    before = Predictor.load(artifact, compile="off", merge_lora=False, batch_size=settings.batch_size)
    before.model.get_base_model().config.use_cache = True
    eager = Predictor.load(artifact, compile="off", batch_size=settings.batch_size)
    compiled = Predictor.load(artifact, compile="on", batch_size=settings.batch_size)
    started = time.perf_counter()
    reference = before.predict(texts).probabilities
    first_eager = time.perf_counter() - started
    started = time.perf_counter()
    compiled_probs = compiled.predict(texts).probabilities
    warmup = time.perf_counter() - started
    predictors = {"before": before, "eager": eager, "compiled": compiled}
    for p in predictors.values():
        p.stats = type(p.stats)()
    rates = interleaved({name: (lambda p=p: len(p.predict(texts))) for name, p in predictors.items()},
                        settings.rounds)
    return {"rows": len(texts), "rates": {k: summarize(v) for k, v in rates.items()},
            "ratios": {k: ratio_of(rates, k, "before") for k in rates}, "baseline": "before",
            "compiled_vs_eager": ratio_of(rates, "compiled", "eager"),
            "first_call_s": {"before": first_eager, "compiled": warmup},
            "recompiles": compiled.forward_stats.recompiles, "max_shapes": compiled.max_shapes,
            "merged_lora": eager.forward_stats.merged_lora,
            "padding_efficiency": {k: p.stats.padding_efficiency for k, p in predictors.items()},
            "max_abs_diff": {"eager": float(abs(eager.predict(texts).probabilities - reference).max()),
                             "compiled": float(abs(compiled_probs - reference).max())}}


# ---- realpath: Predictor on real-length ledger lines, time split -----------------------------------

def ledger_lines(texts: list[str], rows: int, seed: int = 0) -> list[str]:
    """`rows` distinct lines: the chart's account names once per property ("... - Property 007"),
    in a shuffled order, as a scoring actor receives distinct texts after the run-wide shuffle."""
    from jobs.bench.scoring import nightly_ledger

    lines = nightly_ledger(texts, math.ceil(rows / len(texts)))[:rows]
    random.Random(seed).shuffle(lines)
    return lines


def bench_realpath(settings: BenchSettings, predictor, lines: list[str]) -> dict:
    """`predictor.predict` on `lines` in calls of --realpath-rows-per-call (as jobs.label's actors
    call it), against the forward alone on exactly the batches it runs (tokenized, padded and on
    the device beforehand): rows/s of each, their ratio, and the real path's time split into
    tokenizing, the forward (softmax and copy back included) and the rest (sorting, padding,
    moving to the device). A first forward-only pass compiles every shape the real path will meet
    (the warm-up); then --realpath-rounds rounds run the two one after the other (in a rotating
    order), and medians are reported: of the rates, of the split, and of each round's ratio."""
    import torch

    per_call = settings.realpath_rows_per_call
    calls = [lines[i:i + per_call] for i in range(0, len(lines), per_call)]
    prepared = [[(len(idx), {k: v.to(predictor.device) for k, v in batch.items()})
                 for idx, batch in predictor.batches(call)] for call in calls]
    padding = predictor.stats.padding_efficiency
    shapes = {tuple(b["input_ids"].shape) for call in prepared for _, b in call}
    fs = predictor.forward_stats

    @torch.inference_mode()
    def forward_only() -> int:
        for call in prepared:
            for rows, batch in call:
                logits = predictor.forward(**batch).logits[:rows].float()
                torch.softmax(logits / predictor.temperature, dim=-1).cpu().numpy()
        return len(lines)

    splits = []

    def real_path() -> int:
        before = (fs.tokenize_s, fs.forward_s, fs.total_s)
        for call in calls:
            predictor.predict(call)
        tokenize, forward, total = (now - then for now, then in zip((fs.tokenize_s, fs.forward_s, fs.total_s), before))
        splits.append({"tokenize": tokenize, "forward": forward, "rest": max(total - tokenize - forward, 0.0)})
        return len(lines)

    started = time.perf_counter()
    forward_only()
    warmup = time.perf_counter() - started
    rates = interleaved({"forward_only": forward_only, "real_path": real_path}, settings.realpath_rounds)
    del prepared
    tokens = [len(ids) for ids in predictor.tokenizer(lines[:20_000])["input_ids"]]
    median_split = {k: statistics.median(s[k] for s in splits) for k in ("tokenize", "forward", "rest")}
    return {"rows": len(lines), "rows_per_call": per_call, "batch_size": predictor.batch_size,
            "compiled": fs.compiled, "merged_lora": fs.merged_lora, "rounds": settings.realpath_rounds,
            "mean_tokens": statistics.mean(tokens), "max_tokens_seen": max(tokens),
            "padding_efficiency": padding, "shapes": len(shapes), "first_pass_s": warmup,
            "rates": {k: summarize(v) for k, v in rates.items()},
            "rows_per_s": statistics.median(rates["real_path"]),
            "forward_only_rows_per_s": statistics.median(rates["forward_only"]),
            # per round: the two passes of a round ran next to each other, so a burst of load from
            # other work on a shared machine tends to hit both (medians of whole passes did not)
            "round_ratios": [r / f for r, f in zip(rates["real_path"], rates["forward_only"])],
            "ratio_to_forward_only": statistics.median(r / f for r, f in zip(rates["real_path"], rates["forward_only"])),
            "split_s": median_split, "total_s": len(lines) / statistics.median(rates["real_path"])}


def bench_realpath_cpu(settings: BenchSettings, artifact: str, texts: list[str]) -> dict:
    """The realpath item on the CPU: the artifact loaded as a scoring actor loads it."""
    from clf_core.model.predict import Predictor

    predictor = Predictor.load(artifact, batch_size=settings.batch_size, compile=settings.compile)
    return bench_realpath(settings, predictor, ledger_lines(texts, settings.realpath_rows))


# ---- the profiler's view of one forward -----------------------------------------------------------

def top_ops(forward, batch: dict, device: str, top: int = 8) -> list[dict]:
    """One forward pass under torch.profiler: the ops taking the most self time (GPU time on CUDA,
    CPU time on a CPU), with their share of the pass, so a rows/s figure explains itself."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        forward(**batch)
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"op": e.key[:60], "ms": getattr(e, key) / 1000, "calls": e.count, "share": getattr(e, key) / total}
            for e in events[:top]]


def describe_ops(ops: list[dict]) -> str:
    return "; ".join(f"{o['op']} {o['share']:.0%} ({o['ms']:.1f} ms x{o['calls']})" for o in ops)


def realpath_tokenizer(work: Path, max_tokens: int):
    """The tiny byte-level BPE tokenizer of the packaged chart (Mistral's own cannot be downloaded
    on a device machine), loaded as the library loads a model's: real ledger lines to ids that any
    Mistral vocabulary holds (512 of them; pad = EOS = 2, as Mistral's)."""
    from clf_core.model.build import load_tokenizer
    from jobs.support.tiny import build_tiny_mistral

    return load_tokenizer(str(build_tiny_mistral(work / "realpath-tokenizer")), max_tokens)
