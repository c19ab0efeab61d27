"""One error shape for the whole API, and one table from error type to HTTP status.

Every failure a client sees is OpenAI's object (as vLLM's `ErrorResponse` and OpenAI's own API):

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": null}}

Handlers raise a typed `APIError` subclass; `STATUS` maps each type to its status code in one
place (no matching on exception text, no blanket "every ValueError is a 400"). A client mistake
is a 4xx; only a bug in herd is a 500. Once a stream has sent its 200 headers, a failure cannot
change the status any more: it becomes one `data: {"error": ...}` event followed by `data: [DONE]`
(`stream_error_events`).
"""

from __future__ import annotations

import json


class APIError(Exception):
    """Base of the errors the API reports. type/code follow OpenAI's vocabulary."""

    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    """The request is well-formed JSON but asks for something invalid."""


class ContextLengthExceeded(BadRequest):
    """Prompt + requested completion do not fit the model's context (never a 500: clients must not retry)."""

    code = "context_length_exceeded"


class Unauthorized(APIError):
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(APIError):
    code = "model_not_found"


class PayloadTooLarge(APIError):
    """A body or image beyond the server's limits."""

    code = "payload_too_large"


class QueueFull(APIError):
    type = "rate_limit_error"
    code = "queue_full"


class NotReady(APIError):
    """The model is still loading (llama.cpp's /health answers the same way)."""

    type = "unavailable_error"
    code = "model_loading"


class InternalError(APIError):
    type = "server_error"
    code = "internal_error"


STATUS: dict[type[APIError], int] = {
    BadRequest: 400,
    ContextLengthExceeded: 400,
    Unauthorized: 401,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    QueueFull: 429,
    InternalError: 500,
    NotReady: 503,
}


def status_of(err: APIError) -> int:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def stream_error_events(err: APIError) -> list[str]:
    """Server-sent events that end a stream which has already started: the error, then [DONE]."""
    return [f"data: {json.dumps(err.body())}\n\n", "data: [DONE]\n\n"]
