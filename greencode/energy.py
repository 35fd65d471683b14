"""Energy measurement that never guesses.

GPU: Zeus (``zeus`` package) when a CUDA device is in use. CPU: Intel/AMD RAPL
counters under ``/sys/class/powercap`` when the kernel exposes them. Anywhere
else every measurement is ``None`` ("not measured"), never an estimate.

Zeus pulls in ``amdsmi``, whose import raises ``KeyError`` on machines without
ROCm; all Zeus imports are guarded with a broad except for that reason (and the
Makefile uninstalls ``amdsmi`` so ``import ray`` survives too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RAPL_ROOT = Path("/sys/class/powercap")


@dataclass
class Measurement:
    time_s: float = 0.0
    energy_j: float | None = None


class RaplReader:
    """Package-level RAPL energy counters (microjoules, wrapping at max_energy_range_uj)."""

    def __init__(self, root: Path | None = None) -> None:
        root = RAPL_ROOT if root is None else root  # read at call time, so tests can point it at a fake tree
        self.zones = []
        for zone in sorted(root.glob("intel-rapl:*")) if root.is_dir() else []:
            if zone.name.count(":") != 1:  # package zones only; sub-zones are inside them
                continue
            energy, wrap = zone / "energy_uj", zone / "max_energy_range_uj"
            try:
                int(energy.read_text())
                self.zones.append((energy, int(wrap.read_text()) if wrap.exists() else 2**32))
            except (OSError, ValueError):
                continue

    def read(self) -> list[int]:
        return [int(e.read_text()) for e, _ in self.zones]

    def joules(self, start: list[int], end: list[int]) -> float:
        total = 0
        for (_, wrap), a, b in zip(self.zones, start, end):
            total += b - a if b >= a else b + wrap - a
        return total / 1e6


class EnergyMeter:
    """``with meter.measure() as m:`` fills ``m.time_s`` and ``m.energy_j`` (None if no meter)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.source: str | None = None
        self._zeus = None
        self._rapl = None
        if self.device.type == "cuda":
            self._zeus = self._make_zeus(self.device.index or 0)
            self.source = "zeus" if self._zeus else None
        else:
            rapl = RaplReader()
            if rapl.zones:
                self._rapl, self.source = rapl, "rapl"
        if self.source is None:
            log.info("no energy meter on %s: energy is reported as null", self.device)

    @staticmethod
    def _make_zeus(gpu_index: int):
        try:
            from zeus.monitor import ZeusMonitor

            return ZeusMonitor(gpu_indices=[gpu_index], approx_instant_energy=True)
        except Exception as err:  # amdsmi KeyError, no NVML, no GPU ...
            log.warning("Zeus energy meter unavailable (%s): energy is reported as null", err)
            return None

    @property
    def available(self) -> bool:
        return self.source is not None

    @contextmanager
    def measure(self) -> Iterator[Measurement]:
        m = Measurement()
        window = f"greencode-{id(m)}"
        if self._zeus is not None:
            torch.cuda.synchronize(self.device)
            self._zeus.begin_window(window, sync_execution=False)
        start_rapl = self._rapl.read() if self._rapl else None
        t0 = time.perf_counter()
        try:
            yield m
        finally:
            if self._zeus is not None:
                torch.cuda.synchronize(self.device)
            m.time_s = time.perf_counter() - t0
            if self._zeus is not None:
                result = self._zeus.end_window(window, sync_execution=False)
                m.energy_j = float(sum(result.gpu_energy.values()))
            elif start_rapl is not None:
                m.energy_j = self._rapl.joules(start_rapl, self._rapl.read())
