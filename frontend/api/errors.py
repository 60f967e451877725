"""Errors in llama.cpp's shape: ``{"error": {"code": N, "message": "...", "type": "..."}}``."""
from __future__ import annotations

from starlette.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


class APIError(Exception):
    """An error answered as JSON with its HTTP status. Bad user input is a 400, never an assert."""

    def __init__(self, code: int, message: str, type_: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.type = type_ or ERROR_TYPES.get(code, "server_error")

    def body(self) -> dict:
        return error_body(self.code, self.message, self.type)


def bad_request(message: str) -> APIError:
    return APIError(400, message, "invalid_request_error")


def error_body(code: int, message: str, type_: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "type": type_ or ERROR_TYPES.get(code, "server_error")}}


def error_response(code: int, message: str, type_: str | None = None, path: str = "") -> JSONResponse:
    return JSONResponse(error_body_for(path, code, message, type_), status_code=code)


ANTHROPIC_PREFIX = "/v1/messages"


def error_body_for(path: str, code: int, message: str, type_: str | None = None) -> dict:
    """llama.cpp's shape; on the Anthropic routes with Anthropic's `"type": "error"` beside it, so
    that both kinds of client read it: ``{"type": "error", "error": {"code", "message", "type"}}``."""
    body = error_body(code, message, type_)
    anthropic = path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")
    return {"type": "error", **body} if anthropic else body
