"""The QLoRA sequence classifier: a (4-bit) frozen backbone + LoRA adapters + a trained head.

Built on the ecosystem's classes: `AutoModelForSequenceClassification` plus PEFT LoRA. Pooling
(`model.pooling`): the last real token for decoders such as Mistral (transformers' own rule), the
mean of the real tokens for encoders such as the MiniLM default (MaskedMeanPooler below, in
place of BERT's [CLS] pooler). Quantization is a setting, not a fork: the same code runs nf4 on a CPU in tests and on
a T4 in production; only the compute dtype follows the hardware.

Head: N logits with cross-entropy for every N, binary included. The seed's single BCE logit is
the same model for N=2 (softmax over two logits = sigmoid of their difference), but one loss and
one probability layout for any N keeps training, scoring and the artifact identical whether the
labels are Expense/Income or five account classes.
"""

from __future__ import annotations

import functools
import gc
import logging
import warnings
from dataclasses import dataclass

import torch

from clf_core.errors import ConfigError
from clf_core.model.config import ClassifierConfig, ModelConfig

log = logging.getLogger(__name__)

# Default LoRA targets per architecture. Decoders: the q/k/v attention projections, as the seed
# adapted Mistral-7B (PEFT's own default mapping adapts only q and v, so all three are named).
# BERT-family encoders: q/k/v plus every `dense` layer (attention output and feed-forward). The
# 22M-parameter MiniLM default has too little capacity in q/k/v alone: on the real charts of
# accounts, adding `dense` raised held-out macro-F1 by 2 points at 1.3M trainable parameters.
DEFAULT_LORA_TARGETS = {
    "mistral": ["q_proj", "k_proj", "v_proj"],
    "llama": ["q_proj", "k_proj", "v_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj"],
    "bert": ["query", "key", "value", "dense"],
}
# Encoders whose sequence-classification head reads the pooler's output (BERT and its kin, the
# MiniLM default included): a mean-pooling module can stand in for their [CLS] pooler.
MEAN_POOLING_TYPES = ("bert",)
# Heads created fresh for classification; kept out of 4-bit quantization (bitsandbytes cannot
# train a 4-bit head, and quantizing a 1-2 row matrix saves nothing) and saved with the adapter.
HEAD_MODULES = ["score", "classifier"]


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    compute_dtype: torch.dtype

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{name} ({self.device}), compute dtype {str(self.compute_dtype).removeprefix('torch.')}"


def resolve_hardware(cfg: ModelConfig, device: str | torch.device | None = None) -> Hardware:
    """Pick device and compute dtype. 'auto' never chooses bf16 on a GPU without native bf16."""
    want = str(device) if device is not None else cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device = {want!r}, but no CUDA GPU is visible. Use 'cpu' or 'auto'.")
    dev = torch.device(want)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    native_bf16 = dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 8
    dtype_name = cfg.compute_dtype
    if dtype_name == "auto":
        dtype_name = "float32" if dev.type == "cpu" else ("bfloat16" if native_bf16 else "float16")
    if dtype_name == "bfloat16" and dev.type == "cuda" and not native_bf16:
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        raise ConfigError(
            f"model.compute_dtype = 'bfloat16', but {torch.cuda.get_device_name(dev)} (sm_{cap.replace('.', '')}) "
            f"has no native bf16. Use 'float16' or 'auto'."
        )
    return Hardware(dev, getattr(torch, dtype_name))


@functools.cache   # once per process; a failed import is not cached, so a later call tries again
def import_model_libraries() -> None:
    """Import transformers, peft and bitsandbytes once per process with Python's cyclic garbage
    collector paused, then freeze what the imports left (`gc.freeze`) and resume it.

    A scorer or training worker starts by importing ~3,900 modules. With the collector running,
    their objects were scanned in ~1,240 collections: 1.0 of the 5.4 CPU-seconds a process took to
    import, load the tiny test model and score (gc callbacks; 4.6 s with this). Modules live as long
    as the process, so the scans found nothing to free; frozen, later collections (training's,
    scoring's) skip them as well. Reference counting frees everything acyclic meanwhile; the
    paused span covers imports only, never model weights."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
    finally:
        if collecting:
            gc.freeze()
            gc.enable()


def load_tokenizer(source: str, max_tokens: int):
    import_model_libraries()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        # Decoders such as Mistral have no pad token; EOS is the usual stand-in. Ledger lines are
        # encoded without EOS, so a pad id never occurs inside a real sequence.
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps every real token at the position it has unpadded (causal models see
    # no pads before them), so a row scores the same alone or in a batch.
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_tokens
    return tokenizer


def lora_targets(model_type: str, configured: list[str]) -> list[str]:
    if configured:
        return list(configured)
    if model_type in DEFAULT_LORA_TARGETS:
        return DEFAULT_LORA_TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    if model_type in peft_defaults:
        return list(peft_defaults[model_type])
    raise ConfigError(
        f"lora.target_modules is empty and architecture {model_type!r} has no known default. "
        f"Name the attention projections, e.g. lora.target_modules: [q_proj, v_proj]."
    )


def quantization_config(cfg: ModelConfig, hw: Hardware):
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=hw.compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=HEAD_MODULES,
    )


def resolve_pooling(pooling: str, model_type: str) -> str:
    """'auto' -> 'mean' for BERT-family encoders, 'native' otherwise; refuse what cannot work."""
    if pooling == "auto":
        return "mean" if model_type in MEAN_POOLING_TYPES else "native"
    if pooling == "mean" and model_type not in MEAN_POOLING_TYPES:
        raise ConfigError(
            f"model.pooling = 'mean', but {model_type!r} models pool inside their own head "
            f"(decoders read the last real token). Use 'native' or 'auto'."
        )
    return pooling


class MaskedMeanPooler(torch.nn.Module):
    """Stands in for BERT's [CLS] pooler: the mean of the real (unpadded) tokens' hidden states.

    all-MiniLM-L6-v2 was trained as a sentence encoder through exactly this mean; its [CLS]
    pooler (dense + tanh) was never trained for anything this task can use. On the real charts of
    accounts, mean pooling raised held-out macro-F1 by about 2 points (see README). The
    attention mask reaches it through a pre-hook on the encoder, because a BERT pooler is called
    with the hidden states alone. Padding never changes the result: pads are masked out.
    """

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is None:
            return hidden_states.mean(dim=1)
        mask = self.attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model) -> None:
    encoder = model.base_model  # BertModel inside BertForSequenceClassification
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def remember_mask(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        pooler.attention_mask = mask

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)


def load_base(cfg: ClassifierConfig, source: str, hw: Hardware):
    """The backbone with a fresh N-class head, 4-bit when configured, on exactly hw.device.

    The device map pins the whole model to this worker's device (never "auto", which would
    spread a model over every GPU of the node and collide with the other Ray workers).
    """
    import_model_libraries()
    from transformers import AutoModelForSequenceClassification

    labels = cfg.data.labels
    with warnings.catch_warnings():
        # A pre-quantized base (clf_core.model.prequantize) keeps its saved config, which is ours; the
        # warning that ours is ignored says nothing to act on.
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config` attribute.*")
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            quantization_config=quantization_config(cfg.model, hw),
            dtype=hw.compute_dtype,  # of the parts left unquantized: embeddings, norms, head
            device_map={"": hw.device},
            use_safetensors=True,  # never a pickled .bin, whatever else the directory holds
        )
    if resolve_pooling(cfg.model.pooling, model.config.model_type) == "mean":
        use_mean_pooling(model)
    if cfg.model.quantization != "none":
        # A pre-quantized base loads with the compute dtype it was saved with; the hardware
        # decides it here, as for a base quantized on load.
        for module in model.modules():
            if hasattr(module, "compute_dtype") and hasattr(module.weight, "quant_state"):
                module.compute_dtype = hw.compute_dtype
                # bitsandbytes >= 0.50 repacks 4-bit weights into a bf16 AVX-512 layout at the
                # first eval forward on CPUs with AVX512_BF16, and never unpacks them for training:
                # training after a validation pass then fails ("a view of a leaf Variable ... in-place")
                # or runs on the packed weights, and scores move by ~2e-3 with the CPU model. One
                # kernel on every CPU keeps train, eval and a reloaded artifact bit-for-bit alike;
                # GPUs never take this path.
                if getattr(module, "support_avx512bf16_for_cpu", False):
                    module.support_avx512bf16_for_cpu = False
    return model


def build_classifier(cfg: ClassifierConfig, source: str, tokenizer, hw: Hardware, for_training: bool = True):
    """Backbone + LoRA ready to train (or to receive saved adapter weights)."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(cfg.train.seed)  # the head and LoRA A matrices are initialised here
    model = load_base(cfg, source, hw)
    model.config.pad_token_id = tokenizer.pad_token_id
    if for_training and cfg.model.quantization != "none":
        # Non-reentrant checkpointing is the variant that works under DDP (the reentrant one
        # re-runs forward hooks and trips DDP's "marked ready twice" check).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif for_training and cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # also marks the head (score / classifier) as trained and saved
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_targets(model.config.model_type, cfg.lora.target_modules),
    )
    model = get_peft_model(model, lora)
    if not for_training:
        model.eval()
    return model


# A 16-bit copy of the adapted projections may take at most this share of the GPU memory free at
# load: the rest is for activations (Mistral-7B at batch 1,024 x 20 tokens: 4.4 GiB). Mistral-7B's
# q/k/v in 16 bits are 1.6 GB (0.8 G weights), a tenth of a T4's free memory after the 4-bit base.
MERGE_MEMORY_SHARE = 0.25


def merge_lora_for_scoring(model, hw: Hardware) -> int:
    """Fold each LoRA adapter into a 16-bit copy of the projection it adapts (scoring only).

    Unmerged, every adapted projection costs three matmuls per forward (the 4-bit base, x A^T and
    (x A^T) B^T); merged, one: x (W + s B A)^T with W dequantized from nf4 to the compute dtype.
    The sum is formed in fp32 and rounded once. peft's own `merge_and_unload` cannot be used on a
    4-bit base: it re-quantizes the merged weight to nf4, which moves the scores (README, "seed's
    way"); here the dequantization (peft's `dequantize_module_weight`, bitsandbytes underneath)
    and the adapter's delta (peft's `get_delta_weight`) are the libraries', and only the swap is
    ours. The rest of the base stays 4-bit. Returns how many projections were merged: 0 when the
    copies would not fit (MERGE_MEMORY_SHARE of the free GPU memory) or an adapter is of a kind a
    plain sum cannot hold (DoRA, LoRA bias). The model can no longer train or save adapters.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if not layers:
        return 0
    if any(module.lora_variant or any(module.lora_bias.values()) for _, module in layers):
        log.info("LoRA adapters left unmerged: a DoRA or LoRA-bias adapter is not a plain weight sum")
        return 0
    element = torch.tensor([], dtype=hw.compute_dtype).element_size()
    needed = sum(m.get_base_layer().in_features * m.get_base_layer().out_features for _, m in layers) * element
    if hw.device.type == "cuda":
        free = torch.cuda.mem_get_info(hw.device)[0]
        if needed > MERGE_MEMORY_SHARE * free:
            log.warning("LoRA adapters left unmerged: their 16-bit copies need %.1f GiB, more than %.0f%% of the "
                        "%.1f GiB free on %s", needed / 2**30, 100 * MERGE_MEMORY_SHARE, free / 2**30, hw.device)
            return 0
    with torch.no_grad():
        for name, module in layers:
            base = module.get_base_layer()
            weight = dequantize_module_weight(base).to(torch.float32, copy=True)
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight += module.get_delta_weight(adapter).to(torch.float32)
            merged = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                     device=weight.device, dtype=hw.compute_dtype)
            merged.weight.copy_(weight)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
            merged.requires_grad_(False)
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, merged)
    log.info("merged %d LoRA adapters into %s copies of their projections (%.1f MiB)", len(layers),
             str(hw.compute_dtype).removeprefix("torch."), needed / 2**20)
    return len(layers)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The weights training changed (LoRA + head), with PEFT's adapter naming."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Put saved LoRA + head weights into the model; refuse weights that do not cover it exactly.

    A key missing from `state` would leave that tensor at its random initial value (a head or
    LoRA matrix scoring noise) as surely as an unexpected one would be dropped, so both are refused.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    missing = sorted(set(get_peft_model_state_dict(model)) - set(state))
    if missing:
        raise ConfigError(
            f"adapter weights do not fit this model: {len(missing)} key(s) it needs are missing, e.g. "
            f"{missing[:3]}; loading would leave them at random values. Re-save the weights from the trained model."
        )
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ConfigError(f"adapter weights do not fit this model: unexpected keys {unexpected[:5]}")


def describe_parameters(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": int(trainable), "total": int(total)}
