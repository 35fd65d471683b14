"""`greencode generate`: gated generation on one prompt, printed as text or one JSON object.

    greencode generate --model embedded --translators runs/demo/translators --gate policy \
        --policy runs/demo/policy/exit_policy.pt --threshold 0.9 --max-new-tokens 15 --prompt-file snippet.py --json
    greencode generate --config my-gate.yaml --set generation.temperature=0.2 --prompt 'def fib(n):'
    greencode generate --model Qwen/Qwen2.5-Coder-0.5B --prompt-file before.py --suffix-file after.py   (FIM)
    greencode generate --model embedded --translators runs/demo/translators --gate policy \
        --policy runs/demo/policy/exit_policy.pt --lossless --prompt-file snippet.py --json   (the full model's text)

Needs no Ray: the model runs in this process.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from greencode.config import GenerateConfig
from greencode.fim import fim_prompt_ids
from greencode.gates import build_gate
from greencode.modeling import load_model
from greencode.policy import ExitPolicy
from greencode.speculative import LosslessGenerator
from workflows.common import ConfigCommand, Flag, cli_errors

log = logging.getLogger("greencode.generate")

COMMAND = ConfigCommand(
    GenerateConfig, "Gated generation on one prompt (text, or one JSON object with --json).",
    prog="greencode generate",
    flags=[
        Flag("--model", "model.name"),
        Flag("--translators", "model.translators"),
        Flag("--gate", "gate.mode", choices=["full", "fixed", "confidence", "policy"]),
        Flag("--exit-layer", "gate.exit_layer", type=int),
        Flag("--confidence", "gate.confidence", type=float),
        Flag("--policy", "gate.policy_path"),
        Flag("--threshold", "gate.threshold", type=float),
        Flag("--gate-temperature", "gate.temperature", type=float),
        Flag("--max-new-tokens", "generation.max_new_tokens", type=int),
        Flag("--temperature", "generation.temperature", type=float),
        Flag("--top-p", "generation.top_p", type=float),
        Flag("--stop", "generation.stop", append=True),
        Flag("--seed", "generation.seed", type=int),
        Flag("--kv-mode", "generation.kv_mode", choices=["propagate", "none"]),
        Flag("--lossless", "generation.lossless", switch=True),
        Flag("--max-draft", "generation.speculative.max_draft", type=int),
        Flag("--fim-order", "fim_order", choices=["psm", "spm"]),
    ],
)
_source = COMMAND.parser.add_mutually_exclusive_group(required=True)
_source.add_argument("--prompt", help="prompt text")
_source.add_argument("--prompt-file", help="file holding the prompt ('-' = stdin)")
COMMAND.parser.add_argument("--suffix-file", help="fill-in-the-middle: file holding the text after the cursor "
                            "(the prompt is the text before it); needs a model with FIM tokens")
COMMAND.parser.add_argument("--json", action="store_true", help="print one JSON object")


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, args = COMMAND.parse(argv)
    if args.prompt_file:
        prompt = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text()
    else:
        prompt = args.prompt
    if not prompt:
        raise SystemExit("error: the prompt is empty")
    suffix = Path(args.suffix_file).read_text() if args.suffix_file else None
    lm = load_model(cfg.model, cfg.exits)
    policy = ExitPolicy.load_for(cfg.gate.policy_path, lm) if cfg.gate.mode == "policy" else None
    gate = build_gate(cfg.gate, policy)
    source = fim_prompt_ids(lm.tokenizer, prompt, suffix, cfg.fim_order) if suffix is not None else prompt
    result = LosslessGenerator(lm).generate([source], gate, cfg.generation)[0]
    record = {"gate": gate.describe(), "model": cfg.model.name, **result.to_dict()}
    if args.json:
        print(json.dumps(record))
    else:
        print(result.text)
        log.info("%s%s: %d tokens, mean layers %.2f / %d, %.2f s, energy %s J", gate.describe(),
                 " lossless" if cfg.generation.lossless else "", len(result.token_ids), result.mean_layers,
                 result.num_layers, result.time_s, result.energy_j)
        spec = getattr(result, "speculative", None)
        if spec:
            log.info("lossless: %d of %d drafts accepted, mean draft depth %s, %d layer passes",
                     spec["accepted_tokens"], spec["drafted_tokens"], spec["mean_draft_depth"], spec["layer_passes"])


if __name__ == "__main__":
    main()
