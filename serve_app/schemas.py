"""Request bodies of the wire formats IDE clients speak, reduced to one protocol-neutral :class:`Ask`.

Each protocol keeps its own field names (TGI ``parameters``, Ollama ``options``,
OpenAI top-level fields) so the OpenAPI schema documents what each client really
sends. Clients send fields we do not implement (``top_k``, ``repetition_penalty``,
``num_ctx`` ...): they are accepted, not acted on, and named in the response's
``greencode.ignored_parameters`` so nobody mistakes them for honoured settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from greencode.config import GateMode

MAX_STOP_SEQUENCES = 16
MAX_SEED = 2**63 - 1
MAX_IGNORED_NAMES = 16  # unknown keys named back in a reply
MAX_IGNORED_CHARS = 64  # characters of each


class _Body(BaseModel):
    """Unknown keys are kept (clients send many) and reported as ignored; NaN/inf are rejected."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    def ignored(self) -> list[str]:
        """Unknown fields that ask for something (null, false and empty values ask for nothing), capped."""
        return capped(sorted(k for k, v in (self.model_extra or {}).items() if v not in (None, False, "", [], {})))


def capped(names: list[str]) -> list[str]:
    """At most MAX_IGNORED_NAMES names of at most MAX_IGNORED_CHARS each, then how many more: a reply echoing
    unknown keys stays small whatever the request holds."""
    shown = [n if len(n) <= MAX_IGNORED_CHARS else n[:MAX_IGNORED_CHARS] + "..." for n in names[:MAX_IGNORED_NAMES]]
    return shown + ([f"... and {len(names) - MAX_IGNORED_NAMES} more"] if len(names) > MAX_IGNORED_NAMES else [])


def _stop_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    return value


class GateKnobs(_Body):
    """GreenCode's per-request trade-off between quality and energy (METHOD §5)."""

    gate: GateMode | None = Field(None, description="exit gate; default: the server's (policy when it has one)")
    threshold: float | None = Field(None, ge=0, le=1, description="policy gate: exit when p[exit] > T (higher: deeper)")
    RL_agent_thresh: float | None = Field(None, ge=0, le=1,
                                          description="alias of threshold (the published GREEN-CODE endpoint)")
    gate_temperature: float | None = Field(None, gt=0, le=100, description="policy gate: softmax temperature tau")
    exit_layer: int | None = Field(None, ge=1, description="fixed gate: 1-based layer every token exits after")
    confidence: float | None = Field(None, gt=0, le=1, description="confidence gate: exit when max prob >= c")

    cache_prompt: bool | None = Field(
        None, description="reuse and store prompt K/V in the replica's prefix cache (llama.cpp's name); default true")
    lossless: bool | None = Field(
        None, description="the full model's output: the gate only drafts tokens, the remaining layers verify them "
                          "(self-speculative decoding); default: the server's generation.lossless")
    cache_salt: str | None = Field(
        None, min_length=1, description="vLLM's name: prefix cache entries are shared only between requests of the "
                                        "same tenant (API key) and the same salt; unset = the tenant's own partition")

    def gate_fields(self) -> dict[str, Any]:
        threshold = self.threshold if self.threshold is not None else self.RL_agent_thresh
        return {"mode": self.gate, "threshold": threshold, "temperature": self.gate_temperature,
                "exit_layer": self.exit_layer, "confidence": self.confidence}


class GenerationKnobs(GateKnobs):
    """TGI ``parameters`` / Ollama ``options``: both spellings of every sampling knob."""

    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="tokens to generate (TGI spelling)")
    num_predict: int | None = Field(None, ge=1, le=4096, description="tokens to generate (Ollama spelling)")
    temperature: float | None = Field(None, ge=0, le=100, description="sampling temperature; 0 or unset = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    do_sample: bool | None = Field(None, description="TGI: sample (temperature 1 unless given)")
    stop: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES, description="stop sequences")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    return_full_text: bool | None = Field(None, description="prepend the prompt to the generated text")
    details: bool | None = Field(None, description="TGI: per-token details (always returned)")
    parameters: GenerationKnobs | None = Field(
        None, description="llm-ls nests {'parameters': {'parameters': {...}}} when the user body has none; merged"
    )

    _stop = field_validator("stop", mode="before")(_stop_list)

    def flattened(self) -> GenerationKnobs:
        """Merge the nested ``parameters`` quirk: outer values win over nested ones."""
        if self.parameters is None:
            return self
        inner = self.parameters.flattened()
        outer = {k: v for k, v in self.model_dump(exclude={"parameters"}).items() if v is not None}
        return GenerationKnobs.model_validate({**inner.model_dump(exclude={"parameters"}), **outer})

    def ignored(self) -> list[str]:
        nested = self.parameters.ignored() if self.parameters is not None else []
        return capped(sorted(set(super().ignored()) | set(nested)))


@dataclass(frozen=True)
class Fields:
    """Where a protocol's body keeps what the request limits check, so a refusal names the field the client sent."""

    prompt: str = "prompt"
    knobs: str | None = None  # the object holding stop / max tokens (TGI 'parameters', Ollama 'options'), or top level
    max_new_tokens: str = "max_tokens"
    sequences: str = "n"

    def knob(self, name: str) -> str:
        return f"{self.knobs}.{name}" if self.knobs else name


@dataclass
class Ask:
    """What every protocol asks for, before server defaults and the tokenizer are applied."""

    prompt: str
    suffix: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    include_prompt: bool = False
    fields: Fields = Fields()
    cache_prompt: bool | None = None
    lossless: bool | None = None
    cache_salt: str | None = None


def _knobs_ask(prompt: str, knobs: GenerationKnobs | None, fields: Fields, suffix: str | None = None,
               ignored: list[str] | None = None) -> Ask:
    knobs = knobs or GenerationKnobs()
    flat = knobs.flattened()
    temperature = flat.temperature
    if temperature is None and flat.do_sample:
        temperature = 1.0
    if flat.max_new_tokens is None and flat.num_predict is not None:
        fields = replace(fields, max_new_tokens="num_predict")
    return Ask(
        prompt=prompt,
        suffix=suffix,
        max_new_tokens=flat.max_new_tokens if flat.max_new_tokens is not None else flat.num_predict,
        temperature=temperature,
        top_p=flat.top_p,
        stop=list(flat.stop or []),
        seed=flat.seed,
        gate=flat.gate_fields(),
        ignored=capped(sorted(set(knobs.ignored()) | set(ignored or []))),
        include_prompt=bool(flat.return_full_text),
        fields=fields,
        cache_prompt=flat.cache_prompt,
        lossless=flat.lossless,
        cache_salt=flat.cache_salt,
    )


# --------------------------------------------------------------------------- TGI


class TGIRequest(_Body):
    """TGI ``/generate``, ``/generate_stream`` and ``/`` (text_generation client; ``stream`` picks SSE)."""

    inputs: str = Field(..., description="the prompt (FIM prompts arrive pre-formatted)")
    parameters: GenerationKnobs | None = None
    stream: bool | None = Field(False, description="only read on POST /: true answers with SSE")

    def to_ask(self) -> Ask:
        return _knobs_ask(self.inputs, self.parameters, Fields("inputs", "parameters", "max_new_tokens"),
                          ignored=self.ignored())


# --------------------------------------------------------------------------- Ollama / llm-vscode


class OllamaRequest(_Body):
    """Ollama ``/api/generate``, also as llm-vscode and the published GREEN-CODE endpoint send it."""

    model: str | None = None
    prompt: str | None = Field(None, description="the prompt (Ollama); 'inputs' is accepted too")
    inputs: str | None = Field(None, description="the prompt (llm-vscode / GREEN-CODE)")
    suffix: str | None = Field(None, description="fill-in-the-middle suffix (needs a tokenizer with FIM tokens)")
    options: GenerationKnobs | None = None
    parameters: GenerationKnobs | None = Field(None, description="accepted in place of options")
    stream: bool | None = Field(
        None, description="NDJSON stream; unset = true for Ollama bodies ('prompt'), false for TGI-style ('inputs')"
    )
    raw: bool | None = None
    keep_alive: str | float | None = None

    def streams(self) -> bool:
        """Ollama streams by default; llm-vscode's TGI-shaped bodies and GREEN-CODE's expect one JSON object."""
        return self.stream if self.stream is not None else self.prompt is not None

    def to_ask(self) -> Ask:
        prompt = self.prompt if self.prompt is not None else self.inputs
        knobs = self.options if self.options is not None else self.parameters
        if self.options is not None and self.parameters is not None:
            merged = {**self.parameters.model_dump(exclude_none=True), **self.options.model_dump(exclude_none=True)}
            knobs = GenerationKnobs.model_validate(merged)
        fields = Fields("prompt" if self.prompt is not None else "inputs",
                        "options" if self.options is not None else "parameters", "max_new_tokens")
        return _knobs_ask(prompt or "", knobs, fields, suffix=self.suffix, ignored=self.ignored())


class OllamaShowRequest(_Body):
    model: str | None = None
    name: str | None = None


# --------------------------------------------------------------------------- OpenAI legacy completions


class CompletionRequest(GateKnobs):
    """OpenAI legacy ``/v1/completions``; GreenCode knobs go top level (``extra_body`` in the client)."""

    model: str | None = None
    prompt: str | list[str] = Field(..., description="one prompt, or a list (one choice per prompt)")
    suffix: str | None = Field(None, description="fill-in-the-middle: the text after the completion "
                                                 "(needs a tokenizer with FIM tokens)")
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=8, description="choices per prompt")
    stop: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    stream: bool | None = False
    echo: bool | None = False
    logprobs: int | None = Field(None, description="not supported: must be null")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: str | None = None

    _stop = field_validator("stop", mode="before")(_stop_list)

    @field_validator("prompt")
    @classmethod
    def _prompt_list(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= 16:
            raise ValueError("a prompt list needs 1 to 16 strings")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> None:
        if value is not None:
            raise ValueError("logprobs are not supported by this server; send null")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_asks(self) -> list[Ask]:
        """One Ask per (prompt, choice), in OpenAI's choice order."""
        return [
            Ask(
                prompt=p, suffix=self.suffix, max_new_tokens=self.max_tokens, temperature=self.temperature,
                top_p=self.top_p, stop=list(self.stop or []), seed=self.seed, gate=self.gate_fields(),
                ignored=self.ignored(), include_prompt=bool(self.echo), cache_prompt=self.cache_prompt,
                lossless=self.lossless, cache_salt=self.cache_salt,
            )
            for p in self.prompts()
            for _ in range(self.n)
        ]
