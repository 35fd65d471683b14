"""Helpers every entry point shares: logging, Ray start-up, config loading from argv."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, TypeVar

from pydantic import BaseModel

from greencode.config import ConfigError, load_config, parse_overrides

C = TypeVar("C", bound=BaseModel)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def config_parser(description: str) -> argparse.ArgumentParser:
    """Parser with the options every config-driven entry point takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def load_from_args(cls: type[C], args: argparse.Namespace, extra: dict[str, Any] | None = None) -> C:
    overrides = {**(extra or {}), **parse_overrides(args.overrides)}
    return load_config(cls, args.config, overrides)


def init_ray(**kwargs: Any) -> None:
    """Connect to ``RAY_ADDRESS`` when set (a cluster or `ray start --head`), else start locally."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    logging.getLogger(__name__).info("starting Ray (%s)", f"address={address}" if address else "local")
    ray.init(address=address or None, log_to_driver=True, **kwargs)


def exit_on_config_error(func):
    """Decorator for main(): a ConfigError becomes a one-line message and exit status 2."""

    def wrapper(*a, **kw):
        try:
            return func(*a, **kw)
        except ConfigError as err:
            raise SystemExit(f"config error: {err}") from None

    wrapper.__doc__ = func.__doc__
    wrapper.__name__ = func.__name__
    return wrapper
