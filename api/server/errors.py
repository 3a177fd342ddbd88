"""API errors and their OpenAI-shaped JSON bodies (API workers)."""

from __future__ import annotations

import re

import msgspec

from fornax.api.protocol.openai import ErrorInfo, ErrorResponse

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answered to the client with `status` and the OpenAI error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, *,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "Error")
        self.headers = headers or {}

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(ErrorInfo(message=self.message, type=self.type, param=self.param,
                                       code=self.status))

    def body(self) -> bytes:
        return msgspec.json.encode(self.to_response())


class EngineDeadError(APIError):
    """The engine core is gone: every request fails with 503 until `serve` restarts."""

    def __init__(self, message: str = "the engine core is not running") -> None:
        super().__init__(503, message)


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(503, message, headers={"retry-after": str(retry_after_s)})


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`|missing required field `([^`]*)`")


def from_validation_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> APIError:
    """A 400 that names the field msgspec complained about (`$.max_tokens` -> max_tokens)."""
    text = str(exc)
    match = _PATH_RE.search(text)
    param = (match.group(1) or match.group(2)) if match else None
    if isinstance(exc, msgspec.ValidationError):
        message = f"invalid request: {text}"
        if param is not None and param.rsplit(".", 1)[-1] == "request_id" and "regex" in text:
            message = (f"invalid request: {param} must be printable ASCII (no control characters "
                       "such as CR/LF, no non-ASCII text, no leading or trailing spaces)")
    else:
        message = f"the request body is not valid JSON: {text}"
    return APIError(400, message, param or None)
