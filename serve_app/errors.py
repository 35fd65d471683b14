"""Errors of the HTTP surface: every refusal in the calling client's own error shape, never a bare 500.

Routes raise :class:`ApiError`; FastAPI's validation errors and HTTP errors are rewritten the same
way by the handlers :func:`install` registers. The body shapes per protocol are in
``serve_app/formats.py`` (``error_body``).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import formats
from serve_app.formats import TGI

log = logging.getLogger("greencode.serve")

# OpenAPI documentation of the error responses every route may give
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid request (OpenAI / Ollama error shape)"},
    401: {"description": "missing or wrong API key (when the server has one)"},
    422: {"description": "invalid request (TGI error shape: error, error_type)"},
}


class ApiError(Exception):
    """A request the server refuses; rendered in the calling client's error shape.

    ``status=None`` means "invalid request": 422 for TGI clients (what TGI answers), 400 otherwise.
    """

    def __init__(self, message: str, param: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def status_for(err_status: int | None, protocol: str) -> int:
    return err_status if err_status is not None else (422 if protocol == TGI else 400)


def error_response(request: Request, message: str, status: int | None, param: str | None = None) -> JSONResponse:
    protocol = formats.protocol_of(request.url.path)
    code = status_for(status, protocol)
    return JSONResponse(formats.error_body(protocol, message, code, param), status_code=code)


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


async def _on_bug(request: Request, err: Exception) -> JSONResponse:
    """A server fault (never the client's): logged with its traceback, answered as a 500 in the client's shape."""
    log.exception("request to %s failed", request.url.path)
    return error_response(request, f"internal error: {type(err).__name__}: {err}", 500)


def install(api: FastAPI) -> None:
    """Register the handlers that render every error in the client's shape."""
    api.add_exception_handler(ApiError, _on_api_error)
    api.add_exception_handler(RequestValidationError, _on_invalid)
    api.add_exception_handler(StarletteHTTPException, _on_http_error)
    api.add_exception_handler(Exception, _on_bug)
