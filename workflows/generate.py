"""`greencode generate`: gated generation on one prompt, printed as text or one JSON object.

    greencode generate --model embedded --gate policy --policy runs/demo/policy/exit_policy.pt \
        --threshold 0.9 --max-new-tokens 15 --prompt-file snippet.py --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from greencode.config import ConfigError, GateConfig, GenerationConfig, ModelConfig, validate
from greencode.gates import build_gate
from greencode.generate import GatedGenerator
from greencode.modeling import load_model
from greencode.policy import ExitPolicy
from workflows.common import setup_logging

log = logging.getLogger("greencode.generate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="greencode generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="'embedded', HF dir, hub id or .gguf (default: embedded)")
    p.add_argument("--gate", default="full", choices=["full", "fixed", "confidence", "policy"])
    p.add_argument("--exit-layer", type=int, help="fixed gate: 1-based layer")
    p.add_argument("--confidence", type=float, default=0.9, help="confidence gate: exit when max prob >= c")
    p.add_argument("--policy", help="policy gate: ExitPolicy file")
    p.add_argument("--threshold", type=float, default=0.9, help="policy gate: exit when p[exit] > T")
    p.add_argument("--gate-temperature", type=float, default=1.0, help="policy gate: softmax temperature")
    p.add_argument("--max-new-tokens", type=int, default=15)
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--kv-mode", default="propagate", choices=["propagate", "none"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt ('-' = stdin)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        gate_cfg = validate(GateConfig, {
            "mode": args.gate, "exit_layer": args.exit_layer, "confidence": args.confidence,
            "threshold": args.threshold, "temperature": args.gate_temperature, "policy_path": args.policy,
        })
        gen_cfg = validate(GenerationConfig, {
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "stop": args.stop, "seed": args.seed, "kv_mode": args.kv_mode,
        })
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if args.prompt_file:
        prompt = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text()
    else:
        prompt = args.prompt
    if not prompt:
        raise SystemExit("error: the prompt is empty")

    try:
        lm = load_model(ModelConfig(name=args.model))
        policy = None
        if gate_cfg.mode == "policy":
            policy = ExitPolicy.load(gate_cfg.policy_path, hidden_size=lm.hidden_size,
                                     exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
        gate = build_gate(gate_cfg, policy)
        result = GatedGenerator(lm).generate([prompt], gate, gen_cfg)[0]
    except (FileNotFoundError, ValueError) as err:  # PolicyMismatchError, UnsupportedModelError, bad exit layer
        raise SystemExit(f"error: {err}") from None
    record = {"gate": gate.describe(), "model": args.model, **result.to_dict()}
    if args.json:
        print(json.dumps(record))
    else:
        print(result.text)
        log.info("%s: %d tokens, mean layers %.2f / %d, %.2f s, energy %s J", gate.describe(),
                 len(result.token_ids), result.mean_layers, result.num_layers, result.time_s, result.energy_j)


if __name__ == "__main__":
    main()
