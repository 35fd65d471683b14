"""Typed configuration for every GreenCode stage.

One pydantic model per stage, all loaded from YAML and validated at the edge:
unknown keys are rejected and every error names the offending field
(``finetune.optim.lr: Input should be greater than 0``). Every number of
METHOD.md lives here as a default, never as a constant in code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- model


class ModelConfig(_Strict):
    """Which causal LM to load (see greencode.modeling.load_model)."""

    name: str = Field("embedded", description="'embedded', a Hugging Face id, a local HF dir, or a .gguf file")
    gguf_file: str | None = Field(None, description="GGUF file name inside a hub repo / dir")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1' ...")


# --------------------------------------------------------------------------- exits + loss


class ExitConfig(_Strict):
    """Exit points, counted as 'after layer k' with layers numbered 1..L (METHOD §1)."""

    exit_points: list[int] | None = Field(None, description="explicit 1-based layers; None applies the rule")
    first_exit: int = Field(4, ge=1)
    first_half_step: int = Field(2, ge=1)
    second_half_step: int = Field(4, ge=1)


class LiteLossConfig(_Strict):
    """The LITE aggregate loss (METHOD §2): weights, what each exit learns, what one step decodes.

    ``target``: ``dataset`` = next-token cross-entropy (METHOD §2); ``distill`` = KL to the frozen
    starting model's final-layer distribution (self-distillation); ``mix`` = both, ``mix_share``
    of it KL. Exits with weight 0 are never decoded; ``exit_sampling`` and ``position_fraction``
    decode fewer exits / positions per step (the LM head at every exit is most of a step's cost).
    """

    scheme: Literal["decaying", "uniform"] = "decaying"
    first_half_budget: float = Field(0.7, ge=0)
    second_half_budget: float = Field(0.2, ge=0)
    final_budget: float = Field(0.1, gt=0)
    decay: float = Field(0.9, gt=0)
    target: Literal["dataset", "distill", "mix"] = "dataset"
    mix_share: float = Field(0.5, ge=0, le=1, description="mix: share of the distillation term in each exit's loss")
    temperature: float = Field(1.0, gt=0, description="distill/mix: softmax temperature of teacher and student (KL x T^2)")
    anchor_weight: float = Field(0.0, ge=0, description="extra KL(teacher || final layer) added to the loss, any target")
    exits_update_head: bool = Field(True, description="exit losses also train the shared LM head (METHOD §2); false: "
                                    "only the layers learn from them and the head follows the final layer alone")
    exit_sampling: Literal["all", "rotational", "gradual"] = "all"
    exits_per_step: int = Field(3, ge=1, description="rotational: exits decoded per step (weights scaled to stay unbiased)")
    gradual_fraction: float = Field(0.5, gt=0, le=1, description="gradual: share of max_steps after which all exits are on")
    position_fraction: float = Field(1.0, gt=0, le=1,
                                     description="share of positions whose exit losses a step computes (final layer: all)")

    @property
    def distill_share(self) -> float:
        """Share of the KL term in each exit's loss (0 = dataset labels only)."""
        return {"dataset": 0.0, "distill": 1.0, "mix": self.mix_share}[self.target]

    @property
    def needs_teacher(self) -> bool:
        return self.distill_share > 0 or self.anchor_weight > 0


# --------------------------------------------------------------------------- gates + generation


GateMode = Literal["full", "fixed", "confidence", "policy"]


class GateConfig(_Strict):
    """How a token decides to leave the network (METHOD §5)."""

    mode: GateMode = "full"
    exit_layer: int | None = Field(None, ge=1, description="fixed gate: 1-based layer to exit after")
    confidence: float = Field(0.9, gt=0, le=1, description="confidence gate: exit when max prob >= c")
    threshold: float = Field(0.9, ge=0, le=1, description="policy gate: exit when p[exit] > T")
    temperature: float = Field(1.0, gt=0, description="policy gate: softmax temperature tau")
    policy_path: str | None = None

    @model_validator(mode="after")
    def _needs(self) -> GateConfig:
        if self.mode == "fixed" and self.exit_layer is None:
            raise ValueError("gate mode 'fixed' needs exit_layer")
        if self.mode == "policy" and not self.policy_path:
            raise ValueError("gate mode 'policy' needs policy_path")
        return self


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(15, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    kv_mode: Literal["propagate", "none"] = Field(
        "propagate", description="'propagate' fills skipped layers' K/V from the exited state; 'none' = no cache"
    )


# --------------------------------------------------------------------------- data


class DataConfig(_Strict):
    """Corpus and sample construction (METHOD §3 and §6)."""

    corpus: str = Field("stdlib", description="stdlib | dir:PATH | zip:PATH | codexglue:FILE.jsonl | hf:NAME")
    lang: Literal["python", "java"] | None = Field(None, description="None = from the file extension")
    glob: str | None = Field(None, description="file pattern inside dir:/zip: corpora, e.g. '**/*.py'")
    seed: int = 0
    val_fraction: float = Field(0.05, ge=0, lt=1)
    test_fraction: float = Field(0.05, ge=0, lt=1)
    max_files: int | None = Field(None, ge=1)
    context_fraction: float = Field(0.2, gt=0, lt=1)
    context_cap: int = Field(512, ge=1)
    target_tokens: int = Field(15, ge=1)
    min_file_tokens: int = Field(64, ge=1)


# --------------------------------------------------------------------------- fine-tuning


class OptimConfig(_Strict):
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    schedule: Literal["constant", "linear"] = "constant"


class FinetuneConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    exits: ExitConfig = Field(default_factory=ExitConfig)
    loss: LiteLossConfig = Field(default_factory=LiteLossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    seq_len: int = Field(256, ge=8)
    pack: bool = True
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(32, ge=1)
    max_steps: int = Field(2000, ge=1, description="optimizer steps")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    report_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=0, description="restarts of the worker group from its last checkpoint after a crash")
    val_every: int = Field(100, ge=1)
    val_batches: int = Field(8, ge=1)
    storage_path: str = "runs/finetune"
    run_name: str = "lite"
    output_dir: str | None = Field(None, description="where the final HF model dir is written")
    seed: int = 0


# --------------------------------------------------------------------------- shards + env + PPO


class ExtractConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    exits: ExitConfig = Field(default_factory=ExitConfig)
    num_samples: int = Field(200, ge=1)
    split: Literal["train", "validation", "test"] = "train"
    min_context_fraction: float = Field(0.2, gt=0, lt=1)
    max_context_fraction: float = Field(0.6, gt=0, lt=1)
    tokens_per_sample: int = Field(15, ge=1, description="T tokens generated greedily per sample")
    hidden_dtype: Literal["float16", "float32"] = "float16"
    samples_per_shard: int = Field(50, ge=1)
    output_dir: str = "runs/shards"
    num_workers: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self) -> ExtractConfig:
        if self.min_context_fraction > self.max_context_fraction:
            raise ValueError("min_context_fraction must be <= max_context_fraction")
        return self


class RewardConfig(_Strict):
    """Reward coefficients of METHOD §3; distances in exit-point steps, scaled to [-1, 0]."""

    alpha: float = Field(0.25, ge=0, le=1, description="penalty per step for exiting too late")
    beta: float = Field(0.5, ge=0, le=1, description="penalty per step for exiting too early")
    gamma: float = Field(0.5, ge=0, le=1, description="penalty per step for continuing past the optimum")
    epsilon: float = Field(0.1, ge=0, le=1, description="penalty for a wrong exit at/after the optimum")

    @model_validator(mode="after")
    def _order(self) -> RewardConfig:
        if self.alpha > self.beta:
            raise ValueError("alpha must be <= beta (exiting late is never worse than early)")
        return self


class PPOConfig(_Strict):
    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 64])
    activation: Literal["tanh", "relu"] = "tanh"
    total_env_steps: int = Field(500_000, ge=1)
    lr: float = Field(5e-5, gt=0)
    lr_decay: bool = True
    train_batch_size: int = Field(4096, ge=1)
    minibatch_size: int = Field(512, ge=1)
    num_epochs: int = Field(6, ge=1)
    discount: float = Field(0.99, gt=0, le=1)
    num_env_runners: int = Field(2, ge=0)
    envs_per_env_runner: int = Field(4, ge=1)
    cpus_per_env_runner: float = Field(0.5, gt=0)
    normalize_observations: bool = Field(
        True, description="standardise hidden states per dimension with train-shard statistics; folded into the exported policy"
    )


class PolicyTrainConfig(_Strict):
    shards_dir: str = "runs/shards"
    eval_shards_dir: str | None = None
    eval_thresholds: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.5, 0.8, 0.9], min_length=1,
        description="held-out scoring: exit when p[exit] > T; the first is the headline",
    )
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    output_path: str = "runs/policy/exit_policy.pt"
    storage_path: str = "runs/rllib"
    seed: int = 0


class SweepConfig(_Strict):
    base: PolicyTrainConfig = Field(default_factory=PolicyTrainConfig)
    alpha: list[float] = Field(default_factory=lambda: [0.1, 0.25, 0.5])
    beta: list[float] = Field(default_factory=lambda: [0.5, 1.0])
    gamma: list[float] = Field(default_factory=lambda: [0.5, 1.0])
    num_samples: int = Field(1, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    storage_path: str = "runs/sweep"
    name: str = "reward_sweep"


# --------------------------------------------------------------------------- evaluation


class EvalConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    base_model: ModelConfig | None = Field(None, description="the not-fine-tuned model for the base row")
    data: DataConfig = Field(default_factory=DataConfig)
    exits: ExitConfig = Field(default_factory=ExitConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    policy_path: str | None = None
    gates: list[GateMode] = Field(default_factory=lambda: ["full", "fixed", "confidence", "policy"])
    confidences: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.9])
    thresholds: list[float] = Field(default_factory=lambda: [0.6, 0.8, 0.9, 0.91, 0.92])
    context_fractions: list[float] = Field(default_factory=lambda: [0.2])
    num_samples: int = Field(1000, ge=1)
    output_dir: str = "reports/eval"
    quality_margin: float = Field(0.05, ge=0, description="stated tolerance on ROUGE-L vs full")
    batch_size: int = Field(8, ge=1, description="prompts generated together (left-padded)")
    num_workers: int | None = Field(None, ge=1, description="Ray actors; None = one per CPU (or GPU) of the cluster")


# --------------------------------------------------------------------------- serving


class ServeConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    policy_path: str | None = None
    exits: ExitConfig = Field(default_factory=ExitConfig)
    default_gate: GateMode = "policy"
    default_threshold: float = Field(0.9, ge=0, le=1)
    default_max_new_tokens: int = Field(60, ge=1)
    max_context_tokens: int = Field(2048, ge=1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    api_key: str | None = None
    torch_threads: int | None = Field(None, ge=1)
    default_gate_temperature: float = Field(1.0, gt=0, description="policy gate tau when a request sets none")
    default_confidence: float = Field(0.9, gt=0, le=1, description="confidence gate c when a request sets none")
    kv_mode: Literal["propagate", "none"] = "propagate"
    max_ongoing_requests: int = Field(32, ge=1, description="per replica; must exceed max_batch_size for batching")


# --------------------------------------------------------------------------- pipeline


PipelineStage = Literal["finetune", "extract", "train_policy", "sweep", "evaluate"]


class PipelineConfig(_Strict):
    """Every stage end to end. ``model``/``data``/``exits`` and all artifact paths are shared:
    the pipeline writes them into the stage sections, so those keys are ignored there."""

    run_dir: str = "runs/pipeline"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    exits: ExitConfig = Field(default_factory=ExitConfig)
    stages: list[PipelineStage] = Field(default_factory=lambda: ["finetune", "extract", "train_policy", "evaluate"])
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    heldout_samples: int = Field(50, ge=1, description="samples extracted from the validation split to score policies")
    policy: PolicyTrainConfig = Field(default_factory=PolicyTrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _order(self) -> PipelineConfig:
        if "train_policy" in self.stages and "sweep" in self.stages:
            raise ValueError("stages: choose 'train_policy' or 'sweep' (the sweep exports the best policy itself)")
        return self


# --------------------------------------------------------------------------- loading


C = TypeVar("C", bound=BaseModel)


def _format_errors(err: ValidationError, prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "<root>")
        lines.append(f"{where}: {e['msg']}")
    return "; ".join(lines)


def validate(cls: type[C], data: dict[str, Any] | None, *, source: str = "") -> C:
    """Validate ``data`` as ``cls``, turning pydantic errors into one ConfigError naming fields."""
    try:
        return cls.model_validate(data or {})
    except ValidationError as err:
        where = f" in {source}" if source else ""
        raise ConfigError(f"invalid {cls.__name__}{where}: {_format_errors(err, '')}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Load ``cls`` from a YAML file (optional) with dotted-key overrides (``optim.lr=1e-4``)."""
    data = load_yaml(path) if path else {}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {p} is not a mapping")
        node[leaf] = value
    return validate(cls, data, source=str(path) if path else "")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse ``key.sub=value`` strings; values are read as YAML scalars (numbers, bools, lists)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
