"""Every invalid config value fails with a message naming the field, the value and what is allowed."""

import pytest

from clf_core.model.config import ClassifierConfig
from clf_core.errors import ConfigError


@pytest.mark.parametrize("field,value,expected", [
    ("model.quantization", "int3", "allowed: nf4, none"),
    ("model.compute_dtype", "float8", "allowed: auto, float32, float16, bfloat16"),
    ("model.pooling", "cls", "allowed: auto, mean, native"),
    ("model.device", "tpu", "allowed: auto, cpu, cuda"),
    ("model.backbone", " ", "hub id, a local directory or an s3:// URI"),
    ("model.max_tokens", 2, "at least 4"),
    ("lora.r", 0, "positive integer"),
    ("lora.alpha", -1, "must be positive"),
    ("lora.dropout", 1.5, "[0, 1)"),
    ("data.labels", ["Income"], "at least two class names"),
    ("data.labels", ["Income", "Income"], "distinct"),
    ("data.text_column", "", "must name a column"),
    ("train.epochs", 0, "at least 1"),
    ("train.batch_size", 0, "at least 1"),
    ("train.lr", 5.0, "(0, 1)"),
    ("train.lr_factor", 1.0, "(0, 1)"),
    ("train.max_grad_norm", -1.0, ">= 0"),
    ("train.early_stopping_patience", -1, ">= 0"),
    ("train.split", [0.5, 0.5, 0.5], "summing to 1"),
    ("train.split", [0.9, 0.0, 0.1], "must be > 0"),
])
def test_invalid_value_names_field_value_and_rule(field, value, expected):
    with pytest.raises(ConfigError) as err:
        ClassifierConfig.load(overrides={field: value})
    message = str(err.value)
    assert field in message
    assert repr(value) in message or str(value) in message
    assert expected in message


@pytest.mark.parametrize("field,value,expected", [
    ("train.epochs", "many", "expected int"),
    ("train.lr", "fast", "expected float"),
    ("model.double_quant", "maybe", "expected bool"),
    ("train.epochs", 2.5, "expected int"),
])
def test_wrong_type_is_refused(field, value, expected):
    with pytest.raises(ConfigError, match=expected):
        ClassifierConfig.load(overrides={field: value})


def test_unknown_field_suggests_the_closest_name(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  quantisation: nf4\n")
    with pytest.raises(ConfigError, match="did you mean 'model.quantization'"):
        ClassifierConfig.load(str(path))


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        ClassifierConfig.load(overrides={"train.epochs": 0, "lora.r": 0})
    assert "train.epochs" in str(err.value) and "lora.r" in str(err.value)


def test_yaml_then_overrides_with_type_conversion(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  quantization: none\ntrain:\n  epochs: 7\n  lr: 3.0e-4\ndata:\n  labels: [A, B, C]\n")
    cfg = ClassifierConfig.load(str(path), {"train.epochs": "2", "model.double_quant": "false", "data.labels": "X,Y"})
    assert cfg.model.quantization == "none"
    assert cfg.train.epochs == 2 and cfg.train.lr == 3e-4
    assert cfg.model.double_quant is False
    assert cfg.data.labels == ["X", "Y"]


def test_seed_defaults():
    cfg = ClassifierConfig.load()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (32, 64, 0.01)
    assert cfg.data.labels == ["Expense", "Income"]
    assert cfg.model.quantization == "nf4" and cfg.model.double_quant
    assert cfg.train.split == [0.75, 0.125, 0.125]


def test_config_round_trips_through_a_dict():
    cfg = ClassifierConfig.load(overrides={"train.epochs": 9, "data.labels": ["a", "b", "c"]})
    assert ClassifierConfig.from_dict(cfg.to_dict()) == cfg


def test_auto_dtype_is_float32_on_cpu_and_bf16_refused_where_unsupported():
    import torch

    from clf_core.model.build import resolve_hardware

    hw = resolve_hardware(ClassifierConfig.load(overrides={"model.device": "cpu"}).model)
    assert hw.compute_dtype == torch.float32 and hw.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_hardware(ClassifierConfig.load(overrides={"model.device": "cuda"}).model)


@pytest.mark.parametrize("capability,expected", [((7, 5), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_auto_dtype_follows_the_gpu_generation(monkeypatch, capability, expected):
    """No GPU here: only the capability query is replaced, the decision logic is the real one."""
    import torch

    from clf_core.model.build import resolve_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4" if capability == (7, 5) else "A100")
    hw = resolve_hardware(ClassifierConfig.load(overrides={"model.device": "cuda"}).model)
    assert hw.compute_dtype == getattr(torch, expected)
    if capability == (7, 5):
        with pytest.raises(ConfigError, match="Tesla T4.*no native bf16.*float16"):
            resolve_hardware(ClassifierConfig.load(overrides={"model.device": "cuda", "model.compute_dtype": "bfloat16"}).model)


def test_shipped_config_files_load_and_validate():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert configs
    for path in configs:
        cfg = ClassifierConfig.load(str(path))
        assert cfg.model.backbone
