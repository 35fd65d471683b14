"""Errors of the HTTP surface: every refusal in the calling client's own error shape, never a bare 500.

Routes raise :class:`ApiError` (the request is wrong: 4xx), :class:`GenerationFailed` (the model
failed on it: TGI 424, others 500) or an admission refusal (429/503 with ``Retry-After``);
FastAPI's validation errors and HTTP errors are rewritten the same way by the handlers
:func:`install` registers. The body shapes per protocol are in ``serve_app/formats.py``
(``error_body``); refusals before the app runs come from ``serve_app/guard.py``.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import formats
from serve_app.admission import Refused

log = logging.getLogger("greencode.serve")

# OpenAPI documentation of the error responses every route may give
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid request (OpenAI / Ollama error shape)"},
    401: {"description": "missing or wrong API key (when the server has one)"},
    403: {"description": "Host or Origin not allowed (DNS rebinding, cross-site page)"},
    413: {"description": "request body over the size limit"},
    415: {"description": "POST body without a JSON content type"},
    422: {"description": "invalid request (TGI error shape: error, error_type)"},
    424: {"description": "generation failed (TGI error shape; OpenAI and Ollama answer 500)"},
    429: {"description": "the replica's queue is full: retry after Retry-After seconds"},
    500: {"description": "generation failed (OpenAI / Ollama error shape) or a server fault"},
    503: {"description": "no capacity within the request timeout: retry after Retry-After seconds"},
}


class ApiError(Exception):
    """A request the server refuses; rendered in the calling client's error shape.

    ``status=None`` means "invalid request": 422 for TGI clients (what TGI answers), 400 otherwise.
    """

    def __init__(self, message: str, param: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class GenerationFailed(Exception):
    """The model failed on a request (e.g. non-finite logits in its row): a server fault, not the client's."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def error_response(request: Request, message: str, status: int | None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """``status=None``: the protocol's "invalid request" status."""
    protocol = formats.protocol_of(request.url.path)
    code = status if status is not None else formats.invalid_request_status(protocol)
    return JSONResponse(formats.error_body(protocol, message, code, param), status_code=code, headers=headers)


def describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line naming every offending field (``parameters.temperature: ...``), and the first field."""
    parts, first = [], None
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if e.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})")
            continue
        if not where and e.get("type") == "model_attributes_type":
            parts.append("request body must be a JSON object")
            continue
        first = first or where or None
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request", first


async def _on_api_error(request: Request, err: ApiError) -> JSONResponse:
    return error_response(request, err.message, err.status, err.param)


async def _on_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    message, param = describe_validation(list(err.errors()))
    return error_response(request, message, None, param)


async def _on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return error_response(request, str(err.detail), err.status_code)


async def _on_refused(request: Request, err: Refused) -> JSONResponse:
    return error_response(request, err.message, err.status, headers={"Retry-After": str(err.retry_after_s)})


async def _on_failed(request: Request, err: GenerationFailed) -> JSONResponse:
    log.error("generation failed for a request to %s: %s", request.url.path, err.message)
    protocol = formats.protocol_of(request.url.path)
    return error_response(request, f"generation failed: {err.message}", formats.failure_status(protocol))


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def internal_message(request_id: str) -> str:
    """What a client learns of a server fault: that it happened, and the id to find it in the log (nothing of the
    exception: its class and message may quote another request's data or the server's internals)."""
    return f"internal error (request id {request_id}): the server log has the details"


async def _on_bug(request: Request, err: Exception) -> JSONResponse:
    """A server fault (never the client's): logged with its traceback and a request id, answered as a 500 in the
    client's shape with that id only."""
    request_id = new_request_id()
    log.error("request to %s failed (request id %s)", request.url.path, request_id, exc_info=err)
    return error_response(request, internal_message(request_id), 500)


def install(api: FastAPI) -> None:
    """Register the handlers that render every error in the client's shape."""
    api.add_exception_handler(ApiError, _on_api_error)
    api.add_exception_handler(Refused, _on_refused)
    api.add_exception_handler(GenerationFailed, _on_failed)
    api.add_exception_handler(RequestValidationError, _on_invalid)
    api.add_exception_handler(StarletteHTTPException, _on_http_error)
    api.add_exception_handler(Exception, _on_bug)
