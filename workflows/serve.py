"""`greencode serve`: flags -> ServeConfig -> the serve_app deployment on Ray Serve, until interrupted.

    greencode serve --model embedded --translators runs/demo/translators \
        --policy runs/demo/policy/exit_policy.pt --port 8000
    greencode serve --config my-serve.yaml --set gate.threshold=0.95

The same ServeConfig is what ``serve run serve_app/config.yaml`` reads as ``args``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from greencode.config import LOOPBACK_HOSTS, ConfigError, ServeConfig
from serve_app.app import ModelLoader, build_app_with_loader
from workflows.common import ConfigCommand, Flag, cli_errors, init_ray, setup_logging

log = logging.getLogger("greencode.serve")

COMMAND = ConfigCommand(
    ServeConfig, "Serve the gated model over HTTP on Ray Serve (TGI, Ollama/llm-vscode, OpenAI protocols).",
    prog="greencode serve",
    flags=[
        Flag("--model", "model.name"),
        Flag("--translators", "model.translators"),
        Flag("--policy", "policy_path"),
        Flag("--gate", "default_gate", choices=["full", "fixed", "confidence", "policy"]),
        Flag("--threshold", "gate.threshold", type=float),
        Flag("--replicas", "num_replicas", type=int),
        Flag("--num-cpus", "num_cpus", type=float),
        Flag("--num-gpus", "num_gpus", type=float),
        Flag("--max-batch-size", "max_batch_size", type=int),
        Flag("--prefix-cache-mb", "prefix_cache_mb", type=float),
        Flag("--fim-order", "fim_order", choices=["psm", "spm"]),
        Flag("--api-key", "api_key"),
    ],
)
COMMAND.parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to expose; default 127.0.0.1)")
COMMAND.parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")


def parse(argv: list[str] | None) -> tuple[ServeConfig, argparse.Namespace]:
    """The config of ``argv`` (--api-key falls back to $GREENCODE_API_KEY); a missing policy file is refused here,
    before Ray starts.

    A non-loopback ``--host`` is reached under names the server cannot know, so unless the config names
    ``allowed_hosts`` itself every Host is served there (the Host check guards loopback servers against DNS
    rebinding; an exposed server relies on its API key).
    """
    args = COMMAND.parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.flag_api_key is None:
        args.flag_api_key = os.environ.get("GREENCODE_API_KEY")
    cfg = COMMAND.config(args)
    if cfg.policy_path and not Path(cfg.policy_path).is_file():
        raise ConfigError(f"policy_path: file not found: {cfg.policy_path}")
    if args.host not in LOOPBACK_HOSTS and "allowed_hosts" not in cfg.model_fields_set:
        cfg.allowed_hosts = ["*"]
        if cfg.api_key is None:
            log.warning("serving on %s without an API key: anyone who reaches this address can use the model "
                        "(set --api-key or $GREENCODE_API_KEY)", args.host)
    return cfg, args


def run(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False,
        model_loader: ModelLoader | None = None):
    """Start (or update) the app on Ray Serve at http://host:port/; returns its DeploymentHandle."""
    from ray import serve

    init_ray()
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app_with_loader(cfg, model_loader), name="greencode", route_prefix="/", blocking=blocking)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    """Blocks until interrupted."""
    cfg, args = parse(argv)
    log.info("GreenCode serving on http://%s:%d (OpenAPI at /docs)", args.host, args.port)
    run(cfg, args.host, args.port, blocking=True)


if __name__ == "__main__":
    main()
