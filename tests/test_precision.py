"""`auto` precision (issue 20): bfloat16 only where the hardware runs it natively, float32 otherwise.

The capability checks are patched both ways (the CUDA probe, torch's CPUID probes, the
GREENCODE_CPU_BF16 override), so every branch runs on any machine.
"""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from greencode import precision
from greencode.config import ModelConfig, PipelineConfig, ServeConfig, load_config, validate
from greencode.precision import native_bf16, train_precision, weights_dtype
from greencode.training import autocast

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Every test sees a process that has logged nothing yet and no capability override."""
    monkeypatch.setattr(precision, "_said", set())
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)


def cuda_bf16(monkeypatch, supported: bool) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: supported)


def cpu_features(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


def auto_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if " auto -> " in r.getMessage()]


def test_cuda_with_bf16_picks_bf16_and_says_why(monkeypatch, caplog):
    cuda_bf16(monkeypatch, True)
    with caplog.at_level(logging.INFO, "greencode.precision"):
        assert weights_dtype("auto", CUDA) is torch.bfloat16
        assert train_precision("auto", CUDA) == "bf16"
    assert auto_lines(caplog) == ["model.dtype auto -> bfloat16 on cuda: CUDA device Test GPU supports bfloat16",
                                  "finetune.precision auto -> bfloat16 on cuda: CUDA device Test GPU supports bfloat16"]


def test_cuda_without_bf16_picks_float32_and_refuses_explicit_bf16_training(monkeypatch, caplog):
    cuda_bf16(monkeypatch, False)
    with caplog.at_level(logging.INFO, "greencode.precision"):
        assert weights_dtype("auto", CUDA) is torch.float32
        assert train_precision("auto", CUDA) == "fp32"
    assert "has no native bfloat16" in auto_lines(caplog)[0]
    with pytest.raises(ValueError, match="bf16 is not supported by this GPU"):
        train_precision("bf16", CUDA)
    assert train_precision("fp16", CUDA) == "fp16"  # fp16 stays a GPU choice
    assert weights_dtype("float16", CUDA) is torch.float16


@pytest.mark.parametrize(("avx512_bf16", "amx", "named"), [(True, False, "AVX512_BF16"), (False, True, "AMX"),
                                                           (True, True, "AVX512_BF16 and AMX")])
def test_cpu_with_native_bf16_picks_bf16(monkeypatch, caplog, avx512_bf16, amx, named):
    cpu_features(monkeypatch, avx512_bf16, amx)
    with caplog.at_level(logging.INFO, "greencode.precision"):
        assert weights_dtype("auto", CPU) is torch.bfloat16
        assert train_precision("auto", CPU) == "bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    assert auto_lines(caplog)[0] == f"model.dtype auto -> bfloat16 on cpu: CPU ({capability}) has {named}"


def test_cpu_without_native_bf16_picks_float32(monkeypatch, caplog):
    cpu_features(monkeypatch, False, False)
    with caplog.at_level(logging.INFO, "greencode.precision"):
        assert weights_dtype("auto", CPU) is torch.float32
        assert train_precision("auto", CPU) == "fp32"
        weights_dtype("auto", CPU)
    lines = auto_lines(caplog)
    assert len(lines) == 2 and "has neither AVX512_BF16 nor AMX" in lines[0]  # one line per setting, not per call
    assert isinstance(autocast("auto", CPU), type(autocast("fp32", CPU)))  # no autocast at all: float32


def test_the_override_simulates_either_cpu(monkeypatch):
    cpu_features(monkeypatch, True, True)
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    assert native_bf16(CPU) == (False, "GREENCODE_CPU_BF16=0 overrides the CPU check")
    assert weights_dtype("auto", CPU) is torch.float32
    cpu_features(monkeypatch, False, False)
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    assert train_precision("auto", CPU) == "bf16"
    assert isinstance(autocast("auto", CPU), torch.autocast)
    monkeypatch.setenv(precision.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="GREENCODE_CPU_BF16='yes': use 0"):
        native_bf16(CPU)


def test_forced_bf16_on_a_cpu_without_it_runs_and_warns_once(monkeypatch, caplog):
    cpu_features(monkeypatch, False, False)
    with caplog.at_level(logging.INFO, "greencode.precision"):
        for _ in range(3):
            assert train_precision("bf16", CPU) == "bf16"  # runs as asked
            with autocast("bf16", CPU):
                pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "many times slower than float32" in warnings[0] and "finetune.precision: auto" in warnings[0]
    cuda_bf16(monkeypatch, True)
    assert train_precision("bf16", CUDA) == "bf16"  # on a GPU that has it: no warning
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_fp16_is_gpu_only():
    with pytest.raises(ValueError, match="finetune.precision fp16 needs a CUDA GPU"):
        train_precision("fp16", CPU)
    with pytest.raises(ValueError, match="model.dtype float16 needs a CUDA GPU"):
        weights_dtype("float16", CPU)
    assert train_precision("fp32", CPU) == "fp32" and weights_dtype("float32", CPU) is torch.float32


@pytest.mark.parametrize(("override", "expected"), [("0", torch.float32), ("1", torch.bfloat16)])
def test_load_model_loads_auto_as_the_device_decides(monkeypatch, tmp_path, tokenizer, override, expected):
    from conftest import save_tiny
    from greencode.modeling import load_model

    save_tiny(tmp_path, tokenizer)
    monkeypatch.setenv(precision.CPU_BF16_ENV, override)
    assert load_model(ModelConfig(name=str(tmp_path), device="cpu")).model.dtype is expected
    assert load_model(ModelConfig(name=str(tmp_path), device="cpu", dtype="float32")).model.dtype is torch.float32


@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_every_preset_validates_with_auto(preset):
    from workflows.common import PRESETS
    from workflows.pipeline import preset_path, stage_configs

    assert preset in PRESETS and len(PRESETS) == 2  # a new preset joins this list
    cfg = load_config(PipelineConfig, preset_path(preset))
    assert cfg.finetune.precision == "auto" and cfg.inference_dtype == "auto" and cfg.model.dtype == "auto"
    stages = stage_configs(cfg)
    assert stages["finetune"].precision == "auto" and stages["finetune"].model.dtype == "auto"
    for stage in ("fit_exits", "extract", "extract_heldout", "evaluate"):
        assert stages[stage].model.dtype == "auto", stage
    if "finetune" in cfg.stages:  # the base row; without fine-tuning the evaluated model is the base model
        assert stages["evaluate"].base_model.dtype == "auto"


def test_defaults_and_the_serve_config_are_auto():
    from pathlib import Path

    assert ModelConfig().dtype == "auto" and PipelineConfig().inference_dtype == "auto"
    assert PipelineConfig().finetune.precision == "auto"
    app = yaml.safe_load((Path(__file__).parents[1] / "serve_app" / "config.yaml").read_text())
    assert validate(ServeConfig, app["applications"][0]["args"]).model.dtype == "auto"
