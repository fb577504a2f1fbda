"""HTTP errors with one body shape: ``{"detail": [{"field": ..., "message": ...}]}``."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from metalearn.errors import UserError

RETRY_AFTER_SECONDS = 1
_FLAG_IN_MESSAGE = re.compile(r"--([A-Za-z_]+)")


class ApiError(Exception):
    """A refused request: its status, what is wrong, and which input (flag or body path) it names."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.headers = headers or {}


class Busy(Exception):
    """Too many requests wait for the same worker already (503 with Retry-After)."""


def field_of(message: str) -> str | None:
    """The flag a message names (``--n_way must be ...`` -> ``n_way``), or None."""
    match = _FLAG_IN_MESSAGE.search(message)
    return match.group(1) if match else None


def error_body(message: str, field: str | None = None) -> dict:
    return {"detail": [{"field": field, "message": message}]}


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


def conflict(message: str) -> ApiError:
    return ApiError(409, message)


def too_large(message: str, field: str | None = None) -> ApiError:
    return ApiError(413, message, field)


def invalid(message: str, field: str | None = None) -> ApiError:
    return ApiError(422, message, field)


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal as ``{"detail": [{"field", "message"}]}``; bad input is never a 500."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(error.message, error.field), error.status, headers=error.headers
        )

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> JSONResponse:
        return JSONResponse(error_body(str(error), field_of(str(error))), 422)

    @app.exception_handler(Busy)
    async def busy(request: Request, error: Busy) -> JSONResponse:
        return JSONResponse(
            error_body("the playground is busy; retry shortly"),
            503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, error: RequestValidationError) -> JSONResponse:
        detail = [
            {"field": None, "message": f"malformed JSON: {item.get('ctx', {}).get('error', '')}"}
            if item["type"] == "json_invalid"
            else {
                "field": ".".join(str(part) for part in item["loc"][1:]) or None,
                "message": item["msg"],
            }
            for item in error.errors()
        ]
        return JSONResponse({"detail": detail}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(error.detail)),
            error.status_code,
            headers=getattr(error, "headers", None),
        )
