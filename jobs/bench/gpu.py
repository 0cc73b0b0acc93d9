"""The GPU sweep: a full-size Mistral-7B (random weights) loaded by the library's own path, rows/s
across batch sizes and compute dtypes, peak memory, share of the compute bound; beside it, in the
same run on the same weights and rows, the anchor a user gets without this project (plain
transformers + bitsandbytes nf4, no LoRA, eager and with one line of torch.compile), the ratios
between them, the profiler's top ops of each, and (item realpath) the real scoring path on the
same model. Ray is never imported."""

from __future__ import annotations

import platform
import time
from pathlib import Path

from jobs.bench.settings import BenchSettings

REPO = Path(__file__).resolve().parents[2]
# Mistral-7B-v0.1 parameters: a forward pass costs ~2 FLOPs per parameter per token.
MISTRAL_7B_PARAMS = 7.24e9
# Dense (no sparsity) tensor-core peak, TFLOP/s, for fp16/bf16, by a name fragment of the GPU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0, "T4": 65.0}
T4_ROWS_PER_S_BOUND = 226.0  # 65 TFLOP/s / (2 x 7.24e9 FLOPs/token x 20 tokens)

# ---- GPU mode: full-size Mistral-7B with random weights, no Ray ------------------------------------

def mistral_config(size: str):
    from transformers import MistralConfig

    if size == "7b":  # Mistral-7B-v0.1's config.json
        return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                             rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, pad_token_id=2,
                             num_labels=2)
    return MistralConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=2,
                         num_labels=2)


def random_backbone(config, directory: Path, device: str) -> Path:
    """A Mistral with random weights saved as a backbone directory (safetensors shards), so the
    sweep loads it through the library's own path (clf_core.model.build.build_classifier: the same
    quantization config, device map, dtype and LoRA as a real Mistral-7B). Built in 16-bit on
    `device` (7B: ~14.5 GB on disk, written once per work folder)."""
    import torch
    from transformers import MistralForSequenceClassification

    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MistralForSequenceClassification(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory, max_shard_size="4GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return directory


def library_nf4_classifier(backbone: Path, size: str, device: str, dtype_name: str, pad_token_id: int):
    """The production recipe (configs/mistral_7b_qlora.yaml; configs/tiny.yaml for the tiny size)
    on `backbone`, built by the library for inference: nf4 base, LoRA on q/k/v, fresh head.
    Returns the model, its config and the hardware it was built for."""
    from types import SimpleNamespace

    from clf_core.model.config import ClassifierConfig
    from clf_core.model.build import build_classifier, resolve_hardware

    recipe = REPO / "configs" / ("mistral_7b_qlora.yaml" if size == "7b" else "tiny.yaml")
    cfg = ClassifierConfig.load(str(recipe), {"model.backbone": str(backbone), "model.device": device,
                                             "model.compute_dtype": dtype_name})
    hw = resolve_hardware(cfg.model)
    # build_classifier reads only the pad token id from the tokenizer; the sweep feeds token ids.
    model = build_classifier(cfg, str(backbone), SimpleNamespace(pad_token_id=pad_token_id), hw, for_training=False)
    return model, cfg, hw


def plain_nf4_classifier(backbone: Path, device: str, dtype_name: str):
    """The anchor: what a user writes with transformers and bitsandbytes alone (no LoRA, no code of
    this project): the same backbone folder in nf4 with double quantization, as our loader does."""
    import torch
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    dtype = getattr(torch, dtype_name)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["score"])
    return AutoModelForSequenceClassification.from_pretrained(
        backbone, num_labels=2, quantization_config=quantization, dtype=dtype, device_map={"": device}).eval()


def time_forward(forward, settings: BenchSettings, device: str, batch_size: int, vocab_size: int) -> dict:
    """rows/s of `forward` on batch_size rows of --gpu-tokens random ids (the same ids for every
    variant: seeded), after two warm-up passes; the first pass (compiles included) is timed apart."""
    import torch

    generator = torch.Generator().manual_seed(batch_size)
    ids = torch.randint(3, min(vocab_size, 32000), (batch_size, settings.gpu_tokens), generator=generator).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        started = time.perf_counter()
        forward(**batch)
        sync()
        first = time.perf_counter() - started
        forward(**batch)
        sync()
        started = time.perf_counter()
        for _ in range(settings.gpu_iters):
            forward(**batch).logits.float().softmax(-1)
        sync()
        seconds = time.perf_counter() - started
    return {"batch_size": batch_size, "rows_per_s": batch_size * settings.gpu_iters / seconds, "first_pass_s": first,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "batch": batch}


def bench_gpu(settings: BenchSettings, work: Path) -> dict:
    """Per compute dtype: the anchor (plain transformers + bitsandbytes nf4, eager, then compiled),
    then ours as it was (LoRA unmerged, eager) and as it scores now (merged, compiled when
    --compile resolves to on), each across --gpu-batch-sizes on the same random 20-token rows; the
    profiler's top ops of each at the largest batch; ratios; and the realpath item on our model."""
    import torch

    from clf_core.model.predict import Predictor, prepare_for_scoring, use_compile
    from jobs.bench.forward import bench_realpath, ledger_lines, realpath_tokenizer, top_ops

    device = settings.device if torch.cuda.is_available() or settings.device == "cpu" else None
    if device is None:
        raise SystemExit("error: --device cuda but torch sees no GPU here; run it on a GPU machine "
                         "(or --device cpu --gpu-size tiny to check the code path)")
    config = mistral_config(settings.gpu_size)
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if device == "cuda" else None
    params = MISTRAL_7B_PARAMS if settings.gpu_size == "7b" else None
    batch_sizes = [int(x) for x in settings.gpu_batch_sizes.split(",")]
    anchors = settings.gpu_anchor_dtypes.split(",") if settings.gpu_anchor_dtypes else []
    results, profiles, realpath = [], {}, {}
    started = time.perf_counter()
    backbone = random_backbone(config, work / f"random-mistral-{settings.gpu_size}", device)
    print(f"random {settings.gpu_size} backbone saved in {time.perf_counter() - started:.0f}s: {backbone}", flush=True)

    def sweep(variant: str, dtype_name: str, forward) -> None:
        nonlocal params
        last = None
        for bs in batch_sizes:
            try:
                r = time_forward(forward, settings, device, bs, config.vocab_size)
            except torch.OutOfMemoryError:
                results.append({"variant": variant, "dtype": dtype_name, "batch_size": bs, "skipped": "out of GPU memory"})
                break
            last = r.pop("batch")
            flops = r["rows_per_s"] * settings.gpu_tokens * 2 * params
            results.append({"variant": variant, "dtype": dtype_name, **r,
                            "fraction_of_compute_bound": flops / (peak * 1e12) if peak else None})
            print(f"{variant:<16} {dtype_name:<9} bs {bs:>5}: {r['rows_per_s']:>9.1f} rows/s "
                  f"(first pass {r['first_pass_s']:.1f}s)", flush=True)
        if last is not None:
            profiles[f"{variant} {dtype_name}"] = top_ops(forward, last, device)

    for dtype_name in settings.gpu_dtypes.split(","):
        if device == "cuda" and dtype_name == "bfloat16" and not torch.cuda.is_bf16_supported():
            results.append({"variant": "ours", "dtype": dtype_name, "skipped": "no native bf16 on this GPU"})
            continue
        if dtype_name in anchors:
            loaded = time.perf_counter()
            plain = plain_nf4_classifier(backbone, device, dtype_name)
            print(f"{dtype_name}: plain transformers + bitsandbytes loaded in {time.perf_counter() - loaded:.0f}s", flush=True)
            if params is None:
                params = sum(p.numel() for p in plain.parameters())  # tiny: dense count is good enough
            sweep("plain eager", dtype_name, plain)
            sweep("plain compiled", dtype_name, torch.compile(plain))  # the one line a user adds
            del plain
        loaded = time.perf_counter()
        model, cfg, hw = library_nf4_classifier(backbone, settings.gpu_size, device, dtype_name, config.pad_token_id)
        print(f"{dtype_name}: loaded and quantized by clf_core.model.build in {time.perf_counter() - loaded:.0f}s", flush=True)
        if params is None:
            params = sum(p.numel() for p in model.parameters())
        sweep("ours before", dtype_name, model)  # LoRA unmerged, KV cache on, eager: the path timed until issue 27
        merged = prepare_for_scoring(model, hw)
        tokenizer = realpath_tokenizer(work, cfg.model.max_tokens)
        predictor = Predictor(model, tokenizer, cfg.data.labels, cfg.model.max_tokens, hw.device, max(batch_sizes),
                              compile=use_compile(settings.compile, hw.device))
        predictor.forward_stats.merged_lora = merged
        sweep("ours", dtype_name, predictor.forward)
        if "realpath" in settings.item_list() and dtype_name == settings.realpath_dtype:
            from jobs.bench.scoring import score_rows

            realpath = bench_realpath(settings, predictor, ledger_lines(score_rows(settings), settings.realpath_rows))
            realpath["dtype"] = dtype_name
            same = [r for r in results if r.get("variant") == "ours" and r.get("dtype") == dtype_name
                    and r.get("batch_size") == predictor.batch_size]
            if same:  # the fixed-shape figure of the sweep (--gpu-tokens per row) at the same batch
                realpath["ratio_to_sweep"] = realpath["rows_per_s"] / same[0]["rows_per_s"]
        del model, predictor
        if device == "cuda":
            torch.cuda.empty_cache()
    measured = [r for r in results if "rows_per_s" in r]
    best = max((r for r in measured if r["variant"] == "ours"), key=lambda r: r["rows_per_s"], default=None)
    out = {"device": name, "size": settings.gpu_size, "tokens_per_row": settings.gpu_tokens,
           "flops_per_token": 2 * params, "peak_tflops": peak, "sweep": results, "best": best,
           "ratios": gpu_ratios(measured), "profiles": profiles}
    if realpath:
        out["realpath"] = realpath
    if best and best.get("fraction_of_compute_bound"):
        # Assumes a T4 reaches the same fraction of its fp16 bound; its slower dequantization makes
        # this an upper estimate.
        fp16 = max((r for r in measured if r["variant"] == "ours" and r["dtype"] == "float16"),
                   key=lambda r: r["rows_per_s"], default=best)
        out["t4_projection_rows_per_s"] = fp16["fraction_of_compute_bound"] * T4_ROWS_PER_S_BOUND
    return out


def gpu_ratios(measured: list[dict]) -> list[dict]:
    """Ours against the anchor and against itself, per batch size, from the same run: the issue's
    targets are ours >= 1.1x plain compiled in bf16, and ours in fp16 (a T4's dtype) >= 0.95x bf16."""
    rate = {(r["variant"], r["dtype"], r["batch_size"]): r["rows_per_s"] for r in measured}
    pairs = [("ours", "plain compiled"), ("ours", "plain eager"), ("ours before", "plain eager"), ("ours", "ours before"),
             ("plain compiled", "plain eager")]
    out = []
    for (variant, dtype, bs), value in sorted(rate.items()):
        for a, b in pairs:
            if variant == a and (b, dtype, bs) in rate:
                out.append({"what": f"{a} / {b}", "dtype": dtype, "batch_size": bs, "ratio": value / rate[(b, dtype, bs)]})
        if variant == "ours" and dtype == "float16" and ("ours", "bfloat16", bs) in rate:
            out.append({"what": "ours float16 / ours bfloat16", "dtype": "float16", "batch_size": bs,
                        "ratio": value / rate[("ours", "bfloat16", bs)]})
    return out
