"""What every entry point shares: quiet logging, Ray start-up, one-line errors, and the one config path.

Every command builds its config the same way (:class:`ConfigCommand`):

    --preset NAME  ->  --config FILE.yaml (repeatable, later files win)  ->  dedicated flags  ->  --set KEY=VALUE

The presets are the pipeline's (``workflows/presets/*.yaml``, the one source of their settings); a
stage command's ``--preset demo`` is what the demo pipeline runs in that stage (:func:`stage_presets`).

A dedicated flag (``--model``, ``--policy`` ...) is only a short name for one config field: its
help text and default are read from that field, so no default is restated here.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from greencode.config import ConfigError, field_info, load_config, parse_overrides

C = TypeVar("C", bound=BaseModel)
Preset = Path | Callable[[], dict[str, Any]]  # a PipelineConfig YAML, or a stage's settings derived from one
PRESETS = ("demo", "paper")  # workflows/presets/<name>.yaml

log = logging.getLogger("greencode.common")


def stage_presets(stage: str) -> dict[str, Preset]:
    """The pipeline presets as presets of one stage command: exactly the ``stage`` config that
    ``greencode pipeline --preset NAME`` runs (artifact paths under its run_dir)."""

    def derive(name: str) -> dict[str, Any]:
        from workflows.pipeline import stage_preset

        return stage_preset(name, stage)

    return {name: functools.partial(derive, name) for name in PRESETS}


def setup_logging(verbose: bool = False) -> None:
    """Quiet by default: GreenCode's own one-line reports (INFO) and everyone's warnings.

    ``verbose`` (``-v``) shows GreenCode's DEBUG lines, the libraries' INFO lines and the
    progress bars of model loading and saving. Also called inside Ray workers (whose root
    logger Ray configures at INFO), so it sets levels rather than relying on basicConfig.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("greencode").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def verbose() -> bool:
    """Whether -v was given (setup_logging lets GreenCode's DEBUG lines through only then)."""
    return logging.getLogger("greencode").isEnabledFor(logging.DEBUG)


def comma_list(item: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    """argparse type for ``a,b,c`` lists."""

    def parse(text: str) -> list[Any]:
        return [item(x.strip()) for x in text.split(",") if x.strip()]

    return parse


@dataclass(frozen=True)
class Flag:
    """A dedicated flag that sets one config field (``--model`` -> ``model.name``)."""

    option: str
    field: str
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    append: bool = False  # repeatable; the values form a list
    switch: bool = False  # takes no value: sets the (bool) field to true

    @property
    def dest(self) -> str:
        return "flag_" + self.field.replace(".", "__")

    @property
    def metavar(self) -> str | None:
        return None if self.choices else self.field.rsplit(".", 1)[-1].upper()


class ConfigCommand(Generic[C]):
    """The parser of one config-driven command and the config it builds (see the module docstring)."""

    def __init__(self, cls: type[C], description: str, *, prog: str | None = None, flags: Sequence[Flag] = (),
                 presets: Mapping[str, Preset] | None = None) -> None:
        self.cls, self.flags, self.presets = cls, list(flags), dict(presets or {})
        p = argparse.ArgumentParser(prog=prog, description=description)
        if self.presets:
            p.add_argument("--preset", choices=sorted(self.presets), help="start from a shipped preset")
        p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                       help=f"YAML file with {cls.__name__} fields; repeatable, later files win")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one field, e.g. --set optim.lr=1e-4 (repeatable; applied last)")
        p.add_argument("-v", "--verbose", action="store_true", help="verbose logs (and tracebacks on errors)")
        group = p.add_argument_group("config fields (a flag sets the field in brackets)")
        for flag in self.flags:
            description, default = field_info(cls, flag.field)
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_text = f"{description} [{flag.field}; default: {shown}]"
            if flag.switch:
                group.add_argument(flag.option, dest=flag.dest, action="store_const", const=True, default=None,
                                   help=help_text)
                continue
            group.add_argument(flag.option, dest=flag.dest, type=flag.type, choices=flag.choices, default=None,
                               action="append" if flag.append else "store", metavar=flag.metavar, help=help_text)
        self.parser = p

    def config(self, args: argparse.Namespace) -> C:
        """preset -> --config files -> flags -> --set, validated (errors name the field)."""
        preset = self.presets[args.preset] if getattr(args, "preset", None) else None
        paths = [preset] if isinstance(preset, Path) else []
        paths += list(args.config)
        overrides = {f.field: getattr(args, f.dest) for f in self.flags if getattr(args, f.dest) is not None}
        overrides.update(parse_overrides(args.overrides))
        return load_config(self.cls, paths, overrides, base=preset() if callable(preset) else None)

    def parse(self, argv: Sequence[str] | None) -> tuple[C, argparse.Namespace]:
        """Parse ``argv``, set up logging, build the config."""
        args = self.parser.parse_args(argv)
        setup_logging(args.verbose)
        return self.config(args), args


def init_ray(**kwargs: Any) -> None:
    """Connect to ``RAY_ADDRESS`` when set (a cluster or `ray start --head`), else start locally."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    logging.getLogger("greencode.ray").info("starting Ray (%s)", f"address={address}" if address else "local")
    ray.init(address=address or None, log_to_driver=True, **kwargs)


def cli_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for ``main(argv)``: bad input becomes one line and exit status 1, not a traceback.

    A ConfigError reads ``config error: <field>: <problem>``; a missing file, a corpus, shard or
    policy that does not fit reads ``error: ...``. With ``-v`` the traceback is kept.
    """

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> Any:
        given = sys.argv[1:] if argv is None else list(argv)
        try:
            return main(argv)
        except ConfigError as err:
            if "-v" in given or "--verbose" in given:
                raise
            raise SystemExit(f"config error: {err}") from None
        except (FileNotFoundError, ValueError) as err:
            if "-v" in given or "--verbose" in given:
                raise
            raise SystemExit(f"error: {err}") from None

    return wrapper


def _field(cfg: Any, name: str) -> Any:
    for part in name.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _with_field(cfg: C, name: str, value: Any) -> C:
    head, _, rest = name.partition(".")
    return cfg.model_copy(update={head: _with_field(getattr(cfg, head), rest, value) if rest else value})


@contextmanager
def published_outputs(cfg: C, *fields: str) -> Iterator[C]:
    """``cfg`` with each output path among ``fields`` (dotted: ``base.output_path``) that names object
    storage (``s3://...``) replaced by a local scratch path; once the block finishes, each is published
    there by pointer (greencode.storage), so a run that fails or is killed publishes nothing. The
    location is checked first: a missing bucket or denied access fails before any work starts. A rerun
    on the same host resumes from the same scratch path."""
    from greencode.digests import tree_digest
    from greencode.storage import Store, is_uri, scratch_dir

    remote: dict[str, tuple[Store, str, Path]] = {}
    for name in fields:
        location = _field(cfg, name)
        if is_uri(location):
            parent, _, leaf = location.rstrip("/").rpartition("/")
            store = Store(parent)
            store.check()
            remote[name] = (store, leaf, scratch_dir(location) / leaf)
            cfg = _with_field(cfg, name, str(remote[name][2]))
    yield cfg
    for name, (store, leaf, local) in remote.items():
        if not local.exists():
            raise RuntimeError(f"{name}: the run wrote nothing to publish at {local}")
        store.publish(local, leaf, tree_digest(local))
        log.info("published %s (from %s)", store.uri(leaf), local)


def summary_main(command: ConfigCommand[C], run: Callable[[C], dict[str, Any]],
                 outputs: tuple[str, ...] = ()) -> Callable[..., None]:
    """``main(argv)`` of a command whose result is a summary: build the config, run, print the summary as JSON.
    ``outputs``: the config's artifact paths, published when they name object storage (:func:`published_outputs`)."""

    @cli_errors
    def main(argv: Sequence[str] | None = None) -> None:
        cfg, _ = command.parse(argv)
        with published_outputs(cfg, *outputs) as local:
            summary = run(local)
        print(json.dumps(summary, indent=2))

    return main
