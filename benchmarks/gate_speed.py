"""Gate speed on one model, in one run: tokens/s of every gate side by side.

    .venv/bin/python benchmarks/gate_speed.py [--model embedded] [--prompts 6] [--max-new-tokens 15]
        [--policy FILE]

Prints, with the KV cache (propagate) and without it:
- tokens/s of `full` and of `fixed(k)` at every exit point, with the measured speed-up next to
  the ideal one (parameters touched per token at full depth over those at the run's mean layers:
  layers + LM head, plus the K/V projections of the skipped layers when propagating; the first
  token of each completion always runs all layers, so fixed(k) averages a little above k);
- the policy gate's share of generation time (the ExitPolicy MLP at every exit point; a policy
  that never exits is the worst case: it is asked at all of them) and the confidence gate's share
  (one LM-head call per exit point) for comparison.
Without --policy a randomly initialised ExitPolicy of the default shape is used: its *cost* is
what is measured here, not its decisions.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch

from greencode.config import GenerationConfig, ModelConfig
from greencode.gates import ConfidenceGate, FixedGate, FullGate, Gate, PolicyGate
from greencode.generate import GatedGenerator
from greencode.modeling import EarlyExitModel, load_model
from greencode.policy import ExitPolicy


def stdlib_prompts(n: int, chars: int = 400) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 4000)[:n]
    return [p.read_text(errors="replace")[:chars] for p in files]


def run(gen: GatedGenerator, prompts: list[str], gate: Gate, cfg: GenerationConfig) -> dict[str, float]:
    tokens = time_s = gate_s = layers = 0.0
    for p in prompts:  # batch size 1, as in the published measurements
        r = gen.generate([p], gate, cfg)[0]
        tokens += len(r.token_ids)
        time_s += r.time_s
        gate_s += r.gate_time_s
        layers += sum(r.layers_per_token)
    return {"tok_s": tokens / time_s, "gate_share": gate_s / time_s, "mean_layers": layers / tokens}


def ideal_speedup(lm: EarlyExitModel, mean_layers: float, propagate: bool) -> float:
    """Parameters touched per token at full depth over those at ``mean_layers`` (the first token is full)."""
    layer = sum(p.numel() for p in lm.adapter.layers[0].parameters())
    head = lm.adapter.lm_head.weight.numel()
    attn = lm.adapter.layers[0].self_attn
    kv = attn.k_proj.weight.numel() + attn.v_proj.weight.numel()
    L = lm.num_layers
    skipped_cost = (L - mean_layers) * kv if propagate else 0
    return (L * layer + head) / (mean_layers * layer + head + skipped_cost)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=15)
    ap.add_argument("--policy", help="ExitPolicy file (default: random init of the default shape)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(ModelConfig(name=args.model))
    gen = GatedGenerator(lm)
    prompts = stdlib_prompts(args.prompts)
    if args.policy:
        policy = ExitPolicy.load_for(args.policy, lm)
    else:
        policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
    never = PolicyGate(policy, threshold=1.0)  # p > 1 never holds: asked at every exit point
    gen.generate(prompts[:1], FullGate(), GenerationConfig(max_new_tokens=3))  # warm-up

    print(f"model={args.model} layers={lm.num_layers} exit_points={lm.exit_points} "
          f"prompts={len(prompts)} max_new_tokens={args.max_new_tokens} threads={args.threads} device={lm.device}")
    for kv_mode in ("propagate", "none"):
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, kv_mode=kv_mode)
        full = run(gen, prompts, FullGate(), cfg)
        print(f"\n== KV cache: {kv_mode} ==")
        print(f"{'gate':<22}{'tokens/s':>10}{'speed-up':>10}{'ideal':>8}{'mean layers':>13}{'gate share':>12}")
        print(f"{'full':<22}{full['tok_s']:>10.2f}{1.0:>10.2f}{1.0:>8.2f}{full['mean_layers']:>13.2f}{'-':>12}")
        for k in lm.exit_points:
            r = run(gen, prompts, FixedGate(k), cfg)
            ideal = ideal_speedup(lm, r["mean_layers"], kv_mode == "propagate")
            print(f"{f'fixed(k={k})':<22}{r['tok_s']:>10.2f}{r['tok_s'] / full['tok_s']:>10.2f}{ideal:>8.2f}"
                  f"{r['mean_layers']:>13.2f}{'-':>12}")
        for name, gate in (("policy (never exits)", never), ("confidence(c=1.0)", ConfidenceGate(1.0))):
            r = run(gen, prompts, gate, cfg)
            print(f"{name:<22}{r['tok_s']:>10.2f}{r['tok_s'] / full['tok_s']:>10.2f}{'-':>8}"
                  f"{r['mean_layers']:>13.2f}{r['gate_share']:>11.1%}")
    print("\ngate share = time inside the gate / generation time, with the gate asked at every exit point "
          "(target for the policy gate: <= 3%; the published prototype paid 5-20%).")


if __name__ == "__main__":
    main()
