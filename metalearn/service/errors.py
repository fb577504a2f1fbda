"""HTTP errors with one body shape: ``{"detail": [{"field": ..., "message": ...}]}``."""

from __future__ import annotations


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
