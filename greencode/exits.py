"""Exit points and LITE loss weights (METHOD §1–2, docs/method.md).

Convention used everywhere in GreenCode: layers are numbered 1..L and exit point
``k`` means "the output of the k-th decoder block" (so ``k`` layers have run).
The final layer ``L`` is always available and is *not* listed among the exit
points. The authors' 0-based ``[3, 5, ..., 25]`` is our ``[4, 6, ..., 26]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from greencode.config import ExitConfig, LiteLossConfig


def default_exit_points(num_layers: int, first_exit: int = 4, first_half_step: int = 2,
                        second_half_step: int = 4) -> list[int]:
    """The published rule: from ``first_exit`` every 2 layers in the first half, every 4 after.

    28 layers -> [4, 6, 8, 10, 12, 14, 18, 22, 26] (9); 32 layers -> 10 points.
    """
    if num_layers < 2:
        raise ValueError(f"a model needs at least 2 layers to have an exit point, got {num_layers}")
    points: list[int] = []
    k = first_exit
    while k <= num_layers / 2 and k < num_layers:
        points.append(k)
        k += first_half_step
    k = points[-1] + second_half_step if points else first_exit
    while k < num_layers:
        points.append(k)
        k += second_half_step
    return points


def resolve_exit_points(num_layers: int, cfg: ExitConfig | None = None) -> list[int]:
    """Exit points for a model with ``num_layers`` layers, from a config (explicit list or rule)."""
    cfg = cfg or ExitConfig()
    if cfg.exit_points is None:
        return default_exit_points(num_layers, cfg.first_exit, cfg.first_half_step, cfg.second_half_step)
    return validate_exit_points(cfg.exit_points, num_layers)


def validate_exit_points(points: Sequence[int], num_layers: int) -> list[int]:
    pts = [int(p) for p in points]
    if not pts:
        raise ValueError("exit_points must not be empty")
    if any(b <= a for a, b in zip(pts, pts[1:])):
        raise ValueError(f"exit_points must be strictly increasing, got {pts}")
    if pts[0] < 1 or pts[-1] >= num_layers:
        raise ValueError(
            f"exit_points must lie in 1..{num_layers - 1} (1-based; the final layer {num_layers} is implicit), "
            f"got {pts}"
        )
    return pts


def lite_weights(exit_points: Sequence[int], num_layers: int, cfg: LiteLossConfig | None = None) -> list[float]:
    """Loss weight per exit point followed by the final layer (len = len(exit_points) + 1).

    ``decaying``: budget ``first_half_budget`` over exits with k <= L/2 and
    ``second_half_budget`` over the rest, each group a geometric sequence
    1, r, r^2... normalised to its budget; ``final_budget`` for layer L.
    ``uniform``: 1/(n+1) everywhere (what the authors' RL-policy model used).
    """
    cfg = cfg or LiteLossConfig()
    n = len(exit_points)
    if cfg.scheme == "uniform":
        return [1.0 / (n + 1)] * (n + 1)
    first = [k for k in exit_points if k <= num_layers / 2]
    second = [k for k in exit_points if k > num_layers / 2]

    def group(count: int, budget: float) -> list[float]:
        raw = [cfg.decay**i for i in range(count)]
        total = sum(raw)
        return [budget * r / total for r in raw]

    return group(len(first), cfg.first_half_budget) + group(len(second), cfg.second_half_budget) + [cfg.final_budget]
