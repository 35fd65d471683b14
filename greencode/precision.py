"""Which float type a device runs fast: ``auto`` picks bfloat16 only where the hardware has it natively.

On a CPU without AVX-512 BF16 or AMX, torch emulates bfloat16: a matmul measured 138x slower
than float32 on an AVX2 EPYC (issue 20), so a preset that hard-codes bf16 takes hours there.
One decision (:func:`native_bf16`) serves both the fine-tuning autocast (``precision``) and the
weights of the stages that only run the model (``dtype``); each choice is logged once per
process with its reason, and an explicit bfloat16 on a CPU without it warns once with the fix.

``GREENCODE_CPU_BF16=0`` makes the CPU check answer "no" (``1``: "yes"): how a machine with
native bf16 simulates one without (Ray workers inherit the variable from the driver).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

CPU_BF16_ENV = "GREENCODE_CPU_BF16"
_AMP_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_said: set[tuple] = set()  # (kind, ...) of the lines logged so far in this process


def _once(level: int, key: tuple, msg: str, *args: object) -> None:
    if key not in _said:
        _said.add(key)
        log.log(level, msg, *args)


def _cpu_feature(name: str) -> bool:
    """torch's own CPUID probe (``torch.cpu._is_*_supported``); False where this torch lacks it."""
    probe = getattr(torch.cpu, f"_is_{name}_supported", None)
    return bool(probe()) if probe is not None else False


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes in bfloat16 natively, and why (the reason names what was checked)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"CUDA device {name} supports bfloat16"
        return False, f"CUDA device {name} has no native bfloat16"
    if device.type != "cpu":
        return False, f"device {device.type} is neither CUDA nor CPU"
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"{CPU_BF16_ENV}={forced!r}: use 0 (no native bf16) or 1 (native), or unset it")
        return forced == "1", f"{CPU_BF16_ENV}={forced} overrides the CPU check"
    capability = torch.backends.cpu.get_cpu_capability()
    features = [name for name, probe in (("AVX512_BF16", "avx512_bf16"), ("AMX", "amx_tile")) if _cpu_feature(probe)]
    if features:
        return True, f"CPU ({capability}) has {' and '.join(features)}"
    return False, f"CPU ({capability}) has neither AVX512_BF16 nor AMX"


def _choose(requested: torch.dtype | None, device: torch.device, setting: str, fix: str) -> torch.dtype:
    """``requested`` (None = auto) as run on ``device``: auto decides and logs, bf16 warns where emulated."""
    if requested is torch.float16 and device.type != "cuda":
        raise ValueError(f"{setting} float16 needs a CUDA GPU but runs on {device.type}; {fix}")
    if requested is not None and requested is not torch.bfloat16:
        return requested
    native, reason = native_bf16(device)
    if requested is None:
        chosen = torch.bfloat16 if native else torch.float32
        _once(logging.INFO, ("auto", setting, str(device), native), "%s auto -> %s on %s: %s", setting,
              str(chosen).removeprefix("torch."), device, reason)
        return chosen
    if not native:
        _once(logging.WARNING, ("slow-bf16", setting), "%s is bfloat16 but %s: torch emulates it, many times "
              "slower than float32 (a matmul 100x and more); %s", setting, reason, fix)
    return requested


def weights_dtype(requested: str, device: torch.device, setting: str = "model.dtype") -> torch.dtype:
    """The dtype to load a model's weights in for running on ``device`` (``requested``: auto or a dtype name)."""
    return _choose(None if requested == "auto" else _DTYPES[requested], device, setting,
                   f"set {setting}: auto (or float32) for the fast choice")


def training_weights(requested: str) -> str:
    """The weights dtype fine-tuning loads: ``auto`` keeps float32 master weights (the autocast picks the compute)."""
    return "float32" if requested == "auto" else requested


def train_precision(requested: str, device: torch.device, setting: str = "finetune.precision") -> str:
    """The autocast precision (fp32, bf16, fp16) to train in on ``device`` (``requested``: auto or one of them)."""
    fix = f"set {setting}: auto (or fp32) for the fast choice"
    if requested == "fp16" and device.type != "cuda":
        raise ValueError(f"{setting} fp16 needs a CUDA GPU (use_gpu: true) but training runs on {device.type}; {fix}")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():  # not even emulated
        raise ValueError(f"{setting} bf16 is not supported by this GPU; use auto, fp16 or fp32")
    amp = None if requested == "auto" else next(t for t, name in _AMP_NAMES.items() if name == requested)
    return _AMP_NAMES[_choose(amp, device, setting, fix)]
