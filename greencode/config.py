"""Typed configuration for every GreenCode stage.

One pydantic model per stage, all loaded from YAML and validated at the edge:
unknown keys are rejected and every error names the offending field
(``finetune.optim.lr: Input should be greater than 0``). Every number of
the method (docs/method.md) lives here as a default, never as a constant in code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from greencode.storage import is_uri


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the field."""


def local_path(value: str, why: str) -> str:
    """``value`` when it is a local (or shared-mount) path; a URI is refused with ``why``."""
    if is_uri(value):
        raise ValueError(f"{value!r} is a URI; give a local or shared path ({why})")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Fields that change where or how fast a stage runs, never what it produces (paths of its own
    # outputs, worker counts, retries, logging cadence): left out of result_config.
    operational: ClassVar[frozenset[str]] = frozenset()


def result_config(cfg: BaseModel) -> dict[str, Any]:
    """``cfg`` as JSON without its operational fields (at every depth): what a stage's result depends on.

    Stage identity in the pipeline manifest and the workflows' own reuse and resume checks compare this.
    """
    out = {}
    for name, value in cfg:
        if name in getattr(cfg, "operational", ()):
            continue
        out[name] = result_config(value) if isinstance(value, BaseModel) else cfg.model_dump(
            mode="json", include={name})[name]
    return out


# --------------------------------------------------------------------------- model


class ModelConfig(_Strict):
    """Which causal LM to load (see greencode.modeling.load_model)."""

    name: str = Field("embedded", description="'embedded', a Hugging Face id, a local HF dir, or a .gguf file")
    gguf_file: str | None = Field(None, description="GGUF file name inside a hub repo / dir")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto: bfloat16 where the device runs it natively (a CUDA GPU with bf16, "
        "a CPU with AVX-512 BF16 or AMX), else float32 (greencode.precision); fine-tuning loads auto as float32 "
        "(finetune.precision sets autocast); float16 needs a GPU")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1' ...")
    translators: str | None = Field(
        None, description="exit translators to decode exits through (a dir written by `greencode fit-exits`); "
        "None = the model dir's own if it holds them, else untranslated; 'none' = untranslated")


# --------------------------------------------------------------------------- exits + loss


class ExitConfig(_Strict):
    """Exit points, counted as 'after layer k' with layers numbered 1..L (METHOD §1)."""

    exit_points: list[int] | None = Field(None, description="explicit 1-based layers; None applies the rule")
    first_exit: int = Field(4, ge=1, description="rule: the first exit point")
    first_half_step: int = Field(2, ge=1, description="rule: layers between exit points in the first half")
    second_half_step: int = Field(4, ge=1, description="rule: layers between exit points in the second half")


class LiteLossConfig(_Strict):
    """The LITE aggregate loss (METHOD §2): weights, what each exit learns, what one step decodes.

    ``target``: ``dataset`` = next-token cross-entropy (METHOD §2); ``distill`` = KL to the frozen
    starting model's final-layer distribution (self-distillation); ``mix`` = both, ``mix_share``
    of it KL. Exits with weight 0 are never decoded; ``exit_sampling`` and ``position_fraction``
    decode fewer exits / positions per step (the LM head at every exit is most of a step's cost).
    The default target stays ``dataset`` (METHOD §2; no teacher copy of the model in memory). On
    2 CPU cores the demo uses ``distill`` with ``anchor_weight`` 2: at 30 steps of lr 1e-4 on the
    deep exits it kept the final layer closest to the base model while moving exits 22 and 26 most
    (benchmarks/lite_recipes.py; table in docs/finetune.md).
    """

    scheme: Literal["decaying", "uniform"] = "decaying"
    first_half_budget: float = Field(0.7, ge=0)
    second_half_budget: float = Field(0.2, ge=0)
    final_budget: float = Field(0.1, gt=0)
    decay: float = Field(0.9, gt=0)
    target: Literal["dataset", "distill", "mix"] = "dataset"
    mix_share: float = Field(0.5, ge=0, le=1,
                             description="mix: share of the distillation term in each exit's loss")
    temperature: float = Field(1.0, gt=0,
                               description="distill/mix: softmax temperature of teacher and student (KL x T^2)")
    anchor_weight: float = Field(0.0, ge=0,
                                 description="extra KL(teacher || final layer) added to the loss, any target")
    exits_update_head: bool = Field(True, description="exit losses also train the shared LM head (METHOD §2); false: "
                                    "only the layers learn from them and the head follows the final layer alone")
    exit_sampling: Literal["all", "rotational", "gradual"] = "all"
    exits_per_step: int = Field(3, ge=1,
                                description="rotational: exits decoded per step (weights scaled to stay unbiased)")
    gradual_fraction: float = Field(0.5, gt=0, le=1,
                                    description="gradual: share of max_steps after which all exits are on")
    position_fraction: float = Field(1.0, gt=0, le=1,
                                     description="share of positions whose exit losses a step computes "
                                                 "(final layer: all)")

    @property
    def distill_share(self) -> float:
        """Share of the KL term in each exit's loss (0 = dataset labels only)."""
        return {"dataset": 0.0, "distill": 1.0, "mix": self.mix_share}[self.target]

    @property
    def needs_teacher(self) -> bool:
        return self.distill_share > 0 or self.anchor_weight > 0


# --------------------------------------------------------------------------- gates + generation


GateMode = Literal["full", "fixed", "confidence", "policy"]
# fill-in-the-middle prompt layout (greencode/fim.py): prefix-suffix-middle, or suffix first
FimOrder = Literal["psm", "spm"]
_FIM_ORDER = ("fill-in-the-middle layout: psm (every FIM model), or spm (suffix first; StarCoder, SantaCoder, "
              "Code Llama: while the user types only the prefix grows, so the prefix cache keeps the suffix)")


class GateParams(_Strict):
    """The numeric knobs of the gates (METHOD §5); each gate reads its own."""

    exit_layer: int | None = Field(None, ge=1, description="fixed gate: 1-based layer to exit after")
    confidence: float = Field(0.9, gt=0, le=1, description="confidence gate: exit when max prob >= c")
    threshold: float = Field(0.9, ge=0, le=1, description="policy gate: exit when p[exit] > T (higher = deeper)")
    temperature: float = Field(1.0, gt=0, description="policy gate: softmax temperature tau")


class GateConfig(GateParams):
    """How a token decides to leave the network: a gate mode and its knobs."""

    mode: GateMode = Field("full", description="full | fixed | confidence | policy")
    policy_path: str | None = Field(None, description="policy gate: ExitPolicy file")

    @model_validator(mode="after")
    def _needs(self) -> GateConfig:
        if self.mode == "fixed" and self.exit_layer is None:
            raise ValueError("gate mode 'fixed' needs exit_layer")
        if self.mode == "policy" and not self.policy_path:
            raise ValueError("gate mode 'policy' needs policy_path")
        return self


class SpeculativeConfig(_Strict):
    """Draft length of lossless mode, adapted per sequence to its recent acceptance rate (METHOD §7)."""

    min_draft: int = Field(0, ge=0, description="fewest tokens a round may draft (0: a sequence whose drafts keep "
                           "failing stops drafting and decodes full-depth tokens)")
    max_draft: int = Field(8, ge=1, description="most tokens a round may draft")
    initial_acceptance: float = Field(0.8, ge=0, le=1, description="acceptance rate assumed before the first round")
    acceptance_decay: float = Field(0.5, ge=0, lt=1, description="weight of the past in the running acceptance rate "
                                    "and draft depth")
    recovery: float = Field(0.1, ge=0, le=1, description="after a round without drafts the running acceptance rate "
                            "moves this share of the way back to initial_acceptance, so drafting is tried again")
    shortlist: int = Field(8192, ge=0, description="greedy drafts the gate made no logits for are decoded over the "
                           "first N token ids (byte-level BPE's most frequent merges) plus the prompt's tokens; "
                           "verification keeps the full LM head, so the output is unchanged; 0 = the full head")

    @model_validator(mode="after")
    def _bounds(self) -> SpeculativeConfig:
        if self.min_draft > self.max_draft:
            raise ValueError("min_draft must be <= max_draft")
        return self


class GenerationConfig(_Strict):
    """Decoding of one completion: length, sampling, stop sequences, KV cache, lossless mode."""

    max_new_tokens: int = Field(15, ge=1, le=4096, description="tokens to generate")
    temperature: float = Field(0.0, ge=0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest token set with this mass")
    stop: list[str] = Field(default_factory=list, description="stop sequences (cut from the text)")
    seed: int | None = Field(None, description="sampling seed; None = not reproducible")
    kv_mode: Literal["propagate", "none"] = Field(
        "propagate", description="'propagate' fills skipped layers' K/V from the exited state; 'none' = no cache"
    )
    lossless: bool = Field(False, description="self-speculative decoding: the gate's exits only draft tokens, the "
                           "remaining layers verify them, the output is the full model's (METHOD §7)")
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig,
                                           description="draft length of lossless mode")

    @model_validator(mode="after")
    def _lossless_needs_cache(self) -> GenerationConfig:
        if self.lossless and self.kv_mode != "propagate":
            raise ValueError("lossless verifies drafts against the KV cache: kv_mode must be 'propagate'")
        return self


class GenerateConfig(_Strict):
    """`greencode generate`: one model, one gate, one decoding setting."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="the model to generate with")
    exits: ExitConfig = Field(default_factory=ExitConfig, description="exit points of the model")
    gate: GateConfig = Field(default_factory=GateConfig, description="the gate every generated token uses")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="decoding settings")
    fim_order: FimOrder = Field("psm", description=_FIM_ORDER)


# --------------------------------------------------------------------------- data


class DataConfig(_Strict):
    """Corpus and sample construction (METHOD §3 and §6)."""

    corpus: str = Field("stdlib", description="stdlib | dir:PATH | zip:PATH | codexglue:FILE.jsonl | hf:NAME")
    lang: Literal["python", "java"] | None = Field(None, description="None = from the file extension")
    glob: str | None = Field(None, description="file pattern inside dir:/zip: corpora, e.g. '**/*.py'")
    seed: int = Field(0, description="seed of the file split, file sampling and sample order")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of files held out for validation")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="share of files held out for testing")
    max_files: int | None = Field(None, ge=1, description="read at most this many files (a seeded sample; a file's "
                                                          "split never depends on it)")
    context_fraction: float = Field(0.2, gt=0, lt=1, description="line completion: share of a file given as context")
    context_cap: int = Field(512, ge=1, description="at most this many context tokens (the last ones)")
    target_tokens: int = Field(15, ge=1, description="line completion: reference tokens after the context")
    min_file_tokens: int = Field(64, ge=1, description="files shorter than this are not sampled")
    max_cuts_per_file: int = Field(
        8, ge=1, description="evaluation: cut points per held-out file when one per file gives too few samples")
    cut_stride: int = Field(64, ge=1, description="evaluation: tokens between a file's successive cut points")


# --------------------------------------------------------------------------- fine-tuning


class OptimConfig(_Strict):
    """AdamW and its schedule (METHOD §2 reference settings)."""

    lr: float = Field(1e-5, gt=0, description="AdamW learning rate")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on norms and biases)")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip")
    schedule: Literal["constant", "linear"] = Field("constant", description="constant, or linear decay to 0")


class FinetuneConfig(_Strict):
    """LITE fine-tuning on Ray Train."""

    operational = frozenset({"cpus_per_worker", "report_every", "checkpoint_every", "keep_checkpoints",
                             "max_failures", "val_every", "val_batches", "storage_path", "run_name", "output_dir"})

    model: ModelConfig = Field(default_factory=ModelConfig, description="the model to fine-tune")
    data: DataConfig = Field(default_factory=DataConfig, description="the corpus (train / validation splits)")
    exits: ExitConfig = Field(default_factory=ExitConfig, description="exit points trained by the LITE loss")
    loss: LiteLossConfig = Field(default_factory=LiteLossConfig, description="LITE loss weights")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and schedule")
    seq_len: int = Field(256, ge=8, description="tokens per training block")
    pack: bool = Field(True, description="pack files into full blocks (else one padded block per file)")
    batch_size: int = Field(4, ge=1, description="blocks per micro-batch and worker")
    grad_accum: int = Field(32, ge=1, description="micro-batches per optimizer step")
    max_steps: int = Field(2000, ge=1, description="optimizer steps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast; auto: bf16 where the worker's device runs it natively, else fp32 "
        "(greencode.precision); fp16 needs GPU workers")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs reserved per worker")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="data parallelism; fsdp needs GPU workers")
    report_every: int = Field(10, ge=1, description="optimizer steps between metric reports")
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in the run dir")
    max_failures: int = Field(0, ge=0, description="restarts of the workers from their last checkpoint after a worker "
                                                   "dies (0: the first failure ends the run; the presets set more)")
    val_every: int = Field(100, ge=1, description="optimizer steps between validations")
    val_batches: int = Field(8, ge=1, description="validation batches (of batch_size blocks)")
    storage_path: str = Field("runs/finetune", description="Ray Train storage (local path or s3://...)")
    run_name: str = Field("lite", description="run dir name under storage_path; a rerun resumes it")
    output_dir: str | None = Field(None, description="where the final HF model dir is written")
    seed: int = Field(0, description="seed of the model init and the data order")


class LiteSweepConfig(_Strict):
    """`greencode lite-sweep`: Ray Tune over the LITE loss, one Ray Train fine-tuning run per trial.

    ``grid`` maps dotted FinetuneConfig keys (``loss.target``, ``optim.lr``, ...) to the values
    tried; trials are their product. Every trial is scored on ``base``'s validation blocks
    against the base model: final-layer next-token accuracy as a share of the base model's, and
    the agreement of the exits at or past ``deep_from`` of the depth with the base model's final
    prediction (the deep exits the gate uses most). The best trial is the one with the most deep
    agreement among those keeping ``min_final_ratio`` of the base accuracy (the full-depth quality
    the demo must keep; 0.96 of next-token accuracy tracked >= 0.95 of ROUGE-L/CodeBLEU).
    """

    operational = frozenset({"max_concurrent", "storage_path", "name", "output_path"})

    base: FinetuneConfig = Field(default_factory=FinetuneConfig, description="every trial's fine-tuning settings")
    grid: dict[str, list[Any]] = Field(
        default_factory=lambda: {"loss.target": ["dataset", "distill"], "optim.lr": [3e-5, 1e-4]},
        description="dotted FinetuneConfig key -> values tried (their product is the trials)")
    deep_from: float = Field(0.5, ge=0, lt=1, description="exits deeper than this share of the layers are scored")
    min_final_ratio: float = Field(0.96, ge=0, le=1.5,
                                   description="a best trial keeps at least this share of the base final accuracy")
    max_concurrent: int | None = Field(None, ge=1, description="trials at a time; None = as many as the CPUs fit")
    storage_path: str = Field("runs/lite_sweep", description="Tune's storage (each trial's Ray Train run under it): "
                              "a local or shared path")
    name: str = Field("lite_sweep", description="the sweep's dir under storage_path; a rerun reuses its finished "
                      "trials of the same settings")
    output_path: str = Field("runs/lite_sweep/best.yaml",
                             description="the best settings as a `finetune:` block for --config")

    @field_validator("storage_path")
    @classmethod
    def _local_storage(cls, value: str) -> str:
        return local_path(value, "the LITE trials' Ray Train runs and records live there")


# --------------------------------------------------------------------------- exit translators


class FitExitsConfig(_Strict):
    """`greencode fit-exits`: one affine map per exit onto the last layer's normalized state, fit in closed
    form on a frozen model from statistics Ray Data sums over the training split (tuned lens)."""

    operational = frozenset({"output_dir", "num_workers", "blocks_per_task"})

    model: ModelConfig = Field(default_factory=ModelConfig, description="the (base or fine-tuned) model; unchanged")
    data: DataConfig = Field(default_factory=DataConfig, description="the corpus (train / validation / test splits)")
    exits: ExitConfig = Field(default_factory=ExitConfig, description="exit points to fit a translator for")
    kind: Literal["affine", "identity"] = Field(
        "affine", description="affine: a fitted map per exit; identity: decode exits untranslated (no fit)")
    train_tokens: int = Field(20480, ge=2, description="training-split tokens the statistics are summed over")
    validation_tokens: int = Field(2048, ge=1, description="validation-split tokens the ridge strength is picked on")
    heldout_tokens: int = Field(2048, ge=0, description="test-split tokens the recorded agreement is measured on "
                                "(0 = none)")
    seq_len: int = Field(256, ge=8, description="tokens per block")
    ridge_grid: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1e-3, 1e-2, 1e-1], min_length=1,
        description="ridge strengths (x tokens) tried per exit; the penalty pulls the map towards the identity")
    blocks_per_task: int = Field(16, ge=1, description="blocks one Ray Data call sums statistics over")
    num_workers: int = Field(1, ge=1, description="model actors of the Ray Data pool")
    output_dir: str = Field("runs/translators", description="where the translators are written (atomically)")


# --------------------------------------------------------------------------- shards + env + PPO


class ExtractConfig(_Strict):
    """Hidden-state shards for the exit environment (METHOD §3)."""

    operational = frozenset({"output_dir", "num_workers"})

    model: ModelConfig = Field(default_factory=ModelConfig, description="the (fine-tuned) model to replay")
    data: DataConfig = Field(default_factory=DataConfig, description="the corpus samples are cut from")
    exits: ExitConfig = Field(default_factory=ExitConfig, description="exit points the shards observe")
    num_samples: int = Field(200, ge=1, description="episodes (samples) to extract")
    split: Literal["train", "validation", "test"] = Field("train", description="corpus split the samples come from")
    min_context_fraction: float = Field(0.2, gt=0, lt=1, description="lowest context cut (share of a file)")
    max_context_fraction: float = Field(0.6, gt=0, lt=1, description="highest context cut (share of a file)")
    tokens_per_sample: int = Field(15, ge=1, description="T tokens generated greedily per sample")
    hidden_dtype: Literal["float16", "float32"] = Field("float16", description="storage dtype of the hidden states")
    features: list[Literal["top1", "margin", "entropy"]] = Field(
        default_factory=list, description="what the policy observes besides the hidden state: the translated exit's "
        "own confidence (top-1 probability, margin over the runner-up, normalized entropy; docs/policy.md)")
    feature_shortlist: int = Field(8192, ge=2, description="token ids the features' softmax runs over (the first "
                                   "ones: the cost of a feature call is this share of the LM head)")
    samples_per_shard: int = Field(50, ge=1, description="samples per Parquet shard")
    output_dir: str = Field("runs/shards", description="shard directory (resumable)")
    num_workers: int = Field(1, ge=1, description="model actors of the Ray Data pool")

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


class PolicyPPOConfig(_Strict):
    """The exit policy's network and its PPO run (METHOD §4)."""

    operational = frozenset({"cpus_per_env_runner", "checkpoint_every"})

    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 64], description="hidden layers of the policy MLP")
    activation: Literal["tanh", "relu"] = Field("tanh", description="activation between the MLP layers")
    total_env_steps: int = Field(500_000, ge=1, description="environment steps to train for")
    lr: float = Field(5e-5, gt=0, description="learning rate")
    lr_decay: bool = Field(True, description="decay the lr linearly (to 1e-3 of it) over total_env_steps")
    train_batch_size: int = Field(4096, ge=1, description="environment steps per PPO iteration")
    minibatch_size: int = Field(512, ge=1, description="SGD minibatch")
    num_epochs: int = Field(6, ge=1, description="passes over each train batch")
    discount: float = Field(0.99, gt=0, le=1, description="discount gamma of the returns")
    num_env_runners: int = Field(2, ge=0, description="Ray actors sampling episodes (0 = in the learner process)")
    envs_per_env_runner: int = Field(4, ge=1, description="ExitEnvs per env runner")
    cpus_per_env_runner: float = Field(0.5, gt=0, description="CPUs per env runner (capped to fit the cluster)")
    checkpoint_every: int = Field(10, ge=1, description="PPO iterations between checkpoints (a rerun or a "
                                                        "restarted sweep trial resumes from the last one)")
    normalize_observations: bool = Field(
        True, description="standardise hidden states per dimension with train-shard statistics "
                          "(folded into the exported policy)"
    )


class PolicyTrainConfig(_Strict):
    """`greencode train-policy`: PPO over replayed shards, exported as an ExitPolicy file."""

    operational = frozenset({"output_path", "storage_path"})

    shards_dir: str = Field("runs/shards", description="training shards (greencode extract)")
    eval_shards_dir: str | None = Field(None, description="held-out shards the exported policy is scored on")
    eval_thresholds: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.5, 0.8, 0.9], min_length=1,
        description="held-out scoring: exit when p[exit] > T; the first is the headline",
    )
    reward: RewardConfig = Field(default_factory=RewardConfig, description="reward coefficients")
    ppo: PolicyPPOConfig = Field(default_factory=PolicyPPOConfig, description="network and PPO settings")
    output_path: str = Field("runs/policy/exit_policy.pt", description="the exported policy file")
    storage_path: str = Field("runs/rllib", description="RLlib checkpoints (resumed by a rerun); a local path: "
                              "the learner that writes them runs in this process")
    seed: int = Field(0, description="RLlib seed")

    @field_validator("storage_path")
    @classmethod
    def _local_storage(cls, value: str) -> str:
        return local_path(value, "RLlib checkpoints are written by the learner in this process")


class SweepConfig(_Strict):
    """`greencode sweep`: Ray Tune over the reward coefficients."""

    operational = frozenset({"max_concurrent", "max_failures", "storage_path", "tune_storage_path", "name"})

    base: PolicyTrainConfig = Field(default_factory=PolicyTrainConfig, description="every trial's settings")
    alpha: list[float] = Field(default_factory=lambda: [0.1, 0.25, 0.5], description="alpha values of the grid")
    beta: list[float] = Field(default_factory=lambda: [0.5, 1.0], description="beta values of the grid")
    gamma: list[float] = Field(default_factory=lambda: [0.5, 1.0], description="gamma values of the grid")
    num_samples: int = Field(1, ge=1, description="repeats of every grid point")
    max_concurrent: int | None = Field(None, ge=1, description="trials at a time; None = as many as the CPUs fit")
    max_failures: int = Field(0, ge=0, description="restarts of a failed trial from its last checkpoint (0: a "
                                                   "failed trial stays failed; the best of the others is exported)")
    storage_path: str = Field("runs/sweep", description="the sweep's records (trials, results, best.json) and, "
                              "unless tune_storage_path says otherwise, Tune's experiment; a URI is published to")
    name: str = Field("reward_sweep", description="the sweep's dir under storage_path")
    tune_storage_path: str | None = Field(
        None, description="where Ray Tune keeps the experiment (trial checkpoints and results) under <name>/: "
                          "a URI (s3://...) on a cluster whose nodes share no disk; None = under storage_path "
                          "(storage_path itself when that is a URI)")

    @model_validator(mode="before")
    @classmethod
    def _tune_on_object_storage(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tune_storage_path") is None and is_uri(data.get("storage_path")):
            data = {**data, "tune_storage_path": data["storage_path"]}  # trials on any node write there
        return data


# --------------------------------------------------------------------------- evaluation


class EvalConfig(_Strict):
    """`greencode eval`: every baseline and gate setting on held-out line completions (METHOD §6)."""

    operational = frozenset({"output_dir", "num_workers"})

    model: ModelConfig = Field(default_factory=ModelConfig, description="the (fine-tuned) model")
    base_model: ModelConfig | None = Field(None, description="the not-fine-tuned model for the base row")
    data: DataConfig = Field(default_factory=DataConfig, description="corpus and line-completion samples")
    exits: ExitConfig = Field(default_factory=ExitConfig, description="exit points (fixed rows, gates)")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="decoding of every row")
    policy_path: str | None = Field(None, description="ExitPolicy file; without it the policy rows are absent")
    gates: list[GateMode] = Field(default_factory=lambda: ["full", "fixed", "confidence", "policy"],
                                  description="gate families to evaluate")
    confidences: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.9], description="c of the confidence rows")
    thresholds: list[float] = Field(default_factory=lambda: [0.6, 0.8, 0.9, 0.91, 0.92],
                                    description="T of the policy rows")
    lossless: list[Literal["fixed", "confidence", "policy"]] = Field(
        default_factory=list, description="gate families that also get lossless rows, one per k / c / T: the full "
        "model's text drafted by that gate (each batch row decodes on its own); compare them by time and layer passes")
    context_fractions: list[float] = Field(default_factory=lambda: [0.2], description="context shares, one table each")
    task: Literal["completion", "fim"] = Field(
        "completion", description="completion: the model sees the context; fim: also the file after the reference "
                                  "span, as a fill-in-the-middle prompt (needs a model with FIM tokens)")
    fim_suffix_tokens: int = Field(256, ge=1, description="fim task: tokens of the file after the span given as suffix")
    fim_order: FimOrder = Field("psm", description=_FIM_ORDER)
    num_samples: int = Field(1000, ge=1, description="completions per setting and context fraction")
    output_dir: str = Field("reports/eval", description="report directory (resumable)")
    quality_margin: float = Field(0.05, ge=0, description="stated tolerance on ROUGE-L vs full")
    batch_size: int = Field(8, ge=1, description="prompts generated together (left-padded)")
    num_workers: int | None = Field(None, ge=1, description="Ray actors; None = one per CPU (or GPU) of the cluster")
    bootstrap_resamples: int = Field(1000, ge=0, description="bootstrap resamples of the 95% intervals of every "
                                                             "quality column and its difference to full; 0 = none")
    bootstrap_seed: int = Field(0, description="seed of the bootstrap resamples (shared by every row: paired)")
    agreement_tokens: int = Field(2048, ge=0, description="held-out tokens on which each exit's argmax is compared "
                                                          "with the base model's final prediction; 0 = skip")
    agreement_seq_len: int = Field(128, ge=2, description="length of the held-out token blocks of the agreement")


# --------------------------------------------------------------------------- serving


def _serve_generation() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=60)


LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1"]
DEFAULT_TENANT = "default"  # the tenant of ServeConfig.api_key


class RequestLimits(_Strict):
    """What one request may ask for, checked before any model work (TGI's validation limits, per protocol)."""

    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="request body size; TGI's payload limit (2 MiB)")
    body_timeout_s: float = Field(30.0, gt=0, description="seconds for the whole body to arrive; then a 408")
    max_prompt_chars: int = Field(100_000, ge=1, description="prompt + suffix characters, checked before tokenizing")
    max_stop_sequences: int = Field(16, ge=0, le=16, description="stop sequences per request (at most 16)")
    max_stop_chars: int = Field(256, ge=1, description="characters of one stop sequence")
    max_new_tokens: int = Field(4096, ge=1, le=4096, description="tokens one sequence may ask for (at most 4096)")
    max_sequences: int = Field(16, ge=1, description="sequences one request expands to (OpenAI: prompts x n)")
    max_cache_salt_chars: int = Field(256, ge=1, description="characters of a request's cache_salt")
    max_request_tokens: int = Field(
        16384, ge=1, description="sequences x new tokens one request may ask for (TGI's max_total_tokens budget): "
                                 "what one request can make the replica generate")
    body_min_rate_bytes_s: float = Field(
        4096.0, gt=0, description="after body_grace_s a body must keep arriving at this many bytes/s (408 otherwise): "
                                  "a slow sender cannot hold a connection for the whole body_timeout_s")
    body_grace_s: float = Field(2.0, gt=0, description="seconds a body may take before body_min_rate_bytes_s applies")
    max_body_readers: int = Field(
        32, ge=1, description="request bodies read at once per replica; one more is a 503 with Retry-After at once")


PROXY_TIMEOUT_MARGIN_S = 1.5  # Serve's proxy gives up this long after the request timeout: a backstop that never
                              # fires before the replica's own 503 / stream error event


class AdmissionLimits(_Strict):
    """Backpressure of one lane (streams, or non-streaming batches) of one replica."""

    # Sized from a CPU replica's measured step time (docs/serving.md, "Sizing admission"): both lanes full of
    # default-length requests (60 new tokens) finish within the default request timeout, the queued ones included
    max_active: int = Field(4, ge=1, description="requests of the lane doing model work at once")
    max_queued: int = Field(4, ge=0, description="requests waiting for a slot (a freed one goes to the tenant "
                            "holding the fewest, in arrival order among equals); one more is a 429")
    request_timeout_s: float = Field(
        60.0, gt=0, description="from the replica's first sight of a request (before its body is read) to its last "
                                "byte; then a 503 or a stream error event. Serve's proxy gives up "
                                f"{PROXY_TIMEOUT_MARGIN_S:g} s later")
    max_retry_after_s: int = Field(60, ge=1, description="cap of the Retry-After estimate (seconds)")

    @property
    def capacity(self) -> int:
        """Requests the lane holds at once (working + waiting)."""
        return self.max_active + self.max_queued


SERVE_LANES = 2  # streams and non-streaming batches are admitted separately
OPS_HEADROOM = 8  # requests Serve lets through beyond the lanes' capacity: /ready, /metrics, refusals in flight
# Serve's per-replica cap by default: far above what the lanes hold, so Serve's router hands a burst on at once and
# the replica answers the excess itself (429/503 with Retry-After, counted from its arrival) instead of the router
# holding it, unanswered and outside the request's deadline (docs/serving.md: with a cap of 104, a 300-request burst
# had answers 2.2 s past the 60 s timeout; with 4000, none past it)
ROUTER_PASS_THROUGH = 1000


class ServeConfig(_Strict):
    """`greencode serve` / `serve run serve_app/config.yaml`: the deployment and per-request defaults."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="the model every replica loads")
    exits: ExitConfig = Field(default_factory=ExitConfig, description="exit points of the model")
    policy_path: str | None = Field(None, description="ExitPolicy file; without one the 'policy' gate is refused")
    default_gate: GateMode = Field("policy", description="gate of requests that name none ('full' without a policy)")
    gate: GateParams = Field(default_factory=GateParams, description="gate knobs of requests that set none")
    generation: GenerationConfig = Field(
        default_factory=_serve_generation, description="decoding defaults of requests (max_new_tokens 60) and kv_mode"
    )
    max_context_tokens: int = Field(2048, ge=1, description="prompt + new tokens, capped by the model's positions")
    prefix_cache_mb: float = Field(
        256.0, ge=0, description="per replica: MiB of full-depth prompt K/V kept so the next keystroke's request "
                                 "reuses its prefix (on the replica's device); 0 = off")
    fim_order: FimOrder = Field("psm", description=_FIM_ORDER)
    max_batch_size: int = Field(8, ge=1, description="requests generated together (Serve batching)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    num_replicas: int = Field(1, ge=1, description="Serve replicas")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica, e.g. 1 or 0.5")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on every route but /health "
                                                  "(and the API schema); the key of tenant 'default'. An empty key is "
                                                  "refused")
    api_keys: dict[str, str] = Field(
        default_factory=dict, description="tenant name -> API key: each key names its tenant, whose prefix cache "
                                          "entries no other tenant can match (`greencode serve --api-key-file`)")
    prefix_cache_entries: int = Field(
        4096, ge=1, description="per replica: most prefix cache entries; each tenant keeps at most its share of "
                                "these and of prefix_cache_mb (divided evenly between the tenants)")
    allowed_hosts: list[str] = Field(
        default_factory=lambda: list(LOOPBACK_HOSTS), min_length=1,
        description="Host header names served (DNS-rebinding defence); '*' = any. `greencode serve --host` on a "
                    "non-loopback address without this field set serves any name",
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="browser Origins allowed besides http(s) pages on allowed_hosts; '*' = any"
    )
    require_json: bool = Field(
        True, description="POST bodies must say Content-Type: application/json (415 otherwise): a web page cannot "
                          "send that cross-site without the server's consent. false only behind your own front end"
    )
    limits: RequestLimits = Field(default_factory=RequestLimits, description="per-request limits (4xx beyond them)")
    admission: AdmissionLimits = Field(
        default_factory=AdmissionLimits, description="per lane (streams, batches): slots, queue, request timeout"
    )
    torch_threads: int | None = Field(None, ge=1, description="torch threads per replica; None = num_cpus")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description=f"Serve's cap per replica; None = {ROUTER_PASS_THROUGH} (or both lanes' capacity "
                                f"+ {OPS_HEADROOM} if more). Beyond it Serve's router holds requests, where they get "
                                "no 429 and their deadline does not count",
    )

    @field_validator("api_key")
    @classmethod
    def _real_key(cls, key: str | None) -> str | None:
        if key is not None and not key.strip():
            raise ValueError("an empty key would let every request in: leave api_key unset (null) or set a real key")
        return key

    @field_validator("api_keys")
    @classmethod
    def _real_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        for tenant, key in keys.items():
            if not tenant.strip() or not key.strip():
                raise ValueError(f"tenant {tenant!r}: empty tenant names and keys are refused")
        if len(set(keys.values())) != len(keys):
            raise ValueError("two tenants have the same key: a key must name exactly one tenant")
        return keys

    @model_validator(mode="after")
    def _one_default(self) -> ServeConfig:
        if self.api_key is not None and DEFAULT_TENANT in self.api_keys:
            raise ValueError(f"api_key is the key of tenant {DEFAULT_TENANT!r}, which api_keys names too: set one")
        if self.api_key is not None and self.api_key in self.api_keys.values():
            raise ValueError("api_key equals a key of api_keys: a key must name exactly one tenant")
        return self

    @property
    def tenant_keys(self) -> dict[str, str]:
        """Every tenant and its key (api_key is tenant 'default'); empty: no key needed, one anonymous tenant."""
        return {**self.api_keys, **({DEFAULT_TENANT: self.api_key} if self.api_key is not None else {})}

    @model_validator(mode="after")
    def _serve_queue(self) -> ServeConfig:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests <= self.admitted_requests:
            raise ValueError(f"max_ongoing_requests must exceed the {self.admitted_requests} requests the admission "
                             "lanes hold (2 x (admission.max_active + admission.max_queued)), or leave it unset")
        return self

    @property
    def admitted_requests(self) -> int:
        """Requests one replica holds at once across its lanes (beyond them: 429)."""
        return SERVE_LANES * self.admission.capacity

    @property
    def ongoing_requests(self) -> int:
        """Serve's ``max_ongoing_requests`` for a replica: above what the lanes hold, so our 429s reach clients."""
        return self.max_ongoing_requests or max(ROUTER_PASS_THROUGH, self.admitted_requests + OPS_HEADROOM)

    @property
    def proxy_timeout_s(self) -> float:
        """Serve's ``http_options.request_timeout_s``: the admission deadline plus PROXY_TIMEOUT_MARGIN_S."""
        return self.admission.request_timeout_s + PROXY_TIMEOUT_MARGIN_S


# --------------------------------------------------------------------------- pipeline


PipelineStage = Literal["finetune", "fit_exits", "extract", "train_policy", "sweep", "evaluate"]


# Keys of the stage sections that the pipeline fills in itself -> where they come from instead.
PIPELINE_OWNED: dict[str, dict[str, str]] = {
    "finetune": {"model": "the top-level model", "data": "the top-level data", "exits": "the top-level exits",
                 "storage_path": "run_dir", "output_dir": "run_dir"},
    "fit_exits": {"model": "the top-level model (fine-tuned)", "data": "the top-level data",
                  "exits": "the top-level exits", "output_dir": "run_dir"},
    "extract": {"model": "the top-level model (fine-tuned)", "data": "the top-level data",
                "exits": "the top-level exits", "split": "the stage (train; held-out shards: validation)",
                "output_dir": "run_dir"},
    "policy": {"shards_dir": "run_dir", "eval_shards_dir": "run_dir", "output_path": "run_dir",
               "storage_path": "run_dir"},
    "sweep": {"base": "the policy section", "storage_path": "run_dir"},
    "evaluate": {"model": "the top-level model (fine-tuned)", "base_model": "the top-level model",
                 "data": "the top-level data", "exits": "the top-level exits",
                 "policy_path": "the policy stage", "output_dir": "run_dir"},
}


class SizingConfig(_Strict):
    """Fit the model-bound stages to the machine's measured speed (greencode.sizing): where the probe is slower
    than on the machine the preset was sized on and the projection passes ``budget_min``, fine-tuning steps,
    extraction and evaluation samples shrink by one factor, each down to its floor."""

    budget_min: float = Field(gt=0, description="minutes the fine-tuning, extraction and evaluation stages may take")
    reference_probe_s: float = Field(gt=0, description="the probe (one forward+backward of finetune.batch_size x "
                                     "finetune.seq_len tokens, one thread, finetune.precision) on the machine the "
                                     "preset was sized on")
    reference_minutes: dict[Literal["finetune", "fit_exits", "extract", "evaluate"], float] = Field(
        description="minutes each stage took there at the preset's sizes (extract: both extractions)")
    min_finetune_steps: int = Field(10, ge=1, description="floor of finetune.max_steps")
    min_eval_samples: int = Field(200, ge=1, description="floor of evaluate.num_samples (its intervals need them)")


class PipelineConfig(_Strict):
    """Every stage end to end. ``model``/``data``/``exits`` and every artifact path are shared: the
    pipeline writes them into the stage sections, so setting them there is an error (PIPELINE_OWNED)."""

    run_dir: str = Field("runs/pipeline", description="every artifact and the manifest go under it: a local path "
                         "(on a cluster, shared storage every node mounts) or an s3:// / gs:// URI")
    lock_lease_s: float = Field(60.0, gt=0, description="on object storage: how long the run-dir lock outlives a "
                                "pipeline that died without releasing it (renewed every third of it while it runs)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model")
    inference_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        "auto", description="weights dtype of the stages that only run the models (extract, evaluate: the fine-tuned "
        "and the base model); auto: bfloat16 where the device runs it natively, else float32; None = model.dtype. "
        "Fine-tuning keeps model.dtype (finetune.precision sets autocast)")
    data: DataConfig = Field(default_factory=DataConfig, description="the corpus of every stage")
    exits: ExitConfig = Field(default_factory=ExitConfig, description="exit points of every stage")
    stages: list[PipelineStage] = Field(default_factory=lambda: ["finetune", "extract", "train_policy", "evaluate"],
                                        description="stages to run, in pipeline order")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="the fine-tuning stage")
    fit_exits: FitExitsConfig = Field(default_factory=FitExitsConfig,
                                      description="the exit-translator stage (after fine-tuning, before extraction)")
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="the training-shard extraction stage")
    heldout_samples: int = Field(50, ge=1, description="samples extracted from the validation split to score policies")
    policy: PolicyTrainConfig = Field(default_factory=PolicyTrainConfig, description="the policy stage")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="the sweep stage (instead of train_policy)")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="the evaluation stage")
    sizing: SizingConfig | None = Field(None, description="fit the work to this machine's measured speed "
                                        "(the probe is kept in run_dir/sizing.json); None = run the sizes as written")

    @model_validator(mode="after")
    def _order(self) -> PipelineConfig:
        if "train_policy" in self.stages and "sweep" in self.stages:
            raise ValueError("stages: choose 'train_policy' or 'sweep' (the sweep exports the best policy itself)")
        owned = [f"{section}.{key} is set by the pipeline from {source}: set it there, not in the {section} section"
                 for section, keys in PIPELINE_OWNED.items()
                 for key, source in keys.items() if key in getattr(self, section).model_fields_set]
        if owned:
            raise ValueError("; ".join(owned))
        return self


# --------------------------------------------------------------------------- loading


C = TypeVar("C", bound=BaseModel)


def _format_errors(err: ValidationError, prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = e["msg"].removeprefix("Value error, ")  # a validator's own message names its fields
        lines.append(f"{where}: {msg}" if where else msg)
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


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, mapping by mapping (a list or scalar in ``top`` replaces the value)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data['optim']['lr'] = value`` for ``dotted='optim.lr'``, creating mappings on the way."""
    node = data
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a mapping")
    node[leaf] = value


def load_config(cls: type[C], paths: str | Path | Sequence[str | Path] | None = None,
                overrides: dict[str, Any] | None = None, *, base: dict[str, Any] | None = None) -> C:
    """The one way to build a config: ``base`` (a preset's data), YAML files merged over it in order,
    then dotted overrides.

    ``paths`` may be one file or several; ``overrides`` maps ``optim.lr``-style keys to values.
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    data: dict[str, Any] = dict(base or {})
    for path in paths:
        data = merge(data, load_yaml(path))
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return validate(cls, data, source=", ".join(str(p) for p in paths))


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


def field_info(cls: type[BaseModel], dotted: str) -> tuple[str | None, Any]:
    """(description, default) of a nested field such as ``model.name``, read from the defaults of ``cls``.

    Command-line help is built from these, so no default is ever restated next to a flag.
    """
    node: BaseModel = cls()
    absent = False  # inside an optional section that is None by default (EvalConfig.base_model)
    *parents, leaf = dotted.split(".")
    for name in parents:
        info = _field(node, name, dotted)
        child = getattr(node, name)
        if child is None:
            absent = True
            child = next(t for t in get_args(info.annotation) if isinstance(t, type) and issubclass(t, BaseModel))()
        node = child
    info = _field(node, leaf, dotted)
    return info.description, None if absent else getattr(node, leaf)


def _field(node: BaseModel, name: str, dotted: str) -> Any:
    fields = type(node).model_fields
    if name not in fields:
        raise KeyError(f"{type(node).__name__} has no field {name!r} (in {dotted!r})")
    return fields[name]
