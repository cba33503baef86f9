"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with an HTTP status."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_field(param: str, message: str) -> ApiError:
    """400 for one request field; the message starts with the field's name."""
    return ApiError(400, message if message.startswith(param) else f"{param}: {message}", param, "invalid_value")


def not_found(video_id: str) -> ApiError:
    return ApiError(404, f"no video with id {video_id!r}", "video_id", "not_found")
