"""One error shape for every failure: what was wrong and which field.

{"error": {"type": "invalid_request", "message": "...", "field": "size",
           "errors": [{"field": "size", "message": "..."}]}}
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "model_unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.errors = (
            errors if errors is not None else ([{"field": field, "message": message}] if field else [])
        )
        if status == 401 and not any(h.lower() == "www-authenticate" for h in headers or {}):
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}  # RFC 6750: every 401
        self.headers = headers
        self.type = type or _TYPES.get(status, "error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {"type": self.type, "message": self.message, "field": self.field, "errors": self.errors}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# What a message from a worker (or a reason set by whoever hosts the gateway) may carry
# that a client must never see: tracebacks, exception reprs, object addresses, local paths.
_TRACEBACK = re.compile(r"\s*Traceback \(most recent call last\).*", re.S)
_EXCEPTION = re.compile(r"\b[A-Z][A-Za-z0-9_]*(?:Error|Exception|Warning)\b(?:\(.*\)|:).*", re.S)
_OBJECT = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")
_PATH = re.compile(r"(?<![\w.:/~-])~?/(?:[\w.@+-]+/)*[\w.@+-]+/?|\b[A-Za-z]:\\[^\s'\"]+")
INTERNAL = "an internal error (details are in the server log)"


def public_text(text: str) -> str:
    """`text` without internals. Callers log the original next to the job or model it is about."""
    out = _TRACEBACK.sub("", text)
    out = _EXCEPTION.sub(INTERNAL, out)
    out = _OBJECT.sub("<object>", out)
    out = _PATH.sub("<path>", out)
    return out.strip() or INTERNAL


def loc_to_field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "body"


def pydantic_errors(errs: list[dict[str, Any]]) -> ApiError:
    items = []
    for e in errs:
        field = loc_to_field(e.get("loc", ()))
        msg = e.get("msg", "invalid")
        if e.get("type") == "missing":
            msg = "field required"
        elif e.get("type") == "extra_forbidden":
            msg = "unknown field"
        items.append({"field": field, "message": msg})
    first = items[0] if items else {"field": None, "message": "invalid request"}
    summary = "; ".join(f"{i['field']}: {i['message']}" for i in items)
    return ApiError(422, f"request validation failed: {summary}", first["field"], items)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return pydantic_errors(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        return ApiError(exc.status_code, detail, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("remotegpu_gateway").exception("unhandled error")
        return ApiError(500, "internal error; the request was not processed").response()
