"""Exit translators: one affine map per exit point onto the last layer's basis (tuned lens).

An exit's hidden state lives in another basis than the last layer's, so decoding it with the final
norm and LM head as if it were the last layer ("logit lens") is poor. A per-exit affine map from the
exit's normalized state to the last layer's normalized state fixes most of that without touching the
model (tuned lens, Belrose et al. 2023; EE-Tuning, Pan et al. 2024). Its least-squares fit is closed
form from sums over tokens (:class:`TranslatorStats`), which any number of workers compute on their
share of the data and add: the solve runs once on the summed statistics.

Decoding an exit (the one function every caller goes through: :meth:`EarlyExitModel.decode_exit`):
``lm_head(translate_k(final_norm(h_k)))``. An identity translator — or none — is today's logit lens,
so the final layer and the full-depth output never change. Cost at inference: one H×H product at the
exit that is taken.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from greencode.atomic import atomic_path, write_atomic
from greencode.digests import file_digest

log = logging.getLogger(__name__)

WEIGHTS_FILE = "exit_translators.safetensors"
META_FILE = "exit_translators.json"


class TranslatorMismatchError(ValueError):
    """Translators fit for another model (or other exit points) than the one they are attached to."""


class ExitTranslators(nn.Module):
    """One affine map (H -> H) per exit point; exits without a map decode untranslated.

    ``meta`` is what the artifact's JSON says (model fingerprint, ridge strengths, tokens, held-out
    agreement); it travels with the maps.
    """

    def __init__(self, exit_points: Sequence[int], hidden_size: int, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.exit_points = [int(k) for k in exit_points]
        self.hidden_size = hidden_size
        self.maps = nn.ModuleDict({str(k): nn.Linear(hidden_size, hidden_size) for k in self.exit_points})
        self.meta = dict(meta or {})
        for m in self.maps.values():  # identity until fitted
            nn.init.eye_(m.weight)
            nn.init.zeros_(m.bias)
        self.requires_grad_(False)

    def forward(self, normed: torch.Tensor, layer: int) -> torch.Tensor:
        """The last layer's normalized state predicted from exit ``layer``'s normalized state ([..., H])."""
        m = self.maps[str(layer)] if str(layer) in self.maps else None
        return normed if m is None else m(normed)

    def set_map(self, layer: int, weight: np.ndarray | torch.Tensor, bias: np.ndarray | torch.Tensor) -> None:
        """Install y = weight @ x + bias for exit ``layer`` (weight [H, H] as nn.Linear stores it)."""
        m = self.maps[str(layer)]
        with torch.no_grad():
            m.weight.copy_(torch.as_tensor(np.asarray(weight), dtype=m.weight.dtype))
            m.bias.copy_(torch.as_tensor(np.asarray(bias), dtype=m.bias.dtype))

    # ------------------------------------------------------------------ artifact

    def save(self, out_dir: str | Path) -> Path:
        """Write weights (safetensors) + JSON into ``out_dir`` (a dir of their own, or beside a model's files).

        Each file is written to a temp path and renamed, the JSON last; it names the weights' digest, so a
        reader never pairs it with weights from another write.
        """
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"{k}.{name}": p.detach().float().contiguous().cpu()
                   for k, m in self.maps.items() for name, p in (("weight", m.weight), ("bias", m.bias))}
        with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        meta = {**self.meta, "exit_points": self.exit_points, "hidden_size": self.hidden_size,
                "weights_digest": file_digest(out_dir / WEIGHTS_FILE)}
        write_atomic(out_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return out_dir

    @classmethod
    def load(cls, path: str | Path) -> ExitTranslators:
        """Translators saved by :meth:`save` (a dir holding the two files)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{path} holds no exit translators ({META_FILE} + {WEIGHTS_FILE}); "
                                    "fit them with `greencode fit-exits`")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("weights_digest") != file_digest(weights_path):
                raise ValueError(f"{WEIGHTS_FILE} is not the file {META_FILE} was written with")
            tensors = load_file(str(weights_path))
            translators = cls(meta["exit_points"], int(meta["hidden_size"]), meta)
            for k in translators.maps:
                translators.set_map(int(k), tensors[f"{k}.weight"], tensors[f"{k}.bias"])
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            raise ValueError(f"{path}: unreadable exit translators ({type(err).__name__}: {err})") from None
        return translators

    def check(self, fingerprint: str, exit_points: Sequence[int], hidden_size: int) -> None:
        """Refuse translators fit for another model, another hidden size or exits the model does not have."""
        fitted_for = self.meta.get("model_fingerprint")
        if fitted_for != fingerprint:
            raise TranslatorMismatchError(f"exit translators were fit for model {fitted_for}, not for this model "
                                          f"({fingerprint}); fit them again with `greencode fit-exits`")
        missing = sorted(set(self.exit_points) - set(exit_points))
        if hidden_size != self.hidden_size or missing:
            raise TranslatorMismatchError(f"exit translators (hidden {self.hidden_size}, exits {self.exit_points}) do "
                                          f"not fit this model (hidden {hidden_size}, exits {list(exit_points)})")


# --------------------------------------------------------------------------- fitting


@dataclass
class TranslatorStats:
    """Sufficient statistics of the ridge regressions y ≈ W x + b, one per exit, in float64.

    x = an exit's normalized state, y = the last layer's normalized state at the same position.
    Statistics of disjoint token sets add (``a + b``), so workers sum their shares and the driver
    solves once.
    """

    exit_points: list[int]
    xtx: np.ndarray  # Shape: [e, H, H]
    xty: np.ndarray  # Shape: [e, H, H]
    sum_x: np.ndarray  # Shape: [e, H]
    sum_y: np.ndarray  # Shape: [e, H]
    count: int

    @classmethod
    def zeros(cls, exit_points: Sequence[int], hidden_size: int) -> TranslatorStats:
        e, h = len(exit_points), hidden_size
        return cls(list(exit_points), np.zeros((e, h, h)), np.zeros((e, h, h)), np.zeros((e, h)), np.zeros((e, h)), 0)

    def __add__(self, other: TranslatorStats) -> TranslatorStats:
        if self.exit_points != other.exit_points or self.xtx.shape != other.xtx.shape:
            raise ValueError("statistics of different exit points or hidden sizes cannot be added")
        return TranslatorStats(self.exit_points, self.xtx + other.xtx, self.xty + other.xty,
                               self.sum_x + other.sum_x, self.sum_y + other.sum_y, self.count + other.count)

    def add_(self, exit_normed: Sequence[torch.Tensor], final_normed: torch.Tensor) -> None:
        """Accumulate tokens: ``exit_normed[i]`` and ``final_normed`` are [N, H] states of the same N positions."""
        y = final_normed.detach().double().cpu()
        for i, x in enumerate(exit_normed):
            x = x.detach().double().cpu()
            self.xtx[i] += (x.T @ x).numpy()
            self.xty[i] += (x.T @ y).numpy()
            self.sum_x[i] += x.sum(0).numpy()
        self.sum_y += y.sum(0).numpy()[None]
        self.count += int(y.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """Plain arrays (a Ray Data row)."""
        return {"exit_points": np.asarray(self.exit_points), "xtx": self.xtx, "xty": self.xty,
                "sum_x": self.sum_x, "sum_y": self.sum_y, "count": np.asarray(self.count)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TranslatorStats:
        return cls([int(k) for k in np.asarray(d["exit_points"])], np.asarray(d["xtx"]), np.asarray(d["xty"]),
                   np.asarray(d["sum_x"]), np.asarray(d["sum_y"]), int(np.asarray(d["count"])))

    def solve(self, index: int, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        """(weight [H, H] as nn.Linear stores it, bias [H]) of exit ``index`` at ridge strength ``ridge``.

        Centered least squares with the penalty ``ridge · count · ||W - I||²``: shrinking towards the
        identity (the untranslated exit plus a mean shift) rather than towards zero, so a strong ridge
        falls back to today's decoding instead of to a constant.
        """
        n = self.count
        if n < 2:
            raise ValueError(f"a translator fit needs at least 2 tokens, got {n}")
        mx, my = self.sum_x[index] / n, self.sum_y[index] / n
        a = self.xtx[index] - n * np.outer(mx, mx)
        b = self.xty[index] - n * np.outer(mx, my)
        eye = np.eye(a.shape[0])
        lam = ridge * n
        w = np.linalg.solve(a + lam * eye, b + lam * eye)  # y ≈ x @ w + c
        return w.T, my - mx @ w


def normalized_exit_states(lm: Any, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Normalized states of every real position: ([exit] -> [N, H], final [N, H]); one plain forward pass."""
    hidden = lm.forward_exits(input_ids, attention_mask).hidden_states
    keep = None if attention_mask is None else attention_mask.bool()

    def flat(h: torch.Tensor) -> torch.Tensor:
        normed = lm.adapter.final_norm(h)
        return normed.reshape(-1, normed.shape[-1]) if keep is None else normed[keep]

    return [flat(h) for h in hidden[:-1]], flat(hidden[-1])


@torch.no_grad()
def collect_stats(lm: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> TranslatorStats:
    """The statistics of every exit over ``batches`` of (input_ids, attention_mask)."""
    stats = TranslatorStats.zeros(lm.exit_points, lm.hidden_size)
    for input_ids, attention_mask in batches:
        exits, final = normalized_exit_states(lm, input_ids, attention_mask)
        stats.add_([x.float() for x in exits], final.float())
    return stats


@torch.no_grad()
def fit_translators(lm: Any, stats: TranslatorStats, validation: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                    ridge_grid: Sequence[float]) -> tuple[ExitTranslators, dict[str, Any]]:
    """Solve every exit at each ridge strength of ``ridge_grid`` and keep, per exit, the one whose translated
    top-1 agrees most often with the final layer's on ``validation`` (ties: the stronger ridge).

    Returns the translators and a report {exit: {ridge: agreement}}.
    """
    if stats.exit_points != list(lm.exit_points):
        raise ValueError(f"statistics of exits {stats.exit_points} for a model with exits {lm.exit_points}")
    head = lm.adapter.lm_head
    dtype = next(head.parameters()).dtype
    xs: list[list[torch.Tensor]] = [[] for _ in stats.exit_points]
    targets = []
    for input_ids, attention_mask in validation:
        exits, final = normalized_exit_states(lm, input_ids, attention_mask)
        for i, x in enumerate(exits):
            xs[i].append(x.float())
        targets.append(head(final).argmax(-1))
    if not targets:
        raise ValueError("no validation tokens to choose the ridge strength on")
    target = torch.cat(targets)
    translators = ExitTranslators(stats.exit_points, lm.hidden_size, {"model_fingerprint": lm.fingerprint})
    scores: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    for i, layer in enumerate(stats.exit_points):
        x = torch.cat(xs[i])
        best: tuple[float, float, tuple[Any, Any]] | None = None  # (agreement, ridge, its solution)
        scores[str(layer)] = {}
        for ridge in sorted(ridge_grid, reverse=True):
            w, b = stats.solve(i, ridge)
            y = x @ torch.as_tensor(w.T, dtype=torch.float32) + torch.as_tensor(b, dtype=torch.float32)
            agree = float((head(y.to(dtype)).argmax(-1) == target).float().mean())
            scores[str(layer)][repr(ridge)] = agree
            if best is None or agree > best[0]:
                best = (agree, ridge, (w, b))
        assert best is not None
        agree, chosen[str(layer)], solution = best
        translators.set_map(layer, *solution)
        log.debug("exit %d: ridge %g, validation agreement %.3f", layer, chosen[str(layer)], agree)
    report = {"validation_tokens": int(target.numel()), "validation_agreement": scores, "ridge": chosen}
    return translators, report
