"""Decode speed of every gate at several batch sizes, beside the ideal and Hugging Face `generate`.

    .venv/bin/python benchmarks/gate_speed.py                  # batch 1, 8, 20; 32 new tokens
    .venv/bin/python benchmarks/gate_speed.py --batches 8 --repeats 1 --policy runs/demo/policy/exit_policy.pt

For each batch size B, B prompts of ``--prompt-tokens`` tokens (the start of stdlib files; batch 1
decodes ``--batch1-prompts`` of them one at a time) decode ``--new-tokens`` greedy tokens each under:
``full``; ``fixed(k)`` at each ``--fixed`` k; two scripted splits in which every other row leaves at
layer 14 (``split 14|30``, mean 22) or 8 (``split 8|30``, mean 19) and the rest run every layer;
the policy gate (``--policy``, or a RANDOM-INIT policy of the default shape: its cost is measured,
not its decisions); the confidence gate; and Hugging Face ``generate`` on the same prompts.
Only decoding is timed (from the first token, which the prompt pass makes, to the last), EOS is
ignored so every row makes all its tokens, and the settings take turns within each repeat so a
change of machine load hits them alike; each setting's best repeat is reported.

Columns: mean layers per decoded token; tokens/s (decoded tokens of all rows / decode time);
the speed-up over ``full`` and the ideal one from the layer count (parameters touched per token:
layers + LM head + the skipped layers' K/V projections); the gate's time per token (ms) and share
of decode time. Below each table, the policy and confidence gates are compared with ``fixed`` at
the same mean depth (time per token interpolated linearly in layers from the fixed/full rows).
"""

from __future__ import annotations

import argparse
import logging
import platform
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from greencode.config import GenerationConfig, ModelConfig
from greencode.gates import ConfidenceGate, FixedGate, FullGate, Gate, PolicyGate
from greencode.generate import Finished, GatedGenerator
from greencode.modeling import EarlyExitModel, load_model
from greencode.policy import ExitPolicy


class SplitGate(FixedGate):
    """Scripted: every other row of the batch (rows 0, 2, ...) leaves at ``exit_layer``, the rest run every layer.

    It decides only at ``exit_layer``, where every row is still running, so positions are batch rows.
    """

    name = "split"

    def exit_mask(self, hidden, layer, decode):
        leave = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        leave[::2] = layer == self.exit_layer
        return leave, None

    def describe(self) -> str:
        return f"split {self.exit_layer}|L"


def stdlib_prompts(lm: EarlyExitModel, n: int, tokens: int) -> list[list[int]]:
    """``n`` prompts of exactly ``tokens`` tokens: the start of the larger stdlib modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 8000)
    out = []
    for path in files:
        ids = lm.tokenizer(path.read_text(errors="replace")[: tokens * 8], add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} stdlib files give {tokens}-token prompts, {n} wanted")


@dataclass
class Timing:
    seconds: float = 0.0
    tokens: int = 0
    layers: int = 0
    gate_s: float = 0.0


def decode_greencode(gen: GatedGenerator, batches: list[list[list[int]]], gate: Gate, new_tokens: int) -> Timing:
    """Decode time of every batch, from the first token (made by the prompt pass) to the last."""
    cfg = GenerationConfig(max_new_tokens=new_tokens)
    t = Timing()
    for batch in batches:
        items = gen.stream(batch, gate, cfg)
        next(items)  # the prompt pass and the first token of every row
        t0 = time.perf_counter()
        *_, finished = items
        t.seconds += time.perf_counter() - t0
        assert isinstance(finished, Finished)
        for r in finished.results:
            t.tokens += len(r.token_ids) - 1
            t.layers += sum(r.layers_per_token[1:])
        t.gate_s += finished.results[0].gate_time_s  # the batch's gate time (every row reports it)
    return t


class _FirstTokenClock:
    """A `generate` streamer noting when the first new token is out (the prompt pass is over)."""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call hands over the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def decode_hf(lm: EarlyExitModel, batches: list[list[list[int]]], new_tokens: int) -> Timing:
    """Hugging Face greedy `generate` on the same left-padded batches, timed from its first new token."""
    t = Timing()
    for batch in batches:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=lm.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=lm.device)
        clock = _FirstTokenClock()
        lm.model.generate(ids, attention_mask=attn, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=0, streamer=clock)
        t.seconds += time.perf_counter() - clock.first
        t.tokens += len(batch) * (new_tokens - 1)
        t.layers += len(batch) * (new_tokens - 1) * lm.num_layers
    return t


def ideal_speedup(lm: EarlyExitModel, mean_layers: float) -> float:
    """Parameters touched per token at full depth over those at ``mean_layers`` (skipped layers' K/V included)."""
    layer = sum(p.numel() for p in lm.adapter.layers[0].parameters())
    head = lm.adapter.lm_head.weight.numel()
    attn = lm.adapter.layers[0].self_attn
    kv = attn.k_proj.weight.numel() + attn.v_proj.weight.numel()
    full = lm.num_layers
    return (full * layer + head) / (mean_layers * layer + head + (full - mean_layers) * kv)


def fixed_at(depth: float, points: list[tuple[float, float]]) -> float:
    """Seconds per token at ``depth`` layers, from a least-squares line through (layers, s/token) points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my + slope * (depth - mx)


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it (every benchmark names the CPU beside its timings)."""
    return next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                 .stdout.splitlines() if line.startswith("Model name")), platform.processor() or platform.machine())


def machine() -> str:
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    return (f"CPU {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), torch threads {torch.get_num_threads()}, "
            f"load average {' '.join(load)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 20])
    ap.add_argument("--batch1-prompts", type=int, default=4, help="prompts decoded one at a time at batch 1")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--fixed", type=int, nargs="+", default=[8, 14, 19, 22])
    ap.add_argument("--policy", help="ExitPolicy file (default: a RANDOM-INIT policy of the default shape)")
    ap.add_argument("--threshold", type=float, default=0.5, help="policy threshold T")
    ap.add_argument("--confidence", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=2, help="rounds over all settings; the best of each is kept")
    ap.add_argument("--only", nargs="+", metavar="PREFIX",
                    help="run only the settings whose name starts with one of these (e.g. full fixed split)")
    ap.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    lm = load_model(ModelConfig(name=args.model))
    gen = GatedGenerator(lm)
    gen.eos_ids = set()  # every row decodes all its tokens: equal work in every setting
    L = lm.num_layers
    prompts = stdlib_prompts(lm, max(max(args.batches), args.batch1_prompts), args.prompt_tokens)
    if args.policy:
        policy, label = ExitPolicy.load_for(args.policy, lm), f"policy file {args.policy}"
    else:
        torch.manual_seed(0)
        policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint).to(lm.device)
        label = "RANDOM-INIT policy (its cost, not its decisions)"
    gates: dict[str, Gate | None] = {"full": FullGate()}
    gates |= {f"fixed({k})": FixedGate(k) for k in args.fixed}
    gates |= {f"split 14|{L}": SplitGate(14), f"split 8|{L}": SplitGate(8),
              f"policy(T={args.threshold})": PolicyGate(policy, args.threshold),
              f"confidence({args.confidence})": ConfidenceGate(args.confidence)}
    if not args.no_hf:
        gates["HF generate"] = None
    if args.only:
        gates = {name: gate for name, gate in gates.items() if name.startswith(tuple(args.only))}
        if "full" not in gates:
            raise SystemExit("--only must keep 'full': every speed-up is measured against it")
    gen.generate(prompts[:2], FullGate(), GenerationConfig(max_new_tokens=3))  # warm-up

    print(f"model={args.model} layers={L} exit_points={lm.exit_points} prompt_tokens={args.prompt_tokens} "
          f"new_tokens={args.new_tokens} repeats={args.repeats} device={lm.device}; {label}")
    print(machine())
    for bsz in args.batches:
        work = [[p] for p in prompts[: args.batch1_prompts]] if bsz == 1 else [prompts[:bsz]]
        best: dict[str, Timing] = {}
        for _ in range(args.repeats):
            for name, gate in gates.items():
                t = decode_hf(lm, work, args.new_tokens) if gate is None else decode_greencode(gen, work, gate,
                                                                                             args.new_tokens)
                if name not in best or t.seconds < best[name].seconds:
                    best[name] = t
        full = best["full"].tokens / best["full"].seconds
        print(f"\n== batch {bsz} ({len(work)} batch{'es' if len(work) > 1 else ''}) ==")
        print(f"{'setting':<18}{'layers':>8}{'tokens/s':>10}{'x full':>8}{'ideal':>7}{'gate ms/tok':>13}"
              f"{'gate share':>12}")
        for name, t in best.items():
            mean, rate = t.layers / t.tokens, t.tokens / t.seconds
            ideal = f"{ideal_speedup(lm, mean):.2f}" if gates[name] is not None else "-"
            gated = t.gate_s > 0
            print(f"{name:<18}{mean:>8.2f}{rate:>10.2f}{rate / full:>8.2f}{ideal:>7}"
                  f"{(f'{1e3 * t.gate_s / t.tokens:.3f}' if gated else '-'):>13}"
                  f"{(f'{t.gate_s / t.seconds:.1%}' if gated else '-'):>12}")
        line = [(t.layers / t.tokens, t.seconds / t.tokens) for n, t in best.items()
                if n == "full" or n.startswith("fixed(")]
        for name, t in best.items():
            if name.startswith(("policy", "confidence")):
                mean = t.layers / t.tokens
                expected = fixed_at(mean, line)
                print(f"{name} at {mean:.2f} layers: tokens/s {expected / (t.seconds / t.tokens):.2f}x "
                      f"those of fixed at the same depth (interpolated)")
    print(f"\n{machine()}")


if __name__ == "__main__":
    main()
