"""`greencode <command> ...`: one command line over the entry points.

Each command is a module with ``main(argv)``; it is imported only when used, so
``greencode generate`` never imports Ray.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": ("workflows.generate", "gated generation on one prompt (prints JSON with --json)"),
    "eval": ("workflows.evaluate", "baselines x thresholds on a corpus -> report dir"),
    "finetune": ("workflows.finetune", "LITE fine-tuning on Ray Train"),
    "fit-exits": ("workflows.fit_exits", "exit translators on a frozen model (Ray Data statistics)"),
    "extract": ("workflows.extract", "hidden-state shards with Ray Data"),
    "train-policy": ("workflows.train_policy", "PPO exit policy with RLlib"),
    "sweep": ("workflows.sweep", "Ray Tune over the exit-policy reward coefficients"),
    "lite-sweep": ("workflows.lite_sweep", "Ray Tune over the LITE loss budgets, target and lr"),
    "pipeline": ("workflows.pipeline", "every stage end to end"),
    "serve": ("workflows.serve", "serve the gated model over HTTP (Ray Serve)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<13} {help}" for name, (_, help) in COMMANDS.items()]
        msg = "usage: greencode <command> [options]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"unknown command {argv[0]!r}\n\n{msg}")
        print(msg)
        return
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
