"""`greencode serve`: flags -> ServeConfig -> the serve_app deployment on Ray Serve, until interrupted.

    greencode serve --model embedded --translators runs/demo/translators \
        --policy runs/demo/policy/exit_policy.pt --port 8000
    greencode serve --config my-serve.yaml --set gate.threshold=0.95
    GREENCODE_API_KEYS_FILE=keys.txt greencode serve --host 0.0.0.0    (one tenant per key; docs/serving.md)

The same ServeConfig is what ``serve run serve_app/config.yaml`` reads as ``args``. Keys come from
``$GREENCODE_API_KEY`` (one tenant), a key file (``--api-key-file`` or ``$GREENCODE_API_KEYS_FILE``:
``tenant=key`` per line) or ``--api-key``; keys on the command line show in ``ps``, so the docs
never put them there.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from greencode.config import LOOPBACK_HOSTS, ConfigError, ServeConfig, validate
from greencode.storage import is_uri, published_digest
from serve_app.app import ModelLoader, build_app_with_loader
from serve_app.probe import serve_apps
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
        Flag("--allowed-origin", "allowed_origins", append=True),
    ],
)
COMMAND.parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to expose; default 127.0.0.1)")
COMMAND.parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
COMMAND.parser.add_argument("--api-key-file", type=Path, default=None,
                            help="tenant=key per line: each key names a tenant (default: $GREENCODE_API_KEYS_FILE)")
COMMAND.parser.add_argument("--no-auth", action="store_true",
                            help="serve a non-loopback --host without any API key (anyone who reaches it is served)")


def read_key_file(path: Path) -> dict[str, str]:
    """``tenant=key`` per line (blank lines and ``#`` comments skipped); errors name the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"api key file {path}: cannot read it ({err})") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, key = (part.strip() for part in line.partition("="))
        if not sep or not tenant or not key:
            raise ConfigError(f"api key file {path}, line {number}: expected 'tenant=key'")
        if tenant in keys:
            raise ConfigError(f"api key file {path}, line {number}: tenant {tenant!r} appears twice")
        keys[tenant] = key
    if not keys:
        raise ConfigError(f"api key file {path}: no 'tenant=key' line")
    return keys


def own_names(host: str) -> list[str]:
    """Loopback names, the bind address when it is one, and this machine's host names and their addresses:
    the Host headers a client reaching this server by a name of its own sends (never '*')."""
    names = list(LOOPBACK_HOSTS)
    hostname = socket.gethostname()
    candidates = [hostname, socket.getfqdn(), *([] if host in ("0.0.0.0", "::", "") else [host])]
    try:
        candidates += [info[4][0] for info in socket.getaddrinfo(hostname, None)]
    except OSError:  # a host name that does not resolve: its addresses stay unknown (set allowed_hosts)
        log.warning("host name %s does not resolve: only its name and loopback are allowed hosts", hostname)
    for name in candidates:
        name = name.lower().split("%", 1)[0]  # IPv6 zone ids are not sent in Host headers
        if name and name not in names:
            names.append(name)
    return names


def parse(argv: list[str] | None) -> tuple[ServeConfig, argparse.Namespace]:
    """The config of ``argv`` (--api-key falls back to $GREENCODE_API_KEY, --api-key-file to
    $GREENCODE_API_KEYS_FILE); a missing policy file is refused here, before Ray starts.

    A non-loopback ``--host`` without any key refuses to start unless ``--no-auth`` says so. Its allowed
    hosts, unless the config names them, are this machine's own names and addresses (:func:`own_names`),
    never '*': the Host and Origin checks stay on.
    """
    args = COMMAND.parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.flag_api_key is None:
        args.flag_api_key = os.environ.get("GREENCODE_API_KEY")
    cfg = COMMAND.config(args)
    key_file = args.api_key_file or (Path(os.environ["GREENCODE_API_KEYS_FILE"])
                                     if os.environ.get("GREENCODE_API_KEYS_FILE") else None)
    if key_file is not None:
        cfg = validate(ServeConfig, {**cfg.model_dump(exclude_unset=True),
                                     "api_keys": {**cfg.api_keys, **read_key_file(key_file)}}, source=str(key_file))
    for name, location in (("model.name", cfg.model.name), ("model.translators", cfg.model.translators),
                           ("policy_path", cfg.policy_path)):
        if is_uri(location) and published_digest(location) is None:  # a bad bucket or credentials raise here
            raise ConfigError(f"{name}: nothing is published at {location}")
    if cfg.policy_path and not is_uri(cfg.policy_path) and not Path(cfg.policy_path).is_file():
        raise ConfigError(f"policy_path: file not found: {cfg.policy_path}")
    if args.host not in LOOPBACK_HOSTS:
        if not cfg.tenant_keys and not args.no_auth:
            raise ConfigError(f"--host {args.host} exposes the server, and it has no API key: set $GREENCODE_API_KEY "
                              "or a key file (--api-key-file), or pass --no-auth to serve anyone who reaches it")
        if "allowed_hosts" not in cfg.model_fields_set:
            cfg.allowed_hosts = own_names(args.host)
        if not cfg.tenant_keys:
            log.warning("serving on %s without an API key (--no-auth): anyone who reaches this address can use "
                        "the model", args.host)
    return cfg, args


def run(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False,
        model_loader: ModelLoader | None = None):
    """Start (or update) the app on Ray Serve at http://host:port/, and /health beside it (serve_app/probe.py);
    returns the model app's DeploymentHandle. Serve's proxy times a request out ``cfg.proxy_timeout_s`` after it
    took it: just after the replica's own deadline, as a backstop."""
    from ray import serve

    init_ray()
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg.proxy_timeout_s})
    return serve_apps(cfg, build_app_with_loader(cfg, model_loader), blocking)[0]


@cli_errors
def main(argv: list[str] | None = None) -> None:
    """Blocks until interrupted."""
    cfg, args = parse(argv)
    log.info("GreenCode serving on http://%s:%d (OpenAPI at /docs)", args.host, args.port)
    run(cfg, args.host, args.port, blocking=True)


if __name__ == "__main__":
    main()
