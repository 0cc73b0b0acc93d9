"""The GPU sweep: a full-size Mistral-7B (random weights) loaded by the library's own path, rows/s
across batch sizes and compute dtypes, peak memory, share of the compute bound. Ray is never imported."""

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
    sweep loads it through the library's own path (clf_core.model.build_classifier: the same
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
    on `backbone`, built by the library for inference: nf4 base, LoRA on q/k/v, fresh head."""
    from types import SimpleNamespace

    from clf_core.config import ClassifierConfig
    from clf_core.model import build_classifier, resolve_hardware

    recipe = REPO / "configs" / ("mistral_7b_qlora.yaml" if size == "7b" else "tiny.yaml")
    cfg = ClassifierConfig.load(str(recipe), {"model.backbone": str(backbone), "model.device": device,
                                             "model.compute_dtype": dtype_name})
    hw = resolve_hardware(cfg.model)
    # build_classifier reads only the pad token id from the tokenizer; the sweep feeds token ids.
    return build_classifier(cfg, str(backbone), SimpleNamespace(pad_token_id=pad_token_id), hw, for_training=False)


def bench_gpu(settings: BenchSettings, work: Path) -> dict:
    """rows/s of 20-token rows across batch sizes and compute dtypes, peak memory, and the fraction
    of the dense 16-bit compute bound reached (2 x 7.24e9 FLOPs per token for 7B)."""
    import torch

    device = settings.device if torch.cuda.is_available() or settings.device == "cpu" else None
    if device is None:
        raise SystemExit("error: --device cuda but torch sees no GPU here; run it on a GPU machine "
                         "(or --device cpu --gpu-size tiny to check the code path)")
    config = mistral_config(settings.gpu_size)
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if device == "cuda" else None
    params = MISTRAL_7B_PARAMS if settings.gpu_size == "7b" else None
    results = []
    started = time.perf_counter()
    backbone = random_backbone(config, work / f"random-mistral-{settings.gpu_size}", device)
    print(f"random {settings.gpu_size} backbone saved in {time.perf_counter() - started:.0f}s: {backbone}", flush=True)
    for dtype_name in settings.gpu_dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        if device == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            results.append({"dtype": dtype_name, "skipped": "no native bf16 on this GPU"})
            continue
        started = time.perf_counter()
        model = library_nf4_classifier(backbone, settings.gpu_size, device, dtype_name, config.pad_token_id)
        print(f"{dtype_name}: loaded and quantized by clf_core.model in {time.perf_counter() - started:.0f}s", flush=True)
        if params is None:
            params = sum(p.numel() for p in model.parameters())  # tiny: dense count is good enough
        for bs in [int(x) for x in settings.gpu_batch_sizes.split(",")]:
            ids = torch.randint(3, config.vocab_size, (bs, settings.gpu_tokens), device=device)
            mask = torch.ones_like(ids)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                with torch.inference_mode():
                    for _ in range(2):
                        model(input_ids=ids, attention_mask=mask)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    for _ in range(settings.gpu_iters):
                        model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - started
            except torch.OutOfMemoryError:
                results.append({"dtype": dtype_name, "batch_size": bs, "skipped": "out of GPU memory"})
                break
            rows_s = bs * settings.gpu_iters / seconds
            flops = rows_s * settings.gpu_tokens * 2 * params
            results.append({"dtype": dtype_name, "batch_size": bs, "rows_per_s": rows_s,
                            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                            "fraction_of_compute_bound": flops / (peak * 1e12) if peak else None})
        del model
    measured = [r for r in results if "rows_per_s" in r]
    best = max(measured, key=lambda r: r["rows_per_s"]) if measured else None
    out = {"device": name, "size": settings.gpu_size, "tokens_per_row": settings.gpu_tokens,
           "flops_per_token": 2 * params, "peak_tflops": peak, "sweep": results, "best": best}
    if best and best.get("fraction_of_compute_bound"):
        # Assumes a T4 reaches the same fraction of its fp16 bound; its slower dequantization makes
        # this an upper estimate.
        out["t4_projection_rows_per_s"] = best["fraction_of_compute_bound"] * T4_ROWS_PER_S_BOUND
    return out
