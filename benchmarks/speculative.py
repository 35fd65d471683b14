"""Lossless (self-speculative) decoding against Hugging Face: tokens/s side by side, in one run.

    .venv/bin/python benchmarks/speculative.py [--model embedded|LITE_MODEL_DIR] [--translators DIR] [--policy FILE]
        [--prompts 6] [--max-new-tokens 32] [--threshold 0.9] [--confidence 0.9] [--fixed-layers 18,22,26]

Every row generates greedily, batch 1, with the KV cache, on the same held-out prompts (METHOD §6
line-completion contexts from the test split of the stdlib corpus, which LITE fine-tuning never
sees); EOS is ignored so every row makes exactly --max-new-tokens tokens per prompt. Rows:

- Hugging Face `generate`, the reference for speed and tokens;
- Hugging Face assisted generation with `assistant_early_exit=k` (self-speculation from the first k
  layers, its default draft schedule) at its best k;
- GreenCode `full`: the layer-by-layer generator, all layers;
- lossless drafts from fixed(k) at its best k, confidence(c) and policy(T, τ=1);
- the lossy policy gate (same T), for what lossless costs over it.

The best k of each fixed row is picked first by a probe (the first --probe-prompts prompts,
--probe-tokens tokens) over --fixed-layers (default: every exit point); the probe table is printed.
Prompts are run one after another with every row in turn (a different row first on each prompt), so
a busy machine slows all rows alike: compare the ratios of one run, not tokens/s across runs.

Columns: tokens/s; ratio to HF `generate`; acceptance = accepted / drafted tokens; mean draft depth
(exit layer of the drafts); layer passes = sequential decoder-layer calls per token (a verification
over several tokens is one call per layer: what latency follows on a CPU); layers = decoder layers
computed per token, summed over tokens (>= L for lossless: it saves passes, not arithmetic);
same = share of tokens equal to HF greedy at the same position (1.0 for every lossless row);
energy per token in joules, or '-' where no meter exists (never estimated).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from greencode.config import DataConfig, ExitConfig, GateConfig, GenerationConfig, ModelConfig
from greencode.data import line_completion_samples, load_corpus
from greencode.energy import EnergyMeter
from greencode.gates import ConfidenceGate, FixedGate, FullGate, Gate, PolicyGate
from greencode.generate import GatedGenerator
from greencode.modeling import EarlyExitModel, load_model
from greencode.policy import ExitPolicy
from greencode.speculative import LosslessGenerator

NO_POLICY_HINT = ("no --policy: policy rows skipped. For the demo's translators and policy run `.venv/bin/greencode "
                  "pipeline --preset demo`, then add --translators runs/demo/translators "
                  "--policy runs/demo/policy/exit_policy.pt")


@dataclass
class Outcome:
    tokens: list[int]
    time_s: float
    energy_j: float | None
    drafted: int = 0
    accepted: int = 0
    depth_sum: float = 0.0
    passes: int | None = None
    layers: int | None = None


@dataclass
class Tally:
    name: str
    tokens: int = 0
    time_s: float = 0.0
    energy_j: float | None = 0.0
    drafted: int = 0
    accepted: int = 0
    depth_sum: float = 0.0
    passes: int | None = 0
    layers: int | None = 0
    same: int = 0

    def add(self, out: Outcome, reference: list[int]) -> None:
        self.tokens += len(out.tokens)
        self.time_s += out.time_s
        self.energy_j = None if self.energy_j is None or out.energy_j is None else self.energy_j + out.energy_j
        self.drafted += out.drafted
        self.accepted += out.accepted
        self.depth_sum += out.depth_sum
        self.passes = None if self.passes is None or out.passes is None else self.passes + out.passes
        self.layers = None if self.layers is None or out.layers is None else self.layers + out.layers
        self.same += sum(a == b for a, b in zip(out.tokens, reference))

    @property
    def tok_s(self) -> float:
        return self.tokens / self.time_s if self.time_s else 0.0


Runner = Callable[[list[int]], Outcome]


@contextmanager
def count_hf_drafts() -> Iterator[dict[str, int]]:
    """Count the drafts HF's early-exit assistant proposes and the ones its verification accepts."""
    from transformers.generation.candidate_generator import EarlyExitCandidateGenerator as Assistant

    counts = {"drafted": 0, "accepted": 0}
    original = Assistant.update_candidate_strategy

    def counting(self, input_ids, scores, num_matches):
        counts["drafted"] += scores.shape[1] - 1  # scores cover the candidates + the bonus position
        counts["accepted"] += int(num_matches)
        return original(self, input_ids, scores, num_matches)

    Assistant.update_candidate_strategy = counting
    try:
        yield counts
    finally:
        Assistant.update_candidate_strategy = original


def hf_runner(lm: EarlyExitModel, meter: EnergyMeter, n: int, early_exit: int | None = None) -> Runner:
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    extra = {"assistant_early_exit": early_exit} if early_exit else {}

    def run(prompt: list[int]) -> Outcome:
        ids = torch.tensor([prompt], device=lm.device)
        with count_hf_drafts() as counts, meter.measure() as m, torch.no_grad():
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                    min_new_tokens=n, pad_token_id=pad, **extra)
        depth = counts["drafted"] * (early_exit or 0)
        tokens = out[0, len(prompt):].tolist()
        return Outcome(tokens, m.time_s, m.energy_j, counts["drafted"], counts["accepted"], depth)

    return run


def greencode_runner(gen: GatedGenerator, gate: Gate, cfg: GenerationConfig) -> Runner:
    def run(prompt: list[int]) -> Outcome:
        r = gen.generate([prompt], gate, cfg)[0]
        spec = getattr(r, "speculative", None)
        if spec is None:  # the plain generator: one pass per layer a token ran
            layers = sum(r.layers_per_token)
            return Outcome(r.token_ids, r.time_s, r.energy_j, passes=layers, layers=layers)
        depth = (spec["mean_draft_depth"] or 0.0) * spec["drafted_tokens"]
        return Outcome(r.token_ids, r.time_s, r.energy_j, spec["drafted_tokens"], spec["accepted_tokens"], depth,
                       spec["layer_passes"], spec["layers_computed"])

    return run


def measure(rows: dict[str, Runner], prompts: list[list[int]], reference: str) -> dict[str, Tally]:
    """Every row on every prompt, prompt by prompt, starting one row later on each prompt so no row
    always runs first on a machine whose load drifts; `same` compares to the reference row's tokens."""
    tallies = {name: Tally(name) for name in rows}
    names = list(rows)
    for i, prompt in enumerate(prompts):
        order = names[i % len(names):] + names[: i % len(names)]
        outcomes = {name: rows[name](prompt) for name in order}
        for name in names:
            tallies[name].add(outcomes[name], outcomes[reference].tokens)
    return tallies


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(tallies: dict[str, Tally], base: float) -> None:
    print(f"{'setting':<34}{'tok/s':>8}{'x HF':>7}{'accept':>8}{'depth':>7}{'passes':>8}{'layers':>8}{'same':>7}"
          f"{'J/tok':>8}")
    for t in tallies.values():
        accept = t.accepted / t.drafted if t.drafted else None
        depth = t.depth_sum / t.drafted if t.drafted else None
        passes, layers, energy = (None if v is None else v / t.tokens for v in (t.passes, t.layers, t.energy_j))
        print(f"{t.name:<34}{t.tok_s:>8.2f}{t.tok_s / base:>7.2f}{fmt(accept, '.2f'):>8}{fmt(depth, '.1f'):>7}"
              f"{fmt(passes, '.1f'):>8}{fmt(layers, '.1f'):>8}{t.same / t.tokens:>7.3f}{fmt(energy, '.3f'):>8}")


def held_out_prompts(lm: EarlyExitModel, n: int, context_cap: int) -> list[list[int]]:
    files = load_corpus(DataConfig(corpus="stdlib")).split("test")
    return [s.context_ids for s in line_completion_samples(files, lm.tokenizer, n, context_cap=context_cap)]


def best_fixed_layers(lm: EarlyExitModel, meter: EnergyMeter, lossless: LosslessGenerator, layers: list[int],
                      prompts: list[list[int]], n: int) -> tuple[int, int]:
    """(best k for HF assisted, best k for lossless fixed drafts) by tokens/s on the probe prompts."""
    cfg = GenerationConfig(max_new_tokens=n, lossless=True)
    hf_rows = {k: f"HF assisted early exit k={k}" for k in layers}
    lossless_rows = {k: f"lossless fixed(k={k})" for k in layers}
    rows: dict[str, Runner] = {"HF generate": hf_runner(lm, meter, n)}
    for k in layers:
        rows[hf_rows[k]] = hf_runner(lm, meter, n, early_exit=k)
        rows[lossless_rows[k]] = greencode_runner(lossless, FixedGate(k), cfg)
    tallies = measure(rows, prompts, "HF generate")
    print(f"\n== probe: {len(prompts)} prompts x {n} tokens ==")
    print_table(tallies, tallies["HF generate"].tok_s)
    return (max(layers, key=lambda k: tallies[hf_rows[k]].tok_s),
            max(layers, key=lambda k: tallies[lossless_rows[k]].tok_s))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="'embedded', a LITE model dir, or any loadable model")
    ap.add_argument("--translators", help="exit translators of --model (greencode fit-exits); default: the model "
                    "dir's own, if any")
    ap.add_argument("--policy", help="ExitPolicy file trained for --model (policy rows are skipped without it)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--context-cap", type=int, default=256, help="prompt tokens (the last ones of each context)")
    ap.add_argument("--threshold", type=float, default=GateConfig().threshold, help="policy gate T")
    ap.add_argument("--confidence", type=float, default=GateConfig().confidence, help="confidence gate c")
    ap.add_argument("--fixed-layers", help="comma-separated layers the probe tries (default: every exit point)")
    ap.add_argument("--probe-prompts", type=int, default=2)
    ap.add_argument("--probe-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()  # HF's assisted path warns about its own logits processors
    torch.set_num_threads(args.threads)

    # the exit points the policy was trained for (the demo's are 14/18/22/26), else the rule's
    policy = ExitPolicy.load(args.policy) if args.policy else None
    exits = ExitConfig(exit_points=policy.exit_points or None) if policy else None
    lm = load_model(ModelConfig(name=args.model, translators=args.translators), exits)
    meter = EnergyMeter(lm.device)
    plain, lossless = GatedGenerator(lm, meter), LosslessGenerator(lm, meter)
    plain.eos_ids = lossless.eos_ids = set()  # every row makes exactly max_new_tokens tokens
    prompts = held_out_prompts(lm, args.prompts, args.context_cap)
    layers = [int(k) for k in args.fixed_layers.split(",")] if args.fixed_layers else lm.exit_points
    if policy is not None:  # refused if trained for another model, then placed where the gate's states are
        policy.check_compatible(hidden_size=lm.hidden_size, exit_points=lm.exit_points,
                                model_fingerprint=lm.fingerprint, source=args.policy)
        policy = policy.to(lm.device)

    print(f"model={args.model} layers={lm.num_layers} exit_points={lm.exit_points} prompts={len(prompts)} "
          f"(mean {sum(map(len, prompts)) / len(prompts):.0f} tokens) max_new_tokens={args.max_new_tokens} "
          f"threads={args.threads} device={lm.device} energy={meter.source or 'not measured'}")
    if policy is None:
        print(NO_POLICY_HINT)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    exact = cfg.model_copy(update={"lossless": True})
    hf_runner(lm, meter, 4)(prompts[0])  # warm-up
    t0 = time.perf_counter()
    hf_k, fixed_k = best_fixed_layers(lm, meter, lossless, layers, prompts[: args.probe_prompts], args.probe_tokens)

    rows: dict[str, Runner] = {
        "HF generate": hf_runner(lm, meter, args.max_new_tokens),
        f"HF assisted early exit k={hf_k}": hf_runner(lm, meter, args.max_new_tokens, early_exit=hf_k),
        "GreenCode full": greencode_runner(plain, FullGate(), cfg),
        f"lossless fixed(k={fixed_k})": greencode_runner(lossless, FixedGate(fixed_k), exact),
        f"lossless confidence(c={args.confidence})": greencode_runner(lossless, ConfidenceGate(args.confidence), exact),
    }
    if policy is not None:
        gate = PolicyGate(policy, args.threshold)
        rows[f"lossless policy(T={args.threshold})"] = greencode_runner(lossless, gate, exact)
        rows[f"lossy policy(T={args.threshold})"] = greencode_runner(plain, gate, cfg)
    tallies = measure(rows, prompts, "HF generate")
    print(f"\n== {len(prompts)} held-out prompts x {args.max_new_tokens} tokens, batch 1 ==")
    print_table(tallies, tallies["HF generate"].tok_s)
    print(f"\n(total {time.perf_counter() - t0:.0f} s; timings are wall clock on this machine, "
          "noisy when it is shared)")


if __name__ == "__main__":
    main()
