"""Response bodies in each client's shape (TGI, Ollama, OpenAI), built from one generation result.

Every body carries a ``greencode`` object (gate, mean and per-token layers, time,
energy or null) next to the fields the client parses; the official clients ignore
keys they do not know.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from greencode.fim import FimFormat
from greencode.generate import GenerationResult, TokenEvent

TGI, OLLAMA, OPENAI = "tgi", "ollama", "openai"


@dataclass
class Completion:
    """One finished generation plus what the response needs to describe it."""

    result: GenerationResult
    text: str  # generated text, with the prompt prepended when the request asked for it
    token_texts: list[str]
    gate: str
    ignored: list[str]
    batch_size: int
    seed: int | None


def protocol_of(path: str) -> str:
    if path.startswith("/v1/"):
        return OPENAI
    if path.startswith("/api/"):
        return OLLAMA
    return TGI


def invalid_request_status(protocol: str) -> int:
    """What each protocol answers for a request it refuses as invalid: 422 for TGI (as TGI does), 400 otherwise."""
    return 422 if protocol == TGI else 400


def failure_status(protocol: str) -> int:
    """What each protocol answers when generation itself fails (a server fault): TGI 424, the others 500."""
    return 424 if protocol == TGI else 500


def error_body(protocol: str, message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """The error object each client library parses (its type names as the real servers use them)."""
    if protocol == OPENAI:
        kinds = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
        kind = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": None}}
    if protocol == OLLAMA:
        return {"error": message}
    if status == 401:
        kind = "authentication"
    elif status in (429, 503):
        kind = "overloaded"
    else:
        kind = "generation" if status == 424 or status >= 500 else "validation"
    return {"error": message, "error_type": kind}


def stream_error(protocol: str, message: str, status: int) -> str:
    """The last chunk of a stream that failed after its 200: SSE ``event: error``, or an NDJSON error line.

    The official clients raise on it (text_generation GenerationError, openai APIError, ollama ResponseError).
    """
    body = json.dumps(error_body(protocol, message, status))
    if protocol == OLLAMA:
        return body + "\n"
    return f"event: error\ndata: {body}\n\n"


def greencode_details(result: GenerationResult, gate: str, ignored: list[str], batch_size: int = 1) -> dict[str, Any]:
    """The ``greencode`` object; a lossless request's also holds ``speculative`` (its round statistics)."""
    spec = getattr(result, "speculative", None)
    return {
        "gate": gate,
        "mean_layers": round(result.mean_layers, 4),
        "layers_per_token": list(result.layers_per_token),
        "num_layers": result.num_layers,
        "time_s": round(result.time_s, 6),
        "gate_time_s": round(result.gate_time_s, 6),
        "energy_j": result.energy_j,
        "cached_prompt_tokens": result.cached_prompt_tokens,
        "cached_completion_tokens": result.cached_completion_tokens,
        "batch_size": batch_size,
        "ignored_parameters": ignored,
        "lossless": spec is not None,
        **({"speculative": spec} if spec is not None else {}),
    }


def _details(c: Completion, ignored: bool = True) -> dict[str, Any]:
    """``ignored=False``: one choice of several, whose request-level summary names the ignored keys once."""
    details = greencode_details(c.result, c.gate, c.ignored, c.batch_size)
    return details if ignored else {k: v for k, v in details.items() if k != "ignored_parameters"}


# --------------------------------------------------------------------------- TGI


def tgi_response(c: Completion) -> dict[str, Any]:
    tokens = [{"id": t, "text": s, "logprob": None, "special": False}
              for t, s in zip(c.result.token_ids, c.token_texts)]
    return {
        "generated_text": c.text,
        "details": {
            "finish_reason": c.result.finish_reason,
            "generated_tokens": len(c.result.token_ids),
            "seed": c.seed,
            "prefill": [],
            "tokens": tokens,
        },
        "greencode": _details(c),
    }


def tgi_stream_event(index: int, event: TokenEvent, final: Completion | None) -> str:
    body = {
        "index": index,
        "token": {"id": event.token_id, "text": event.text, "logprob": None, "special": False},
        "generated_text": final.text if final else None,
        "details": None,
    }
    if final is not None:
        body["details"] = {"finish_reason": final.result.finish_reason,
                           "generated_tokens": len(final.result.token_ids), "seed": final.seed}
        body["greencode"] = _details(final)
    return f"data:{json.dumps(body)}\n\n"


# --------------------------------------------------------------------------- Ollama


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_done_reason(finish_reason: str) -> str:
    return "length" if finish_reason == "length" else "stop"


def ollama_chunk(model: str, text: str) -> str:
    return json.dumps({"model": model, "created_at": now_iso(), "response": text, "done": False}) + "\n"


def ollama_final(model: str, c: Completion, total_s: float, *, text: str = "") -> dict[str, Any]:
    """The ``done: true`` object; ``text`` is the whole response when not streaming, '' when streaming."""
    return {
        "model": model,
        "created_at": now_iso(),
        "response": text,
        "generated_text": text,  # the published GREEN-CODE endpoint answered with this key
        "done": True,
        "done_reason": ollama_done_reason(c.result.finish_reason),
        "total_duration": int(total_s * 1e9),
        "load_duration": 0,
        "prompt_eval_count": c.result.prompt_tokens,
        "eval_count": len(c.result.token_ids),
        "eval_duration": int(c.result.time_s * 1e9),
        "greencode": _details(c),
    }


def ollama_template(fim: FimFormat | None, order: str) -> str:
    """The model card's prompt template in Ollama's syntax. Continue sends ``suffix`` only to models whose
    template names ``.Suffix``, so a model with FIM tokens gets one (the server builds the real prompt)."""
    if fim is None:
        return "{{ .Prompt }}"
    p, s, m = fim.text
    prompt, suffix = "{{ .Prompt }}", "{{ .Suffix }}"
    fill = f"{p}{s}{suffix}{m}{prompt}" if order == "spm" else f"{p}{prompt}{s}{suffix}{m}"
    return f"{{{{- if .Suffix }}}}{fill}{{{{- else }}}}{prompt}{{{{- end }}}}"


def ollama_loaded(model: str) -> dict[str, Any]:
    """Ollama answers an empty prompt by (re)loading the model and returning at once."""
    return {"model": model, "created_at": now_iso(), "response": "", "done": True, "done_reason": "load"}


# --------------------------------------------------------------------------- OpenAI


def openai_finish_reason(finish_reason: str) -> str:
    return "length" if finish_reason == "length" else "stop"


def openai_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def openai_response(model: str, completions: list[Completion]) -> dict[str, Any]:
    prompt_tokens = sum(c.result.prompt_tokens for c in completions)
    generated = sum(len(c.result.token_ids) for c in completions)
    return {
        "id": openai_id(),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"text": c.text, "index": i, "logprobs": None,
             "finish_reason": openai_finish_reason(c.result.finish_reason), "greencode": _details(c, ignored=False)}
            for i, c in enumerate(completions)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                  "total_tokens": prompt_tokens + generated,
                  "prompt_tokens_details": {"cached_tokens": sum(c.result.cached_prompt_tokens for c in completions)},
                  "completion_tokens_details": {
                      "cached_tokens": sum(c.result.cached_completion_tokens for c in completions)}},
        "greencode": _summary(completions),
    }


def _summary(completions: list[Completion]) -> dict[str, Any]:
    """Request-level GreenCode details over all choices (mean layers over every generated token)."""
    layers = [n for c in completions for n in c.result.layers_per_token]
    energies = [c.result.energy_j for c in completions]
    return {
        "gate": completions[0].gate,
        "mean_layers": round(sum(layers) / len(layers), 4) if layers else 0.0,
        "layers_per_token": layers if len(completions) == 1 else [c.result.layers_per_token for c in completions],
        "num_layers": completions[0].result.num_layers,
        "time_s": round(max(c.result.time_s for c in completions), 6),
        "energy_j": None if any(e is None for e in energies) else sum(energies),
        "cached_prompt_tokens": sum(c.result.cached_prompt_tokens for c in completions),
        "cached_completion_tokens": sum(c.result.cached_completion_tokens for c in completions),
        "ignored_parameters": completions[0].ignored,
        "lossless": hasattr(completions[0].result, "speculative"),  # each choice holds its round statistics
    }


def openai_chunk(cid: str, created: int, model: str, text: str, finish_reason: str | None,
                 final: Completion | None = None) -> str:
    choice = {"text": text, "index": 0, "logprobs": None,
              "finish_reason": openai_finish_reason(finish_reason) if finish_reason else None}
    body: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model,
                            "choices": [choice]}
    if final is not None:
        body["greencode"] = _details(final)
    return f"data: {json.dumps(body)}\n\n"


OPENAI_DONE = "data: [DONE]\n\n"
